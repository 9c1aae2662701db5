//! What walship tells the walsender: standby status updates, and the clean end of a stream.
//!
//! Invariant: the server only ever hears the LSN the caller passes to
//! [`ReplicationStream::send_status`]; nothing here acknowledges on its own, and
//! [`ReplicationStream::finish`] waits for the server's answer, so the last status sent is the
//! slot's confirmed position when it returns.

use bytes::BufMut;
use pgoutput::{Lsn, PgTimestamp};
use postgres_protocol::message::frontend;
use tokio::io::AsyncWriteExt;

use super::stream::ReplicationStream;
use crate::error::{PgError, ServerError};

impl ReplicationStream {
    /// Sends a standby status update reporting `lsn` as written, flushed and applied.
    ///
    /// PostgreSQL moves the slot's `confirmed_flush_lsn` to `lsn`; it must only ever be a
    /// position before which everything has been durably delivered.
    pub async fn send_status(&mut self, lsn: Lsn, reply_requested: bool) -> Result<(), PgError> {
        self.wbuf.put_u8(b'd');
        self.wbuf.put_i32(4 + 1 + 8 * 4 + 1);
        self.wbuf.put_u8(b'r');
        self.wbuf.put_u64(lsn.0);
        self.wbuf.put_u64(lsn.0);
        self.wbuf.put_u64(lsn.0);
        self.wbuf.put_i64(PgTimestamp::now().0);
        self.wbuf.put_u8(u8::from(reply_requested));
        self.flush_wbuf().await
    }

    /// Ends the stream cleanly: CopyDone, wait for the server to finish, Terminate.
    ///
    /// Waiting for the server's answer guarantees it has processed every status update sent
    /// before, so a restart right after sees the final confirmed position.
    pub async fn finish(mut self) -> Result<(), PgError> {
        frontend::copy_done(&mut self.wbuf);
        self.flush_wbuf().await?;
        loop {
            if let Some(total) = self.complete_message_len()? {
                let msg = self.rbuf.split_to(total);
                match msg[0] {
                    b'Z' => break,
                    b'E' => {
                        return Err(PgError::Server {
                            context: "ending replication".into(),
                            error: ServerError::parse(&msg[5..]),
                        });
                    }
                    _ => continue, // remaining CopyData, CopyDone, CommandComplete
                }
            }
            self.fill().await?;
        }
        frontend::terminate(&mut self.wbuf);
        self.flush_wbuf().await?;
        let _ = self.io.shutdown().await;
        Ok(())
    }
}

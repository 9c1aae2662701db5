//! The frames of the CopyBoth stream: `XLogData` (one pgoutput message each) and primary
//! keepalives, parsed straight out of the read buffer.
//!
//! Invariant: [`ReplicationStream::try_next`] never does I/O and never copies a payload: a
//! frame's data is a slice of the read buffer, handed to the caller on the same task; a notice
//! is logged and skipped, anything else that is not a frame is an error.

use bytes::{Buf, Bytes};
use pgoutput::{Lsn, PgTimestamp};

use super::stream::{ReplicationStream, log_notice};
use crate::error::{PgError, ServerError};

/// One frame of the replication stream.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Frame {
    /// WAL data: one pgoutput message.
    XLogData {
        /// WAL position of the start of this data.
        wal_start: Lsn,
        /// The server's current end of WAL.
        wal_end: Lsn,
        /// Server clock when sent.
        send_time: PgTimestamp,
        /// The pgoutput message.
        data: Bytes,
    },
    /// Primary keepalive: the server has sent everything up to `wal_end`.
    Keepalive {
        /// The last WAL position the server sent (everything before it has been delivered).
        wal_end: Lsn,
        /// Server clock when sent.
        send_time: PgTimestamp,
        /// The server wants a standby status update now (its `wal_sender_timeout` is near).
        reply_requested: bool,
    },
}

impl ReplicationStream {
    /// Returns the next frame if the read buffer holds one; never does I/O.
    ///
    /// Notices are logged and skipped. An `ErrorResponse` or the server ending the stream is an
    /// error.
    pub fn try_next(&mut self) -> Result<Option<Frame>, PgError> {
        loop {
            let Some(total) = self.complete_message_len()? else {
                return Ok(None);
            };
            let tag = self.rbuf[0];
            if tag != b'd' {
                let body = self.rbuf.split_to(total).split_off(5);
                match tag {
                    b'N' => {
                        log_notice(&body);
                        continue;
                    }
                    b'E' => {
                        return Err(PgError::Server {
                            context: "replication stream".into(),
                            error: ServerError::parse(&body),
                        });
                    }
                    b'c' => {
                        return Err(PgError::Protocol(
                            "the server ended the replication stream (CopyDone)".into(),
                        ));
                    }
                    other => {
                        return Err(PgError::Protocol(format!(
                            "unexpected message '{}' in replication stream",
                            other.escape_ascii()
                        )));
                    }
                }
            }
            let mut body = self.rbuf.split_to(total).freeze();
            body.advance(5);
            return parse_copy_data(body).map(Some);
        }
    }
}

fn parse_copy_data(mut body: Bytes) -> Result<Frame, PgError> {
    let short = || PgError::Protocol("truncated replication frame".into());
    if body.is_empty() {
        return Err(short());
    }
    match body.get_u8() {
        b'w' => {
            if body.len() < 24 {
                return Err(short());
            }
            let wal_start = Lsn(body.get_u64());
            let wal_end = Lsn(body.get_u64());
            let send_time = PgTimestamp(body.get_i64());
            Ok(Frame::XLogData {
                wal_start,
                wal_end,
                send_time,
                data: body,
            })
        }
        b'k' => {
            if body.len() < 17 {
                return Err(short());
            }
            let wal_end = Lsn(body.get_u64());
            let send_time = PgTimestamp(body.get_i64());
            Ok(Frame::Keepalive {
                wal_end,
                send_time,
                reply_requested: body.get_u8() != 0,
            })
        }
        other => Err(PgError::Protocol(format!(
            "unknown replication frame type '{}'",
            other.escape_ascii()
        ))),
    }
}

#[cfg(test)]
mod tests;

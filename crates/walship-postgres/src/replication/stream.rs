//! The replication connection's byte level: the socket, the read buffer whole backend messages
//! are cut from, and the write buffer ([`ReplicationStream`] itself; connecting, frames and
//! status updates are its other files).
//!
//! Invariant: a message leaves the read buffer only once it is whole, and reading is
//! cancel-safe (a dropped [`ReplicationStream::fill`] loses no bytes); the write buffer is empty
//! after every flush, whether the write succeeded or not.

use bytes::{Buf, Bytes, BytesMut};
use pgoutput::Lsn;
use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt};

use crate::batching::{self, Batcher};
use crate::error::{PgError, ServerError};

/// Anything the replication protocol can run over (TCP, Unix socket).
pub(super) trait Io: AsyncRead + AsyncWrite + Unpin + Send {}
impl<T: AsyncRead + AsyncWrite + Unpin + Send> Io for T {}

const READ_CHUNK: usize = 256 * 1024;
const MIN_READ_SPACE: usize = 64 * 1024;

/// A replication connection in the CopyBoth state.
pub struct ReplicationStream {
    pub(super) io: Box<dyn Io>,
    /// `host:port` (or the socket path), for messages.
    pub(super) target: String,
    pub(super) rbuf: BytesMut,
    pub(super) wbuf: BytesMut,
    pub(super) system: SystemIdentity,
    /// Declared after `io`, whose socket it points at (see `Batcher::new`).
    pub(super) batcher: Option<Batcher>,
}

/// What `IDENTIFY_SYSTEM` reported when the stream started.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct SystemIdentity {
    /// The cluster's unique system identifier (kept across physical failover).
    pub system_id: String,
    /// The server's timeline: 1 from `initdb`, one more at each promotion (or point-in-time
    /// recovery), so a change tells a promoted standby from the server walship streamed from.
    pub timeline: u32,
    /// The server's WAL flush position: every transaction a stream can deliver that committed
    /// before this session started ends before it.
    pub xlogpos: Lsn,
}

/// The rows of a replication command's answer, every field as text (`None`: NULL).
pub type TextRows = Vec<Vec<Option<String>>>;

impl ReplicationStream {
    /// A connection on `io` to `target`, before startup: empty buffers, not batched yet.
    pub(super) fn new(io: Box<dyn Io>, target: String) -> Self {
        ReplicationStream {
            io,
            target,
            rbuf: BytesMut::with_capacity(READ_CHUNK),
            wbuf: BytesMut::with_capacity(1024),
            system: SystemIdentity::default(),
            batcher: None,
        }
    }

    /// What `IDENTIFY_SYSTEM` reported before streaming started.
    pub fn system(&self) -> &SystemIdentity {
        &self.system
    }

    /// Reads one whole backend message (tag + length + body) as raw bytes.
    pub(super) async fn read_raw_message(&mut self) -> Result<BytesMut, PgError> {
        loop {
            if let Some(total) = self.complete_message_len()? {
                return Ok(self.rbuf.split_to(total));
            }
            self.fill().await?;
        }
    }

    /// Reads one message, returning its tag and body.
    pub(super) async fn read_message(&mut self) -> Result<(u8, Bytes), PgError> {
        let mut raw = self.read_raw_message().await?.freeze();
        let tag = raw[0];
        raw.advance(5);
        Ok((tag, raw))
    }

    /// If the read buffer holds a whole message, its total length.
    pub(super) fn complete_message_len(&mut self) -> Result<Option<usize>, PgError> {
        if self.rbuf.len() < 5 {
            return Ok(None);
        }
        let len = i32::from_be_bytes([self.rbuf[1], self.rbuf[2], self.rbuf[3], self.rbuf[4]]);
        let len = usize::try_from(len)
            .ok()
            .filter(|&l| l >= 4)
            .ok_or_else(|| PgError::Protocol(format!("invalid message length {len}")))?;
        let total = len + 1;
        if self.rbuf.len() < total {
            self.rbuf.reserve(total - self.rbuf.len());
            return Ok(None);
        }
        Ok(Some(total))
    }

    /// Reads more bytes from the socket (at least one; large chunks when available).
    ///
    /// Cancel-safe: if the future is dropped, no bytes are lost.
    pub async fn fill(&mut self) -> Result<(), PgError> {
        if self.rbuf.capacity() - self.rbuf.len() < MIN_READ_SPACE {
            self.rbuf.reserve(READ_CHUNK);
        }
        let n = batching::read(&mut self.io, &mut self.rbuf, self.batcher.as_mut())
            .await
            .map_err(|source| PgError::Io {
                target: self.target.clone(),
                source,
            })?;
        if n == 0 {
            return Err(PgError::Io {
                target: self.target.clone(),
                source: std::io::Error::new(
                    std::io::ErrorKind::UnexpectedEof,
                    "server closed the connection",
                ),
            });
        }
        Ok(())
    }

    /// Whether this stream batches its socket reads (see [`crate::batching`]).
    pub fn reads_batched(&self) -> bool {
        self.batcher.is_some()
    }

    pub(super) async fn flush_wbuf(&mut self) -> Result<(), PgError> {
        let r = async {
            self.io.write_all(&self.wbuf).await?;
            self.io.flush().await
        }
        .await;
        self.wbuf.clear();
        r.map_err(|source| PgError::Io {
            target: self.target.clone(),
            source,
        })
    }
}

/// Logs a `NoticeResponse`.
pub(super) fn log_notice(body: &[u8]) {
    let notice = ServerError::parse(body);
    tracing::info!(code = %notice.code, "PostgreSQL notice: {}", notice.message);
}

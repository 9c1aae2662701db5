//! Read batching on the replication socket: wake the reader once per 32 KiB or per
//! millisecond instead of once per walsender message.
//!
//! The walsender writes every pgoutput message with its own `send()`. On a short path (same
//! host) a reader that is faster than the walsender is woken for nearly every one of them — a
//! context switch, an `epoll_wait`, a small `recv` and an ACK per three messages — and each of
//! those `send()`s pays for the whole TCP transmit *and* receive path on the walsender's core,
//! which is the core that decides throughput. With batching on:
//!
//! * `SO_RCVLOWAT` is raised to [`MARK`] after each read, so the kernel wakes the reader only
//!   when that much is queued;
//! * a timer lowers it back to one byte [`PACE`] after the last read, so nothing waits longer
//!   than that (the kernel signals the bytes already queued when the mark drops);
//! * the receive buffer is fixed at [`WINDOW`], so the window fills between reads and the
//!   walsender's sends queue in its socket and leave in large segments instead of one by one.
//!
//! Invariant: a byte that has arrived is read at most [`PACE`] (plus one timer tick) after the
//! previous read; the low-water mark is never left raised without a deadline that lowers it.
//!
//! The window caps throughput at [`WINDOW`] per round trip (320 MB/s at 0.1 ms, 32 MB/s at
//! 1 ms), which is why `auto` turns batching on only for a loopback peer.

use std::os::fd::RawFd;
use std::time::Duration;

use bytes::BytesMut;
use tokio::io::{AsyncRead, AsyncReadExt};
use tokio::time::Instant;

/// Whether the replication stream batches its socket reads (`postgres.read_batching`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum ReadBatching {
    /// On when the server is reached over TCP on a loopback address (same host).
    #[default]
    Auto,
    /// On for any TCP connection (a fast LAN where `WINDOW`/RTT is still plenty).
    On,
    /// Never: the OS defaults, one wake-up per arrival.
    Off,
}

impl std::str::FromStr for ReadBatching {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "auto" => Ok(Self::Auto),
            "on" => Ok(Self::On),
            "off" => Ok(Self::Off),
            other => Err(format!(
                "read_batching {other:?} is not one of \"auto\", \"on\", \"off\""
            )),
        }
    }
}

/// Bytes queued before the kernel wakes the reader.
pub const MARK: i32 = 32 * 1024;
/// Longest wait for [`MARK`] after a read.
pub const PACE: Duration = Duration::from_millis(1);
/// Receive buffer (the kernel doubles it for bookkeeping; the window stays near this size).
pub const WINDOW: i32 = 32 * 1024;

/// The TCP socket under a replication connection, as far as batching needs it.
#[derive(Debug, Clone, Copy)]
pub(crate) struct TcpSocket {
    /// Owned by the connection's stream, which outlives every use here.
    pub(crate) fd: RawFd,
    /// The peer is a loopback address.
    pub(crate) loopback: bool,
}

impl TcpSocket {
    pub(crate) fn of(stream: &tokio::net::TcpStream) -> Self {
        let loopback = stream
            .peer_addr()
            .is_ok_and(|a| a.ip().to_canonical().is_loopback());
        TcpSocket {
            fd: std::os::fd::AsRawFd::as_raw_fd(stream),
            loopback,
        }
    }
}

/// The low-water-mark state machine of one socket.
#[derive(Debug)]
pub(crate) struct Batcher {
    fd: RawFd,
    raised: bool,
    deadline: Option<Instant>,
}

impl Batcher {
    /// Batching for `socket` under `mode`, or `None` when it stays off. Linux only: elsewhere
    /// lowering the mark does not signal bytes already queued.
    pub(crate) fn new(
        socket: Option<TcpSocket>,
        mode: ReadBatching,
    ) -> std::io::Result<Option<Self>> {
        let Some(socket) = socket else {
            return Ok(None);
        };
        let on = match mode {
            ReadBatching::Off => false,
            ReadBatching::On => true,
            ReadBatching::Auto => socket.loopback,
        };
        if !on || !cfg!(target_os = "linux") {
            return Ok(None);
        }
        set_int_option(socket.fd, libc::SO_RCVBUF, WINDOW)?;
        Ok(Some(Batcher {
            fd: socket.fd,
            raised: false,
            deadline: None,
        }))
    }

    /// Until when the next read may wait for the mark (`None`: the mark is down).
    pub(crate) fn deadline(&self) -> Option<Instant> {
        self.deadline.filter(|_| self.raised)
    }

    /// The deadline passed: drop the mark so whatever is queued wakes the reader now.
    pub(crate) fn expire(&mut self) -> std::io::Result<()> {
        set_int_option(self.fd, libc::SO_RCVLOWAT, 1)?;
        self.raised = false;
        self.deadline = None;
        Ok(())
    }

    /// A read returned data: raise the mark (if down) and start the next deadline.
    pub(crate) fn after_read(&mut self) -> std::io::Result<()> {
        if !self.raised {
            set_int_option(self.fd, libc::SO_RCVLOWAT, MARK)?;
            self.raised = true;
        }
        self.deadline = Some(Instant::now() + PACE);
        Ok(())
    }
}

/// One read into `buf`, waiting for the mark until the batcher's deadline and for any byte
/// after it. Cancel-safe like `read_buf`: a dropped future loses no bytes (the mark may be left
/// down, which only costs an early wake-up).
pub(crate) async fn read<R: AsyncRead + Unpin + ?Sized>(
    io: &mut R,
    buf: &mut BytesMut,
    batcher: Option<&mut Batcher>,
) -> std::io::Result<usize> {
    let Some(batcher) = batcher else {
        return io.read_buf(buf).await;
    };
    let n = match batcher.deadline() {
        Some(deadline) => {
            let early = tokio::select! {
                biased;
                r = io.read_buf(buf) => Some(r?),
                () = tokio::time::sleep_until(deadline) => None,
            };
            match early {
                Some(n) => n,
                None => {
                    batcher.expire()?;
                    io.read_buf(buf).await?
                }
            }
        }
        None => io.read_buf(buf).await?,
    };
    if n > 0 {
        batcher.after_read()?;
    }
    Ok(n)
}

/// `setsockopt(fd, SOL_SOCKET, option, &value)`.
#[allow(unsafe_code)]
fn set_int_option(fd: RawFd, option: libc::c_int, value: libc::c_int) -> std::io::Result<()> {
    let len = libc::socklen_t::try_from(std::mem::size_of::<libc::c_int>())
        .map_err(|_| std::io::Error::other("socklen_t too small for c_int"))?;
    // SAFETY: the pointer is to a live c_int of the stated length; setsockopt only reads it.
    // A stale fd would make the call fail with EBADF, not touch memory.
    let rc =
        unsafe { libc::setsockopt(fd, libc::SOL_SOCKET, option, (&raw const value).cast(), len) };
    if rc == 0 {
        Ok(())
    } else {
        Err(std::io::Error::last_os_error())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::AsyncWriteExt;
    use tokio::net::{TcpListener, TcpStream};

    async fn pair() -> (TcpStream, TcpStream) {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let client = TcpStream::connect(listener.local_addr().expect("addr"))
            .await
            .expect("connect");
        let (server, _) = listener.accept().await.expect("accept");
        (client, server)
    }

    #[tokio::test]
    async fn auto_batches_loopback_and_off_never() {
        let (client, _server) = pair().await;
        let socket = TcpSocket::of(&client);
        assert!(socket.loopback);
        assert!(
            Batcher::new(Some(socket), ReadBatching::Auto)
                .expect("auto")
                .is_some()
        );
        assert!(
            Batcher::new(Some(socket), ReadBatching::Off)
                .expect("off")
                .is_none()
        );
        assert!(
            Batcher::new(None, ReadBatching::On)
                .expect("unix")
                .is_none()
        );
    }

    /// Bytes below the mark are still read: the deadline lowers the mark and the kernel
    /// signals what is queued. Without that step this read would wait forever.
    #[tokio::test]
    async fn bytes_below_the_mark_are_read_after_the_pace() {
        let (mut client, mut server) = pair().await;
        let mut batcher = Batcher::new(Some(TcpSocket::of(&client)), ReadBatching::On)
            .expect("batcher")
            .expect("on");
        let mut buf = BytesMut::with_capacity(64 * 1024);
        for round in 0..5u8 {
            server.write_all(&[round; 100]).await.expect("write");
            let n = tokio::time::timeout(
                Duration::from_secs(10),
                read(&mut client, &mut buf, Some(&mut batcher)),
            )
            .await
            .expect("a write below the mark was not read")
            .expect("read");
            assert_eq!(n, 100, "round {round}");
            assert!(
                batcher.deadline().is_some(),
                "the mark is raised after a read"
            );
            buf.clear();
        }
        // A write of more than the mark arrives whole, across however many reads it takes.
        let big = vec![7u8; 3 * MARK as usize];
        server.write_all(&big).await.expect("write");
        let mut got = 0;
        while got < big.len() {
            got += tokio::time::timeout(
                Duration::from_secs(10),
                read(&mut client, &mut buf, Some(&mut batcher)),
            )
            .await
            .expect("read stalled")
            .expect("read");
        }
        assert_eq!(buf.len(), big.len());
    }

    #[test]
    fn modes_parse_and_unknown_names_are_refused() {
        assert_eq!("auto".parse::<ReadBatching>(), Ok(ReadBatching::Auto));
        assert_eq!("on".parse::<ReadBatching>(), Ok(ReadBatching::On));
        assert_eq!("off".parse::<ReadBatching>(), Ok(ReadBatching::Off));
        let err = "yes".parse::<ReadBatching>().unwrap_err();
        assert!(err.contains("\"auto\", \"on\", \"off\""), "{err}");
    }
}

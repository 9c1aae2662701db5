//! Read batching on the replication socket: wake the reader once per 32 KiB or per 1–2 ms
//! instead of once per walsender message.
//!
//! The walsender writes every pgoutput message with its own `send()`. On a short path (same
//! host) a reader that is faster than the walsender is woken for nearly every one of them — a
//! context switch, an `epoll_wait`, a small `recv` and an ACK per three messages — and each of
//! those `send()`s pays for the whole TCP transmit *and* receive path on the walsender's core,
//! which is the core that decides throughput. With batching on:
//!
//! * the receive buffer is set to [`WINDOW`] before connecting, so the window fills between
//!   reads and the walsender's sends queue in its socket and leave in large segments;
//! * `SO_RCVLOWAT` is raised to [`MARK`] after each read, so the kernel wakes the reader only
//!   when that much is queued (or the window is nearly full);
//! * a timer lowers it back to one byte [`PACE`] after the last read (tokio's timer rounds up
//!   to the next millisecond tick: 1–2 ms), and Linux then signals the bytes already queued.
//!
//! Invariant: while a read is in progress, the low-water mark is never raised without a
//! deadline that lowers it, so a byte that has arrived waits at most one pace.
//!
//! Costs: at most 1–2 ms of added latency per read, and throughput capped near the window per
//! round trip (the kernel doubles the buffer; Linux 6.x advertises ~55 KiB: ~500 MB/s at
//! 0.1 ms, ~50 MB/s at 1 ms). Hence `auto` batches only loopback peers. Needs Linux
//! [`MIN_KERNEL`] or later; elsewhere batching stays off.

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

/// Oldest kernel whose `SO_RCVLOWAT` is safe to lean on: 4.18 made lowering the mark signal
/// bytes already queued, 5.8 stopped a raised mark from holding back a full receive queue.
pub const MIN_KERNEL: (u32, u32) = (5, 8);

/// Whether a connection to `peer` should batch under `mode`: the mode says so, the peer is
/// reached over TCP, and the kernel handles the low-water mark. `Err` explains why an explicit
/// `on` cannot be honoured.
pub fn wanted(mode: ReadBatching, peer: std::net::IpAddr) -> Result<bool, String> {
    let on = match mode {
        ReadBatching::Off => return Ok(false),
        ReadBatching::On => true,
        ReadBatching::Auto => peer.to_canonical().is_loopback(),
    };
    if !on {
        return Ok(false);
    }
    match kernel_supports() {
        Ok(()) => Ok(true),
        Err(why) if mode == ReadBatching::On => Err(why),
        Err(_) => Ok(false),
    }
}

fn kernel_supports() -> Result<(), String> {
    if !cfg!(target_os = "linux") {
        return Err("read batching needs Linux (SO_RCVLOWAT semantics)".into());
    }
    let release = std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default();
    let mut parts = release
        .trim()
        .split(|c: char| !c.is_ascii_digit())
        .map(|p| p.parse::<u32>().ok());
    match (parts.next().flatten(), parts.next().flatten()) {
        (Some(major), Some(minor)) if (major, minor) >= MIN_KERNEL => Ok(()),
        _ => Err(format!(
            "read batching needs Linux {}.{} or later; this kernel is {:?}",
            MIN_KERNEL.0,
            MIN_KERNEL.1,
            release.trim()
        )),
    }
}

/// The low-water-mark state machine of one socket.
#[derive(Debug)]
pub(crate) struct Batcher {
    fd: RawFd,
    /// `Some` while the mark is raised: when the next read stops waiting for it.
    deadline: Option<Instant>,
}

impl Batcher {
    /// Batching on `fd`, a connected TCP socket whose receive buffer was set to [`WINDOW`]
    /// before connecting (see [`wanted`]). The fd must stay open as long as the batcher is used:
    /// it belongs to the stream that the batcher is stored beside.
    pub(crate) fn new(fd: RawFd) -> Self {
        Batcher { fd, deadline: None }
    }

    /// Until when the next read may wait for the mark (`None`: the mark is down).
    pub(crate) fn deadline(&self) -> Option<Instant> {
        self.deadline
    }

    /// The deadline passed: drop the mark so whatever is queued wakes the reader now.
    pub(crate) fn expire(&mut self) -> std::io::Result<()> {
        set_int_option(self.fd, libc::SO_RCVLOWAT, 1)?;
        self.deadline = None;
        Ok(())
    }

    /// A read returned data: raise the mark (if down) and start the next deadline.
    pub(crate) fn after_read(&mut self) -> std::io::Result<()> {
        if self.deadline.is_none() {
            set_int_option(self.fd, libc::SO_RCVLOWAT, MARK)?;
        }
        self.deadline = Some(Instant::now() + PACE);
        Ok(())
    }
}

/// One read into `buf`, waiting for the mark until the batcher's deadline and for any byte
/// after it. Cancel-safe like `read_buf`: a dropped future loses no bytes; the mark is left
/// either down (costing one early wake-up) or raised with its deadline kept, which the next
/// call honours.
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
    // SAFETY: the pointer is to a live c_int of the stated length and setsockopt only reads
    // it. `fd` is open: it belongs to the stream stored beside the batcher (see
    // `Batcher::new`), so it cannot have been closed and reused for another socket.
    let rc =
        unsafe { libc::setsockopt(fd, libc::SOL_SOCKET, option, (&raw const value).cast(), len) };
    if rc == 0 {
        Ok(())
    } else {
        Err(std::io::Error::last_os_error())
    }
}

/// `getsockopt(fd, SOL_SOCKET, option)` as a c_int.
#[cfg(test)]
#[allow(unsafe_code)]
fn get_int_option(fd: RawFd, option: libc::c_int) -> std::io::Result<libc::c_int> {
    let mut value: libc::c_int = 0;
    let mut len = libc::socklen_t::try_from(std::mem::size_of::<libc::c_int>())
        .map_err(|_| std::io::Error::other("socklen_t too small for c_int"))?;
    // SAFETY: both pointers are to live locals of the stated sizes; fd is open (the test owns
    // the stream).
    let rc = unsafe {
        libc::getsockopt(
            fd,
            libc::SOL_SOCKET,
            option,
            (&raw mut value).cast(),
            &raw mut len,
        )
    };
    if rc == 0 {
        Ok(value)
    } else {
        Err(std::io::Error::last_os_error())
    }
}

#[cfg(all(test, target_os = "linux"))]
mod tests;

//! librdkafka's queue of reports (the producer's main queue), made to announce itself.
//!
//! Owns the one handle on the queue that the poll thread uses, and the queue's registration
//! of a socket that librdkafka writes to whenever the queue turns non-empty
//! (`rd_kafka_queue_io_event_enable`): rust-rdkafka exposes neither.
//!
//! Invariant: the socket is unregistered and the handle released when this value is dropped,
//! which its owner does before the producer and the socket go.

#![allow(unsafe_code)]

use std::os::fd::RawFd;

use rdkafka::bindings::{
    rd_kafka_queue_destroy, rd_kafka_queue_get_main, rd_kafka_queue_io_event_enable,
    rd_kafka_queue_length, rd_kafka_queue_t,
};
use rdkafka::client::{Client, ClientContext};

/// A handle on a client's main queue that writes one byte to a socket when the queue turns
/// non-empty.
pub(super) struct ReportQueue(*mut rd_kafka_queue_t);

// SAFETY: librdkafka's queue handles may be used from any thread; this one is used by one
// thread at a time (it moves to the poll thread).
unsafe impl Send for ReportQueue {}

impl ReportQueue {
    /// Registers `fd` (non-blocking, kept open until this value is dropped) on `client`'s main
    /// queue.
    pub(super) fn of<C: ClientContext>(client: &Client<C>, fd: RawFd) -> ReportQueue {
        // SAFETY: the client pointer is valid while `client` lives; the returned handle holds
        // its own reference on the queue, released in `drop`.
        let queue = unsafe { rd_kafka_queue_get_main(client.native_ptr()) };
        // SAFETY: `queue` is valid; librdkafka copies the one-byte payload.
        unsafe { rd_kafka_queue_io_event_enable(queue, fd, b"r".as_ptr().cast(), 1) };
        ReportQueue(queue)
    }

    /// Events waiting in the queue.
    pub(super) fn len(&self) -> usize {
        // SAFETY: the handle is valid until dropped.
        unsafe { rd_kafka_queue_length(self.0) }
    }
}

impl Drop for ReportQueue {
    fn drop(&mut self) {
        // SAFETY: the handle is valid; unregistering (fd -1) before releasing it, so librdkafka
        // never writes to a socket that is closed (or whose number was reused).
        unsafe {
            rd_kafka_queue_io_event_enable(self.0, -1, std::ptr::null(), 0);
            rd_kafka_queue_destroy(self.0);
        }
    }
}

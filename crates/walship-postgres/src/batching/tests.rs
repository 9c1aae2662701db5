use super::*;
use std::os::fd::AsRawFd;
use tokio::io::AsyncWriteExt;
use tokio::net::{TcpListener, TcpStream};

/// A loopback pair whose client side is set up the way `open` sets up a batched one.
async fn pair() -> (TcpStream, TcpStream) {
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let socket = tokio::net::TcpSocket::new_v4().expect("socket");
    socket
        .set_recv_buffer_size(WINDOW as u32)
        .expect("SO_RCVBUF");
    let client = socket
        .connect(listener.local_addr().expect("addr"))
        .await
        .expect("connect");
    let (server, _) = listener.accept().await.expect("accept");
    (client, server)
}

/// One batched read that must complete within 10 s (a stall fails with `what`).
async fn read_within(
    client: &mut TcpStream,
    buf: &mut BytesMut,
    batcher: &mut Batcher,
    what: &str,
) -> usize {
    if buf.capacity() - buf.len() < 16 * 1024 {
        buf.reserve(64 * 1024);
    }
    tokio::time::timeout(Duration::from_secs(10), read(client, buf, Some(batcher)))
        .await
        .unwrap_or_else(|_| panic!("{what}"))
        .expect("read")
}

#[test]
fn modes_parse_and_unknown_names_are_refused() {
    assert_eq!("auto".parse::<ReadBatching>(), Ok(ReadBatching::Auto));
    assert_eq!("on".parse::<ReadBatching>(), Ok(ReadBatching::On));
    assert_eq!("off".parse::<ReadBatching>(), Ok(ReadBatching::Off));
    let err = "yes".parse::<ReadBatching>().unwrap_err();
    assert!(err.contains("\"auto\", \"on\", \"off\""), "{err}");
}

#[test]
fn auto_batches_loopback_peers_only() {
    let loopback: std::net::IpAddr = "127.0.0.1".parse().expect("ip");
    let mapped: std::net::IpAddr = "::ffff:127.0.0.1".parse().expect("ip");
    let remote: std::net::IpAddr = "10.1.2.3".parse().expect("ip");
    let supported = kernel_supports().is_ok();
    assert_eq!(wanted(ReadBatching::Auto, loopback), Ok(supported));
    assert_eq!(wanted(ReadBatching::Auto, mapped), Ok(supported));
    assert_eq!(wanted(ReadBatching::Auto, remote), Ok(false));
    assert_eq!(wanted(ReadBatching::Off, loopback), Ok(false));
    assert_eq!(wanted(ReadBatching::On, remote).is_ok(), supported);
}

/// The mark really holds bytes back (the read waits for the pace), and the deadline
/// really releases them: without `expire` lowering the mark this read would never end.
#[tokio::test]
async fn bytes_below_the_mark_wait_for_the_pace_and_no_longer() {
    let (mut client, mut server) = pair().await;
    let fd = client.as_raw_fd();
    // The kernel doubles SO_RCVBUF for its bookkeeping.
    assert_eq!(
        get_int_option(fd, libc::SO_RCVBUF).expect("rcvbuf"),
        2 * WINDOW
    );
    let mut batcher = Batcher::new(fd);
    let mut buf = BytesMut::with_capacity(64 * 1024);
    server.write_all(&[0; 10]).await.expect("write");
    read(&mut client, &mut buf, Some(&mut batcher))
        .await
        .expect("first read");
    assert_eq!(get_int_option(fd, libc::SO_RCVLOWAT).expect("lowat"), MARK);
    for round in 1..=5u8 {
        buf.clear();
        let started = Instant::now();
        server.write_all(&[round; 100]).await.expect("write");
        let n = read_within(
            &mut client,
            &mut buf,
            &mut batcher,
            "a write below the mark was never read",
        )
        .await;
        assert_eq!(n, 100, "round {round}");
        assert!(
            started.elapsed() >= PACE / 2,
            "round {round}: read after {:?}, before the pace: the mark did not hold",
            started.elapsed()
        );
        assert_eq!(get_int_option(fd, libc::SO_RCVLOWAT).expect("lowat"), MARK);
    }
}

/// A read dropped while it waits (as the pipeline's `select!` does) loses nothing, and
/// the next read still gets the bytes.
#[tokio::test]
async fn a_cancelled_read_loses_nothing() {
    let (mut client, mut server) = pair().await;
    let mut batcher = Batcher::new(client.as_raw_fd());
    let mut buf = BytesMut::with_capacity(64 * 1024);
    server.write_all(b"x").await.expect("write");
    read(&mut client, &mut buf, Some(&mut batcher))
        .await
        .expect("first read");
    let mut sent = 1;
    for _ in 0..50 {
        server.write_all(b"0123456789").await.expect("write");
        sent += 10;
        let _ = tokio::time::timeout(
            Duration::from_micros(100),
            read(&mut client, &mut buf, Some(&mut batcher)),
        )
        .await;
    }
    while buf.len() < sent {
        read_within(
            &mut client,
            &mut buf,
            &mut batcher,
            "read stalled after cancellations",
        )
        .await;
    }
    assert_eq!(buf.len(), sent);
}

/// More than the mark arrives whole, however many reads it takes.
#[tokio::test]
async fn writes_larger_than_the_window_arrive_whole() {
    let (mut client, mut server) = pair().await;
    let mut batcher = Batcher::new(client.as_raw_fd());
    let big: Vec<u8> = (0..(8 * WINDOW)).map(|i| i as u8).collect();
    let writer = {
        let big = big.clone();
        tokio::spawn(async move { server.write_all(&big).await.map(|()| server) })
    };
    let mut buf = BytesMut::with_capacity(64 * 1024);
    while buf.len() < big.len() {
        read_within(&mut client, &mut buf, &mut batcher, "read stalled").await;
    }
    assert_eq!(&buf[..], &big[..]);
    writer.await.expect("join").expect("write");
}

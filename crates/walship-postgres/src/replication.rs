//! The streaming-replication connection: startup, authentication, `START_REPLICATION`, and the
//! CopyBoth stream of `XLogData` and keepalive frames.
//!
//! ```text
//!  socket ──read (batched: ≥32 KiB or 1–2 ms)──▶ rbuf ──try_next (in place, zero-copy)──▶ Frame
//!  socket ◀──────────── standby status update (write/flush/apply = LSN we choose) ◀── caller
//! ```
//!
//! Invariant: the server only ever hears the LSN the caller passes to [`ReplicationStream::
//! send_status`]; nothing here acknowledges on its own. Frames are parsed straight out of the read
//! buffer and handed to the caller on the same task, so there is no per-message hand-off between
//! tasks and one `read` syscall serves hundreds of messages during catch-up.

use bytes::{Buf, BufMut, Bytes, BytesMut};
use pgoutput::{Lsn, PgTimestamp};
use postgres_protocol::authentication::sasl::{ChannelBinding, ScramSha256};
use postgres_protocol::message::{backend, frontend};
use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio_postgres::config::Host;

use std::os::fd::AsRawFd;

use crate::batching::{self, Batcher, ReadBatching};
use crate::error::{PgError, ServerError};
use crate::hosts::{self, Endpoint, SessionTarget};
use crate::tls::{self, ConnectConfig, Negotiated, TlsSession};

/// Anything the replication protocol can run over (TCP, Unix socket).
trait Io: AsyncRead + AsyncWrite + Unpin + Send {}
impl<T: AsyncRead + AsyncWrite + Unpin + Send> Io for T {}

const READ_CHUNK: usize = 256 * 1024;
const MIN_READ_SPACE: usize = 64 * 1024;

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

/// Where and as whom to connect; built from a libpq-style connection string.
#[derive(Clone)]
pub struct ConnectParams {
    /// Parsed connection string (hosts, ports, user, dbname, password, timeouts) and TLS
    /// settings; dereferences to the [`tokio_postgres::Config`].
    pub config: ConnectConfig,
    /// Whether replication streams batch their socket reads (see [`crate::batching`]).
    pub read_batching: ReadBatching,
}

impl ConnectParams {
    /// The hosts to try, in order (see [`crate::hosts`]).
    pub fn endpoints(&self) -> Vec<Endpoint> {
        hosts::endpoints(&self.config)
    }

    /// `host:port` (or the socket path) for messages, every host of a list comma-separated;
    /// never includes credentials.
    pub fn describe(&self) -> String {
        hosts::describe(&self.config)
    }

    /// Connects to the first of `addrs` that answers (like libpq, in order). A batched
    /// connection gets its small receive buffer before connecting, so the window it advertises
    /// never has to shrink. Returns the stream and whether its reads are batched.
    async fn connect_tcp(
        &self,
        addrs: &[std::net::SocketAddr],
    ) -> std::io::Result<(TcpStream, bool)> {
        let mut last = None;
        for addr in addrs {
            let batched = match batching::wanted(self.read_batching, addr.ip()) {
                Ok(b) => b,
                Err(why) => {
                    tracing::warn!("postgres.read_batching = \"on\" ignored: {why}");
                    false
                }
            };
            let socket = if addr.is_ipv4() {
                tokio::net::TcpSocket::new_v4()?
            } else {
                tokio::net::TcpSocket::new_v6()?
            };
            if batched {
                socket.set_recv_buffer_size(batching::WINDOW.unsigned_abs())?;
            }
            match socket.connect(*addr).await {
                Ok(s) => return Ok((s, batched)),
                Err(e) => last = Some(e),
            }
        }
        Err(last.unwrap_or_else(|| {
            std::io::Error::new(
                std::io::ErrorKind::NotFound,
                "the host name resolved to no address",
            )
        }))
    }

    /// Connects to `endpoint` and negotiates TLS per `sslmode`; returns the stream, the TLS
    /// session (`None` without TLS) and the read batcher (`None` when reads are not batched).
    async fn open(
        &self,
        endpoint: &Endpoint,
    ) -> Result<(Box<dyn Io>, Option<TlsSession>, Option<Batcher>), PgError> {
        let target = endpoint.to_string();
        let io_err = |source| PgError::Io {
            target: target.clone(),
            source,
        };
        let timeout = self
            .config
            .get_connect_timeout()
            .copied()
            .unwrap_or(std::time::Duration::from_secs(10));
        let port = endpoint.port;
        let connect = async {
            match &endpoint.host {
                #[cfg(unix)]
                Some(Host::Unix(dir)) if endpoint.hostaddr.is_none() => {
                    // PostgreSQL offers no TLS on Unix sockets; libpq skips it there too.
                    let path = dir.join(format!(".s.PGSQL.{port}"));
                    let s = tokio::net::UnixStream::connect(path)
                        .await
                        .map_err(io_err)?;
                    Ok((Box::new(s) as Box<dyn Io>, None, None))
                }
                host => {
                    // hostaddr, when given, is where to connect; the host name is what the
                    // certificate must name (libpq semantics).
                    let name = endpoint.tls_name();
                    let addrs: Vec<std::net::SocketAddr> = match (endpoint.hostaddr, host) {
                        (Some(addr), _) => vec![(addr, port).into()],
                        (None, Some(Host::Tcp(h))) => tokio::net::lookup_host((h.as_str(), port))
                            .await
                            .map_err(io_err)?
                            .collect(),
                        (None, _) => tokio::net::lookup_host(("localhost", port))
                            .await
                            .map_err(io_err)?
                            .collect(),
                    };
                    let (s, batched) = self.connect_tcp(&addrs).await.map_err(io_err)?;
                    s.set_nodelay(true).map_err(io_err)?;
                    // The stream (plain or TLS) owns the socket for the batcher's whole life:
                    // both are stored side by side in the ReplicationStream.
                    let batcher = batched.then(|| Batcher::new(s.as_raw_fd()));
                    match tls::negotiate(s, &self.config.tls, &name, &target).await? {
                        Negotiated::Plain(s) => Ok((Box::new(s) as Box<dyn Io>, None, batcher)),
                        Negotiated::Tls(s) => {
                            let session = TlsSession::of(&s);
                            Ok((Box::new(s) as Box<dyn Io>, Some(session), batcher))
                        }
                    }
                }
            }
        };
        match tokio::time::timeout(timeout, connect).await {
            Ok(r) => r,
            Err(_) => Err(io_err(std::io::Error::new(
                std::io::ErrorKind::TimedOut,
                "connect timed out",
            ))),
        }
    }
}

/// A replication connection in the CopyBoth state.
pub struct ReplicationStream {
    io: Box<dyn Io>,
    target: String,
    rbuf: BytesMut,
    wbuf: BytesMut,
    system: SystemIdentity,
    /// Declared after `io`, whose socket it points at (see `Batcher::new`).
    batcher: Option<Batcher>,
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
    /// Connects with `replication=database` and authenticates, to the first host of the
    /// connection string that answers and is what `target_session_attrs` asks for (see
    /// [`crate::hosts`]); returns the connection and the read batcher to use once streaming.
    async fn connect(
        params: &ConnectParams,
        password: Option<&[u8]>,
        application_name: &str,
    ) -> Result<(Self, Option<Batcher>), PgError> {
        let endpoints = params.endpoints();
        let wanted = params.config.session_target;
        let mut failures: Vec<(String, PgError)> = Vec::new();
        for endpoint in &endpoints {
            let attempt = async {
                let (io, tls, batcher) = params.open(endpoint).await?;
                let mut s = ReplicationStream {
                    io,
                    target: endpoint.to_string(),
                    rbuf: BytesMut::with_capacity(READ_CHUNK),
                    wbuf: BytesMut::with_capacity(1024),
                    system: SystemIdentity::default(),
                    batcher: None,
                };
                s.startup(params, password, application_name, tls).await?;
                if wanted != SessionTarget::Any {
                    s.check_session_target(wanted).await?;
                }
                Ok::<_, PgError>((s, batcher))
            };
            match attempt.await {
                Ok(connected) => return Ok(connected),
                Err(e) if endpoints.len() == 1 => return Err(e),
                Err(e) => {
                    tracing::debug!(host = %endpoint, error = %e, "skipping host");
                    failures.push((endpoint.to_string(), e));
                }
            }
        }
        Err(no_host_fits(params, wanted, failures))
    }

    /// Fails (transiently: a standby may be promoted soon) unless the server is what
    /// `target_session_attrs` asks for.
    async fn check_session_target(&mut self, wanted: SessionTarget) -> Result<(), PgError> {
        let rows = self
            .simple_query("SELECT pg_is_in_recovery(), current_setting('transaction_read_only')")
            .await?;
        let field = |i: usize| {
            rows.first()
                .and_then(|r| r.get(i))
                .cloned()
                .flatten()
                .unwrap_or_default()
        };
        let (in_recovery, read_only) = (field(0) == "t", field(1) == "on");
        if wanted.accepts(in_recovery, read_only) {
            return Ok(());
        }
        let what = if in_recovery {
            "in recovery (a standby)"
        } else {
            "read-only (default_transaction_read_only = on)"
        };
        let _ = self.terminate().await;
        Err(PgError::Io {
            target: self.target.clone(),
            source: std::io::Error::other(format!(
                "the server is {what}, and target_session_attrs={} asks for the primary",
                wanted.as_str()
            )),
        })
    }

    /// Runs `sql` (a replication command, or SQL on a `replication=database` connection) on a
    /// connection of its own, picked like the stream's: `ALTER_REPLICATION_SLOT`,
    /// `TIMELINE_HISTORY`, `IDENTIFY_SYSTEM`.
    pub async fn command(
        params: &ConnectParams,
        password: Option<&[u8]>,
        application_name: &str,
        sql: &str,
    ) -> Result<TextRows, PgError> {
        let (mut s, _) = Self::connect(params, password, application_name).await?;
        let rows = s.simple_query(sql).await;
        let _ = s.terminate().await;
        rows
    }

    /// Runs one simple query and collects its rows as text.
    async fn simple_query(&mut self, sql: &str) -> Result<TextRows, PgError> {
        frontend::query(sql, &mut self.wbuf).map_err(|e| PgError::Protocol(e.to_string()))?;
        self.flush_wbuf().await?;
        let mut rows = Vec::new();
        let mut error = None;
        loop {
            let (tag, body) = self.read_message().await?;
            match tag {
                b'D' => rows.push(
                    data_row_fields(&body)?
                        .into_iter()
                        .map(|f| f.map(|b| String::from_utf8_lossy(b).into_owned()))
                        .collect(),
                ),
                b'E' => error = Some(ServerError::parse(&body)),
                b'N' => log_notice(&body),
                b'Z' => {
                    return match error {
                        Some(error) => Err(PgError::Server {
                            context: sql.split_whitespace().take(2).collect::<Vec<_>>().join(" "),
                            error,
                        }),
                        None => Ok(rows),
                    };
                }
                // RowDescription, CommandComplete, ParameterStatus.
                _ => {}
            }
        }
    }

    /// Says goodbye on a connection that is not streaming.
    async fn terminate(&mut self) -> Result<(), PgError> {
        frontend::terminate(&mut self.wbuf);
        self.flush_wbuf().await?;
        let _ = self.io.shutdown().await;
        Ok(())
    }

    /// Connects with `replication=database`, authenticates, and runs
    /// `START_REPLICATION SLOT <slot> LOGICAL <start> (<options>)`.
    ///
    /// `start` = [`Lsn::ZERO`] resumes from the slot's `confirmed_flush_lsn`. Option values are
    /// quoted here; names must be plain identifiers. With several hosts, the stream is opened on
    /// the first one `target_session_attrs` accepts.
    pub async fn start(
        params: &ConnectParams,
        password: Option<&[u8]>,
        application_name: &str,
        slot: &str,
        start: Lsn,
        options: &[(&str, &str)],
    ) -> Result<Self, PgError> {
        let (mut s, batcher) = Self::connect(params, password, application_name).await?;
        s.system = s.identify_system().await?;
        let opts = options
            .iter()
            .map(|(k, v)| format!("\"{k}\" '{}'", v.replace('\'', "''")))
            .collect::<Vec<_>>()
            .join(", ");
        let query = format!(
            "START_REPLICATION SLOT \"{}\" LOGICAL {start} ({opts})",
            slot.replace('"', "\"\"")
        );
        frontend::query(&query, &mut s.wbuf).map_err(|e| PgError::Protocol(e.to_string()))?;
        s.flush_wbuf().await?;
        loop {
            let (tag, body) = s.read_message().await?;
            match tag {
                b'W' => {
                    // Batch only the stream itself: the startup exchange is a series of round
                    // trips that batching would only slow down.
                    s.batcher = batcher;
                    return Ok(s);
                }
                b'E' => {
                    return Err(PgError::Server {
                        context: format!("START_REPLICATION on slot {slot:?}"),
                        error: ServerError::parse(&body),
                    });
                }
                b'N' => log_notice(&body),
                other => {
                    return Err(PgError::Protocol(format!(
                        "unexpected message '{}' in answer to START_REPLICATION",
                        other.escape_ascii()
                    )));
                }
            }
        }
    }

    /// What `IDENTIFY_SYSTEM` reported before streaming started.
    pub fn system(&self) -> &SystemIdentity {
        &self.system
    }

    /// Runs `IDENTIFY_SYSTEM`: the system identifier and the server's WAL flush position.
    async fn identify_system(&mut self) -> Result<SystemIdentity, PgError> {
        frontend::query("IDENTIFY_SYSTEM", &mut self.wbuf)
            .map_err(|e| PgError::Protocol(e.to_string()))?;
        self.flush_wbuf().await?;
        let mut identity = None;
        loop {
            let (tag, body) = self.read_message().await?;
            match tag {
                b'T' | b'C' | b'N' => {}
                b'D' => identity = Some(parse_identify_row(&body)?),
                b'E' => {
                    return Err(PgError::Server {
                        context: "IDENTIFY_SYSTEM".into(),
                        error: ServerError::parse(&body),
                    });
                }
                b'Z' => {
                    return identity.ok_or_else(|| {
                        PgError::Protocol("IDENTIFY_SYSTEM returned no row".into())
                    });
                }
                other => {
                    return Err(PgError::Protocol(format!(
                        "unexpected message '{}' in answer to IDENTIFY_SYSTEM",
                        other.escape_ascii()
                    )));
                }
            }
        }
    }

    /// `tls`: the TLS session, `None` on a plaintext connection.
    async fn startup(
        &mut self,
        params: &ConnectParams,
        password: Option<&[u8]>,
        app: &str,
        tls: Option<TlsSession>,
    ) -> Result<(), PgError> {
        let user = params.config.get_user().ok_or_else(|| {
            PgError::Setup(
                "postgres.url names no user: add one, e.g. postgres://walship@host/db".into(),
            )
        })?;
        let db = params.config.get_dbname().unwrap_or(user);
        let startup = [
            ("user", user),
            ("database", db),
            ("replication", "database"),
            ("application_name", app),
            ("client_encoding", "UTF8"),
        ];
        frontend::startup_message(startup.iter().copied(), &mut self.wbuf)
            .map_err(|e| PgError::Protocol(e.to_string()))?;
        self.flush_wbuf().await?;
        let mut scram: Option<ScramSha256> = None;
        let need_password = || {
            PgError::Auth(format!(
                "the server asks user {user:?} for a password but none is configured: set \
                 postgres.password_env or postgres.password_file (or PGPASSWORD)"
            ))
        };
        loop {
            let mut raw = self.read_raw_message().await?;
            if raw[0] == b'E' {
                let error = ServerError::parse(&raw[5..]);
                if tls.is_none() && error.code == "28000" && error.message.contains("no encryption")
                {
                    return Err(tls::plaintext_refused(
                        &self.target,
                        &params.config.tls,
                        &error.message,
                    ));
                }
                return Err(PgError::Server {
                    context: format!(
                        "replication connection to {} as {user:?} ({})",
                        self.target,
                        params.config.tls.describe()
                    ),
                    error,
                });
            }
            let msg = backend::Message::parse(&mut raw)
                .map_err(|e| PgError::Protocol(format!("during startup: {e}")))?
                .ok_or_else(|| PgError::Protocol("truncated startup message".into()))?;
            use backend::Message as M;
            match msg {
                M::AuthenticationOk | M::ParameterStatus(_) | M::BackendKeyData(_) => {}
                M::AuthenticationCleartextPassword => {
                    let pw = password.ok_or_else(need_password)?;
                    frontend::password_message(pw, &mut self.wbuf)
                        .map_err(|e| PgError::Protocol(e.to_string()))?;
                    self.flush_wbuf().await?;
                }
                M::AuthenticationMd5Password(body) => {
                    let pw = password.ok_or_else(need_password)?;
                    let hash = postgres_protocol::authentication::md5_hash(
                        user.as_bytes(),
                        pw,
                        body.salt(),
                    );
                    frontend::password_message(hash.as_bytes(), &mut self.wbuf)
                        .map_err(|e| PgError::Protocol(e.to_string()))?;
                    self.flush_wbuf().await?;
                }
                M::AuthenticationSasl(body) => {
                    use fallible_iterator::FallibleIterator;
                    use postgres_protocol::authentication::sasl::{
                        SCRAM_SHA_256, SCRAM_SHA_256_PLUS,
                    };
                    let pw = password.ok_or_else(need_password)?;
                    let mut mechanisms = body.mechanisms();
                    let (mut plain, mut plus) = (false, false);
                    while let Some(m) = mechanisms
                        .next()
                        .map_err(|e| PgError::Protocol(e.to_string()))?
                    {
                        plain |= m == SCRAM_SHA_256;
                        plus |= m == SCRAM_SHA_256_PLUS;
                    }
                    // Over TLS, bind SCRAM to the server's certificate (SCRAM-SHA-256-PLUS) so
                    // a man in the middle cannot relay the exchange; "unrequested" tells a
                    // server that offers no binding that we could have (downgrade detection).
                    let (mechanism, binding) = match (&tls, plus, plain) {
                        (
                            Some(TlsSession {
                                server_end_point: Some(end_point),
                            }),
                            true,
                            _,
                        ) => (
                            SCRAM_SHA_256_PLUS,
                            ChannelBinding::tls_server_end_point(end_point.clone()),
                        ),
                        (Some(_), false, true) => (SCRAM_SHA_256, ChannelBinding::unrequested()),
                        (_, _, true) => (SCRAM_SHA_256, ChannelBinding::unsupported()),
                        _ => {
                            return Err(PgError::Auth(
                                "server offers no SASL mechanism walship supports \
                                 (SCRAM-SHA-256, SCRAM-SHA-256-PLUS)"
                                    .into(),
                            ));
                        }
                    };
                    let s = ScramSha256::new(pw, binding);
                    frontend::sasl_initial_response(mechanism, s.message(), &mut self.wbuf)
                        .map_err(|e| PgError::Protocol(e.to_string()))?;
                    self.flush_wbuf().await?;
                    scram = Some(s);
                }
                M::AuthenticationSaslContinue(body) => {
                    let s = scram.as_mut().ok_or_else(|| {
                        PgError::Protocol("SASL continue without SASL start".into())
                    })?;
                    s.update(body.data())
                        .map_err(|e| PgError::Auth(format!("SCRAM: {e}")))?;
                    frontend::sasl_response(s.message(), &mut self.wbuf)
                        .map_err(|e| PgError::Protocol(e.to_string()))?;
                    self.flush_wbuf().await?;
                }
                M::AuthenticationSaslFinal(body) => {
                    let s = scram
                        .as_mut()
                        .ok_or_else(|| PgError::Protocol("SASL final without SASL start".into()))?;
                    s.finish(body.data())
                        .map_err(|e| PgError::Auth(format!("SCRAM server signature: {e}")))?;
                }
                M::ReadyForQuery(_) => return Ok(()),
                M::NoticeResponse(_) => {}
                _ => {
                    return Err(PgError::Auth(
                        "the server asked for an authentication method walship does not support \
                         (supported: trust, password, md5, scram-sha-256)"
                            .into(),
                    ));
                }
            }
        }
    }

    /// Reads one whole backend message (tag + length + body) as raw bytes.
    async fn read_raw_message(&mut self) -> Result<BytesMut, PgError> {
        loop {
            if let Some(total) = self.complete_message_len()? {
                return Ok(self.rbuf.split_to(total));
            }
            self.fill().await?;
        }
    }

    /// Reads one message, returning its tag and body.
    async fn read_message(&mut self) -> Result<(u8, Bytes), PgError> {
        let mut raw = self.read_raw_message().await?.freeze();
        let tag = raw[0];
        raw.advance(5);
        Ok((tag, raw))
    }

    /// If the read buffer holds a whole message, its total length.
    fn complete_message_len(&mut self) -> Result<Option<usize>, PgError> {
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

    async fn flush_wbuf(&mut self) -> Result<(), PgError> {
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

/// The fields of a `DataRow` (`None`: NULL).
fn data_row_fields(body: &[u8]) -> Result<Vec<Option<&[u8]>>, PgError> {
    let bad = || PgError::Protocol("malformed DataRow".into());
    let count = body.get(..2).ok_or_else(bad)?;
    let mut rest = &body[2..];
    let mut fields: Vec<Option<&[u8]>> = Vec::with_capacity(4);
    for _ in 0..u16::from_be_bytes([count[0], count[1]]) {
        let len = rest.get(..4).ok_or_else(bad)?;
        let len = i32::from_be_bytes([len[0], len[1], len[2], len[3]]);
        rest = &rest[4..];
        let Ok(len) = usize::try_from(len) else {
            fields.push(None);
            continue;
        };
        fields.push(Some(rest.get(..len).ok_or_else(bad)?));
        rest = &rest[len..];
    }
    Ok(fields)
}

/// Parses the `DataRow` of `IDENTIFY_SYSTEM`: `systemid`, `timeline`, `xlogpos`, `dbname`.
fn parse_identify_row(body: &[u8]) -> Result<SystemIdentity, PgError> {
    let bad = || PgError::Protocol("malformed IDENTIFY_SYSTEM row".into());
    let fields = data_row_fields(body).map_err(|_| bad())?;
    let text = |i: usize| -> Result<&str, PgError> {
        fields
            .get(i)
            .copied()
            .flatten()
            .and_then(|f| std::str::from_utf8(f).ok())
            .ok_or_else(bad)
    };
    Ok(SystemIdentity {
        system_id: text(0)?.to_owned(),
        timeline: text(1)?.parse().map_err(|_| bad())?,
        xlogpos: text(2)?.parse().map_err(|_| bad())?,
    })
}

/// The error when no host of a list fits: transient (a standby may be promoted any moment)
/// unless every host refused for a reason that retrying cannot fix (authentication, setup).
fn no_host_fits(
    params: &ConnectParams,
    wanted: SessionTarget,
    mut failures: Vec<(String, PgError)>,
) -> PgError {
    if !failures.is_empty() && failures.iter().all(|(_, e)| !e.is_transient()) {
        return failures.swap_remove(0).1;
    }
    let reasons = failures
        .iter()
        .map(|(host, e)| match e {
            PgError::Io { source, .. } => format!("{host}: {source}"),
            other => format!("{host}: {other}"),
        })
        .collect::<Vec<_>>()
        .join("; ");
    PgError::Io {
        target: params.describe(),
        source: std::io::Error::other(format!(
            "no host is what target_session_attrs={} asks for ({reasons})",
            wanted.as_str()
        )),
    }
}

fn log_notice(body: &[u8]) {
    let notice = ServerError::parse(body);
    tracing::info!(code = %notice.code, "PostgreSQL notice: {}", notice.message);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_xlogdata_and_keepalive() {
        let mut w = BytesMut::new();
        w.put_u8(b'w');
        w.put_u64(10);
        w.put_u64(20);
        w.put_i64(30);
        w.put_slice(b"Bxyz");
        let Frame::XLogData {
            wal_start,
            wal_end,
            data,
            ..
        } = parse_copy_data(w.freeze()).unwrap()
        else {
            panic!("not xlogdata")
        };
        assert_eq!(
            (wal_start, wal_end, &data[..]),
            (Lsn(10), Lsn(20), &b"Bxyz"[..])
        );

        let mut k = BytesMut::new();
        k.put_u8(b'k');
        k.put_u64(99);
        k.put_i64(1);
        k.put_u8(1);
        assert_eq!(
            parse_copy_data(k.freeze()).unwrap(),
            Frame::Keepalive {
                wal_end: Lsn(99),
                send_time: PgTimestamp(1),
                reply_requested: true
            }
        );
        assert!(parse_copy_data(Bytes::from_static(b"w\0\0")).is_err());
        assert!(parse_copy_data(Bytes::from_static(b"")).is_err());
    }

    #[test]
    fn parses_identify_system_rows() {
        let mut row = BytesMut::new();
        row.put_u16(4);
        for field in [&b"7301234567890123456"[..], b"1", b"0/16B3F28"] {
            row.put_i32(field.len() as i32);
            row.put_slice(field);
        }
        row.put_i32(-1);
        assert_eq!(
            parse_identify_row(&row).unwrap(),
            SystemIdentity {
                system_id: "7301234567890123456".into(),
                timeline: 1,
                xlogpos: "0/16B3F28".parse().unwrap(),
            }
        );
        let truncated = &row[..row.len() - 8];
        assert!(parse_identify_row(truncated).is_err());
        assert!(parse_identify_row(b"").is_err());
    }
}

//! Opening a replication connection: picking the host (several hosts, `target_session_attrs`),
//! the socket and its read batching, TLS (negotiated by `crate::tls`), startup and
//! authentication (cleartext, MD5, SCRAM-SHA-256 with channel binding over TLS), replication
//! commands on a connection of their own, and `START_REPLICATION` with walship's options
//! ([`StartOptions`]).
//!
//! Invariant: a host is used only when it is what `target_session_attrs` asks for; streaming
//! starts only after `IDENTIFY_SYSTEM` answered, and socket reads are batched only once the
//! stream is in CopyBoth (the startup exchange is a series of round trips).

use std::os::fd::AsRawFd;

use pgoutput::Lsn;
use postgres_protocol::authentication::sasl::{ChannelBinding, ScramSha256};
use postgres_protocol::message::{backend, frontend};
use tokio::io::AsyncWriteExt;
use tokio::net::TcpStream;
use tokio_postgres::config::Host;

use super::stream::{Io, ReplicationStream, SystemIdentity, TextRows, log_notice};
use crate::batching::{self, Batcher, ReadBatching};
use crate::error::{PgError, ServerError};
use crate::hosts::{self, Endpoint, SessionTarget};
use crate::ident::quote_ident;
use crate::tls::{self, ConnectConfig, Negotiated, TlsSession};

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

/// The pgoutput options of walship's `START_REPLICATION`: protocol version 1 (the session's
/// decoder reads version 1), the publication, and logical decoding messages (the heartbeat and
/// table-free outbox events arrive as messages).
#[derive(Debug, Clone)]
pub struct StartOptions {
    /// The publication's name quoted as an identifier: pgoutput parses `publication_names` as a
    /// list of identifiers.
    publication: String,
}

impl StartOptions {
    /// walship's options for streaming publication `publication` (its plain name).
    pub fn new(publication: &str) -> Self {
        StartOptions {
            publication: quote_ident(publication),
        }
    }

    /// The options as name-value pairs, for [`ReplicationStream::start`].
    pub fn pairs(&self) -> [(&'static str, &str); 3] {
        [
            ("proto_version", "1"),
            ("publication_names", self.publication.as_str()),
            ("messages", "true"),
        ]
    }
}

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
                let mut s = ReplicationStream::new(io, endpoint.to_string());
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
            // pgoutput writes dates and times as text in the walsender's DateStyle: ISO, as
            // PostgreSQL's own logical replication asks, whatever the server's default (an
            // `outbox.timestamp_column` is parsed from it).
            ("DateStyle", "ISO"),
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

#[cfg(test)]
mod tests;

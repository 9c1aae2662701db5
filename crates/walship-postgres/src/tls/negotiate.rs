//! Establishing TLS, and explaining why it failed: the replication connection's SSLRequest and
//! handshake ([`negotiate`]), and the errors of a failed TLS or connection attempt on either
//! connection, each naming the server, the mode in force and the fix.
//!
//! Invariant: certificate verification failures are definite errors (reconnecting cannot help),
//! network failures during the handshake stay transient; nothing the server sends in plaintext
//! after agreeing to TLS is taken as part of the session.

use bytes::BytesMut;
use postgres_protocol::message::frontend;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

use super::certs::{RootCert, SslMode, TlsOptions};
use crate::error::{PgError, error_chain};

/// The replication connection's transport after TLS negotiation.
pub(crate) enum Negotiated<S> {
    /// No TLS (disabled, or `prefer` and the server has none).
    Plain(S),
    /// TLS established.
    Tls(tokio_native_tls::TlsStream<S>),
}

/// What the startup exchange needs to know about an established TLS session.
#[derive(Debug, Clone, Default)]
pub(crate) struct TlsSession {
    /// The `tls-server-end-point` channel-binding data (for SCRAM-SHA-256-PLUS), when the
    /// certificate's signature algorithm allows it.
    pub(crate) server_end_point: Option<Vec<u8>>,
}

impl TlsSession {
    pub(crate) fn of<S>(stream: &tokio_native_tls::TlsStream<S>) -> TlsSession
    where
        S: AsyncRead + AsyncWrite + Unpin,
    {
        TlsSession {
            server_end_point: stream.get_ref().tls_server_end_point().ok().flatten(),
        }
    }
}

/// Sends an SSLRequest and, when the server agrees, performs the handshake for `host`.
/// `target` names the server in errors.
pub(crate) async fn negotiate<S>(
    mut stream: S,
    opts: &TlsOptions,
    host: &str,
    target: &str,
) -> Result<Negotiated<S>, PgError>
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    if opts.mode == SslMode::Disable {
        return Ok(Negotiated::Plain(stream));
    }
    // Build first: a missing CA file is a setup error whatever the server says.
    let connector = opts.connector()?;
    let io_err = |source| PgError::Io {
        target: target.to_owned(),
        source,
    };
    let mut buf = BytesMut::new();
    frontend::ssl_request(&mut buf);
    stream.write_all(&buf).await.map_err(io_err)?;
    stream.flush().await.map_err(io_err)?;
    // Exactly one byte, unbuffered: nothing sent in plaintext after 'S' may be taken as part
    // of the TLS session (CVE-2021-23222).
    let mut answer = [0u8];
    stream.read_exact(&mut answer).await.map_err(io_err)?;
    match answer[0] {
        b'S' => {}
        b'N' if opts.mode.requires_tls() => return Err(no_tls_error(target, opts)),
        b'N' => {
            tracing::debug!(%target, "server does not offer TLS; sslmode = prefer continues without");
            return Ok(Negotiated::Plain(stream));
        }
        other => {
            return Err(PgError::Protocol(format!(
                "{target} answered the SSLRequest with '{}' instead of 'S' or 'N': is this a \
                 PostgreSQL server (version 7.2 or later)?",
                other.escape_ascii()
            )));
        }
    }
    let connector = tokio_native_tls::TlsConnector::from(connector);
    match connector.connect(host, stream).await {
        Ok(s) => Ok(Negotiated::Tls(s)),
        Err(e) => Err(handshake_error(&e, target, host, opts)),
    }
}

/// The server answered 'N' to the SSLRequest but the mode insists on TLS.
pub(crate) fn no_tls_error(target: &str, opts: &TlsOptions) -> PgError {
    PgError::Setup(format!(
        "PostgreSQL at {target} does not support TLS but postgres.sslmode = {}: enable TLS on the \
         server (ssl = on with ssl_cert_file and ssl_key_file) or, on a trusted network only, set \
         postgres.sslmode = prefer",
        opts.mode
    ))
}

/// A failed TLS handshake: definite when the certificate was refused, transient when the
/// network failed underneath.
pub(crate) fn handshake_error(
    e: &(dyn std::error::Error + 'static),
    target: &str,
    host: &str,
    opts: &TlsOptions,
) -> PgError {
    let text = error_chain(e);
    if let Some(io) = find_io_error(e) {
        return PgError::Io {
            target: target.to_owned(),
            source: std::io::Error::new(io.kind(), format!("TLS handshake: {text}")),
        };
    }
    let fix = match opts.mode {
        SslMode::VerifyFull if text.contains("ostname mismatch") || text.contains("IP address mismatch") => format!(
            "the server's certificate does not name {host:?}: connect using a host name that is in \
             the certificate's subjectAltName, or issue the server a certificate for {host:?}"
        ),
        SslMode::VerifyFull | SslMode::VerifyCa | SslMode::Require => match &opts.root_cert {
            Some(RootCert::File(p)) => format!(
                "make sure the server's certificate is signed by the CA in {} (postgres.sslrootcert) \
                 and is valid now",
                p.display()
            ),
            _ => "set postgres.sslrootcert to the PEM file of the CA that signed the server's \
                  certificate"
                .to_owned(),
        },
        SslMode::Prefer | SslMode::Disable => {
            "check the server's ssl_* settings and its log; postgres.sslmode = disable turns TLS off"
                .to_owned()
        }
    };
    PgError::Setup(format!(
        "TLS handshake with PostgreSQL at {target} (host {host:?}, {}) failed: {text}; {fix}",
        opts.describe()
    ))
}

/// The server refused a plaintext connection (pg_hba.conf has no non-TLS entry for it).
pub(crate) fn plaintext_refused(target: &str, opts: &TlsOptions, server_message: &str) -> PgError {
    PgError::Setup(format!(
        "PostgreSQL at {target} refused a connection without TLS ({server_message}) and \
         postgres.sslmode = {}: set postgres.sslmode = verify-full with postgres.sslrootcert = \
         the CA of the server's certificate (or sslmode = require to encrypt without verifying)",
        opts.mode
    ))
}

fn find_io_error<'a>(e: &'a (dyn std::error::Error + 'static)) -> Option<&'a std::io::Error> {
    let mut cur = Some(e);
    while let Some(err) = cur {
        if let Some(io) = err.downcast_ref::<std::io::Error>() {
            return Some(io);
        }
        cur = err.source();
    }
    None
}

/// Turns a tokio-postgres connection failure into an error naming the server, the user, the TLS
/// mode, the server's own message and the fix.
///
/// Non-TLS failures stay [`PgError::Sql`] (callers classify them by SQLSTATE); the text that
/// tokio-postgres keeps in the error's source (`db error` alone says nothing) goes into the
/// context.
pub(crate) fn explain_connect_error(
    source: tokio_postgres::Error,
    target: &str,
    host: &str,
    user: &str,
    opts: &TlsOptions,
) -> PgError {
    if source
        .to_string()
        .starts_with("error performing TLS handshake")
    {
        // Either the handshake failed (a native-tls error inside), or the server said 'N'.
        let inner = std::error::Error::source(&source);
        if let Some(inner) = inner {
            if inner.downcast_ref::<native_tls::Error>().is_some() {
                return handshake_error(inner, target, host, opts);
            }
            if inner.to_string().contains("does not support TLS") {
                return no_tls_error(target, opts);
            }
        }
    }
    let cause = match source.as_db_error() {
        Some(db) => {
            if db.code().code() == "28000" && db.message().contains("no encryption") {
                return plaintext_refused(target, opts, db.message());
            }
            let fix = match db.code().code() {
                "28P01" => {
                    "; check the password (postgres.password_env, postgres.password_file, the \
                     URL, or PGPASSWORD)"
                }
                "28000" => "; check pg_hba.conf on the server admits this user from this host",
                _ => "",
            };
            format!(
                "{} {}: {}{fix}",
                db.severity(),
                db.code().code(),
                db.message()
            )
        }
        None => match std::error::Error::source(&source) {
            Some(inner) => error_chain(inner),
            None => source.to_string(),
        },
    };
    PgError::Sql {
        context: format!(
            "connecting to {target} as {user:?} ({}) failed ({cause})",
            opts.describe()
        ),
        source,
    }
}

#[cfg(test)]
mod tests;

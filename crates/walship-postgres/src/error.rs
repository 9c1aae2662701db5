//! Errors of the PostgreSQL side, split by what the caller should do next.
//!
//! [`PgError::is_transient`] is the single place that decides between "reconnect and resume"
//! (network trouble, server restarting, slot busy) and "stop and explain" (the setup or the data
//! is wrong and retrying cannot help). Every definite error's text names the object and the fix.
//! [`error_chain`] is the one way an error is shown with its causes (TLS explanations, `walship
//! check`, `walship status`).

use std::fmt;

use pgoutput::{DecodeError, Lsn};

/// A PostgreSQL `ErrorResponse`, with the fields operators need.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ServerError {
    /// Severity (`ERROR`, `FATAL`, `PANIC`).
    pub severity: String,
    /// SQLSTATE code.
    pub code: String,
    /// Primary message.
    pub message: String,
    /// Optional detail.
    pub detail: Option<String>,
    /// Optional hint.
    pub hint: Option<String>,
}

impl ServerError {
    /// Parses the fields of an ErrorResponse/NoticeResponse body.
    pub(crate) fn parse(mut body: &[u8]) -> ServerError {
        let mut e = ServerError::default();
        while let Some((&kind, rest)) = body.split_first() {
            if kind == 0 {
                break;
            }
            let end = rest.iter().position(|&b| b == 0).unwrap_or(rest.len());
            let value = String::from_utf8_lossy(&rest[..end]).into_owned();
            match kind {
                b'V' => e.severity = value,
                b'S' if e.severity.is_empty() => e.severity = value,
                b'C' => e.code = value,
                b'M' => e.message = value,
                b'D' => e.detail = Some(value),
                b'H' => e.hint = Some(value),
                _ => {}
            }
            body = rest.get(end + 1..).unwrap_or_default();
        }
        e
    }
}

impl fmt::Display for ServerError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} {}: {}", self.severity, self.code, self.message)?;
        if let Some(d) = &self.detail {
            write!(f, " (detail: {d})")?;
        }
        if let Some(h) = &self.hint {
            write!(f, " (hint: {h})")?;
        }
        Ok(())
    }
}

/// An error on the PostgreSQL side.
#[derive(Debug, thiserror::Error)]
pub enum PgError {
    /// Socket-level failure: connection refused, reset, timed out.
    #[error("PostgreSQL connection to {target} failed: {source}")]
    Io {
        /// host:port or socket path.
        target: String,
        /// The I/O error.
        #[source]
        source: std::io::Error,
    },
    /// The server answered with an error.
    #[error("PostgreSQL {context}: {error}")]
    Server {
        /// What walship was doing.
        context: String,
        /// The server's error.
        error: ServerError,
    },
    /// A SQL command on the management connection failed.
    #[error("PostgreSQL {context}: {source}")]
    Sql {
        /// What walship was doing.
        context: String,
        /// The client error.
        #[source]
        source: tokio_postgres::Error,
    },
    /// The server sent something the replication protocol does not allow here.
    #[error("PostgreSQL replication protocol error: {0}")]
    Protocol(String),
    /// Authentication could not proceed (missing password, unsupported method).
    #[error("PostgreSQL authentication failed: {0}")]
    Auth(String),
    /// A pgoutput message could not be decoded.
    #[error(
        "{error} in WAL record at {lsn}; this is a bug in walship or an unsupported server \
             version: please report it with the server version"
    )]
    Decode {
        /// WAL position of the XLogData frame.
        lsn: Lsn,
        /// The decode error.
        error: DecodeError,
    },
    /// The database setup does not allow walship to run; the text says how to fix it.
    #[error("{0}")]
    Setup(String),
}

impl PgError {
    /// True when reconnecting later can succeed without anyone changing anything.
    pub fn is_transient(&self) -> bool {
        match self {
            PgError::Io { .. } | PgError::Protocol(_) => true,
            PgError::Server { error, .. } => sqlstate_is_transient(&error.code),
            PgError::Sql { source, .. } => match source.code() {
                Some(code) => sqlstate_is_transient(code.code()),
                // No SQLSTATE: the connection itself failed (refused, closed, timed out).
                None => source.as_db_error().is_none(),
            },
            PgError::Auth(_) | PgError::Decode { .. } | PgError::Setup(_) => false,
        }
    }
}

/// SQLSTATEs after which a retry can succeed unchanged.
fn sqlstate_is_transient(code: &str) -> bool {
    matches!(
        code,
        // admin_shutdown, crash_shutdown, cannot_connect_now (starting up / shutting down)
        "57P01" | "57P02" | "57P03"
        // object_in_use: the slot is active for another walsender (e.g. a previous walship
        // whose connection the server has not noticed is gone yet)
        | "55006"
        // serialization/deadlock while creating objects concurrently
        | "40001" | "40P01"
    ) || code.starts_with("08") // connection exceptions
        || code.starts_with("53") // insufficient resources (too many connections, out of memory)
}

/// An error with its causes (`error connecting to server: Connection refused (os error 111)`),
/// each cause once: client libraries often keep the useful part in the source. The one
/// rendering for the TLS explanations here and for `walship check` and `walship status`.
pub fn error_chain(e: &dyn std::error::Error) -> String {
    let mut text = e.to_string();
    let mut source = e.source();
    while let Some(s) = source {
        let part = s.to_string();
        if !text.contains(&part) {
            text.push_str(": ");
            text.push_str(&part);
        }
        source = s.source();
    }
    text
}

/// Maps a failed catalog query to [`PgError::Sql`] naming what was being done.
pub(crate) fn sql_err(context: impl Into<String>) -> impl FnOnce(tokio_postgres::Error) -> PgError {
    let context = context.into();
    move |source| PgError::Sql { context, source }
}

#[cfg(test)]
mod tests;

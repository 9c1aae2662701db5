//! TLS for both PostgreSQL connections: the replication stream (walship's own client) and the
//! management connections (tokio-postgres), with one stack: OpenSSL through `native-tls`, the
//! library librdkafka links too.
//!
//! ```text
//!  postgres.url ?sslmode=…&sslrootcert=…   ─┐
//!  [postgres] sslmode / sslrootcert / …    ─┴─▶ TlsOptions ──▶ native_tls::TlsConnector
//!                                                               ├─▶ replication: SSLRequest, 'S' → handshake
//!                                                               └─▶ tokio-postgres: postgres-native-tls
//! ```
//!
//! Modes follow libpq: `disable`, `prefer` (the default: TLS when the server offers it, no
//! certificate check), `require` (TLS, no certificate check — unless `sslrootcert` is given, then
//! the chain is verified as libpq does), `verify-ca` (chain), `verify-full` (chain and host name).
//! Unix-socket connections never use TLS (PostgreSQL does not offer it there), as in libpq.
//!
//! Invariant: every failure names the server, the mode in force and the fix; certificate
//! verification failures are definite errors (reconnecting cannot help), network failures during
//! the handshake stay transient.

use std::fmt;
use std::ops::{Deref, DerefMut};
use std::path::{Path, PathBuf};
use std::str::FromStr;

use bytes::BytesMut;
use postgres_protocol::message::frontend;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

use crate::error::{PgError, error_chain};

use crate::hosts::SessionTarget;

/// How hard to insist on TLS and what to verify (libpq's `sslmode`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum SslMode {
    /// Never use TLS.
    Disable,
    /// Use TLS when the server supports it, plaintext otherwise; no certificate check.
    #[default]
    Prefer,
    /// Always use TLS; no certificate check (the chain is checked when `sslrootcert` is set).
    Require,
    /// Always use TLS and verify that the server certificate chains to a trusted CA.
    VerifyCa,
    /// Like `VerifyCa`, and the certificate must name the host connected to.
    VerifyFull,
}

impl SslMode {
    /// The accepted spellings, for error messages.
    pub const VALUES: &'static str = "disable, prefer, require, verify-ca, verify-full";

    /// The libpq spelling.
    pub fn as_str(self) -> &'static str {
        match self {
            SslMode::Disable => "disable",
            SslMode::Prefer => "prefer",
            SslMode::Require => "require",
            SslMode::VerifyCa => "verify-ca",
            SslMode::VerifyFull => "verify-full",
        }
    }

    /// True when a connection without TLS is refused.
    pub fn requires_tls(self) -> bool {
        !matches!(self, SslMode::Disable | SslMode::Prefer)
    }
}

impl fmt::Display for SslMode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for SslMode {
    type Err = String;

    fn from_str(s: &str) -> Result<SslMode, String> {
        Ok(match s {
            "disable" => SslMode::Disable,
            "prefer" => SslMode::Prefer,
            "require" => SslMode::Require,
            "verify-ca" => SslMode::VerifyCa,
            "verify-full" => SslMode::VerifyFull,
            other => {
                return Err(format!(
                    "sslmode {other:?} is not one of {}",
                    SslMode::VALUES
                ));
            }
        })
    }
}

/// What to trust for `verify-ca` / `verify-full` (libpq's `sslrootcert`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RootCert {
    /// A PEM file with one or more CA certificates; the only roots trusted.
    File(PathBuf),
    /// The operating system's trust store (`sslrootcert=system`).
    System,
}

/// TLS settings of a connection. Holds paths only: no key material, no passwords.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct TlsOptions {
    /// `sslmode`.
    pub mode: SslMode,
    /// `sslrootcert`; unset: `~/.postgresql/root.crt` when it exists, else the system store.
    pub root_cert: Option<RootCert>,
    /// `sslcert`: client certificate (PEM), for `cert` authentication or `clientcert=verify-*`.
    pub client_cert: Option<PathBuf>,
    /// `sslkey`: the client certificate's private key (unencrypted PKCS#8 PEM).
    pub client_key: Option<PathBuf>,
}

impl TlsOptions {
    /// Sets `sslrootcert` from its libpq spelling (`system` or a path).
    pub fn set_root_cert(&mut self, value: &str) {
        self.root_cert = Some(if value == "system" {
            RootCert::System
        } else {
            RootCert::File(PathBuf::from(value))
        });
    }

    /// `sslmode = verify-full` or `sslmode = require, sslrootcert = /ca.pem`, for messages.
    pub fn describe(&self) -> String {
        match &self.root_cert {
            Some(RootCert::File(p)) if self.mode != SslMode::Disable => {
                format!("sslmode = {}, sslrootcert = {}", self.mode, p.display())
            }
            Some(RootCert::System) if self.mode != SslMode::Disable => {
                format!("sslmode = {}, sslrootcert = system", self.mode)
            }
            _ => format!("sslmode = {}", self.mode),
        }
    }

    /// Whether the server certificate's chain is checked.
    fn verifies_chain(&self) -> bool {
        match self.mode {
            SslMode::VerifyCa | SslMode::VerifyFull => true,
            // libpq: "if a root CA file exists, require behaves like verify-ca".
            SslMode::Require => matches!(self.root_cert, Some(RootCert::File(_))),
            SslMode::Disable | SslMode::Prefer => false,
        }
    }

    /// Builds the OpenSSL connector for these options (reads the certificate files).
    pub fn connector(&self) -> Result<native_tls::TlsConnector, PgError> {
        let mut b = native_tls::TlsConnector::builder();
        // PostgreSQL's own minimum (ssl_min_protocol_version) since version 14.
        b.min_protocol_version(Some(native_tls::Protocol::Tlsv12));
        if self.verifies_chain() {
            let root = match &self.root_cert {
                Some(r) => Some(r.clone()),
                None => default_root_cert().map(RootCert::File),
            };
            if let Some(RootCert::File(path)) = root {
                let pem = read_file(&path, "postgres.sslrootcert")?;
                let certs = native_tls::Certificate::stack_from_pem(&pem).map_err(|e| {
                    PgError::Setup(format!(
                        "postgres.sslrootcert {}: not a PEM certificate file ({e}): point it at \
                         the CA certificate that signed the server's certificate",
                        path.display()
                    ))
                })?;
                if certs.is_empty() {
                    return Err(PgError::Setup(format!(
                        "postgres.sslrootcert {} holds no certificate: point it at the PEM file \
                         of the CA that signed the server's certificate",
                        path.display()
                    )));
                }
                b.disable_built_in_roots(true);
                for c in certs {
                    b.add_root_certificate(c);
                }
            }
            b.danger_accept_invalid_hostnames(self.mode != SslMode::VerifyFull);
        } else {
            // prefer / require without a CA: encryption only, like libpq.
            b.danger_accept_invalid_certs(true);
            b.danger_accept_invalid_hostnames(true);
        }
        match (&self.client_cert, &self.client_key) {
            (Some(cert), Some(key)) => {
                let cert_pem = read_file(cert, "postgres.sslcert")?;
                let key_pem = read_file(key, "postgres.sslkey")?;
                let identity =
                    native_tls::Identity::from_pkcs8(&cert_pem, &key_pem).map_err(|e| {
                        PgError::Setup(format!(
                            "postgres.sslcert {} / postgres.sslkey {}: cannot use them as a client \
                             certificate ({e}): the certificate must be PEM and the key an \
                             unencrypted PKCS#8 PEM file (convert with openssl pkcs8 -topk8 \
                             -nocrypt -in old.key -out new.key)",
                            cert.display(),
                            key.display()
                        ))
                    })?;
                b.identity(identity);
            }
            (None, None) => {}
            (Some(_), None) | (None, Some(_)) => {
                return Err(PgError::Setup(
                    "postgres.sslcert and postgres.sslkey go together: set both (client \
                     certificate and its key) or neither"
                        .into(),
                ));
            }
        }
        b.build().map_err(|e| {
            PgError::Setup(format!(
                "cannot set up TLS for PostgreSQL ({}): {e}",
                self.describe()
            ))
        })
    }
}

/// libpq's default CA file, when it exists.
fn default_root_cert() -> Option<PathBuf> {
    let home = std::env::var_os("HOME")?;
    let path = Path::new(&home).join(".postgresql").join("root.crt");
    path.exists().then_some(path)
}

fn read_file(path: &Path, key: &str) -> Result<Vec<u8>, PgError> {
    std::fs::read(path)
        .map_err(|e| PgError::Setup(format!("{key}: cannot read {}: {e}", path.display())))
}

/// Connection parameters: what tokio-postgres parses from a libpq connection string, plus the
/// TLS settings it does not keep (`verify-ca`, `verify-full`, `sslrootcert`, `sslcert`,
/// `sslkey`). Dereferences to the [`tokio_postgres::Config`].
#[derive(Clone)]
pub struct ConnectConfig {
    /// Hosts, ports, user, database, password, timeouts.
    pub pg: tokio_postgres::Config,
    /// TLS settings.
    pub tls: TlsOptions,
    /// Which server of a multi-host list to keep (`target_session_attrs`, `primary` included).
    pub session_target: SessionTarget,
}

/// Keys of a connection string handled here rather than by tokio-postgres: the TLS keys, and
/// `target_session_attrs` (tokio-postgres does not know `primary`).
const TLS_KEYS: [&str; 5] = [
    "sslmode",
    "sslrootcert",
    "sslcert",
    "sslkey",
    "target_session_attrs",
];

impl ConnectConfig {
    /// Parses a libpq URL (`postgres://…?sslmode=verify-full&sslrootcert=/ca.pem`) or key=value
    /// string. Errors do not repeat the string (it may hold a password).
    pub fn parse(s: &str) -> Result<ConnectConfig, String> {
        let (rest, pairs) = split_tls_params(s)?;
        let pg = tokio_postgres::Config::from_str(&rest).map_err(|e| e.to_string())?;
        if pg.get_ssl_negotiation() != tokio_postgres::config::SslNegotiation::Postgres {
            return Err(
                "sslnegotiation=direct is not supported by walship: remove it (walship \
                 negotiates TLS with an SSLRequest, which every server version accepts)"
                    .into(),
            );
        }
        let mut tls = TlsOptions::default();
        let mut pg = pg;
        let mut session_target = SessionTarget::Any;
        for (key, value) in pairs {
            match key.as_str() {
                "target_session_attrs" => {
                    session_target = SessionTarget::parse(&value)?;
                    pg.target_session_attrs(session_target.for_tokio_postgres());
                }
                "sslmode" => tls.mode = value.parse()?,
                "sslrootcert" => tls.set_root_cert(&value),
                "sslcert" => tls.client_cert = Some(PathBuf::from(value)),
                "sslkey" => tls.client_key = Some(PathBuf::from(value)),
                _ => {}
            }
        }
        Ok(ConnectConfig {
            pg,
            tls,
            session_target,
        })
    }

    /// The TCP host name (for TLS verification and messages), if the first host is not a socket.
    pub(crate) fn tls_host(&self) -> Option<String> {
        match self.pg.get_hosts().first() {
            Some(tokio_postgres::config::Host::Tcp(h)) => Some(h.clone()),
            #[cfg(unix)]
            Some(tokio_postgres::config::Host::Unix(_)) => None,
            None => self
                .pg
                .get_hostaddrs()
                .first()
                .map(|a| a.to_string())
                .or_else(|| Some("localhost".into())),
        }
    }
}

impl From<tokio_postgres::Config> for ConnectConfig {
    /// Keeps tokio-postgres' `sslmode` (disable, prefer or require); no CA file.
    fn from(pg: tokio_postgres::Config) -> ConnectConfig {
        let mode = match pg.get_ssl_mode() {
            tokio_postgres::config::SslMode::Disable => SslMode::Disable,
            tokio_postgres::config::SslMode::Require => SslMode::Require,
            _ => SslMode::Prefer,
        };
        let session_target = match pg.get_target_session_attrs() {
            tokio_postgres::config::TargetSessionAttrs::ReadWrite => SessionTarget::ReadWrite,
            _ => SessionTarget::Any,
        };
        ConnectConfig {
            pg,
            tls: TlsOptions {
                mode,
                ..TlsOptions::default()
            },
            session_target,
        }
    }
}

impl Deref for ConnectConfig {
    type Target = tokio_postgres::Config;

    fn deref(&self) -> &tokio_postgres::Config {
        &self.pg
    }
}

impl DerefMut for ConnectConfig {
    fn deref_mut(&mut self) -> &mut tokio_postgres::Config {
        &mut self.pg
    }
}

impl fmt::Debug for ConnectConfig {
    // tokio_postgres::Config's Debug redacts the password; the TLS options hold paths only.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ConnectConfig")
            .field("pg", &self.pg)
            .field("tls", &self.tls)
            .field("session_target", &self.session_target)
            .finish()
    }
}

/// Removes the [`TLS_KEYS`] from a connection string; returns the rest and the removed pairs.
fn split_tls_params(s: &str) -> Result<(String, Vec<(String, String)>), String> {
    let mut found = Vec::new();
    if s.starts_with("postgres://") || s.starts_with("postgresql://") {
        let Some((base, query)) = s.split_once('?') else {
            return Ok((s.to_owned(), found));
        };
        let mut kept = Vec::new();
        for pair in query.split('&').filter(|p| !p.is_empty()) {
            let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
            let key = percent_decode(k)?;
            if TLS_KEYS.contains(&key.as_str()) {
                found.push((key, percent_decode(v)?));
            } else {
                kept.push(pair);
            }
        }
        let rest = if kept.is_empty() {
            base.to_owned()
        } else {
            format!("{base}?{}", kept.join("&"))
        };
        return Ok((rest, found));
    }
    // key=value form: cut the TLS pairs out, leaving the rest byte for byte.
    let mut rest = String::with_capacity(s.len());
    let mut copied_to = 0;
    for (key, value, span) in kv_pairs(s)? {
        if TLS_KEYS.contains(&key.as_str()) {
            rest.push_str(&s[copied_to..span.0]);
            copied_to = span.1;
            found.push((key, value));
        }
    }
    rest.push_str(&s[copied_to..]);
    Ok((rest, found))
}

/// One `key = value` of a libpq key=value string, with its byte span in the string.
type KvPair = (String, String, (usize, usize));

/// Tokenises a libpq key=value string as tokio-postgres does: `key = value`, values unquoted or
/// in single quotes, backslash escapes.
fn kv_pairs(s: &str) -> Result<Vec<KvPair>, String> {
    let b = s.as_bytes();
    let mut i = 0;
    let mut out = Vec::new();
    let skip_ws = |mut i: usize| {
        while i < b.len() && b[i].is_ascii_whitespace() {
            i += 1;
        }
        i
    };
    loop {
        i = skip_ws(i);
        if i >= b.len() {
            return Ok(out);
        }
        let start = i;
        while i < b.len() && b[i] != b'=' && !b[i].is_ascii_whitespace() {
            i += 1;
        }
        let key = s[start..i].to_owned();
        i = skip_ws(i);
        if b.get(i) != Some(&b'=') {
            // Let tokio-postgres report the syntax error.
            return Ok(out);
        }
        i = skip_ws(i + 1);
        let mut value = Vec::new();
        if b.get(i) == Some(&b'\'') {
            i += 1;
            loop {
                match b.get(i) {
                    None => return Err(format!("unterminated quoted value of {key}")),
                    Some(b'\'') => {
                        i += 1;
                        break;
                    }
                    Some(b'\\') if i + 1 < b.len() => {
                        value.push(b[i + 1]);
                        i += 2;
                    }
                    Some(&c) => {
                        value.push(c);
                        i += 1;
                    }
                }
            }
        } else {
            while i < b.len() && !b[i].is_ascii_whitespace() {
                if b[i] == b'\\' && i + 1 < b.len() {
                    i += 1;
                }
                value.push(b[i]);
                i += 1;
            }
        }
        let value = String::from_utf8(value).map_err(|_| format!("value of {key} is not UTF-8"))?;
        out.push((key, value, (start, i)));
    }
}

fn percent_decode(s: &str) -> Result<String, String> {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'%' {
            let hex = s
                .get(i + 1..i + 3)
                .and_then(|h| u8::from_str_radix(h, 16).ok())
                .ok_or_else(|| "invalid percent-encoding in the URL's parameters".to_owned())?;
            out.push(hex);
            i += 3;
        } else {
            out.push(b[i]);
            i += 1;
        }
    }
    String::from_utf8(out).map_err(|_| "URL parameter is not UTF-8".to_owned())
}

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
mod tests {
    use super::*;

    #[test]
    fn modes_parse_and_print() {
        for m in [
            SslMode::Disable,
            SslMode::Prefer,
            SslMode::Require,
            SslMode::VerifyCa,
            SslMode::VerifyFull,
        ] {
            assert_eq!(m.as_str().parse::<SslMode>().unwrap(), m);
        }
        let e = "verify_full".parse::<SslMode>().unwrap_err();
        assert!(
            e.contains("verify-full") && e.contains("verify_full"),
            "{e}"
        );
        assert_eq!(SslMode::default(), SslMode::Prefer);
    }

    #[test]
    fn url_tls_parameters_are_taken_out() {
        let c = ConnectConfig::parse(
            "postgres://walship@db.example:5433/app?application_name=x&sslmode=verify-full&sslrootcert=%2Fetc%2Fca%20dir%2Fca.pem&connect_timeout=3",
        )
        .unwrap();
        assert_eq!(c.tls.mode, SslMode::VerifyFull);
        assert_eq!(
            c.tls.root_cert,
            Some(RootCert::File("/etc/ca dir/ca.pem".into()))
        );
        assert_eq!(c.get_application_name(), Some("x"));
        assert_eq!(
            c.get_connect_timeout(),
            Some(&std::time::Duration::from_secs(3))
        );
        assert_eq!(c.tls_host().as_deref(), Some("db.example"));

        let c = ConnectConfig::parse("postgres://walship@db/app?sslmode=verify-ca").unwrap();
        assert_eq!(c.tls.mode, SslMode::VerifyCa);
        let c = ConnectConfig::parse("postgres://walship@db/app").unwrap();
        assert_eq!(c.tls, TlsOptions::default());
        let c = ConnectConfig::parse("postgresql://w@db/app?sslrootcert=system").unwrap();
        assert_eq!(c.tls.root_cert, Some(RootCert::System));
        let e = ConnectConfig::parse("postgres://w:hunter2@db/app?sslmode=bogus")
            .err()
            .unwrap();
        assert!(e.contains("bogus") && !e.contains("hunter2"), "{e}");
    }

    #[test]
    fn key_value_tls_parameters_are_taken_out() {
        let c = ConnectConfig::parse(
            "host=db.example user=walship sslmode = 'verify-full' sslrootcert='/ca dir/it\\'s.pem' dbname=app sslcert=/c.pem sslkey=/c.key",
        )
        .unwrap();
        assert_eq!(c.tls.mode, SslMode::VerifyFull);
        assert_eq!(
            c.tls.root_cert,
            Some(RootCert::File("/ca dir/it's.pem".into()))
        );
        assert_eq!(c.tls.client_cert, Some(PathBuf::from("/c.pem")));
        assert_eq!(c.tls.client_key, Some(PathBuf::from("/c.key")));
        assert_eq!(c.get_dbname(), Some("app"));
        assert_eq!(c.get_user(), Some("walship"));
    }

    #[test]
    fn tokio_postgres_modes_carry_over() {
        let mut pg = tokio_postgres::Config::new();
        pg.ssl_mode(tokio_postgres::config::SslMode::Require);
        assert_eq!(ConnectConfig::from(pg).tls.mode, SslMode::Require);
    }

    #[test]
    fn connector_errors_name_the_key_and_file() {
        let opts = TlsOptions {
            mode: SslMode::VerifyFull,
            root_cert: Some(RootCert::File("/nonexistent/ca.pem".into())),
            ..TlsOptions::default()
        };
        let e = opts.connector().unwrap_err().to_string();
        assert!(
            e.contains("postgres.sslrootcert") && e.contains("/nonexistent/ca.pem"),
            "{e}"
        );
        let opts = TlsOptions {
            mode: SslMode::Require,
            client_cert: Some("/c.pem".into()),
            ..TlsOptions::default()
        };
        let e = opts.connector().unwrap_err().to_string();
        assert!(e.contains("sslkey"), "{e}");
        // Without a CA, require only encrypts.
        let opts = TlsOptions {
            mode: SslMode::Require,
            ..TlsOptions::default()
        };
        assert!(opts.connector().is_ok());
    }

    #[test]
    fn no_tls_error_names_mode_and_fix() {
        let opts = TlsOptions {
            mode: SslMode::Require,
            ..TlsOptions::default()
        };
        let e = no_tls_error("db:5432", &opts).to_string();
        assert!(
            e.contains("db:5432")
                && e.contains("does not support TLS but postgres.sslmode = require"),
            "{e}"
        );
        assert!(!no_tls_error("db:5432", &opts).is_transient());
    }
}

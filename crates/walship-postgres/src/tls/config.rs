//! [`ConnectConfig`]: a libpq connection string (URL or key=value) as walship reads it, that is
//! what tokio-postgres parses plus the keys it does not keep: the TLS keys (`verify-ca`,
//! `verify-full`, `sslrootcert`, `sslcert`, `sslkey`) and `target_session_attrs=primary`.
//!
//! Invariant: errors never repeat the connection string (it may hold a password), and what is
//! not taken out here reaches tokio-postgres unchanged (key=value strings byte for byte).

use std::fmt;
use std::ops::{Deref, DerefMut};
use std::path::PathBuf;
use std::str::FromStr;

use super::certs::{SslMode, TlsOptions};
use crate::hosts::SessionTarget;

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

#[cfg(test)]
mod tests;

//! Several hosts in one connection string, the libpq way: which to try, in what order, and which
//! one to keep.
//!
//! ```text
//!  postgres://w@pg1:5432,pg2:5432/app?target_session_attrs=read-write
//!      │
//!      ├─▶ pg1:5432  refused / in recovery ──▶ next
//!      └─▶ pg2:5432  read-write ─────────────▶ keep (SQL connections: tokio-postgres;
//!                                                    the replication stream: replication/connect.rs)
//! ```
//!
//! Invariant: with more than one host, walship only ever keeps a connection to a server that is
//! not in recovery, so after a standby is promoted both of walship's connections find the new
//! primary and never stream from (or create a slot on) a standby. A list without a session target
//! is refused by the configuration: it could check one server and stream from another.

use std::fmt;
use std::net::IpAddr;

use tokio_postgres::config::{Host, TargetSessionAttrs};

/// What kind of server a connection must reach (libpq's `target_session_attrs`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum SessionTarget {
    /// The first server that accepts the connection (libpq's default).
    #[default]
    Any,
    /// A server whose sessions are read-write (`SHOW transaction_read_only` is `off`).
    ReadWrite,
    /// A server not in recovery (`pg_is_in_recovery()` is false; libpq 14+). The SQL
    /// connections check read-write instead (tokio-postgres knows no other): on a primary
    /// walship writes anyway (publication, slot history, heartbeat).
    Primary,
}

impl SessionTarget {
    /// Parses a `target_session_attrs` value. Values that would pick a standby are refused:
    /// walship's slot lives on the primary.
    pub fn parse(value: &str) -> Result<SessionTarget, String> {
        match value {
            "any" => Ok(SessionTarget::Any),
            "read-write" => Ok(SessionTarget::ReadWrite),
            "primary" => Ok(SessionTarget::Primary),
            "read-only" | "standby" | "prefer-standby" => Err(format!(
                "target_session_attrs={value} would connect to a standby, but walship's slot \
                 lives on the primary: use target_session_attrs=read-write (or primary)"
            )),
            other => Err(format!(
                "target_session_attrs={other:?} is not one of any, read-write, primary"
            )),
        }
    }

    /// What tokio-postgres is told for the SQL connections.
    pub fn for_tokio_postgres(self) -> TargetSessionAttrs {
        match self {
            SessionTarget::Any => TargetSessionAttrs::Any,
            SessionTarget::ReadWrite | SessionTarget::Primary => TargetSessionAttrs::ReadWrite,
        }
    }

    /// Whether a server with these properties is acceptable.
    pub fn accepts(self, in_recovery: bool, read_only: bool) -> bool {
        match self {
            SessionTarget::Any => true,
            SessionTarget::ReadWrite => !read_only && !in_recovery,
            SessionTarget::Primary => !in_recovery,
        }
    }

    /// The value as written in a connection string.
    pub fn as_str(self) -> &'static str {
        match self {
            SessionTarget::Any => "any",
            SessionTarget::ReadWrite => "read-write",
            SessionTarget::Primary => "primary",
        }
    }
}

/// One host of a connection string: where to connect and what to call it in messages.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Endpoint {
    /// Host name or socket directory (`None`: only a `hostaddr`, or nothing = localhost).
    pub host: Option<Host>,
    /// The address to connect to instead of resolving `host` (libpq's `hostaddr`).
    pub hostaddr: Option<IpAddr>,
    /// Port (the only one given applies to every host, as in libpq).
    pub port: u16,
}

impl Endpoint {
    /// The name a TLS certificate must carry: the host name, else the address, else localhost.
    pub fn tls_name(&self) -> String {
        match (&self.host, self.hostaddr) {
            (Some(Host::Tcp(h)), _) => h.clone(),
            (_, Some(addr)) => addr.to_string(),
            _ => "localhost".into(),
        }
    }
}

impl fmt::Display for Endpoint {
    /// `host:port`, or the socket path; never credentials.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match (&self.host, self.hostaddr) {
            (Some(Host::Tcp(h)), _) => write!(f, "{h}:{}", self.port),
            #[cfg(unix)]
            (Some(Host::Unix(p)), _) => write!(f, "{}/.s.PGSQL.{}", p.display(), self.port),
            (None, Some(addr)) => write!(f, "{addr}:{}", self.port),
            (None, None) => write!(f, "localhost:{}", self.port),
        }
    }
}

/// The hosts of `config` in the order libpq tries them (at least one: localhost).
pub fn endpoints(config: &tokio_postgres::Config) -> Vec<Endpoint> {
    let hosts = config.get_hosts();
    let addrs = config.get_hostaddrs();
    let ports = config.get_ports();
    let n = hosts.len().max(addrs.len()).max(1);
    (0..n)
        .map(|i| Endpoint {
            host: hosts.get(i).cloned(),
            hostaddr: addrs.get(i).copied(),
            port: match ports {
                [one] => *one,
                many => many.get(i).copied().unwrap_or(5432),
            },
        })
        .collect()
}

/// Every host, comma-separated (`pg1:5432,pg2:5432`), for messages.
pub fn describe(config: &tokio_postgres::Config) -> String {
    endpoints(config)
        .iter()
        .map(ToString::to_string)
        .collect::<Vec<_>>()
        .join(",")
}

/// A copy of `config` that names only `endpoint` and accepts any session there: to look at one
/// server of the list whatever its role (`walship check` reads the standbys' settings).
pub fn only(config: &tokio_postgres::Config, endpoint: &Endpoint) -> tokio_postgres::Config {
    let mut c = tokio_postgres::Config::new();
    if let Some(user) = config.get_user() {
        c.user(user);
    }
    if let Some(pw) = config.get_password() {
        c.password(pw);
    }
    if let Some(db) = config.get_dbname() {
        c.dbname(db);
    }
    if let Some(options) = config.get_options() {
        c.options(options);
    }
    if let Some(app) = config.get_application_name() {
        c.application_name(app);
    }
    c.ssl_mode(config.get_ssl_mode());
    c.ssl_negotiation(config.get_ssl_negotiation());
    match &endpoint.host {
        Some(Host::Tcp(h)) => {
            c.host(h);
        }
        #[cfg(unix)]
        Some(Host::Unix(p)) => {
            c.host_path(p);
        }
        None => {}
    }
    if let Some(addr) = endpoint.hostaddr {
        c.hostaddr(addr);
    }
    c.port(endpoint.port);
    if let Some(t) = config.get_connect_timeout() {
        c.connect_timeout(*t);
    }
    if let Some(t) = config.get_tcp_user_timeout() {
        c.tcp_user_timeout(*t);
    }
    c.keepalives(config.get_keepalives());
    c.keepalives_idle(config.get_keepalives_idle());
    if let Some(i) = config.get_keepalives_interval() {
        c.keepalives_interval(i);
    }
    if let Some(r) = config.get_keepalives_retries() {
        c.keepalives_retries(r);
    }
    c.channel_binding(config.get_channel_binding());
    c.target_session_attrs(TargetSessionAttrs::Any);
    c
}

#[cfg(test)]
mod tests;

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
//! # Layout
//!
//! - `certs` — [`SslMode`], [`TlsOptions`]: what to verify, the certificate and key files, the
//!   OpenSSL connector.
//! - `config` — [`ConnectConfig`]: the connection string with the keys tokio-postgres does not
//!   keep.
//! - `negotiate` — the replication connection's SSLRequest and handshake, and the errors that
//!   explain a failed TLS or connection attempt.
//!
//! `config` and `negotiate` build on `certs`, never on each other.
//!
//! Invariant: every failure names the server, the mode in force and the fix; certificate
//! verification failures are definite errors (reconnecting cannot help), network failures during
//! the handshake stay transient.

mod certs;
mod config;
mod negotiate;

pub use certs::{RootCert, SslMode, TlsOptions};
pub use config::ConnectConfig;
pub(crate) use negotiate::{
    Negotiated, TlsSession, explain_connect_error, negotiate, plaintext_refused,
};

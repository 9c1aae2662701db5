//! The management (SQL) connection: the one way walship opens an ordinary connection to
//! PostgreSQL, for start-up's setup, the watchdog, the heartbeat ([`emit_heartbeat`]), the
//! catalog lookups of a session, `walship check` and `walship status`.
//!
//! Invariant: it connects with the replication connection's settings — the same URL and the
//! same TLS options (`sslmode`, root and client certificates, an OpenSSL connector built the
//! same way) — so a setup that `check` or start-up accepts is one the stream can connect with;
//! the password is handed in, never read from the configuration here.

use tokio_postgres::{Client, NoTls};

use crate::error::{PgError, sql_err};
use crate::replication::ConnectParams;
use crate::tls::SslMode;

/// Opens a management connection, with TLS per the connection's `sslmode` (the same OpenSSL
/// settings as the replication connection).
pub async fn connect(params: &ConnectParams, password: Option<&[u8]>) -> Result<Client, PgError> {
    use tokio_postgres::config::{Host, SslMode as PgSslMode};
    let mut config = params.config.pg.clone();
    if let Some(pw) = password {
        config.password(pw);
    }
    if config.get_application_name().is_none() {
        config.application_name("walship");
    }
    let opts = &params.config.tls;
    let target = params.describe();
    let host = params
        .config
        .tls_host()
        .unwrap_or_else(|| "localhost".into());
    // PostgreSQL offers no TLS on Unix sockets; libpq skips it there, whatever sslmode says.
    let unix_only = !config.get_hosts().is_empty()
        && config
            .get_hosts()
            .iter()
            .all(|h| !matches!(h, Host::Tcp(_)));
    let user = config.get_user().unwrap_or("(default user)").to_owned();
    let explain = |source| crate::tls::explain_connect_error(source, &target, &host, &user, opts);
    let client = if opts.mode == SslMode::Disable || unix_only {
        config.ssl_mode(PgSslMode::Disable);
        let (client, connection) = config.connect(NoTls).await.map_err(explain)?;
        drive(connection);
        client
    } else {
        // tokio-postgres knows prefer and require; verification is the connector's business.
        config.ssl_mode(if opts.mode.requires_tls() {
            PgSslMode::Require
        } else {
            PgSslMode::Prefer
        });
        let tls = postgres_native_tls::MakeTlsConnector::new(opts.connector()?);
        let (client, connection) = config.connect(tls).await.map_err(explain)?;
        drive(connection);
        client
    };
    Ok(client)
}

/// Writes walship's heartbeat: a non-transactional logical decoding message (prefix
/// `walship.heartbeat`, no content), so the walsender has WAL to send, and walship a position to
/// confirm, even when this database is quiet. The stream receives it (see
/// [`StartOptions`](crate::replication::StartOptions)); `walship.` is no outbox prefix, so it
/// publishes nothing.
pub async fn emit_heartbeat(client: &Client) -> Result<(), PgError> {
    client
        .execute(
            "SELECT pg_logical_emit_message(false, 'walship.heartbeat', '')",
            &[],
        )
        .await
        .map_err(sql_err("emitting the heartbeat message"))?;
    Ok(())
}

/// Runs a connection's I/O in the background until the client is dropped.
fn drive<S, T>(connection: tokio_postgres::Connection<S, T>)
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
    T: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    tokio::spawn(async move {
        if let Err(e) = connection.await {
            tracing::debug!("management connection closed: {e}");
        }
    });
}

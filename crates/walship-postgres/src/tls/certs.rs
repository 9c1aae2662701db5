//! What a TLS connection to PostgreSQL verifies, and with which certificates: libpq's
//! `sslmode`, the CA file (`sslrootcert`), the client certificate and key (`sslcert`, `sslkey`),
//! and the OpenSSL connector built from them.
//!
//! Invariant: [`TlsOptions`] holds paths only, never key material or passwords; the files are
//! read when a connector is built, and every failure to load them is a definite error naming the
//! setting, the file and the fix.

use std::fmt;
use std::path::{Path, PathBuf};
use std::str::FromStr;

use crate::error::PgError;

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

    /// The OpenSSL connector for these options. Built once and reused while the files it
    /// was built from are unchanged (a rotated client certificate or CA file is read again):
    /// building one loads the system trust store, tens of milliseconds of CPU on the runtime
    /// thread for every connection otherwise.
    pub fn connector(&self) -> Result<native_tls::TlsConnector, PgError> {
        type Built = (TlsOptions, Vec<Option<FileStamp>>, native_tls::TlsConnector);
        static BUILT: std::sync::Mutex<Vec<Built>> = std::sync::Mutex::new(Vec::new());
        let stamps = self.file_stamps();
        {
            let built = BUILT.lock().unwrap_or_else(|e| e.into_inner());
            if let Some((_, _, c)) = built.iter().find(|(o, s, _)| o == self && *s == stamps) {
                return Ok(c.clone());
            }
        }
        let connector = self.build_connector()?;
        let mut built = BUILT.lock().unwrap_or_else(|e| e.into_inner());
        built.retain(|(o, _, _)| o != self);
        built.push((self.clone(), stamps, connector.clone()));
        Ok(connector)
    }

    /// Each file a connector reads, as it is now (`None`: absent), in a fixed order.
    fn file_stamps(&self) -> Vec<Option<FileStamp>> {
        let modified = |p: &Path| {
            use std::os::unix::fs::MetadataExt;
            let m = std::fs::metadata(p).ok()?;
            Some((
                m.modified().ok(),
                m.len(),
                m.ino(),
                m.ctime(),
                m.ctime_nsec(),
            ))
        };
        let root = match &self.root_cert {
            Some(RootCert::File(p)) => Some(p.clone()),
            Some(RootCert::System) => None,
            None => default_root_cert(),
        };
        [
            root.as_deref(),
            self.client_cert.as_deref(),
            self.client_key.as_deref(),
        ]
        .into_iter()
        .map(|p| p.and_then(modified))
        .collect()
    }

    /// Builds the OpenSSL connector for these options (reads the certificate files).
    fn build_connector(&self) -> Result<native_tls::TlsConnector, PgError> {
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

/// What tells one version of a file from another: modified, size, inode and change time (a
/// copy that keeps the modification time still gets a new change time).
type FileStamp = (Option<std::time::SystemTime>, u64, u64, i64, i64);

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

#[cfg(test)]
mod tests;

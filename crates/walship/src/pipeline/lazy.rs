//! A management connection made when first needed and again after it failed.
//!
//! Owns the one SQL connection each background loop of a pipeline (watchdog, standby,
//! contender, owner watch, heartbeat) keeps.
//!
//! Invariant: a loop never holds a broken connection: after [`Lazy::lost`] the next
//! [`Lazy::get`] connects anew.

use walship_postgres::management;

use crate::config::settings::SourceSettings;
use crate::error::Error;

/// A management connection that a background loop (watchdog, standby, contender, owner watch,
/// heartbeat) makes when it first needs it and again after it failed.
pub(super) struct Lazy<'a> {
    source: &'a SourceSettings,
    /// `application_name` to set after connecting.
    name: Option<String>,
    client: Option<tokio_postgres::Client>,
}

impl<'a> Lazy<'a> {
    pub(super) fn new(source: &'a SourceSettings) -> Self {
        Lazy {
            source,
            name: None,
            client: None,
        }
    }

    /// One whose connection calls itself `name` (`application_name`).
    pub(super) fn named(source: &'a SourceSettings, name: String) -> Self {
        Lazy {
            name: Some(name),
            ..Lazy::new(source)
        }
    }

    /// The connection, made now if there is none.
    pub(super) async fn get(&mut self) -> Result<&tokio_postgres::Client, Error> {
        let client = match self.client.take() {
            Some(client) => client,
            None => {
                let client =
                    management::connect(&self.source.params, self.source.password_bytes()).await?;
                if let Some(name) = &self.name {
                    let name = name.replace('\'', "''");
                    client
                        .batch_execute(&format!("SET application_name = '{name}'"))
                        .await
                        .map_err(|source| walship_postgres::PgError::Sql {
                            context: "naming the connection".into(),
                            source,
                        })?;
                }
                client
            }
        };
        Ok(self.client.insert(client))
    }

    /// Forgets a connection that failed: the next [`Lazy::get`] makes another.
    pub(super) fn lost(&mut self) {
        self.client = None;
    }
}

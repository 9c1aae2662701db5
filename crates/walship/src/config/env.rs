//! Where values come from besides the TOML file: `WALSHIP_<SECTION>__<KEY>` environment
//! overrides laid over the file's table, and secrets read from files.
//!
//! Invariant: an override is applied to the table before it is deserialized, so it meets the
//! same validation as the file; a secret read from a file is held in a [`Secret`] at once.

use std::path::Path;

use super::format::{Config, ConfigError, Secret};

/// Prefix of environment overrides: `WALSHIP_KAFKA__BROKERS` sets `kafka.brokers`.
pub const ENV_PREFIX: &str = "WALSHIP_";

pub(crate) fn is_secret_property(key: &str) -> bool {
    let k = key.to_ascii_lowercase();
    k.contains("password")
        || k.contains("secret")
        || k == "ssl.key.pem"
        || k == "sasl.oauthbearer.config"
}

pub(crate) fn read_secret_file(path: &Path, key: &str) -> Result<Secret, ConfigError> {
    let v = std::fs::read_to_string(path)
        .map_err(|e| ConfigError(format!("{key}: cannot read {}: {e}", path.display())))?;
    Ok(Secret(v.trim_end_matches(['\n', '\r']).to_owned()))
}

/// Applies `WALSHIP_<SECTION>__<KEY>` overrides from `env` to `table`; returns the names of
/// those applied.
pub(crate) fn apply_env(
    table: &mut toml::Table,
    env: impl IntoIterator<Item = (String, String)>,
) -> Result<Vec<String>, ConfigError> {
    let mut applied = Vec::new();
    // Shallow overrides first, so `KAFKA__LIBRDKAFKA__X` refines `KAFKA__LIBRDKAFKA` whatever
    // the environment's order.
    let mut env: Vec<(String, String)> = env.into_iter().collect();
    env.sort_by(|(a, _), (b, _)| {
        (a.matches("__").count(), a.as_str()).cmp(&(b.matches("__").count(), b.as_str()))
    });
    for (name, value) in env {
        let Some(path) = name.strip_prefix(ENV_PREFIX) else {
            continue;
        };
        // SECTION__KEY, or deeper: KAFKA__LIBRDKAFKA__<property> sets one entry of a table.
        let segments: Vec<String> = path.split("__").map(str::to_ascii_lowercase).collect();
        let Some((key, tables)) = segments.split_last() else {
            continue;
        };
        if tables.is_empty() {
            continue;
        }
        let mut t = &mut *table;
        for (depth, section) in tables.iter().enumerate() {
            let entry = t
                .entry(section.clone())
                .or_insert_with(|| toml::Value::Table(toml::Table::new()));
            let toml::Value::Table(inner) = entry else {
                return Err(ConfigError(format!(
                    "{name}: [{}] is not a table",
                    tables[..=depth].join(".")
                )));
            };
            t = inner;
        }
        // Entries of nested tables (librdkafka properties, secret names) are strings.
        let parsed = if tables.len() > 1 {
            toml::Value::String(value.clone())
        } else {
            env_value(&value)
        };
        match (t.get_mut(key.as_str()), parsed) {
            // A table given whole (an inline table) adds to the file's entries.
            (Some(toml::Value::Table(existing)), toml::Value::Table(given)) => {
                existing.extend(given);
            }
            (_, v) => {
                t.insert(key.clone(), v);
            }
        }
        applied.push(name);
    }
    Ok(applied)
}

/// An environment value as TOML when it parses as a scalar or array, else as a string.
fn env_value(raw: &str) -> toml::Value {
    match toml::from_str::<toml::Table>(&format!("v = {raw}")) {
        Ok(mut t) => t
            .remove("v")
            .unwrap_or_else(|| toml::Value::String(raw.to_owned())),
        Err(_) => toml::Value::String(raw.to_owned()),
    }
}

impl Config {
    /// Parses `text`, applies `WALSHIP_<SECTION>__<KEY>` overrides from `env`, and validates.
    /// `origin` names the source in errors.
    pub fn from_toml(
        text: &str,
        env: impl IntoIterator<Item = (String, String)>,
        origin: &str,
    ) -> Result<Config, ConfigError> {
        let mut table: toml::Table =
            toml::from_str(text).map_err(|e| ConfigError(format!("in {origin}: {e}")))?;
        let applied = apply_env(&mut table, env)?;
        Self::from_table(table, &applied, origin)
    }
}

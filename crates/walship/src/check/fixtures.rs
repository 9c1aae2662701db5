//! What the check tests share: a configuration with the required keys and a role.

use walship_postgres::catalog::RoleInfo;

use crate::config::Config;

/// A configuration with the required keys and `extra` TOML after them.
pub(super) fn config(extra: &str) -> Config {
    Config::from_toml(
        &format!(
            "[postgres]\nurl = \"postgres://walship@db:5432/app\"\n[kafka]\nbrokers = \"k:9092\"\n{extra}"
        ),
        std::iter::empty(),
        "test",
    )
    .unwrap()
}

/// Role `nrep` in database `app`, without CREATE on it.
pub(super) fn role(replication: bool, superuser: bool) -> RoleInfo {
    RoleInfo {
        name: "nrep".into(),
        replication,
        superuser,
        can_create_in_database: false,
        database: "app".into(),
        rds_replication_member: false,
        on_rds: false,
    }
}

//! The Kubernetes manifests of `deploy/kubernetes/`, seen from walship: the `walship.toml` each
//! ConfigMap holds is a configuration walship accepts (with the environment the Deployment
//! gives the container), listens where the probes and the scrape annotations point, takes its
//! secrets from files only, and the cluster variant's pipelines resolve to settings once their
//! password files exist. The schemas and the Kubernetes-side settings are checked by
//! `deploy/kubernetes/check_manifests.py` (scripts/test.sh runs it).

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use walship::config::deployment::Deployment;

fn manifest(variant: &str) -> String {
    let path = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../../deploy/kubernetes")
        .join(variant)
        .join("walship.yaml");
    std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

/// The block scalar under `key: |` (the ConfigMap's file), de-indented.
fn block(yaml: &str, key: &str) -> String {
    let mut lines = yaml.lines();
    lines
        .by_ref()
        .find(|l| l.trim() == format!("{key}: |"))
        .unwrap_or_else(|| panic!("no {key}: | block"));
    let body: Vec<&str> = lines
        .take_while(|l| l.is_empty() || l.starts_with("    "))
        .collect();
    body.iter()
        .map(|l| l.strip_prefix("    ").unwrap_or(""))
        .collect::<Vec<_>>()
        .join("\n")
}

/// The container's `env` entries with a plain `value` (the only ones the file can rely on).
fn plain_env(yaml: &str) -> BTreeMap<String, String> {
    let mut env = BTreeMap::new();
    let mut lines = yaml.lines().peekable();
    while let Some(line) = lines.next() {
        if let Some(name) = line.trim().strip_prefix("- name: ")
            && let Some(value) = lines.peek().and_then(|l| l.trim().strip_prefix("value: "))
            && name.starts_with("WALSHIP_")
        {
            env.insert(name.to_owned(), value.trim_matches('"').to_owned());
        }
    }
    env
}

fn load(variant: &str) -> (Deployment, String) {
    let yaml = manifest(variant);
    let text = block(&yaml, "walship.toml");
    let deployment = Deployment::from_toml(&text, plain_env(&yaml), variant)
        .unwrap_or_else(|e| panic!("{variant}'s walship.toml: {e}"));
    (deployment, yaml)
}

/// What a manifest's pod spec says about the port and the secrets' directory.
fn assert_consistent(variant: &str, deployment: &Deployment, yaml: &str) {
    let addr = deployment
        .metrics
        .address()
        .unwrap()
        .unwrap_or_else(|| panic!("{variant}: metrics.listen is set"));
    let port = addr.port();
    for needle in [
        format!("containerPort: {port}"),
        format!("prometheus.io/port: \"{port}\""),
        "path: /readyz".to_owned(),
        "path: /healthz".to_owned(),
        "mountPath: /etc/walship/secrets".to_owned(),
        "secretName: walship".to_owned(),
    ] {
        assert!(yaml.contains(&needle), "{variant}: {needle}");
    }
    assert_eq!(port, walship::config::DEFAULT_METRICS_PORT, "{variant}");
    for p in &deployment.pipelines {
        let pg = &p.config.postgres;
        let userinfo = pg
            .url
            .split_once("://")
            .and_then(|(_, rest)| rest.split_once('@'))
            .map_or("", |(user, _)| user);
        assert!(
            pg.password_env.is_none() && !userinfo.contains(':'),
            "{variant}: no password in the URL or the environment: {}",
            pg.url
        );
        let file = pg
            .password_file
            .as_ref()
            .unwrap_or_else(|| panic!("{variant}: the password comes from a file"));
        assert!(
            file.starts_with("/etc/walship/secrets/"),
            "{variant}: {} is in the mounted Secret",
            file.display()
        );
        // The grace period's reasoning (check_manifests.py checks the number).
        assert!(p.config.run.shutdown_timeout_ms <= 20_000, "{variant}");
    }
}

#[test]
fn the_active_passive_manifest_holds_a_configuration_walship_accepts() {
    let (deployment, yaml) = load("active-passive");
    assert!(deployment.is_single() && deployment.cluster.is_none());
    assert_consistent("active-passive", &deployment, &yaml);
    resolves(&deployment);
}

#[test]
fn the_cluster_manifest_holds_a_configuration_walship_accepts_and_resolves() {
    let (deployment, yaml) = load("cluster");
    assert!(deployment.cluster.is_some(), "[cluster]");
    let names: Vec<_> = deployment
        .pipelines
        .iter()
        .filter_map(|p| p.name.clone())
        .collect();
    assert_eq!(names, ["orders", "billing", "shipping"]);
    assert_consistent("cluster", &deployment, &yaml);
    resolves(&deployment);
}

/// With the Secret's files in place, every pipeline resolves to settings (what `walship run`
/// does before it connects anywhere).
fn resolves(deployment: &Deployment) {
    let secrets = tempfile::tempdir().unwrap();
    for p in &deployment.pipelines {
        let mut config = p.config.clone();
        let name = config
            .postgres
            .password_file
            .as_ref()
            .and_then(|f| f.file_name())
            .map(PathBuf::from)
            .unwrap();
        let file = secrets.path().join(name);
        std::fs::write(&file, "not-the-real-one\n").unwrap();
        config.postgres.password_file = Some(file);
        walship::config::settings::Settings::resolve(&config)
            .unwrap_or_else(|e| panic!("pipeline {:?}: {e}", p.name));
    }
}

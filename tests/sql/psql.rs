//! `walship init-sql`'s output applied with psql as a user would, twice.

use std::io::Write;
use std::path::PathBuf;
use std::process::{Command, Output, Stdio};

use crate::harness::{self, TestDb};

/// psql from PATH, else next to the test server's binaries.
fn psql_bin() -> PathBuf {
    std::env::var_os("PATH")
        .into_iter()
        .flat_map(|p| std::env::split_paths(&p).collect::<Vec<_>>())
        .map(|d| d.join("psql"))
        .find(|p| p.exists())
        .unwrap_or_else(|| harness::postgres::pg_bin_dir().join("psql"))
}

/// Runs `sql` with psql as a user would (`-v ON_ERROR_STOP=1 -f -`).
fn psql(url: &str, sql: &[u8]) -> Output {
    let mut child = Command::new(psql_bin())
        .args(["-X", "-q", "-v", "ON_ERROR_STOP=1", "-d", url, "-f", "-"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("run psql (install postgresql-client; scripts/setup.sh does)");
    child
        .stdin
        .take()
        .expect("stdin")
        .write_all(sql)
        .expect("write SQL to psql");
    child.wait_with_output().expect("psql output")
}

fn init_sql_cli(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_walship"))
        .arg("init-sql")
        .args(args)
        .env_remove("WALSHIP_LOG_FORMAT")
        .output()
        .expect("run walship init-sql")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn init_sql_output_applies_cleanly_with_psql_twice() {
    let db = TestDb::new().await;
    for args in [
        &["--schema", "kit"][..],
        &[
            "--schema",
            "kit_part",
            "--partitioned",
            "--publication",
            "kit_part_pub",
        ][..],
        // Quoting: case, spaces, both quote characters, a dollar sign.
        &["--schema", "Odd \"Kit\" o'$", "--publication", "Odd 'pub'"][..],
    ] {
        let out = init_sql_cli(args);
        assert!(
            out.status.success(),
            "walship init-sql {args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        for run in 1..=2 {
            let applied = psql(&db.url, &out.stdout);
            assert!(
                applied.status.success(),
                "run {run} of init-sql {args:?} output with psql failed: {}",
                String::from_utf8_lossy(&applied.stderr)
            );
        }
    }
    let published: Vec<(String, String)> = db
        .client
        .query(
            "SELECT pubname::text, schemaname::text FROM pg_publication_tables \
             WHERE tablename = 'outbox' ORDER BY 1",
            &[],
        )
        .await
        .unwrap()
        .iter()
        .map(|r| (r.get(0), r.get(1)))
        .collect();
    assert_eq!(
        published,
        vec![
            ("Odd 'pub'".to_owned(), "Odd \"Kit\" o'$".to_owned()),
            ("kit_part_pub".to_owned(), "kit_part".to_owned()),
            ("walship_outbox".to_owned(), "kit".to_owned()),
        ]
    );
    let emitted = db
        .client
        .query_one(
            "SELECT \"Odd \"\"Kit\"\" o'$\".outbox_emit('a', 'b', 'c', NULL) IS NOT NULL",
            &[],
        )
        .await
        .unwrap();
    assert!(emitted.get::<_, bool>(0));

    let out = init_sql_cli(&["--schema", "a.b"]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{err}");
    assert!(err.contains("--schema \"a.b\" contains '.'"), "{err}");
}

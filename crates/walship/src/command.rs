//! What the commands share at their edge: loading the configuration, writing a report, and
//! the words for a size. `check` and `status` use all of it, `run` the first; [`crate::cli`]
//! calls the commands and none of them calls back into it.
//!
//! Invariant: the exit codes mean the same for every command — 2 when the configuration cannot
//! be read or is invalid (the reason on stderr), 1 when a report says something is wrong or
//! cannot be written, 0 otherwise — and a report goes to stdout whole, as JSON or as text,
//! never mixed with diagnostics.

use std::process::ExitCode;

use crate::config::deployment::Deployment;

/// Loads a configuration with one pipeline or several; on failure prints why and returns exit
/// code 2.
pub fn load_deployment(path: &std::path::Path) -> Result<Deployment, ExitCode> {
    Deployment::load(path).map_err(|e| {
        eprintln!("error: {e}");
        ExitCode::from(2)
    })
}

/// One pipeline's report in a multi-pipeline answer (`{"pipeline": name, ...report}`).
#[derive(serde::Serialize)]
struct Named<'a, T: serde::Serialize> {
    pipeline: &'a str,
    #[serde(flatten)]
    report: &'a T,
}

/// Writes the reports of several pipelines: as JSON an array of reports each with a
/// `pipeline` field, as text one `human` section per pipeline. Exit code 0 when `ok`.
pub fn print_named<T: serde::Serialize>(
    reports: &[(String, T)],
    json: bool,
    human: impl Fn(&str, &T) -> String,
    ok: bool,
) -> ExitCode {
    let named: Vec<_> = reports
        .iter()
        .map(|(pipeline, report)| Named { pipeline, report })
        .collect();
    let text = || {
        reports
            .iter()
            .map(|(name, report)| human(name, report))
            .collect::<Vec<_>>()
            .join("\n")
    };
    print_report(&named, json, text, ok)
}

/// Writes a report to stdout, as pretty JSON or as `human` text; exit code 0 when `ok`, else 1.
pub fn print_report<T: serde::Serialize>(
    report: &T,
    json: bool,
    human: impl FnOnce() -> String,
    ok: bool,
) -> ExitCode {
    use std::io::Write;
    let text = if json {
        match serde_json::to_string_pretty(report) {
            Ok(s) => s + "\n",
            Err(e) => {
                eprintln!("error: cannot encode the report as JSON: {e}");
                return ExitCode::from(1);
            }
        }
    } else {
        human()
    };
    let mut stdout = std::io::stdout().lock();
    if let Err(e) = stdout
        .write_all(text.as_bytes())
        .and_then(|()| stdout.flush())
    {
        eprintln!("error: cannot write the report to stdout: {e}");
        return ExitCode::from(1);
    }
    if ok {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(1)
    }
}

/// `1234 bytes` or `1234567 bytes (1.2 MiB)`.
pub fn human_bytes(n: u64) -> String {
    const UNITS: [&str; 4] = ["KiB", "MiB", "GiB", "TiB"];
    if n < 1024 {
        return format!("{n} bytes");
    }
    let mut v = n as f64 / 1024.0;
    let mut unit = 0;
    while v >= 1024.0 && unit + 1 < UNITS.len() {
        v /= 1024.0;
        unit += 1;
    }
    format!("{n} bytes ({v:.1} {})", UNITS[unit])
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn human_sizes() {
        assert_eq!(human_bytes(0), "0 bytes");
        assert_eq!(human_bytes(2048), "2048 bytes (2.0 KiB)");
        assert_eq!(human_bytes(3 << 30), "3221225472 bytes (3.0 GiB)");
    }
}

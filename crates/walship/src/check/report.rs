//! The check report: one [`Check`] per line (pass, warn, fail, skip), their [`Summary`], and
//! the two forms `walship check` prints — text for people (`✓ ! ✗ -`, the fix under each
//! problem) and JSON for scripts.
//!
//! Invariant: a [`Report`] is ok exactly when no check failed (warnings are allowed), and its
//! summary counts every check once; the exit code and the closing line both follow from that.

use serde::Serialize;

/// The outcome of one check.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Status {
    /// Fine.
    Pass,
    /// Works, but deserves a look.
    Warn,
    /// walship cannot start or would stop: fix it.
    Fail,
    /// Not checked because an earlier check failed.
    Skip,
}

impl Status {
    fn symbol(self) -> &'static str {
        match self {
            Status::Pass => "✓",
            Status::Warn => "!",
            Status::Fail => "✗",
            Status::Skip => "-",
        }
    }
}

/// One line of the report.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Check {
    /// Stable identifier, e.g. `postgres.wal_level`.
    pub name: String,
    /// Outcome.
    pub status: Status,
    /// What was found, and where.
    pub message: String,
    /// How to fix it (for warnings and failures).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub fix: Option<String>,
}

impl Check {
    pub(super) fn pass(name: &str, message: impl Into<String>) -> Check {
        Check {
            name: name.to_owned(),
            status: Status::Pass,
            message: message.into(),
            fix: None,
        }
    }

    pub(super) fn warn(name: &str, message: impl Into<String>, fix: impl Into<String>) -> Check {
        Check {
            name: name.to_owned(),
            status: Status::Warn,
            message: message.into(),
            fix: Some(fix.into()),
        }
    }

    pub(super) fn fail(name: &str, message: impl Into<String>, fix: impl Into<String>) -> Check {
        Check {
            name: name.to_owned(),
            status: Status::Fail,
            message: message.into(),
            fix: Some(fix.into()),
        }
    }

    pub(super) fn skip(name: &str, why: impl Into<String>) -> Check {
        Check {
            name: name.to_owned(),
            status: Status::Skip,
            message: format!("not checked: {}", why.into()),
            fix: None,
        }
    }
}

/// Counts per outcome.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
pub struct Summary {
    /// Passed checks.
    pub pass: usize,
    /// Warnings.
    pub warn: usize,
    /// Failures.
    pub fail: usize,
    /// Skipped checks.
    pub skip: usize,
}

/// The whole report.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Report {
    /// True when nothing failed (warnings allowed).
    pub ok: bool,
    /// Counts.
    pub summary: Summary,
    /// Every check, in order.
    pub checks: Vec<Check>,
}

impl Report {
    /// Builds the report from its checks.
    pub fn new(checks: Vec<Check>) -> Report {
        let mut summary = Summary::default();
        for c in &checks {
            match c.status {
                Status::Pass => summary.pass += 1,
                Status::Warn => summary.warn += 1,
                Status::Fail => summary.fail += 1,
                Status::Skip => summary.skip += 1,
            }
        }
        Report {
            ok: summary.fail == 0,
            summary,
            checks,
        }
    }

    /// The human form: one line per check (`✓` pass, `!` warning, `✗` failure, `-` skipped),
    /// the fix indented below, and a summary line.
    pub fn render_human(&self) -> String {
        let width = self.checks.iter().map(|c| c.name.len()).max().unwrap_or(0);
        let mut out = String::new();
        for c in &self.checks {
            out.push_str(&format!(
                "{} {:<width$}  {}\n",
                c.status.symbol(),
                c.name,
                c.message
            ));
            if let Some(fix) = &c.fix {
                out.push_str(&format!("  {:<width$}  fix: {fix}\n", ""));
            }
        }
        let s = &self.summary;
        out.push_str(&format!(
            "\n{} passed, {} warning{}, {} failed, {} skipped: {}\n",
            s.pass,
            s.warn,
            if s.warn == 1 { "" } else { "s" },
            s.fail,
            s.skip,
            if self.ok {
                "walship can start"
            } else {
                "fix the failures (✗) before starting walship"
            }
        ));
        out
    }
}

/// Items as a comma-separated list of quoted strings: `"a", "b"`.
pub(super) fn quoted_list(items: &[impl AsRef<str>]) -> String {
    items
        .iter()
        .map(|s| format!("{:?}", s.as_ref()))
        .collect::<Vec<_>>()
        .join(", ")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn report_counts_and_renders_every_fix() {
        let r = Report::new(vec![
            Check::pass("a", "fine"),
            Check::fail("bb", "broken", "repair it"),
            Check::warn("c", "odd", "look at it"),
            Check::skip("d", "because"),
        ]);
        assert!(!r.ok);
        assert_eq!(
            r.summary,
            Summary {
                pass: 1,
                warn: 1,
                fail: 1,
                skip: 1
            }
        );
        let text = r.render_human();
        assert!(
            text.contains("✗ bb  broken\n      fix: repair it"),
            "{text}"
        );
        assert!(
            text.contains("1 passed, 1 warning, 1 failed, 1 skipped"),
            "{text}"
        );
        let json = serde_json::to_value(&r).unwrap();
        assert_eq!(json["checks"][1]["status"], "fail");
        assert_eq!(json["checks"][1]["fix"], "repair it");
        assert_eq!(json["ok"], false);
    }
}

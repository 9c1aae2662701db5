//! Records what `walship_build_info` reports: the git commit the binary was built from (when
//! built from a git checkout) and the compiler's version.
//!
//! Neither is needed to build: without git (a source tarball) the commit is `unknown`.

// A build script talks to cargo through stdout.
#![allow(clippy::print_stdout)]

use std::path::{Path, PathBuf};
use std::process::Command;

fn main() {
    let commit = git(&["rev-parse", "--short=12", "HEAD"]).unwrap_or_else(|| "unknown".into());
    println!("cargo:rustc-env=WALSHIP_GIT_COMMIT={commit}");
    let rustc = std::env::var("RUSTC").unwrap_or_else(|_| "rustc".into());
    let version = Command::new(rustc)
        .arg("--version")
        .output()
        .ok()
        .filter(|o| o.status.success())
        .and_then(|o| String::from_utf8(o.stdout).ok())
        // "rustc 1.95.0 (59807616e 2026-04-14)" -> "1.95.0"
        .and_then(|v| v.split_whitespace().nth(1).map(str::to_owned))
        .unwrap_or_else(|| "unknown".into());
    println!("cargo:rustc-env=WALSHIP_RUSTC_VERSION={version}");

    // Build again when HEAD moves: HEAD itself (a checkout), the branch it names (a commit),
    // and packed-refs (where git may keep that branch). Only paths that exist: cargo runs a
    // build script whose watched path is missing on every build, which would rebuild walship
    // and every test binary each time.
    if let Some(git_dir) = git(&["rev-parse", "--git-dir"]).map(PathBuf::from) {
        let git_dir = absolute(&git_dir);
        let head = git_dir.join("HEAD");
        let common = git(&["rev-parse", "--git-common-dir"])
            .map(|d| absolute(Path::new(&d)))
            .unwrap_or_else(|| git_dir.clone());
        let branch = std::fs::read_to_string(&head)
            .ok()
            .and_then(|h| h.strip_prefix("ref: ").map(|r| common.join(r.trim())));
        for path in [Some(head), branch, Some(common.join("packed-refs"))]
            .into_iter()
            .flatten()
            .filter(|p| p.exists())
        {
            println!("cargo:rerun-if-changed={}", path.display());
        }
    }
    println!("cargo:rerun-if-changed=build.rs");
}

/// `git ARGS` run in this crate's directory: its trimmed output, or `None` without git or a
/// repository.
fn git(args: &[&str]) -> Option<String> {
    let out = Command::new("git")
        .args(args)
        .current_dir(env_dir())
        .output()
        .ok()
        .filter(|o| o.status.success())?;
    let text = String::from_utf8(out.stdout).ok()?.trim().to_owned();
    (!text.is_empty()).then_some(text)
}

fn env_dir() -> PathBuf {
    PathBuf::from(std::env::var("CARGO_MANIFEST_DIR").unwrap_or_else(|_| ".".into()))
}

/// `path` made absolute against this crate's directory (git prints relative git dirs).
fn absolute(path: &Path) -> PathBuf {
    if path.is_absolute() {
        path.to_owned()
    } else {
        env_dir().join(path)
    }
}

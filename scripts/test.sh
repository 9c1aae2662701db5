#!/usr/bin/env bash
# The whole test suite, from a fresh machine: installs prerequisites, then formatting, lints,
# unit tests, the end-to-end tests against a real PostgreSQL and a real broker (tansu), and the
# demo (scripts/demo.sh) with each of its brokers.
#
#   scripts/test.sh
#
# Environment:
#   WALSHIP_TEST_PG_URL   use an external PostgreSQL (superuser URL, no database) instead of a
#                         private cluster started from /usr/lib/postgresql/*/bin
#   WALSHIP_TEST_KAFKA    use an external broker (host:port) instead of a private tansu
#   WALSHIP_LONG_TESTS=1  also run the long reliability variants
set -euo pipefail
cd "$(dirname "$0")/.."

if [ -n "${WALSHIP_TEST_KAFKA:-}" ]; then scripts/setup.sh --no-broker; else scripts/setup.sh; fi
export PATH="$HOME/.cargo/bin:$PATH"

# A failed run keeps its PostgreSQL data directories and broker logs for inspection (the
# harness says where); forget those of runs more than a day old.
find "${TMPDIR:-/tmp}" -maxdepth 1 -name 'walship-test-*' -mmin +1440 -exec rm -rf {} + 2>/dev/null || true

echo "== cargo fmt --check"
cargo fmt --all -- --check
echo "== cargo clippy"
cargo clippy --workspace --all-targets --locked -- -D warnings
log="$(mktemp)"
trap 'rm -f "$log"' EXIT
# A failing cargo test must not end the script before the demos and the summary line: its
# status is kept and decides the exit code at the end.
cargo_failed=0
echo "== doc tests"
cargo test --workspace --doc --locked 2>&1 | tee -a "$log" || cargo_failed=1
echo "== cargo test (unit + end-to-end)"
cargo test --workspace --all-targets --locked 2>&1 | tee -a "$log" || cargo_failed=1

# The README's first command, in both broker modes, so it cannot break unnoticed. It uses the dev
# profile, which cargo test has mostly built (the examples as plain binaries take under a minute;
# the demo's default release build would take several). A run passes when the demo exits 0 and
# its consumer reports every event arriving once, in commit order per aggregate (demo_events
# checks this and exits non-zero otherwise).
demo_passed=0
demo_failed=0
demo_log="$(mktemp)"
trap 'rm -f "$log" "$demo_log"' EXIT
for broker in mock tansu; do
  echo "== demo (WALSHIP_DEMO_BROKER=$broker)"
  if [ "$broker" = tansu ] && ! command -v tansu >/dev/null; then
    # Only when WALSHIP_TEST_KAFKA skipped the broker install; the demo would build tansu.
    echo "skipped: tansu is not installed (WALSHIP_TEST_KAFKA set); run scripts/setup.sh to install it"
    continue
  fi
  started=$SECONDS
  if WALSHIP_DEMO_BROKER="$broker" WALSHIP_DEMO_PROFILE=dev scripts/demo.sh 2>&1 | tee "$demo_log" &&
    grep -Eq '^all [0-9]+ events arrived, each aggregate in commit order\.$' "$demo_log"; then
    demo_passed=$((demo_passed + 1))
    echo "demo ($broker): ok in $((SECONDS - started)) s"
  else
    demo_failed=$((demo_failed + 1))
    echo "demo ($broker): FAILED after $((SECONDS - started)) s"
  fi
done

# One closing line over every test binary (cargo prints one "test result" line per binary) and
# the demo runs (one test each).
awk -v dp="$demo_passed" -v df="$demo_failed" \
  '/^test result:/ { for (i = 1; i <= NF; i++) { if ($(i+1) ~ /^passed/) p += $i; if ($(i+1) ~ /^failed/) f += $i } }
   END { printf "tests: %d passed, %d failed\n", p + dp, f + df }' "$log"
[ "$demo_failed" -eq 0 ] && [ "$cargo_failed" -eq 0 ]

#!/usr/bin/env bash
# The whole test suite, from a fresh machine: installs prerequisites, then formatting, lints,
# unit tests, and the end-to-end tests against a real PostgreSQL and a real broker (tansu).
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
echo "== doc tests"
cargo test --workspace --doc --locked 2>&1 | tee -a "$log"
echo "== cargo test (unit + end-to-end)"
cargo test --workspace --all-targets --locked 2>&1 | tee -a "$log"
# One closing line over every test binary (cargo prints one "test result" line per binary).
awk '/^test result:/ { for (i = 1; i <= NF; i++) { if ($(i+1) ~ /^passed/) p += $i; if ($(i+1) ~ /^failed/) f += $i } }
     END { printf "tests: %d passed, %d failed\n", p, f }' "$log"

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

echo "== cargo fmt --check"
cargo fmt --all -- --check
echo "== cargo clippy"
cargo clippy --workspace --all-targets --locked -- -D warnings
echo "== cargo test"
cargo test --workspace --all-targets --locked
echo "== doc tests"
cargo test --workspace --doc --locked

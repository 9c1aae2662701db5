#!/usr/bin/env bash
# Lints the README, the book's sources and docker/README.md with markdownlint-cli2 (rules and
# files: .markdownlint-cli2.jsonc; an unclosed code fence is caught by
# scripts/markdownlint/unclosed-fence.cjs). scripts/setup.sh installs the linter.
set -euo pipefail
cd "$(dirname "$0")/.."
bin="${XDG_CACHE_HOME:-$HOME/.cache}/walship/markdownlint-cli2/node_modules/.bin/markdownlint-cli2"
if [ ! -x "$bin" ]; then
  echo "markdownlint-cli2 is not installed: run scripts/setup.sh" >&2
  exit 1
fi
exec "$bin" "$@"

#!/usr/bin/env bash
# Installs what walship's build, tests and demo need, idempotently; safe to run again.
#
#   scripts/setup.sh            build tools + PostgreSQL server binaries + the tansu broker
#                               + the documentation tools (mdBook, markdownlint-cli2)
#                               + Prometheus/promtool and kubernetes-validate (cached by
#                               scripts/operator-tools.sh)
#                               (PostgreSQL 16-18 for the test matrix: scripts/postgres.sh)
#   scripts/setup.sh --no-broker   skip the broker (the demo then uses librdkafka's mock cluster)
#   scripts/setup.sh --no-docs     skip the documentation tools (the demo does not need them)
#
# Cached: the tansu binary lives in ~/.cargo/bin and is only built when missing or the wrong
# version (about 10-25 minutes on a 2-core machine); so does mdbook (about 5 minutes once).
# markdownlint-cli2 is installed with npm under ~/.cache/walship/ (seconds), again only when
# missing or the wrong version.
set -euo pipefail

TANSU_VERSION="0.6.0"
MDBOOK_VERSION="0.5.4"
# 0.17.x runs on Node.js 18 (Debian 12's); later releases need Node.js 20 or 22.
MARKDOWNLINT_CLI2_VERSION="0.17.2"
want_broker=1
want_docs=1
for arg in "$@"; do
  case "$arg" in
    --no-broker) want_broker=0 ;;
    --no-docs) want_docs=0 ;;
    *) echo "setup.sh: unknown option $arg" >&2; exit 2 ;;
  esac
done

log() { printf '[setup] %s\n' "$*" >&2; }

sudo_if_needed() {
  if [ "$(id -u)" -eq 0 ]; then "$@"; elif command -v sudo >/dev/null; then sudo "$@"; else
    log "need root to run: $*"; exit 1; fi
}

# --- Debian packages --------------------------------------------------------------------------
have_pg_server() { compgen -G "/usr/lib/postgresql/*/bin/initdb" >/dev/null; }
missing=()
command -v cc >/dev/null || missing+=(build-essential)
command -v make >/dev/null || missing+=(make)
command -v pkg-config >/dev/null || missing+=(pkg-config)
# librdkafka (rdkafka's `ssl` feature) and walship's PostgreSQL TLS link OpenSSL; the TLS tests
# make their certificates with the openssl command.
{ pkg-config --exists openssl 2>/dev/null || dpkg -s libssl-dev >/dev/null 2>&1; } || missing+=(libssl-dev)
command -v openssl >/dev/null || missing+=(openssl)
command -v python3 >/dev/null || missing+=(python3)
# scripts/postgres.sh fetches the PostgreSQL 16-18 builds of the test matrix with pip; those
# builds link these system libraries (Debian's postgresql-15 pulls them in too).
python3 -m pip --version >/dev/null 2>&1 || missing+=(python3-pip)
for pkg in libicu72 libssl3 libzstd1 liblz4-1 libgssapi-krb5-2 libxml2 zlib1g liblzma5; do
  dpkg -s "$pkg" >/dev/null 2>&1 || missing+=("$pkg")
done
have_pg_server || missing+=(postgresql)
command -v psql >/dev/null || missing+=(postgresql-client)
# tests/cutoff.rs cuts a walship process off from the broker in a network namespace of its own.
command -v ip >/dev/null || missing+=(iproute2)
# The end-to-end bench (scripts/bench_e2e.py) measures CPU and peak RSS with GNU time.
[ -x /usr/bin/time ] || missing+=(time)
command -v pg_recvlogical >/dev/null || missing+=(postgresql-client)
# markdownlint-cli2 (the documentation check) runs on Node.js, installed with npm.
if [ "$want_docs" -eq 1 ]; then
  command -v node >/dev/null || missing+=(nodejs)
  command -v npm >/dev/null || missing+=(npm)
fi
if [ ${#missing[@]} -gt 0 ]; then
  log "installing Debian packages: ${missing[*]}"
  export DEBIAN_FRONTEND=noninteractive
  sudo_if_needed apt-get update -qq
  sudo_if_needed apt-get install -y -qq --no-install-recommends "${missing[@]}"
fi
# The Debian package starts a cluster of its own; walship's harness starts private ones.
if [ "$(id -u)" -eq 0 ] && ! id postgres >/dev/null 2>&1; then
  log "creating the 'postgres' system user (initdb refuses to run as root)"
  useradd --system --home-dir /var/lib/postgresql --shell /bin/bash postgres
fi

# --- Rust toolchain components ------------------------------------------------------------------
if ! command -v cargo >/dev/null; then
  log "cargo not found: install Rust (rustup) first"; exit 1
fi
rustup component list --installed 2>/dev/null | grep -q '^clippy' || rustup component add clippy rustfmt >/dev/null 2>&1 || true

# --- the broker ---------------------------------------------------------------------------------
if [ "$want_broker" -eq 1 ]; then
  tansu_bin="$(command -v tansu || echo "$HOME/.cargo/bin/tansu")"
  if [ -x "$tansu_bin" ] && "$tansu_bin" --version 2>/dev/null | grep -q "$TANSU_VERSION"; then
    log "tansu $TANSU_VERSION present: $tansu_bin"
  else
    log "building the tansu broker $TANSU_VERSION (cargo install; 10-25 minutes, cached in ~/.cargo/bin)"
    cargo install tansu --version "$TANSU_VERSION" --locked --features dynostore
  fi
fi
# --- the documentation tools ----------------------------------------------------------------------
if [ "$want_docs" -eq 1 ]; then
  mdbook_bin="$(command -v mdbook || echo "$HOME/.cargo/bin/mdbook")"
  if [ -x "$mdbook_bin" ] && "$mdbook_bin" --version 2>/dev/null | grep -q "v$MDBOOK_VERSION\$"; then
    log "mdbook $MDBOOK_VERSION present: $mdbook_bin"
  else
    # Without the serve and watch features: the book is only built here (a few minutes less).
    log "building mdbook $MDBOOK_VERSION (cargo install; about 5 minutes, cached in ~/.cargo/bin)"
    cargo install mdbook --version "$MDBOOK_VERSION" --locked --no-default-features --features search
  fi
  # scripts/markdownlint.sh runs it from here.
  mdl_dir="${XDG_CACHE_HOME:-$HOME/.cache}/walship/markdownlint-cli2"
  mdl_pkg="$mdl_dir/node_modules/markdownlint-cli2/package.json"
  if [ -f "$mdl_pkg" ] && [ "$(node -p "require('$mdl_pkg').version" 2>/dev/null)" = "$MARKDOWNLINT_CLI2_VERSION" ]; then
    log "markdownlint-cli2 $MARKDOWNLINT_CLI2_VERSION present: $mdl_dir"
  else
    log "installing markdownlint-cli2 $MARKDOWNLINT_CLI2_VERSION (npm, into $mdl_dir)"
    mkdir -p "$mdl_dir"
    npm install --prefix "$mdl_dir" --no-audit --no-fund --loglevel=error \
      "markdownlint-cli2@$MARKDOWNLINT_CLI2_VERSION" >/dev/null
  fi
fi
# --- operator-side tools -------------------------------------------------------------------------
# Prometheus and promtool (the alert rules' unit tests, the dashboard queries against a real
# server) and kubernetes-validate (the manifests), each fetched once into a cache behind a
# version check: see scripts/operator-tools.sh.
# A failure here is reported and fails the tests that need the tool, not the setup.
tools="$(dirname "$0")/operator-tools.sh"
for tool in prometheus kubernetes-validate; do
  if where="$("$tools" "$tool")"; then log "$tool: $where"; else log "warning: could not fetch $tool (above)"; fi
done
log "ready"

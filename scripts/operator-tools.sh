#!/usr/bin/env bash
# Fetches the tools the operator-side tests use into a cache, once, and prints where they are.
# Safe to run again: a tool whose cached copy reports the pinned version is not fetched again.
#
#   scripts/operator-tools.sh prometheus           -> a directory holding prometheus and promtool
#   scripts/operator-tools.sh kubernetes-validate  -> a PYTHONPATH for python3 -m kubernetes_validate
#
# prometheus: Debian's `prometheus` package (Prometheus and promtool 2.42), downloaded with
#   `apt-get download` and unpacked with `dpkg -x` rather than installed, so no service is
#   enabled or started and none of the web UI's packages come along (both binaries need only
#   libc). The tests start their own server on a free port.
# kubernetes-validate: the pinned release from PyPI, `pip install --target` into the cache (no
#   virtualenv, nothing in the system's Python).
#
# Cache: $WALSHIP_TOOLS_CACHE, else /var/cache/walship/tools as root, else
# ${XDG_CACHE_HOME:-~/.cache}/walship/tools. Progress goes to stderr; stdout is only the path.
set -euo pipefail

# Pinned versions; bump here.
PROMETHEUS_VERSION="2.42.0"
KUBERNETES_VALIDATE_VERSION="1.37.0"

die() { printf 'operator-tools.sh: error: %s\n' "$*" >&2; exit 1; }
log() { printf '[operator-tools.sh] %s\n' "$*" >&2; }

[ $# -eq 1 ] || die "usage: scripts/operator-tools.sh prometheus|kubernetes-validate"

if [ -n "${WALSHIP_TOOLS_CACHE:-}" ]; then
  cache="$WALSHIP_TOOLS_CACHE"
elif [ "$(id -u)" -eq 0 ]; then
  cache=/var/cache/walship/tools
else
  cache="${XDG_CACHE_HOME:-$HOME/.cache}/walship/tools"
fi
mkdir -p "$cache"
exec 9>"$cache/.lock"
flock 9

sudo_if_needed() {
  if [ "$(id -u)" -eq 0 ]; then "$@"; elif command -v sudo >/dev/null; then sudo "$@"; else
    die "need root to run: $*"; fi
}

case "$1" in
  prometheus)
    dest="$cache/prometheus-$PROMETHEUS_VERSION"
    bin="$dest/usr/bin"
    ok() { [ -x "$bin/prometheus" ] && [ -x "$bin/promtool" ] &&
      "$bin/promtool" --version 2>&1 | grep -q "version $PROMETHEUS_VERSION" &&
      "$bin/prometheus" --version 2>&1 | grep -q "version $PROMETHEUS_VERSION"; }
    if ! ok; then
      tmp="$(mktemp -d "$cache/.fetch-prometheus.XXXXXX")"
      trap 'rm -rf "$tmp"' EXIT
      log "downloading Debian's prometheus package (wanted: $PROMETHEUS_VERSION)"
      if ! (cd "$tmp" && apt-get download prometheus >"$tmp/apt.log" 2>&1); then
        # The package lists may be missing on a fresh machine.
        sudo_if_needed apt-get update -qq >&2
        (cd "$tmp" && apt-get download prometheus >"$tmp/apt.log" 2>&1) ||
          { cat "$tmp/apt.log" >&2; die "apt-get download prometheus failed"; }
      fi
      deb="$(ls "$tmp"/prometheus_*.deb 2>/dev/null | head -n1)"
      [ -n "$deb" ] || die "apt-get download left no prometheus_*.deb in $tmp"
      rm -rf "$dest"
      dpkg -x "$deb" "$dest" || die "could not unpack $deb"
      ok || die "$bin/promtool and $bin/prometheus do not report version $PROMETHEUS_VERSION: \
$("$bin/promtool" --version 2>&1 | head -n1) (Debian 12's package is $PROMETHEUS_VERSION; bump PROMETHEUS_VERSION if yours differs)"
      log "Prometheus $PROMETHEUS_VERSION ready in $bin"
    fi
    echo "$bin"
    ;;
  kubernetes-validate)
    dest="$cache/kubernetes-validate-$KUBERNETES_VALIDATE_VERSION"
    ok() { PYTHONPATH="$dest" python3 -m kubernetes_validate --version 2>&1 |
      grep -q "$KUBERNETES_VALIDATE_VERSION"; }
    if ! ok; then
      python3 -m pip --version >/dev/null 2>&1 ||
        die "pip is missing (python3 -m pip): run scripts/setup.sh (installs python3-pip)"
      log "installing kubernetes-validate==$KUBERNETES_VALIDATE_VERSION from PyPI into $dest"
      rm -rf "$dest"
      python3 -m pip install --quiet --disable-pip-version-check --no-cache-dir --target "$dest" \
        "kubernetes-validate==$KUBERNETES_VALIDATE_VERSION" >&2 ||
        die "could not install kubernetes-validate==$KUBERNETES_VALIDATE_VERSION"
      ok || die "kubernetes-validate in $dest does not report version $KUBERNETES_VALIDATE_VERSION"
    fi
    echo "$dest"
    ;;
  *) die "unknown tool '$1': prometheus or kubernetes-validate" ;;
esac

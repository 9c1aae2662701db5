#!/usr/bin/env bash
# The whole test suite, from a fresh machine: installs prerequisites, then formatting, lints,
# unit tests, the end-to-end tests against a real PostgreSQL (Debian's 15) and a real broker
# (tansu), the operator's side (alert rules under promtool, the Kubernetes manifests, the
# dashboard's queries against a real Prometheus, a least-privilege role, every compression
# codec), the PostgreSQL-facing end-to-end suites again on PostgreSQL 16, 17 and 18, the
# documentation checks (Markdown lint, links, the book's build, the README's quick start), and the
# demo (scripts/demo.sh) with each of its brokers.
#
#   scripts/test.sh
#
# Environment:
#   WALSHIP_TEST_PG_URL   use an external PostgreSQL (superuser URL, no database) instead of a
#                         private cluster started from /usr/lib/postgresql/*/bin; skips the
#                         version matrix (it would test that server again)
#   WALSHIP_TEST_PG_BIN   the server binaries of the first (full) run; default Debian's 15
#   WALSHIP_PG_MATRIX     the versions the matrix runs (default "16 17 18"; "" skips it); each is
#                         fetched once by scripts/postgres.sh
#   WALSHIP_TEST_KAFKA    use an external broker (host:port) instead of a private tansu
#   WALSHIP_LONG_TESTS=1  also run the long reliability variants
set -euo pipefail
cd "$(dirname "$0")/.."

if [ -n "${WALSHIP_TEST_KAFKA:-}" ]; then scripts/setup.sh --no-broker; else scripts/setup.sh; fi
export PATH="$HOME/.cargo/bin:$PATH"
# The operator-side tools, cached by setup.sh (this only prints where they are). A tool that
# cannot be had fails its steps below, not the whole run.
prometheus_bin="$(scripts/operator-tools.sh prometheus)" || prometheus_bin=""
[ -z "$prometheus_bin" ] || export WALSHIP_TEST_PROMETHEUS="$prometheus_bin/prometheus"
kubernetes_validate="$(scripts/operator-tools.sh kubernetes-validate)" || kubernetes_validate=""

# A failed run keeps its PostgreSQL data directories and broker logs for inspection (the
# harness says where); forget those of runs more than a day old.
find "${TMPDIR:-/tmp}" -maxdepth 1 -name 'walship-test-*' -mmin +1440 -exec rm -rf {} + 2>/dev/null || true

# Seconds per step, printed as each step ends and again in the closing summary.
step_name=""
step_started=$SECONDS
steps=()
step() { # the next step's name; ends the one before
  if [ -n "$step_name" ]; then
    steps+=("$(printf '%5d s  %s' $((SECONDS - step_started)) "$step_name")")
    echo "-- $step_name: $((SECONDS - step_started)) s"
  fi
  step_name="$1"
  step_started=$SECONDS
  [ -n "$step_name" ] && echo "== $step_name"
  return 0
}
steps+=("$(printf '%5d s  %s' "$SECONDS" "setup (prerequisites)")")

step "cargo fmt --check"
cargo fmt --all -- --check

# A check that is not a cargo test (the documentation's, the operator-side tools'): each counts
# as one test in the closing line, and a failure fails the run at the end like any other.
checks_passed=0
checks_failed=0
check() { # label, then the command
  local label="$1"
  shift
  if "$@"; then
    checks_passed=$((checks_passed + 1))
    echo "$label: ok"
  else
    checks_failed=$((checks_failed + 1))
    echo "$label: FAILED"
  fi
}
step "docs: markdownlint"
check "markdownlint" scripts/markdownlint.sh
step "docs: links"
check "links" scripts/check_links.py
# mdBook reports a missing chapter as an error but a missing {{#include}} only in its log, with
# exit code 0: any ERROR or WARN line fails the step.
mdbook_build() {
  local out
  out="$(mdbook build docs 2>&1)" || { echo "$out"; return 1; }
  echo "$out"
  ! grep -Eq '(^| )(ERROR|WARN) ' <<<"$out"
}
step "docs: mdbook build"
check "mdbook build" mdbook_build
step "cargo clippy"
cargo clippy --workspace --all-targets --locked -- -D warnings
log="$(mktemp)"
trap 'rm -f "$log"' EXIT
# A failing step does not stop the run: every test is run and counted in the closing line, and
# the run fails at the end. A cargo test that fails without a failing test (a build error)
# counts as one failed test.
failed_runs=0
cargo_test() { # label, then cargo test's arguments
  local label="$1" part
  shift
  part="$(mktemp)"
  if cargo test "$@" 2>&1 | tee "$part"; then
    cat "$part" >>"$log"
  else
    cat "$part" >>"$log"
    if ! grep -Eq '^test result: FAILED' "$part"; then
      echo "$label: cargo test failed without a failing test (see above)"
      failed_runs=$((failed_runs + 1))
    fi
    echo "$label: FAILED"
    run_failed=1
  fi
  rm -f "$part"
}
run_failed=0
step "doc tests"
cargo_test "doc tests" --workspace --doc --locked
# The end-to-end suites run here on PostgreSQL 15. handover::, ownership:: and cutoff:: run on
# 15 only: what they test (the hand-over between walship processes, which process owns a
# pipeline) is decided by walship and the broker, and the slot they rely on behaves alike on every
# version. So do the operator-side suites: monitoring:: (the dashboard's queries and the alert
# rules read walship's metrics), codecs:: (librdkafka's and the broker's) and privilege:: (what
# every version from 15 on does alike: no CREATE on public for PUBLIC, pg_logical_emit_message's
# grants, which it reads per server). So does inbox:: (the consumer-side library: its SQL is the
# same on every version, and the walship behaviour it relies on is tested across versions above).
step "cargo test (unit + end-to-end, PostgreSQL 15)"
cargo_test "cargo test" --workspace --all-targets --locked --no-fail-fast

# The operator's side with its own tools.
step "alert rules (promtool check rules, promtool test rules)"
check "alert rules" bash -c '[ -n "$1" ] || { echo "no promtool (scripts/operator-tools.sh prometheus failed)"; exit 1; }
  "$1/promtool" check rules deploy/prometheus/walship-alerts.yml &&
  (cd deploy/prometheus && "$1/promtool" test rules walship-alerts.test.yml)' _ "$prometheus_bin"
step "Kubernetes manifests (kubernetes-validate --strict, static checks)"
check "Kubernetes manifests" bash -c '[ -n "$1" ] || { echo "no kubernetes-validate (scripts/operator-tools.sh kubernetes-validate failed)"; exit 1; }
  PYTHONPATH="$1" python3 deploy/kubernetes/check_manifests.py' _ "$kubernetes_validate"
# The version matrix: the end-to-end suites that depend on the server (relay, reliability with
# the kill and crash tests, resume, check, the decoder's golden captures, partitions, the SQL kit,
# logical-message outbox, TLS, failover slots, which need 17 and say they are skipped on 15 and
# 16, and least privilege: pg_logical_emit_message's signature changed in 17) again on each newer
# PostgreSQL, with its server binaries (scripts/postgres.sh fetches the
# pinned build once) and Debian 15's client tools. cli, metrics and faults do not depend on the
# server's version and run on 15 only.
matrix_suites=(relay:: reliability:: resume:: check:: pgoutput_golden:: partitions:: messages:: sql:: tls:: failover_slots:: privilege::)
if [ -n "${WALSHIP_TEST_PG_URL:-}" ]; then
  echo "== PostgreSQL version matrix: skipped (WALSHIP_TEST_PG_URL points the tests at one server)"
else
  for version in ${WALSHIP_PG_MATRIX-16 17 18}; do
    step "end-to-end tests on PostgreSQL $version"
    started=$SECONDS
    if ! bin="$(scripts/postgres.sh "$version")"; then
      echo "PostgreSQL $version: FAILED: could not fetch its server binaries (see above)"
      failed_runs=$((failed_runs + 1))
      run_failed=1
      continue
    fi
    WALSHIP_TEST_PG_BIN="$bin" cargo_test "PostgreSQL $version" --locked --test e2e -- "${matrix_suites[@]}"
    echo "PostgreSQL $version: done in $((SECONDS - started)) s"
  done
fi

# The README's quick start, step by step, against a private PostgreSQL and tansu (on the dev
# build cargo test made).
step "docs: quick start"
if ! command -v tansu >/dev/null; then
  echo "skipped: tansu is not installed (WALSHIP_TEST_KAFKA set); run scripts/setup.sh to install it"
else
  check "quick start" scripts/quickstart.sh
fi

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
  step "demo (WALSHIP_DEMO_BROKER=$broker)"
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

step ""
echo "== seconds per step (total $SECONDS s)"
printf '%s\n' "${steps[@]}"

# One closing line over every test binary (cargo prints one "test result" line per binary), the
# documentation checks, the tool checks and the demo runs (one test each), the matrix's versions
# that could not be fetched and the cargo runs that failed without a failing test (one each).
awk -v dp="$((demo_passed + checks_passed))" \
  -v df="$((demo_failed + checks_failed + failed_runs))" \
  '/^test result:/ { for (i = 1; i <= NF; i++) { if ($(i+1) ~ /^passed/) p += $i; if ($(i+1) ~ /^failed/) f += $i } }
   END { printf "tests: %d passed, %d failed\n", p + dp, f + df }' "$log"
[ "$demo_failed" -eq 0 ] && [ "$checks_failed" -eq 0 ] && [ "$run_failed" -eq 0 ]

#!/usr/bin/env bash
# Runs the README's quick start as a reader would, against a private PostgreSQL and tansu broker,
# and fails unless every step works and the events arrive. A step of scripts/test.sh.
#
#   scripts/quickstart.sh
#
# The README marks the blocks to run with an HTML comment on the line before the fence:
#   <!-- quickstart: run -->                          run the block with bash
#   <!-- quickstart: run, then restart PostgreSQL --> run it, then restart the server (the README
#                                                     leaves the restart to the reader)
#   <!-- quickstart: run, expect "TEXT" -->           run it; its output must contain TEXT
#   <!-- quickstart: file NAME -->                    write the block to NAME
#   <!-- quickstart: background, wait for "TEXT" -->  start it in the background and wait until
#                                                     its output contains TEXT; at the end it gets
#                                                     SIGTERM and must exit 0
# Blocks run in order in .walship-quickstart/ (kept for inspection; its logs name each step),
# with walship from the dev build first on PATH. The reader's own servers are a private
# PostgreSQL (Debian's 15, or WALSHIP_TEST_PG_BIN; wal_level left at replica, TCP with a
# scram-sha-256 password) and a tansu broker on free ports: PGURL and KAFKA point at them, and
# WALSHIP_POSTGRES__URL / WALSHIP_KAFKA__BROKERS point the README's walship.toml (localhost:5432,
# localhost:9092) at them. Not run: cargo install (the dev build stands in), Docker, and
# kafka-console-consumer.sh (no Kafka distribution here; the README's tail example reads the
# topic instead).
#
# Environment: CARGO_TARGET_DIR is honoured, like cargo's build.target-dir.
set -euo pipefail
cd "$(dirname "$0")/.."
root="$(pwd)"
export PATH="$HOME/.cargo/bin:$PATH"
started=$SECONDS
say() { printf '[quickstart %3d s] %s\n' $((SECONDS - started)) "$*"; }

say "building walship and the tail example (dev profile)"
cargo build --quiet --locked -p walship --bin walship --example tail
target_dir="$(cargo metadata --format-version 1 --no-deps --locked |
  python3 -c 'import json, sys; print(json.load(sys.stdin)["target_directory"])')"
export PATH="$target_dir/debug:$PATH"

work="$root/.walship-quickstart"
rm -rf "$work"
mkdir -p "$work/steps"

# The steps, in README order: steps/NN.kind (run | restart | expect | file | background), with
# steps/NN.arg (the expected text, file name or text to wait for) and steps/NN.body.
python3 - "$root/README.md" "$work/steps" <<'PY'
import re, sys
readme, out = open(sys.argv[1], encoding="utf-8").read().splitlines(), sys.argv[2]
marker = re.compile(r'^<!-- quickstart: (.*) -->$')
n = 0
i = 0
while i < len(readme):
    m = marker.match(readme[i])
    i += 1
    if not m:
        continue
    spec = m.group(1).strip()
    if not readme[i].startswith("```"):
        sys.exit(f"README line {i}: a quickstart marker must be followed by a fence")
    body = []
    i += 1
    while not readme[i].startswith("```"):
        body.append(readme[i])
        i += 1
    kinds = [
        (r"run", "run", ""),
        (r"run, then restart PostgreSQL", "restart", ""),
        (r'run, expect "(.+)"', "expect", None),
        (r"file (\S+)", "file", None),
        (r'background, wait for "(.+)"', "background", None),
    ]
    for pattern, kind, arg in kinds:
        k = re.fullmatch(pattern, spec)
        if k:
            n += 1
            base = f"{out}/{n:02d}"
            open(f"{base}.kind", "w").write(kind)
            open(f"{base}.arg", "w").write(arg if arg is not None else k.group(1))
            open(f"{base}.body", "w").write("\n".join(body) + "\n")
            break
    else:
        sys.exit(f"README line {i}: unknown quickstart marker {spec!r}")
if n == 0:
    sys.exit("the README has no quickstart blocks")
PY

# --- the reader's own servers ---------------------------------------------------------------------
free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
pg_bin="${WALSHIP_TEST_PG_BIN:-/usr/lib/postgresql/15/bin}"
# Outside the checkout: initdb runs as the postgres user, which may not reach /root.
pgdir="$(mktemp -d "${TMPDIR:-/tmp}/walship-quickstart-pg.XXXXXX")"
as_pg=()
if [ "$(id -u)" -eq 0 ]; then chown postgres "$pgdir"; as_pg=(runuser -u postgres --); fi
pids=()
background=()
cleanup() {
  set +e
  for p in "${background[@]}" "${pids[@]}"; do kill -TERM "$p" 2>/dev/null; done
  for p in "${background[@]}" "${pids[@]}"; do wait "$p" 2>/dev/null; done
  "${as_pg[@]}" "$pg_bin/pg_ctl" stop -D "$pgdir/pg" -m fast >/dev/null 2>&1
  cp -f "$pgdir/postgres.log" "$work/postgres.log" 2>/dev/null
  rm -rf "$pgdir"
}
trap cleanup EXIT

pg_port="$(free_port)"
admin_password="quickstart-admin"
printf '%s\n' "$admin_password" >"$pgdir/pwfile"
chmod 644 "$pgdir/pwfile"
say "starting PostgreSQL on 127.0.0.1:$pg_port (wal_level left at its default)"
"${as_pg[@]}" "$pg_bin/initdb" -D "$pgdir/pg" -U postgres --pwfile="$pgdir/pwfile" \
  --auth-local=trust --auth-host=scram-sha-256 -E UTF8 --locale=C >/dev/null
pg_ctl_() { "${as_pg[@]}" "$pg_bin/pg_ctl" -D "$pgdir/pg" -l "$pgdir/postgres.log" \
  -o "-p $pg_port -k $pgdir -c listen_addresses=127.0.0.1" "$@" >/dev/null; }
pg_ctl_ start -w
psql -q -h "$pgdir" -p "$pg_port" -U postgres -d postgres -c "CREATE DATABASE app"

kafka_port="$(free_port)"
say "starting the tansu broker on 127.0.0.1:$kafka_port"
tansu broker --listener-url "tcp://127.0.0.1:$kafka_port" \
  --advertised-listener-url "tcp://127.0.0.1:$kafka_port" --storage-engine memory://tansu/ \
  >"$work/broker.log" 2>&1 &
pids+=($!)
up=0
for _ in $(seq 100); do (exec 3<>"/dev/tcp/127.0.0.1/$kafka_port") 2>/dev/null && { up=1; break; }; sleep 0.1; done
[ "$up" = 1 ] || { cat "$work/broker.log"; say "tansu did not listen within 10 s"; exit 1; }

export PGURL="postgres://postgres:$admin_password@127.0.0.1:$pg_port/app"
export KAFKA="127.0.0.1:$kafka_port"
export WALSHIP_POSTGRES__URL="postgres://walship@127.0.0.1:$pg_port/app"
export WALSHIP_KAFKA__BROKERS="$KAFKA"
# Steps export variables for later steps (the README's WALSHIP_PG_PASSWORD): they share one file.
env_file="$work/steps/env"
: >"$env_file"

# --- the README's steps ---------------------------------------------------------------------------
cd "$work"
run_block() { # body file, log file
  # The block's exports reach the next blocks through env_file.
  timeout 300 bash -c 'set -euo pipefail; source "$1"; source "$2"; export -p >"$1"' _ "$env_file" "$1" >"$2" 2>&1
}
fail() { say "FAILED: $*"; exit 1; }
for kind_file in "$work"/steps/*.kind; do
  step="${kind_file%.kind}"
  name="$(basename "$step")"
  kind="$(cat "$kind_file")"
  arg="$(cat "$step.arg")"
  body="$step.body"
  log="$step.log"
  say "step $name ($kind): $(head -n1 "$body")"
  case "$kind" in
    run | restart | expect)
      if ! run_block "$body" "$log"; then cat "$log"; fail "step $name exited non-zero"; fi
      cat "$log"
      if [ "$kind" = restart ]; then
        say "restarting PostgreSQL"
        pg_ctl_ restart -w -m fast
      fi
      if [ "$kind" = expect ] && ! grep -qF -- "$arg" "$log"; then fail "step $name: no \"$arg\" in its output"; fi
      ;;
    file)
      cp "$body" "$work/$arg"
      ;;
    background)
      # Not through bash -c: the program itself must get the SIGTERM at the end.
      # shellcheck disable=SC1090
      (set -a; source "$env_file"; set +a; exec $(cat "$body")) >"$log" 2>&1 &
      background+=($!)
      ok=0
      for _ in $(seq 600); do
        grep -qF -- "$arg" "$log" && { ok=1; break; }
        kill -0 "${background[-1]}" 2>/dev/null || break
        sleep 0.1
      done
      [ "$ok" = 1 ] || { cat "$log"; fail "step $name: no \"$arg\" in its output within 60 s"; }
      say "step $name: \"$arg\" seen"
      ;;
  esac
done

# What ran in the background stops the way the README says (Ctrl-C or SIGTERM) and exits 0.
for p in "${background[@]}"; do
  kill -TERM "$p"
  rc=0
  wait "$p" || rc=$?
  [ "$rc" -eq 0 ] || { tail -n 20 "$work"/steps/*.log; fail "a background step exited $rc after SIGTERM"; }
done
background=()
say "quick start passed: every step ran and the events arrived"

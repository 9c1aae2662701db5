#!/usr/bin/env bash
# The demo, from a fresh machine: installs what is missing, starts a private PostgreSQL and a
# broker, runs walship, writes outbox events for a few aggregates and prints them consumed in
# order. Everything runs under .walship-demo/ and is stopped on exit.
#
#   scripts/demo.sh                       broker: tansu if installed, else librdkafka's mock cluster
#   WALSHIP_DEMO_BROKER=tansu scripts/demo.sh   build/use the tansu broker (first build 10-25 min)
#   WALSHIP_DEMO_BROKER=mock scripts/demo.sh    always use the mock cluster (starts in seconds)
#
# Environment:
#   WALSHIP_DEMO_PROFILE   the cargo profile to build and run (default release; the test command
#                          uses dev, mostly built by its cargo test already)
#   CARGO_TARGET_DIR       honoured, like cargo's build.target-dir
set -euo pipefail
cd "$(dirname "$0")/.."
root="$(pwd)"
export PATH="$HOME/.cargo/bin:$PATH"

mode="${WALSHIP_DEMO_BROKER:-auto}"
case "$mode" in
  auto) if command -v tansu >/dev/null; then mode=tansu; else mode=mock; fi ;;
  tansu | mock) ;;
  *) echo "[demo] WALSHIP_DEMO_BROKER must be tansu, mock or auto, not '$mode'" >&2; exit 2 ;;
esac
# The demo needs no documentation tools (mdBook, markdownlint-cli2): --no-docs.
if [ "$mode" = tansu ]; then scripts/setup.sh --no-docs; else scripts/setup.sh --no-broker --no-docs; fi

profile="${WALSHIP_DEMO_PROFILE:-release}"
echo "[demo] building walship (profile $profile) ..."
cargo build --profile "$profile" --locked -p walship --bin walship --example demo_events --example mock_broker 2>&1 | tail -n 2
# Where cargo put them: CARGO_TARGET_DIR or build.target-dir if set, in a directory named after the
# profile (dev and test build into debug, bench into release).
target_dir="$(cargo metadata --format-version 1 --no-deps --locked |
  python3 -c 'import json, sys; print(json.load(sys.stdin)["target_directory"])')"
case "$profile" in dev | test) bin="$target_dir/debug" ;; bench) bin="$target_dir/release" ;; *) bin="$target_dir/$profile" ;; esac

demo="$root/.walship-demo"
rm -rf "$demo"; mkdir -p "$demo"
# PostgreSQL's data directory and socket live in a private temporary directory: initdb runs as
# the postgres user, which may not be able to reach a checkout under /root, and a deep checkout
# path would make the socket path too long. Its log is copied into .walship-demo/ at exit.
pgdir="$(mktemp -d "${TMPDIR:-/tmp}/walship-demo-pg.XXXXXX")"
free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
pg_bin="$(ls -d /usr/lib/postgresql/*/bin | sort -V | tail -n1)"
as_pg=()
if [ "$(id -u)" -eq 0 ]; then chown postgres "$pgdir"; as_pg=(runuser -u postgres --); fi

pids=()
cleanup() {
  set +e
  for p in "${pids[@]}"; do kill -TERM "$p" 2>/dev/null; done
  for p in "${pids[@]}"; do wait "$p" 2>/dev/null; done
  "${as_pg[@]}" "$pg_bin/pg_ctl" stop -D "$pgdir/pg" -m fast >/dev/null 2>&1
  cp -f "$pgdir/postgres.log" "$demo/postgres.log" 2>/dev/null
  rm -rf "$pgdir"
}
trap cleanup EXIT

pg_port="$(free_port)"
echo "[demo] starting PostgreSQL on 127.0.0.1:$pg_port (wal_level=logical)"
"${as_pg[@]}" "$pg_bin/initdb" -D "$pgdir/pg" -U postgres --auth=trust -E UTF8 --locale=C >/dev/null
"${as_pg[@]}" "$pg_bin/pg_ctl" start -w -D "$pgdir/pg" -l "$pgdir/postgres.log" \
  -o "-p $pg_port -k $pgdir -c listen_addresses=127.0.0.1 -c wal_level=logical" >/dev/null
psql_() { psql -q -h 127.0.0.1 -p "$pg_port" -U postgres "$@"; }
psql_ -d postgres -c "CREATE DATABASE demo"
psql_ -d demo -f sql/outbox.sql

if [ "$mode" = tansu ]; then
  kafka_port="$(free_port)"
  bootstrap="127.0.0.1:$kafka_port"
  echo "[demo] starting the tansu broker on $bootstrap"
  tansu broker --listener-url "tcp://$bootstrap" --advertised-listener-url "tcp://$bootstrap" \
    --storage-engine memory://tansu/ >"$demo/broker.log" 2>&1 &
  pids+=($!)
  up=0
  for _ in $(seq 100); do (exec 3<>"/dev/tcp/127.0.0.1/$kafka_port") 2>/dev/null && { up=1; break; }; sleep 0.1; done
  [ "$up" = 1 ] || { cat "$demo/broker.log"; echo "[demo] tansu did not listen within 10 s" >&2; exit 1; }
else
  # The mock cluster cannot create topics through the Admin API, and walship does not let its
  # metadata requests auto-create them: the broker starts with the topics of demo_events's
  # aggregate types (outbox.event.<aggregatetype>), with the topic_partitions walship.toml sets.
  echo "[demo] starting librdkafka's mock Kafka cluster (set WALSHIP_DEMO_BROKER=tansu for a real broker)"
  "$bin/examples/mock_broker" 1 outbox.event.order:3 outbox.event.customer:3 \
    >"$demo/broker.addr" 2>"$demo/broker.log" &
  pids+=($!)
  for _ in $(seq 100); do [ -s "$demo/broker.addr" ] && break; sleep 0.1; done
  bootstrap="$(head -n1 "$demo/broker.addr")"
  [ -n "$bootstrap" ] || { cat "$demo/broker.log"; echo "[demo] the mock cluster did not start within 10 s" >&2; exit 1; }
fi

cat >"$demo/walship.toml" <<TOML
[postgres]
url = "postgres://postgres@127.0.0.1:$pg_port/demo"

[kafka]
brokers = "$bootstrap"
topic_partitions = 3
TOML
echo "[demo] starting walship (log: .walship-demo/walship.log)"
"$bin/walship" run --config "$demo/walship.toml" >"$demo/walship.log" 2>&1 &
walship_pid=$!
pids=("$walship_pid" "${pids[@]}")
active=0
for _ in $(seq 300); do
  active="$(psql_ -d demo -tAc "SELECT count(*) FROM pg_replication_slots WHERE slot_name='walship' AND active")"
  [ "$active" = 1 ] && break
  kill -0 "$walship_pid" 2>/dev/null || { cat "$demo/walship.log"; echo "[demo] walship exited" >&2; exit 1; }
  sleep 0.1
done
[ "$active" = 1 ] || { cat "$demo/walship.log"; echo "[demo] walship did not start streaming within 30 s" >&2; exit 1; }

# Exits non-zero unless every event arrives once, in commit order per aggregate, within 60 s.
if ! "$bin/examples/demo_events" "postgres://postgres@127.0.0.1:$pg_port/demo" "$bootstrap"; then
  echo "[demo] FAILED; walship's log (.walship-demo/walship.log) ends:" >&2
  tail -n 20 "$demo/walship.log" >&2
  exit 1
fi
echo "[demo] slot position: $(psql_ -d demo -tAc "SELECT confirmed_flush_lsn FROM pg_replication_slots WHERE slot_name='walship'")"

#!/usr/bin/env python3
"""End-to-end benchmark: walship against a real PostgreSQL and a real broker (tansu).

    scripts/bench_e2e.py drain [--events 1000000] [--messages]   # backlog drain: walship vs pg_recvlogical
    scripts/bench_e2e.py live  [--rate 5000 --seconds 30]   # commit -> ack latency at a fixed rate

drain: writes N single-row outbox transactions (~150-byte jsonb payload, 5,000 aggregates) while
two identical pgoutput slots hold them, then times walship draining its slot into Kafka until the
slot confirms the end, and pg_recvlogical reading the other slot to a file (--endpos). Reports
events/s for both, the ratio, walship's CPU seconds and peak RSS, and the CPU seconds of the
walsender and the broker over the same interval (the three share the machine's cores). Clients
connect over loopback TCP, or with --unix over PostgreSQL's Unix socket. walship's settings can
be changed through its environment overrides, e.g. WALSHIP_POSTGRES__READ_BATCHING=off.

live: walship streams while pgbench writes single-row transactions at a fixed rate; latency is
walship's own commit->ack measurement (Kafka acknowledgement minus the commit timestamp that
pgoutput carries), read from its metrics endpoint.

Everything runs in .walship-bench/ under private servers on free ports; nothing is left running.
Build first: cargo build --release -p walship.
"""
import argparse
import glob
import json
import os
import pwd
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
WORK = os.path.join(ROOT, ".walship-bench")
PG_BIN = sorted(glob.glob("/usr/lib/postgresql/*/bin"), key=lambda p: int(p.split("/")[-2]))[-1]
# WALSHIP_BENCH_BIN: another walship binary (e.g. an older commit's) to compare in the same way.
WALSHIP = os.environ.get("WALSHIP_BENCH_BIN") or os.path.join(ROOT, "target", "release", "walship")
TANSU = shutil.which("tansu") or os.path.expanduser("~/.cargo/bin/tansu")
MAX_SLOTS = 10  # scripts/bench_pipelines.py raises it for 16 pipelines
UNIX_SOCKET = False  # --unix: walship and pg_recvlogical reach PostgreSQL over its Unix socket


def free_port():
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    return port


def as_postgres():
    if os.geteuid() != 0:
        return {}
    pw = pwd.getpwnam("postgres")
    return {"user": pw.pw_uid, "group": pw.pw_gid}


def wait_port(port, what, timeout=30):
    deadline = time.time() + timeout
    while time.time() < deadline:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return
        except OSError:
            time.sleep(0.05)
    sys.exit(f"{what} did not open port {port}")


class Servers:
    def __init__(self):
        shutil.rmtree(WORK, ignore_errors=True)
        os.makedirs(WORK)
        if os.geteuid() == 0:
            shutil.chown(WORK, "postgres", "postgres")
        self.pg_port = free_port()
        self.kafka_port = free_port()
        self.data = os.path.join(WORK, "pg")
        self.procs = []
        subprocess.run([f"{PG_BIN}/initdb", "-D", self.data, "-U", "postgres", "--auth=trust", "--no-sync",
                        "-E", "UTF8", "--locale=C"], check=True, stdout=subprocess.DEVNULL, **as_postgres())
        opts = " ".join(f"-c {s}" for s in [
            "listen_addresses=127.0.0.1", "wal_level=logical", "max_wal_size=8GB", "checkpoint_timeout=30min",
            "shared_buffers=512MB", f"max_replication_slots={MAX_SLOTS}", f"max_wal_senders={MAX_SLOTS}"
        ])
        subprocess.run([f"{PG_BIN}/pg_ctl", "start", "-w", "-D", self.data, "-l", os.path.join(WORK, "postgres.log"),
                        "-o", f"-p {self.pg_port} -k {WORK} {opts}"], check=True, stdout=subprocess.DEVNULL,
                       **as_postgres())
        url = f"tcp://127.0.0.1:{self.kafka_port}"
        self.broker = subprocess.Popen([TANSU, "broker", "--listener-url", url, "--advertised-listener-url", url,
                                        "--storage-engine", "memory://tansu/"],
                                       stdout=subprocess.DEVNULL, stderr=open(os.path.join(WORK, "broker.log"), "w"))
        self.procs.append(self.broker)
        wait_port(self.kafka_port, "tansu")
        self.psql("postgres", "CREATE DATABASE bench")
        self.psql("bench", open(os.path.join(ROOT, "sql", "outbox.sql")).read())

    def psql(self, db, sql):
        out = subprocess.run(["psql", "-q", "-X", "-tA", "-v", "ON_ERROR_STOP=1", "-h", "127.0.0.1",
                              "-p", str(self.pg_port), "-U", "postgres", "-d", db, "-c", sql],
                             check=True, capture_output=True, text=True)
        return out.stdout.strip()

    def url(self):
        if UNIX_SOCKET:
            return f"host={WORK} port={self.pg_port} user=postgres dbname=bench"
        return f"postgres://postgres@127.0.0.1:{self.pg_port}/bench"

    def client_host(self):
        """Where the measured clients (walship, pg_recvlogical) connect: TCP or the socket dir."""
        return WORK if UNIX_SOCKET else "127.0.0.1"

    def stop(self):
        poller = _pollers.pop(id(self), None)
        if poller:
            poller.close()
        for p in self.procs:
            p.kill()
            p.wait()
        subprocess.run([f"{PG_BIN}/pg_ctl", "stop", "-D", self.data, "-m", "immediate"],
                       stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, **as_postgres())


INSERT_SQL = """\\set agg random(1, 5000)
INSERT INTO outbox (aggregatetype, aggregateid, type, payload) VALUES ('order', 'agg-' || :agg, 'OrderUpdated', jsonb_build_object('order', :agg, 'client', :client_id, 'note', repeat('x', 96), 'at', now()));
"""


# The same events as transactional logical messages (walship's table-free outbox).
MESSAGE_SQL = """\\set agg random(1, 5000)
SELECT pg_logical_emit_message(true, 'outbox', jsonb_build_object('id', gen_random_uuid(), 'aggregatetype', 'order', 'aggregateid', 'agg-' || :agg, 'type', 'OrderUpdated', 'payload', jsonb_build_object('order', :agg, 'client', :client_id, 'note', repeat('x', 96), 'at', now()))::text);
"""


def pgbench(s, args, env=None, sql=INSERT_SQL):
    script = os.path.join(WORK, "insert.sql")
    with open(script, "w") as f:
        f.write(sql)
    subprocess.run(["pgbench", "-n", "-h", "127.0.0.1", "-p", str(s.pg_port), "-U", "postgres", "-f", script]
                   + args + ["bench"], check=True, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                   env={**os.environ, **(env or {})})


def walship_config(s, slot, metrics_port=None, extra=""):
    path = os.path.join(WORK, f"walship-{slot}.toml")
    with open(path, "w") as f:
        f.write(f"""[postgres]
url = "{s.url()}"
slot = "{slot}"
publication = "walship_outbox"

[kafka]
brokers = "127.0.0.1:{s.kafka_port}"
topic_partitions = 6
""")
        if metrics_port:
            f.write(f"\n[metrics]\nlisten = \"127.0.0.1:{metrics_port}\"\n")
        f.write(extra)
    return path


class Poller:
    """One long-lived psql session for polling the slot: spawning psql (and a backend) per poll
    would compete with the walsender for CPU and slow down whatever is being measured."""

    def __init__(self, s):
        self.p = subprocess.Popen(["psql", "-q", "-X", "-tA", "-h", "127.0.0.1", "-p", str(s.pg_port), "-U", "postgres",
                                   "-d", "bench"], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, bufsize=1)

    def confirmed(self, slot):
        self.p.stdin.write(f"SELECT coalesce((SELECT confirmed_flush_lsn - '0/0'::pg_lsn FROM pg_replication_slots "
                           f"WHERE slot_name = '{slot}'), 0);\n")
        self.p.stdin.flush()
        return int(float(self.p.stdout.readline().strip() or 0))

    def close(self):
        self.p.stdin.close()
        self.p.wait()


_pollers = {}


def confirmed(s, slot):
    if id(s) not in _pollers:
        _pollers[id(s)] = Poller(s)
    return _pollers[id(s)].confirmed(slot)


def timed(cmd, **kw):
    """Starts cmd under /usr/bin/time; returns (Popen, path of the time report)."""
    report = os.path.join(WORK, f"time-{len(os.listdir(WORK))}.txt")
    return subprocess.Popen(["/usr/bin/time", "-f", "%e %U %S %M", "-o", report] + cmd, **kw), report


def terminate(timed_proc):
    """SIGTERM to the program /usr/bin/time runs (time itself would die without a report)."""
    def descendants(pid):
        kids = [int(c) for c in open(f"/proc/{pid}/task/{pid}/children").read().split()]
        return kids + [d for k in kids for d in descendants(k)]
    # The innermost process is walship (time -> [profiler ->] walship).
    os.kill(descendants(timed_proc.pid)[-1], signal.SIGTERM)
    timed_proc.wait()


def cpu_seconds(pid):
    """utime + stime of a live process, from /proc (0 when it is gone)."""
    try:
        fields = open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def walsender_pid(s, slot):
    pid = s.psql("bench", f"SELECT active_pid FROM pg_replication_slots WHERE slot_name = '{slot}'")
    return int(pid) if pid else None


def read_time(report):
    wall, user, sys_, rss_kb = open(report).read().split()[-4:]
    return float(wall), float(user) + float(sys_), int(rss_kb) / 1024


def drain(args):
    s = Servers()
    try:
        s.psql("bench", "SELECT pg_create_logical_replication_slot('walship', 'pgoutput')")
        s.psql("bench", "SELECT pg_create_logical_replication_slot('recvlogical', 'pgoutput')")
        kind = "logical-message" if args.messages else "single-row"
        print(f"writing {args.events:,} {kind} outbox transactions ...", flush=True)
        t0 = time.time()
        clients = 4
        # The backlog loads faster without waiting for WAL flushes; the drain does not care.
        pgbench(s, ["-c", str(clients), "-j", "2", "-t", str(args.events // clients)],
                env={"PGOPTIONS": "-c synchronous_commit=off"},
                sql=MESSAGE_SQL if args.messages else INSERT_SQL)
        target = int(float(s.psql("bench", "SELECT pg_current_wal_lsn() - '0/0'::pg_lsn")))
        target_lsn = s.psql("bench", "SELECT pg_current_wal_lsn()")
        print(f"  written in {time.time() - t0:.1f}s; WAL end {target_lsn}", flush=True)
        n = args.events // clients * clients

        # walship
        extra = args.extra + ("\n[outbox]\nmessage_prefixes = [\"outbox\"]\n" if args.messages else "")
        cfg = walship_config(s, "walship", extra=extra)
        log = open(os.path.join(WORK, "walship.log"), "w")
        start = time.time()
        broker_cpu0 = cpu_seconds(s.broker.pid)
        wrap = os.environ.get("WALSHIP_BENCH_WRAP", "").split()
        proc, report = timed(wrap + [WALSHIP, "run", "--config", cfg], stdout=log, stderr=log)
        sender = None
        while confirmed(s, "walship") < target:
            if proc.poll() is not None:
                sys.exit(f"walship exited early; see {log.name}")
            if sender is None:
                sender = walsender_pid(s, "walship")
            time.sleep(0.02)
        walship_secs = time.time() - start
        # The walsender (one core's worth of decoding) and the broker share the machine with
        # walship: their CPU seconds say where the time went.
        sender_cpu = cpu_seconds(sender) if sender else 0.0
        broker_cpu = cpu_seconds(s.broker.pid) - broker_cpu0
        terminate(proc)
        _, w_cpu, w_rss = read_time(report)

        # pg_recvlogical on the identical slot
        out = os.path.join(WORK, "recvlogical.out")
        start = time.time()
        proc, report = timed(["pg_recvlogical", "-h", s.client_host(), "-p", str(s.pg_port), "-U", "postgres",
                              "-d", "bench", "--slot", "recvlogical", "--start", f"--endpos={target_lsn}",
                              "-o", "proto_version=1", "-o", "publication_names=walship_outbox"]
                             + (["-o", "messages=true"] if args.messages else []) + ["-f", out],
                             stderr=subprocess.DEVNULL)
        sender, r_sender_cpu = None, 0.0
        while proc.poll() is None:
            # The walsender ends with its client: keep the last reading.
            sender = sender or walsender_pid(s, "recvlogical")
            r_sender_cpu = max(r_sender_cpu, cpu_seconds(sender) if sender else 0.0)
            time.sleep(0.02)
        recv_secs = time.time() - start
        _, r_cpu, r_rss = read_time(report)

        result = {
            "mode": "messages" if args.messages else "rows",
            "events": n,
            "walship_events_per_s": round(n / walship_secs),
            "walship_seconds": round(walship_secs, 2),
            "walship_cpu_seconds": round(w_cpu, 2),
            "walship_peak_rss_mb": round(w_rss, 1),
            "walsender_cpu_seconds": round(sender_cpu, 2),
            "broker_cpu_seconds": round(broker_cpu, 2),
            "pg_recvlogical_events_per_s": round(n / recv_secs),
            "pg_recvlogical_seconds": round(recv_secs, 2),
            "pg_recvlogical_cpu_seconds": round(r_cpu, 2),
            "pg_recvlogical_peak_rss_mb": round(r_rss, 1),
            "pg_recvlogical_walsender_cpu_seconds": round(r_sender_cpu, 2),
            "ratio_walship_over_pg_recvlogical": round(recv_secs / walship_secs, 2),
        }
        print(json.dumps(result, indent=2))
    finally:
        s.stop()


def scrape(port):
    return urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()


def live(args):
    s = Servers()
    try:
        metrics_port = free_port()
        cfg = walship_config(s, "walship", metrics_port, extra=args.extra)
        log = open(os.path.join(WORK, "walship.log"), "w")
        proc, report = timed([WALSHIP, "run", "--config", cfg], stdout=log, stderr=log)
        deadline = time.time() + 30
        while s.psql("bench", "SELECT count(*) FROM pg_replication_slots WHERE slot_name='walship' AND active") != "1":
            if time.time() > deadline or proc.poll() is not None:
                sys.exit(f"walship did not start streaming; see {log.name}")
            time.sleep(0.05)
        # Warm up (topic creation, connections), then reset the measurement window.
        pgbench(s, ["-c", "1", "-t", "100"])
        time.sleep(2)
        before = scrape(metrics_port)
        print(f"writing {args.rate}/s single-row transactions for {args.seconds}s ...", flush=True)
        pgbench(s, ["-c", "4", "-j", "2", "-R", str(args.rate), "-T", str(args.seconds)])
        target = int(float(s.psql("bench", "SELECT pg_current_wal_lsn() - '0/0'::pg_lsn")))
        while confirmed(s, "walship") < target:
            time.sleep(0.05)
        after = scrape(metrics_port)
        terminate(proc)
        _, cpu, rss = read_time(report)
        hist = latency_histogram(before, after)
        result = {"rate": args.rate, "seconds": args.seconds, **hist,
                  "walship_cpu_seconds": round(cpu, 2), "walship_peak_rss_mb": round(rss, 1)}
        print(json.dumps(result, indent=2))
    finally:
        s.stop()


def latency_histogram(before, after):
    """Percentiles of walship_commit_to_ack_seconds from the bucket deltas of two scrapes."""
    def buckets(text):
        out = {}
        for line in text.splitlines():
            if line.startswith("walship_commit_to_ack_seconds_bucket"):
                le = line.split('le="')[1].split('"')[0]
                out[float("inf") if le == "+Inf" else float(le)] = float(line.split()[-1])
        return out
    b0, b1 = buckets(before), buckets(after)
    edges = sorted(b1)
    counts = [b1[e] - b0.get(e, 0) for e in edges]
    total = counts[-1] if counts else 0

    def pct(p):
        want = p * total
        for e, c in zip(edges, counts):
            if c >= want:
                return e
        return float("inf")
    return {"acked_transactions": int(total), "p50_ms_at_most": pct(0.50) * 1000, "p99_ms_at_most": pct(0.99) * 1000,
            "max_ms_at_most": pct(1.0) * 1000}


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="mode", required=True)
    d = sub.add_parser("drain")
    d.add_argument("--events", type=int, default=1_000_000)
    d.add_argument("--extra", default="", help="extra TOML appended to walship's config")
    d.add_argument("--messages", action="store_true",
                   help="write the events as transactional logical messages (outbox.message_prefixes)")
    d.add_argument("--unix", action="store_true",
                   help="walship and pg_recvlogical connect over PostgreSQL's Unix socket, not loopback TCP")
    l = sub.add_parser("live")
    l.add_argument("--rate", type=int, default=5000)
    l.add_argument("--seconds", type=int, default=30)
    l.add_argument("--extra", default="")
    args = ap.parse_args()
    global UNIX_SOCKET
    UNIX_SOCKET = getattr(args, "unix", False)
    if not os.path.exists(WALSHIP):
        sys.exit("build first: cargo build --release -p walship")
    drain(args) if args.mode == "drain" else live(args)


if __name__ == "__main__":
    main()

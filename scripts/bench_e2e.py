#!/usr/bin/env python3
"""End-to-end benchmark: walship against a real PostgreSQL and a real broker (tansu).

    scripts/bench_e2e.py drain [--events 1000000] [--messages]   # backlog drain: walship vs pg_recvlogical
    scripts/bench_e2e.py live  [--rate 5000 --seconds 30]   # commit -> ack and commit -> consumer latency
    scripts/bench_e2e.py floor [--rate 5000 --seconds 30]   # the broker's own latency under live's load

drain: writes N single-row outbox transactions (~150-byte jsonb payload, 5,000 aggregates) while
three identical pgoutput slots (created together, before the backlog) hold them, then times
walship draining its slot into Kafka until the slot confirms the end, and pg_recvlogical reading
the second slot to a file (--endpos). Reports, from the same run:
  - events/s for both and the ratio; CPU seconds, CPU per event and peak RSS (VmHWM) of both;
  - the walsender's CPU seconds and busy % (walsender CPU-s / the client's wall-s) during each
    client's drain, and its life split into busy, runnable but waiting for a core
    (/proc/<pid>/schedstat) and blocked: the walsender, the client and the broker share the
    machine's cores, so an idle walsender is not necessarily waiting for its client;
  - syscalls per event of both clients: every syscall entry of every thread, counted in the
    kernel by the raw_syscalls:sys_enter tracepoint (`perf stat` from Debian's linux-perf,
    counting mode: no sampling, no strace). An enabled tracepoint adds a little to each syscall
    (~0.1 us), which matters only for a client making several per event (pg_recvlogical);
    WALSHIP_BENCH_PERF=0 leaves perf out, and without a working perf these are null;
  - wake-ups per event: walship's voluntary + involuntary context switches summed over all its
    threads (/proc/<pid>/task/*/status, read just before it is stopped); pg_recvlogical's from
    perf's context-switches count (the same thing; it exits on its own);
  - the decode bound: the third slot decoded inside a backend by
    pg_logical_slot_peek_binary_changes (pgoutput v1, same publication), timed alone: what the
    walsender's decoding can do on this machine with no streaming at all.
Clients connect over loopback TCP, or with --unix over PostgreSQL's Unix socket. walship's
settings can be changed through its environment overrides, e.g. WALSHIP_POSTGRES__READ_BATCHING=off.

live: walship streams while pgbench writes single-row transactions at a fixed rate (-R); reports
the rate pgbench actually achieved (transactions it ran / seconds) beside the rate asked, and
  - commit -> ack: walship's own measurement (Kafka acknowledgement of a transaction's last event
    minus the commit timestamp that pgoutput carries), from its metrics histogram, so the
    percentiles are bucket upper bounds;
  - commit -> consumer: a consumer (confluent-kafka, installed with pip if missing) reading the
    topic during the run; latency = when it receives a record - the record's Kafka timestamp,
    which walship sets to the transaction's commit time (in whole milliseconds: up to 1 ms high).
    It includes the consumer's fetch wait (fetch.wait.max.ms, printed with the result).

floor: live's load without walship (pgbench at the same rate, the same consumer reading), and a
bare librdkafka producer (confluent-kafka) sending the same number of keyed ~150-byte records per
second straight to the broker with walship's producer settings (idempotent, acks=all, linger.ms
5, 6 partitions). Reports its send -> ack percentiles, measured per record (not bucketed), twice:
on the idle machine, then under the load. What walship's read -> ack could be at best here.

Everything runs in .walship-bench/ under private servers on free ports; nothing is left running.
Build first: cargo build --release -p walship (the binary is taken from $CARGO_TARGET_DIR or
target/, or WALSHIP_BENCH_BIN).
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
import threading
import time
import urllib.request

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
WORK = os.path.join(ROOT, ".walship-bench")
PG_BIN = sorted(glob.glob("/usr/lib/postgresql/*/bin"), key=lambda p: int(p.split("/")[-2]))[-1]
# WALSHIP_BENCH_BIN: another walship binary (e.g. an older commit's) to compare in the same way.
WALSHIP = os.environ.get("WALSHIP_BENCH_BIN") or os.path.join(
    os.environ.get("CARGO_TARGET_DIR") or os.path.join(ROOT, "target"), "release", "walship")
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
            "shared_buffers=512MB", f"max_replication_slots={MAX_SLOTS}", f"max_wal_senders={MAX_SLOTS}",
            # Each pipeline holds a replication and a catalog connection, and briefly more.
            f"max_connections={max(100, 3 * MAX_SLOTS + 20)}",
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
    out = subprocess.run(["pgbench", "-n", "-h", "127.0.0.1", "-p", str(s.pg_port), "-U", "postgres", "-f", script]
                         + args + ["bench"], check=True, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                         env={**os.environ, **(env or {})})
    return out.stdout


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
    # The innermost process is walship (time -> [perf stat ->] [profiler ->] walship).
    os.kill(innermost(timed_proc.pid), signal.SIGTERM)
    timed_proc.wait()


def cpu_seconds(pid):
    """utime + stime of a live process, from /proc (0 when it is gone)."""
    try:
        fields = open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def runqueue_wait_seconds(pid):
    """Seconds a live process was runnable but waiting for a CPU (/proc/<pid>/schedstat): the
    part of a walsender's idle time that is the cores being busy, not its client keeping it
    waiting (0 when it is gone)."""
    try:
        return int(open(f"/proc/{pid}/schedstat").read().split()[1]) / 1e9
    except (OSError, IndexError):
        return 0.0


def walsender_pid(s, slot):
    pid = s.psql("bench", f"SELECT active_pid FROM pg_replication_slots WHERE slot_name = '{slot}'")
    return int(pid) if pid else None


def read_time(report):
    wall, user, sys_, rss_kb = open(report).read().split()[-4:]
    return float(wall), float(user) + float(sys_), int(rss_kb) / 1024


# Syscalls are counted by the kernel's raw_syscalls:sys_enter tracepoint in counting mode
# (`perf stat`, no sampling, no per-call copy to user space): every syscall entry of every thread
# of the measured client, from its start to its exit. Without a working perf they are not
# reported (never estimated).
PERF_EVENTS = "raw_syscalls:sys_enter,context-switches"
_perf_ok = None


def perf_works():
    global _perf_ok
    if _perf_ok is None:
        perf = os.environ.get("WALSHIP_BENCH_PERF") != "0" and shutil.which("perf")
        _perf_ok = bool(perf) and subprocess.run(
            [perf, "stat", "-x,", "-e", PERF_EVENTS, "true"], stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL).returncode == 0
    return _perf_ok


def perf_wrap(name):
    """Command prefix counting syscalls and context switches of what it runs (see PERF_EVENTS);
    returns (prefix, report path); ([], None) when perf does not work here."""
    if not perf_works():
        return [], None
    report = os.path.join(WORK, f"perf-{name}.csv")
    return ["perf", "stat", "-x,", "-o", report, "-e", PERF_EVENTS, "--"], report


def read_perf(report):
    """{event name: count} from a `perf stat -x,` report (empty without one)."""
    counts = {}
    if report and os.path.exists(report):
        for line in open(report):
            f = line.strip().split(",")
            if len(f) > 2 and f[0].replace(".", "").isdigit():
                counts[f[2]] = int(float(f[0]))
    return counts


def context_switches(pid):
    """Voluntary + involuntary context switches summed over every thread of a live process
    (/proc/<pid>/task/*/status): how often its threads went to sleep or were preempted, i.e.
    were woken again. Threads that already exited are not counted."""
    total = 0
    for status in glob.glob(f"/proc/{pid}/task/*/status"):
        try:
            for line in open(status):
                if line.startswith(("voluntary_ctxt_switches", "nonvoluntary_ctxt_switches")):
                    total += int(line.split()[1])
        except OSError:
            pass
    return total


def thread_cpu_seconds(pid):
    """{thread name: CPU seconds} of a live process's threads (same-named ones summed)."""
    out = {}
    for stat in glob.glob(f"/proc/{pid}/task/*/stat"):
        try:
            head, rest = open(stat).read().rsplit(")", 1)
        except OSError:
            continue
        name = head.split("(", 1)[1]
        f = rest.split()
        out[name] = out.get(name, 0) + (int(f[11]) + int(f[12])) / os.sysconf("SC_CLK_TCK")
    return {k: round(v, 2) for k, v in sorted(out.items(), key=lambda kv: -kv[1]) if v >= 0.01}


def innermost(pid):
    """The innermost descendant of pid (time -> [wrappers ->] the measured program)."""
    kids = [int(c) for c in open(f"/proc/{pid}/task/{pid}/children").read().split()]
    return innermost(kids[-1]) if kids else pid


def peak_rss_mb(pid):
    """VmHWM of a live process in MB (0 when it is gone): the client's own peak, which
    /usr/bin/time cannot tell apart from a wrapper's (perf stat's is ~13 MB)."""
    try:
        for line in open(f"/proc/{pid}/status"):
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return 0.0


def started_at(pid):
    """When a live process started, on the time.time() clock (None when it is gone)."""
    try:
        ticks = int(open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()[19])
        uptime = float(open("/proc/uptime").read().split()[0])
    except OSError:
        return None
    return time.time() - uptime + ticks / os.sysconf("SC_CLK_TCK")


def decode_bound(s, slot, messages):
    """Seconds the walsender's decoding alone takes for the whole slot: pgoutput run inside a
    backend by pg_logical_slot_peek_binary_changes (nothing streamed, nothing consumed)."""
    sql = (f"SELECT count(*) FROM pg_logical_slot_peek_binary_changes('{slot}', NULL, NULL, "
           f"'proto_version', '1', 'publication_names', 'walship_outbox'"
           + (", 'messages', 'true'" if messages else "") + ")")
    out = subprocess.run(["psql", "-X", "-tA", "-h", "127.0.0.1", "-p", str(s.pg_port), "-U", "postgres", "-d", "bench",
                          "-c", "\\timing on", "-c", sql], check=True, capture_output=True, text=True).stdout
    ms = next(float(line.split()[1]) for line in out.splitlines() if line.startswith("Time:"))
    return ms / 1000


def drain(args):
    s = Servers()
    try:
        # Three identical slots, all created before the backlog is written: walship's,
        # pg_recvlogical's, and one only peeked at for the decode bound.
        for slot in ("walship", "recvlogical", "decode"):
            s.psql("bench", f"SELECT pg_create_logical_replication_slot('{slot}', 'pgoutput')")
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
        wrap = os.environ.get("WALSHIP_BENCH_WRAP", "").split()
        perf, w_perf = perf_wrap("walship")
        start = w_start = time.time()
        broker_cpu0 = cpu_seconds(s.broker.pid)
        proc, report = timed(perf + wrap + [WALSHIP, "run", "--config", cfg], stdout=log, stderr=log)
        sender, sender_start = None, None
        while confirmed(s, "walship") < target:
            if proc.poll() is not None:
                sys.exit(f"walship exited early; see {log.name}")
            if sender is None:
                sender = walsender_pid(s, "walship")
                sender_start = sender and started_at(sender)
            time.sleep(0.02)
        end = time.time()
        walship_secs = end - start
        # The walsender (one core's worth of decoding) and the broker share the machine with
        # walship: their CPU seconds say where the time went.
        sender_cpu = cpu_seconds(sender) if sender else 0.0
        sender_waits = runqueue_wait_seconds(sender) if sender else 0.0
        broker_cpu = cpu_seconds(s.broker.pid) - broker_cpu0
        w_switches = context_switches(innermost(proc.pid))
        w_rss = peak_rss_mb(innermost(proc.pid))
        w_threads = thread_cpu_seconds(innermost(proc.pid))
        terminate(proc)
        _, w_cpu, _ = read_time(report)
        w_counts = read_perf(w_perf)

        # pg_recvlogical on the identical slot
        out = os.path.join(WORK, "recvlogical.out")
        perf, r_perf = perf_wrap("recvlogical")
        start = time.time()
        proc, report = timed(perf + ["pg_recvlogical", "-h", s.client_host(), "-p", str(s.pg_port), "-U", "postgres",
                                     "-d", "bench", "--slot", "recvlogical", "--start", f"--endpos={target_lsn}",
                                     "-o", "proto_version=1", "-o", "publication_names=walship_outbox"]
                             + (["-o", "messages=true"] if args.messages else []) + ["-f", out],
                             stderr=subprocess.DEVNULL)
        sender, r_sender_start, r_sender_cpu, r_sender_waits, r_rss = None, None, 0.0, 0.0, 0.0
        while proc.poll() is None:
            # The walsender ends with its client: keep the last reading.
            if sender is None:
                sender = walsender_pid(s, "recvlogical")
                r_sender_start = sender and started_at(sender)
            r_sender_cpu = max(r_sender_cpu, cpu_seconds(sender) if sender else 0.0)
            r_sender_waits = max(r_sender_waits, runqueue_wait_seconds(sender) if sender else 0.0)
            client = innermost(proc.pid)
            if open(f"/proc/{client}/comm").read().strip() == "pg_recvlogical":
                r_rss = max(r_rss, peak_rss_mb(client))
            time.sleep(0.02)
        r_end = time.time()
        recv_secs = r_end - start
        _, r_cpu, _ = read_time(report)
        r_counts = read_perf(r_perf)

        # The decode bound: the third slot, decoded inside a backend with nothing else running.
        decode_secs = decode_bound(s, "decode", args.messages)

        def per_event(x):
            return round(x / n, 3) if x is not None else None

        result = {
            "mode": "messages" if args.messages else "rows",
            "events": n,
            "walship_events_per_s": round(n / walship_secs),
            "walship_seconds": round(walship_secs, 2),
            # From walship's start until its walsender existed (connect, slot, topic checks).
            "walship_startup_seconds": round(sender_start - w_start, 2) if sender_start else None,
            "walship_cpu_seconds": round(w_cpu, 2),
            "walship_cpu_us_per_event": round(w_cpu / n * 1e6, 2),
            "walship_peak_rss_mb": round(w_rss, 1),
            "walship_threads_cpu_seconds": w_threads,
            "walship_syscalls_per_event": per_event(w_counts.get("raw_syscalls:sys_enter")),
            "walship_wakeups_per_event": per_event(w_switches),
            "walsender_cpu_seconds": round(sender_cpu, 2),
            "walsender_busy_pct": round(100 * sender_cpu / walship_secs),
            # The same over the walsender's own life (walship's startup left out).
            "walsender_busy_pct_streaming": round(100 * sender_cpu / (end - sender_start)) if sender_start else None,
            # Of the rest, how much it was runnable but had no core (the others busy), and how
            # much it slept (blocked: waiting for its client, for WAL, or gone idle at the end),
            # both over its own life.
            "walsender_runqueue_wait_pct": round(100 * sender_waits / (end - sender_start)) if sender_start else None,
            "walsender_blocked_pct": round(100 * (end - sender_start - sender_cpu - sender_waits) / (end - sender_start))
            if sender_start else None,
            "broker_cpu_seconds": round(broker_cpu, 2),
            "pg_recvlogical_events_per_s": round(n / recv_secs),
            "pg_recvlogical_seconds": round(recv_secs, 2),
            "pg_recvlogical_cpu_seconds": round(r_cpu, 2),
            "pg_recvlogical_cpu_us_per_event": round(r_cpu / n * 1e6, 2),
            "pg_recvlogical_peak_rss_mb": round(r_rss, 1),
            "pg_recvlogical_syscalls_per_event": per_event(r_counts.get("raw_syscalls:sys_enter")),
            "pg_recvlogical_wakeups_per_event": per_event(r_counts.get("context-switches")),
            "pg_recvlogical_walsender_cpu_seconds": round(r_sender_cpu, 2),
            "pg_recvlogical_walsender_busy_pct": round(100 * r_sender_cpu / recv_secs),
            "pg_recvlogical_walsender_runqueue_wait_pct": round(100 * r_sender_waits / (r_end - r_sender_start))
            if r_sender_start else None,
            "pg_recvlogical_walsender_blocked_pct": round(
                100 * (r_end - r_sender_start - r_sender_cpu - r_sender_waits) / (r_end - r_sender_start))
            if r_sender_start else None,
            "ratio_walship_over_pg_recvlogical": round(recv_secs / walship_secs, 2),
            "decode_bound_seconds": round(decode_secs, 2),
            "decode_bound_events_per_s": round(n / decode_secs),
        }
        print(json.dumps(result, indent=2))
    finally:
        s.stop()


def scrape(port):
    return urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()


def pgbench_rate(output):
    """(transactions, seconds) pgbench reports having run: what it achieved, not what was asked."""
    n = secs = None
    for line in output.splitlines():
        if line.startswith("number of transactions actually processed:"):
            n = int(line.split(":")[1].split()[0].split("/")[0])
        elif line.startswith("duration:"):
            secs = float(line.split(":")[1].split()[0])
    return n, secs


CONSUMER_FETCH_WAIT_MS = 10


def live(args):
    s = Servers()
    consumer = None
    try:
        metrics_port = free_port()
        cfg = walship_config(s, "walship", metrics_port, extra=args.extra)
        log = open(os.path.join(WORK, "walship.log"), "w")
        wrap = os.environ.get("WALSHIP_BENCH_WRAP", "").split()
        proc, report = timed(wrap + [WALSHIP, "run", "--config", cfg], stdout=log, stderr=log)
        deadline = time.time() + 30
        while s.psql("bench", "SELECT count(*) FROM pg_replication_slots WHERE slot_name='walship' AND active") != "1":
            if time.time() > deadline or proc.poll() is not None:
                sys.exit(f"walship did not start streaming; see {log.name}")
            time.sleep(0.05)
        # Warm up (topic creation, connections), then reset the measurement window.
        pgbench(s, ["-c", "1", "-t", "100"])
        time.sleep(2)
        expect = os.path.join(WORK, "consumer.expect")
        since_ms = int(time.time() * 1000)
        consumer = start_consumer(f"127.0.0.1:{s.kafka_port}", "outbox.event.order", since_ms, expect)
        before = scrape(metrics_port)
        clients = live_clients(args)
        print(f"writing {args.rate}/s single-row transactions for {args.seconds}s ({clients} clients) ...",
              flush=True)
        out = pgbench(s, ["-c", str(clients), "-j", "2", "-R", str(args.rate), "-T", str(args.seconds)])
        done, secs = pgbench_rate(out)
        target = int(float(s.psql("bench", "SELECT pg_current_wal_lsn() - '0/0'::pg_lsn")))
        while confirmed(s, "walship") < target:
            time.sleep(0.05)
        after = scrape(metrics_port)
        with open(expect + ".tmp", "w") as f:
            f.write(str(done))
        os.rename(expect + ".tmp", expect)
        consumed = json.loads(consumer.stdout.read())
        consumer.wait()
        consumer = None
        terminate(proc)
        _, cpu, rss = read_time(report)
        hist = latency_histogram(before, after, "walship_commit_to_ack_seconds")
        read_hist = latency_histogram(before, after, "walship_read_to_ack_seconds")
        result = {"rate_asked": args.rate, "seconds": args.seconds, "pgbench_clients": clients,
                  "pgbench_transactions": done,
                  "rate_achieved": round(done / secs) if done and secs else None,
                  "commit_to_ack": hist,
                  # Of which walship and the broker: from walship reading the transaction.
                  "read_to_ack": read_hist,
                  "commit_to_consumer": consumed,
                  "walship_cpu_seconds": round(cpu, 2), "walship_peak_rss_mb": round(rss, 1)}
        print(json.dumps(result, indent=2))
    finally:
        if consumer:
            consumer.kill()
        s.stop()


def confluent_kafka():
    """Makes `confluent_kafka` importable, installing it with pip if missing."""
    try:
        import confluent_kafka  # noqa: F401
    except ImportError:
        subprocess.run([sys.executable, "-m", "pip", "install", "--quiet", "confluent-kafka"], check=True,
                       stdout=subprocess.DEVNULL)


def percentiles(lat):
    """p50, p99 and max of latencies in ms (sorted), to 0.1 ms; None for an empty list."""
    def pct(p):
        return round(lat[min(len(lat) - 1, int(p * len(lat)))], 1) if lat else None
    return {"p50_ms": pct(0.50), "p99_ms": pct(0.99), "max_ms": pct(1.0)}


def start_consumer(brokers, topic, since_ms, expect_file):
    """Starts `consume` as a child process and waits until it has its partitions."""
    consumer = subprocess.Popen([sys.executable, os.path.abspath(__file__), "consume", "--brokers", brokers,
                                 "--topic", topic, "--since-ms", str(since_ms), "--expect-file", expect_file],
                                stdout=subprocess.PIPE, stderr=open(os.path.join(WORK, "consumer.log"), "w"),
                                text=True)
    if not consumer.stdout.readline().startswith("ready"):
        consumer.kill()
        sys.exit(f"the consumer did not start; see {WORK}/consumer.log")
    return consumer


def live_clients(args):
    """pgbench clients for live's load: enough that commit latency (a WAL flush each) does not
    cap the rate."""
    return args.clients or max(4, args.rate // 500)


def consume(args):
    """The consumer of `live` (run as a child process, so it never waits on this script's own
    work): reads every partition of the topic while the load runs and, for each record committed
    after --since-ms, takes its latency as the time it was received minus the record's timestamp,
    which walship sets to the transaction's commit time (PostgreSQL's commit timestamp, cut to
    whole milliseconds: the figure can read up to 1 ms high). Prints "ready" once assigned, then,
    after --expect-file appears holding the number of transactions to expect, the percentiles."""
    confluent_kafka()
    from confluent_kafka import Consumer, TopicPartition, OFFSET_BEGINNING
    c = Consumer({"bootstrap.servers": args.brokers, "group.id": "walship-bench", "enable.auto.commit": False,
                  # A consumer that wants records soon: the broker answers a fetch as soon as a
                  # record is there, or after this long with nothing.
                  "fetch.wait.max.ms": CONSUMER_FETCH_WAIT_MS})
    parts = c.list_topics(args.topic, timeout=10).topics[args.topic].partitions
    c.assign([TopicPartition(args.topic, p, OFFSET_BEGINNING) for p in parts])
    print("ready", flush=True)
    lat, expect, give_up = [], None, None
    while True:
        # One record per poll: a batch call would hold records until the batch fills or it times out.
        m = c.poll(0.05)
        if m is not None and m.error() is None and m.timestamp()[1] >= args.since_ms:
            lat.append(time.time() * 1000 - m.timestamp()[1])
        if expect is None and os.path.exists(args.expect_file):
            expect = int(open(args.expect_file).read())
            give_up = time.time() + 15
        if expect is not None and (len(lat) >= expect or time.time() > give_up):
            break
    c.close()
    lat.sort()
    print(json.dumps({"received": len(lat), **percentiles(lat), "fetch_wait_max_ms": CONSUMER_FETCH_WAIT_MS}))


def floor(args):
    confluent_kafka()
    from confluent_kafka import Producer
    from confluent_kafka.admin import AdminClient, NewTopic
    s = Servers()
    consumer = None
    try:
        brokers = f"127.0.0.1:{s.kafka_port}"
        topic = "outbox.event.order"
        admin = AdminClient({"bootstrap.servers": brokers})  # kept alive until the topic exists
        for f in admin.create_topics([NewTopic(topic, 6, 1)]).values():
            f.result()
        # The same consumer as live's, never told to stop: it reads until it is killed.
        consumer = start_consumer(brokers, topic, int(time.time() * 1000), os.path.join(WORK, "never"))
        producer = Producer({"bootstrap.servers": brokers, "enable.idempotence": True, "acks": "all",
                             "linger.ms": 5})
        payload = b"x" * 150

        def produce(seconds):
            """Sends args.rate records/s for `seconds`; the send -> ack percentiles in ms."""
            lat = []
            start, n = time.perf_counter(), 0
            while time.perf_counter() - start < seconds:
                due = int((time.perf_counter() - start) * args.rate)
                while n < due:
                    t0 = time.perf_counter()
                    producer.produce(topic, payload, key=f"agg-{n % 5000}".encode(),
                                     on_delivery=lambda err, msg, t0=t0: lat.append((time.perf_counter() - t0) * 1000))
                    n += 1
                producer.poll(0.0005)
            producer.flush(30)
            lat.sort()
            return {"acked": len(lat), **percentiles(lat)}

        produce(2)  # warm up: connections, producer id
        idle = produce(args.seconds)
        clients = live_clients(args)
        print(f"the same under pgbench at {args.rate}/s ({clients} clients) ...", flush=True)
        # pgbench in a thread: it is a child process, so this thread only waits for it.
        load = threading.Thread(target=pgbench, args=(s, ["-c", str(clients), "-j", "2", "-R", str(args.rate),
                                                          "-T", str(args.seconds + 4)]))
        load.start()
        time.sleep(2)
        loaded = produce(args.seconds)
        load.join()
        print(json.dumps({"rate": args.rate, "seconds": args.seconds, "linger_ms": 5,
                          "send_to_ack_idle": idle, "send_to_ack_under_load": loaded}, indent=2))
    finally:
        if consumer:
            consumer.kill()
        s.stop()


def latency_histogram(before, after, name):
    """Percentiles of the histogram `name` from the bucket deltas of two scrapes."""
    def buckets(text):
        out = {}
        for line in text.splitlines():
            if line.startswith(name + "_bucket"):
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
    l.add_argument("--clients", type=int, default=0, help="pgbench clients (default: one per 500/s, at least 4)")
    f = sub.add_parser("floor", help="a bare producer's latency to the broker, idle and under live's load")
    f.add_argument("--rate", type=int, default=5000)
    f.add_argument("--seconds", type=int, default=30)
    f.add_argument("--clients", type=int, default=0)
    c = sub.add_parser("consume", help="(internal) the consumer that live runs")
    c.add_argument("--brokers", required=True)
    c.add_argument("--topic", required=True)
    c.add_argument("--since-ms", type=int, required=True)
    c.add_argument("--expect-file", required=True)
    args = ap.parse_args()
    if args.mode == "consume":
        return consume(args)
    if args.mode == "floor":
        return floor(args)
    global UNIX_SOCKET
    UNIX_SOCKET = getattr(args, "unix", False)
    if not os.path.exists(WALSHIP):
        sys.exit("build first: cargo build --release -p walship")
    drain(args) if args.mode == "drain" else live(args)


if __name__ == "__main__":
    main()

#!/usr/bin/env python3
"""Several pipelines in one walship process: what each costs idle, in memory and per event.

    scripts/bench_pipelines.py [--pipelines 1,16,100] [--runs 1] [--idle-seconds 30]
                               [--settle-seconds 20] [--rate 3000] [--seconds 20]

Build first: cargo build --release -p walship (or point WALSHIP_BENCH_BIN at another binary, as
for bench_e2e.py). Takes about 1.5 minutes per pipeline count and run with the defaults, plus
start-up; nothing is left running.

For each pipeline count N, on fresh private servers (PostgreSQL and tansu, as bench_e2e.py starts
them): N outbox tables in one database, each with its own publication and slot, and one walship
process with N [[pipelines]] entries. PostgreSQL is started with N + 4 replication slots and WAL
senders (bench_e2e.MAX_SLOTS, set per N; at least 10) and enough connections for them, so 100
pipelines get 104 of each: a server with the default max_wal_senders / max_replication_slots
(10) could not run them. Then:

  1. start: walship starts; once every slot streams, one row is written to each table (topic
     creation, connections) and the bench waits until every slot has confirmed it;
  2. settle: walship's CPU is sampled in 5 s windows for at least --settle-seconds (default 20,
     past the first background ticks: the watchdog runs every 10 s per pipeline and connects on
     its first tick), and then until a window's CPU is no longer below the previous one (by more
     than 5 % or one clock tick), for at most 30 s more;
  3. idle: --idle-seconds (default 30) with nothing written;
  4. load: pgbench writes single-row outbox transactions at --rate in total (default 3,000/s, the
     same for every N), each into a table picked at random, for --seconds (default 20); then the
     bench waits until every slot has confirmed the end of the WAL.

Figures, all of walship's own process (the /usr/bin/time wrapping it is left out):
  - idle CPU %: its CPU time (utime + stime, /proc/<pid>/stat) over the idle window, in % of one
    core: what N pipelines cost with nothing to do (timers, status updates, the producers'
    threads);
  - idle wake-ups/s: voluntary + involuntary context switches summed over all its threads
    (/proc/<pid>/task/*/status) over the idle window, per second: how often its threads were woken
    (or preempted) with nothing to do. Counted per thread as end minus start; a thread that
    exits inside the window loses its count (the JSON says how many started and exited);
  - threads: its thread count at the end of the idle window;
  - RSS MB: its resident memory (VmRSS) once settled, at the start of the idle window;
  - peak RSS MB: its peak resident memory (VmHWM) after the load (start-up included);
  - CPU µs/event: its CPU time from the start of the load until every slot confirmed the end,
    divided by the events pgbench wrote (the idle cost over that time included; the JSON also
    has the cost above idle);
  - ×1 pipeline: CPU µs/event over that of the first count in --pipelines (normally 1) in the
    same run.

Output: one JSON line per pipeline count and run as it finishes (with more: the rate pgbench
achieved, settling time, threads started and exited while idle, RSS after the load), then a line
per count with its CPU per event against the first count's, and a markdown table to paste into
the docs. With --runs K every count is measured K times (runs interleaved: 1, 16, 100, 1, 16,
100, ...; fresh servers each time) and each table cell is the range over the runs, min–max.
"""
import argparse
import json
import os
import signal
import subprocess
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import bench_e2e as b  # noqa: E402

SETTLE_WINDOW = 5  # seconds per CPU sample while settling
SETTLE_EXTRA_MAX = 30  # seconds of sampling past --settle-seconds before giving up on steady
INSERT_SQL = ("\\set agg random(1, 5000)\n\\set t random(0, {last})\n"
              "INSERT INTO outbox_:t (aggregatetype, aggregateid, type, payload) VALUES ('order', "
              "'agg-' || :agg, 'OrderUpdated', jsonb_build_object('order', :agg, 'note', repeat('x', 96), "
              "'at', now()));\n")


def rss_mb(pid, field):
    for line in open(f"/proc/{pid}/status"):
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024
    return 0.0


def thread_count(pid):
    for line in open(f"/proc/{pid}/status"):
        if line.startswith("Threads:"):
            return int(line.split()[1])
    return 0


def walship_pid(timed_proc):
    """walship's own pid: b.timed runs it under /usr/bin/time, whose pid Popen has."""
    pid = b.innermost(timed_proc.pid)
    exe = os.path.realpath(f"/proc/{pid}/exe")
    if pid == timed_proc.pid or exe != os.path.realpath(b.WALSHIP):
        sys.exit(f"pid {pid} under /usr/bin/time is {exe}, not {b.WALSHIP}")
    return pid


def switches_per_thread(pid):
    """{tid: voluntary + involuntary context switches} of a live process's threads."""
    out = {}
    for tid in os.listdir(f"/proc/{pid}/task"):
        try:
            n = 0
            for line in open(f"/proc/{pid}/task/{tid}/status"):
                if line.startswith(("voluntary_ctxt_switches", "nonvoluntary_ctxt_switches")):
                    n += int(line.split()[1])
            out[tid] = n
        except OSError:
            pass  # the thread exited meanwhile
    return out


class Slots:
    """One long-lived psql session asking about every slot at once (a psql per poll, or a query
    per slot with 100 slots, would load the machine while walship is measured)."""

    def __init__(self, s):
        self.poller = b.Poller(s)

    def state(self):
        """(slots streaming, lowest confirmed position of any slot, current end of the WAL)."""
        p = self.poller.p
        p.stdin.write("SELECT (SELECT count(*) FROM pg_replication_slots WHERE active), "
                      "(SELECT coalesce(min(confirmed_flush_lsn - '0/0'::pg_lsn), 0) FROM pg_replication_slots), "
                      "pg_current_wal_lsn() - '0/0'::pg_lsn;\n")
        p.stdin.flush()
        active, low, end = p.stdout.readline().strip().split("|")
        return int(active), int(float(low)), int(float(end))

    def wait_confirmed(self, proc, log, until=None):
        """Waits until every slot has confirmed `until` (default: the current end of the WAL)."""
        if until is None:
            until = self.state()[2]
        while self.state()[1] < until:
            if proc.poll() is not None:
                sys.exit(f"walship exited; see {log}")
            time.sleep(0.05)

    def close(self):
        self.poller.close()


def settle(pid, proc, log, minimum):
    """Samples walship's CPU in SETTLE_WINDOW windows until at least `minimum` seconds passed
    and the last window's CPU is not below the one before; (seconds, last window's CPU % of a
    core, steady)."""
    tick = 1 / os.sysconf("SC_CLK_TCK")
    t0 = time.time()
    windows = []
    while True:
        c0 = b.cpu_seconds(pid)
        time.sleep(SETTLE_WINDOW)
        if proc.poll() is not None:
            sys.exit(f"walship exited while settling; see {log}")
        windows.append(b.cpu_seconds(pid) - c0)
        took = time.time() - t0
        if took >= minimum and len(windows) >= 2:
            prev, last = windows[-2], windows[-1]
            steady = last >= prev - max(0.05 * prev, tick)
            if steady or took >= minimum + SETTLE_EXTRA_MAX:
                return took, 100 * last / SETTLE_WINDOW, steady


def stop(proc, pid):
    """SIGTERM to walship itself (/usr/bin/time would die without a report); SIGKILL if it has
    not exited in 30 s."""
    if proc.poll() is not None:
        return
    try:
        os.kill(pid, signal.SIGTERM)
        proc.wait(30)
    except subprocess.TimeoutExpired:
        os.kill(pid, signal.SIGKILL)
        proc.wait()
    except ProcessLookupError:
        proc.wait()


def one(n, run, args):
    b.MAX_SLOTS = max(10, n + 4)  # one slot and WAL sender per pipeline, and some to spare
    s = b.Servers()
    proc = pid = slots = log_file = None
    try:
        s.psql("bench", "; ".join(f"CREATE TABLE outbox_{i} (LIKE outbox INCLUDING ALL)" for i in range(n)))
        pipelines = "".join(
            f'\n[[pipelines]]\nname = "p{i}"\n'
            f'postgres = {{ url = "{s.url()}", slot = "s{i}", publication = "pub{i}" }}\n'
            f'outbox = {{ table = "public.outbox_{i}", topic = "p{i}.{{aggregatetype}}" }}\n'
            for i in range(n))
        cfg = os.path.join(b.WORK, "walship.toml")
        with open(cfg, "w") as f:
            f.write(f'[kafka]\nbrokers = "127.0.0.1:{s.kafka_port}"\ntopic_partitions = 6\n{pipelines}')
        log = os.path.join(b.WORK, "walship.log")
        log_file = open(log, "w")
        proc, _ = b.timed([b.WALSHIP, "run", "--config", cfg], stdout=log_file, stderr=subprocess.STDOUT)
        slots = Slots(s)

        # 1. start: every slot streams, and every pipeline has published and confirmed a row.
        deadline = time.time() + 60 + n
        while slots.state()[0] != n:
            if time.time() > deadline or proc.poll() is not None:
                sys.exit(f"walship did not stream all {n} slots; see {log}")
            time.sleep(0.1)
        pid = walship_pid(proc)
        s.psql("bench", "; ".join(f"INSERT INTO outbox_{i} (aggregatetype, aggregateid, type, payload) "
                                  f"VALUES ('order', 'warm', 'Warm', '{{}}')" for i in range(n)))
        slots.wait_confirmed(proc, log)

        # 2. settle, 3. idle.
        settle_secs, settle_last, steady = settle(pid, proc, log, args.settle_seconds)
        rss_settled = rss_mb(pid, "VmRSS")
        sw0 = switches_per_thread(pid)
        cpu0, t0 = b.cpu_seconds(pid), time.time()
        time.sleep(args.idle_seconds)
        cpu1, t1 = b.cpu_seconds(pid), time.time()
        sw1 = switches_per_thread(pid)
        if proc.poll() is not None:
            sys.exit(f"walship exited while idle; see {log}")
        idle_secs = t1 - t0
        idle = (cpu1 - cpu0) / idle_secs
        wakeups = sum(v - sw0.get(tid, 0) for tid, v in sw1.items()) / idle_secs
        threads = thread_count(pid)
        rss_idle = rss_mb(pid, "VmRSS")

        # 4. load.
        cpu0, t0 = b.cpu_seconds(pid), time.time()
        out = b.pgbench(s, ["-c", "4", "-j", "2", "-R", str(args.rate), "-T", str(args.seconds)],
                        sql=INSERT_SQL.format(last=n - 1))
        events, secs = b.pgbench_rate(out)
        slots.wait_confirmed(proc, log)
        cpu = b.cpu_seconds(pid) - cpu0
        took = time.time() - t0
        return {
            "pipelines": n,
            "run": run,
            "events": events,
            "rate_asked": args.rate,
            "rate_achieved": round(events / secs),
            "settle_seconds": round(settle_secs, 1),
            # walship's CPU in the last settling window, and whether it had stopped falling.
            "settle_last_window_cpu_percent": round(settle_last, 2),
            "settled_steady": steady,
            "idle_seconds": round(idle_secs, 1),
            "walship_idle_cpu_percent": round(idle * 100, 2),
            "walship_idle_wakeups_per_s": round(wakeups, 1),
            "walship_idle_threads_started": len(sw1.keys() - sw0.keys()),
            "walship_idle_threads_exited": len(sw0.keys() - sw1.keys()),
            "walship_threads": threads,
            "walship_rss_mb_settled": round(rss_settled, 1),
            "walship_rss_mb_idle_end": round(rss_idle, 1),
            "walship_cpu_seconds": round(cpu, 2),
            "walship_cpu_us_per_event": round(cpu / events * 1e6, 1),
            "walship_cpu_us_per_event_above_idle": round((cpu - idle * took) / events * 1e6, 1),
            "walship_rss_mb_after_load": round(rss_mb(pid, "VmRSS"), 1),
            "walship_peak_rss_mb": round(rss_mb(pid, "VmHWM"), 1),
            "walship_threads_after_load": thread_count(pid),
            "seconds_until_all_confirmed": round(took, 1),
        }
    finally:
        if proc is not None:
            if pid is None:
                pid = b.innermost(proc.pid)
            stop(proc, pid)
        if slots is not None:
            slots.close()
        if log_file is not None:
            log_file.close()
        s.stop()


def pipelines(n):
    return f"{n} pipeline" + ("" if n == 1 else "s")


def span(values, fmt):
    """min–max of values as fmt formats them; one value when they print the same."""
    lo, hi = fmt(min(values)), fmt(max(values))
    return lo if lo == hi else f"{lo}–{hi}"


def report(results, counts, args):
    """Ratios against the first count, then the markdown table (ranges over the runs)."""
    base = counts[0]
    ratio = {}  # (n, run) -> CPU per event over the first count's in the same run
    for r in results:
        first = next(x for x in results if x["pipelines"] == base and x["run"] == r["run"])
        ratio[r["pipelines"], r["run"]] = r["walship_cpu_us_per_event"] / first["walship_cpu_us_per_event"]
    by_n = {n: [r for r in results if r["pipelines"] == n] for n in counts}
    print()
    for n in counts[1:]:
        rs = by_n[n]
        # Both lists are in run order.
        per_added = [(r["walship_rss_mb_settled"] - r0["walship_rss_mb_settled"]) / (n - base)
                     for r, r0 in zip(rs, by_n[base])]
        print(f"{pipelines(n)}: CPU per event x{span([ratio[n, r['run']] for r in rs], '{:.2f}'.format)} of {base}; "
              f"RSS after settling {span(per_added, '{:+.2f}'.format)} MB per added pipeline")
    short = [r for r in results if r["rate_achieved"] < 0.95 * r["rate_asked"]]
    for r in short:
        print(f"note: {pipelines(r['pipelines'])}, run {r['run']}: pgbench achieved {r['rate_achieved']}/s "
              f"of {r['rate_asked']}/s")
    unsteady = [r for r in results if not r["settled_steady"]]
    for r in unsteady:
        print(f"note: {pipelines(r['pipelines'])}, run {r['run']}: walship's CPU was still falling after "
              f"{r['settle_seconds']} s of settling")
    print()
    runs = f"{args.runs} runs, ranges min–max" if args.runs > 1 else "1 run"
    print(f"Idle over {args.idle_seconds} s after settling; load {args.rate:,} events/s in total for "
          f"{args.seconds} s; {runs}.")
    print()
    print(f"| pipelines | idle CPU % | idle wake-ups/s | threads | RSS MB | peak RSS MB | CPU µs/event "
          f"| ×{pipelines(base)} |")
    print("|---|---|---|---|---|---|---|---|")
    for n in counts:
        rs = by_n[n]
        col = lambda key, fmt: span([r[key] for r in rs], fmt)  # noqa: E731
        print(f"| {n} | {col('walship_idle_cpu_percent', '{:.2f}'.format)} "
              f"| {col('walship_idle_wakeups_per_s', '{:.0f}'.format)} "
              f"| {col('walship_threads', '{:d}'.format)} "
              f"| {col('walship_rss_mb_settled', '{:.1f}'.format)} "
              f"| {col('walship_peak_rss_mb', '{:.1f}'.format)} "
              f"| {col('walship_cpu_us_per_event', '{:.1f}'.format)} "
              f"| {'—' if n == base else span([ratio[n, r['run']] for r in rs], '{:.2f}'.format)} |")


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--pipelines", default="1,16,100", help="pipeline counts, comma-separated (default 1,16,100)")
    ap.add_argument("--runs", type=int, default=1, help="measure every count this many times (default 1)")
    ap.add_argument("--idle-seconds", type=int, default=30, help="length of the idle window (default 30)")
    ap.add_argument("--settle-seconds", type=int, default=20,
                    help="least time between the warm-up rows' confirmation and the idle window (default 20)")
    ap.add_argument("--rate", type=int, default=3000, help="events/s in total during the load (default 3000)")
    ap.add_argument("--seconds", type=int, default=20, help="length of the load (default 20)")
    args = ap.parse_args()
    counts = [int(n) for n in args.pipelines.split(",")]
    if not counts or min(counts) < 1 or len(set(counts)) != len(counts) or args.runs < 1:
        sys.exit("--pipelines: distinct counts of at least 1; --runs: at least 1")
    if not os.path.exists(b.WALSHIP):
        sys.exit("build first: cargo build --release -p walship")
    results = []
    for run in range(1, args.runs + 1):
        for n in counts:
            r = one(n, run, args)
            print(json.dumps(r), flush=True)
            results.append(r)
    report(results, counts, args)


if __name__ == "__main__":
    main()

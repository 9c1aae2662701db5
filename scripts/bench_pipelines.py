#!/usr/bin/env python3
"""Several pipelines in one walship process: CPU per event and memory per pipeline.

    scripts/bench_pipelines.py [--pipelines 1,4,16] [--rate 3000] [--seconds 20]

For each pipeline count N, on fresh private servers (PostgreSQL and tansu, as bench_e2e.py
starts them): N outbox tables in one database, each with its own publication and slot, and one
walship process with N [[pipelines]] entries. Once every slot streams, pgbench writes single-row
outbox transactions at the same total rate for every N, each into a table picked at random, and
the bench waits until every slot has confirmed the end of the WAL. Reported per N: the events,
the rate pgbench achieved, walship's CPU seconds over the load (from /proc, start-up excluded)
and per event, its CPU use over 5 idle seconds before the load (the pipelines' fixed cost) and
the per-event cost above it, its resident memory before and after the load and its peak, and that memory per
pipeline. Build first: cargo build --release -p walship.
"""
import argparse
import json
import os
import subprocess
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import bench_e2e as b  # noqa: E402


IDLE_SECONDS = 5


def rss_mb(pid, field):
    for line in open(f"/proc/{pid}/status"):
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024
    return 0.0


def walship_pid(timed_proc):
    kids = open(f"/proc/{timed_proc.pid}/task/{timed_proc.pid}/children").read().split()
    return int(kids[-1])


def one(n, rate, seconds):
    b.MAX_SLOTS = max(10, n + 4)
    s = b.Servers()
    try:
        tables = "; ".join(f"CREATE TABLE outbox_{i} (LIKE outbox INCLUDING ALL)" for i in range(n))
        s.psql("bench", tables)
        pipelines = "".join(
            f'\n[[pipelines]]\nname = "p{i}"\n'
            f'postgres = {{ url = "{s.url()}", slot = "s{i}", publication = "pub{i}" }}\n'
            f'outbox = {{ table = "public.outbox_{i}", topic = "p{i}.{{aggregatetype}}" }}\n'
            for i in range(n))
        cfg = os.path.join(b.WORK, "walship.toml")
        with open(cfg, "w") as f:
            f.write(f'[kafka]\nbrokers = "127.0.0.1:{s.kafka_port}"\ntopic_partitions = 6\n{pipelines}')
        log = open(os.path.join(b.WORK, "walship.log"), "w")
        proc, report = b.timed([b.WALSHIP, "run", "--config", cfg], stdout=log, stderr=log)
        deadline = time.time() + 60
        while s.psql("bench", "SELECT count(*) FROM pg_replication_slots WHERE active") != str(n):
            if time.time() > deadline or proc.poll() is not None:
                sys.exit(f"walship did not stream all {n} slots; see {log.name}")
            time.sleep(0.1)
        # Warm up every pipeline (topic creation, connections), then measure.
        for i in range(n):
            s.psql("bench", f"INSERT INTO outbox_{i} (aggregatetype, aggregateid, type, payload) "
                            f"VALUES ('order', 'warm', 'Warm', '{{}}')")
        end = int(float(s.psql("bench", "SELECT pg_current_wal_lsn() - '0/0'::pg_lsn")))
        while min(b.confirmed(s, f"s{i}") for i in range(n)) < end:
            time.sleep(0.05)
        pid = walship_pid(proc)
        # What the pipelines cost with nothing to do (timers, status updates, the producers'
        # threads), to tell it from the per-event cost.
        idle0 = b.cpu_seconds(pid)
        time.sleep(IDLE_SECONDS)
        idle = (b.cpu_seconds(pid) - idle0) / IDLE_SECONDS
        rss_before = rss_mb(pid, "VmRSS")
        cpu0 = b.cpu_seconds(pid)
        script = os.path.join(b.WORK, "insert.sql")
        with open(script, "w") as f:
            f.write(f"\\set agg random(1, 5000)\n\\set t random(0, {n - 1})\n"
                    "INSERT INTO outbox_:t (aggregatetype, aggregateid, type, payload) VALUES ('order', "
                    "'agg-' || :agg, 'OrderUpdated', jsonb_build_object('order', :agg, 'note', repeat('x', 96), "
                    "'at', now()));\n")
        t0 = time.time()
        out = subprocess.run(["pgbench", "-n", "-h", "127.0.0.1", "-p", str(s.pg_port), "-U", "postgres", "-f", script,
                              "-c", "4", "-j", "2", "-R", str(rate), "-T", str(seconds), "bench"],
                             check=True, capture_output=True, text=True).stdout
        events = int(next(line for line in out.splitlines()
                          if line.startswith("number of transactions actually processed")).split(":")[1].split("/")[0])
        end = int(float(s.psql("bench", "SELECT pg_current_wal_lsn() - '0/0'::pg_lsn")))
        while min(b.confirmed(s, f"s{i}") for i in range(n)) < end:
            if proc.poll() is not None:
                sys.exit(f"walship exited; see {log.name}")
            time.sleep(0.05)
        cpu = b.cpu_seconds(pid) - cpu0
        rss_after = rss_mb(pid, "VmRSS")
        peak = rss_mb(pid, "VmHWM")
        took = time.time() - t0
        b.terminate(proc)
        return {
            "pipelines": n,
            "events": events,
            "rate_asked": rate,
            "rate_achieved": round(events / seconds),
            "walship_cpu_seconds": round(cpu, 2),
            "walship_cpu_us_per_event": round(cpu / events * 1e6, 1),
            "walship_idle_cpu_percent": round(idle * 100, 1),
            "walship_cpu_us_per_event_above_idle": round((cpu - idle * took) / events * 1e6, 1),
            "walship_rss_mb_before": round(rss_before, 1),
            "walship_rss_mb_after": round(rss_after, 1),
            "walship_peak_rss_mb": round(peak, 1),
            "peak_rss_mb_per_pipeline": round(peak / n, 2),
            "seconds_until_all_confirmed": round(took, 1),
        }
    finally:
        s.stop()


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--pipelines", default="1,4,16")
    ap.add_argument("--rate", type=int, default=3000)
    ap.add_argument("--seconds", type=int, default=20)
    args = ap.parse_args()
    results = [one(int(n), args.rate, args.seconds) for n in args.pipelines.split(",")]
    for r in results:
        print(json.dumps(r))
    if len(results) > 1:
        base = results[0]
        for r in results[1:]:
            extra = (r["walship_peak_rss_mb"] - base["walship_peak_rss_mb"]) / (r["pipelines"] - base["pipelines"])
            print(f"{r['pipelines']} pipelines: CPU per event x{r['walship_cpu_us_per_event'] / base['walship_cpu_us_per_event']:.2f} "
                  f"of {base['pipelines']}; peak RSS +{extra:.2f} MB per added pipeline")


if __name__ == "__main__":
    main()

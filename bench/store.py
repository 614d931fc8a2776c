#!/usr/bin/env python3
"""pond's store in one run: SQLite, PostgreSQL with one replica, PostgreSQL with two replicas.

    python bench/store.py [--pickup-jobs 100] [--throughput-jobs 1000] [--json-out FILE]

Each configuration is bench/pool.py's pool (pond, one orchestrator, two workers of
concurrency 2, default holds) started afresh, measured with bench/pool.py's pickup and
throughput (unconfined /bin/true), and stopped:

    sqlite      pond on DIR/pond.db (the default)
    pg-1        pond --database on a private PostgreSQL (tests/pg_cluster.py, fsync on)
    pg-2        two ponds on that database; the orchestrator is paired with both URLs and
                talks to the first, the bench submits through the second (a submit wakes
                the held poll through LISTEN/NOTIFY)

PostgreSQL's CPU (the postmaster and its backends) is shown as `postgres` beside the
pool's processes. Then the ceiling of one pond process: jobs/s x 100 / (pond's % of one core) during the
throughput run, i.e. the rate at which pond alone would saturate a core if nothing else
were the bottleneck. Needs PostgreSQL's binaries (apt-get install postgresql) and psycopg
(pip install 'pond-swarm[postgres]'). This is not a test: it prints numbers and a JSON line.
"""

import argparse
import json
import os
import shutil
import signal
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path[:0] = [str(HERE), str(HERE.parent / "tests")]

import pool as bench                # noqa: E402  bench/pool.py
from pg_cluster import Cluster      # noqa: E402  tests/pg_cluster.py


def parse_args(argv):
    p = argparse.ArgumentParser(description="pickup and throughput on SQLite and on PostgreSQL (bench/README.md)")
    p.add_argument("--pickup-jobs", type=int, default=100)
    p.add_argument("--warmup", type=int, default=10)
    p.add_argument("--throughput-jobs", type=int, default=1000)
    p.add_argument("--configs", default="sqlite,pg-1,pg-2", help="which, in order (default %(default)s)")
    p.add_argument("--json-out", metavar="FILE")
    args = p.parse_args(argv)
    # What bench/pool.py's measurements read from their arguments, at its defaults.
    pool_args = bench.parse_args(["all", "--pickup-jobs", str(args.pickup_jobs), "--warmup", str(args.warmup),
                                  "--throughput-jobs", str(args.throughput_jobs), "--sandboxed-jobs", "0"])
    return args, pool_args


def ceiling(res):
    """jobs/s at which one pond process doing all of pond's work would use a whole core: 1000 / its
    CPU ms per job (with two replicas, the sum of both: the work one process would have)."""
    ponds = {name: v for name, v in res["cpu_seconds"].items() if name.startswith("pond")}
    ms = 1000.0 * sum(ponds.values()) / res["jobs"]
    return {"pond_pct": [res["cpu_pct"][name] for name in ponds], "pond_cpu_ms_per_job": ms,
            "jobs_per_s_at_one_core": 1000.0 / ms if ms else None}


def run_config(name, cluster, stamp, args, pool_args):
    database = cluster.database("bench") if name.startswith("pg") else None
    tmp = tempfile.mkdtemp(prefix=f"pond-bench-{name}-")
    pool = bench.BenchPool(tmp, database=database, replicas=2 if name == "pg-2" else 1,
                           env={"PGPASSWORD": cluster.password} if database else None)
    if database:        # the server's CPU (its backends) counts as the pool's, not as other load
        pool.pids = lambda: {**bench.BenchPool.pids(pool), "postgres": cluster.pid}
    try:
        t = time.monotonic()
        pool.start()
        print(f"\n=== {name}: started in {time.monotonic() - t:.1f} s: "
              + ", ".join(f"{n} pid {pid}" for n, pid in pool.pids().items()))
        res = {"pickup": bench.bench_pickup(pool, stamp, pool_args)}
        pool.check_alive()
        res["throughput"] = bench.bench_throughput(pool, pool_args)
        pool.check_alive()
        res["ceiling"] = ceiling(res["throughput"])
        c = res["ceiling"]
        print(f"  pond CPU {c['pond_cpu_ms_per_job']:.2f} ms per job "
              f"({' + '.join(f'{p:.0f}%' for p in c['pond_pct'])} of a core): one pond process saturates a "
              f"core at about {c['jobs_per_s_at_one_core']:.0f} jobs/s")
        return res
    finally:
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        pool.stop()
        signal.signal(signal.SIGINT, signal.default_int_handler)
        shutil.rmtree(tmp, ignore_errors=True)


def main(argv=None):
    args, pool_args = parse_args(argv)
    signal.signal(signal.SIGTERM, bench._raise_interrupt)
    results = {"machine": bench.machine_info(), "args": vars(args)}
    m = results["machine"]
    print(f"machine: nproc {m['nproc']} (affinity {m['affinity']}), {m['cpu']}, load average {m['loadavg']}")
    stamp, how = bench.build_stamp()
    cluster = Cluster(durable=True)
    code = 0
    try:
        with cluster.connect() as conn:
            results["postgresql"] = conn.execute("SHOW server_version").fetchone()[0]
        print(f"stamp: {how}; PostgreSQL {results['postgresql']} on port {cluster.port} (fsync on)")
        for name in args.configs.split(","):
            results[name] = run_config(name, cluster, stamp, args, pool_args)
    except (bench.BenchError, KeyboardInterrupt) as e:
        print(f"error: {e or 'interrupted'}", file=sys.stderr)
        results["error"] = str(e) or "interrupted"
        code = 1
    finally:
        cluster.stop()
    results["loadavg_after"] = os.getloadavg()
    print("\nsummary (pickup p50/p99 ms, throughput jobs/s, one pond's ceiling jobs/s):")
    for name in args.configs.split(","):
        r = results.get(name)
        if r:
            s = r["pickup"]["started_ms"]
            print(f"  {name:7} {s['p50']:6.2f} / {s['p99']:6.2f}   {r['throughput']['jobs_per_s']:7.1f}   "
                  f"{r['ceiling']['jobs_per_s_at_one_core']:7.0f}")
    line = json.dumps(results, separators=(",", ":"))
    print(line)
    if args.json_out:
        Path(args.json_out).write_text(line + "\n")
    return code


if __name__ == "__main__":
    sys.exit(main())

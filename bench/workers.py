#!/usr/bin/env python3
"""Benchmark one real orchestrator with many workers: its idle CPU, pickup, and memory per worker.

    python bench/workers.py                      # 10 workers, then 1,000 (about 3 minutes)
    python bench/workers.py --workers 1000 --baseline 10 --json-out FILE

It starts, in a temp dir, a real pond and a real `swarm.py serve` with their DEFAULT holds and
waits (as bench/pool.py does, whose helpers it uses), and then "fleets": one process each
(`python bench/workers.py fleet ...`, started by this script) that holds many light simulated
workers. Each simulated worker is a real enrolled identity with its own pinned keys, and
speaks the worker's protocol through swarm.py's own code, imported: `swarm.enroll`, then
`swarm.heartbeats`, `swarm.claim_loop` (the held, streamed claim), `swarm.Reporter` and
`swarm.finish` (its final report, signed); `speak`, below, is the one place that starts
them. It runs nothing: a job "starts" when the worker sends the datagram
bench/stamp.c would send, and ends done at once. So bench/pool.py's pickup measure works
unchanged: submit -> the worker has the job in hand.

It measures, first with `--baseline` workers, then with `--workers`:
- idle: CPU (utime+stime, all threads) of the orchestrator, pond and the fleets over
  `--idle-seconds`, as % of one core, with no jobs;
- pickup: bench/pool.py's pickup (one job at a time, idle gap U(50,150) ms);
- the orchestrator's resident memory (VmRSS), and its growth per added worker.

This is not a test: it prints numbers and a JSON line; it never fails on a target. Every
wait has a deadline; the processes are stopped and the temp dir removed at the end.
"""

import argparse
import logging
import os
import signal
import socket
import sys
import tempfile
import threading
import time
import types
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import pool as bench                                    # noqa: E402  bench/pool.py: the pool and its measures

TARGET_IDLE_PCT = 5.0            # % of one core: the orchestrator, idle, with 1,000 workers
SIM_STAMP = ["sim-stamp"]        # the job's command: the simulated worker sends the stamp instead of running it
ENROLL_THREADS = 8               # enrollments at once in a fleet
FLEET_STACK = 256 * 1024         # bytes of stack per thread in a fleet (the default 8 MiB is mostly untouched anyway)


# ---------------------------------------------------------------------------
# The fleet: light simulated workers in one process
# ---------------------------------------------------------------------------


def speak(swarm, conf, identity, slots, stop):
    """The worker's side of the protocol once enrolled, as `swarm.worker` runs it: the heartbeat
    and the claim loop, each on a connection of its own (the reporter opens its own when a job
    ends, SimSlots). The one place to change if that protocol changes."""
    def client():
        return swarm.HttpClient(conf.orchestrator, identity["token"], what="orchestrator")

    slots.loops.start("heartbeat", lambda loop: swarm.heartbeats(loop, client(), stop, slots.holding), stop=stop)
    threading.Thread(target=swarm.claim_loop, args=(conf, client(), slots, stop, identity, slots.loops),
                     name="claim", daemon=True).start()
    return client


class SimSlots:
    """What `swarm.claim_loop` hands jobs to (the Slots of a real worker): a job is taken at once,
    stamped, and reported done by `swarm.Reporter` with a result signed by `swarm.finish` (over
    empty output, as a worker signs a job that never ran)."""

    def __init__(self, swarm, signer):
        self.swarm, self.signer, self.loops = swarm, signer, swarm.Loops()
        self.client, self.reporter = None, None
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)

    def add(self, job):
        tag, port = job["command"][-1], int(job["env"]["STAMP_PORT"])
        self.sock.sendto(f"{tag} {time.monotonic():.9f}".encode(), ("127.0.0.1", port))
        if self.reporter is None:          # only the workers that get jobs need the reporter's thread
            self.reporter = self.swarm.Reporter(self.client(), self.loops)
        self.swarm.finish(job, self.reporter, self.signer, "done", exit_code=0)

    def cancel(self, job_id):
        pass                                # the job has ended already

    def holding(self):
        return sorted(self.reporter.pending_finals()) if self.reporter else []


def sim_worker(swarm, url, code, state_dir, i, stop):
    """Enroll one simulated worker (its own keys, pinned by pond), then start its heartbeat and claim loop."""
    state_dir.mkdir(mode=0o700)
    conf = types.SimpleNamespace(enroll_code=code, name=f"sim-{i}", tags=("pool:trusted",),
                                 capabilities=("sandbox.process",), concurrency=1, state_dir=state_dir,
                                 orchestrator=url, claim_wait=swarm.CLAIM_WAIT)
    keys = swarm.worker_keys(state_dir)
    identity = swarm.enroll(conf, swarm.HttpClient(url, what="orchestrator"), swarm.enrollment_keys(keys))
    slots = SimSlots(swarm, swarm.check_keys(conf, identity, keys))
    slots.client = speak(swarm, conf, identity, slots, stop)
    return identity["worker_id"]


def fleet(args):
    """`workers.py fleet`: enroll --workers simulated workers, print a ready line, run until SIGTERM."""
    sys.path.insert(0, str(bench.ROOT))
    import swarm
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    threading.stack_size(FLEET_STACK)
    stop = threading.Event()
    state = Path(args.state)
    state.mkdir(mode=0o700, parents=True)
    with ThreadPoolExecutor(ENROLL_THREADS) as pool:
        ids = list(pool.map(lambda i: sim_worker(swarm, args.orchestrator, args.code, state / f"w{i}", i, stop),
                            range(args.first, args.first + args.workers)))
    print(f"fleet ready: {len(ids)} workers enrolled and claiming", flush=True)
    signal.sigwait({signal.SIGTERM, signal.SIGINT})
    stop.set()
    return 0


# ---------------------------------------------------------------------------
# The driver
# ---------------------------------------------------------------------------


def rss_kib(pid):
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    return 0


def threads_of(pid):
    return len(os.listdir(f"/proc/{pid}/task"))


def start_fleet(pool, first, n, code, timeout):
    """Start a fleet process of n simulated workers and wait until pond has them all online."""
    name = f"fleet-{first}"
    argv = [sys.executable, str(Path(__file__).resolve()), "fleet", "--orchestrator", pool.orch.url(), "--code", code,
            "--workers", str(n), "--first", str(first), "--state", str(pool.tmp / name)]
    proc = bench.Proc(name, argv, pool.tmp / f"{name}.log", pool.env)      # never under py-spy: 1,000 threads
    pool.procs.append(proc)
    t0 = time.monotonic()
    proc.ready(timeout)
    api = bench.Api(pool.url, pool.token)
    try:
        want = first + n
        bench.wait_for(lambda: sum(w["online"] for w in api.call("GET", "/v1/admin/pool/workers")["workers"]) >= want,
                       timeout, f"{want} workers online in pond", interval=0.5)
    finally:
        api.close()
    return time.monotonic() - t0


def measure_idle(pool, args):
    """CPU of each process over --idle-seconds with no jobs, as % of one core; the others' load."""
    time.sleep(args.idle_settle)
    pids = pool.pids()
    before = {name: bench.cpu_ticks(pid) for name, pid in pids.items()}
    sys_before, driver_before = bench.system_ticks(), os.times()
    t0 = time.monotonic()
    time.sleep(args.idle_seconds)
    after = {name: bench.cpu_ticks(pid) for name, pid in pids.items()}
    sys_after, driver_after = bench.system_ticks(), os.times()
    window = time.monotonic() - t0
    pool.check_alive()
    pct = {name: 100.0 * (after[name] - before[name]) / bench.CLK_TCK / window for name in pids}
    ours = (sum(after.values()) - sum(before.values())) / bench.CLK_TCK + (
        driver_after.user + driver_after.system - driver_before.user - driver_before.system)
    return {"seconds": window, "cpu_pct": pct, "load": bench.other_load(sys_before, sys_after, ours, window)}


def phase(pool, args, workers):
    print(f"\n{workers:,} workers:")
    idle = measure_idle(pool, args)
    orch = pool.orch.pid
    res = {"workers": workers, "idle": idle, "orchestrator_rss_kib": rss_kib(orch),
           "orchestrator_threads": threads_of(orch), "pond_rss_kib": rss_kib(pool.pond.pid)}
    print(f"  idle over {idle['seconds']:.0f} s, % of one core: "
          + "  ".join(f"{name} {v:.2f}" for name, v in idle["cpu_pct"].items()))
    print(f"  during the window: {bench.fmt_load(idle['load'])}")
    print(f"  orchestrator: RSS {res['orchestrator_rss_kib'] / 1024:.1f} MiB, {res['orchestrator_threads']} threads; "
          f"pond RSS {res['pond_rss_kib'] / 1024:.1f} MiB")
    res["pickup"] = bench.bench_pickup(pool, SIM_STAMP, args, brief=True)
    pool.check_alive()
    return res


def parse_args(argv):
    p = argparse.ArgumentParser(description="Benchmark one orchestrator with many simulated workers "
                                "(see bench/README.md).")
    p.add_argument("what", nargs="?", default="run", choices=("run", "fleet"),
                   help="run: the benchmark (default); fleet: one fleet process (started by `run`)")
    p.add_argument("--workers", type=int, default=1000, help="workers in the second phase (default %(default)s)")
    p.add_argument("--baseline", type=int, default=10, help="workers in the first phase (default %(default)s)")
    p.add_argument("--idle-seconds", type=float, default=20.0)
    p.add_argument("--idle-settle", type=float, default=5.0,
                   help="s after the fleet is online before the idle window (default %(default)s)")
    p.add_argument("--pickup-jobs", type=int, default=100)
    p.add_argument("--warmup", type=int, default=10)
    p.add_argument("--job-timeout", type=float, default=30.0)
    p.add_argument("--fleet-timeout", type=float, default=300.0, help="s for a fleet to enroll and be online")
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--json-out", metavar="FILE")
    p.add_argument("--keep", action="store_true", help="keep the temp dir (logs, pond.db) and print its path")
    p.add_argument("--max-pending", type=int, metavar="N", help="passed to `swarm.py serve` as --max-pending and "
                   "--max-pending-per-address (default: 4 x --workers; 0: serve's own defaults): every busy worker keeps "
                   "its heartbeat connection open between beats, and the fleet's workers all come from one address")
    p.add_argument("--worker-lost-after", type=float, metavar="S", help="passed to `swarm.py serve`: workers "
                   "heartbeat every S / 2.5 s (default: serve's own, 10 s)")
    p.add_argument("--profile", metavar="DIR", help="run pond and the orchestrator under `py-spy record` and "
                   "write their raw profiles to DIR (as bench/pool.py --profile)")
    # fleet only
    p.add_argument("--orchestrator")
    p.add_argument("--code")
    p.add_argument("--first", type=int, default=0)
    p.add_argument("--state")
    args = p.parse_args(argv)
    if args.what == "run" and not 0 < args.baseline < args.workers:
        p.error("need 0 < --baseline < --workers")
    return args


def run(args):
    signal.signal(signal.SIGTERM, bench._raise_interrupt)
    results = {"machine": bench.machine_info(), "args": {k: v for k, v in vars(args).items() if k != "json_out"}}
    m = results["machine"]
    print(f"machine: nproc {m['nproc']}, {m['cpu']}, {m['implementation']} {m['python']}, load average {m['loadavg']}")
    tmp = tempfile.mkdtemp(prefix="pond-bench-workers-")
    if args.profile:
        Path(args.profile).mkdir(parents=True, exist_ok=True)
    pending = 4 * args.workers if args.max_pending is None else args.max_pending
    serve_args = ("--max-pending", str(pending), "--max-pending-per-address", str(pending)) if pending else ()
    serve_args += ("--worker-lost-after", f"{args.worker_lost_after:g}") if args.worker_lost_after else ()
    pool = bench.BenchPool(tmp, workers=0, profile_dir=args.profile, serve_args=serve_args)
    code = 0
    try:
        pool.start()
        api = bench.Api(pool.url, pool.token)
        enroll = api.call("POST", "/v1/admin/pool/enrollment-codes", {"uses": args.workers, "ttl": 3600},
                          expect=201)["code"]
        api.close()
        print(f"pool:    pond pid {pool.pond.pid}, orchestrator pid {pool.orch.pid}, default holds and waits; "
              f"swarm.py serve {' '.join(serve_args)}\n         simulated workers: concurrency 1, pinned keys, "
              "tags pool:trusted, capabilities sandbox.process, all from 127.0.0.1")
        phases = []
        for first, n in ((0, args.baseline), (args.baseline, args.workers - args.baseline)):
            took = start_fleet(pool, first, n, enroll, args.fleet_timeout)
            print(f"\nfleet of {n:,} simulated workers enrolled and online in pond in {took:.1f} s")
            phases.append(phase(pool, args, first + n))
        results["phases"] = phases
        small, big = phases
        grew = (big["orchestrator_rss_kib"] - small["orchestrator_rss_kib"]) / (big["workers"] - small["workers"])
        idle = big["idle"]["cpu_pct"]["orchestrator"]
        p50 = (small["pickup"]["started_ms"]["p50"], big["pickup"]["started_ms"]["p50"])
        results.update(orchestrator_kib_per_worker=grew, orchestrator_idle_pct=idle, pickup_p50_ms=p50)
        print(f"\nsummary: orchestrator idle with {big['workers']:,} workers {idle:.2f} % of one core "
              f"(target < {TARGET_IDLE_PCT:g} %: {bench.verdict(idle < TARGET_IDLE_PCT)}); "
              f"pickup p50 {p50[0]:.2f} ms with {small['workers']:,}, {p50[1]:.2f} ms with {big['workers']:,}; "
              f"orchestrator memory {grew:.0f} KiB per added worker")
    except bench.BenchError as e:
        print(f"error: {e}", file=sys.stderr)
        results["error"] = str(e)
        code = 1
    except KeyboardInterrupt:
        print("interrupted; stopping", file=sys.stderr)
        results["error"] = "interrupted"
        code = 130
    finally:
        bench.stop_pool(pool, tmp, args)
    return bench.report(results, args, code)


def main(argv=None):
    args = parse_args(argv)
    if args.what == "fleet":
        signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGTERM, signal.SIGINT})     # for sigwait, in every thread
        return fleet(args)
    return run(args)


if __name__ == "__main__":
    sys.exit(main())

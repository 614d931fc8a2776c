#!/usr/bin/env python3
"""How much of the gap to huey the pool's per-job guarantees explain: throughput of this tree
against scratch copies of it with those guarantees switched off, each beside huey in the same run.

    python bench/floor.py --peers-scratch /tmp/peers           # as is, and all three off
    python bench/floor.py --each --reps 2 --assign-ahead 16 --submit-batch 100

The switches (bench/README.md, "floor"), made in a copy in a temp dir, never in this tree:

    signing   the worker signs no result; pond verifies none (specs/attestation.md)
    outbox    the orchestrator keeps its reports for pond in memory, not in swarm.db
    logs      pond, the orchestrator and the workers log at WARNING: no line per job

Each copy runs `bench/pool.py throughput --compare huey` (its own pool, huey alternating), the
variants in turn, round after round. A switch whose code has moved fails loudly: it must apply
exactly once. This is a measurement, not a way to run a pool: a pool like this one loses a job
to a crash and takes a result no one signed.
"""

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

SWITCHES = {
    "signing": [
        ("swarm.py", "    signer = check_keys(s, identity, keys)\n",
         "    signer = check_keys(s, identity, keys)\n    signer = None\n"),
        ("pond/dispatch.py", "    def never_ran():\n", "    return None\n\n    def never_ran():\n"),
    ],
    "outbox": [
        ("swarm.py", "        self.outbox = DurableOutbox(registry)\n",
         "        self.outbox = Outbox()\n        self.outbox.put = lambda msg, release=None, put=self.outbox.put: put(msg)\n"),
    ],
    "logs": [
        ("swarm.py", "    logging.basicConfig(level=logging.INFO, handlers=[handler])\n",
         "    logging.basicConfig(level=logging.WARNING, handlers=[handler])\n"),
        ("pond/logfmt.py", "    logging.basicConfig(level=logging.INFO, handlers=[handler])\n",
         "    logging.basicConfig(level=logging.WARNING, handlers=[handler])\n"),
    ],
}


def copy_tree(dest, switches):
    """The parts of this tree a bench pool runs (pond, swarm.py, bench), with `switches` applied."""
    for part in ("pond", "bench"):
        shutil.copytree(ROOT / part, dest / part, ignore=shutil.ignore_patterns("__pycache__", "out"))
    shutil.copy2(ROOT / "swarm.py", dest / "swarm.py")
    for name in switches:
        for rel, old, new in SWITCHES[name]:
            path = dest / rel
            text = path.read_text()
            if text.count(old) != 1:
                raise SystemExit(f"floor: switch {name!r} no longer applies to {rel} ({text.count(old)} matches "
                                 f"of {old.strip()!r}): update bench/floor.py")
            path.write_text(text.replace(old, new))
    return dest


def run(tree, args):
    """One `pool.py throughput --compare huey` in `tree`: -> (jobs/s, huey jobs/s, ratio, CPU ms a job)."""
    argv = [sys.executable, str(tree / "bench" / "pool.py"), "throughput", "--compare", "huey", "--reps", "1",
            "--peers", args.peers, "--peers-scratch", args.peers_scratch, "--sandboxed-jobs", "0",
            "--throughput-jobs", str(args.throughput_jobs), "--submit-batch", str(args.submit_batch),
            *(() if args.assign_ahead is None else ("--assign-ahead", str(args.assign_ahead)))]
    done = subprocess.run(argv, capture_output=True, text=True, timeout=args.timeout)
    lines = [line for line in done.stdout.splitlines() if line.startswith("{")]
    if done.returncode != 0 or not lines:
        raise SystemExit(f"floor: pool.py failed in {tree} ({done.returncode}):\n{done.stderr[-2000:]}")
    result = json.loads(lines[-1])["throughput"]
    ours, peer = result["none"][0], result["peer"][0]
    return ours["jobs_per_s"], peer["jobs_per_s"], result["ratio"], ours["cpu_ms_per_job"]


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--each", action="store_true", help="also each switch alone (default: as is, and all off)")
    p.add_argument("--reps", type=int, default=1, help="rounds of every variant (default %(default)s)")
    p.add_argument("--throughput-jobs", type=int, default=2000)
    p.add_argument("--assign-ahead", type=int, metavar="N", help="pond serve --assign-ahead N (default: pond's)")
    p.add_argument("--submit-batch", type=int, default=1, metavar="N")
    p.add_argument("--peers", default=str(ROOT.parent / "shared" / "peers-bench"))
    p.add_argument("--peers-scratch", default=str(Path(tempfile.gettempdir()) / "pond-bench-peers"))
    p.add_argument("--timeout", type=float, default=600.0, help="s for one pool.py run (default %(default)s)")
    args = p.parse_args()
    variants = {"as is": []}
    if args.each:
        variants.update({f"{name} off": [name] for name in SWITCHES})
    variants["all three off"] = list(SWITCHES)
    results = {name: [] for name in variants}
    with tempfile.TemporaryDirectory(prefix="pond-floor-") as tmp:
        trees = {name: ROOT if not switches else copy_tree(Path(tmp) / f"v{i}", switches)
                 for i, (name, switches) in enumerate(variants.items())}
        for rep in range(args.reps):
            for name, tree in trees.items():
                results[name].append(run(tree, args))
                jobs, huey, ratio, cpu = results[name][-1]
                print(f"round {rep + 1}  {name:15s} {jobs:6.1f} jobs/s  huey {huey:6.1f}  ratio {ratio:.2f}x  "
                      f"{cpu:.2f} ms of CPU a job", flush=True)
    ahead = "pond's default" if args.assign_ahead is None else args.assign_ahead
    print(f"\n{args.throughput_jobs} x /bin/true, --assign-ahead {ahead}, --submit-batch "
          f"{args.submit_batch}, {args.reps} round(s): the ratio to huey-tuned in the same run, lowest to highest")
    for name, rows in results.items():
        ratios, cpus = [r[2] for r in rows], [r[3] for r in rows]
        print(f"  {name:15s} {min(ratios):.2f}-{max(ratios):.2f}x   CPU a job {min(cpus):.2f}-{max(cpus):.2f} ms")
    print(json.dumps({name: [dict(zip(("jobs_per_s", "huey_jobs_per_s", "ratio", "cpu_ms_per_job"), r))
                             for r in rows] for name, rows in results.items()}))


if __name__ == "__main__":
    main()

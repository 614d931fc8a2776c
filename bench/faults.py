"""The long fault-injection run: tests/test_faults.py with thousands of jobs and minutes of
random kill -9 of workers, the orchestrator and pond, and (as root) full disks under their state
dirs. Prints the figures line of the test and its random seed; --seed replays a run's choices.

    python bench/faults.py                    # 2,000 jobs, 180 s of faults
    python bench/faults.py --jobs 5000 --seconds 300 --nap 1.0
    python bench/faults.py --seed 2478323375  # the same choices as the run that printed this seed
"""

import argparse
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--jobs", type=int, default=2000)
    p.add_argument("--seconds", type=float, default=180, help="how long processes are killed at random")
    p.add_argument("--nap", type=float, default=1.0, help="each job sleeps up to this long")
    p.add_argument("--seed", type=int, help="replay the random choices of the run that printed this seed")
    args = p.parse_args()
    env = dict(os.environ, FAULT_JOBS=str(args.jobs), FAULT_SECONDS=str(args.seconds), FAULT_JOB_NAP=str(args.nap))
    if args.seed is not None:
        env["FAULT_SEED"] = str(args.seed)
    started = time.monotonic()
    done = subprocess.run([sys.executable, "-m", "pytest", "-q", "-s", "tests/test_faults.py", "-k", "random"],
                          cwd=ROOT, env=env, capture_output=True, text=True)
    figures = [line for line in done.stdout.splitlines() if line.startswith("faults:")]
    print("\n".join(figures) or done.stdout[-3000:])
    print(f"{'passed' if done.returncode == 0 else 'FAILED'} in {time.monotonic() - started:.0f} s")
    return done.returncode


if __name__ == "__main__":
    sys.exit(main())

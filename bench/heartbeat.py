"""CPU a real `swarm.py serve` spends per worker heartbeat (specs/protocol.md §7.5), and what
that makes for 1,000 workers at the default rate (one beat every 4 s). Starts pond and one
orchestrator in a temp dir (the test suite's fixtures), enrolls one worker by hand, sends
heartbeats on one kept-alive connection and reads the orchestrator's utime+stime from /proc.

    python bench/heartbeat.py [--beats 5000]
"""

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT / "tests"), str(ROOT)]

import conftest  # noqa: E402  (the tests' real-process fixtures)
import swarm  # noqa: E402


def cpu_seconds(pid):
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--beats", type=int, default=5000)
    p.add_argument("--idle-seconds", type=float, default=10.0)
    args = p.parse_args()
    pool = conftest.Pool(Path(tempfile.mkdtemp(prefix="bench-heartbeat-")))
    try:
        pond = pool.pond()
        orch = pool.orchestrator(pond)
        enrolled = swarm.HttpClient(orch.url()).call("POST", "/v1/worker/enroll", {"code": pond.enrollment_code()})
        beat = swarm.HttpClient(orch.url(), enrolled["token"])
        every = beat.call("POST", "/v1/worker/heartbeat")["every"]
        time.sleep(2)
        before = cpu_seconds(orch.proc.pid)
        time.sleep(args.idle_seconds)
        idle = (cpu_seconds(orch.proc.pid) - before) / args.idle_seconds
        before, started = cpu_seconds(orch.proc.pid), time.monotonic()
        for _ in range(args.beats):
            beat.call("POST", "/v1/worker/heartbeat")
        took = time.monotonic() - started
        per = (cpu_seconds(orch.proc.pid) - before - idle * took) / args.beats
        print(f"heartbeat: {args.beats} beats in {took:.1f} s; orchestrator CPU per beat {per * 1e6:.0f} us "
              f"(idle {idle * 100:.2f}% of a core); 1,000 workers beating every {every:g} s: "
              f"{per * 1000 / every * 100:.1f}% of a core")
    finally:
        pool.stop_all()


if __name__ == "__main__":
    main()

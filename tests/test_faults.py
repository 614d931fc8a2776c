"""Fault injection (issue 4): a few hundred jobs while workers, the orchestrator and pond are
killed with -9 at random moments and restarted on the same state dirs and ports, and workers are
frozen past their grace (SIGSTOP), then killed or let go on (issue 9). Checks: every
accepted job is there and reaches one terminal state, done; each recorded output is exactly
what its process wrote, once; prints the figures. bench/faults.py is the long version."""

import os
import random
import signal
import time

from conftest import JOB_PY, free_port, wait_for

# bench/faults.py runs this same test longer: FAULT_JOBS jobs, FAULT_SECONDS of kills.
JOBS = int(os.environ.get("FAULT_JOBS", 200))
CHAOS_SECONDS = float(os.environ.get("FAULT_SECONDS", 25))
JOB_NAP = float(os.environ.get("FAULT_JOB_NAP", 0.3))
# Each job writes its own id and a number, so a wrong, mixed or doubled output cannot pass.
JOB = [JOB_PY, "-c", f"import os, random, time; time.sleep(random.random() * {JOB_NAP}); "
       "j = os.environ['SWARM_JOB_ID']; print(j, sum(map(ord, j)), j[::-1])"]


def fault_rng():
    """The chaos's random.Random, seeded from $FAULT_SEED to replay a run's faults, else afresh. The
    seed is printed first (pytest shows it with a failure; bench/faults.py prints `faults:` lines)."""
    seed = int(os.environ.get("FAULT_SEED") or time.time_ns() % 2 ** 32)
    print(f"\nfaults: seed {seed} (FAULT_SEED={seed} replays these choices)")
    return random.Random(seed)


def expected(job_id):
    return f"{job_id} {sum(map(ord, job_id))} {job_id[::-1]}\n".encode()


class Cluster:
    """pond, one orchestrator and two workers, each restartable where it was."""

    def __init__(self, pool):
        self.pool = pool
        self.pond_port, self.orch_port = free_port(), free_port()
        self.pond = pool.pond(port=self.pond_port, extra=("--lease", "4", "--max-attempts", "20"))
        self.orch = self.orchestrator()
        self.workers = [pool.worker(self.pond, self.orch, concurrency=2) for _ in range(2)]
        self.kills = {"worker": 0, "frozen worker": 0, "orchestrator": 0, "pond": 0}

    def orchestrator(self, state=None):
        return self.pool.orchestrator(self.pond, port=self.orch_port, state=state, extra=("--worker-lost-after", "3"))

    def kill_and_restart(self, rng):
        kind = rng.choice(["worker", "worker", "frozen worker", "orchestrator", "pond"])
        self.kills[kind] += 1
        if kind == "pond":
            self.pond.proc.kill()
            self.pond = self.pool.pond(state=self.pond.state_dir, port=self.pond_port,
                                       extra=("--lease", "4", "--max-attempts", "20"))
        elif kind == "orchestrator":
            self.orch.kill()
            self.orch = self.orchestrator(state=self.orch.state_dir)
        else:
            i = rng.randrange(len(self.workers))
            if kind == "frozen worker":     # silent past the grace with its connections held open: lost
                os.kill(self.workers[i].proc.pid, signal.SIGSTOP)
                time.sleep(5)                   # the grace is 3 s
                if rng.random() < 0.5:      # back: it drops what it lost, and its late results are refused
                    os.kill(self.workers[i].proc.pid, signal.SIGCONT)
                    return
            self.workers[i].kill()          # kill -9 (a frozen one while its connections are still held)
            self.workers[i] = self.pool.worker(self.pond, self.orch, concurrency=2, state=self.workers[i].state_dir,
                                               wait_online=False)


def terminal_counts(pond):
    counts = pond.client.get("/v1/jobs", limit=1)["counts"]
    return sum(counts.get(s, 0) for s in ("done", "failed", "cancelled")), counts


def test_jobs_survive_random_kill_9_of_every_process(pool):
    rng = fault_rng()
    cluster = Cluster(pool)
    ids = [cluster.pond.submit(JOB)["id"] for _ in range(JOBS)]
    deadline = time.monotonic() + CHAOS_SECONDS
    while time.monotonic() < deadline and terminal_counts(cluster.pond)[0] < JOBS:
        time.sleep(rng.uniform(0.5, 2.5))
        cluster.kill_and_restart(rng)
    wait_for(lambda: terminal_counts(cluster.pond)[0] == JOBS, 180 + JOBS * JOB_NAP / 2, interval=0.5,
             what="every job to end")

    jobs = {i: cluster.pond.job(i) for i in ids}
    listed = cluster.pond.client.get("/v1/jobs", limit=1)["counts"]
    missing = [i for i in ids if jobs[i] is None] + (["count"] if sum(listed.values()) != JOBS else [])
    wrong = [i for i in ids if i in jobs and (jobs[i]["state"] != "done"
                                             or cluster.pond.output(i)["stdout"] != expected(i))]
    retries = sum(j["attempt"] - 1 for j in jobs.values())
    print(f"\nfaults: jobs {JOBS}, kills worker {cluster.kills['worker']} frozen worker "
          f"{cluster.kills['frozen worker']} orchestrator {cluster.kills['orchestrator']} pond "
          f"{cluster.kills['pond']}, retries {retries}, "
          f"lost {len(missing)}, wrong or duplicated {len(wrong)}")
    assert len(jobs) == JOBS and not missing, missing
    assert not wrong, [(i, jobs[i]["state"], jobs[i]["error"], cluster.pond.output(i)) for i in wrong[:5]]
    assert all(j["attested"] is True for j in jobs.values())

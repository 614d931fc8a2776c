"""Fault injection (issue 4): a few hundred jobs while workers, the orchestrator and pond are
killed with -9 at random moments, and their disks fill up, and are restarted on the same state
dirs and ports, and workers are frozen past their grace (SIGSTOP), then killed or let go on
(issue 9). Checks: every accepted job is there and reaches one terminal state, done; each
recorded output is exactly what its process wrote, once; prints the figures and the random seed
(FAULT_SEED=N replays the same choices). bench/faults.py is the long version.

And a full disk under each process's state dir in turn (issue 9), on a small tmpfs (root only;
with CI set the test fails rather than skip): pond answers 503 storage_unavailable, no log has a
traceback, /healthz and `swarm.py status` name what fails, and once space is freed every job
completes, without a restart."""

import contextlib
import errno
import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import JOB_PY, SWARM, free_port, run, wait_for

# bench/faults.py runs this same test longer: FAULT_JOBS jobs, FAULT_SECONDS of kills.
JOBS = int(os.environ.get("FAULT_JOBS", 200))
CHAOS_SECONDS = float(os.environ.get("FAULT_SECONDS", 25))
JOB_NAP = float(os.environ.get("FAULT_JOB_NAP", 0.3))
# Each job writes its own id and a number, so a wrong, mixed or doubled output cannot pass.
JOB = [JOB_PY, "-c", f"import os, random, time; time.sleep(random.random() * {JOB_NAP}); "
       "j = os.environ['SWARM_JOB_ID']; print(j, sum(map(ord, j)), j[::-1])"]
DISK_SIZE = f"{16 + JOBS // 50}m"      # each process's tmpfs in the random run: room for its state, not more


def fault_rng():
    """The chaos's random.Random, seeded from $FAULT_SEED to replay a run's faults, else afresh. The
    seed is printed first (pytest shows it with a failure; bench/faults.py prints `faults:` lines)."""
    seed = int(os.environ.get("FAULT_SEED") or time.time_ns() % 2 ** 32)
    print(f"\nfaults: seed {seed} (FAULT_SEED={seed} replays these choices)")
    return random.Random(seed)


def expected(job_id):
    return f"{job_id} {sum(map(ord, job_id))} {job_id[::-1]}\n".encode()


def can_mount():
    """Whether this run can mount a tmpfs; with CI set it must (CI runs as root)."""
    if os.getuid() == 0:
        return True
    if os.environ.get("CI"):
        pytest.fail("the full-disk faults need root to mount a tmpfs, and CI runs as root")
    return False


class Disk:
    """A small tmpfs mounted at `path`, to be filled up and freed again."""

    def __init__(self, path, size):
        self.path = Path(path)
        self.path.mkdir()
        subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size},mode=0700", "tmpfs", str(self.path)], check=True)
        self.filler = self.path / "filler"

    def fill(self):
        """Write zeros until the disk says ENOSPC."""
        fd = os.open(self.filler, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
        try:
            for size in (1 << 20, 4096, 1):
                with contextlib.suppress(OSError):
                    while True:
                        os.write(fd, bytes(size))
        finally:
            os.close(fd)
        with pytest.raises(OSError) as full:
            (self.path / "probe").write_bytes(bytes(8192))
        assert full.value.errno == errno.ENOSPC

    def free(self):
        self.filler.unlink(missing_ok=True)
        (self.path / "probe").unlink(missing_ok=True)

    def unmount(self):
        if subprocess.run(["umount", str(self.path)], capture_output=True).returncode:
            subprocess.run(["umount", "-l", str(self.path)], check=True)      # still busy: detach it


@contextlib.contextmanager
def small_disk(pool, path, size="4m"):
    """A Disk whose processes (all of `pool`'s) are stopped before it is unmounted, whatever happens."""
    if not can_mount():
        pytest.skip("needs root to mount a tmpfs")
    disk = Disk(path, size)
    try:
        yield disk
    finally:
        pool.stop_all()
        disk.unmount()


class Cluster:
    """pond, one orchestrator and two workers, each restartable where it was; with `disks`, each
    process's state dir is a tmpfs of its own that a fault can fill up for a moment."""

    def __init__(self, pool, disks=None):
        self.pool, self.disks = pool, disks or {}
        self.pond_port, self.orch_port = free_port(), free_port()
        self.pond = pool.pond(port=self.pond_port, extra=("--lease", "4", "--max-attempts", "20"),
                              state=self._state("pond"))
        self.orch = self.orchestrator(state=self._state("orchestrator"))
        self.workers = [pool.worker(self.pond, self.orch, concurrency=2, state=self._state(f"worker{i}"))
                        for i in range(2)]
        self.kills = {"worker": 0, "frozen worker": 0, "orchestrator": 0, "pond": 0, "full disk": 0}

    def _state(self, name):
        return self.disks[name].path if name in self.disks else None

    def orchestrator(self, state=None):
        return self.pool.orchestrator(self.pond, port=self.orch_port, state=state, extra=("--worker-lost-after", "3"))

    def kill_and_restart(self, rng):
        kind = rng.choice(["worker", "worker", "frozen worker", "orchestrator", "pond"]
                          + (["full disk"] if self.disks else []))
        self.kills[kind] += 1
        if kind == "full disk":        # full for a moment, freed before anything restarts on it
            disk = self.disks[rng.choice(sorted(self.disks))]
            disk.fill()
            time.sleep(rng.uniform(0.5, 3.0))
            disk.free()
        elif kind == "pond":
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


def test_jobs_survive_random_kill_9_of_every_process(pool, tmp_path):
    rng = fault_rng()
    names = ("pond", "orchestrator", "worker0", "worker1")
    disks = {name: Disk(tmp_path / f"{name}-disk", DISK_SIZE) for name in names} if can_mount() else {}
    try:
        faults_with_disks(pool, rng, disks)
    finally:
        pool.stop_all()
        for disk in disks.values():
            disk.unmount()


def faults_with_disks(pool, rng, disks):
    cluster = Cluster(pool, disks)
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
          f"{cluster.kills['pond']}, full disks {cluster.kills['full disk']}, retries {retries}, "
          f"lost {len(missing)}, wrong or duplicated {len(wrong)}")
    assert len(jobs) == JOBS and not missing, missing
    assert not wrong, [(i, jobs[i]["state"], jobs[i]["error"], cluster.pond.output(i)) for i in wrong[:5]]
    assert all(j["attested"] is True for j in jobs.values())


# -- a full disk under one process's state dir (issue 9) ----------------------------------------

SLOW = [JOB_PY, "-c", "import time; time.sleep(2); print('slow')"]
QUICK = [JOB_PY, "-c", "print('quick')"]
RECOVERY = 60          # s every job has to end once space is freed


def swarm_status(orch):
    done = run([sys.executable, SWARM, "status", "--state-dir", orch.state_dir, "--token-file", orch.token_file])
    return done.returncode, done.stdout + done.stderr


def healthz(url):
    import urllib.error
    import urllib.request
    try:
        with urllib.request.urlopen(f"{url}/healthz", timeout=10) as resp:
            return resp.status, json.loads(resp.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


def all_end(pond, ids, timeout=RECOVERY):
    def states():
        now = [pond.job(i)["state"] for i in ids]
        return all(s in ("done", "failed", "cancelled") for s in now) and now

    assert wait_for(states, timeout, interval=0.25, what="every job to end after space was freed") == \
        ["done"] * len(ids), [(i, pond.job(i)["state"], pond.job(i)["error"]) for i in ids]


def assert_no_traceback(*procs):
    for proc in procs:
        assert "Traceback" not in proc.stderr(), proc.stderr()[-3000:]


@pytest.mark.sqlite_only("a full disk under pond's state dir fills pond.db; on PostgreSQL the state dir holds "
                        "no data (a lost database is tests/test_store_pg.py's and test_failover.py's)")
def test_pond_on_a_full_disk_answers_503_serves_reads_and_recovers(pool, tmp_path):
    with small_disk(pool, tmp_path / "pond-disk") as disk:
        pond = pool.pond(state=disk.path)
        orch = pool.orchestrator(pond)
        worker = pool.worker(pond, orch, concurrency=2)
        accepted = [pond.submit(SLOW)["id"] for _ in range(4)]
        wait_for(lambda: [pond.job(i)["state"] for i in accepted].count("running") == 2, 20,
                 what="two jobs running")
        disk.fill()

        refused = [pond.api("POST", "/v1/jobs", {"command": QUICK, "sandbox": {"profile": "none"}}) for _ in range(20)]
        assert {status for status, _ in refused} == {503}, refused[:2]
        error = refused[0][1]["error"]
        assert error["code"] == "storage_unavailable" and "full" in error["message"], error
        assert str(disk.path) in error["hint"] and "recovers by itself" in error["hint"], error
        assert pond.api("GET", "/v1/jobs")[0] == 200 and pond.api("GET", f"/v1/jobs/{accepted[0]}")[0] == 200
        status, health = healthz(pond.url)
        assert status == 503 and health["ok"] is False and health["storage"]["state"] == "failing", health
        assert health["error"]["code"] == "unhealthy" and "storage" in health["error"]["message"], health
        # The running jobs end while pond cannot store their reports: the orchestrator says why it retries.
        code, out = wait_for(lambda: (r := swarm_status(orch))[0] == 1 and "serve: push retrying" in r[1] and r, 30,
                             what="`swarm.py status` to show the push loop retrying")
        assert "health: FAILING" in out and "503 storage_unavailable" in out, out

        disk.free()
        all_end(pond, accepted)
        wait_for(lambda: healthz(pond.url)[0] == 200, 15, what="pond's /healthz to be healthy again")
        assert pond.wait_job(pond.submit(QUICK)["id"])["state"] == "done"
        assert [pond.output(i)["stdout"] for i in accepted] == [b"slow\n"] * 4
        wait_for(lambda: swarm_status(orch)[0] == 0, 20, what="`swarm.py status` to say all is well")
        assert pond.proc.alive() and orch.alive() and worker.alive()
        assert_no_traceback(pond.proc, orch, worker)
        storage_lines = [line for line in pond.proc.stderr().splitlines() if "storage:" in line]
        assert 1 <= len(storage_lines) <= 3, storage_lines        # 20+ refused requests, one line


def test_an_orchestrator_on_a_full_disk_retries_and_recovers(pool, tmp_path):
    with small_disk(pool, tmp_path / "orch-disk") as disk:
        pond = pool.pond()
        orch = pool.orchestrator(pond, state=disk.path)
        worker = pool.worker(pond, orch, concurrency=2)
        running = pond.submit(SLOW)["id"]          # its final report reaches a full disk: 503, then retried
        pond.wait_job(running, ("running",))
        disk.fill()
        ids = [running] + [pond.submit(QUICK)["id"] for _ in range(6)]

        status, health = wait_for(lambda: (h := healthz(orch.url()))[0] == 503 and h, 20,
                                  what="the orchestrator's /healthz to say it is unhealthy")
        poll = next(v for v in health["loops"] if v["name"] == "poll")
        assert poll["state"] == "retrying" and "full" in poll["error"] and poll["since"], health
        assert health["storage"]["state"] == "failing" and "poll retrying" in health["error"]["message"], health
        code, out = swarm_status(orch)
        assert code == 1 and "health: FAILING" in out and "failing: serve: poll retrying since" in out, out
        assert all(pond.job(i)["state"] != "failed" for i in ids)

        wait_for(lambda: "503 storage_unavailable to a state report" in worker.stderr(), 20,
                 what="the worker to retry its final report")

        disk.free()
        all_end(pond, ids)
        assert pond.output(running)["stdout"] == b"slow\n"
        wait_for(lambda: healthz(orch.url())[0] == 200, 15, what="the orchestrator's /healthz to be healthy again")
        assert swarm_status(orch)[0] == 0
        assert orch.alive() and worker.alive()
        assert_no_traceback(orch, worker, pond.proc)
        full_lines = [line for line in orch.stderr().splitlines() if "full" in line]
        assert 1 <= len(full_lines) <= 4, full_lines


def test_a_worker_on_a_full_disk_keeps_its_jobs_and_runs_them_once_it_can(pool, tmp_path):
    with small_disk(pool, tmp_path / "worker-disk") as disk:
        pond = pool.pond()
        orch = pool.orchestrator(pond)
        worker = pool.worker(pond, orch, state=disk.path)
        disk.fill()
        ids = [pond.submit(QUICK)["id"] for _ in range(3)]

        code, out = wait_for(lambda: (r := swarm_status(orch))[0] == 1 and "slot-0 retrying" in r[1] and r, 30,
                             what="`swarm.py status` to show the worker's slot retrying")
        assert f"failing: worker {worker.worker_id}: slot-0 retrying since" in out and "space" in out, out
        assert all(pond.job(i)["state"] in ("queued", "assigned") for i in ids), [pond.job(i) for i in ids]

        disk.free()
        all_end(pond, ids)
        wait_for(lambda: swarm_status(orch)[0] == 0, 20, what="`swarm.py status` to say all is well")
        assert worker.alive()
        assert_no_traceback(worker, orch, pond.proc)

"""pond serve --assign-ahead N (issue 9, throughput): each worker may hold N jobs beyond its free
slots, waiting on the worker, which starts one as soon as a slot frees, instead of a slot idling
through the round trip to pond and back. Real processes: pond, `swarm.py serve`, one worker with
one slot. What a job waiting ahead must not suffer: pond's timeout backstop (its timeout counts
from its start), or a cancel that waits for the slot."""

import os
import signal
import sys
import time

from conftest import JOB_PY, run, wait_for
from test_idle_scale import given_while_stopped

SLEEPS = "import time; print('long', flush=True); time.sleep({})"


def started(pond, job_id):
    return wait_for(lambda: (j := pond.job(job_id))["state"] == "running" and j, 20, what=f"{job_id} running")


def test_a_worker_holds_a_job_ahead_and_starts_it_when_its_slot_frees(pool):
    # A short lease makes pond's backstop look every second, with a margin of 2 s: a job waiting
    # ahead behind a 12 s job with timeout 1 and no grace would be failed at 3 s if its wait counted.
    pond = pool.pond(extra=("--assign-ahead", "1", "--lease", "4"))
    orch = pool.orchestrator(pond)
    worker = pool.worker(pond, orch, concurrency=1)
    long = pond.submit([JOB_PY, "-c", SLEEPS.format(12)])
    started(pond, long["id"])
    ahead = pond.submit([JOB_PY, "-c", "print('ahead')"], timeout=1, cancel_grace=0)
    queued = pond.submit([JOB_PY, "-c", "print('queued')"])
    held = wait_for(lambda: (j := pond.job(ahead["id"]))["state"] == "assigned" and j, 10, what="assigned ahead")
    assert held["worker"] == worker.worker_id
    time.sleep(4)                                   # past when the backstop would fail it, were it running
    assert pond.job(ahead["id"])["state"] == "assigned" and pond.job(long["id"])["state"] == "running"
    third = pond.job(queued["id"])
    assert third["state"] == "queued" and third["waiting"] is not None, third    # one ahead, not two

    first = pond.wait_job(long["id"])
    done = pond.wait_job(ahead["id"])
    assert first["state"] == done["state"] == "done", (first, done)
    assert pond.output(ahead["id"])["stdout"] == b"ahead\n" and done["attempt"] == 1
    # In order: pond recorded its start only after the end of the job in the slot.
    assert done["started_at"] >= first["finished_at"] - 0.5, (first, done)
    assert pond.wait_job(queued["id"])["state"] == "done"


def test_a_job_waiting_ahead_is_cancelled_at_once_not_when_the_slot_frees(pool):
    pond = pool.pond(extra=("--assign-ahead", "1",))
    orch = pool.orchestrator(pond)
    pool.worker(pond, orch, concurrency=1)
    long = pond.submit([JOB_PY, "-c", SLEEPS.format(60)])
    started(pond, long["id"])
    ahead = pond.submit([JOB_PY, "-c", "print('never')"])
    wait_for(lambda: pond.job(ahead["id"])["state"] == "assigned", 10, what="assigned ahead")
    asked = time.monotonic()
    pond.client.post(f"/v1/jobs/{ahead['id']}/cancel", {})
    ended = pond.wait_job(ahead["id"], timeout=10)
    assert ended["state"] == "cancelled" and time.monotonic() - asked < 8, ended
    assert "before it started" in ended["error"] and pond.output(ahead["id"])["stdout"] == b""
    assert pond.job(long["id"])["state"] == "running"          # the slot's job goes on
    pond.client.post(f"/v1/jobs/{long['id']}/cancel", {})
    assert pond.wait_job(long["id"], timeout=30)["state"] == "cancelled"


def test_assign_ahead_out_of_range_is_refused_with_the_range(tmp_path):
    for value in ("-1", "65"):
        done = run([sys.executable, "-m", "pond", "serve", "--bind", "127.0.0.1:0", "--state-dir", str(tmp_path / value),
                    "--assign-ahead", value], timeout=30)
        assert done.returncode != 0 and "assign ahead" in done.stderr and "0 to 64" in done.stderr, done.stderr


def test_a_stopped_worker_hands_back_the_jobs_it_held_ahead(pool):
    """Not cancelled, as a job not yet started used to be at a stop: back to pond, for a new attempt.
    Only this worker fits it (another worker with a free slot would have asked for it back
    already, the test below), so it runs when the worker is back."""
    pond = pool.pond(extra=("--assign-ahead", "1",))
    orch = pool.orchestrator(pond)
    first = pool.worker(pond, orch, tags="pool:a", concurrency=1)
    pool.worker(pond, orch, concurrency=1)                  # online, with nothing to do, and no pool:a
    long = pond.submit([JOB_PY, "-c", SLEEPS.format(60)], tags=["pool:a"])
    started(pond, long["id"])
    ahead = pond.submit([JOB_PY, "-c", "print('handed back')"], tags=["pool:a"])
    wait_for(lambda: pond.job(ahead["id"])["state"] == "assigned", 10, what="assigned ahead")
    time.sleep(1)               # pond -> orchestrator -> worker: a few ms; then the first worker holds it
    assert first.stop() == 0
    assert pond.wait_job(long["id"], timeout=30)["state"] == "cancelled"       # a stop cancels what runs
    def handed_back():
        job = pond.job(ahead["id"])
        return any(e["event"] == "cannot_start" for e in job["events"]) and job

    back = wait_for(handed_back, 20, what="handed back")
    assert any("worker stopped before the job started" in e["message"] for e in back["events"]), back["events"]
    pool.worker(pond, orch, tags="pool:a", concurrency=1, state=first.state_dir)     # the same worker, back
    done = pond.wait_job(ahead["id"], timeout=30)
    assert done["state"] == "done" and done["worker"] == first.worker_id and done["attempt"] == 2, done
    assert pond.output(ahead["id"])["stdout"] == b"handed back\n"


def test_a_job_waiting_ahead_moves_to_a_worker_whose_slot_frees_first(pool):
    """A job given ahead to a worker busy with a long job does not wait for that job: once another
    worker has a free slot and nothing to take, pond asks the job back (withdrawal) and gives it
    there. Without that, it would wait the whole minute."""
    pond = pool.pond(extra=("--assign-ahead", "2"))
    orch = pool.orchestrator(pond)
    first = pool.worker(pond, orch, concurrency=1)
    second = pool.worker(pond, orch, concurrency=1)
    long = pond.submit([JOB_PY, "-c", SLEEPS.format(60)])          # the first worker: both free, it enrolled first
    assert started(pond, long["id"])["worker"] == first.worker_id
    short = pond.submit([JOB_PY, "-c", SLEEPS.format(3)])          # the second: it has more free
    assert started(pond, short["id"])["worker"] == second.worker_id
    moved = pond.submit([JOB_PY, "-c", "print('moved')"])
    held = wait_for(lambda: (j := pond.job(moved["id"]))["state"] == "assigned" and j, 10, what="assigned ahead")
    assert held["worker"] == first.worker_id, held                 # ahead, behind the long job

    freed = pond.wait_job(short["id"], timeout=30)
    done = pond.wait_job(moved["id"], timeout=20)
    assert done["state"] == "done" and done["worker"] == second.worker_id and done["attempt"] == 2, done
    # Asked back within WITHDRAW_AFTER (1 s) and a poll's liveness check (2 s) of the free slot, with room.
    assert done["finished_at"] - freed["finished_at"] < 8, (freed, done)
    assert any(e["event"] == "withdrawn" and "withdrawn before it started" in e["message"] for e in done["events"]), \
        done["events"]
    assert pond.output(moved["id"])["stdout"] == b"moved\n"
    assert pond.job(long["id"])["state"] == "running"               # the long job was never disturbed
    pond.client.post(f"/v1/jobs/{long['id']}/cancel", {})
    assert pond.wait_job(long["id"], timeout=30)["state"] == "cancelled"


def test_a_job_its_worker_never_claimed_is_given_back_by_the_orchestrator(pool):
    """The other end of a withdrawal: the worker is stopped (SIGSTOP) and its claim has ended, so the
    job pond gave it waits in the orchestrator's queue for it. Asked back, the orchestrator gives it
    back itself, and it runs on the worker that is free, long before the stopped one is found lost."""
    pond = pool.pond()                                              # the default: --assign-ahead 4
    orch = pool.orchestrator(pond)                                  # the default grace: lost after 10 s
    stopped = pool.worker(pond, orch, tags="lane:a")
    os.kill(stopped.proc.pid, signal.SIGSTOP)
    try:
        time.sleep(6)                   # past its claim's hold (5 s): nothing takes from its queue now
        done, free, took = given_while_stopped(pool, pond, orch, stopped, "lane:a", timeout=30)
    finally:
        os.kill(stopped.proc.pid, signal.SIGCONT)
    assert done["state"] == "done" and done["worker"] == free.worker_id and done["attempt"] == 2, done
    first = done["events"][0]
    assert first["event"] == "withdrawn" and "withdrawn before its worker claimed it" in first["message"], done["events"]
    assert took < 10, took                                          # not the lost worker's path
    assert pond.output(done["id"])["stdout"] == b"ran\n"

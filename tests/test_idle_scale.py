"""1,000 workers on one orchestrator (issue 9, item 8): an idle worker sends no heartbeat
(specs/protocol.md §7.5). It has nothing to lose, and its held claim shows it connected; 1,000
idle workers beating every 4 s cost the orchestrator a quarter of a core (bench/workers.py). What
the heartbeat guarantees still holds: a worker given a job must beat, or the job runs elsewhere
within the grace, and an idle worker that dies is offline within seconds (its claim's connection
closed). Real processes; pond's lease stays 60 s, so only the orchestrator can move a job this soon."""

import os
import signal
import time

from conftest import JOB_PY, wait_for
from test_worker_loss import lost_events, running_on


def online(pond, worker_id):
    return any(w["id"] == worker_id and w["online"] for w in pond.client.get("/v1/admin/pool/workers")["workers"])


def test_an_idle_worker_stopped_past_the_grace_is_not_lost_until_it_is_given_a_job(pool):
    pond = pool.pond()
    orch = pool.orchestrator(pond, extra=("--worker-lost-after", "2"))      # a busy worker beats every 0.8 s
    idle = pool.worker(pond, orch, tags="lane:a")
    wait_for(lambda: online(pond, idle.worker_id), 10, what="the worker online")
    os.kill(idle.proc.pid, signal.SIGSTOP)              # alive, its held claim open, silent
    try:
        time.sleep(4)                                   # twice the grace
        assert "lost" not in orch.stderr(), orch.stderr()
        assert online(pond, idle.worker_id)
        # Given a job, it has 2 s to beat: it cannot, so the job runs on another worker.
        job = pond.submit([JOB_PY, "-c", "print('ran')"], tags=["lane:a"])
        wait_for(lambda: pond.job(job["id"])["worker"] == idle.worker_id, 10, what="the job given to the stopped worker")
        given = time.monotonic()
        other = pool.worker(pond, orch, tags="lane:a")
        running_on(pond, job["id"], 2, other.worker_id, 15)
        took = time.monotonic() - given
    finally:
        os.kill(idle.proc.pid, signal.SIGCONT)
    print(f"\njob given to a stopped idle worker (grace 2 s) to running on another: {took:.1f} s")
    assert took < 8, took
    done = pond.wait_job(job["id"])
    assert done["state"] == "done" and done["attempt"] == 2, done
    (event,) = lost_events(done)
    assert event["worker"] == idle.worker_id and event["attempt"] == 1, done["events"]
    assert f"worker {idle.worker_id} lost (no heartbeat for" in orch.stderr()


def test_an_idle_worker_killed_is_offline_within_seconds(pool):
    pond = pool.pond()
    orch = pool.orchestrator(pond)                      # the default grace, 10 s
    idle = pool.worker(pond, orch)
    wait_for(lambda: online(pond, idle.worker_id), 10, what="the worker online")
    time.sleep(1)
    killed = time.monotonic()
    idle.kill()                                         # kill -9: its held claim's connection closes
    wait_for(lambda: not online(pond, idle.worker_id), 10, interval=0.1, what="the killed worker offline")
    took = time.monotonic() - killed
    print(f"\nkill -9 of an idle worker to offline in pond: {took:.1f} s")
    assert took < 8, took                               # not WORKER_GRACE (15 s) after its claim ended
    assert f"worker {idle.worker_id} lost (its connection closed" in orch.stderr()

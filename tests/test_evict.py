"""Eviction (issue 4): `swarm.py evict WORKER [--drain]` and `pond admin evict`. The worker takes
no new job; without --drain its running job is stopped and runs again elsewhere as a new
attempt, with --drain it finishes first; then the worker is disconnected (exit 4) and shown
as evicted. Real processes."""

import sys

from conftest import JOB_PY, SWARM, run, wait_for

# Attempt 1 naps $NAP seconds; a later attempt (the job run again elsewhere) does not.
SLOW = [JOB_PY, "-c", "import os, time; a = os.environ['SWARM_ATTEMPT']; "
        "time.sleep(float(os.environ.get('NAP', '3')) if a == '1' else 0); print('attempt', a, 'done')"]


def operator(orch, *args):
    return run([sys.executable, SWARM, *args, "--orchestrator", orch.url(), "--token", "pool-secret"])


def workers(pond):
    return {w["id"]: w for w in pond.client.get("/v1/admin/pool/workers")["workers"]}


def running_on(pond, job_id):
    job = pond.job(job_id)
    return job["state"] in ("assigned", "running") and job["worker"]


def test_evict_without_drain_requeues_the_running_job_elsewhere_and_disconnects_the_worker(pool):
    pond = pool.pond()
    orch = pool.orchestrator(pond)
    first = pool.worker(pond, orch, tags="lane:e")
    job = pond.submit(SLOW, tags=["lane:e"], env={"NAP": "30"})
    assert wait_for(lambda: running_on(pond, job["id"]), 20) == first.worker_id
    second = pool.worker(pond, orch, tags="lane:e")
    done = operator(orch, "evict", first.worker_id)
    assert done.returncode == 0 and "1 job(s) queued again" in done.stdout, done.stderr
    assert wait_for(lambda: first.proc.poll() is not None, 30, what="the evicted worker to exit") and \
        first.proc.returncode == 4
    assert "evicted" in first.stderr()
    moved = wait_for(lambda: (j := pond.job(job["id"]))["attempt"] == 2 and j, 20, what="attempt 2")
    assert moved["worker"] == second.worker_id
    assert [e["event"] for e in moved["events"]] == ["evicted"]
    assert workers(pond)[first.worker_id]["evicted"] is True
    # No new job for it, ever: the next one goes to the other worker.
    later = pond.submit(SLOW, tags=["lane:e"], env={"NAP": "0"})
    assert pond.wait_job(later["id"], timeout=20)["worker"] == second.worker_id


def test_evict_with_drain_lets_the_running_job_finish_first(pool):
    pond = pool.pond()
    orch = pool.orchestrator(pond)
    w = pool.worker(pond, orch, tags="lane:d", concurrency=2)        # a slot stays free while it drains
    job = pond.submit(SLOW, tags=["lane:d"], env={"NAP": "3"})
    wait_for(lambda: pond.job(job["id"])["state"] == "running", 20, what="the job running")
    done = operator(orch, "evict", w.worker_id, "--drain")
    assert done.returncode == 0 and "finish first" in done.stdout, done.stderr
    queued = pond.submit(SLOW, tags=["lane:d"], env={"NAP": "0"})      # nobody else can take it
    assert "free slot" not in pond.job(queued["id"])["waiting"]["reason"]     # the draining worker does not count
    finished = pond.wait_job(job["id"], timeout=30)
    assert finished["state"] == "done" and finished["attempt"] == 1 and finished["attested"] is True, finished
    assert wait_for(lambda: w.proc.poll() is not None, 30, what="the drained worker to exit") and \
        w.proc.returncode == 4
    assert pond.job(queued["id"])["state"] == "queued"


def test_pond_admin_evict_reaches_the_worker_through_its_orchestrator(pool):
    pond = pool.pond()
    orch = pool.orchestrator(pond)
    w = pool.worker(pond, orch)
    done = pond.cli("admin", "evict", w.worker_id)
    assert done.returncode == 0 and "0 job(s) queued again" in done.stdout, done.stderr
    assert wait_for(lambda: w.proc.poll() is not None, 30, what="the worker to exit") and w.proc.returncode == 4
    listed = pond.cli("admin", "workers")
    assert "yes" in listed.stdout.split(w.worker_id)[1].splitlines()[0]
    unknown = pond.cli("admin", "evict", "w_nope")
    assert unknown.returncode != 0 and "no worker" in unknown.stderr

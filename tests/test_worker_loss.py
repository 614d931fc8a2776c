"""Lost workers (issue 9, item 3): a worker proves it is alive with a heartbeat to its
orchestrator (specs/protocol.md §7.5). One killed with -9, or stopped past the grace, is lost:
its orchestrator releases its attempts to pond at once (§4, heartbeat `released`), and the job
runs again elsewhere within seconds instead of a whole lease; the lost worker's late result is
refused. A worker paused for less than the grace keeps its job. Real processes; pond's lease
stays 60 s, so only the orchestrator can make a job run again this soon."""

import base64
import os
import signal
import time

from conftest import JOB_PY, wait_for

# Attempt 1 says it started, then naps (long enough to be lost meanwhile); a later attempt ends at once.
NAP_FIRST = ("import os, sys, time; a = os.environ['SWARM_ATTEMPT']\n"
             "print('started', a, flush=True)\n"
             "if a == '1': time.sleep(float(sys.argv[1]))\n"
             "print('attempt', a, flush=True)")


def running_on(pond, job_id, attempt, worker_id, timeout):
    return wait_for(lambda: (j := pond.job(job_id))["attempt"] == attempt and j["worker"] == worker_id
                    and j["state"] in ("running", "done") and j, timeout,
                    what=f"attempt {attempt} running on {worker_id}")


def lost_events(job):
    return [e for e in job["events"] if e["event"] == "worker_lost"]


def chunks_of(pond, job_id, attempt):
    page = pond.client.get(f"/v1/jobs/{job_id}/logs")
    return b"".join(base64.b64decode(c["data"]) for c in page["chunks"] if c["attempt"] == attempt)


def test_a_job_whose_worker_is_killed_runs_again_elsewhere_within_10_s(pool):
    pond = pool.pond()                                  # the default lease, 60 s
    orch = pool.orchestrator(pond)                      # the default grace
    first = pool.worker(pond, orch, tags="lane:a")
    job = pond.submit([JOB_PY, "-c", NAP_FIRST, "120"], tags=["lane:a"])
    running_on(pond, job["id"], 1, first.worker_id, 20)
    second = pool.worker(pond, orch, tags="lane:a")
    killed = time.monotonic()
    first.kill()                                        # kill -9: its connections close, nothing is said
    running_on(pond, job["id"], 2, second.worker_id, 15)
    took = time.monotonic() - killed
    print(f"\nkill -9 of the worker to the job running again on another worker: {took:.1f} s")
    assert took < 10, took
    done = pond.wait_job(job["id"])
    assert done["state"] == "done" and done["attempt"] == 2 and done["worker"] == second.worker_id, done
    (event,) = lost_events(done)
    assert event["worker"] == first.worker_id and event["attempt"] == 1, done["events"]
    assert "lost" in orch.stderr() and first.worker_id in orch.stderr()
    # One line per job event on the orchestrator: the attempt it took back, then the next one's.
    assert f"WARNING job {job['id']} attempt 1: released: worker {first.worker_id} is lost" in orch.stderr()
    assert f"job {job['id']} attempt 2: assigned to worker {second.worker_id}" in orch.stderr()


def test_a_worker_paused_for_less_than_the_grace_keeps_its_job(pool):
    pond = pool.pond()
    orch = pool.orchestrator(pond, extra=("--worker-lost-after", "6"))       # heartbeats every 2.4 s
    worker = pool.worker(pond, orch)
    job = pond.submit([JOB_PY, "-c", NAP_FIRST, "4"])
    running_on(pond, job["id"], 1, worker.worker_id, 20)
    os.kill(worker.proc.pid, signal.SIGSTOP)            # the worker only: its job runs on
    try:
        time.sleep(2)
    finally:
        os.kill(worker.proc.pid, signal.SIGCONT)
    done = pond.wait_job(job["id"], timeout=30)
    assert done["state"] == "done" and done["attempt"] == 1 and done["events"] == [], done
    assert pond.output(job["id"])["stdout"] == b"started 1\nattempt 1\n"


def test_a_worker_paused_past_the_grace_loses_its_job_and_its_late_result_is_refused(pool):
    pond = pool.pond()
    orch = pool.orchestrator(pond, extra=("--worker-lost-after", "3"))
    first = pool.worker(pond, orch, tags="lane:a")
    job = pond.submit([JOB_PY, "-c", NAP_FIRST, "6"], tags=["lane:a"])
    running_on(pond, job["id"], 1, first.worker_id, 20)
    second = pool.worker(pond, orch, tags="lane:a")
    os.kill(first.proc.pid, signal.SIGSTOP)             # alive, its connections open, but silent
    stopped = time.monotonic()
    try:
        done = pond.wait_job(job["id"], timeout=20)
        took = time.monotonic() - stopped
    finally:
        os.kill(first.proc.pid, signal.SIGCONT)
    print(f"\nSIGSTOP of the worker (grace 3 s) to the job done on another worker: {took:.1f} s")
    assert done["state"] == "done" and done["attempt"] == 2 and done["worker"] == second.worker_id, done
    (event,) = lost_events(done)
    assert event["worker"] == first.worker_id and event["attempt"] == 1, done["events"]
    # Back, the first worker finishes attempt 1 (its process ran on) and reports it: refused.
    wait_for(lambda: f"refused state for {job['id']}" in first.stderr(), 20, what="the late result refused")
    assert b"attempt 1" not in chunks_of(pond, job["id"], 1)
    assert chunks_of(pond, job["id"], 2) == b"started 2\nattempt 2\n"
    assert pond.job(job["id"])["state"] == "done" and pond.job(job["id"])["attempt"] == 2
    # ...and it is back in the pool: it beats again, and pond sees it online.
    wait_for(lambda: any(w["id"] == first.worker_id and w["online"]
                         for w in pond.client.get("/v1/admin/pool/workers")["workers"]), 15,
             what="the paused worker online again")
    assert f"worker {first.worker_id} is back" in orch.stderr()


def test_pond_ends_an_attempt_its_orchestrator_released_at_once(pool):
    pond = pool.pond(extra=("--allow-unsigned-results",))
    token = pond.bare_orchestrator()
    job = pond.submit(["sleep", "60"])
    held = pond.api("POST", "/v1/orch/poll", {"wait": 5}, token=token)[1]["jobs"][0]
    attempt = {k: held[k] for k in ("job_id", "attempt", "claim_token")}
    status, answer = pond.api("POST", "/v1/orch/heartbeat", {"jobs": [], "released": [attempt]}, token=token)
    assert status == 200 and answer["released"] == 1, answer
    now = pond.job(job["id"])
    assert now["state"] == "queued" and now["worker"] is None, now
    (event,) = lost_events(now)
    assert event["attempt"] == 1 and "released by its orchestrator" in event["message"], event
    # The released attempt is over: its reports are refused, and releasing it again does nothing.
    status, refused = pond.api("POST", f"/v1/orch/jobs/{job['id']}/state", {"attempt": 1, "state": "running"},
                               token=token, headers={"X-Claim-Token": held["claim_token"]})
    assert status in (404, 409), refused           # 404: the job is no longer this binding's at all
    again = pond.api("POST", "/v1/orch/heartbeat", {"jobs": [attempt], "released": [attempt]}, token=token)[1]
    assert again["released"] == 0 and again["stale"] == [job["id"]], again
    # The next attempt is a new one, and a release of it on the last allowed attempt fails the job.
    second = pond.api("POST", "/v1/orch/poll", {"wait": 5}, token=token)[1]["jobs"][0]
    assert second["attempt"] == 2
    last = pool.pond(extra=("--allow-unsigned-results", "--max-attempts", "1"))
    token = last.bare_orchestrator()
    job = last.submit(["sleep", "60"])
    held = last.api("POST", "/v1/orch/poll", {"wait": 5}, token=token)[1]["jobs"][0]
    last.api("POST", "/v1/orch/heartbeat", {"jobs": [], "released": [{k: held[k] for k in attempt}]}, token=token)
    failed = last.job(job["id"])
    assert failed["state"] == "failed" and "lost on attempt 1" in failed["error"], failed
    assert "gave up after 1 attempt" in failed["error"], failed

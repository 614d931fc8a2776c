"""Leases and retries (issue 4, first part): an attempt lives while its orchestrator's
heartbeats renew it; an orchestrator killed with -9 loses it, and the job runs again elsewhere
as a new attempt, up to --max-attempts. (A lost worker's orchestrator releases its attempts
sooner: test_worker_loss.py.) Submits with an Idempotency-Key make one job, never two.
Real processes; the lease is shortened with `pond serve --lease`."""

import time

from conftest import JOB_PY, wait_for

# Attempt 1 hangs (and leaves its pid where the test can stop it); a later attempt finishes.
HANG_FIRST = ("import os, sys, time; a = os.environ['SWARM_ATTEMPT']\n"
              "print('started', a, flush=True)\n"
              "if a == '1': time.sleep(120)\n"
              "print('attempt', a, 'on', os.environ['SWARM_JOB_ID'])")


def running(pond, job_id, attempt):
    """Attempt `attempt` of the job has started (it printed, so its worker reported it running)."""
    return wait_for(lambda: (j := pond.job(job_id))["state"] == "running" and j["attempt"] == attempt, 20,
                    what=f"attempt {attempt} started")


def test_a_job_whose_orchestrator_is_killed_runs_again_on_another_pool_s_worker(pool):
    pond = pool.pond(extra=("--lease", "3"))
    orch = pool.orchestrator(pond)
    first = pool.worker(pond, orch, tags="lane:a")
    job = pond.submit([JOB_PY, "-c", HANG_FIRST], tags=["lane:a"])
    running(pond, job["id"], 1)
    second = pool.worker(pond, pool.orchestrator(pond), tags="lane:a")
    orch.kill()                                # kill -9: no more heartbeats; its worker runs on, unheard
    done = pond.wait_job(job["id"], timeout=45)
    assert done["state"] == "done" and done["attempt"] == 2, done
    assert done["worker"] == second.worker_id
    assert pond.output(job["id"])["stdout"].decode().splitlines()[-1] == f"attempt 2 on {job['id']}"
    expired = [e for e in done["events"] if e["event"] == "lease_expired"]
    assert expired and expired[0]["worker"] == first.worker_id and expired[0]["attempt"] == 1, done["events"]


def test_a_job_whose_lease_runs_out_on_its_last_attempt_fails(pool):
    pond = pool.pond(extra=("--lease", "2", "--max-attempts", "1"))
    orch = pool.orchestrator(pond)
    pool.worker(pond, orch)
    job = pond.submit([JOB_PY, "-c", HANG_FIRST])
    running(pond, job["id"], 1)
    orch.kill()
    done = pond.wait_job(job["id"], timeout=45)
    assert done["state"] == "failed" and done["attempt"] == 1, done
    assert "lease expired" in done["error"] and "gave up after 1 attempt" in done["error"], done


def test_a_live_worker_keeps_its_lease_past_the_lease_time(pool, tmp_path):
    pond = pool.pond(extra=("--lease", "2"))
    orch = pool.orchestrator(pond)
    pool.worker(pond, orch)
    started = time.monotonic()
    job = pond.submit([JOB_PY, "-c", "import time; time.sleep(5); print('ok')"])
    done = pond.wait_job(job["id"], timeout=30)
    assert time.monotonic() - started > 5
    assert done["state"] == "done" and done["attempt"] == 1 and done["events"] == [], done


def test_the_same_idempotency_key_gives_the_same_job(pool):
    pond = pool.pond()
    body = {"command": ["true"], "tags": ["lane:x"], "sandbox": {"profile": "none"}}
    first = pond.api("POST", "/v1/jobs", body, headers={"Idempotency-Key": "deploy-42"})
    again = pond.api("POST", "/v1/jobs", body, headers={"Idempotency-Key": "deploy-42"})
    assert first[0] == 201 and again[0] == 200 and again[1]["id"] == first[1]["id"], (first, again)
    other = pond.api("POST", "/v1/jobs", dict(body, command=["false"]), headers={"Idempotency-Key": "deploy-42"})
    assert other[0] == 409 and other[1]["error"]["code"] == "idempotency_conflict", other
    bad = pond.api("POST", "/v1/jobs", body, headers={"Idempotency-Key": "no spaces"})
    assert bad[0] == 400, bad
    assert pond.client.get("/v1/jobs")["counts"] == {"queued": 1}
    cli = pond.cli("submit", "--idempotency-key", "deploy-42", "--tag", "lane:x", "--profile", "none", "--", "true")
    assert cli.returncode == 0 and cli.stdout.strip() == first[1]["id"], cli.stderr


IGNORES_SIGTERM = ("import signal, sys, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); "
                   "print('up', flush=True); time.sleep(60)")


def test_a_job_that_ignores_sigterm_is_killed_after_its_own_grace(pool):
    pond = pool.pond()
    orch = pool.orchestrator(pond)
    pool.worker(pond, orch)
    job = pond.submit([JOB_PY, "-c", IGNORES_SIGTERM], timeout=1, cancel_grace=0.5)
    started = time.monotonic()
    done = pond.wait_job(job["id"], timeout=30)
    assert done["state"] == "failed" and "timed out after 1 s" in done["error"], done
    assert done["cancel_grace"] == 0.5 and time.monotonic() - started < 9     # not the default 10 s grace


def test_pond_fails_a_job_past_its_timeout_when_the_worker_never_says(pool):
    """The backstop: an orchestrator keeps the lease alive but its worker never reports. With
    --assign-ahead 0: above it, a job not started may be waiting for a slot, and only a started
    one is failed (specs/protocol.md §4)."""
    pond = pool.pond(extra=("--lease", "4", "--allow-unsigned-results", "--assign-ahead", "0"))
    token = pond.bare_orchestrator()
    job = pond.submit(["sleep", "60"], timeout=1, cancel_grace=0)
    status, answer = pond.api("POST", "/v1/orch/poll", {"wait": 5}, token=token)
    (held,) = answer["jobs"]
    beat = {"jobs": [{k: held[k] for k in ("job_id", "attempt", "claim_token")}]}

    def failed():
        status, renewed = pond.api("POST", "/v1/orch/heartbeat", beat, token=token)
        assert status == 200, renewed
        state = pond.job(job["id"])
        return state["state"] == "failed" and (state, renewed)

    state, renewed = wait_for(failed, 20, interval=0.5, what="the backstop")
    assert "pond's backstop" in state["error"] and state["attempt"] == 1, state
    # The orchestrator learns it at its next heartbeat, and stops the job on its worker.
    assert pond.api("POST", "/v1/orch/heartbeat", beat, token=token)[1]["stale"] == [job["id"]]


def test_a_failed_job_runs_again_only_if_it_asked_for_retries(pool):
    pond = pool.pond()
    orch = pool.orchestrator(pond)
    pool.worker(pond, orch)
    flaky = [JOB_PY, "-c", "import os, sys; a = int(os.environ['SWARM_ATTEMPT']); print('attempt', a); "
             "sys.exit(0 if a == 3 else 7)"]
    asked = pond.submit(flaky, retries=2)
    done = pond.wait_job(asked["id"], timeout=30)
    assert done["state"] == "done" and done["attempt"] == 3 and done["retries_left"] == 0, done
    assert [e["event"] for e in done["events"]] == ["retried", "retried"]
    assert pond.output(asked["id"])["stdout"] == b"attempt 1\nattempt 2\nattempt 3\n"   # every attempt's output kept
    once = pond.wait_job(pond.submit(flaky)["id"], timeout=30)
    assert once["state"] == "failed" and once["attempt"] == 1 and once["exit_code"] == 7, once
    short = pond.wait_job(pond.submit(flaky, retries=1)["id"], timeout=30)
    assert short["state"] == "failed" and short["attempt"] == 2 and short["exit_code"] == 7, short
    assert pond.api("POST", "/v1/jobs", {"command": ["true"], "retries": 11, "sandbox": {"profile": "none"}})[0] == 400


def test_cancel_reaches_a_process_that_ignores_sigterm_within_its_grace(pool):
    pond = pool.pond()
    orch = pool.orchestrator(pond)
    pool.worker(pond, orch)
    job = pond.submit([JOB_PY, "-c", IGNORES_SIGTERM], cancel_grace=1)
    wait_for(lambda: pond.output(job["id"])["stdout"] == b"up\n", 20, what="the job running")
    asked = time.monotonic()
    assert pond.cli("cancel", job["id"]).returncode == 0
    done = pond.wait_job(job["id"], timeout=20)
    took = time.monotonic() - asked
    assert done["state"] == "cancelled" and took < 5, (done, took)      # SIGTERM ignored, SIGKILL after 1 s

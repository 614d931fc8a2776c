"""Reports travel in batches at both hops (specs/protocol.md §5): one request carries many
jobs' reports, each handled as if it came alone, in order, and one refused report never
fails the others. Real pond, orchestrator and worker; pond's access log counts requests."""

import json
import os
import signal
import time

from conftest import JOB_PY, wait_for

RUNNING = {"attempt": 1, "state": "running"}
DONE = {"attempt": 1, "state": "done", "exit_code": 0}


def bare(pool):
    """pond, and the token of an orchestrator the test speaks for, with one worker of 4 slots."""
    pond = pool.pond(extra=("--allow-unsigned-results",))
    token = pond.bare_orchestrator()
    (worker,) = pond.client.get("/v1/admin/pool/workers")["workers"]
    status, _ = pond.api("POST", "/v1/orch/workers/snapshot", {"workers": [
        {"id": worker["id"], "online": True, "slots": 4, "capabilities": ["sandbox.process"]}]}, token=token)
    assert status == 200
    return pond, token


def take(pond, token, n):
    """Submit n jobs and take their assignments with real polls of the bare orchestrator."""
    ids = [pond.submit([JOB_PY, "-c", "pass"])["id"] for _ in range(n)]
    got = []
    deadline = time.monotonic() + 20
    while len(got) < n and time.monotonic() < deadline:
        status, body = pond.api("POST", "/v1/orch/poll", {"wait": 1}, token=token)
        assert status == 200, body
        got += body["jobs"]
    assert sorted(j["job_id"] for j in got) == sorted(ids), got
    return {j["job_id"]: j for j in got}


def report(job_id, claim_token, body, kind="state"):
    return {"job_id": job_id, "claim_token": claim_token, "kind": kind, "body": body}


def test_pond_takes_many_jobs_reports_in_one_request_each_on_its_own(pool):
    pond, token = bare(pool)
    a, b, c = take(pond, token, 3).values()
    status, answer = pond.api("POST", "/v1/orch/reports", {"reports": [
        report(a["job_id"], a["claim_token"], RUNNING),
        report(b["job_id"], b["claim_token"], {"attempt": 1, "stream": "stdout", "seq": 0, "data": "aGk="}, "chunk"),
        report(b["job_id"], b["claim_token"], DONE),
        report(c["job_id"], "not-its-claim-token", DONE),
        report("j_doesnotexist", "x", RUNNING),
        report(a["job_id"], a["claim_token"], RUNNING, kind="cancel"),
        {"job_id": a["job_id"]},
        report(a["job_id"], a["claim_token"], RUNNING, kind=["state"]),      # not a string: 400, not a 500
    ]}, token=token)
    assert status == 200, answer
    statuses = [r["status"] for r in answer["results"]]
    assert statuses == [200, 200, 200, 409, 404, 400, 400, 400], answer
    assert answer["results"][3]["error"]["code"] == "stale_attempt"
    assert pond.job(a["job_id"])["state"] == "running"
    assert pond.job(b["job_id"])["state"] == "done"
    assert pond.output(b["job_id"])["stdout"] == b"hi"
    assert pond.job(c["job_id"])["state"] == "assigned", "a refused report changed its job"


def test_a_batch_that_is_not_a_list_of_1_to_64_reports_is_refused_whole(pool):
    pond, token = bare(pool)
    (a,) = take(pond, token, 1).values()
    one = report(a["job_id"], a["claim_token"], RUNNING)
    for body in ({"reports": []}, {"reports": one}, {"reports": [one] * 65}, {"report": [one]}, [one]):
        status, answer = pond.api("POST", "/v1/orch/reports", body, token=token)
        assert status == 400 and answer["error"]["code"] == "bad_request" and answer["error"]["hint"], (body, answer)
    status, answer = pond.api("POST", "/v1/orch/reports", {"reports": [one]}, token="not-a-binding-token")
    assert status == 401, answer
    assert pond.job(a["job_id"])["state"] == "assigned", "a refused batch changed a job"


def test_the_orchestrator_takes_a_worker_s_batch_each_report_on_its_own(pool):
    pond = pool.pond()
    orch = pool.orchestrator(pond)
    worker = pool.worker(pond, orch)
    job = pond.submit([JOB_PY, "-c", "print('batched')"])["id"]
    assert pond.wait_job(job)["state"] == "done"
    identity = json.loads((worker.state_dir / "worker.json").read_text())
    auth = {"Authorization": f"Bearer {identity['token']}"}
    status, answer = api_json(orch.url(), "/v1/worker/reports", {"reports": [
        report(job, "no-such-claim", RUNNING), report("j_unknown", "x", RUNNING), {"kind": "state"},
        report(job, "x", RUNNING, kind={"state": 1})]}, auth)
    assert status == 200, answer
    assert [r["status"] for r in answer["results"]] == [409, 409, 400, 400], answer
    assert answer["results"][0]["error"]["code"] == "stale_attempt"
    for body in ({"reports": []}, {"reports": [report(job, "x", RUNNING)] * 65}, {"reports": "x"}):
        status, answer = api_json(orch.url(), "/v1/worker/reports", body, auth)
        assert status == 400 and answer["error"]["code"] == "bad_request", (body, answer)
    status, _ = api_json(orch.url(), "/v1/worker/reports", {"reports": [report(job, "x", RUNNING)]},
                         {"Authorization": "Bearer not-a-worker"})
    assert status == 401


def test_reports_that_piled_up_reach_pond_in_a_few_requests(pool):
    """While pond is stopped, the finals of 10 jobs wait in the orchestrator's outbox; once it is
    back they arrive in one or two requests (one may have been on its way), not ten."""
    pond = pool.pond(extra=("--access-log",))
    orch = pool.orchestrator(pond)
    pool.worker(pond, orch, concurrency=10)
    ids = [pond.submit([JOB_PY, "-c", "import time; time.sleep(2)"])["id"] for _ in range(10)]
    wait_for(lambda: all(pond.job(j)["state"] == "running" for j in ids), 30, what="ten jobs running")
    os.kill(pond.proc.proc.pid, signal.SIGSTOP)
    try:
        time.sleep(4)                          # the ten end meanwhile; their finals wait for pond
        before = len(pond.proc.stderr())
    finally:
        os.kill(pond.proc.proc.pid, signal.SIGCONT)
    for j in ids:
        assert pond.wait_job(j, timeout=60)["state"] == "done"
    log = pond.proc.stderr()[before:]
    batches = log.count("POST /v1/orch/reports 200")
    assert 1 <= batches <= 2, f"{batches} report requests for the finals of {len(ids)} jobs:\n{log[-3000:]}"
    assert "/v1/orch/jobs/" not in pond.proc.stderr(), "a report went alone, not in a batch"


def api_json(url, path, body, headers):
    import urllib.request
    req = urllib.request.Request(url + path, data=json.dumps(body).encode(), method="POST",
                                 headers={"Content-Type": "application/json", **headers})
    try:
        with urllib.request.urlopen(req, timeout=10) as resp:
            return resp.status, json.loads(resp.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())

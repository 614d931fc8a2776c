"""GET /metrics on `swarm.py serve` (issue 12): Prometheus text that prometheus_client's parser
reads, open like pond's and as bare: workers by state, jobs held, outbox depth, reports pond took
or refused, jobs workers refused (sandbox or other), requests by route and status; no id, name or
token. A real pond and orchestrator; the test speaks a worker's side over HTTP."""

import json
import time
import urllib.request

from prometheus_client.parser import text_string_to_metric_families

from conftest import JOB_PY, wait_for


def post(url, path, body, token, headers=None):
    request = urllib.request.Request(url + path, json.dumps(body).encode(), {
        "Content-Type": "application/json", "Authorization": f"Bearer {token}", **(headers or {})})
    with urllib.request.urlopen(request, timeout=15) as resp:
        return json.loads(resp.read())


def claim(orch, token):
    """A job handed to the hand-made worker, claimed as swarm.py worker would."""
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        jobs = post(orch.url(), "/v1/worker/claim", {"wait": 2, "capabilities": ["sandbox.process"]}, token)["jobs"]
        if jobs:
            return jobs[0]
    raise AssertionError("no job handed over in 20 s")


def scrape(orch):
    with urllib.request.urlopen(orch.url() + "/metrics", timeout=10) as resp:     # no token
        assert resp.headers["Content-Type"].startswith("text/plain")
        text = resp.read().decode()
    return text, {(s.name, tuple(sorted(s.labels.items()))): s.value
                  for family in text_string_to_metric_families(text) for s in family.samples}


def test_orchestrator_metrics_count_workers_jobs_reports_refusals_and_requests(pool):
    pond = pool.pond(extra=("--allow-unsigned-results",))          # a hand-made worker has no keys
    orch = pool.orchestrator(pond)
    worker = post(orch.url(), "/v1/worker/enroll", {"code": pond.enrollment_code(), "name": "manual",
                                                     "capabilities": ["sandbox.process"]}, token="")
    token = worker["token"]
    refused = pond.submit([JOB_PY, "-c", "print(1)"])["id"]
    job = claim(orch, token)
    assert job["job_id"] == refused
    post(orch.url(), f"/v1/worker/jobs/{refused}/state", {"attempt": job["attempt"], "state": "failed",
         "error": "refused by worker: worker cannot enforce sandbox process"}, token,
         {"X-Claim-Token": job["claim_token"]})
    wait_for(lambda: pond.job(refused)["state"] == "failed", 15, what="the refusal to reach pond")
    held = pond.submit([JOB_PY, "-c", "print(2)"])["id"]
    assert claim(orch, token)["job_id"] == held                       # claimed, never reported: running
    wait_for(lambda: scrape(orch)[1][("swarm_outbox", ())] == 0, 15, what="the outbox to drain")

    text, samples = scrape(orch)
    assert samples[("swarm_workers", (("state", "online"),))] == 1
    assert samples[("swarm_workers", (("state", "offline"),))] == 0
    assert samples[("swarm_jobs_held", (("state", "running"),))] == 1
    assert samples[("swarm_jobs_held", (("state", "assigned"),))] == 0
    assert samples[("swarm_reports_total", (("result", "sent"),))] >= 1
    assert samples[("swarm_reports_total", (("result", "refused"),))] == 0
    assert samples[("swarm_jobs_refused_total", (("reason", "sandbox"),))] == 1
    assert samples[("swarm_jobs_refused_total", (("reason", "requirements"),))] == 0
    assert samples[("swarm_pond_reachable", ())] == 1
    assert samples[("swarm_http_requests_total", (("code", "201"), ("route", "/v1/worker/enroll")))] == 1
    assert samples[("swarm_http_requests_total", (("code", "200"),
                                                  ("route", "/v1/worker/jobs/{id}/state")))] == 1
    assert samples[("swarm_http_requests_total", (("code", "200"), ("route", "/v1/worker/claim")))] >= 2
    for secret in (token, worker["worker_id"], "manual", refused, held, job["claim_token"]):
        assert secret not in text
    assert "# HELP swarm_workers " in text and "# TYPE swarm_reports_total counter" in text

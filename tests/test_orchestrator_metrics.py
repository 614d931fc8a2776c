"""GET /metrics on `swarm.py serve` (issue 12): Prometheus text that prometheus_client's parser
reads, open like pond's and as bare: workers by state, jobs held, outbox depth, reports pond took
or refused, jobs workers refused (sandbox or other), requests by route and status; no id, name or
token. A real pond and orchestrator; the test speaks a worker's side over HTTP."""

import json
import os
import secrets
import shutil
import time
import urllib.request

import pytest
from prometheus_client.parser import text_string_to_metric_families

from conftest import JOB_PY, wait_for
from sandboxing import prepare_root_dirs, sandbox, start_worker


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


DENIED = ("import urllib.request\n"
          "for host in ('blocked-one.invalid', 'blocked-two.invalid'):\n"
          "    try:\n"
          "        urllib.request.urlopen('http://%s/' % host, timeout=10)\n"
          "    except Exception as e:\n"
          "        print(host, e)\n")


@pytest.fixture
def bwrap_pool(pool, tmp_path):
    """pond, an orchestrator and a root worker whose jobs run in bwrap (their slots' own uids) -> (pond, orch)."""
    if os.getuid() != 0 or not shutil.which("bwrap"):
        pytest.skip("a job's egress proxy and broker serve a bwrap sandbox's network: root and bwrap needed")
    root_dir = prepare_root_dirs(tmp_path)
    try:
        pond = pool.pond()
        orch = pool.orchestrator(pond)
        pool.procs.append(start_worker(root_dir, tmp_path, pond, orch, "root",
                                       capabilities="sandbox.bwrap,harness.python3",
                                       extra=("--slot-uids", str(340_000_000 + 256 * (os.getpid() % 100_000)))))
        yield pond, orch
    finally:
        pool.stop_all()
        shutil.rmtree(root_dir, ignore_errors=True)


def test_egress_verdicts_of_a_write_job_reach_the_orchestrator_s_metrics(bwrap_pool):
    """The worker's egress proxy decides each request of an untrusted-code-write job; its final report
    carries the counts, which the orchestrator counts and does not pass on to pond (pond would refuse
    a field it does not know)."""
    pond, orch = bwrap_pool
    job = pond.submit([JOB_PY, "-c", DENIED], sandbox=sandbox("untrusted-code-write"))
    done = pond.wait_job(job["id"], timeout=60)
    assert done["state"] == "done", done
    assert pond.output(job["id"])["stdout"].count(b"403") == 2
    _, samples = scrape(orch)
    assert samples[("swarm_egress_total", (("verdict", "denied"),))] == 2
    assert samples[("swarm_egress_total", (("verdict", "allowed"),))] == 0
    assert samples[("swarm_broker_tokens_total", (("kind", "input"),))] == 0


def test_an_agent_job_s_model_tokens_reach_the_orchestrator_s_metrics(bwrap_pool):
    """The tokens the job's credential broker counted (the fake model's usage fields) are counted too."""
    from test_agents import Upstream, agent_harness
    pond, orch = bwrap_pool
    upstream = Upstream("openai")
    try:
        assert pond.api("POST", "/v1/admin/credentials", {"name": "openai", "secrets": {
            "OPENAI_API_KEY": "sk-test-" + secrets.token_urlsafe(16)}})[0] == 201
        assert pond.api("POST", "/v1/admin/models", {"key": "openai", "provider": "openai", "model_id": "m-1",
                                                     "credential": "openai", "base_url": upstream.url})[0] == 201
        assert pond.api("POST", "/v1/admin/harnesses", agent_harness())[0] == 201
        job = pond.client.post("/v1/jobs", {"agent": {"harness": "fake-agent", "model": "openai", "prompt": "hi"},
                                            "sandbox": {"profile": "untrusted-code-write"}})
        done = pond.wait_job(job["id"], timeout=60)
        assert done["state"] == "done", done
        usage = pond.client.get(f"/v1/jobs/{job['id']}/usage")
        assert (usage["input_tokens"], usage["output_tokens"]) == (11 + 21, 7 + 9)
        _, samples = scrape(orch)
        assert samples[("swarm_broker_tokens_total", (("kind", "input"),))] == 32
        assert samples[("swarm_broker_tokens_total", (("kind", "output"),))] == 16
    finally:
        upstream.close()


def test_a_report_s_counts_are_checked(pool):
    """egress and tokens: whole numbers, on a final report; anything else is a 400 naming the field."""
    pond = pool.pond(extra=("--allow-unsigned-results",))
    orch = pool.orchestrator(pond)
    token = post(orch.url(), "/v1/worker/enroll", {"code": pond.enrollment_code(), "name": "manual",
                                                    "capabilities": ["sandbox.process"]}, token="")["token"]
    job_id = pond.submit([JOB_PY, "-c", "print(1)"])["id"]
    job = claim(orch, token)
    for bad in ({"egress": {"allowed": -1, "denied": 0}}, {"egress": {"denied": 1}},
                {"tokens": {"input": 1.5, "output": 0}}, {"tokens": {"input": True, "output": 0}}, {"egress": []}):
        answer = post(orch.url(), "/v1/worker/reports", {"reports": [{
            "job_id": job_id, "claim_token": job["claim_token"], "kind": "state",
            "body": {"attempt": job["attempt"], "state": "done", "exit_code": 0, **bad}}]}, token)["results"][0]
        assert answer["status"] == 400 and next(iter(bad)) in answer["error"]["message"], (bad, answer)
    post(orch.url(), "/v1/worker/reports", {"reports": [{
        "job_id": job_id, "claim_token": job["claim_token"], "kind": "state",
        "body": {"attempt": job["attempt"], "state": "done", "exit_code": 0, "egress": {"allowed": 3, "denied": 1},
                 "tokens": {"input": 40, "output": 2}}}]}, token)
    wait_for(lambda: pond.job(job_id)["state"] == "done", 15, what="the report to reach pond")
    _, samples = scrape(orch)
    assert samples[("swarm_egress_total", (("verdict", "allowed"),))] == 3
    assert samples[("swarm_egress_total", (("verdict", "denied"),))] == 1
    assert samples[("swarm_broker_tokens_total", (("kind", "input"),))] == 40
    assert samples[("swarm_broker_tokens_total", (("kind", "output"),))] == 2

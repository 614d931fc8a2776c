"""Nothing dies silently (issue 9): /healthz names every loop of pond and of the orchestrator,
and a loop that meets an unexpected error ends its process with exit code 1 and one clear log
line, no traceback, so that a supervisor restarts it. The unexpected error here is real: a
table dropped from under the running process by another connection, as a bug or a damaged
file would. Transient errors (a full disk) are in test_faults.py."""

import contextlib
import json
import sqlite3
import time
import urllib.error
import urllib.request

from conftest import JOB_PY, wait_for


def healthz(url):
    try:
        with urllib.request.urlopen(f"{url}/healthz", timeout=10) as resp:
            return resp.status, json.loads(resp.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


def post(url, path, body, token=None):
    headers = {"Content-Type": "application/json", **({"Authorization": f"Bearer {token}"} if token else {})}
    request = urllib.request.Request(url + path, json.dumps(body).encode(), headers)
    with urllib.request.urlopen(request, timeout=10) as resp:
        return json.loads(resp.read())


def drop_table(db_path, table):
    with sqlite3.connect(db_path, timeout=10) as db:
        db.execute(f"DROP TABLE {table}")


def test_healthz_names_each_loop_and_the_storage(pool):
    pond = pool.pond()
    orch = pool.orchestrator(pond)
    status, body = healthz(pond.url)
    assert status == 200 and body["ok"] is True, body
    assert body["loops"] == [{"name": "reaper", "state": "ok"}] and body["storage"] == {"state": "ok"}, body
    status, body = healthz(orch.url())
    assert status == 200 and body["ok"] is True and body["storage"] == {"state": "ok"}, body
    assert [(v["name"], v["state"]) for v in body["loops"]] == [("poll", "ok"), ("snapshot", "ok"),
                                                                ("heartbeat", "ok"), ("push", "ok")], body


def test_a_pond_loop_that_meets_a_bug_ends_pond_with_exit_code_1_and_one_line(pool):
    pond = pool.pond()
    pond.sql("DROP TABLE workers")      # the reaper's next pass reads it
    assert pond.proc.proc.wait(30) == 1
    log = pond.proc.stderr()
    died = [line for line in log.splitlines() if "CRITICAL" in line]
    error = ('UndefinedTable: relation "workers" does not exist' if pond.database
             else "OperationalError: no such table: workers")
    assert len(died) == 1 and f"reaper loop died: {error}" in died[0], log
    assert "supervisor restarts pond" in died[0] and "Traceback" not in log, log


def test_an_orchestrator_loop_that_meets_a_bug_ends_serve_with_exit_code_1_and_one_line(pool):
    pond = pool.pond(extra=("--allow-unsigned-results",))      # a worker enrolled by hand, without keys
    orch = pool.orchestrator(pond)
    enrolled = post(orch.url(), "/v1/worker/enroll", {"code": pond.enrollment_code(), "name": "manual",
                                                      "capabilities": ["sandbox.process"]})
    drop_table(orch.state_dir / "swarm.db", "held")        # where the poll loop keeps what pond assigns
    pond.submit([JOB_PY, "-c", "print(1)"])
    deadline = time.monotonic() + 30
    while orch.proc.poll() is None and time.monotonic() < deadline:     # claims keep the worker online
        with contextlib.suppress(OSError):
            post(orch.url(), "/v1/worker/claim", {"wait": 1}, enrolled["token"])
    assert orch.proc.wait(5) == 1
    log = orch.stderr()
    died = [line for line in log.splitlines() if "CRITICAL" in line]
    assert len(died) == 1 and "poll loop died: OperationalError: no such table: held" in died[0], log
    assert "supervisor restarts this process" in died[0] and "Traceback" not in log, log
    assert "error: the poll loop died" in log           # and serve says so as it exits


def test_a_queued_job_says_when_its_orchestrator_does_not_poll(pool):
    """Issue 9: with the poll loop dead, pond kept saying the job "starts on its orchestrator's next poll"."""
    pond = pool.pond(extra=("--allow-unsigned-results",))
    token = pond.bare_orchestrator()          # its worker is online (a snapshot), and it never polls
    job = pond.submit([JOB_PY, "-c", "print(1)"])
    reason = wait_for(lambda: "has not polled" in (r := pond.job(job["id"])["waiting"]["reason"]) and r, 25,
                      what="the job to say its orchestrator does not poll")
    assert "see its /healthz or `swarm.py status`" in reason, reason
    status, answer = pond.api("POST", "/v1/orch/poll", {"wait": 0}, token=token)
    assert status == 200 and [j["job_id"] for j in answer["jobs"]] == [job["id"]], answer

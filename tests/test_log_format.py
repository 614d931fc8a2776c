"""--log-format json (issue 12): pond, `swarm.py serve` and `swarm.py worker` write one JSON object a
line on stderr: time, level, process, pid, message, and a job's fields (job, event, attempt, ...)
on the lines about it; codes and tokens stay out, as in the text lines. Real processes, a real job."""

import json
import re
import sys

from conftest import JOB_PY, SWARM, env_for_children, run, wait_for
from test_orchestrator_metrics import claim, post

KEYS = {"time", "level", "process", "pid", "message"}
TIME = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z$")


def lines_of(proc):
    """Every line of a process's stderr, each parsed (the test fails on one that is not JSON)."""
    out = []
    for line in proc.log_path.read_text(errors="replace").splitlines():
        try:
            out.append(json.loads(line))
        except ValueError:
            raise AssertionError(f"not a JSON line in {proc.argv[:4]}: {line!r}") from None
    return out


def test_pond_orchestrator_and_worker_log_json_lines_with_job_fields_and_no_secrets(pool):
    pond = pool.pond(extra=("--log-format", "json", "--access-log"))
    orch = pool.orchestrator(pond, extra=("--log-format", "json"))
    code = pond.enrollment_code()
    worker = pool.worker(pond, orch, code=code, extra=("--log-format", "json"))
    job = pond.submit([JOB_PY, "-c", "import time; time.sleep(1); print('hi')"])["id"]   # long enough to be seen running
    assert pond.wait_job(job)["state"] == "done"
    pond.api("GET", f"/v1/jobs?state=queued&token={code}")           # a secret where it does not belong
    orch_token = json.loads((orch.state_dir / "backend-handle.json").read_text())["token"]
    for proc in (worker, orch, pond.proc):
        proc.stop()

    logs = {name: lines_of(proc) for name, proc in (("pond", pond.proc), ("swarm-serve", orch),
                                                    ("swarm-worker", worker))}
    for name, lines in logs.items():
        assert lines, f"{name} logged nothing"
        for line in lines:
            assert KEYS <= set(line) and line["process"] == name and TIME.match(line["time"]), line
            assert line["level"] in ("debug", "info", "warning", "error", "critical"), line
            text = json.dumps(line)
            for secret in (code, orch_token, pond.token, code.replace("-", "")):
                assert secret not in text, f"{name} logged a secret: {line}"
    events = {line.get("event"): line for line in logs["pond"] if line.get("job") == job}
    assert {"submitted", "assigned", "done"} <= set(events), logs["pond"]
    assert events["assigned"]["attempt"] == 1 and events["assigned"]["worker"] == worker.worker_id
    assert events["done"]["exit_code"] == 0 and events["done"]["state"] == "done"
    started, finished = [line for line in logs["swarm-worker"] if line.get("job") == job]
    assert started["event"] == "started" and started["attempt"] == 1 and started["state"] == "running", started
    assert finished["event"] == "finished" and finished["state"] == "done" and finished["exit_code"] == 0
    argv_warning = "--enroll-code shows the code in `ps` to every user of this host; prefer $SWARM_ENROLL_CODE"
    assert [line["level"] for line in logs["swarm-worker"] if line["message"] == argv_warning] == ["warning"]
    orch_events = {line["event"]: line for line in logs["swarm-serve"] if line.get("job") == job}
    assert list(orch_events) == ["assigned", "started", "finished"], logs["swarm-serve"]
    assert all(line["worker"] == worker.worker_id and line["attempt"] == 1 for line in orch_events.values())
    assert orch_events["finished"]["state"] == "done" and orch_events["finished"]["exit_code"] == 0
    assert any("[redacted]" in line["message"] for line in logs["pond"]), "the access log line of the secret"


def test_a_log_format_that_is_neither_text_nor_json_is_refused(tmp_path):
    done = run([sys.executable, "-m", "pond", "serve", "--bind", "127.0.0.1:0", "--state-dir", str(tmp_path / "p")],
               env=dict(env_for_children(), POND_LOG_FORMAT="yaml"), timeout=30)
    assert done.returncode == 2 and "yaml" in done.stderr and "--log-format" in done.stderr, done.stderr
    done = run([sys.executable, SWARM, "worker", "--orchestrator", "http://127.0.0.1:1", "--state-dir",
                str(tmp_path / "w")], env=dict(env_for_children(), SWARM_LOG_FORMAT="yaml"), timeout=30)
    assert done.returncode == 2 and "yaml" in done.stderr and "--log-format" in done.stderr, done.stderr
    done = run([sys.executable, SWARM, "serve", "--log-format", "yaml"], timeout=30)
    assert done.returncode == 2 and "invalid choice" in done.stderr, done.stderr


def test_the_orchestrator_logs_one_text_line_per_job_event_with_secrets_redacted(pool):
    """Assigned, started, finished with its exit code, refused, handed back: one line each on `swarm.py serve`'s
    stderr (the default text format), naming the job, attempt and worker; a code in a worker's words is not
    logged. The worker is hand-made over HTTP, so each event is the test's to cause."""
    pond = pool.pond(extra=("--allow-unsigned-results",))
    orch = pool.orchestrator(pond)
    code = pond.enrollment_code()
    worker = post(orch.url(), "/v1/worker/enroll", {"code": code, "name": "manual",
                                                     "capabilities": ["sandbox.process"]}, token="")
    token, me = worker["token"], worker["worker_id"]

    def report(job, **body):
        post(orch.url(), f"/v1/worker/jobs/{job['job_id']}/state", {"attempt": job["attempt"], **body}, token,
             {"X-Claim-Token": job["claim_token"]})

    ran = (pond.submit([JOB_PY, "-c", "print(1)"])["id"], claim(orch, token))
    report(ran[1], state="running")
    report(ran[1], state="failed", exit_code=3)
    pond.submit([JOB_PY, "-c", "print(2)"])
    refused = claim(orch, token)
    report(refused, state="failed", error=f"refused by worker: the code {pond.enrollment_code()} is not for me")
    pond.submit([JOB_PY, "-c", "print(3)"])
    handed_back = claim(orch, token)
    report(handed_back, state="failed", requeue=True, error="its sandbox could not start")
    wait_for(lambda: pond.job(handed_back["job_id"])["state"] == "queued", 15, what="the requeue to reach pond")
    orch.stop()

    text = orch.log_path.read_text(errors="replace")
    for line in (f"job {ran[0]} attempt 1: assigned to worker {me}", f"job {ran[0]} attempt 1: running on worker {me}",
                 f"job {ran[0]} attempt 1: failed, exit code 3 (worker {me})",
                 f"WARNING job {refused['job_id']} attempt 1: refused by worker: the code [redacted] is not for me "
                 f"(worker {me})",
                 f"job {handed_back['job_id']} attempt 1: handed back by worker {me} for another attempt"):
        assert text.count(line) == 1, (line, text)
    assert token.split(".")[2] not in text and code not in text

"""--log-format json (issue 12): pond, `swarm.py serve` and `swarm.py worker` write one JSON object a
line on stderr: time, level, process, pid, message, and a job's fields (job, event, attempt, ...)
on the lines about it; codes and tokens stay out, as in the text lines. Real processes, a real job."""

import json
import re
import sys

from conftest import JOB_PY, SWARM, env_for_children, run

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
    job = pond.submit([JOB_PY, "-c", "print('hi')"])["id"]
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
    (finished,) = [line for line in logs["swarm-worker"] if line.get("job") == job]
    assert finished["event"] == "finished" and finished["state"] == "done" and finished["exit_code"] == 0
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

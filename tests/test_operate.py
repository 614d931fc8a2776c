"""Operating a pool from the `pond` CLI as the docs print it (issue 12): the human view of a job,
why a job waits (at once, after an eviction, and per pool with --explain), cancel and usage
exit codes, and where one attempt's output ends. Real processes on port 0."""

import json
import re
import subprocess
import sys
import time

import pytest

from conftest import JOB_PY, ROOT, run, wait_for

ESCAPE = "x\ny\x1b[31m"       # a newline and a terminal escape in one argument


def worker_row(pond, worker_id):
    return next(w for w in pond.client.get("/v1/admin/pool/workers")["workers"] if w["id"] == worker_id)


def test_a_finished_job_reads_well_and_cancelling_it_exits_1(pool, shared_path):
    pond = pool.pond()
    orch = pool.orchestrator(pond)
    w = pool.worker(pond, orch, tags="repo:acme")
    loud = "yes a | head -c 100000; exit 0"
    job = pond.submit(["sh", "-c", loud, ESCAPE], tags=["repo:acme"], log_cap=65536)
    assert pond.wait_job(job["id"])["state"] == "done"

    shown = pond.cli("job", job["id"])
    assert shown.returncode == 0, shown.stderr
    lines = dict(line.split(":", 1) for line in shown.stdout.splitlines())
    assert lines["command"].strip() == f"sh -c '{loud}' $'x\\ny\\x1b[31m'"
    assert "\x1b" not in shown.stdout
    assert lines["attested"].strip() == "yes"
    assert re.fullmatch(r"stdout \d+ bytes past the log cap \(between head and tail\)", lines["dropped"].strip())
    for key in ("created", "started", "finished"):
        assert time.strptime(lines[key].strip()[:19], "%Y-%m-%d %H:%M:%S"), lines[key]
    assert "queued" in lines["started"] and lines["duration"].strip().endswith(" s")
    logged = pond.proc.stderr()            # one line per job event, without --access-log
    for event in ("submitted: tags repo:acme", "queued -> assigned (attempt 1", "-> done (attempt 1, exit code 0)"):
        assert any(f"job {job['id']}" in line and event in line for line in logged.splitlines()), (event, logged)
    assert f"job {job['id']} attempt 1: done, exit code 0," in w.stderr()        # and one on the worker

    listed = pond.cli("jobs")
    assert listed.returncode == 0 and len(listed.stdout.splitlines()) == 2, listed.stdout    # one line per job
    assert "$'x\\ny" in listed.stdout
    workers = pond.cli("admin", "workers")
    row = next(line for line in workers.stdout.splitlines() if line.startswith(w.worker_id))
    assert row.split()[2] == "yes" and "True" not in workers.stdout

    cancel = pond.cli("cancel", job["id"])
    assert cancel.returncode == 1, cancel
    assert "already finished (done, exit code 0); nothing to cancel" in cancel.stderr
    assert pond.job(job["id"])["state"] == "done"
    bogus = pond.cli("jobs", "--state", "bogus")
    assert bogus.returncode == 2 and "invalid choice: 'bogus'" in bogus.stderr, bogus


def test_pond_logs_marks_where_a_new_attempt_begins(pool):
    pond = pool.pond()
    orch = pool.orchestrator(pond)
    pool.worker(pond, orch)
    script = "import os, sys; print('attempt output'); sys.exit(3 if os.environ['SWARM_ATTEMPT'] == '1' else 0)"
    job = pond.submit([JOB_PY, "-c", script], retries=1)
    done = pond.wait_job(job["id"])
    assert done["state"] == "done" and done["attempt"] == 2, (done, pond.output(job["id"]))
    for follow in ((), ("--follow",)):
        logs = pond.cli("logs", job["id"], *follow)
        assert logs.returncode == 0, logs.stderr
        assert logs.stdout == "attempt output\nattempt output\n"
        assert logs.stderr.count("[pond: attempt 2 begins]") == 1, logs.stderr


def test_submit_wait_says_why_the_job_waits_within_a_second_or_two(pool):
    pond = pool.pond(poll_hold=25)
    argv = [sys.executable, "-m", "pond", "--state-dir", str(pond.state_dir), "submit", "--wait", "--profile", "none",
            "--tag", "repo:nobody", "--", "true"]
    started = time.monotonic()
    with pytest.raises(subprocess.TimeoutExpired) as waited:
        run(argv, timeout=4)
    assert "waiting: no worker has enrolled" in (waited.value.stderr or b"").decode(), waited.value.stderr
    assert time.monotonic() - started < 6


def test_explain_says_per_pool_what_it_lacks_or_that_its_workers_are_busy_or_evicted(pool, shared_path):
    pond = pool.pond(extra=("--assign-ahead", "0"))        # a job waits queued behind a busy worker
    orch = pool.orchestrator(pond)
    w = pool.worker(pond, orch, tags="pool:trusted,repo:acme")
    gate = shared_path / "go"
    hold = pond.submit([JOB_PY, "-c", f"import os, time\nwhile not os.path.exists({str(gate)!r}): time.sleep(0.05)"],
                       tags=["repo:acme"])
    wait_for(lambda: pond.job(hold["id"])["state"] == "running", 20, what="the holding job running")

    busy = pond.submit(["true"], tags=["repo:acme"])
    status, answer = pond.api("GET", f"/v1/jobs/{busy['id']}/explain")
    assert status == 200, answer
    (mine,) = answer["pools"]
    assert mine["orchestrator"] == pond.job(hold["id"])["orchestrator"]
    assert (mine["verdict"], mine["matching"], mine["free"]) == ("busy", 1, 0), mine
    assert answer["waiting"]["verdict"] == "busy"

    other = pond.submit(["true"], tags=["repo:other"])
    (mine,) = pond.api("GET", f"/v1/jobs/{other['id']}/explain")[1]["pools"]
    assert mine["verdict"] == "lacks" and mine["lacks"]["tags"] == ["repo:other"], mine
    shown = pond.cli("job", other["id"], "--explain")
    assert shown.returncode == 0, shown.stderr
    assert "waiting: no worker with tag repo:other" in shown.stdout
    row = next(line for line in shown.stdout.splitlines() if line.startswith(mine["orchestrator"]))
    assert " lacks " in row and "no worker with tag repo:other" in row

    # A spec, before it is submitted: a tenant and a sandbox provider nobody has. Nothing is stored.
    before = len(pond.client.get("/v1/jobs")["jobs"])
    status, answer = pond.api("POST", "/v1/jobs/explain", {"command": ["true"], "tenant": "acme", "sandbox": {
        "profile": "untrusted-code-read", "tier": "byo", "backend": "gvisor"}})
    assert status == 200, answer
    assert answer["job"] is None and answer["waiting"]["verdict"] == "lacks"
    lacks = answer["pools"][0]["lacks"]
    assert (lacks["tenant"], lacks["tags"], lacks["sandbox"]) == ("acme", ["pool:byo"], "gvisor"), lacks
    cli = pond.cli("submit", "--explain", "--profile", "none", "--tag", "repo:acme", "--json", "--", "true")
    assert cli.returncode == 0, cli.stderr
    assert json.loads(cli.stdout)["pools"][0]["verdict"] == "busy"
    assert len(pond.client.get("/v1/jobs")["jobs"]) == before

    # Evicted: the held job is stopped and queued again; nothing else can take it.
    evicted = pond.cli("admin", "evict", w.worker_id)
    assert evicted.returncode == 0, evicted.stderr
    job = wait_for(lambda: (j := pond.job(hold["id"]))["state"] == "queued" and j, 20, what="the job requeued")
    assert "no worker has enrolled" not in job["waiting"]["reason"]
    assert "evicted" in job["waiting"]["reason"], job["waiting"]
    (mine,) = pond.api("GET", f"/v1/jobs/{hold['id']}/explain")[1]["pools"]
    assert mine["verdict"] == "evicted" and mine["evicted"] == 1, mine
    # The stopped attempt's last report is refused by pond (fencing), as it should be: no warning.
    wait_for(lambda: "refused state for" in orch.stderr(), 20, what="the stopped attempt's report refused")
    assert not [line for line in orch.stderr().splitlines() if "WARNING" in line and "refused state" in line]
    gate.touch()


def test_explain_names_missing_pinned_keys_a_revoked_pool_and_refuses_bad_input(pool):
    pond = pool.pond()
    token = pond.bare_orchestrator()          # one online worker, enrolled without keys
    spec = {"command": ["true"], "sandbox": {"profile": "none"}}
    status, answer = pond.api("POST", "/v1/jobs/explain", spec)
    assert status == 200, answer
    (mine,) = answer["pools"]
    assert mine["verdict"] == "unpinned" and mine["lacks"]["pinned_keys"] is True, mine
    assert "none with pinned keys" in mine["reason"]

    binding = pond.api("GET", "/v1/orch/whoami", token=token)[1]["binding_id"]
    assert pond.cli("admin", "revoke", "orchestrator", binding).returncode == 0
    (mine,) = pond.api("POST", "/v1/jobs/explain", spec)[1]["pools"]
    assert mine["verdict"] == "revoked", mine

    assert pond.api("GET", "/v1/jobs/j_nope/explain")[0] == 404
    status, answer = pond.api("POST", "/v1/jobs/explain", {"sandbox": {"profile": "none"}})
    assert status == 400 and "command" in answer["error"]["message"], answer
    assert pond.api("POST", "/v1/jobs/explain", spec, token=None)[0] == 401
    assert pond.client.get("/v1/jobs")["jobs"] == []


def test_a_missing_token_file_says_how_to_make_one_not_to_pair(tmp_path):
    done = run([sys.executable, "-m", "swarm", "status", "--orchestrator", "http://127.0.0.1:9",
                "--token-file", str(tmp_path / "pool-token")], cwd=tmp_path)
    assert done.returncode == 2, done
    assert "pool-token (token file) does not exist" in done.stderr
    assert "pair first" not in done.stderr and "SWARM_TOKEN" in done.stderr and "umask 077" in done.stderr

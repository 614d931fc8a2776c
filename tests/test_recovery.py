"""Crash recovery (issue 4): the orchestrator killed with -9 while its worker runs a job, and
pond killed with -9 while a result waits in the orchestrator's outbox. Every result is
recorded once, by its first attempt, with its output intact. Real processes, same state dirs
and ports after the restart."""

import json
import sqlite3
import sys
import time

from conftest import JOB_PY, free_port, run, wait_for

# Attempt 1 runs long enough to be caught by a kill; its output proves which attempt it was.
NAP_THEN_PRINT = [JOB_PY, "-c", "import os, sys, time; time.sleep(float(sys.argv[1])); "
                  "print('attempt', os.environ['SWARM_ATTEMPT'], 'of', os.environ['SWARM_JOB_ID'])"]


def outbox_rows(orch_state):
    with sqlite3.connect(orch_state / "swarm.db") as db:
        return [json.loads(m) for (m,) in db.execute("SELECT msg FROM outbox ORDER BY seq")]


def test_an_orchestrator_killed_mid_job_comes_back_and_the_result_arrives_once(pool):
    pond = pool.pond()
    port = free_port()
    orch = pool.orchestrator(pond, port=port)
    pool.worker(pond, orch)
    job = pond.submit([*NAP_THEN_PRINT, "3"])
    wait_for(lambda: pond.job(job["id"])["state"] == "running", 20, what="the job running")
    orch.kill()                                            # kill -9: nothing flushed, nothing said
    orch = pool.orchestrator(pond, state=orch.state_dir, port=port)
    done = pond.wait_job(job["id"], timeout=40)
    assert done["state"] == "done" and done["attempt"] == 1 and done["attested"] is True, done
    assert pond.output(job["id"])["stdout"].decode() == f"attempt 1 of {job['id']}\n"
    assert done["events"] == []                            # no lease ran out, nothing was requeued


def test_a_result_waiting_in_the_outbox_survives_pond_and_orchestrator_kill_9(pool):
    pond_port, orch_port = free_port(), free_port()
    pond = pool.pond(port=pond_port)
    orch = pool.orchestrator(pond, port=orch_port)
    pool.worker(pond, orch)
    job = pond.submit([*NAP_THEN_PRINT, "2"])
    wait_for(lambda: pond.job(job["id"])["state"] == "running", 20, what="the job running")
    pond.proc.kill()                                       # pond gone: the final report waits in the outbox
    waiting = wait_for(lambda: [m for m in outbox_rows(orch.state_dir) if m["kind"] == "state"
                                and m["body"]["state"] == "done"], 30, what="the final report in the outbox")
    assert waiting[0]["job_id"] == job["id"] and "attestation" in waiting[0]["body"]
    orch.kill()
    pond = pool.pond(state=pond.state_dir, port=pond_port)
    assert pond.job(job["id"])["state"] == "running"       # pond kept what it had, and waits
    orch = pool.orchestrator(pond, state=orch.state_dir, port=orch_port)
    done = pond.wait_job(job["id"], timeout=40)
    assert done["state"] == "done" and done["attempt"] == 1 and done["attested"] is True, done
    assert pond.output(job["id"])["stdout"].decode() == f"attempt 1 of {job['id']}\n"
    wait_for(lambda: outbox_rows(orch.state_dir) == [], 20, what="the outbox emptied")
    assert pond.client.get("/v1/jobs")["counts"] == {"done": 1}


def test_a_job_submitted_while_the_orchestrator_is_down_runs_when_it_is_back(pool):
    pond = pool.pond()
    port = free_port()
    orch = pool.orchestrator(pond, port=port)
    pool.worker(pond, orch)
    orch.kill()
    job = pond.submit([*NAP_THEN_PRINT, "0"])
    time.sleep(0.5)                                        # nobody to take it: it must still be queued
    assert pond.job(job["id"])["state"] == "queued"
    pool.orchestrator(pond, state=orch.state_dir, port=port)
    assert pond.wait_job(job["id"], timeout=40)["state"] == "done"


def test_the_pond_cli_waits_for_a_pond_that_is_not_up_yet_and_submits_once(pool, tmp_path):
    import subprocess
    from conftest import env_for_children
    state = tmp_path / "late-pond"
    state.mkdir()
    (state / "admin-token").write_text("pond_admin_late\n")
    (state / "admin-token").chmod(0o600)
    port = free_port()
    log = tmp_path / "cli.log"
    with open(log, "w") as err:
        cli = subprocess.Popen([sys.executable, "-m", "pond", "--pond", f"http://127.0.0.1:{port}",
                                "--token-file", str(state / "admin-token"), "--retry-for", "60",
                                "submit", "--profile", "none", "--", "true"], stdout=subprocess.PIPE, stderr=err, text=True,
                               env=env_for_children())
        try:
            wait_for(lambda: "waiting for pond" in log.read_text(), 20, what="the CLI to say what it waits for")
            pond = pool.pond(state=state, port=port)
            out, _ = cli.communicate(timeout=60)
        finally:
            if cli.poll() is None:
                cli.kill()
                cli.wait(5)
    assert cli.returncode == 0, log.read_text()
    assert "connection refused" in log.read_text().lower() or "refused" in log.read_text()
    assert pond.client.get("/v1/jobs")["counts"] == {"queued": 1}
    assert pond.job(out.strip())["state"] == "queued"


def test_the_pond_cli_gives_up_after_retry_for(tmp_path):
    token = tmp_path / "t"
    token.write_text("x")
    token.chmod(0o600)
    started = time.monotonic()
    done = run([sys.executable, "-m", "pond", "--pond", f"http://127.0.0.1:{free_port()}", "--token-file",
                str(token), "--retry-for", "1", "jobs"])
    assert done.returncode == 3 and "cannot reach pond" in done.stderr and "hint:" in done.stderr
    assert "waiting for pond" in done.stderr and time.monotonic() - started < 10

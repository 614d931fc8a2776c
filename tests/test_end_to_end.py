"""The whole path with real processes: submit -> claim -> run -> result, output and exit status."""

import sys



def test_job_runs_with_output_and_exit_status(pool):
    pond = pool.pond()
    orch = pool.orchestrator(pond)
    pool.worker(pond, orch, tags="pool:trusted,repo:acme", capabilities="harness.*,sandbox.process")
    job = pond.submit([sys.executable, "-c", "import sys; print(42); print('oops', file=sys.stderr); sys.exit(3)"])
    done = pond.wait_job(job["id"])
    assert done["state"] == "failed"
    assert done["exit_code"] == 3
    out = pond.output(job["id"])
    assert out["stdout"] == b"42\n"
    assert out["stderr"] == b"oops\n"


def test_submit_wait_prints_output_and_exits_with_job_code(pool):
    pond = pool.pond()
    orch = pool.orchestrator(pond)
    pool.worker(pond, orch)
    done = pond.cli("submit", "--wait", "--profile", "none", "--", sys.executable, "-c", "print(42)")
    assert done.returncode == 0, done.stderr
    assert done.stdout == "42\n"
    done = pond.cli("submit", "--wait", "--profile", "none", "--", sys.executable, "-c", "import sys; sys.exit(7)")
    assert done.returncode == 7

"""The whole path with real processes: submit -> claim -> run -> result, output and exit status."""

from conftest import JOB_PY


def test_job_runs_with_output_and_exit_status(pool):
    pond = pool.pond()
    orch = pool.orchestrator(pond)
    pool.worker(pond, orch, tags="pool:trusted,repo:acme", capabilities="harness.*,sandbox.process")
    job = pond.submit([JOB_PY, "-c", "import sys; print(42); print('oops', file=sys.stderr); sys.exit(3)"])
    done = pond.wait_job(job["id"])
    assert done["state"] == "failed"
    assert done["exit_code"] == 3
    out = pond.output(job["id"])
    assert out["stdout"] == b"42\n"
    assert out["stderr"] == b"oops\n"


def test_the_readme_s_first_job_runs_sandboxed_and_exits_with_its_code(pool):
    """`pond submit --wait -- python3 -c 'print(42)'` as printed: the default profile is
    untrusted-code-write, run under bwrap on a pool:trusted worker."""
    pond = pool.pond()
    orch = pool.orchestrator(pond)
    pool.worker(pond, orch, tags="pool:trusted", capabilities="harness.*,sandbox.*")
    done = pond.cli("submit", "--wait", "--", "python3", "-c", "print(42)")
    assert done.returncode == 0, done.stderr
    assert done.stdout == "42\n"
    job = pond.client.get("/v1/jobs?limit=1")["jobs"][0]
    assert job["sandbox"]["profile"] == "untrusted-code-write" and job["sandbox"]["backend"] == "bwrap"
    done = pond.cli("submit", "--wait", "--", "python3", "-c", "import sys; sys.exit(7)")
    assert done.returncode == 7

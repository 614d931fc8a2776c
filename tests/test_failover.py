"""Orchestrators and CLIs given several pond URLs fail over between them (issue 13).

The replica tests start two ponds on one database of the session's private PostgreSQL
(tests/test_replicas.py's way); the CLI's refusal test needs no PostgreSQL.
"""

import json
import re
import sys
import time
import types


from conftest import JOB_PY, SWARM, Pool, free_port, run, wait_for


def listed(*ponds):
    """What Pool.orchestrator pairs with: the first pond's codes, every pond's URL in order."""
    return types.SimpleNamespace(url=",".join(p.url for p in ponds), pairing_code=ponds[0].pairing_code,
                                 ca_file=None)


def test_kill_9_of_the_replica_the_orchestrator_uses_moves_it_to_the_next_url(pg_pool):
    """The pool is paired with b,a and talks to b; b is killed with -9 mid-stream and stays
    down. Jobs keep flowing through a; none is lost, none runs twice."""
    # A short lease, so that an assignment lost with b comes back soon; long enough that the move
    # to a renews the others' leases first, even on a loaded machine (with 4 s, a job came back as
    # attempt 2 in one CI run: lost with b, or its lease out before the move; this tells them apart).
    a = pg_pool.pond(extra=("--lease", "8"))
    b = pg_pool.replica(a, extra=("--lease", "8"))
    orch = pg_pool.orchestrator(listed(b, a))
    handle = json.loads((orch.state_dir / "backend-handle.json").read_text())
    assert handle["pond_urls"] == [b.url, a.url] and handle["pond_url"] == b.url
    worker = pg_pool.worker(a, orch, concurrency=2)
    status = lambda: json.loads(run([sys.executable, SWARM, "status", "--json", "--orchestrator", orch.url(),
                                     "--token-file", str(orch.token_file)]).stdout)
    assert status()["pond_url"] == b.url
    ids, total = {}, 30
    for i in range(total):
        ids[i] = a.submit([JOB_PY, "-c", f"print({i})"])["id"]
        if i == 10:
            wait_for(lambda: a.job(ids[5])["state"] == "done", 30, what="the first jobs to run through b")
            b.proc.kill()
        time.sleep(0.05)
    wait_for(lambda: all(a.job(j)["state"] in ("done", "failed", "cancelled") for j in ids.values()), 60,
             interval=0.5, what="every job to end through a")
    started = worker.stderr()
    for i, job_id in ids.items():
        job = a.job(job_id)
        assert job["state"] == "done" and job["exit_code"] == 0, job
        assert a.output(job_id)["stdout"] == f"{i}\n".encode(), (i, a.output(job_id))
        # One run each. Not "attempt 1": an assignment b made and died before it sent is never
        # run, and comes back when its lease runs out (8 s here) as attempt 2 (specs/protocol.md §4).
        assert len(re.findall(rf"job {job_id} attempt \d+: started", started)) == 1, (job, started[-3000:])
    assert len(a.client.get("/v1/jobs", limit=1000)["jobs"]) == total
    assert f"pond at {b.url} is unreachable; moving to {a.url}" in orch.stderr()
    data = status()
    assert data["pond_url"] == a.url and data["pond_reachable"], data


def test_the_cli_submits_through_the_second_url_when_the_first_is_down(pg_pool):
    a = pg_pool.pond()
    b = pg_pool.replica(a)
    b.proc.kill()
    done = a.cli("--pond", f"{b.url},{a.url}", "submit", "--profile", "none", "--json", "--", JOB_PY, "-c", "pass")
    assert done.returncode == 0, done.stderr
    job = json.loads(done.stdout)
    assert a.job(job["id"])["state"] == "queued"
    assert f"pond at {b.url} is unreachable; trying {a.url}" in done.stderr


def test_a_refusal_is_final_and_never_sent_to_the_next_url(tmp_path):
    """A 4xx is pond's answer: the CLI must not try it on another replica."""
    p = Pool(tmp_path)
    try:
        a = p.pond()
        dead = f"http://127.0.0.1:{free_port()}"
        bad = tmp_path / "bad-token"
        bad.write_text("not-the-token")
        bad.chmod(0o600)
        done = a.cli("--pond", f"{a.url},{dead}", "--token-file", str(bad), "jobs")
        assert done.returncode == 4, (done.returncode, done.stderr)
        assert "trying" not in done.stderr and dead not in done.stderr, done.stderr
    finally:
        p.stop_all()

"""Enrollment with real processes: codes with TTL and use counts, worker identity kept across restarts."""

import hashlib
import http.client
import json
import stat
import sys
import time
from urllib.parse import urlsplit

from conftest import JOB_PY, SWARM, run, wait_for


def call(url, method, path, body=None, token=None):
    """(status, JSON) from the orchestrator, without raising."""
    parts = urlsplit(url)
    conn = http.client.HTTPConnection(parts.hostname, parts.port, timeout=30)
    head = {"Content-Type": "application/json"}
    if token is not None:
        head["Authorization"] = f"Bearer {token}"
    try:
        conn.request(method, path, body=None if body is None else json.dumps(body).encode(), headers=head)
        resp = conn.getresponse()
        return resp.status, json.loads(resp.read() or b"null")
    finally:
        conn.close()


def workers(pond):
    return pond.client.get("/v1/admin/pool/workers")["workers"]


def binding_of(orch):
    return json.loads((orch.state_dir / "backend-handle.json").read_text())["binding_id"]


def enroll_to_completion(orch, state_dir, code, capabilities="harness.*", timeout=30):
    """Run a worker that is expected to stop by itself (refused), and its result."""
    state_dir.mkdir(exist_ok=True)
    return run([sys.executable, SWARM, "worker", "--orchestrator", orch.url(), "--state-dir", str(state_dir),
                "--enroll-code", code, "--tags", "", "--capabilities", capabilities, "--claim-wait", "1"],
               timeout=timeout)


def expire_enrollment_code(pond, code):
    # The shortest TTL pond mints is 30 s, too long to wait for in a test; moving
    # expires_at into the past in pond's own store is a real store change
    # (no mock), and pond reads the row afresh on every enrollment.
    digest = hashlib.sha256(code.replace("-", "").upper().encode()).hexdigest()
    n, _ = pond.sql("UPDATE enrollment_codes SET expires_at = ? WHERE code_hash = ?", (time.time() - 1, digest))
    assert n == 1, "the minted code is not in pond's store under its hash"


def found_harnesses():
    """What `harness.*` becomes on a worker of this host (swarm.find_harnesses; specs/agents.md §6)."""
    import swarm
    return [f"harness.{name}" for name in swarm.find_harnesses(["harness.*"])]


def test_enrolled_worker_is_listed_with_its_tags_capabilities_and_slots(pool):
    pond = pool.pond()
    orch = pool.orchestrator(pond)
    w = pool.worker(pond, orch, tags="repo:acme,pool:trusted", capabilities="harness.*,sandbox.*", concurrency=3)
    (row,) = [r for r in workers(pond) if r["id"] == w.worker_id]
    assert row["tags"] == ["pool:trusted", "repo:acme"]
    # sandbox.* is resolved to what this worker can enforce, harness.* to the harnesses it finds.
    assert row["capabilities"] == sorted(found_harnesses() + ["sandbox.bwrap", "sandbox.process"])
    assert row["slots"] == 3
    assert row["free"] == 3
    assert row["online"] is True
    assert row["orchestrator"] == binding_of(orch)

    identity = w.state_dir / "worker.json"
    assert stat.S_IMODE(identity.stat().st_mode) == 0o600
    saved = json.loads(identity.read_text())
    assert saved["worker_id"] == w.worker_id
    assert saved["token"].startswith(f"wkr.{w.worker_id}.")


def test_enrollment_code_with_one_use_is_refused_the_second_time(pool, tmp_path):
    pond = pool.pond()
    orch = pool.orchestrator(pond)
    code = pond.enrollment_code(uses=1)
    pool.worker(pond, orch, code=code)

    second = enroll_to_completion(orch, tmp_path / "second", code)
    assert second.returncode == 4, second.stderr
    assert "used" in second.stderr
    assert not (tmp_path / "second" / "worker.json").exists()
    assert len(workers(pond)) == 1


def test_enrollment_code_with_two_uses_enrolls_two_workers(pool, tmp_path):
    pond = pool.pond()
    orch = pool.orchestrator(pond)
    code = pond.enrollment_code(uses=2)
    a = pool.worker(pond, orch, code=code)
    b = pool.worker(pond, orch, code=code)
    assert a.worker_id != b.worker_id
    assert {r["id"] for r in workers(pond) if r["online"]} == {a.worker_id, b.worker_id}

    third = enroll_to_completion(orch, tmp_path / "third", code)
    assert third.returncode == 4, third.stderr
    assert "used" in third.stderr


def test_expired_enrollment_code_is_refused(pool, tmp_path):
    pond = pool.pond()
    orch = pool.orchestrator(pond)
    code = pond.enrollment_code(ttl=30)
    expire_enrollment_code(pond, code)

    done = enroll_to_completion(orch, tmp_path / "late", code)
    assert done.returncode == 4, done.stderr
    assert "expired" in done.stderr
    assert not (tmp_path / "late" / "worker.json").exists()
    assert workers(pond) == []


def test_restarted_worker_keeps_its_identity_and_restarted_orchestrator_still_knows_it(pool):
    # A held poll outlives the orchestrator that sent it and can take a job into the
    # void (test_dispatch.py::test_job_claimed_by_a_poll_whose_orchestrator_died_still_runs).
    # That is not what this test checks, so pond holds polls for 1 s only, and the job
    # is submitted once that bound has passed since the old orchestrator stopped.
    pond = pool.pond(poll_hold=1)
    orch = pool.orchestrator(pond)
    first = pool.worker(pond, orch, tags="repo:acme")
    assert first.stop() == 0

    again = pool.worker(pond, orch, tags="repo:acme", state=first.state_dir)
    assert "--enroll-code" not in again.argv, "a second start must not need a code"
    assert again.worker_id == first.worker_id
    assert [r["id"] for r in workers(pond)] == [first.worker_id]

    # The orchestrator restarts on the same address and state dir; the running
    # worker's token must still be accepted (a refused worker exits with 4).
    port = urlsplit(orch.url()).port
    assert orch.stop() == 0
    stopped_at = time.monotonic()
    argv = [a if a != "127.0.0.1:0" else f"127.0.0.1:{port}" for a in orch.argv]
    orch2 = pool.start(argv, "orch")
    assert orch2.url() == orch.url()

    def claiming():
        """The new orchestrator lists the worker online: its claim, with the old token, was accepted."""
        status, view = call(orch2.url(), "GET", "/v1/pool/status", token="pool-secret")
        assert status == 200, view
        assert again.alive(), again.stderr()
        return [(w["id"], w["online"]) for w in view["workers"]] == [(first.worker_id, True)]

    wait_for(claiming, 20, what="the worker to claim from the new orchestrator")
    wait_for(lambda: time.monotonic() - stopped_at > 1.5, 5, what="the old orchestrator's poll hold to end")

    job = pond.submit([JOB_PY, "-c", "print('still here')"], tags=["repo:acme"])
    done = pond.wait_job(job["id"], timeout=15)
    assert done["state"] == "done", done
    assert done["worker"] == first.worker_id
    assert pond.output(job["id"])["stdout"] == b"still here\n"
    assert again.alive(), again.stderr()
    assert [(r["id"], r["online"]) for r in workers(pond)] == [(first.worker_id, True)]


def test_wrong_worker_token_is_refused_on_claim(pool):
    pond = pool.pond()
    orch = pool.orchestrator(pond)
    w = pool.worker(pond, orch)
    token = json.loads((w.state_dir / "worker.json").read_text())["token"]
    cases = [
        (f"wkr.{w.worker_id}.{'x' * 43}", 403),                    # right id, wrong secret
        ("wkr.w_000000000000." + token.rsplit(".", 1)[1], 403),     # right secret, unknown id
        ("garbage", 401),                                           # not wkr.<id>.<secret>
        (token + ".extra", 401),
        ("orch." + token[4:], 401),                                 # another kind of token
    ]
    for bad, want in cases:
        status, body = call(orch.url(), "POST", "/v1/worker/claim", {"wait": 0}, token=bad)
        assert status == want, (bad, status, body)
        if want == 403:
            assert body["error"]["code"] == "token_invalid"
    status, body = call(orch.url(), "POST", "/v1/worker/claim", {"wait": 0})
    assert status == 401, body
    status, body = call(orch.url(), "POST", "/v1/worker/claim", {"wait": 0}, token=token)
    assert status == 200, body


def test_worker_refuses_a_capability_glob_that_claims_every_sandbox(pool, tmp_path):
    pond = pool.pond()
    orch = pool.orchestrator(pond)
    code = pond.enrollment_code()
    for glob in ("*", "harness.*,s*"):
        done = enroll_to_completion(orch, tmp_path / "star", code, capabilities=glob)
        assert done.returncode == 2, (glob, done.stderr)
        assert "sandbox" in done.stderr
    # Refused before enrolling: the code was not spent.
    assert workers(pond) == []
    pool.worker(pond, orch, code=code, capabilities="harness.*")


def test_unenforceable_sandbox_is_dropped_with_a_warning(pool):
    pond = pool.pond()
    orch = pool.orchestrator(pond)
    w = pool.worker(pond, orch, capabilities="harness.*,sandbox.firecracker")
    (row,) = workers(pond)
    assert row["capabilities"] == found_harnesses()
    assert "sandbox.firecracker" in w.stderr() and "WARNING" in w.stderr()
    assert "sandbox.firecracker" not in w.lines[0]
    # So a job that needs that sandbox is not given to this worker.
    job = pond.submit([JOB_PY, "-c", "pass"], sandbox={"profile": "untrusted-code-write", "backend": "firecracker"})
    assert "no worker enforces sandbox firecracker" in pond.job(job["id"])["waiting"]["reason"]

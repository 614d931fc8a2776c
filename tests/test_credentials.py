"""Credentials (issue 3): stored encrypted, never read back, sealed per attempt to the worker's
pinned key, opened only on the worker and given only to the job. Real processes, real keys.

The leak test runs a job with a credential and then searches every place a secret could
end up: pond's database and state dir, the orchestrator's and the worker's state dirs, the
logs of all three, and the command lines and environments of every process.
"""

import base64
import hashlib
import json
import os
import secrets
import sys
from pathlib import Path

from conftest import JOB_PY, run, wait_for

SECRET_NAME = "ANTHROPIC_API_KEY"


def new_secret():
    return "sk-test-" + secrets.token_urlsafe(24)


def set_credential(pond, name="anthropic", secret=None, **extra):
    body = dict({"name": name, "provider": "anthropic", "env": {"ANTHROPIC_BASE_URL": "https://llm.internal"},
                 "secrets": {SECRET_NAME: secret or new_secret()}}, **extra)
    return pond.api("POST", "/v1/admin/credentials", body)


def forms_of(secret):
    """The secret as bytes, and as base64 at each of the three alignments it can take inside a longer text."""
    raw = secret.encode()
    forms = [raw]
    for pad in range(3):
        encoded = base64.b64encode(b"\0" * pad + raw)[4 * ((pad + 2) // 3):-4]    # drop the edges that mix in pad
        forms.append(encoded)
    return forms


def in_store(pond, secret):
    """Whether pond's store holds the secret in any form: its SQLite files, or a dump of its
    PostgreSQL database (where a BYTEA column is dumped as hex)."""
    stored = pond.stored()
    return any(n in stored for n in [*forms_of(secret), secret.encode().hex().encode()])


def files_containing(root, needles):
    hits = []
    for path in Path(root).rglob("*"):
        if path.is_file():
            data = path.read_bytes()
            if any(n in data for n in needles):
                hits.append(str(path))
    return hits


PRINT_DIGEST = ("import hashlib, os; v = os.environ.get('ANTHROPIC_API_KEY', ''); "
                "print(hashlib.sha256(v.encode()).hexdigest(), len(v), os.environ.get('ANTHROPIC_BASE_URL'))")


def test_a_credential_is_set_listed_and_read_by_name_only_and_replaced(pool):
    pond = pool.pond()
    secret = new_secret()
    status, body = set_credential(pond, secret=secret)
    assert status == 201, body
    assert body["secrets"] == [SECRET_NAME] and body["env"] == ["ANTHROPIC_BASE_URL"], body
    status, again = set_credential(pond)
    assert status == 200 and again["created_at"] == body["created_at"] and again["updated_at"] >= body["updated_at"]
    for path in ("/v1/admin/credentials", "/v1/admin/credentials/anthropic"):
        status, data = pond.api("GET", path)
        assert status == 200
        text = json.dumps(data)
        assert secret not in text and "llm.internal" not in text and SECRET_NAME in text
    listed = pond.cli("admin", "credential", "list")
    assert listed.returncode == 0 and "anthropic" in listed.stdout and secret not in listed.stdout
    status, gone = pond.api("DELETE", "/v1/admin/credentials/anthropic")
    assert status == 200 and gone["deleted"] is True
    status, body = pond.api("GET", "/v1/admin/credentials/anthropic")
    assert status == 404 and "pond admin credential set" in body["error"]["hint"]


def test_bad_credentials_are_refused_with_a_hint_and_nothing_is_stored(pool):
    pond = pool.pond()
    cases = [
        ({"name": "x", "secrets": {}}, "secrets"),
        ({"name": "x", "secrets": {"A": "1"}, "env": {"A": "2"}}, "both env and secrets"),
        ({"name": "has space", "secrets": {"A": "1"}}, "name"),
        ({"name": "x", "secrets": {"1BAD": "1"}}, "secrets"),
        ({"name": "x", "secrets": {"A": 1}}, "secrets"),
        ({"name": "x", "secrets": {"A": "1"}, "extra": True}, "extra"),
        ({"secrets": {"A": "1"}}, "name"),
    ]
    for body, says in cases:
        status, answer = pond.api("POST", "/v1/admin/credentials", body)
        assert status == 400, (body, answer)
        assert says in answer["error"]["message"], (body, answer)
    assert pond.client.get("/v1/admin/credentials")["credentials"] == []


def test_secrets_are_encrypted_at_rest_under_a_0600_key(pool):
    pond = pool.pond()
    secret = new_secret()
    assert set_credential(pond, secret=secret)[0] == 201
    key_file = pond.state_dir / "credential.key"
    assert key_file.stat().st_mode & 0o777 == 0o600
    assert files_containing(pond.state_dir, forms_of(secret)) == []


def test_the_cli_takes_secrets_from_the_environment_or_a_file_never_from_argv(pool, tmp_path):
    pond = pool.pond()
    secret = new_secret()
    env = dict(os.environ, PYTHONPATH=str(Path(__file__).resolve().parents[1]), MY_KEY=secret)
    tls = ()
    done = run([sys.executable, "-m", "pond", "--state-dir", str(pond.state_dir), *tls, "admin", "credential",
                "set", "cli", "--secret", "MY_KEY", "--env", "MODE=fast"], env=env)
    assert done.returncode == 0, done.stderr
    assert secret not in done.stdout + done.stderr
    inline = pond.cli("admin", "credential", "set", "cli", "--secret", f"MY_KEY={secret}")
    assert inline.returncode == 2 and "ps" in inline.stderr and "hint:" in inline.stderr
    assert secret not in inline.stderr
    secrets_file = tmp_path / "secrets.env"
    secrets_file.write_text(f"# comment\nOTHER={secret}\n")
    secrets_file.chmod(0o644)
    loose = pond.cli("admin", "credential", "set", "f", "--secrets-file", str(secrets_file))
    assert loose.returncode != 0 and "chmod 600" in loose.stderr
    secrets_file.chmod(0o600)
    ok = pond.cli("admin", "credential", "set", "f", "--secrets-file", str(secrets_file))
    assert ok.returncode == 0, ok.stderr
    assert pond.client.get("/v1/admin/credentials/f")["secrets"] == ["OTHER"]


def test_a_job_may_only_name_a_credential_that_exists(pool):
    pond = pool.pond()
    status, body = pond.api("POST", "/v1/jobs", {"command": ["true"], "credential": "nope", "sandbox": {"profile": "none"}})
    assert status == 404 and "nope" in body["error"]["message"], body
    status, body = pond.api("POST", "/v1/jobs", {"command": ["true"], "credential": "a b", "sandbox": {"profile": "none"}})
    assert status == 400, body


def test_a_job_gets_its_credential_and_the_secret_is_nowhere_else(pool):
    pond = pool.pond()
    orch = pool.orchestrator(pond)
    worker = pool.worker(pond, orch)
    secret = new_secret()
    assert set_credential(pond, secret=secret)[0] == 201
    job = pond.submit([JOB_PY, "-c", PRINT_DIGEST], credential="anthropic", env={"ANTHROPIC_API_KEY": "mine"})
    done = pond.wait_job(job["id"])
    assert done["state"] == "done" and done["attested"] is True, done
    digest, length, base_url = pond.output(job["id"])["stdout"].decode().split()
    # The job saw the credential's value (it wins over the job's own env) and its non-secret env.
    assert digest == hashlib.sha256(secret.encode()).hexdigest() and int(length) == len(secret)
    assert base_url == "https://llm.internal"
    assert [e["event"] for e in done["events"]] == ["sealed"]
    assert done["events"][0]["fingerprint"] == pond.client.get("/v1/admin/pool/workers")["workers"][0]["fingerprint"]
    # Nowhere at rest or in a log: not in any state dir (pond.db and its WAL included), not in any log.
    needles = forms_of(secret)
    assert files_containing(pool.tmp, needles) == []
    assert not in_store(pond, secret)
    # Not on any command line, and in no process environment (the job has exited).
    for proc in Path("/proc").iterdir():
        if proc.name.isdigit():
            for name in ("cmdline", "environ"):
                try:
                    data = (proc / name).read_bytes()
                except OSError:
                    continue
                assert not any(n in data for n in needles), f"secret in /proc/{proc.name}/{name}"
    # Neither the job's views nor the orchestrator's show it.
    for text in (json.dumps(pond.job(job["id"])), json.dumps(pond.client.get("/v1/jobs")),
                 pond.cli("job", job["id"]).stdout, worker.stderr()):
        assert secret not in text


def test_what_the_job_prints_is_the_only_copy(pool):
    pond = pool.pond()
    orch = pool.orchestrator(pond)
    pool.worker(pond, orch)
    secret = new_secret()
    set_credential(pond, secret=secret)
    job = pond.submit([JOB_PY, "-c", "import os; print(os.environ['ANTHROPIC_API_KEY'])"],
                      credential="anthropic")
    assert pond.wait_job(job["id"])["state"] == "done"
    assert pond.output(job["id"])["stdout"].decode().strip() == secret
    hits = files_containing(pool.tmp, forms_of(secret))
    # The job printed it: its output is in pond's store (pond.db or its WAL, or the PostgreSQL
    # database), and nowhere else but, in transit, the orchestrator's outbox in swarm.db (its WAL),
    # which only its user can read.
    assert in_store(pond, secret)
    assert pond.database or any(Path(h).name.startswith("pond.db") for h in hits), hits
    for hit in hits:
        assert Path(hit).name.startswith(("pond.db", "swarm.db")), hits
        assert Path(hit).stat().st_mode & 0o077 == 0, f"{hit} is readable by others"


def test_a_deleted_credential_fails_the_job_with_the_reason(pool):
    pond = pool.pond()
    orch = pool.orchestrator(pond)
    set_credential(pond)
    # Submitted while no worker is there; the credential goes away before one claims it.
    job = pond.submit(["true"], credential="anthropic")
    pond.api("DELETE", "/v1/admin/credentials/anthropic")
    pool.worker(pond, orch)
    done = pond.wait_job(job["id"])
    assert done["state"] == "failed" and "no longer exists" in done["error"], done


def test_a_credential_stored_under_another_key_fails_clearly(pool, tmp_path):
    key = tmp_path / "other.key"
    key.write_text(base64.b64encode(os.urandom(32)).decode())
    key.chmod(0o600)
    first = pool.pond()
    set_credential(first)
    first.proc.stop()
    # The same state dir (and database), restarted with another credential key.
    pond = pool.pond(state=first.state_dir, extra=("--credential-key-file", str(key)))
    orch = pool.orchestrator(pond)
    pool.worker(pond, orch)
    job = pond.submit(["true"], credential="anthropic")
    done = pond.wait_job(job["id"])
    assert done["state"] == "failed" and "credential key" in done["error"], done


def test_pond_refuses_to_start_with_a_missing_or_loose_key_file(pool, tmp_path):
    state = tmp_path / "p"
    missing = run([sys.executable, "-m", "pond", "serve", "--bind", "127.0.0.1:0", "--state-dir", str(state),
                   "--credential-key-file", str(tmp_path / "none.key")], timeout=30)
    assert missing.returncode == 2 and "does not exist" in missing.stderr and "hint:" in missing.stderr
    loose = tmp_path / "loose.key"
    loose.write_text(base64.b64encode(os.urandom(32)).decode())
    loose.chmod(0o644)
    done = run([sys.executable, "-m", "pond", "serve", "--bind", "127.0.0.1:0", "--state-dir", str(state),
                "--credential-key-file", str(loose)], timeout=30)
    assert done.returncode == 2 and "chmod 600" in done.stderr


def run_without_cryptography(pool, pond, orch, state):
    argv = [str(Path(__file__).resolve().parents[1] / "swarm.py"), "worker", "--orchestrator", orch.url(),
            "--state-dir", str(state), "--enroll-code", pond.enrollment_code(), "--claim-wait", "5",
            "--capabilities", "sandbox.process"]
    code = ("import runpy, sys; sys.modules['cryptography'] = None; sys.argv = " + repr(argv) +
            "; runpy.run_path(sys.argv[0], run_name='__main__')")
    w = pool.start([sys.executable, "-c", code], "worker")
    worker_id = w.ready().split()[2]
    wait_for(lambda: any(x["id"] == worker_id and x["online"]
                         for x in pond.client.get("/v1/admin/pool/workers")["workers"]), 10, what="worker online")
    return w


def test_an_unpinned_worker_gets_no_job_by_default_and_the_job_says_why(pool, tmp_path):
    pond = pool.pond()
    orch = pool.orchestrator(pond)
    (tmp_path / "w").mkdir()
    run_without_cryptography(pool, pond, orch, tmp_path / "w")
    job = pond.submit(["true"])
    waiting = wait_for(lambda: pond.job(job["id"]).get("waiting"), 10, what="a waiting reason")
    assert "pinned keys" in waiting["reason"] and "--allow-unsigned-results" in waiting["reason"], waiting
    assert pond.job(job["id"])["state"] == "queued"


def test_with_unsigned_results_allowed_an_unpinned_worker_runs_jobs_but_never_a_credential(pool, tmp_path):
    pond = pool.pond(extra=("--allow-unsigned-results",))
    orch = pool.orchestrator(pond)
    (tmp_path / "w").mkdir()
    run_without_cryptography(pool, pond, orch, tmp_path / "w")
    set_credential(pond)
    plain = pond.submit([JOB_PY, "-c", "print('hi')"])
    done = pond.wait_job(plain["id"])
    assert done["state"] == "done" and done["attested"] is False, done
    status, body = pond.api("GET", f"/v1/jobs/{plain['id']}/attestation")
    assert status == 404 and "unsigned" in body["error"]["message"]
    sealed = pond.submit(["true"], credential="anthropic")
    waiting = wait_for(lambda: pond.job(sealed["id"]).get("waiting"), 10, what="a waiting reason")
    assert "credential" in waiting["reason"] and "pinned" in waiting["reason"], waiting
    assert pond.job(sealed["id"])["state"] == "queued"

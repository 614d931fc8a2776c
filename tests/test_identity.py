"""Worker identity with real processes (issue 3, specs/keys.md §6): keys pinned at enrollment,
expected fingerprints, tag ceilings and pool scopes, snapshots that cannot change what was
pinned, and revocation of orchestrators and workers."""

import json
import sqlite3
import sys

import pytest

from conftest import JOB_PY, SWARM, run, wait_for

ROOT_VECTORS = __import__("pathlib").Path(__file__).resolve().parents[1] / "specs" / "vectors" / "keys.json"
VECTORS = {w["name"]: w for w in json.loads(ROOT_VECTORS.read_text())["workers"]}


def show_fingerprint(state_dir):
    state_dir.mkdir(exist_ok=True)
    done = run([sys.executable, SWARM, "worker", "--show-fingerprint", "--state-dir", str(state_dir)])
    assert done.returncode == 0, done.stderr
    fp, sealing, signing = done.stdout.splitlines()
    return fp, sealing.split()[-1], signing.split()[-1]


def workers(pond):
    return {w["id"]: w for w in pond.client.get("/v1/admin/pool/workers")["workers"]}


def handle(orch):
    return json.loads((orch.state_dir / "backend-handle.json").read_text())


def enroll_to_completion(orch, state_dir, code, tags="", timeout=30):
    """Run a worker that is expected to be refused and stop by itself."""
    state_dir.mkdir(exist_ok=True)
    return run([sys.executable, SWARM, "worker", "--orchestrator", orch.url(), "--state-dir", str(state_dir),
                "--enroll-code", code, "--tags", tags, "--capabilities", "harness.*", "--claim-wait", "1"],
               timeout=timeout)


def scoped_orchestrator(pool, pond, scope):
    """pool.orchestrator, but paired with a code that carries a pool scope."""
    state = pool._dir("orch")
    out = state / "backend-handle.json"
    done = run([sys.executable, SWARM, "pair", "--pond", pond.url, "--code", pond.pairing_code(scope=scope),
                "--out", str(out)])
    assert done.returncode == 0, done.stderr
    token_file = state / "pool-token"
    token_file.write_text("pool-secret")
    token_file.chmod(0o600)
    proc = pool.start([sys.executable, SWARM, "serve", "--bind", "127.0.0.1:0", "--state-dir", str(state),
                       "--handle", str(out), "--token-file", str(token_file), "--poll-wait", "5",
                       "--claim-wait", "5", "--snapshot-interval", "1"], "orch")
    proc.state_dir, proc.token_file = state, token_file
    proc.url()
    return proc


def snapshot(pond, orch, **entry):
    """A snapshot sent by hand with the binding's own token, as a lying orchestrator would."""
    return pond.api("POST", "/v1/orch/workers/snapshot", {"workers": [dict({"online": True}, **entry)]},
                    token=handle(orch)["token"])


def test_enrollment_pins_the_keys_the_worker_shows(pool, tmp_path):
    pond = pool.pond()
    orch = pool.orchestrator(pond)
    state = tmp_path / "w"
    fp, sealing, signing = show_fingerprint(state)
    w = pool.worker(pond, orch, tags="lane:a", state=state)
    row = workers(pond)[w.worker_id]
    assert (row["fingerprint"], row["x25519_public"], row["ed25519_public"]) == (fp, sealing, signing)
    assert row["pinned"] is True and row["revoked"] is False
    assert json.loads((state / "worker.json").read_text())["fingerprint"] == fp
    listed = pond.cli("admin", "workers")
    assert listed.returncode == 0 and fp[:16] in listed.stdout, listed.stdout


def test_a_worker_matching_the_expected_fingerprint_enrolls_and_runs_jobs(pool, tmp_path):
    pond = pool.pond()
    orch = pool.orchestrator(pond)
    state = tmp_path / "w"
    fp, _, _ = show_fingerprint(state)
    minted = pond.cli("admin", "enrollment-code", "--fingerprint", fp, "--tags", "lane:fp,pool:trusted", "--json")
    assert minted.returncode == 0, minted.stderr
    code = json.loads(minted.stdout)
    assert code["fingerprint"] == fp and code["tags"] == ["lane:fp", "pool:trusted"]
    w = pool.worker(pond, orch, tags="lane:fp", state=state, code=code["code"])
    assert workers(pond)[w.worker_id]["fingerprint"] == fp
    job = pond.submit([JOB_PY, "-c", "print('pinned')"], tags=["lane:fp"])
    assert pond.wait_job(job["id"])["state"] == "done"
    assert pond.output(job["id"])["stdout"] == b"pinned\n"


def test_a_worker_with_another_fingerprint_is_refused_naming_both_and_the_code_stays_usable(pool, tmp_path):
    pond = pool.pond()
    orch = pool.orchestrator(pond)
    expected, _, _ = show_fingerprint(tmp_path / "right")
    other, _, _ = show_fingerprint(tmp_path / "wrong")
    code = pond.enrollment_code(fingerprint=expected)
    done = enroll_to_completion(orch, tmp_path / "wrong", code)
    assert done.returncode == 4, done.stderr
    assert expected in done.stderr and other in done.stderr, done.stderr
    assert "--show-fingerprint" in done.stderr          # the hint says how to get it right
    assert not (tmp_path / "wrong" / "worker.json").exists()
    assert workers(pond) == {}
    # The refused attempt did not use the code up: the right worker enrolls with it.
    w = pool.worker(pond, orch, state=tmp_path / "right", code=code)
    assert workers(pond)[w.worker_id]["fingerprint"] == expected


def test_consumed_refuses_keys_whose_fingerprint_is_not_theirs_and_a_missing_key_when_one_is_expected(pool):
    pond = pool.pond()
    token = pond.client.post("/v1/orch/pair", {"code": pond.pairing_code()})["token"]
    a, b = VECTORS["A"], VECTORS["B"]
    keys_a = {"x25519_public": a["show_fingerprint"][1].split()[-1], "ed25519_public": a["show_fingerprint"][2].split()[-1]}
    code = pond.enrollment_code(fingerprint=a["fingerprint"], uses=2)
    status, body = pond.api("POST", f"/v1/orch/enrollment/{code}/consumed",
                            dict(keys_a, fingerprint=b["fingerprint"], tags=[]), token=token)
    assert (status, body["error"]["code"]) == (400, "fingerprint_invalid"), body
    status, body = pond.api("POST", f"/v1/orch/enrollment/{code}/consumed", {"tags": []}, token=token)
    assert (status, body["error"]["code"]) == (403, "fingerprint_mismatch"), body
    assert a["fingerprint"] in body["error"]["message"] and "absent" in body["error"]["message"]
    status, body = pond.api("POST", f"/v1/orch/enrollment/{code}/consumed", dict(keys_a, tags=[]), token=token)
    assert status == 201 and body["fingerprint"] == a["fingerprint"], body


def test_worker_tags_outside_the_enrollment_ceiling_are_refused(pool, tmp_path):
    pond = pool.pond()
    orch = pool.orchestrator(pond)
    code = pond.enrollment_code(tags=["pool:byo", "tenant:acme"])
    done = enroll_to_completion(orch, tmp_path / "w", code, tags="pool:byo,tenant:acme,gpu")
    assert done.returncode == 4, done.stderr
    assert "gpu" in done.stderr and "ceiling" in done.stderr, done.stderr
    w = pool.worker(pond, orch, tags="pool:byo", code=code)       # within it: the code still works
    assert workers(pond)[w.worker_id]["tag_ceiling"] == ["pool:byo", "tenant:acme"]


def test_pairing_scope_is_enforced_at_enrollment_and_in_snapshots(pool, tmp_path):
    pond = pool.pond()
    minted = pond.cli("admin", "pairing-code", "--scope", "pool:byo,tenant:acme", "--json")
    assert minted.returncode == 0 and json.loads(minted.stdout)["scope"] == ["pool:byo", "tenant:acme"]
    orch = scoped_orchestrator(pool, pond, ["pool:byo", "tenant:acme"])
    done = enroll_to_completion(orch, tmp_path / "out", pond.enrollment_code(), tags="pool:trusted")
    assert done.returncode == 4 and "pool:trusted" in done.stderr and "scope" in done.stderr, done.stderr
    w = pool.worker(pond, orch, tags="pool:byo,tenant:acme")
    # A lying orchestrator widens the worker's tags: refused, the worker keeps its tags and goes offline.
    w.stop()
    orch.stop()
    status, body = snapshot(pond, orch, id=w.worker_id, tags=["pool:byo", "tenant:acme", "pool:trusted"],
                            capabilities=[], slots=1)
    assert status == 200 and [r["code"] for r in body["refused"]] == ["tag_outside_ceiling"], body
    row = workers(pond)[w.worker_id]
    assert row["tags"] == ["pool:byo", "tenant:acme"] and row["online"] is False
    assert row["events"][-1]["code"] == "tag_outside_ceiling" and "pool:trusted" in row["last_event"]
    status, body = snapshot(pond, orch, id=w.worker_id, tags=["pool:byo"], capabilities=[], slots=1)
    assert status == 200 and body["refused"] == [] and workers(pond)[w.worker_id]["online"] is True


def test_a_snapshot_cannot_change_a_pinned_key_and_the_operator_sees_it(pool, tmp_path):
    pond = pool.pond()
    orch = pool.orchestrator(pond)
    w = pool.worker(pond, orch, tags="lane:k")
    pinned = workers(pond)[w.worker_id]
    w.stop()
    orch.stop()
    b = VECTORS["B"]
    for forged in ({"fingerprint": b["fingerprint"]},
                   {"x25519_public": b["show_fingerprint"][1].split()[-1],
                    "ed25519_public": b["show_fingerprint"][2].split()[-1]}):
        status, body = snapshot(pond, orch, id=w.worker_id, tags=["lane:k"], capabilities=[], slots=1, **forged)
        assert status == 200 and [r["code"] for r in body["refused"]] == ["key_mismatch"], body
        assert b["fingerprint"] in body["refused"][0]["message"]
        row = workers(pond)[w.worker_id]
        assert row["online"] is False
        assert (row["fingerprint"], row["x25519_public"]) == (pinned["fingerprint"], pinned["x25519_public"])
        assert row["events"][-1]["code"] == "key_mismatch" and pinned["fingerprint"] in row["last_event"]
    listed = pond.cli("admin", "workers")          # the operator sees it in the LAST EVENT column
    assert listed.returncode == 0 and b["fingerprint"] in listed.stdout, listed.stdout


def test_a_revoked_binding_is_refused_its_orchestrator_exits_4_and_its_jobs_wait(pool):
    pond = pool.pond()
    orch = pool.orchestrator(pond)
    w = pool.worker(pond, orch, tags="lane:r")
    binding = handle(orch)["binding_id"]
    done = pond.cli("admin", "revoke", "orchestrator", binding)
    assert done.returncode == 0, done.stderr
    wait_for(lambda: not orch.alive(), 15, what="the revoked orchestrator to exit")
    assert orch.proc.wait(5) == 4
    assert "revoked" in orch.stderr()
    assert workers(pond)[w.worker_id]["online"] is False
    (row,) = pond.client.get("/v1/admin/pool/orchestrators")["orchestrators"]
    assert row["revoked_at"] is not None
    status, body = pond.api("POST", "/v1/orch/poll", {"wait": 0}, token=handle(orch)["token"])
    assert (status, body["error"]["code"]) == (403, "revoked")
    job = pond.submit(["true"], tags=["lane:r"])
    assert pond.job(job["id"])["state"] == "queued"
    w.stop()


def test_a_revoked_worker_is_never_assigned_again_and_exits_4(pool):
    pond = pool.pond()
    orch = pool.orchestrator(pond)
    w = pool.worker(pond, orch, tags="lane:v")
    done = pond.cli("admin", "revoke", "worker", w.worker_id)
    assert done.returncode == 0, done.stderr
    wait_for(lambda: not w.alive(), 15, what="the revoked worker to exit")
    assert w.proc.wait(5) == 4
    assert "revoked" in w.stderr()
    row = workers(pond)[w.worker_id]
    assert row["revoked"] is True and row["online"] is False
    job = pond.submit(["true"], tags=["lane:v"])
    # A snapshot cannot bring it back online.
    status, body = snapshot(pond, orch, id=w.worker_id, tags=["lane:v"], capabilities=[], slots=1)
    assert status == 200 and body["revoked"] == [w.worker_id], body
    assert workers(pond)[w.worker_id]["online"] is False
    assert pond.job(job["id"])["state"] == "queued"
    restarted = run([sys.executable, SWARM, "worker", "--orchestrator", orch.url(), "--state-dir", str(w.state_dir),
                     "--tags", "lane:v", "--capabilities", "", "--claim-wait", "1"], timeout=30)
    assert restarted.returncode == 4 and "revoked" in restarted.stderr, restarted.stderr


def test_a_worker_without_cryptography_enrolls_unpinned_and_says_so(pool, tmp_path):
    pond = pool.pond()
    orch = pool.orchestrator(pond)
    state = tmp_path / "w"
    state.mkdir()
    argv = [SWARM, "worker", "--orchestrator", orch.url(), "--state-dir", str(state), "--enroll-code",
            pond.enrollment_code(), "--tags", "lane:n", "--capabilities", "", "--claim-wait", "5"]
    code = ("import runpy, sys; sys.modules['cryptography'] = None; sys.argv = " + repr(argv) +
            "; runpy.run_path(sys.argv[0], run_name='__main__')")
    w = pool.start([sys.executable, "-c", code], "worker")
    worker_id = w.ready().split()[2]
    wait_for(lambda: workers(pond)[worker_id]["online"], 10, what="the unpinned worker online")
    row = workers(pond)[worker_id]
    assert row["pinned"] is False and row["fingerprint"] is None
    assert "cryptography not installed: this worker cannot unseal credentials or sign results" in w.stderr()
    assert not (state / "sealing.x25519").exists()


V1_SCHEMA = """
CREATE TABLE IF NOT EXISTS pairing_codes (
    code_hash   TEXT PRIMARY KEY,
    name        TEXT NOT NULL,
    scope       TEXT NOT NULL,
    created_at  REAL NOT NULL,
    expires_at  REAL NOT NULL,
    used_at     REAL,
    binding_id  TEXT
);
CREATE TABLE IF NOT EXISTS bindings (
    id          TEXT PRIMARY KEY,
    name        TEXT NOT NULL,
    token_hash  TEXT NOT NULL,
    scope       TEXT NOT NULL,
    created_at  REAL NOT NULL,
    last_seen   REAL,
    revoked_at  REAL
);
CREATE TABLE IF NOT EXISTS enrollment_codes (
    code_hash   TEXT PRIMARY KEY,
    created_at  REAL NOT NULL,
    expires_at  REAL NOT NULL,
    uses_left   INTEGER NOT NULL,
    uses        INTEGER NOT NULL,
    tag_ceiling TEXT,
    fingerprint TEXT
);
CREATE TABLE IF NOT EXISTS workers (
    id           TEXT PRIMARY KEY,
    binding_id   TEXT NOT NULL,
    name         TEXT NOT NULL,
    tags         TEXT NOT NULL,
    capabilities TEXT NOT NULL,
    slots        INTEGER NOT NULL,
    online       INTEGER NOT NULL DEFAULT 0,
    enrolled_at  REAL NOT NULL,
    last_seen    REAL
);
CREATE INDEX IF NOT EXISTS workers_binding ON workers(binding_id);
CREATE TABLE IF NOT EXISTS jobs (
    seq              INTEGER PRIMARY KEY,
    id               TEXT NOT NULL UNIQUE,
    state            TEXT NOT NULL,
    name             TEXT,
    command          TEXT NOT NULL,
    env              TEXT NOT NULL,
    tags             TEXT NOT NULL,
    capabilities     TEXT NOT NULL,
    req_key          TEXT NOT NULL,
    sandbox          TEXT NOT NULL,
    timeout          REAL,
    created_at       REAL NOT NULL,
    assigned_at      REAL,
    started_at       REAL,
    finished_at      REAL,
    attempt          INTEGER NOT NULL DEFAULT 0,
    claim_hash       TEXT,
    worker_id        TEXT,
    binding_id       TEXT,
    exit_code        INTEGER,
    error            TEXT,
    cancel_requested INTEGER NOT NULL DEFAULT 0,
    cancel_sent      INTEGER NOT NULL DEFAULT 0
);
CREATE INDEX IF NOT EXISTS jobs_queue ON jobs(state, req_key, seq);
CREATE INDEX IF NOT EXISTS jobs_binding ON jobs(binding_id, state);
CREATE TABLE IF NOT EXISTS chunks (
    id       INTEGER PRIMARY KEY,
    job_id   TEXT NOT NULL,
    attempt  INTEGER NOT NULL,
    stream   TEXT NOT NULL,
    seq      INTEGER NOT NULL,
    data     BLOB NOT NULL,
    UNIQUE (job_id, attempt, stream, seq)
);
CREATE INDEX IF NOT EXISTS chunks_job ON chunks(job_id, id);
"""


@pytest.mark.sqlite_only("opens a version-1 SQLite file with store.Store (no pond, no --store); PostgreSQL's "
                        "schema and its migration are tests/test_store_pg.py's")
def test_a_version_1_database_is_migrated_when_pond_opens_it(tmp_path):
    from pond.store import SCHEMA_VERSION, Store
    path = tmp_path / "pond.db"
    db = sqlite3.connect(str(path))
    db.executescript(V1_SCHEMA)
    db.execute("INSERT INTO workers (id, binding_id, name, tags, capabilities, slots, online, enrolled_at)"
               " VALUES ('w_old', 'o_old', 'old', '[\"lane:a\"]', '[]', 2, 1, 1.0)")
    db.execute("PRAGMA user_version=1")
    db.commit()
    db.close()
    store = Store(path)
    try:
        (row,) = store.workers()
        assert row["id"] == "w_old" and row["tags"] == ["lane:a"] and row["slots"] == 2
        assert row["fingerprint"] is None and row["revoked_at"] is None and row["events"] is None
        assert store.revoke_worker("w_old", 5.0) and store.worker("w_old")["revoked_at"] == 5.0
        assert store._one("PRAGMA user_version")["user_version"] == SCHEMA_VERSION == 6
        columns = {r["name"] for r in store._all("PRAGMA table_info(jobs)")}
        assert {"source", "artifacts", "artifact_cap", "outputs", "files", "broker", "agent", "usage"} <= columns, \
            columns     # schema 4
        assert "withdraw" in columns, columns       # schema 6
        tables = {r["name"] for r in store._all("SELECT name FROM sqlite_master WHERE type = 'table'")}
        assert {"bundles", "source_tokens", "artifacts", "registry"} <= tables, tables
    finally:
        store.close()
    Store(path).close()          # opening a version-2 file again changes nothing

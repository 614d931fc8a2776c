"""Pairing with real processes: a one-time code becomes a binding token, and only that token works."""

import hashlib
import json
import stat
import sys
import time

from conftest import SWARM, run, wait_for

HANDLE_KEYS = ("pond_url", "binding_id", "token", "protocol_version")


def pair(pond, code, out):
    return run([sys.executable, SWARM, "pair", "--pond", pond.url, "--code", code, "--out", str(out)])


def code_hash(code):
    """How pond keys a code in its store: SHA-256 of the code without dashes, upper case."""
    return hashlib.sha256(code.replace("-", "").upper().encode()).hexdigest()


def expire_pairing_code(pond, code):
    # The shortest TTL pond mints is 30 s, too long to wait for in a test; moving
    # expires_at into the past in pond's own store is a real store change
    # (no mock), and pond reads the row afresh on every redemption.
    n, _ = pond.sql("UPDATE pairing_codes SET expires_at = ? WHERE code_hash = ?", (time.time() - 1, code_hash(code)))
    assert n == 1, "the minted code is not in pond's store under its hash"


def unminted_code():
    """A well-formed code that pond never minted."""
    from pond.tokens import new_code
    return new_code()


def test_pair_writes_a_private_handle_that_whoami_accepts(pool, tmp_path):
    pond = pool.pond()
    out = tmp_path / "orch" / "backend-handle.json"
    done = pair(pond, pond.pairing_code(), out)
    assert done.returncode == 0, done.stderr
    assert stat.S_IMODE(out.stat().st_mode) == 0o600
    handle = json.loads(out.read_text())
    for key in HANDLE_KEYS:
        assert key in handle, f"backend-handle.json lacks {key}"
    assert handle["pond_url"] == pond.url
    assert handle["protocol_version"] == 1
    assert handle["token"].startswith(f"orch.{handle['binding_id']}.")

    status, me = pond.api("GET", "/v1/orch/whoami", token=handle["token"])
    assert status == 200, me
    assert me["binding_id"] == handle["binding_id"]
    assert me["protocol_version"] == handle["protocol_version"]


def test_pairing_code_works_only_once(pool, tmp_path):
    pond = pool.pond()
    code = pond.pairing_code()
    assert pair(pond, code, tmp_path / "first.json").returncode == 0

    again = pair(pond, code, tmp_path / "second.json")
    assert again.returncode == 4, again.stderr
    assert "used" in again.stderr
    assert not (tmp_path / "second.json").exists()
    status, body = pond.api("POST", "/v1/orch/pair", {"code": code}, token=None)
    assert (status, body["error"]["code"]) == (410, "code_used")
    orchestrators = pond.client.get("/v1/admin/pool/orchestrators")["orchestrators"]
    assert len(orchestrators) == 1


def test_expired_pairing_code_is_refused(pool, tmp_path):
    pond = pool.pond()
    code = pond.pairing_code(ttl=30)
    expire_pairing_code(pond, code)

    done = pair(pond, code, tmp_path / "handle.json")
    assert done.returncode == 4, done.stderr
    assert "expired" in done.stderr
    assert not (tmp_path / "handle.json").exists()
    status, body = pond.api("POST", "/v1/orch/pair", {"code": code}, token=None)
    assert (status, body["error"]["code"]) == (410, "code_expired")
    assert pond.client.get("/v1/admin/pool/orchestrators")["orchestrators"] == []


def test_unknown_pairing_code_is_refused(pool, tmp_path):
    pond = pool.pond()
    code = unminted_code()
    status, body = pond.api("POST", "/v1/orch/pair", {"code": code}, token=None)
    assert (status, body["error"]["code"]) == (403, "code_unknown")
    done = pair(pond, code, tmp_path / "handle.json")
    assert done.returncode == 4, done.stderr
    assert not (tmp_path / "handle.json").exists()


def test_malformed_pairing_code_is_a_bad_request(pool):
    pond = pool.pond()
    # Too short, a letter outside the alphabet (I, O, 0, 1 are never used), not a string.
    for code in ("ABCD-EFGH", "IIII-OOOO-0000", "ABCD-EFGH-JKMN-PQRS", 12345678):
        status, body = pond.api("POST", "/v1/orch/pair", {"code": code}, token=None)
        assert status == 400, (code, status, body)
        assert body["error"]["code"] == "bad_request"
    assert pond.client.get("/v1/admin/pool/orchestrators")["orchestrators"] == []


def test_orchestrator_routes_refuse_wrong_or_garbled_tokens(pool, tmp_path):
    pond = pool.pond()
    out = tmp_path / "handle.json"
    assert pair(pond, pond.pairing_code(), out).returncode == 0
    handle = json.loads(out.read_text())
    good = handle["token"]
    binding_id = handle["binding_id"]
    wrong_secret = f"orch.{binding_id}.{'x' * 43}"
    unknown_binding = "orch.o_000000000000." + good.rsplit(".", 1)[1]
    cases = [
        (None, 401),                     # no bearer at all
        ("garbage", 401),                # not orch.<id>.<secret>
        (good + ".extra", 401),
        ("wkr." + good[5:], 401),        # another kind of token
        (pond.token, 401),               # the admin token is not a binding token
        (wrong_secret, 403),
        (unknown_binding, 403),
        (good[:-1] + ("A" if good[-1] != "A" else "B"), 403),
    ]
    for method, path, body in (("GET", "/v1/orch/whoami", None), ("POST", "/v1/orch/poll", {"wait": 0})):
        for token, want in cases:
            status, answer = pond.api(method, path, body, token=token)
            assert status == want, (path, token, status, answer)
            if want == 403:
                assert answer["error"]["code"] == "token_invalid"
        status, answer = pond.api(method, path, body, token=good)
        assert status == 200, (path, answer)
    # ...and a binding token is no admin token.
    status, _ = pond.api("GET", "/v1/admin/pool/orchestrators", token=good)
    assert status == 403


def test_admin_lists_the_binding_with_last_seen(pool):
    pond = pool.pond()
    orch = pool.orchestrator(pond)
    handle = json.loads((orch.state_dir / "backend-handle.json").read_text())

    def listed():
        rows = pond.client.get("/v1/admin/pool/orchestrators")["orchestrators"]
        return [r for r in rows if r["id"] == handle["binding_id"] and r["last_seen"]]

    # serve polls and sends snapshots, which is what last_seen records.
    (row,) = wait_for(listed, 10, what="the binding listed with a last_seen")
    assert len(pond.client.get("/v1/admin/pool/orchestrators")["orchestrators"]) == 1
    assert abs(row["last_seen"] - time.time()) < 30
    assert row["created_at"] <= row["last_seen"]
    cli = pond.cli("admin", "orchestrators")
    assert cli.returncode == 0, cli.stderr
    assert handle["binding_id"] in cli.stdout


def test_codes_and_binding_secrets_are_stored_hashed(pool, tmp_path):
    pond = pool.pond()
    used = pond.pairing_code()
    unused = pond.pairing_code()
    enrollment = pond.enrollment_code(uses=3)
    out = tmp_path / "handle.json"
    assert pair(pond, used, out).returncode == 0
    secret = json.loads(out.read_text())["token"].rsplit(".", 1)[1]

    stored = pond.stored()
    for code in (used, unused, enrollment):
        assert code.encode() not in stored, "a clear code is in pond's store"
        assert code.replace("-", "").encode() not in stored, "a clear code (no dashes) is in pond's store"
        # The rows are there, under their hashes: we are reading the right bytes.
        assert code_hash(code).encode() in stored
    assert secret.encode() not in stored, "a binding token's secret is in pond's store"
    assert hashlib.sha256(secret.encode()).hexdigest().encode() in stored

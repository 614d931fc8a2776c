"""Signed results (specs/attestation.md): vectors on both sides, interop with securesystemslib, tamper cases.

swarm.py signs, pond/attestation.py verifies, and securesystemslib's DSSE code (an
independent implementation) must agree with both: it verifies what the worker signs,
and pond verifies what it signs. Every tamper case of issue 3 is refused, and so is an
outcome (state, exit code, error) reported other than the worker signed it. Only the tests
that call securesystemslib need it (conftest.interop: missing, they fail and say so); the
vector tests run without it.
"""

import base64
import copy
import hashlib
import json
import subprocess
import sys

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

import swarm
from conftest import ROOT, interop
from pond import attestation
from pond.errors import PondError

VECTORS = json.loads((ROOT / "specs" / "vectors" / "attestation.json").read_text())
WORKERS = {w["name"]: w for w in json.loads((ROOT / "specs" / "vectors" / "keys.json").read_text())["workers"]}
SIGNER = VECTORS["signer"]
VALID = VECTORS["valid"]
H = bytes.fromhex


def unb64(text):
    return base64.b64decode(text)


def output(inputs):
    return unb64(inputs["stdout_b64"]), unb64(inputs["stderr_b64"])


def outcome(inputs):
    """What the orchestrator reports beside the envelope, unsigned: (state, exit_code, error)."""
    return inputs["state"], inputs["exit_code"], inputs["error"]


def statement_for(inputs):
    stdout, stderr = output(inputs)
    fields = {k: v for k, v in inputs.items() if not k.endswith("_b64")}
    return swarm.result_statement(**fields, stdout=stdout, stderr=stderr)


def pond_accepts(public_key, envelope, inputs, reported=True):
    """pond's two steps, as it runs them on a reported result; -> the predicate.
    reported=False leaves out the reported outcome, as `check_statement` allows."""
    statement = attestation.verify_envelope(public_key, envelope)
    stdout, stderr = output(inputs)
    return attestation.check_statement(statement, inputs["job_id"], inputs["attempt"], inputs["worker_fingerprint"],
                                       stdout, stderr, command=inputs["command"],
                                       outcome=outcome(inputs) if reported else None, spec=inputs.get("spec"))


def sslib_envelope(envelope):
    """The envelope as securesystemslib reads it (from a copy: from_dict mutates its argument)."""
    return interop("securesystemslib.dsse").Envelope.from_dict(copy.deepcopy(envelope))


def sslib_key(public_key, keyid):
    return interop("securesystemslib.signer").SSlibKey(keyid, "ed25519", "ed25519", {"public": public_key.hex()})


def sslib_verifies(public_key, envelope, keyid=SIGNER["fingerprint"]):
    """Whether securesystemslib accepts the envelope's DSSE signature (it does not read the payload)."""
    key = sslib_key(public_key, keyid)
    try:
        sslib_envelope(envelope).verify([key], 1)
        return True
    except Exception:       # a verification error, or an envelope it cannot even parse
        return False


def assert_refused(call):
    with pytest.raises(PondError) as caught:
        call()
    err = caught.value
    assert (err.code, err.status, err.message) == ("attestation_failed", 403, "attestation failed")
    assert err.detail
    return err


def test_both_sides_use_the_vector_types():
    assert swarm.PAYLOAD_TYPE == attestation.PAYLOAD_TYPE == VECTORS["payload_type"]
    assert swarm.RESULT_PREDICATE_TYPE == attestation.RESULT_PREDICATE_TYPE == VECTORS["predicate_type"]
    assert swarm.STATEMENT_TYPE == attestation.STATEMENT_TYPE == "https://in-toto.io/Statement/v1"


@pytest.mark.parametrize("impl", [swarm.pae, attestation.pae], ids=["swarm", "pond"])
def test_pae_is_the_dsse_encoding(impl):
    # The example of the DSSE protocol (secure-systems-lab/dsse protocol.md).
    assert impl("http://example.com/HelloWorld", b"hello world") == \
        b"DSSEv1 29 http://example.com/HelloWorld 11 hello world"
    assert impl("t", b"") == b"DSSEv1 1 t 0 "


@pytest.mark.parametrize("case", VALID, ids=lambda c: c["name"])
def test_swarm_produces_the_vector_statement_payload_pae_and_envelope(case):
    statement = statement_for(case["inputs"])
    assert statement == case["statement"]
    payload = swarm.canonical_json(statement)
    assert payload == unb64(case["payload_b64"])
    assert swarm.pae(swarm.PAYLOAD_TYPE, payload) == unb64(case["pae_b64"])
    assert swarm.sign_envelope(H(SIGNER["ed25519_private"]), statement, SIGNER["fingerprint"]) == case["envelope"]


@pytest.mark.parametrize("case", VALID, ids=lambda c: c["name"])
def test_vector_digests_are_sha256_of_output_and_command(case):
    stdout, stderr = output(case["inputs"])
    subject = {s["name"]: s["digest"]["sha256"] for s in case["statement"]["subject"]}
    assert subject == {"stdout": hashlib.sha256(stdout).hexdigest(), "stderr": hashlib.sha256(stderr).hexdigest()}
    canonical = json.dumps(case["inputs"]["command"], separators=(",", ":"), ensure_ascii=False)
    assert canonical == case["command_canonical"]
    assert case["statement"]["predicate"]["command_digest"] == {
        "sha256": hashlib.sha256(canonical.encode()).hexdigest()}


@pytest.mark.parametrize("case", VALID, ids=lambda c: c["name"])
def test_pond_accepts_the_vector_envelope(case):
    payload = unb64(case["payload_b64"])
    assert attestation.pae(attestation.PAYLOAD_TYPE, payload) == unb64(case["pae_b64"])
    assert attestation.verify_envelope(H(SIGNER["ed25519_public"]), case["envelope"]) == case["statement"]
    assert pond_accepts(H(SIGNER["ed25519_public"]), case["envelope"], case["inputs"]) == \
        case["statement"]["predicate"]


@pytest.mark.parametrize("case", VALID, ids=lambda c: c["name"])
def test_securesystemslib_verifies_the_vector_envelope(case):
    envelope = sslib_envelope(case["envelope"])
    assert envelope.pae() == unb64(case["pae_b64"])
    verified = envelope.verify([sslib_key(H(SIGNER["ed25519_public"]), SIGNER["fingerprint"])], 1)
    assert list(verified) == [SIGNER["fingerprint"]]


def test_vector_signer_is_worker_a_of_the_keys_vectors():
    a = WORKERS["A"]
    assert (SIGNER["ed25519_private"], SIGNER["ed25519_public"], SIGNER["fingerprint"]) == \
        (a["ed25519_private"], a["ed25519_public"], a["fingerprint"])


def fresh_worker(state_dir):
    """A worker's keys as `swarm.py worker` keeps them: -> (keys, ed25519 public, fingerprint)."""
    keys = swarm.load_or_create_keys(swarm.private_dir(state_dir))
    x_pub, e_pub = swarm.public_keys(keys)
    return keys, e_pub, swarm.fingerprint(x_pub, e_pub)


def signed_result(keys, fp, job_id="j_aaaaaaaaaaaa", attempt=1, stdout=b"built\n", stderr=b"warning: x\n",
                  state="done", exit_code=0, error=None):
    inputs = {"job_id": job_id, "attempt": attempt, "command": ["make", "all"],
              "sandbox": {"profile": "none", "tier": "any", "backend": None, "overrides": {}},
              "worker_fingerprint": fp, "state": state, "exit_code": exit_code, "error": error,
              "started_at": 1795271248.5, "finished_at": 1795271249.0,
              "stdout_b64": base64.b64encode(stdout).decode(), "stderr_b64": base64.b64encode(stderr).decode()}
    return swarm.sign_envelope(keys.signing, statement_for(inputs), fp), inputs


def test_worker_signed_envelope_verifies_with_pond_and_securesystemslib(tmp_path):
    keys, e_pub, fp = fresh_worker(tmp_path)
    envelope, inputs = signed_result(keys, fp)
    assert pond_accepts(e_pub, envelope, inputs)["job_id"] == "j_aaaaaaaaaaaa"
    assert sslib_verifies(e_pub, envelope, keyid=fp)


@pytest.mark.parametrize("case", VALID, ids=lambda c: c["name"])
def test_envelope_signed_by_securesystemslib_verifies_with_pond(case):
    public = sslib_key(H(SIGNER["ed25519_public"]), SIGNER["fingerprint"])
    signer = interop("securesystemslib.signer").CryptoSigner(Ed25519PrivateKey.from_private_bytes(H(SIGNER["ed25519_private"])), public)
    envelope = interop("securesystemslib.dsse").Envelope(swarm.canonical_json(case["statement"]),
                                                         VECTORS["payload_type"], {})
    envelope.sign(signer)
    signed = envelope.to_dict()
    assert pond_accepts(H(SIGNER["ed25519_public"]), signed, case["inputs"]) == case["statement"]["predicate"]
    assert signed == case["envelope"]        # Ed25519 is deterministic: the same bytes as the worker's


def against(case):
    inputs = dict(VALID[0]["inputs"])
    inputs.update(case.get("against", {}))
    return inputs


@pytest.mark.parametrize("case", VECTORS["refused"], ids=lambda c: c["name"])
def test_pond_refuses_every_tampered_vector(case):
    public = H(case.get("public_key", SIGNER["ed25519_public"]))
    if case["fails_at"] == "envelope":
        assert_refused(lambda: attestation.verify_envelope(public, case["envelope"]))
    else:
        attestation.verify_envelope(public, case["envelope"])               # the signature is fine...
        assert_refused(lambda: pond_accepts(public, case["envelope"], against(case)))    # ...what it says is not


@pytest.mark.parametrize("case", VECTORS["refused"], ids=lambda c: c["name"])
def test_securesystemslib_agrees_on_which_signatures_are_bad(case):
    public = H(case.get("public_key", SIGNER["ed25519_public"]))
    assert sslib_verifies(public, case["envelope"]) is not case["signature_invalid"]


OUTCOME = ("state", "exit_code", "error")
OUTCOME_CASES = [c for c in VECTORS["refused"] if set(c.get("against", ())) & set(OUTCOME)]


def test_the_vectors_change_each_part_of_the_outcome():
    changed = {key for case in OUTCOME_CASES for key in case["against"]}
    assert changed == set(OUTCOME)
    assert all(set(case["against"]) <= set(OUTCOME) for case in OUTCOME_CASES)


@pytest.mark.parametrize("case", OUTCOME_CASES, ids=lambda c: c["name"])
def test_outcome_vectors_are_refused_only_for_the_reported_outcome(case):
    # Without a reported outcome the statement is fine: the refusal is the outcome check's.
    public = H(SIGNER["ed25519_public"])
    assert pond_accepts(public, case["envelope"], against(case), reported=False)
    err = assert_refused(lambda: pond_accepts(public, case["envelope"], against(case)))
    assert "reported" in err.detail


def test_a_signed_state_that_is_not_final_is_refused_without_a_reported_outcome():
    case = next(c for c in VECTORS["refused"] if c["name"] == "state not a final state")
    err = assert_refused(lambda: pond_accepts(H(SIGNER["ed25519_public"]), case["envelope"], against(case),
                                              reported=False))
    assert "running" in err.detail


TAMPERS = {
    "flipped byte in stdout": lambda env, inputs: (env, dict(inputs, stdout_b64=base64.b64encode(b"builT\n").decode())),
    "flipped byte in stderr": lambda env, inputs: (env, dict(inputs, stderr_b64=base64.b64encode(b"warning: y\n").decode())),
    "flipped byte in the signature": lambda env, inputs: (
        dict(env, signatures=[{"keyid": "x", "sig": flip_b64(env["signatures"][0]["sig"], 5)}]), inputs),
    "flipped byte in the payload": lambda env, inputs: (dict(env, payload=flip_b64(env["payload"], 100)), inputs),
    "attestation of job A submitted for job B": lambda env, inputs: (env, dict(inputs, job_id="j_bbbbbbbbbbbb")),
    "attestation of attempt 1 submitted for attempt 2": lambda env, inputs: (env, dict(inputs, attempt=2)),
    "success reported as a failure": lambda env, inputs: (env, dict(inputs, state="failed", exit_code=1)),
    "error added to the report": lambda env, inputs: (env, dict(inputs, error="timed out after 5 s")),
}


def flip_b64(text, index):
    raw = bytearray(unb64(text))
    raw[index] ^= 0x01
    return base64.b64encode(bytes(raw)).decode()


@pytest.mark.parametrize("name", sorted(TAMPERS))
def test_tampered_result_from_a_real_worker_is_refused(tmp_path, name):
    keys, e_pub, fp = fresh_worker(tmp_path)
    envelope, inputs = signed_result(keys, fp)
    pond_accepts(e_pub, envelope, inputs)                                  # untampered: accepted
    envelope, inputs = TAMPERS[name](copy.deepcopy(envelope), inputs)
    assert_refused(lambda: pond_accepts(e_pub, envelope, inputs))


def test_failure_reported_as_success_is_refused(tmp_path):
    keys, e_pub, fp = fresh_worker(tmp_path)
    envelope, inputs = signed_result(keys, fp, state="failed", exit_code=137, error="killed by signal 9")
    assert pond_accepts(e_pub, envelope, inputs)["state"] == "failed"
    success = dict(inputs, state="done", exit_code=0, error=None)      # what a relay would rather say
    err = assert_refused(lambda: pond_accepts(e_pub, envelope, success))
    assert "state" in err.detail


def test_result_signed_by_another_worker_is_refused(tmp_path):
    keys, e_pub, fp = fresh_worker(tmp_path / "a")
    other_keys, _, _ = fresh_worker(tmp_path / "b")
    envelope, inputs = signed_result(other_keys, fp)        # B signs a statement naming A's fingerprint
    err = assert_refused(lambda: pond_accepts(e_pub, envelope, inputs))
    assert "pinned" in err.detail


def test_any_one_good_signature_is_enough_and_keyids_are_not_trusted():
    case = VALID[0]
    good = case["envelope"]["signatures"][0]
    envelope = dict(case["envelope"], signatures=[{"keyid": SIGNER["fingerprint"], "sig": flip_b64(good["sig"], 0)},
                                                  {"keyid": "anything", "sig": good["sig"]}])
    assert pond_accepts(H(SIGNER["ed25519_public"]), envelope, case["inputs"])


def test_url_safe_base64_is_accepted_as_dsse_allows():
    case = VALID[0]
    urlsafe = lambda text: base64.urlsafe_b64encode(unb64(text)).decode()
    envelope = dict(case["envelope"], payload=urlsafe(case["envelope"]["payload"]),
                    signatures=[{"keyid": "k", "sig": urlsafe(case["envelope"]["signatures"][0]["sig"])}])
    assert envelope != case["envelope"]
    assert pond_accepts(H(SIGNER["ed25519_public"]), envelope, case["inputs"])


@pytest.mark.parametrize("envelope", [None, [], "x", {"payloadType": attestation.PAYLOAD_TYPE},
                                      dict(VALID[0]["envelope"], signatures=VALID[0]["envelope"]["signatures"] * 9),
                                      dict(VALID[0]["envelope"], signatures=["sig"]),
                                      dict(VALID[0]["envelope"], payload=7)],
                         ids=["null", "list", "string", "no payload", "too many signatures", "signature not an object",
                              "payload not a string"])
def test_malformed_envelope_is_refused(envelope):
    assert_refused(lambda: attestation.verify_envelope(H(SIGNER["ed25519_public"]), envelope))


def test_signing_without_cryptography_says_pip_install(monkeypatch):
    # None in sys.modules makes the import fail, as on a host without the package.
    monkeypatch.setitem(sys.modules, "cryptography.hazmat.primitives.asymmetric", None)
    with pytest.raises(swarm.SwarmError) as caught:
        swarm.sign_envelope(H(SIGNER["ed25519_private"]), VALID[0]["statement"], SIGNER["fingerprint"])
    assert caught.value.hint == "pip install 'cryptography>=48'"


def test_make_attestation_writes_exactly_the_committed_vectors(tmp_path):
    written = tmp_path / "attestation.json"
    subprocess.run([sys.executable, str(ROOT / "specs" / "vectors" / "make_attestation.py"), str(written)],
                   cwd=tmp_path, check=True, capture_output=True, timeout=60)
    assert written.read_bytes() == (ROOT / "specs" / "vectors" / "attestation.json").read_bytes()

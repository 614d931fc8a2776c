"""Signed results live (specs/attestation.md): a real worker's result verifies with other tools and
offline, and a lying orchestrator cannot get a tampered result recorded.

A) A real pond, orchestrator and worker run a job; its attestation verifies with securesystemslib,
   names the output pond serves, and `pond verify` checks it while pond runs, after it stopped, and
   refuses it once the stored output is changed.
B) The test is the orchestrator (Liar): it pairs with a real pond, enrolls a worker whose keys it
   holds, takes assignments by polling, and reports results signed with swarm.py's own functions,
   each tampered in one way. pond must answer 403 attestation_failed, keep nothing of the report,
   record a result_refused event, and then take the genuine report.
"""

import base64
import copy
import hashlib
import json

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey

import swarm
from conftest import JOB_PY, interop, wait_for

STDOUT = "grüße ✓\n".encode()
STDERR = b"warning: x\n"
COMMAND = [JOB_PY, "-c", "import sys; print('grüße ✓'); sys.stderr.write('warning: x\\n')"]


def b64(data):
    return base64.b64encode(data).decode()


def flip(data, index):
    raw = bytearray(data)
    raw[index] ^= 0x01
    return bytes(raw)


def flip_b64(text, index):
    return b64(flip(base64.b64decode(text), index))


def new_keys():
    """A worker's keys as the test holds them: -> (ed25519 private, x25519 public, ed25519 public, fingerprint)."""
    signing = Ed25519PrivateKey.generate()
    x_pub = X25519PrivateKey.generate().public_key().public_bytes_raw()
    e_pub = signing.public_key().public_bytes_raw()
    return signing.private_bytes_raw(), x_pub, e_pub, swarm.fingerprint(x_pub, e_pub)


def chunks(stdout=STDOUT, stderr=STDERR):
    return [{"stream": name, "seq": 0, "data": b64(data)} for name, data in (("stdout", stdout), ("stderr", stderr))
            if data]


def statement(job, fingerprint, state="done", exit_code=0, error=None, stdout=STDOUT, stderr=STDERR):
    return swarm.result_statement(job_id=job["job_id"], attempt=job["attempt"], command=job["command"],
                                  sandbox=job["sandbox"], worker_fingerprint=fingerprint, state=state,
                                  exit_code=exit_code, error=error, started_at=1795271248.5,
                                  finished_at=1795271249.0, stdout=stdout, stderr=stderr)


def refused_events(events, worker):
    """The result_refused events of attempt 1 by `worker`."""
    return [e for e in events if e["event"] == "result_refused" and e["attempt"] == 1 and e["worker"] == worker]


class Liar:
    """An orchestrator driven by hand against a real pond, with one worker whose keys the test holds."""

    def __init__(self, pond):
        self.pond = pond
        status, body = pond.api("POST", "/v1/orch/pair", {"code": pond.pairing_code(), "name": "liar"}, token=None)
        assert status == 201, body
        self.token = body["token"]
        self.signing, x_pub, e_pub, self.fingerprint = new_keys()
        keys = {"x25519_public": b64(x_pub), "ed25519_public": b64(e_pub), "fingerprint": self.fingerprint}
        status, body = self.call("POST", f"/v1/orch/enrollment/{pond.enrollment_code()}/consumed",
                                 dict(keys, name="liar", slots=4))
        assert status == 201 and body["pinned"], body
        self.worker = body["worker_id"]
        status, body = self.call("POST", "/v1/orch/workers/snapshot",
                                 {"workers": [{"id": self.worker, "fingerprint": self.fingerprint, "slots": 4,
                                               "online": True, "capabilities": ["sandbox.process"]}]})
        assert status == 200 and body == {"unknown": [], "refused": [], "revoked": [], "evicted": []}, body

    def call(self, method, path, body=None, headers=None):
        return self.pond.api(method, path, body, token=self.token, headers=headers)

    def poll(self):
        status, body = self.call("POST", "/v1/orch/poll", {"wait": 0})
        assert status == 200, body
        return body["jobs"]

    def assign(self):
        """Submit a job and take its assignment with a real poll: -> the assignment."""
        job_id = self.pond.submit(COMMAND)["id"]
        jobs = self.poll()
        assert [j["job_id"] for j in jobs] == [job_id], jobs
        assert jobs[0]["worker"] == self.worker and jobs[0]["attempt"] == 1
        return jobs[0]

    def sign(self, job, signing=None, **outcome):
        return swarm.sign_envelope(signing or self.signing, statement(job, self.fingerprint, **outcome),
                                   self.fingerprint)

    def report(self, job, body, kind="state"):
        return self.call("POST", f"/v1/orch/jobs/{job['job_id']}/{kind}", dict(body, attempt=job["attempt"]),
                         headers={"X-Claim-Token": job["claim_token"]})

    def genuine(self, job, state="done", exit_code=0, error=None):
        body = {"state": state, "exit_code": exit_code, "chunks": chunks(),
                "attestation": self.sign(job, state=state, exit_code=exit_code, error=error)}
        return dict(body, error=error) if error else body


# -- A) a real worker's result ---------------------------------------------------------------------------

def test_real_worker_result_verifies_with_securesystemslib_and_pond_verify_offline(pool):
    pond = pool.pond()
    orch = pool.orchestrator(pond)
    pool.worker(pond, orch)
    job_id = pond.submit(COMMAND)["id"]
    job = pond.wait_job(job_id)
    assert (job["state"], job["exit_code"], job["attested"]) == ("done", 0, True), job

    att = pond.client.get(f"/v1/jobs/{job_id}/attestation")
    assert (att["job"], att["attempt"], att["worker"]) == (job_id, 1, job["worker"])
    key_hex = base64.b64decode(att["ed25519_public"]).hex()
    key = interop("securesystemslib.signer").SSlibKey(att["fingerprint"], "ed25519", "ed25519", {"public": key_hex})
    envelope = interop("securesystemslib.dsse").Envelope.from_dict(copy.deepcopy(att["envelope"]))
    assert list(envelope.verify([key], 1)) == [att["fingerprint"]]

    signed = json.loads(base64.b64decode(att["envelope"]["payload"]))
    output = pond.output(job_id)
    assert output == {"stdout": STDOUT, "stderr": STDERR}
    assert {s["name"]: s["digest"]["sha256"] for s in signed["subject"]} == \
        {name: hashlib.sha256(data).hexdigest() for name, data in output.items()}
    assert (signed["predicate"]["job_id"], signed["predicate"]["worker_fingerprint"]) == (job_id, att["fingerprint"])

    done = pond.cli("verify", job_id)
    assert done.returncode == 0 and "verified" in done.stdout, done.stderr
    pond.proc.stop()
    done = pond.cli("verify", job_id)                       # offline: only the store
    assert done.returncode == 0 and "verified" in done.stdout, done.stderr
    data = json.loads(pond.cli("verify", job_id, "--json").stdout)
    assert data["verified"] is True and data["sha256"]["stdout"] == hashlib.sha256(STDOUT).hexdigest(), data
    unknown = pond.cli("verify", "j_doesnotexist")
    assert unknown.returncode == 1 and "does not exist" in unknown.stderr and "hint:" in unknown.stderr

    changed, _ = pond.sql("UPDATE chunks SET data = ? WHERE job_id = ? AND stream = 'stdout'",
                          (STDOUT.replace(b"\xc3\x9f", b"ss"), job_id))
    assert changed == 1
    done = pond.cli("verify", job_id)
    assert done.returncode != 0 and "does not verify" in done.stderr, (done.stdout, done.stderr)


# -- B) a lying orchestrator ------------------------------------------------------------------------------
# Each case: (liar, assignment) -> (the lying report, the genuine report that must be taken after it).
# Attempt 1's attestation for attempt 2 needs a lease to run out: it has a test of its own below.

def flipped_output(liar, job):
    return dict(liar.genuine(job), chunks=chunks(stdout=flip(STDOUT, 2))), liar.genuine(job)


def flipped_signature(liar, job):
    lie = liar.genuine(job)
    sig = lie["attestation"]["signatures"][0]
    lie["attestation"]["signatures"] = [dict(sig, sig=flip_b64(sig["sig"], 5))]
    return lie, liar.genuine(job)


def flipped_payload(liar, job):
    lie = liar.genuine(job)
    lie["attestation"]["payload"] = flip_b64(lie["attestation"]["payload"], 100)
    return lie, liar.genuine(job)


def another_workers_key(liar, job):
    other = new_keys()[0]         # a statement naming this worker's fingerprint, signed by another key
    return dict(liar.genuine(job), attestation=liar.sign(job, signing=other)), liar.genuine(job)


def job_a_for_job_b(liar, job):
    a = liar.assign()              # the same command and output: only the job id differs
    return liar.genuine(a), liar.genuine(job)


def failure_reported_as_done(liar, job):
    failed = liar.genuine(job, state="failed", exit_code=1, error="exit 1")
    return dict(failed, state="done", exit_code=0, error=None), failed


def missing_attestation(liar, job):
    return {k: v for k, v in liar.genuine(job).items() if k != "attestation"}, liar.genuine(job)


def chunk_dropped(liar, job):
    """Signed over two stdout chunks; the lie sends only the second. The genuine run streams the
    first through /chunk and sends the second with the final report."""
    first, second = STDOUT[:3], STDOUT[3:]
    envelope = liar.sign(job)
    lie = {"state": "done", "exit_code": 0, "attestation": envelope,
           "chunks": [{"stream": "stdout", "seq": 1, "data": b64(second)}, *chunks(stdout=b"")]}

    def genuine():
        status, body = liar.report(job, {"stream": "stdout", "seq": 0, "data": b64(first)}, kind="chunk")
        assert status == 200, body
        return lie
    return lie, genuine


# Each case with a word of the refusal's detail: the check that must catch it (pond logs the detail; the
# answer does not say it).
CASES = [(flipped_output, "digest"), (flipped_signature, "signature"), (flipped_payload, "signature"),
         (another_workers_key, "signature"), (job_a_for_job_b, "for job"), (failure_reported_as_done, "state"),
         (missing_attestation, "no attestation"), (chunk_dropped, "digest")]


@pytest.mark.parametrize("case, detail", CASES, ids=[c.__name__.replace("_", " ") for c, _ in CASES])
def test_lying_orchestrator_cannot_record_a_tampered_result(pool, case, detail):
    pond = pool.pond(poll_hold=1)
    liar = Liar(pond)
    job = liar.assign()
    lie, genuine = case(liar, job)

    status, body = liar.report(job, lie)
    assert status == 403 and body["error"]["code"] == "attestation_failed", body
    after = pond.job(job["job_id"])
    assert (after["state"], after["exit_code"], after["attested"]) == ("assigned", None, None), after
    assert pond.client.get(f"/v1/jobs/{job['job_id']}/logs")["chunks"] == [], "a refused report stored output"
    assert [detail in e["detail"] for e in refused_events(after["events"], liar.worker)] == [True], after["events"]
    status, workers = pond.api("GET", "/v1/admin/pool/workers")
    assert status == 200, workers
    mine = next(w for w in workers["workers"] if w["id"] == liar.worker)
    assert refused_events(mine["events"], liar.worker), mine

    genuine = genuine() if callable(genuine) else genuine
    status, body = liar.report(job, genuine)
    assert status == 200, body
    done = pond.job(job["job_id"])
    assert (done["state"], done["exit_code"], done["attested"]) == (genuine["state"], genuine["exit_code"], True)
    assert pond.output(job["job_id"]) == {"stdout": STDOUT, "stderr": STDERR}
    assert pond.client.get(f"/v1/jobs/{job['job_id']}/attestation")["envelope"] == genuine["attestation"]


def test_unsigned_report_of_a_job_that_never_ran_is_taken_unattested(pool):
    pond = pool.pond(poll_hold=1)
    liar = Liar(pond)
    job = liar.assign()
    status, body = liar.report(job, {"state": "cancelled", "exit_code": None})
    assert status == 200, body
    done = pond.job(job["job_id"])
    assert (done["state"], done["exit_code"], done["attested"]) == ("cancelled", None, False), done
    status, body = pond.api("GET", f"/v1/jobs/{job['job_id']}/attestation")
    assert status == 404, body


def test_attempt_1s_attestation_is_refused_for_attempt_2(pool):
    pond = pool.pond(poll_hold=1, extra=("--lease", "2"))
    liar = Liar(pond)
    first = liar.assign()
    second = wait_for(liar.poll, 10, interval=0.2, what="the job requeued after its lease ran out")[0]
    assert (second["job_id"], second["attempt"]) == (first["job_id"], 2), second
    status, body = liar.report(second, liar.genuine(first))      # attempt 1's result, with attempt 2's fence
    assert status == 403 and body["error"]["code"] == "attestation_failed", body
    events = [e for e in pond.job(first["job_id"])["events"] if e["event"] == "result_refused"]
    assert [e["attempt"] for e in events] == [2] and "attempt" in events[0]["detail"], events
    status, body = liar.report(second, liar.genuine(second))
    assert status == 200, body
    done = pond.job(first["job_id"])
    assert (done["state"], done["attempt"], done["attested"]) == ("done", 2, True), done


def test_a_revoked_worker_gets_no_seal_and_its_results_are_refused(pool):
    pond = pool.pond()
    liar = Liar(pond)
    pond.api("POST", "/v1/admin/credentials", {"name": "kept", "secrets": {"TOKEN": "t0ken-value"}})
    job_id = pond.submit(COMMAND, credential="kept")["id"]
    (job,) = liar.poll()
    assert job["job_id"] == job_id and job["credential"] == "kept"
    status, body = liar.call("POST", f"/v1/orch/jobs/{job_id}/seal", {"attempt": 1},
                             headers={"X-Claim-Token": job["claim_token"]})
    assert status == 200 and body["fingerprint"] == liar.fingerprint, body
    assert pond.api("DELETE", f"/v1/admin/pool/workers/{liar.worker}")[0] == 200
    status, body = liar.call("POST", f"/v1/orch/jobs/{job_id}/seal", {"attempt": 1},
                             headers={"X-Claim-Token": job["claim_token"]})
    assert (status, body["error"]["code"]) == (403, "revoked"), body
    assert "t0ken-value" not in json.dumps(body)
    status, body = liar.report(job, liar.genuine(job))
    assert (status, body["error"]["code"]) == (403, "attestation_failed"), body
    after = pond.job(job_id)
    assert after["state"] == "assigned" and "revoked" in refused_events(after["events"], liar.worker)[0]["detail"]

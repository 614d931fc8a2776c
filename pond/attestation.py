"""Checking a worker's signed result: a DSSE envelope over an in-toto Statement (specs/attestation.md).

Two steps, so the signature check stays apart from what pond knows about the job:
verify_envelope checks the signature with the worker's pinned Ed25519 key and returns
the statement; check_statement checks that the statement speaks of this job, this
attempt, this worker and exactly this output and outcome. Every refusal is the same
outward error (`attestation_failed`, "attestation failed"), so a forger learns nothing
from it; the error's `detail` says which check failed, for pond's log.
"""

import base64
import binascii
import functools
import hashlib
import json
from pathlib import Path

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from pond import sealing
from pond.errors import Forbidden, NotFound
from pond.wire import canonical_json

PAYLOAD_TYPE = "application/vnd.in-toto+json"
STATEMENT_TYPE = "https://in-toto.io/Statement/v1"
RESULT_PREDICATE_TYPE = "https://pond.dev/attestation/result/v1"
SUBJECT_NAMES = ("stdout", "stderr")
FINAL_STATES = ("done", "failed", "cancelled")      # a result is signed once, when the attempt has ended
MAX_SIGNATURES = 8        # bounds the work an untrusted envelope can ask for


def refused(detail):
    err = Forbidden("attestation failed", "the result is not signed by this job's worker for this attempt and "
                    "output; pond's log says which check failed", code="attestation_failed")
    err.detail = detail
    return err


def pae(payload_type, payload):
    """DSSE v1 pre-authentication encoding: the bytes a signature covers, type and body unambiguous."""
    kind = payload_type.encode("utf-8")
    return b"DSSEv1 %d %b %d %b" % (len(kind), kind, len(payload), payload)


def _b64decode(text, what):
    # DSSE lets a signer use standard or URL-safe base64; both decode to the same bytes.
    if not isinstance(text, str):
        raise refused(f"{what} is not a base64 string")
    try:
        return base64.b64decode(text.replace("-", "+").replace("_", "/"), validate=True)
    except (binascii.Error, ValueError):
        raise refused(f"{what} is not base64") from None


def _unique_keys(pairs):
    # Two verifiers must read one payload the same way: a duplicate key could mean one thing to us
    # and another to a tool that keeps the first value.
    obj = {}
    for key, value in pairs:
        if key in obj:
            raise ValueError(f"duplicate key {key[:40]!r}")
        obj[key] = value
    return obj


def _not_json(name):
    raise ValueError(f"{name} is not JSON")


@functools.lru_cache(maxsize=4096)
def _public_key(raw):
    """A pinned key's object, made once per worker rather than once per result."""
    return Ed25519PublicKey.from_public_bytes(raw)


def verify_envelope(ed25519_public, envelope):
    """-> the statement (a dict), once a signature over PAE(payloadType, payload) verifies with the pinned key.

    The signature is checked over the payload bytes as sent, before they are parsed, and
    the keyid is ignored: DSSE keyids are unauthenticated hints.
    """
    if not isinstance(envelope, dict):
        raise refused("the envelope is not a JSON object")
    if envelope.get("payloadType") != PAYLOAD_TYPE:
        raise refused(f"payloadType {str(envelope.get('payloadType'))[:80]!r} is not {PAYLOAD_TYPE}")
    payload = _b64decode(envelope.get("payload"), "payload")
    signatures = envelope.get("signatures")
    if not isinstance(signatures, list) or not 1 <= len(signatures) <= MAX_SIGNATURES:
        raise refused(f"signatures must be a list of 1 to {MAX_SIGNATURES}")
    key = _public_key(bytes(ed25519_public))
    message = pae(PAYLOAD_TYPE, payload)
    for signature in signatures:
        sig = _b64decode(signature.get("sig") if isinstance(signature, dict) else None, "a signature")
        try:
            key.verify(sig, message)
            break
        except InvalidSignature:
            continue
    else:
        raise refused("no signature verifies with the worker's pinned Ed25519 key")
    try:
        statement = json.loads(payload.decode("utf-8"), object_pairs_hook=_unique_keys, parse_constant=_not_json)
    except (ValueError, RecursionError) as e:      # UnicodeDecodeError and JSONDecodeError are ValueErrors
        raise refused(f"the payload is not JSON: {str(e)[:80]}") from None
    if not isinstance(statement, dict):
        raise refused("the payload is not a JSON object")
    return statement


def _subject_digests(subject, artifacts=False):
    """{"stdout": hex, "stderr": hex} from the statement's subject list, which must name each exactly once;
    with `artifacts`, also {name: hex} of each artifact it names (changes.patch, work/...), once each."""
    from pond.artifacts import NAME_RE
    out = {}
    for item in subject if isinstance(subject, list) else [None]:
        name = item.get("name") if isinstance(item, dict) else None
        digest = item.get("digest") if isinstance(item, dict) else None
        known = name in SUBJECT_NAMES or (artifacts and isinstance(name, str) and NAME_RE.match(name))
        if not known or name in out or not isinstance(digest, dict) or not isinstance(digest.get("sha256"), str):
            raise refused("the subject must list stdout and stderr once each, with a sha256 digest, and "
                          "artifacts once each")
        out[name] = digest["sha256"]
    if not all(name in out for name in SUBJECT_NAMES):
        raise refused("the subject must list stdout and stderr once each, with a sha256 digest")
    return out


def _signed_outcome(predicate):
    """(state, exit_code, error) as the worker signed them, once each is of its type (§3)."""
    state, code, error = predicate.get("state"), predicate.get("exit_code"), predicate.get("error")
    if state not in FINAL_STATES:
        raise refused(f"the signed state {repr(state)[:40]} is not one of {', '.join(FINAL_STATES)}")
    if code is not None and type(code) is not int:      # type(): True == 1 in Python
        raise refused(f"the signed exit_code {repr(code)[:40]} is not an integer or null")
    if error is not None and not isinstance(error, str):
        raise refused("the signed error is not a string or null")
    return state, code, error


def _check_outcome(signed, outcome):
    """The outcome reported beside the envelope, which no signature covers, must be the one signed."""
    (state, code, error), (told_state, told_code, told_error) = signed, outcome
    if told_state != state:
        raise refused(f"the reported state {repr(told_state)[:40]} is not the signed {state!r}")
    if type(told_code) is not type(code) or told_code != code:    # False == 0, 1.0 == 1 in Python
        raise refused(f"the reported exit_code {repr(told_code)[:40]} is not the signed {code!r}")
    if told_error != error:
        # Untrusted text, as the worker wrote it or as a relay changed it: cut short, repr()'d for the log.
        raise refused(f"the reported error {repr(told_error)[:80]} is not the signed {repr(error)[:80]}")


def _check_sandbox(signed, stored):
    """The sandbox the worker signed must be the job's stored block, key for key: one an orchestrator
    loosened on the way (another profile, wider limits, more hosts) is another job (specs/attestation.md §3)."""
    if signed == stored:
        return
    if not isinstance(signed, dict):
        raise refused(f"the signed sandbox {repr(signed)[:80]} is not the job's sandbox block")
    differ = sorted(k for k in set(signed) | set(stored) if signed.get(k, ...) != stored.get(k, ...))
    raise refused("the signed sandbox is not the job's: it differs in " + ", ".join(str(k)[:40] for k in differ[:8])
                  + f" (signed {repr({k: signed.get(k) for k in differ[:8]})[:200]})")


NOTHING_DROPPED = {"stdout": 0, "stderr": 0}
MAX_USAGE_CALLS = 256     # calls a signed usage lists one by one (swarm.py's BROKER_CALLS_SIGNED); its totals count all
CALL_FIELDS = {"model": str, "input_tokens": int, "output_tokens": int, "latency_ms": int, "status": int}


def _check_usage(usage):
    """An agent job's signed usage (§3): totals and the calls, each field of its type."""
    totals = ("calls", "input_tokens", "output_tokens", "refused")
    if not isinstance(usage, dict) or sorted(usage) != sorted(totals):
        raise refused("the signed usage is not {calls, input_tokens, output_tokens, refused}")
    if any(type(usage[k]) is not int or usage[k] < 0 for k in totals[1:]):
        raise refused("the signed usage totals are not whole numbers >= 0")
    calls = usage["calls"]
    if not isinstance(calls, list) or len(calls) > MAX_USAGE_CALLS or not all(
            isinstance(c, dict) and sorted(c) == sorted(CALL_FIELDS)
            and all(type(c[k]) is t for k, t in CALL_FIELDS.items()) for c in calls):
        raise refused(f"the signed usage calls are not a list of at most {MAX_USAGE_CALLS} "
                      "{model, input_tokens, output_tokens, latency_ms, status}")


def check_statement(statement, job_id, attempt, fingerprint, stdout, stderr, command=None, outcome=None,
                    dropped=None, sandbox=None, source=None, artifacts=False, spec=None):
    """-> the predicate, once the statement is about this job, attempt, worker, output and outcome.

    stdout and stderr are the output pond holds for the attempt, as bytes. Give `command`
    (the job's argv) to check the command digest too, and `outcome`, the (state, exit_code,
    error) reported with the envelope, to check it is the signed one, and `dropped`, the bytes
    the log cap left out as reported, to check those too, and `sandbox`, the job's stored block,
    to check the worker says it was asked for exactly that one. `source` ({sha256, size} of the
    job's bundle, or None) must be the signed one; with `artifacts`, subjects other than stdout and
    stderr may name artifacts (the caller checks their digests). Give `spec`, an agent job's spec
    digest (sealing.job_spec, over its runtime files and broker too), to check it and its signed
    usage. A valid signature is
    not enough: an attestation of another job or attempt, replayed by an orchestrator, is
    signed too.
    """
    if not isinstance(statement, dict) or statement.get("_type") != STATEMENT_TYPE:
        raise refused(f"the statement's _type is not {STATEMENT_TYPE}")
    if statement.get("predicateType") != RESULT_PREDICATE_TYPE:
        raise refused(f"the predicateType is not {RESULT_PREDICATE_TYPE}")
    predicate = statement.get("predicate")
    if not isinstance(predicate, dict):
        raise refused("the predicate is not a JSON object")
    if predicate.get("job_id") != job_id:
        raise refused(f"the statement is for job {repr(predicate.get('job_id'))[:80]}, not {job_id}")
    got = predicate.get("attempt")
    if type(got) is not int or got != attempt:          # type(): True == 1 in Python
        raise refused(f"the statement is for attempt {repr(got)[:20]}, not {attempt}")
    if predicate.get("worker_fingerprint") != fingerprint:
        raise refused("the statement names another worker fingerprint")
    digests = _subject_digests(statement.get("subject"), artifacts)
    for name, data in (("stdout", stdout), ("stderr", stderr)):
        if digests[name] != hashlib.sha256(data).hexdigest():
            raise refused(f"{name} does not match the signed digest")
    if command is not None and predicate.get("command_digest") != {
            "sha256": hashlib.sha256(canonical_json(list(command))).hexdigest()}:
        raise refused("the command does not match the signed command digest")
    if sandbox is not None:
        _check_sandbox(predicate.get("sandbox"), sandbox)
    if predicate.get("source") != source:
        raise refused("the signed source is not the job's (its bundle's sha256 and size)")
    signed = _signed_outcome(predicate)        # checked even with no outcome: a result has ended
    if outcome is not None:
        _check_outcome(signed, outcome)
    if dropped is not None and predicate.get("dropped", NOTHING_DROPPED) != dropped:
        raise refused("the reported dropped bytes are not the signed ones")
    if spec is not None:
        if predicate.get("spec_digest") != {"sha256": spec}:
            raise refused("the signed spec digest is not the job's (its files or broker differ)")
        _check_usage(predicate.get("usage"))
    return predicate


def verify_job(store, job_id, state_dir):
    """`pond verify`: re-check a finished job's stored attestation against the stored output
    and the worker's pinned key, as pond did when it recorded the result; its artifacts are in
    `state_dir`/blobs, or on PostgreSQL in the database's blobs table. -> (job, worker, statement)."""
    job = store.job(job_id)
    if job is None:
        raise NotFound(f"job {job_id[:64]!r} does not exist in this state dir", "check the id and --state-dir")
    if job["attestation"] is None:
        raise NotFound(f"job {job_id} has no attestation (state {job['state']})",
                       "a job that has not ended, or whose result was recorded unsigned, has nothing to verify")
    worker = store.worker(job["worker_id"])
    if worker is None or not worker["ed25519_public"]:
        raise refused(f"worker {job['worker_id']} has no pinned key in this store")
    statement = verify_envelope(base64.b64decode(worker["ed25519_public"]), job["attestation"])
    output = store.output(job_id, job["attempt"])
    from pond.bundles import spec_source
    source = spec_source(job["source"])
    spec = None
    if job.get("files") is not None or job.get("broker") is not None:
        spec = sealing.job_spec(job["command"], job["env"], job["sandbox"], job.get("files"), job.get("broker"),
                                source=source)
    check_statement(statement, job_id, job["attempt"], worker["fingerprint"], output["stdout"], output["stderr"],
                    command=job["command"], outcome=(job["state"], job["exit_code"], job["error"]),
                    dropped=job["dropped"] or NOTHING_DROPPED, sandbox=job["sandbox"], source=source, artifacts=True,
                    spec=spec)
    _check_artifacts(store, job, statement, state_dir)
    return job, worker, statement


def _check_artifacts(store, job, statement, state_dir):
    """The artifacts pond recorded are exactly those signed, and each stored file still has its digest."""
    from pond import blobs
    signed = {s["name"]: s["digest"]["sha256"] for s in statement["subject"] if s["name"] not in SUBJECT_NAMES}
    recorded = {a["name"]: a["sha256"] for a in job["outputs"] or []}
    if signed != recorded:
        raise refused("the artifacts pond recorded are not the ones the worker signed")
    kept = blobs.PgBlobs(store) if hasattr(store, "blob_append") else blobs.FileBlobs(Path(state_dir) / "blobs")
    for name, digest in signed.items():
        if store.artifact(job["id"], job["attempt"], name) is None:
            continue        # collected past --artifact-retention (specs/bundles.md §9): its digest stays signed
        try:
            ok = blobs.sha256(kept, f"artifacts/{job['id']}/{job['attempt']}/{name}") == digest
        except OSError:
            ok = False
        if not ok:
            raise refused(f"artifact {name} as stored does not match its signed sha256")

"""Sealing a job's secret env to one worker's X25519 key (specs/sealing.md).

HPKE (RFC 9180) base mode, DHKEM(X25519, HKDF-SHA256) / HKDF-SHA256 / ChaCha20-Poly1305,
single shot, empty aad. `info` binds the job id, the attempt, the worker's fingerprint
and the job's spec (command, env, sandbox), so a blob opens only for the one attempt it
was sealed for, running what was submitted: an orchestrator that replays it to another
job, a later attempt or another worker, or that changes what the job runs so as to read
the credential, gets nothing readable.
There is no clear-text fallback: what cannot be sealed is an error, never sent as is.
"""

import base64
import binascii
import hashlib
import json
import re

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hpke
from cryptography.hazmat.primitives.asymmetric import x25519

from pond import wire
from pond.wire import canonical_json
from pond.errors import BadRequest

SUITE_NAME = "DHKEM(X25519,HKDF-SHA256)/HKDF-SHA256/ChaCha20-Poly1305"
INFO_PREFIX = b"pond-seal-v2\x00"
ENC_LENGTH = 32          # an X25519 public key
TAG_LENGTH = 16          # ChaCha20-Poly1305
FINGERPRINT_RE = re.compile(r"^[0-9a-f]{64}\Z")
BLOB_FIELDS = ("ct", "enc", "suite")

_SUITE = hpke.Suite(hpke.KEM.X25519, hpke.KDF.HKDF_SHA256, hpke.AEAD.CHACHA20_POLY1305)


def _refuse(message, hint):
    return BadRequest(message, hint, code="seal_failed")


def job_spec(command, env, sandbox, files=None, broker=None, source=None):
    """The digest of what a job runs, as both pond and the worker hold it (specs/sealing.md §3): an agent
    job's runtime files and broker block, and `source` ({sha256, size} of its bundle), are in it too
    (absent, not null, for a job without them)."""
    spec = {"command": command, "env": env, "sandbox": sandbox}
    spec.update({k: v for k, v in (("files", files), ("broker", broker), ("source", source)) if v is not None})
    return hashlib.sha256(canonical_json(spec)).hexdigest()


def seal_info(job_id, attempt, fingerprint, spec, prefix=INFO_PREFIX):
    """HPKE `info` for one attempt of one job, running `spec` (job_spec), on one worker; a source
    bundle's data key is sealed with another prefix (bundles.SEAL_PREFIX)."""
    if not isinstance(job_id, str) or not job_id:
        raise _refuse("cannot seal: the job id must be a non-empty string", "this is a bug in the caller")
    if not isinstance(attempt, int) or isinstance(attempt, bool) or attempt < 1:
        raise _refuse("cannot seal: the attempt must be a whole number >= 1", "this is a bug in the caller")
    if not isinstance(fingerprint, str) or not FINGERPRINT_RE.match(fingerprint):
        raise _refuse("cannot seal: the worker fingerprint must be 64 lowercase hex digits",
                      "specs/sealing.md §1 defines the fingerprint")
    if not isinstance(spec, str) or not FINGERPRINT_RE.match(spec):
        raise _refuse("cannot seal: the job spec digest must be 64 lowercase hex digits", "use job_spec()")
    return prefix + canonical_json({"attempt": attempt, "fingerprint": fingerprint, "job": job_id,
                                         "spec": spec})


def seal_env(recipient_x25519_public_raw, env, job_id, attempt, fingerprint, spec):
    """The secret env sealed to the worker's pinned X25519 key: {"enc", "ct", "suite"}."""
    info = seal_info(job_id, attempt, fingerprint, spec)
    try:
        if not isinstance(env, dict):      # wire.env takes None for {}: a secret env is never implied
            raise BadRequest("the secret env must be an object of NAME: value strings")
        wire.env(env, "secret env")
    except BadRequest as e:
        raise _refuse(f"cannot seal: {e.message}", e.hint) from None
    try:
        public_key = x25519.X25519PublicKey.from_public_bytes(bytes(recipient_x25519_public_raw))
        sealed = _SUITE.encrypt(canonical_json(env), public_key, info=info)
    except (TypeError, ValueError):
        # Wrong length, or a low-order point that gives an all-zero shared secret (RFC 9180 §7.1.4).
        raise _refuse(f"cannot seal to worker {fingerprint}: its pinned X25519 key is not a usable public key",
                      "the worker must enroll again with fresh keys") from None
    enc, ct = sealed[:ENC_LENGTH], sealed[ENC_LENGTH:]
    return {"enc": base64.b64encode(enc).decode(), "ct": base64.b64encode(ct).decode(), "suite": SUITE_NAME}


def _decode(blob, field, length=None, minimum=0):
    try:
        raw = base64.b64decode(blob[field], validate=True)
    except (binascii.Error, TypeError, ValueError):
        raise _refuse("credential could not be unsealed", f"the sealed blob's {field} is not base64") from None
    if (length is not None and len(raw) != length) or len(raw) < minimum:
        raise _refuse("credential could not be unsealed", f"the sealed blob's {field} has the wrong length")
    return raw


def open_env(private_raw, blob, job_id, attempt, fingerprint, spec):
    """The env a blob carries, for the worker holding `private_raw`; BadRequest seal_failed if it does not open.

    pond never holds a worker's private key: this exists for tests and offline tooling.
    Every failure has the same message, and none carries secret material.
    """
    info = seal_info(job_id, attempt, fingerprint, spec)
    if not isinstance(blob, dict) or sorted(blob) != sorted(BLOB_FIELDS):
        raise _refuse("credential could not be unsealed", 'a sealed blob has exactly the fields "enc", "ct", "suite"')
    if blob["suite"] != SUITE_NAME:
        raise _refuse("credential could not be unsealed", f"the only suite is {SUITE_NAME}")
    enc = _decode(blob, "enc", length=ENC_LENGTH)
    ct = _decode(blob, "ct", minimum=TAG_LENGTH)
    try:
        private_key = x25519.X25519PrivateKey.from_private_bytes(bytes(private_raw))
        plaintext = _SUITE.decrypt(enc + ct, private_key, info=info)
    except (InvalidTag, TypeError, ValueError):
        raise _refuse("credential could not be unsealed", "it was sealed for another worker key, job, attempt, "
                      "fingerprint or job spec (command, env, sandbox), or altered on the way") from None
    try:
        env = json.loads(plaintext.decode("utf-8"))
        if not isinstance(env, dict):
            raise ValueError("not an object")
        wire.env(env, "secret env")
    except (UnicodeDecodeError, ValueError, BadRequest):
        raise _refuse("credential could not be unsealed",
                      "it opened but does not hold a {NAME: value} object") from None
    return env

"""Credentials: secret env stored encrypted at rest, sealed to one worker per attempt.

    operator ── POST /v1/admin/credentials {name, provider?, env?, secrets} ──▶ encrypted row
    consumer ── POST /v1/jobs {..., credential: name} ──▶ the job names it (an intent)
    worker ──▶ orchestrator ── POST /v1/orch/jobs/{id}/seal (X-Claim-Token) ──▶ HPKE blob
                                   sealed to the assigned worker's pinned X25519 key

At rest, a credential's env and secrets are one ChaCha20-Poly1305 ciphertext under the
credential key (a 32-byte file in pond's state dir, 0600, or one the operator gives),
with the credential's name as associated data, so a row copied under another name does
not open. No read returns them: views list the names of the variables, never a value.
The clear text exists only in pond's memory while it seals, and on the worker.
"""

import base64
import hashlib
import json
import os
import re

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import ChaCha20Poly1305

from pond import sealing, wire
from pond.errors import BadRequest, ConfigError, Conflict, Forbidden, NotFound
from pond.settings import read_private, write_private

KEY_FILE = "credential.key"          # in the state dir, 0600
KEY_BYTES = 32
NONCE_BYTES = 12
AAD_PREFIX = b"pond-credential-v1\x00"
FIELDS = ("name", "provider", "env", "secrets")
PROVIDER_RE = wire.CAPABILITY_RE
NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}\Z")      # it goes in a URL path: no spaces
NAME_HINT = "names look like anthropic or openai-prod: letters, digits, . _ -"


# -- the key ---------------------------------------------------------------------

def key_id(key):
    """A short public name for a credential key, so a row encrypted under another key says so."""
    return hashlib.sha256(b"pond-credential-key-id\x00" + key).hexdigest()[:16]


def load_key(path, create):
    """The credential key from `path` (base64 of 32 bytes, mode 0600); created there when `create`."""
    if create and not path.exists():
        write_private(path, base64.b64encode(os.urandom(KEY_BYTES)).decode() + "\n")
    elif not path.exists():
        raise ConfigError(f"credential key file {path} does not exist",
                          "give the file that holds pond's credential key (base64 of 32 bytes, mode 0600)")
    text = read_private(path)           # refuses a file group or others can read
    try:
        key = base64.b64decode(text, validate=True)
    except ValueError:
        key = b""
    if len(key) != KEY_BYTES:
        raise ConfigError(f"{path} does not hold a base64 32-byte credential key",
                          "restore it from a backup; without it, stored credentials cannot be opened")
    return key


# -- encryption at rest ------------------------------------------------------------

def encrypt(key, name, env):
    nonce = os.urandom(NONCE_BYTES)
    return nonce + ChaCha20Poly1305(key).encrypt(nonce, wire.canonical_json(env), AAD_PREFIX + name.encode())


def decrypt(key, row):
    """The full env (non-secret env and secrets) of a stored credential row."""
    if row["key_id"] != key_id(key):
        raise Conflict(f"credential {row['name']!r} was stored under credential key {row['key_id']}, and pond "
                       f"now runs with key {key_id(key)}",
                       "start pond with the credential key it was stored under, or set the credential again",
                       code="credential_key_mismatch")
    blob = bytes(row["ciphertext"])
    try:
        clear = ChaCha20Poly1305(key).decrypt(blob[:NONCE_BYTES], blob[NONCE_BYTES:],
                                              AAD_PREFIX + row["name"].encode())
    except InvalidTag:
        raise Conflict(f"credential {row['name']!r} does not decrypt: its stored row was altered",
                       "set the credential again", code="credential_key_mismatch") from None
    return json.loads(clear)


# -- /v1/admin/credentials -----------------------------------------------------------

def view(row):
    """A credential as any read shows it: names of variables, never a value."""
    return {"name": row["name"], "provider": row["provider"], "env": sorted(row["env_names"]),
            "secrets": sorted(row["secret_names"]), "key_id": row["key_id"],
            "created_at": row["created_at"], "updated_at": row["updated_at"]}


def put(pond, req):
    """POST /v1/admin/credentials {name, provider?, env?, secrets}: create or replace; 201 new, 200 replaced."""
    body = wire.obj(req.body, "credential", FIELDS, ("name", "secrets"))
    name = wire.string(body["name"], "name", 64, NAME_RE, NAME_HINT)
    provider = wire.optional_string(body.get("provider"), "provider", max_len=64, pattern=PROVIDER_RE)
    env = wire.env(body.get("env"), "env")
    if not isinstance(body["secrets"], dict) or not body["secrets"]:
        raise BadRequest("secrets must be an object of at least one NAME: value",
                         'example: {"secrets": {"ANTHROPIC_API_KEY": "..."}}; settings that are not secret go in env')
    secret_env = wire.env(body["secrets"], "secrets")
    both = sorted(set(env) & set(secret_env))
    if both:
        raise BadRequest(f"{both[0]} is in both env and secrets", "name each variable once")
    key = pond.settings.credential_key
    created = pond.store.put_credential(name, provider, sorted(env), sorted(secret_env),
                                        encrypt(key, name, {**env, **secret_env}), key_id(key), pond.now())
    return (201 if created else 200), view(pond.store.credential(name))


def list_all(pond, req):
    return 200, {"credentials": [view(r) for r in pond.store.credentials()]}


def get(pond, req):
    return 200, view(_find(pond, req.params["id"]))


def delete(pond, req):
    """DELETE /v1/admin/credentials/{name}: jobs that name it and have not been sealed yet fail when they try."""
    if req.body is not None:
        raise BadRequest("DELETE takes no body", "send the request without one")
    _find(pond, req.params["id"])
    pond.store.delete_credential(req.params["id"])
    return 200, {"name": req.params["id"], "deleted": True}


def _find(pond, name):
    row = pond.store.credential(name)
    if row is None:
        raise NotFound(f"credential {name[:64]!r} does not exist",
                       "list them with `pond admin credential list`; set one with `pond admin credential set`")
    return row


def check_exists(pond, name):
    """At submit: a job may only name a credential that exists now."""
    _find(pond, name)


# -- sealing at claim time ---------------------------------------------------------------

def seal_for(pond, job, worker, attempt):
    """The job's credential sealed to the worker's pinned X25519 key, for this attempt only.

    No pinned key, no seal: an unpinned worker gets a refusal, never the clear text.
    """
    if not worker or not worker["fingerprint"] or not worker["x25519_public"]:
        raise Forbidden(f"worker {job['worker_id']} has no pinned key: pond seals credentials only to pinned keys",
                        "enroll the worker with the cryptography package installed (it sends its keys)",
                        code="unpinned")
    row = pond.store.credential(job["credential"])
    if row is None:
        raise Conflict(f"credential {job['credential']!r} named by job {job['id']} no longer exists",
                       "set it again with `pond admin credential set`, then resubmit the job",
                       code="credential_missing")
    if worker["revoked_at"] is not None:
        raise Forbidden(f"worker {worker['id']} was revoked: pond seals nothing to it",
                        "the job runs again elsewhere once its lease runs out", code="revoked")
    env = decrypt(pond.settings.credential_key, row)
    from pond.bundles import spec_source
    spec = sealing.job_spec(job["command"], job["env"], job["sandbox"], job.get("files"), job.get("broker"),
                            source=spec_source(job.get("source")))       # as submitted, not as relayed
    blob = sealing.seal_env(base64.b64decode(worker["x25519_public"]), env, job["id"], attempt,
                            worker["fingerprint"], spec)
    return {"credential": row["name"], "fingerprint": worker["fingerprint"], "sealed": blob}


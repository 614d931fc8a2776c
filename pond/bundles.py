"""Source bundles: the code a job works on, packed by the client, kept encrypted, sealed to one worker.

    client ── pack DIR (tar.gz), encrypt (fresh data key) ──▶ POST /v1/bundles {key, size, sha256}
                                                              POST /v1/bundles/{id}/parts {offset, data}
    client ── POST /v1/jobs {..., source: {bundle}} ──▶ the job records {sha256, size} (in its spec)
    claim  ── the assignment carries source {token, sha256, size}: a one-time token per attempt
    worker ──▶ orch ── POST /v1/orch/jobs/{id}/source {attempt, token} ──▶ the data key, sealed to the
                           worker's pinned key for this job, attempt and spec (the token redeems once)
    worker ──▶ orch ── POST /v1/orch/jobs/{id}/source/read {attempt, token, offset} ──▶ 1 MiB pieces

pond never dials out: the worker reaches pond through its orchestrator, as reports and seals do.
The ciphertext lives in the blob store of pond's store (pond/blobs.py: files under the state dir,
or PostgreSQL's blobs table that every replica reads), the data key in pond.db encrypted under the
credential key with the bundle id as associated data. specs/bundles.md is normative.
"""

import base64
import hashlib
import io
import os
import re
import secrets
import subprocess
import tarfile
from pathlib import Path

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.asymmetric import x25519
from cryptography.hazmat.primitives.ciphers.aead import ChaCha20Poly1305

from pond import blobs, sealing, tokens, wire
from pond.errors import BadRequest, Conflict, Forbidden, Gone, NotFound, PayloadTooLarge, StaleAttempt

MAGIC = b"pond-bundle-v1\n"          # the ciphertext's header, and each chunk's associated data
CHUNK = 64 * 1024                    # plaintext bytes per chunk; each sealed chunk is CHUNK + 16
TAG = 16
KEY_BYTES = 32
PIECE = 1024 * 1024                  # bytes of ciphertext in one upload or read request
MAX_BUNDLE = 1024 * 1024 * 1024      # bytes of ciphertext pond takes for one bundle
REDEEM_AGAIN = 300.0                 # s after its redeem that a token's worker may redeem it again (§5)
KEY_AAD = b"pond-bundle-key-v1\x00"  # at rest: the data key under the credential key, with the bundle id
SEAL_PREFIX = b"pond-bundle-seal-v1\x00"   # the HPKE info prefix of a sealed data key (specs/bundles.md §4)
BUNDLE_ID_RE = re.compile(r"^b_[A-Za-z0-9_-]{1,60}\Z")
HEX64_RE = re.compile(r"^[0-9a-f]{64}\Z")
GIT_URL_RE = re.compile(r"^https?://[A-Za-z0-9.-]+(:[0-9]{1,5})?(/[A-Za-z0-9._~%+=,/-]*)?\Z")
GIT_REF_RE = re.compile(r"^(?!-)(?!.*\.\.)(?!.*//)[A-Za-z0-9._/-]{1,200}(?<![./])\Z")


# -- the stream format (specs/bundles.md §2) -------------------------------------------

def nonce(counter, last):
    """11-byte big-endian chunk counter, then 1 for the last chunk, 0 for the others."""
    return counter.to_bytes(11, "big") + (b"\x01" if last else b"\x00")


def encrypt(key, src, dst):
    """Encrypt the file object `src` into `dst` -> (sha256 hex, size) of what was written."""
    aead, digest, size = ChaCha20Poly1305(key), hashlib.sha256(MAGIC), len(MAGIC)
    dst.write(MAGIC)
    counter, chunk = 0, src.read(CHUNK)
    while True:
        following = src.read(CHUNK) if len(chunk) == CHUNK else b""
        sealed = aead.encrypt(nonce(counter, not following), chunk, MAGIC)
        dst.write(sealed)
        digest.update(sealed)
        size += len(sealed)
        if not following:
            return digest.hexdigest(), size
        counter, chunk = counter + 1, following


def decrypt(key, src, dst, size):
    """Decrypt `size` bytes of ciphertext from `src` into `dst`; BadRequest bundle_invalid if any chunk fails."""
    if src.read(len(MAGIC)) != MAGIC:
        raise _invalid("it does not start with the pond-bundle-v1 header")
    aead, left, counter = ChaCha20Poly1305(key), size - len(MAGIC), 0
    if left < TAG:
        raise _invalid("it is shorter than one chunk")
    while left > 0:
        n = min(left, CHUNK + TAG)
        sealed = src.read(n)
        left -= n
        if len(sealed) != n or (left == 0 and n == TAG and counter > 0):
            raise _invalid("it ends early, or with an empty chunk after a full one")
        try:
            dst.write(aead.decrypt(nonce(counter, left == 0), sealed, MAGIC))
        except InvalidTag:
            raise _invalid(f"chunk {counter} does not decrypt (altered, reordered or cut)") from None
        counter += 1


def _invalid(why):
    return BadRequest(f"the source bundle does not decrypt: {why}", "pack and upload it again",
                      code="bundle_invalid")


# -- packing (the client) -------------------------------------------------------------

def tracked_files(directory):
    """What to pack of `directory`: the files git tracks when it is a git work tree, else every
    file but those under .git. -> sorted relative paths."""
    directory = Path(directory)
    try:
        inside = subprocess.run(["git", "-C", str(directory), "rev-parse", "--is-inside-work-tree"],
                                capture_output=True, text=True, timeout=30).stdout.strip() == "true"
    except (OSError, subprocess.TimeoutExpired):
        inside = False
    if inside:
        listed = subprocess.run(["git", "-C", str(directory), "ls-files", "-z", "--cached", "--full-name", "."],
                                capture_output=True, timeout=120, check=True, cwd=directory).stdout
        top = Path(subprocess.run(["git", "-C", str(directory), "rev-parse", "--show-toplevel"],
                                  capture_output=True, text=True, timeout=30, check=True).stdout.strip())
        rel = directory.resolve().relative_to(top.resolve())
        names = [os.path.relpath(top / n.decode(), top / rel) for n in listed.split(b"\0") if n]
        return sorted(n for n in names if os.path.lexists(directory / n))   # a tracked file deleted: left out
    out = []
    for root, dirs, files in os.walk(directory):
        dirs[:] = sorted(d for d in dirs if d != ".git" and not os.path.islink(os.path.join(root, d)))
        out += [os.path.relpath(os.path.join(root, f), directory) for f in files]
        out += [os.path.relpath(os.path.join(root, d), directory) for d in os.listdir(root)
                if d != ".git" and os.path.islink(os.path.join(root, d)) and os.path.isdir(os.path.join(root, d))]
    return sorted(out)


def pack(directory, out):
    """A gzip'd tar of `directory`'s files (tracked_files) into the file object `out`: regular
    files and symlinks only, owner 0, modes without setuid, setgid or sticky bits. -> file count."""
    directory = Path(directory)
    names = tracked_files(directory)
    with tarfile.open(fileobj=out, mode="w:gz", format=tarfile.PAX_FORMAT, compresslevel=6) as tar:
        for name in names:
            info = tar.gettarinfo(str(directory / name), arcname=name)
            if not (info.isreg() or info.issym()):
                continue                      # a device, a fifo: nothing to ship
            info.uid = info.gid = 0
            info.uname = info.gname = ""
            info.mode &= 0o777
            if info.isreg():
                with open(directory / name, "rb") as f:
                    tar.addfile(info, f)
            else:
                tar.addfile(info)
    return len(names)


def pack_and_encrypt(directory, out_path):
    """Pack and encrypt `directory` into `out_path` -> {key, sha256, size, files}; key is fresh."""
    key = secrets.token_bytes(KEY_BYTES)
    plain = io.BytesIO()
    files = pack(directory, plain)
    plain.seek(0)
    with open(out_path, "wb") as f:
        sha256, size = encrypt(key, plain, f)
    return {"key": key, "sha256": sha256, "size": size, "files": files}


def upload(client, path, key, sha256, size):
    """Send a bundle file to pond in pieces -> its bundle id."""
    bundle = client.post("/v1/bundles", {"key": base64.b64encode(key).decode(), "sha256": sha256, "size": size})
    with open(path, "rb") as f:
        offset = 0
        while offset < size:
            data = f.read(PIECE)
            client.post(f"/v1/bundles/{bundle['id']}/parts", {"offset": offset, "data": wire.b64encode(data)})
            offset += len(data)
    return bundle["id"]


# -- the data key at rest ------------------------------------------------------------------

def seal_at_rest(key, bundle_id, data_key):
    n = secrets.token_bytes(12)
    return n + ChaCha20Poly1305(key).encrypt(n, data_key, KEY_AAD + bundle_id.encode())


def open_at_rest(key, bundle_id, blob):
    blob = bytes(blob)
    try:
        return ChaCha20Poly1305(key).decrypt(blob[:12], blob[12:], KEY_AAD + bundle_id.encode())
    except InvalidTag:
        raise Conflict(f"the data key of bundle {bundle_id} does not decrypt: pond runs with another credential key, "
                       "or its row was altered", "start pond with the credential key it was stored under, or "
                       "upload the bundle again", code="credential_key_mismatch") from None


# -- /v1/bundles ---------------------------------------------------------------------------

def create(pond, req):
    """POST /v1/bundles {key, sha256, size}: a new, empty bundle that parts fill."""
    body = wire.obj(req.body, "bundle", ("key", "sha256", "size"), ("key", "sha256", "size"))
    data_key = wire.b64decode(body["key"], "key")
    if len(data_key) != KEY_BYTES:
        raise BadRequest(f"key must be base64 of {KEY_BYTES} bytes", "a fresh random data key per bundle")
    sha256 = wire.string(body["sha256"], "sha256", 64, HEX64_RE, "lowercase hex SHA-256 of the ciphertext")
    size = wire.number(body["size"], "size", len(MAGIC) + TAG, 2**53, integer=True)
    if size > MAX_BUNDLE:
        raise PayloadTooLarge(f"a bundle of {size} bytes is over pond's {MAX_BUNDLE}-byte limit",
                              "send less code: pack a subdirectory, or leave build output out")
    bundle_id = tokens.new_id("b")
    pond.store.add_bundle(bundle_id, sha256, size, seal_at_rest(pond.settings.credential_key, bundle_id, data_key),
                          pond.now())
    return 201, view(pond.store.bundle(bundle_id))


def put_part(pond, req):
    """POST /v1/bundles/{id}/parts {offset, data}: the next piece; the last one checks the digest."""
    body = wire.obj(req.body, "part", ("offset", "data"), ("offset", "data"))
    offset = wire.number(body["offset"], "offset", 0, 2**53, integer=True)
    data = wire.b64decode(body["data"], "data")
    row = _find(pond, req.params["id"])
    if row["complete"]:
        raise Conflict(f"bundle {row['id']} is complete", "submit the job with it", code="bundle_complete")
    if offset != row["received"] or not data or offset + len(data) > row["size"]:
        raise Conflict(f"bundle {row['id']}: a part at offset {offset} of {len(data)} bytes does not follow the "
                       f"{row['received']} bytes received of {row['size']}", f"send offset {row['received']} next",
                       code="offset_mismatch")
    store = blobs.for_store(pond)
    received = store.append(f"bundles/{row['id']}", offset, data)
    complete = received == row["size"]
    if complete and blobs.sha256(store, f"bundles/{row['id']}") != row["sha256"]:
        store.delete(f"bundles/{row['id']}")
        pond.store.delete_bundle(row["id"])
        raise BadRequest(f"bundle {row['id']}: what arrived does not have the sha256 announced; it was dropped",
                         "upload it again", code="bundle_invalid")
    pond.store.bundle_received(row["id"], received, complete)
    return 200, view(pond.store.bundle(row["id"]))


def get(pond, req):
    return 200, view(_find(pond, req.params["id"]))


def view(row):
    return {"id": row["id"], "sha256": row["sha256"], "size": row["size"], "received": row["received"],
            "complete": bool(row["complete"]), "created_at": row["created_at"]}


def _find(pond, bundle_id):
    row = pond.store.bundle(bundle_id)
    if row is None:
        raise NotFound(f"bundle {bundle_id[:64]!r} does not exist", "upload it with POST /v1/bundles first")
    return row


def source_of(pond, value):
    """A job's `source` at submit: {"bundle": id} of a complete bundle -> {bundle, sha256, size};
    or {"git": URL, "ref": REF}, which the worker fetches itself (specs/bundles.md §8)."""
    if value is None:
        return None
    if isinstance(value, dict) and "git" in value:
        value = wire.obj(value, "source", ("git", "ref"), ("git", "ref"))
        return {"git": wire.string(value["git"], "source.git", 500, GIT_URL_RE,
                                   "an http(s)://host[:port]/path URL without user or password"),
                "ref": wire.string(value["ref"], "source.ref", 200, GIT_REF_RE,
                                   "a branch, a tag or a commit id: letters, digits, . _ / -, no .., not -first")}
    value = wire.obj(value, "source", ("bundle",), ("bundle",))
    bundle_id = wire.string(value["bundle"], "source.bundle", 64, BUNDLE_ID_RE, "the id POST /v1/bundles answered")
    row = _find(pond, bundle_id)
    if not row["complete"]:
        raise Conflict(f"bundle {bundle_id} has {row['received']} of {row['size']} bytes",
                       "upload the rest before submitting a job with it", code="bundle_incomplete")
    return {"bundle": row["id"], "sha256": row["sha256"], "size": row["size"]}


def spec_source(source):
    """What of a job's source its spec binds (sealing.job_spec): the digest and the size, never the token;
    of a git source, its URL and ref."""
    if source is None:
        return None
    if "git" in source:
        return {"git": source["git"], "ref": source["ref"]}
    return {"sha256": source["sha256"], "size": source["size"]}


# -- the claim, the redeem, the reads -----------------------------------------------------------

def token_for(pond, job_id, attempt):
    """A one-time redeem token for this attempt's source -> the token (pond keeps its digest)."""
    token = secrets.token_urlsafe(24)
    pond.store.add_source_token(job_id, attempt, tokens.digest(token))
    return token


def _redeemable(pond, req, fields):
    from pond.dispatch import _reported_job      # the report fencing: this binding holds this attempt
    from pond.jobs import JobState
    job, attempt = _reported_job(pond, req)
    body = wire.obj(req.body, "source", fields, fields)
    if JobState(job["state"]) not in (JobState.ASSIGNED, JobState.RUNNING):
        raise StaleAttempt(f"job {job['id']} is {job['state']}; its source is not given out", "drop the job")
    token = wire.string(body["token"], "token", 64)
    row = pond.store.source_token(job["id"], attempt)
    if row is None or not tokens.matches(token, row["token_hash"]):
        raise Forbidden(f"job {job['id']} attempt {attempt}: the source token is not this attempt's",
                        "echo source.token of this attempt's assignment", code="token_invalid")
    return pond.store.job(job["id"]), attempt, body, row


def redeem(pond, req):
    """POST /v1/orch/jobs/{id}/source {attempt, token}: the data key sealed to the assigned worker's pinned
    X25519 key for this job, attempt and spec. The token redeems once; within REDEEM_AGAIN of that, the
    same worker may redeem it again (its answer was lost) and gets a fresh seal of the same key."""
    job, attempt, _, row = _redeemable(pond, req, ("attempt", "token"))
    worker = pond.store.worker(job["worker_id"])
    if not worker or not worker["fingerprint"] or not worker["x25519_public"] or worker["revoked_at"] is not None:
        raise Forbidden(f"worker {job['worker_id']} has no pinned key: pond gives a source bundle only to pinned keys",
                        "enroll the worker with the cryptography package installed (it sends its keys)",
                        code="unpinned")
    again = not pond.store.redeem_source_token(job["id"], attempt, pond.now(), worker["fingerprint"])
    row = pond.store.source_token(job["id"], attempt) if again else row
    if again and (row["redeemed_by"] != worker["fingerprint"] or pond.now() - row["redeemed_at"] > REDEEM_AGAIN):
        # pond may redeem a token again only for the worker that redeemed it first, soon after (§5)
        raise Conflict(f"job {job['id']} attempt {attempt}: the source token was redeemed already",
                       "a token redeems once; the job is claimed again for a new one", code="token_used")
    bundle = _kept(pond, job)
    data_key = open_at_rest(pond.settings.credential_key, bundle["id"], bundle["key_ct"])
    spec = sealing.job_spec(job["command"], job["env"], job["sandbox"], job.get("files"), job.get("broker"),
                            source=spec_source(job["source"]))
    sealed = seal_key(base64.b64decode(worker["x25519_public"]), data_key, job["id"], attempt,
                      worker["fingerprint"], spec)
    pond.store.add_job_event(job["id"], {"at": pond.now(), "event": "source_resealed" if again else "source_sealed",
                                         "attempt": attempt, "fingerprint": worker["fingerprint"],
                                         "sha256": bundle["sha256"]})
    return 200, {"sealed": sealed, "sha256": bundle["sha256"], "size": bundle["size"]}


def read(pond, req):
    """POST /v1/orch/jobs/{id}/source/read {attempt, token, offset}: a piece of the ciphertext, once the
    token was redeemed by this attempt."""
    job, attempt, body, row = _redeemable(pond, req, ("attempt", "token", "offset"))
    if row["redeemed_at"] is None:
        raise Conflict(f"job {job['id']} attempt {attempt}: the source token was not redeemed",
                       "redeem it first (POST .../source)", code="token_unredeemed")
    bundle = _kept(pond, job)
    offset = wire.number(body["offset"], "offset", 0, bundle["size"], integer=True)
    data = blobs.for_store(pond).read(f"bundles/{bundle['id']}", offset, PIECE)
    return 200, {"offset": offset, "data": wire.b64encode(data), "size": bundle["size"]}


def _kept(pond, job):
    """The bundle of a job's source; Gone if the reaper deleted it (a submit that raced its collection)."""
    bundle = pond.store.bundle(job["source"]["bundle"])
    if bundle is None:
        raise Gone(f"job {job['id']}: its source bundle {job['source']['bundle']} was deleted past pond's "
                   "--bundle-retention", "upload the source again and submit a new job", code="expired")
    return bundle


# -- sealing the data key (specs/bundles.md §4) -------------------------------------------------

def seal_key(recipient_x25519_public_raw, data_key, job_id, attempt, fingerprint, spec):
    """The data key sealed like a credential, with its own info prefix: {"enc", "ct", "suite"}."""
    info = sealing.seal_info(job_id, attempt, fingerprint, spec, SEAL_PREFIX)
    public_key = x25519.X25519PublicKey.from_public_bytes(bytes(recipient_x25519_public_raw))
    blob = sealing._SUITE.encrypt(bytes(data_key), public_key, info=info)
    return {"enc": wire.b64encode(blob[:sealing.ENC_LENGTH]), "ct": wire.b64encode(blob[sealing.ENC_LENGTH:]),
            "suite": sealing.SUITE_NAME}


def open_key(private_raw, blob, job_id, attempt, fingerprint, spec):
    """The data key a sealed blob carries (tests and offline tooling: pond holds no worker key)."""
    info = sealing.seal_info(job_id, attempt, fingerprint, spec, SEAL_PREFIX)
    raw = base64.b64decode(blob["enc"]) + base64.b64decode(blob["ct"])
    try:
        return sealing._SUITE.decrypt(raw, x25519.X25519PrivateKey.from_private_bytes(private_raw), info=info)
    except (InvalidTag, ValueError):
        raise BadRequest("the data key could not be unsealed", "sealed for another worker, job, attempt or spec",
                         code="seal_failed") from None


"""Enrollment: worker identities, and the orchestrator's snapshots of them.

    operator ── POST /v1/admin/pool/enrollment-codes ──▶ {code}        (TTL, use count)
    worker ── enroll {code, tags, capabilities, slots} ──▶ orchestrator
    orchestrator ── POST /v1/orch/enrollment/{code}/consumed ──▶ {worker_id}
    orchestrator ── POST /v1/orch/workers/snapshot (on change, and every ~20 s)

A snapshot says which of the binding's workers are online, with their tags,
capabilities and slots. A worker not listed goes offline; one not seen in a
snapshot for WORKER_OFFLINE_AFTER seconds goes offline too (reaper).

Identity (specs/keys.md §6): enrollment pins the worker's two public keys and their
fingerprint; an enrollment code may expect a fingerprint and carry a tag ceiling, and
the binding may carry a pool scope. A snapshot can never change pinned keys, widen a
worker's tags past its ceiling or scope, or bring a revoked worker back: that entry
is refused, the worker goes offline and keeps what it had, and the event is kept for
the operator (GET /v1/admin/pool/workers).
"""

import re

from pond import keys as worker_keys
from pond import tokens, wire
from pond.errors import BadRequest, Forbidden, Gone, NotFound
from pond.settings import ENROLLMENT_TTL, MAX_CODE_TTL

MAX_SLOTS = 256
MAX_WORKERS_PER_SNAPSHOT = 4096
KEY_FIELDS = ("x25519_public", "ed25519_public", "fingerprint")
WORKER_FIELDS = ("id", "name", "tags", "capabilities", "slots", "online") + KEY_FIELDS
FINGERPRINT_RE = re.compile(r"^[0-9a-f]{64}\Z")
KEY_B64_RE = re.compile(r"^[A-Za-z0-9+/]{43}=\Z")


def fingerprint_field(value, where):
    """A fingerprint as operators see it: 64 lowercase hex characters (specs/keys.md §3)."""
    return wire.string(value, where, 64, FINGERPRINT_RE, "a fingerprint is 64 lowercase hex characters, "
                       "the first line of `swarm.py worker --show-fingerprint`")


def ceiling(value, where):
    """A tag ceiling (enrollment code) or pool scope (pairing code): None, or a non-empty tag list."""
    if value is None:
        return None
    tags = wire.string_list(value, where, wire.TAG_RE)
    if not tags:
        raise BadRequest(f"{where} must name at least one tag", f"leave {where} out for no ceiling")
    return tags


def outside(tags, limit):
    """The tags not allowed by a ceiling (None: no ceiling, nothing is outside)."""
    if not limit:
        return []
    return sorted(set(tags) - set(limit))


def mint_code(pond, req):
    """POST /v1/admin/pool/enrollment-codes {ttl?, uses?, fingerprint?, tags?}: a code for up to `uses` workers."""
    body = wire.obj(req.body, "enrollment code", ("ttl", "uses", "fingerprint", "tags"))
    ttl = wire.number(body.get("ttl"), "ttl", 30, MAX_CODE_TTL, default=ENROLLMENT_TTL, integer=True)
    uses = wire.number(body.get("uses"), "uses", 1, 10000, default=1, integer=True)
    expected = None if body.get("fingerprint") is None else fingerprint_field(body["fingerprint"], "fingerprint")
    tags = ceiling(body.get("tags"), "tags")
    code, now = tokens.new_code(), pond.now()
    pond.store.add_enrollment_code(tokens.digest(tokens.normalize_code(code)), now, now + ttl, uses, tags, expected)
    return 201, {"code": code, "expires_at": now + ttl, "ttl": ttl, "uses": uses, "fingerprint": expected,
                 "tags": tags}


def _worker_body(value, where):
    body = wire.obj(value, where, WORKER_FIELDS)
    if not isinstance(body.get("online", True), bool):
        raise BadRequest(f"{where}.online must be true or false")
    return {
        "name": wire.optional_string(body.get("name"), f"{where}.name", max_len=64, pattern=wire.NAME_RE),
        "tags": wire.string_list(body.get("tags"), f"{where}.tags", wire.TAG_RE),
        "capabilities": wire.string_list(body.get("capabilities"), f"{where}.capabilities",
                                         wire.CAPABILITY_GLOB_RE, hint="capability globs look like harness.*"),
        "slots": wire.number(body.get("slots"), f"{where}.slots", 1, MAX_SLOTS, default=1, integer=True),
        "online": body.get("online", True) is True,
        "id": body.get("id"),
        "keys": _keys(body, where),
    }


def _keys(body, where):
    """-> None (no keys given) or (x25519 base64, ed25519 base64, fingerprint), checked against each other.

    A fingerprint alone (a snapshot) is (None, None, fingerprint). A fingerprint that
    is not the hash of the keys sent with it is refused: pond computes it itself.
    """
    given = {k: body.get(k) for k in KEY_FIELDS if body.get(k) is not None}
    if not given:
        return None
    fp = fingerprint_field(given["fingerprint"], f"{where}.fingerprint") if "fingerprint" in given else None
    if ("x25519_public" in given) != ("ed25519_public" in given):
        raise BadRequest(f"{where}: send both x25519_public and ed25519_public, or neither")
    if "x25519_public" not in given:
        if fp is None:
            raise BadRequest(f"{where}: keys without a fingerprint")
        return None, None, fp
    raw = {}
    for name in ("x25519_public", "ed25519_public"):
        text = wire.string(given[name], f"{where}.{name}", 44, KEY_B64_RE,
                           "a public key is 32 raw bytes in standard base64 (44 characters)")
        raw[name] = wire.b64decode(text, f"{where}.{name}")
    computed = worker_keys.fingerprint(raw["x25519_public"], raw["ed25519_public"])
    if fp is not None and fp != computed:
        raise BadRequest(f"{where}.fingerprint {fp} is not the fingerprint of the keys sent ({computed})",
                         "send the keys and the fingerprint `swarm.py worker --show-fingerprint` prints",
                         code="fingerprint_invalid")
    return given["x25519_public"], given["ed25519_public"], computed


def consumed(pond, req):
    """POST /v1/orch/enrollment/{code}/consumed: take one use of the code, create the worker."""
    code_hash = tokens.digest(tokens.normalize_code(req.params["code"]))
    worker = _worker_body(req.body, "worker")
    if worker["id"] is not None:
        raise BadRequest("worker.id is chosen by pond", "leave it out")
    keys = worker["keys"]
    if keys is not None and keys[0] is None:
        raise BadRequest("worker: a fingerprint without the keys it names", "send x25519_public and ed25519_public")
    now = pond.now()
    hint = "mint a new one: `pond admin enrollment-code`"
    worker_id = tokens.new_id("w")
    with pond.store.transaction():
        row = pond.store.enrollment_code(code_hash)
        if row is None:
            raise Forbidden("this enrollment code is not known to pond", hint, code="code_unknown")
        if row["expires_at"] <= now:
            raise Gone("this enrollment code has expired", hint, code="code_expired")
        if row["uses_left"] <= 0:
            raise Gone(f"this enrollment code has been used {row['uses']} time(s), its limit", hint,
                       code="code_used")
        # Every check before the use is taken: a refused worker does not use up the code.
        _check_identity(row, keys, worker["tags"], req.principal)
        if not pond.store.use_enrollment_code(code_hash):
            raise Gone(f"this enrollment code has been used {row['uses']} time(s), its limit", hint,
                       code="code_used")
        pond.store.add_worker(worker_id, req.principal["id"], worker["name"] or worker_id,
                              worker["tags"], worker["capabilities"], worker["slots"], now,
                              keys=keys, tag_ceiling=row["tag_ceiling"])
    fp = keys[2] if keys else None
    pond.log.info("enrolled worker %s on orchestrator %s (%s)", worker_id, req.principal["id"],
                  f"keys pinned, fingerprint {fp}" if fp else "no keys: unpinned")
    return 201, {"worker_id": worker_id, "fingerprint": fp, "pinned": fp is not None}


def _check_identity(code_row, keys, tags, binding):
    """The enrollment code's expected fingerprint and tag ceiling, and the binding's pool scope."""
    expected, got = code_row["fingerprint"], keys[2] if keys else None
    if expected is not None and got != expected:
        raise Forbidden(f"this enrollment code expects worker fingerprint {expected}; the worker's is "
                        f"{got or 'absent (it sent no keys)'}",
                        "run `swarm.py worker --show-fingerprint` on the worker host and mint a code for that "
                        "fingerprint; a worker without keys needs `pip install cryptography`",
                        code="fingerprint_mismatch")
    _check_tags(tags, code_row["tag_ceiling"], binding["scope"])


def _check_tags(tags, tag_ceiling, scope):
    for limit, what in ((tag_ceiling, "the enrollment code's tag ceiling"), (scope, "the orchestrator's pool scope")):
        extra = outside(tags, limit)
        if extra:
            raise Forbidden(f"worker tag(s) {', '.join(extra)} are outside {what} ({', '.join(limit)})",
                            "start the worker with tags within it, or mint a code with a wider ceiling",
                            code="tag_outside_ceiling")


def snapshot(pond, req):
    """POST /v1/orch/workers/snapshot {workers: [...]}: the binding's workers as they are now."""
    body = wire.obj(req.body, "snapshot", ("workers",), ("workers",))
    if not isinstance(body["workers"], list) or len(body["workers"]) > MAX_WORKERS_PER_SNAPSHOT:
        raise BadRequest(f"snapshot.workers must be a list of at most {MAX_WORKERS_PER_SNAPSHOT} workers")
    entries = [_worker_body(w, f"workers[{i}]") for i, w in enumerate(body["workers"])]
    binding, now = req.principal, pond.now()
    binding_id = binding["id"]
    unknown, listed, refused, revoked, evicted = [], [], [], [], []
    with pond.store.transaction():
        pinned = {w["id"]: w for w in pond.store.workers(binding_id)}
        for w in entries:
            worker_id = wire.string(w["id"], "workers[].id", 64)
            row = pinned.get(worker_id)
            if row is None:
                unknown.append(worker_id)
                continue
            if row["revoked_at"] is not None:
                revoked.append(worker_id)
                continue
            if row["evicted_at"] is not None:
                evicted.append({"id": worker_id, "drain": bool(row["drain"])})
            refusal = _snapshot_refusal(row, w, binding)
            if refusal:
                code, message = refusal
                pond.store.refuse_worker(worker_id, {"at": now, "event": "snapshot_refused", "code": code,
                                                     "message": message})
                refused.append({"id": worker_id, "code": code, "message": message})
                pond.log.warning("snapshot of orchestrator %s: worker %s refused: %s", binding_id, worker_id, message)
                continue
            if pond.store.update_worker(worker_id, binding_id, w["tags"], w["capabilities"], w["slots"],
                                        w["online"], now):
                listed.append(worker_id)
        pond.store.set_workers_offline(binding_id, [w["id"] for w in entries if w["online"] and w["id"] in listed])
        pond.store.touch_binding(binding_id, now)
    pond.work.notify()
    return 200, {"unknown": unknown, "refused": refused, "revoked": revoked, "evicted": evicted}


def _snapshot_refusal(row, entry, binding):
    """-> None, or (code, message) when this snapshot entry would change what pond pinned."""
    keys = entry["keys"]
    if keys is not None and keys[2] != row["fingerprint"]:
        return "key_mismatch", (f"worker {row['id']}: the snapshot names fingerprint {keys[2]}; pond pinned "
                                f"{row['fingerprint'] or 'no keys'} at enrollment")
    try:
        _check_tags(entry["tags"], row["tag_ceiling"], binding["scope"])
    except Forbidden as e:
        return e.code, f"worker {row['id']}: {e.message}"
    return None


def revoke(pond, req):
    """DELETE /v1/admin/pool/workers/{id}: pond never assigns to this worker again."""
    if req.body is not None:
        raise BadRequest("DELETE takes no body")
    worker_id = req.params["id"]
    if not pond.store.revoke_worker(worker_id, pond.now()):
        raise NotFound(f"no worker {worker_id!r}", "list them with `pond admin workers`")
    pond.work.notify()
    pond.log.warning("revoked worker %s", worker_id)
    row = pond.store.worker(worker_id)
    return 200, {"worker_id": worker_id, "revoked_at": row["revoked_at"]}


def evict(pond, req):
    """POST /v1/admin/pool/workers/{id}/evict {drain?}: the worker takes no new jobs, for good.

    Without drain, its jobs are taken from it now and queued again for new attempts (the
    orchestrator stops them on the worker); with drain, they finish first. Its orchestrator
    learns it from the next snapshot answer and disconnects the worker once it holds nothing.
    """
    return 200, _evict(pond, req.params["id"], _drain(req.body))


def evict_from_orchestrator(pond, req):
    """POST /v1/orch/workers/{id}/evict {drain?}: `swarm.py evict`, for a worker of this binding."""
    drain = _drain(req.body)
    row = pond.store.worker(req.params["id"])
    if row is None or row["binding_id"] != req.principal["id"]:
        raise NotFound(f"worker {req.params['id'][:64]!r} is not enrolled through this orchestrator",
                       "list them with `swarm.py status`")
    return 200, _evict(pond, row["id"], drain)


def _drain(body):
    body = wire.obj(body, "evict", ("drain",))
    if not isinstance(body.get("drain", False), bool):
        raise BadRequest("evict.drain must be true or false")
    return body.get("drain", False)


def _evict(pond, worker_id, drain):
    from pond import dispatch       # dispatch knows how an attempt ends; it does not need us
    if not pond.store.evict_worker(worker_id, pond.now(), drain):
        raise NotFound(f"no worker {worker_id[:64]!r}", "list them with `pond admin workers`")
    requeued = 0
    if not drain:
        for job in pond.store.held_jobs(worker_id):
            requeued += dispatch.end_attempt(pond, job, "evicted", f"worker {worker_id} was evicted",
                                             retry_always=True)
    pond.work.notify()
    pond.work.notify(new_job=True)
    pond.logs.notify()
    pond.log.warning("evicted worker %s (%s); %d job(s) queued again", worker_id,
                     "draining" if drain else "its jobs requeued", requeued)
    row = pond.store.worker(worker_id)
    return {"worker_id": worker_id, "evicted_at": row["evicted_at"], "drain": bool(row["drain"]), "requeued": requeued}


def list_workers(pond, req):
    """GET /v1/admin/pool/workers: every worker with its free slots."""
    active = pond.store.active_counts()
    out = []
    for w in pond.store.workers():
        running = active.get(w["id"], 0)
        events = w["events"] or []
        out.append({"id": w["id"], "name": w["name"], "orchestrator": w["binding_id"], "tags": w["tags"],
                    "capabilities": w["capabilities"], "slots": w["slots"], "running": running,
                    "free": max(0, w["slots"] - running) if w["online"] else 0, "online": bool(w["online"]),
                    "enrolled_at": w["enrolled_at"], "last_seen": w["last_seen"],
                    "fingerprint": w["fingerprint"], "pinned": w["fingerprint"] is not None,
                    "x25519_public": w["x25519_public"], "ed25519_public": w["ed25519_public"],
                    "tag_ceiling": w["tag_ceiling"], "revoked": w["revoked_at"] is not None,
                    "revoked_at": w["revoked_at"], "evicted": w["evicted_at"] is not None,
                    "evicted_at": w["evicted_at"], "drain": bool(w["drain"]), "events": events,
                    "last_event": events[-1].get("message") if events else None})
    return 200, {"workers": out}

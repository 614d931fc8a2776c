"""Enrollment: worker identities, and the orchestrator's snapshots of them.

    operator ── POST /v1/admin/pool/enrollment-codes ──▶ {code}        (TTL, use count)
    worker ── enroll {code, tags, capabilities, slots} ──▶ orchestrator
    orchestrator ── POST /v1/orch/enrollment/{code}/consumed ──▶ {worker_id}
    orchestrator ── POST /v1/orch/workers/snapshot (on change, and every ~20 s)

A snapshot says which of the binding's workers are online, with their tags,
capabilities and slots. A worker not listed goes offline; one not seen in a
snapshot for WORKER_OFFLINE_AFTER seconds goes offline too (reaper).
"""

from pond import tokens, wire
from pond.errors import BadRequest, Forbidden, Gone
from pond.settings import ENROLLMENT_TTL, MAX_CODE_TTL

MAX_SLOTS = 256
MAX_WORKERS_PER_SNAPSHOT = 4096
WORKER_FIELDS = ("id", "name", "tags", "capabilities", "slots", "online")


def mint_code(pond, req):
    """POST /v1/admin/pool/enrollment-codes {ttl?, uses?}: a code that enrolls up to `uses` workers."""
    body = wire.obj(req.body, "enrollment code", ("ttl", "uses"))
    ttl = wire.number(body.get("ttl"), "ttl", 30, MAX_CODE_TTL, default=ENROLLMENT_TTL, integer=True)
    uses = wire.number(body.get("uses"), "uses", 1, 10000, default=1, integer=True)
    code, now = tokens.new_code(), pond.now()
    pond.store.add_enrollment_code(tokens.digest(tokens.normalize_code(code)), now, now + ttl, uses, None, None)
    return 201, {"code": code, "expires_at": now + ttl, "ttl": ttl, "uses": uses}


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
    }


def consumed(pond, req):
    """POST /v1/orch/enrollment/{code}/consumed: take one use of the code, create the worker."""
    code_hash = tokens.digest(tokens.normalize_code(req.params["code"]))
    worker = _worker_body(req.body, "worker")
    if worker["id"] is not None:
        raise BadRequest("worker.id is chosen by pond", "leave it out")
    now = pond.now()
    hint = "mint a new one: `pond admin enrollment-code`"
    worker_id = tokens.new_id("w")
    with pond.store.transaction():
        row = pond.store.enrollment_code(code_hash)
        if row is None:
            raise Forbidden("this enrollment code is not known to pond", hint, code="code_unknown")
        if row["expires_at"] <= now:
            raise Gone("this enrollment code has expired", hint, code="code_expired")
        if not pond.store.use_enrollment_code(code_hash):
            raise Gone(f"this enrollment code has been used {row['uses']} time(s), its limit", hint,
                       code="code_used")
        pond.store.add_worker(worker_id, req.principal["id"], worker["name"] or worker_id,
                              worker["tags"], worker["capabilities"], worker["slots"], now)
    pond.log.info("enrolled worker %s on orchestrator %s", worker_id, req.principal["id"])
    return 201, {"worker_id": worker_id}


def snapshot(pond, req):
    """POST /v1/orch/workers/snapshot {workers: [...]}: the binding's workers as they are now."""
    body = wire.obj(req.body, "snapshot", ("workers",), ("workers",))
    if not isinstance(body["workers"], list) or len(body["workers"]) > MAX_WORKERS_PER_SNAPSHOT:
        raise BadRequest(f"snapshot.workers must be a list of at most {MAX_WORKERS_PER_SNAPSHOT} workers")
    entries = [_worker_body(w, f"workers[{i}]") for i, w in enumerate(body["workers"])]
    binding_id, now = req.principal["id"], pond.now()
    unknown, listed = [], []
    with pond.store.transaction():
        for w in entries:
            worker_id = wire.string(w["id"], "workers[].id", 64)
            if pond.store.update_worker(worker_id, binding_id, w["tags"], w["capabilities"], w["slots"],
                                        w["online"], now):
                listed.append(worker_id)
            else:
                unknown.append(worker_id)
        pond.store.set_workers_offline(binding_id, [w["id"] for w in entries if w["online"] and w["id"] in listed])
        pond.store.touch_binding(binding_id, now)
    pond.work.notify()
    return 200, {"unknown": unknown}


def list_workers(pond, req):
    """GET /v1/admin/pool/workers: every worker with its free slots."""
    active = pond.store.active_counts()
    out = []
    for w in pond.store.workers():
        running = active.get(w["id"], 0)
        out.append({"id": w["id"], "name": w["name"], "orchestrator": w["binding_id"], "tags": w["tags"],
                    "capabilities": w["capabilities"], "slots": w["slots"], "running": running,
                    "free": max(0, w["slots"] - running) if w["online"] else 0, "online": bool(w["online"]),
                    "enrolled_at": w["enrolled_at"], "last_seen": w["last_seen"]})
    return 200, {"workers": out}

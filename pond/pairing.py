"""Pairing: one-time codes that bind an orchestrator to pond, and the binding's token.

    operator ── POST /v1/admin/pool/pairing-codes ──▶ {code}         (stored hashed, TTL)
    swarm.py pair ── POST /v1/orch/pair {code} ──▶ {binding_id, token, protocol_version}
    swarm.py serve ── Authorization: Bearer <token> on every other /v1/orch call

A code works once. Its binding token is `orch.<binding id>.<secret>`; pond keeps the
secret's SHA-256 only (specs/protocol.md §2).
"""

from pond import PROTOCOL_VERSION, enrollment, tokens, wire
from pond.errors import BadRequest, Forbidden, Gone, NotFound, Unauthorized
from pond.settings import MAX_CODE_TTL, PAIRING_TTL


def mint_code(pond, req):
    """POST /v1/admin/pool/pairing-codes {ttl?, name?, scope?}: a one-time code, shown once.

    `scope` is the pool scope: the tags any worker of this binding may ever have
    (enforced at enrollment and at every snapshot, pond/enrollment.py). Without it, none.
    """
    body = wire.obj(req.body, "pairing code", ("ttl", "name", "scope"))
    ttl = wire.number(body.get("ttl"), "ttl", 30, MAX_CODE_TTL, default=PAIRING_TTL, integer=True)
    name = wire.optional_string(body.get("name"), "name", max_len=64, pattern=wire.NAME_RE) or "orchestrator"
    scope = enrollment.ceiling(body.get("scope"), "scope") or []
    code, now = tokens.new_code(), pond.now()
    pond.store.add_pairing_code(tokens.digest(tokens.normalize_code(code)), name, scope, now, now + ttl)
    return 201, {"code": code, "name": name, "expires_at": now + ttl, "ttl": ttl, "scope": scope}


def pair(pond, req):
    """POST /v1/orch/pair {code, name?}: redeem a code for a binding token (no bearer needed)."""
    body = wire.obj(req.body, "pair", ("code", "name"), ("code",))
    code_hash = tokens.digest(tokens.normalize_code(body["code"]))
    row = pond.store.pairing_code(code_hash)
    now = pond.now()
    _check_code(row, now)
    binding_id = tokens.new_id("o")
    token, token_hash = tokens.new_token("orch", binding_id)
    name = wire.optional_string(body.get("name"), "name", max_len=64, pattern=wire.NAME_RE) or row["name"]
    with pond.store.transaction():
        if not pond.store.use_pairing_code(code_hash, binding_id, now):
            raise Gone("this pairing code has already been used", "mint a new one: `pond admin pairing-code`",
                       code="code_used")
        pond.store.add_binding(binding_id, name, token_hash, row["scope"], now)
    pond.log.info("paired orchestrator %s (%s)", binding_id, name)
    return 201, {"binding_id": binding_id, "token": token, "name": name, "scope": row["scope"],
                 "protocol_version": PROTOCOL_VERSION}


def _check_code(row, now):
    hint = "mint a new one: `pond admin pairing-code`"
    if row is None:
        raise Forbidden("this pairing code is not known to pond", hint + " (codes are one-time; check for typos)",
                        code="code_unknown")
    if row["used_at"] is not None:
        raise Gone("this pairing code has already been used", hint, code="code_used")
    if row["expires_at"] <= now:
        raise Gone("this pairing code has expired", hint + " (or give --ttl for a longer life)",
                   code="code_expired")


def authenticate(pond, header):
    """The binding behind an `Authorization: Bearer orch.<id>.<secret>` header."""
    if not header or not header.startswith("Bearer "):
        raise Unauthorized("missing bearer token", "send Authorization: Bearer <token from backend-handle.json>")
    binding_id, secret = tokens.split_token(header[7:].strip(), "orch")
    row = pond.store.binding(binding_id)
    if row is None or not tokens.matches(secret, row["token_hash"]):
        raise Forbidden("this orchestrator token is not valid", "pair again: `swarm.py pair --code NEW_CODE`",
                        code="token_invalid")
    if row["revoked_at"] is not None:
        raise Forbidden("this orchestrator binding was revoked", "ask the pool operator; pair again with a new code",
                        code="revoked")
    return row


def whoami(pond, req):
    """GET /v1/orch/whoami: the binding as pond sees it."""
    b = req.principal
    workers = pond.store.workers(b["id"])
    return 200, {"binding_id": b["id"], "name": b["name"], "scope": b["scope"], "created_at": b["created_at"],
                 "protocol_version": PROTOCOL_VERSION, "workers": len(workers),
                 "workers_online": sum(1 for w in workers if w["online"])}


def list_orchestrators(pond, req):
    """GET /v1/admin/pool/orchestrators."""
    if req.body is not None:
        raise BadRequest("GET takes no body")
    return 200, {"orchestrators": pond.store.bindings()}


def revoke(pond, req):
    """DELETE /v1/admin/pool/orchestrators/{id}: the binding's next request is refused; its workers go offline."""
    if req.body is not None:
        raise BadRequest("DELETE takes no body")
    binding_id = req.params["id"]
    if not pond.store.revoke_binding(binding_id, pond.now()):
        raise NotFound(f"no orchestrator {binding_id!r}", "list them with `pond admin orchestrators`")
    pond.work.notify()          # held polls of this binding wake, see it revoked and end
    pond.log.warning("revoked orchestrator %s", binding_id)
    return 200, {"binding_id": binding_id, "revoked_at": pond.store.binding(binding_id)["revoked_at"]}

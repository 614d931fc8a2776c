"""GET /v1/openapi.json: pond's HTTP API as an OpenAPI 3.1 document, built here from wire.py's rules.

This module is the one source: the field patterns and limits are wire.py's own (so the
document cannot drift from what pond validates), and specs/openapi.json is this document
written out (`python -m pond.openapi > specs/openapi.json`; tests/test_openapi.py checks
that it is current and that it lists exactly the routes of server.ROUTES). A Python
source and not a hand-kept JSON file because pond must serve it installed, where specs/
is not, and because the patterns would otherwise be copied by hand. What each call does is
specs/protocol.md's to say; this document gives shapes, statuses and auth.
"""

import functools
import json
import sys

from pond import PROTOCOL_VERSION, __version__, artifacts, bundles, wire

MAX_2_53, MAX_ATTEMPT = 2**53, 2**31


def _pattern(regex):
    """A wire.py regex as JSON Schema (ECMA 262) writes it: `\\Z` is `$` there."""
    return regex.pattern.replace(r"\Z", "$")


def _ref(name):
    return {"$ref": f"#/components/schemas/{name}"}


def _nullable(schema):
    if "enum" in schema:
        return dict(schema, enum=[*schema["enum"], None])
    if "oneOf" in schema:
        return dict(schema, oneOf=[*schema["oneOf"], {"type": "null"}])
    kinds = schema["type"] if isinstance(schema["type"], list) else [schema["type"]]
    return dict(schema, type=[*kinds, "null"])


def _obj(required=(), closed=True, nulls=(), **props):
    """An object schema; `closed`: pond refuses any other field (400), as wire.obj does; `nulls`:
    the optional fields that may be null, which pond reads as not given (wire.number and the like)."""
    props = {k: _nullable(v) if k in nulls else v for k, v in props.items()}
    schema = {"type": "object", "properties": props}
    if required:
        schema["required"] = list(required)
    if closed:
        schema["additionalProperties"] = False
    return schema


def _answer(required=(), **props):
    """An answer's schema: the fields it always has; more may be added (the spec says which)."""
    return _obj(required, closed=False, **props)


STR = {"type": "string"}
INT = {"type": "integer"}
NUM = {"type": "number"}
BOOL = {"type": "boolean"}
TIME = {"type": ["number", "null"], "description": "Unix time, seconds"}
NULLABLE_STR = {"type": ["string", "null"]}
TAGS = {"type": "array", "maxItems": wire.MAX_TAGS, "items": {"type": "string", "pattern": _pattern(wire.TAG_RE)}}
CAPABILITIES = {"type": "array", "maxItems": wire.MAX_TAGS,
                "items": {"type": "string", "pattern": _pattern(wire.CAPABILITY_RE)}}
GLOBS = {"type": "array", "maxItems": wire.MAX_TAGS,
         "items": {"type": "string", "pattern": _pattern(wire.CAPABILITY_GLOB_RE)}}
NAME = {"type": "string", "pattern": _pattern(wire.NAME_RE)}
ENV = {"type": "object", "maxProperties": wire.MAX_ENV, "propertyNames": {"pattern": _pattern(wire.ENV_NAME_RE)},
       "additionalProperties": {"type": "string"}}
FINGERPRINT = {"type": "string", "pattern": "^[0-9a-f]{64}$"}
KEY = {"type": "string", "minLength": 44, "maxLength": 44}
ATTEMPT = {"type": "integer", "minimum": 1, "maximum": MAX_ATTEMPT}
CHUNK = _obj(("stream", "seq", "data"), stream={"enum": list(wire.STREAMS)},
             seq={"type": "integer", "minimum": 0, "maximum": MAX_2_53}, data={"type": "string", "format": "byte"})

SANDBOX = _obj(("profile",),
               profile={"enum": ["none", "untrusted-code-read", "untrusted-code-write"]},
               tier={"enum": ["trusted", "byo", "any"]},
               backend={"type": "string", "maxLength": 32},
               overrides=_obj(memory={"type": ["integer", "string"]}, cpus=NUM, pids=INT,
                              tmpfs_size={"type": ["integer", "string"]}, timeout=NUM),
               allow_hosts={"type": "array", "maxItems": 64, "items": STR})
AGENT = _obj(("harness", "model", "prompt"), nulls=("role", "system_prompt", "temperature", "max_tokens", "max_cost",
                                                   "tools"),
             harness=STR, model=STR, prompt=STR, role=STR, system_prompt=STR,
             temperature={"type": "number", "minimum": 0, "maximum": 2},
             max_tokens={"type": "integer", "minimum": 1, "maximum": 10**9},
             max_cost={"type": "number", "minimum": 0, "maximum": 10**6}, tools={"type": "array", "items": STR})
HEX64 = {"type": "string", "pattern": _pattern(bundles.HEX64_RE)}
SOURCE = {"oneOf": [_obj(("bundle",), bundle={"type": "string", "pattern": _pattern(bundles.BUNDLE_ID_RE)}),
                    _obj(("git", "ref"),
                         git={"type": "string", "maxLength": 500, "pattern": _pattern(bundles.GIT_URL_RE)},
                         ref={"type": "string", "pattern": _pattern(bundles.GIT_REF_RE)})]}
JOB_SPEC = _obj(("sandbox",), nulls=("env", "tags", "capabilities", "timeout", "retries", "log_cap",
                                     "cancel_grace", "name", "tenant", "credential", "source", "artifacts",
                                     "artifact_cap"), agent=AGENT,
                source=SOURCE, artifacts={"type": "array", "maxItems": artifacts.MAX_PATTERNS, "items": {
                    "type": "string", "pattern": _pattern(artifacts.PATTERN_RE)}},
                artifact_cap={"type": "integer", "minimum": artifacts.MIN_CAP, "maximum": artifacts.MAX_CAP},
                command={"type": "array", "minItems": 1, "maxItems": wire.MAX_ARGV, "items": STR},
                env=ENV, tags=TAGS, capabilities=CAPABILITIES, sandbox=SANDBOX,
                timeout={"type": "number", "minimum": 1, "maximum": 604800},
                retries={"type": "integer", "minimum": 0, "maximum": 10},
                log_cap={"type": "integer", "minimum": 65536, "maximum": 2**30},
                cancel_grace={"type": "number", "minimum": 0, "maximum": 3600},
                name=NAME, tenant={"type": "string", "pattern": _pattern(wire.TAG_RE)}, credential=STR)
JOB_SPEC["oneOf"] = [{"required": ["command"]}, {"required": ["agent"]}]     # a command, or an agent (agents.md §3)
HARNESS = _obj(("key", "capability", "command_template"), nulls=("label", "env", "files", "secret_files"),
               key=STR, label=STR, capability=STR, env=ENV, secret_files={"type": "array", "items": STR},
               command_template={"type": "array", "minItems": 1, "maxItems": wire.MAX_ARGV, "items": STR},
               files={"type": "array", "maxItems": 16, "items": _obj(("path", "content"), path=STR, content=STR)})
MODEL = _obj(("key", "provider", "model_id", "credential", "base_url"),
             nulls=("label", "input_cost_per_mtok", "output_cost_per_mtok"), key=STR, label=STR,
             provider={"enum": ["openai", "anthropic"]}, model_id=STR, credential=STR, base_url=STR,
             input_cost_per_mtok={"type": "number", "minimum": 0, "maximum": 10000},
             output_cost_per_mtok={"type": "number", "minimum": 0, "maximum": 10000})
WAITING = _answer(("verdict", "reason"), verdict=STR, reason=STR, online=INT, matching=INT, free=INT, evicted=INT,
                  lacks={"type": ["object", "null"]})
JOB = _answer(("id", "state", "command", "env", "tags", "capabilities", "sandbox", "attempt", "created_at",
               "events", "warnings"),
              id=STR, name=NULLABLE_STR, state={"enum": ["queued", "assigned", "running", "done", "failed",
                                                           "cancelled"]},
              command={"type": "array", "items": STR}, env={"type": "object"}, tags={"type": "array"},
              capabilities={"type": "array"}, sandbox={"type": "object"}, attempt=INT,
              exit_code={"type": ["integer", "null"]}, error=NULLABLE_STR, created_at=TIME, assigned_at=TIME,
              started_at=TIME, finished_at=TIME, worker=NULLABLE_STR, orchestrator=NULLABLE_STR,
              attested={"type": ["boolean", "null"]}, events={"type": "array"}, warnings={"type": "array"},
              waiting={"oneOf": [{"type": "null"}, WAITING]})
EXPLAIN = _answer(("job", "state", "tags", "capabilities", "waiting", "pools"),
                  job=NULLABLE_STR, state=NULLABLE_STR, tags={"type": "array"}, capabilities={"type": "array"},
                  waiting={"oneOf": [{"type": "null"}, WAITING]}, pools={"type": "array", "items": {"type": "object"}})
CREDENTIAL = _answer(("name", "env", "secrets"), name=STR, provider=NULLABLE_STR,
                     env={"type": "array", "items": STR}, secrets={"type": "array", "items": STR})
WORKER_ENTRY = _obj(nulls=("name", "tags", "capabilities", "slots", "x25519_public", "ed25519_public", "fingerprint"),
                    name=NAME, tags=TAGS, capabilities=GLOBS, slots={"type": "integer", "minimum": 1, "maximum": 256},
                    online=BOOL, x25519_public=KEY, ed25519_public=KEY, fingerprint=FINGERPRINT)
HELD = _obj(("job_id", "attempt", "claim_token"), job_id=STR, attempt=ATTEMPT, claim_token=STR)
HEALTH = _answer(("ok", "version", "loops", "storage"), ok=BOOL, version=STR, protocol_version=INT,
                 loops={"type": "array"}, storage={"type": "object"})
ERROR = _answer(("error",), error=_answer(("code", "message"), code=STR, message=STR, hint=STR))

ERRORS = {400: "Bad input: the message names the field, the hint what is allowed",
          401: "No token, or not a Bearer token", 403: "The token is not valid, or the operation is refused",
          404: "No such thing", 405: "Another method is allowed on this path", 409: "Conflicts with the state",
          410: "The code was used or has expired; the bundle or artifact was deleted past its retention", 413: "Body over 4 MiB", 422: "The sandbox block is refused",
          431: "Headers too large", 503: "pond is busy or cannot store this now; retry"}


def _op(summary, tag, auth, ok, *codes, body=None, body_required=False, params=(), stream=False, text=False):
    """One operation: its answers are `ok` ({status: schema}) and the error statuses `codes`,
    plus those every route may give (400, 413, 431 reading the request; 503 when busy or the disk fails)."""
    op = {"summary": summary, "tags": [tag], "operationId": None, "responses": {}}
    if auth:
        op["security"] = [{auth: []}]
    else:
        op["security"] = []
    if params:
        op["parameters"] = list(params)
    if body is not None:
        op["requestBody"] = {"required": body_required, "content": {"application/json": {"schema": body}}}
    for status, schema in ok.items():
        content = {"text/plain": {"schema": STR}} if text else {"application/json": {"schema": schema}}
        if stream:
            content["application/x-ndjson"] = {"schema": schema}
        op["responses"][str(status)] = {"description": "OK", "content": content}
    every = {400, 413, 431, 503} | ({401, 403} if auth else set())
    for status in sorted(every | set(codes)):
        op["responses"].setdefault(str(status), {"$ref": f"#/components/responses/E{status}"})
    return op


def _path_param(name, pattern):
    return {"name": name, "in": "path", "required": True, "schema": {"type": "string", "pattern": pattern}}


def _query(name, schema):
    return {"name": name, "in": "query", "required": False, "schema": schema}


ID = _path_param("id", "^[A-Za-z0-9_-]{1,64}$")
CRED_NAME = _path_param("id", "^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")
CODE = _path_param("code", "^[A-Za-z0-9-]{1,32}$")
CLAIM = {"name": "X-Claim-Token", "in": "header", "required": False, "schema": STR,
         "description": "the assignment's claim token (401 without it)"}
EMPTY = _obj()
JOB_OR_BATCH = {"oneOf": [JOB_SPEC, {"type": "array", "minItems": 1, "maxItems": 1000, "items": JOB_SPEC}]}
IDEMPOTENCY = {"name": "Idempotency-Key", "in": "header", "required": False,
               "schema": {"type": "string", "pattern": "^[A-Za-z0-9._:-]{1,128}$"}}
STATE_REPORT = _obj(("attempt", "state"), nulls=("exit_code", "error", "chunks"), attempt=ATTEMPT,
                    state={"enum": ["running", "done", "failed", "cancelled"]},
                    exit_code={"type": "integer", "minimum": -255, "maximum": 255},
                    error={"type": "string", "minLength": 1, "maxLength": 2000},
                    chunks={"type": "array", "maxItems": wire.MAX_CHUNKS_PER_REPORT, "items": CHUNK},
                    attestation={"type": "object"},
                    dropped=_obj(stdout={"type": "integer", "minimum": 0}, stderr={"type": "integer", "minimum": 0}))
BUNDLE = _answer(("id", "sha256", "size", "received", "complete", "created_at"), id=STR, sha256=HEX64, size=INT,
                 received=INT, complete=BOOL, created_at=TIME)
ARTIFACT = _answer(("name", "size", "sha256"), name=STR, size=INT, sha256=HEX64)
ARTIFACT_NAME = _path_param("name", _pattern(artifacts.NAME_RE))
DATA = {"type": "string", "format": "byte", "maxLength": (wire.MAX_CHUNK_BYTES * 4) // 3 + 4}
TOKEN = {"type": "string", "minLength": 1, "maxLength": 64}
CHUNK_REPORT = _obj(("attempt", "stream", "seq", "data"), attempt=ATTEMPT, **CHUNK["properties"])

# (method, path) -> operation. tests/test_openapi.py checks these are exactly server.ROUTES.
OPERATIONS = {
    ("GET", "/healthz"): _op("Whether pond works: its loops and its storage", "health", None,
                             {200: HEALTH, 503: HEALTH}),
    ("GET", "/metrics"): _op("Counts in the Prometheus text format (0.0.4)", "health", None, {200: STR}, text=True),
    ("GET", "/v1/openapi.json"): _op("This document", "health", None, {200: {"type": "object"}}),
    ("POST", "/v1/jobs"): _op("Submit a job, or a list of 1 to 1,000", "jobs", "admin",
                              {201: {"oneOf": [JOB, _answer(("jobs",), jobs={"type": "array", "items": JOB})]},
                               200: {"oneOf": [JOB, _answer(("jobs",), jobs={"type": "array", "items": JOB})]}},
                              404, 409, 422, body=JOB_OR_BATCH, body_required=True, params=[IDEMPOTENCY]),
    ("GET", "/v1/jobs"): _op("List jobs, newest first", "jobs", "admin",
                             {200: _answer(("jobs", "counts"), jobs={"type": "array", "items": JOB},
                                           counts={"type": "object", "additionalProperties": INT})},
                             params=[_query("state", {"enum": ["queued", "assigned", "running", "done", "failed",
                                                               "cancelled"]}),
                                     _query("tag", {"type": "string", "pattern": _pattern(wire.TAG_RE)}),
                                     _query("worker", ID["schema"]),
                                     _query("limit", {"type": "string", "pattern": "^[0-9]+$"})]),
    ("GET", "/v1/jobs/{id}"): _op("One job", "jobs", "admin", {200: JOB}, 404, params=[ID]),
    ("GET", "/v1/jobs/{id}/logs"): _op(
        "A page of a job's output after a cursor, held up to `wait` s for more", "jobs", "admin",
        {200: _answer(("job", "chunks", "next", "state", "complete"), job=STR, next=INT, state=STR, complete=BOOL,
                      exit_code={"type": ["integer", "null"]},
                      chunks={"type": "array", "items": _answer(("cursor", "attempt", "stream", "seq", "data"))})},
        404, params=[ID, _query("after", {"type": "string", "pattern": "^[0-9]+$"}),
                     _query("wait", {"type": "string", "pattern": "^[0-9]+$"}),
                     _query("limit", {"type": "string", "pattern": "^[0-9]+$"})]),
    ("GET", "/v1/jobs/{id}/attestation"): _op(
        "The signed result pond verified, and the pinned key it verified it with", "jobs", "admin",
        {200: _answer(("job", "attempt", "worker", "fingerprint", "ed25519_public", "envelope"))}, 404, params=[ID]),
    ("GET", "/v1/jobs/{id}/explain"): _op("Why a job waits, per pool", "jobs", "admin", {200: EXPLAIN}, 404,
                                          params=[ID]),
    ("POST", "/v1/jobs/explain"): _op("What a job spec would meet if submitted now, per pool", "jobs", "admin",
                                      {200: EXPLAIN}, 404, 422, body=JOB_SPEC, body_required=True),
    ("POST", "/v1/jobs/{id}/cancel"): _op("Cancel a job", "jobs", "admin", {200: JOB, 202: JOB}, 404,
                                          body=EMPTY, params=[ID]),
    ("GET", "/v1/jobs/{id}/artifacts"): _op(
        "The artifacts of a job's recorded result, as its worker signed them", "artifacts", "admin",
        {200: _answer(("job", "attempt", "artifacts"), job=STR, attempt=INT,
                      artifacts={"type": "array", "items": ARTIFACT})}, 404, params=[ID]),
    ("GET", "/v1/jobs/{id}/artifacts/{name}"): _op(
        "A piece (at most 1 MiB) of one recorded artifact, from `offset`", "artifacts", "admin",
        {200: _answer(("name", "size", "sha256", "offset", "data"), offset=INT, data={"type": "string",
                                                                                      "format": "byte"},
                      **ARTIFACT["properties"])},
        404, 410, params=[ID, ARTIFACT_NAME, _query("offset", {"type": "string", "pattern": "^[0-9]+$"})]),
    ("POST", "/v1/bundles"): _op(
        "Announce an encrypted source bundle; its parts follow", "bundles", "admin", {201: BUNDLE},
        body=_obj(("key", "sha256", "size"), key={"type": "string", "pattern": "^[A-Za-z0-9+/]{43}=$"},
                  sha256=HEX64, size={"type": "integer", "minimum": len(bundles.MAGIC) + bundles.TAG,
                                      "maximum": MAX_2_53}), body_required=True),
    ("GET", "/v1/bundles/{id}"): _op("A bundle and how much of it arrived", "bundles", "admin", {200: BUNDLE}, 404,
                                     params=[ID]),
    ("POST", "/v1/bundles/{id}/parts"): _op(
        "The next piece of a bundle's ciphertext (the last one checks its sha256)", "bundles", "admin",
        {200: BUNDLE}, 404, 409, body=_obj(("offset", "data"), offset={"type": "integer", "minimum": 0,
                                                                        "maximum": MAX_2_53}, data=DATA),
        body_required=True, params=[ID]),
    ("POST", "/v1/admin/pool/pairing-codes"): _op(
        "Mint a one-time orchestrator pairing code", "admin", "admin",
        {201: _answer(("code", "name", "expires_at", "ttl", "scope"))},
        body=_obj(nulls=("ttl", "name", "scope"), ttl={"type": "integer", "minimum": 30, "maximum": 604800},
                  name=NAME, scope=dict(TAGS, minItems=1))),
    ("POST", "/v1/admin/pool/enrollment-codes"): _op(
        "Mint a worker enrollment code", "admin", "admin",
        {201: _answer(("code", "expires_at", "ttl", "uses", "fingerprint", "tags"))},
        body=_obj(nulls=("ttl", "uses", "fingerprint", "tags"),
                  ttl={"type": "integer", "minimum": 30, "maximum": 604800},
                  uses={"type": "integer", "minimum": 1, "maximum": 10000}, fingerprint=FINGERPRINT,
                  tags=dict(TAGS, minItems=1))),
    ("GET", "/v1/admin/pool/orchestrators"): _op(
        "Paired orchestrators", "admin", "admin",
        {200: _answer(("orchestrators",), orchestrators={"type": "array", "items": _answer(("id",))})}),
    ("GET", "/v1/admin/pool/workers"): _op(
        "Enrolled workers", "admin", "admin",
        {200: _answer(("workers",), workers={"type": "array", "items": _answer(("id",))})}),
    ("DELETE", "/v1/admin/pool/orchestrators/{id}"): _op(
        "Revoke an orchestrator binding", "admin", "admin", {200: _answer(("binding_id", "revoked_at"))}, 404,
        params=[ID]),
    ("DELETE", "/v1/admin/pool/workers/{id}"): _op(
        "Revoke a worker", "admin", "admin", {200: _answer(("worker_id", "revoked_at"))}, 404, params=[ID]),
    ("POST", "/v1/admin/pool/workers/{id}/evict"): _op(
        "Evict a worker: no new jobs; its jobs requeued, or drained", "admin", "admin",
        {200: _answer(("worker_id", "evicted_at", "drain", "requeued"))}, 404, body=_obj(drain=BOOL), params=[ID]),
    ("POST", "/v1/admin/credentials"): _op(
        "Create or replace a credential", "admin", "admin", {201: CREDENTIAL, 200: CREDENTIAL},
        body=_obj(("name", "secrets"), name={"type": "string", "pattern": CRED_NAME["schema"]["pattern"]},
                  provider=STR, env=ENV, secrets=dict(ENV, minProperties=1), nulls=("provider", "env")),
        body_required=True),
    ("GET", "/v1/admin/credentials"): _op(
        "Credentials by name (never a value)", "admin", "admin",
        {200: _answer(("credentials",), credentials={"type": "array", "items": CREDENTIAL})}),
    ("GET", "/v1/admin/credentials/{id}"): _op("One credential (never a value)", "admin", "admin",
                                               {200: CREDENTIAL}, 404, params=[CRED_NAME]),
    ("DELETE", "/v1/admin/credentials/{id}"): _op("Delete a credential", "admin", "admin",
                                                  {200: _answer(("name", "deleted"))}, 404, params=[CRED_NAME]),
    ("GET", "/v1/jobs/{id}/usage"): _op(
        "An agent job's model calls, tokens and cost, as its worker signed them", "agents", "admin",
        {200: _answer(("job", "input_tokens", "output_tokens", "calls", "cost", "attested"))}, 404, params=[ID]),
    ("GET", "/v1/usage"): _op(
        "Tokens, calls and cost of the agent jobs that finished in [since, until), by model, harness or tenant",
        "agents", "admin", {200: _answer(("by", "since", "until", "usage"), usage={"type": "array"})},
        params=[_query("since", STR), _query("until", STR), _query("by", {"enum": ["model", "harness", "tenant"]})]),
    **{op: spec for kind, plural, body in (("harness", "harnesses", HARNESS), ("model", "models", MODEL))
       for op, spec in {
           ("POST", f"/v1/admin/{plural}"): _op(f"Create or replace a {kind}", "agents", "admin",
                                               {201: _answer(("key",)), 200: _answer(("key",))}, 422,
                                               body=body, body_required=True),
           ("GET", f"/v1/admin/{plural}"): _op(f"The {plural}", "agents", "admin",
                                              {200: _answer((plural,), **{plural: {"type": "array"}})}),
           ("GET", f"/v1/admin/{plural}/{{id}}"): _op(f"One {kind}", "agents", "admin", {200: _answer(("key",))},
                                                     404, params=[CRED_NAME]),
           ("DELETE", f"/v1/admin/{plural}/{{id}}"): _op(f"Delete a {kind}", "agents", "admin",
                                                        {200: _answer(("key", "deleted"))}, 404, params=[CRED_NAME]),
       }.items()},
    ("POST", "/v1/orch/pair"): _op(
        "Redeem a pairing code for a binding token", "orch", None,
        {201: _answer(("binding_id", "token", "name", "scope", "protocol_version"))}, 403, 410,
        body=_obj(("code",), code=STR, name=NAME, nulls=("name",)), body_required=True),
    ("GET", "/v1/orch/whoami"): _op("This binding", "orch", "orch",
                                    {200: _answer(("binding_id", "name", "scope", "protocol_version"))}),
    ("POST", "/v1/orch/poll"): _op(
        "Wait for assignments and cancels (held; streamed with stream: true)", "orch", "orch",
        {200: _answer(("jobs", "cancels"), jobs={"type": "array"}, cancels={"type": "array"})},
        body=_obj(wait={"type": "number", "minimum": 0, "maximum": 3600}, stream=BOOL, nulls=("wait",)), stream=True),
    ("POST", "/v1/orch/reports"): _op(
        "Many state and chunk reports, each answered on its own", "orch", "orch",
        {200: _answer(("results",), results={"type": "array", "items": _answer(("status",))})},
        body=_obj(("reports",), reports={"type": "array", "minItems": 1, "maxItems": 64, "items": {
            "description": "{job_id, claim_token, kind: state|chunk, body}; a bad one is refused in its result "
                           "(400), not the batch"}}), body_required=True),
    ("POST", "/v1/orch/jobs/{id}/state"): _op(
        "Report an attempt's state (a final one with its signed result)", "orch", "orch",
        {200: _answer(("job", "state"))}, 404, 409, body=STATE_REPORT, body_required=True, params=[ID, CLAIM]),
    ("POST", "/v1/orch/jobs/{id}/chunk"): _op(
        "Report a chunk of output", "orch", "orch", {200: _answer(("job", "stored"))}, 404, 409,
        body=CHUNK_REPORT, body_required=True, params=[ID, CLAIM]),
    ("POST", "/v1/orch/jobs/{id}/seal"): _op(
        "The job's credential sealed to its worker's pinned key", "orch", "orch",
        {200: _answer(("credential", "fingerprint", "sealed"))}, 404, 409,
        body=_obj(("attempt",), attempt=ATTEMPT), body_required=True, params=[ID, CLAIM]),
    ("POST", "/v1/orch/jobs/{id}/source"): _op(
        "Redeem the attempt's source token: the bundle's data key sealed to the worker's pinned key", "orch",
        "orch", {200: _answer(("sealed", "sha256", "size"), sealed=_answer(("enc", "ct", "suite")), sha256=HEX64,
                              size=INT)}, 404, 409, 410,
        body=_obj(("attempt", "token"), attempt=ATTEMPT, token=TOKEN), body_required=True, params=[ID, CLAIM]),
    ("POST", "/v1/orch/jobs/{id}/source/read"): _op(
        "A piece (at most 1 MiB) of the bundle's ciphertext, once the token was redeemed", "orch", "orch",
        {200: _answer(("offset", "data", "size"), offset=INT, data={"type": "string", "format": "byte"}, size=INT)},
        404, 409, 410, body=_obj(("attempt", "token", "offset"), attempt=ATTEMPT, token=TOKEN,
                            offset={"type": "integer", "minimum": 0, "maximum": MAX_2_53}),
        body_required=True, params=[ID, CLAIM]),
    ("POST", "/v1/orch/jobs/{id}/artifacts"): _op(
        "A piece of one artifact of the attempt, before its final report", "orch", "orch",
        {200: _answer(("name", "received", "complete"), name=STR, received=INT, complete=BOOL)}, 404, 409,
        body=_obj(("attempt", "name", "size", "sha256", "offset", "data"), attempt=ATTEMPT,
                  name={"type": "string", "pattern": _pattern(artifacts.NAME_RE)},
                  size={"type": "integer", "minimum": 0, "maximum": MAX_2_53}, sha256=HEX64,
                  offset={"type": "integer", "minimum": 0, "maximum": MAX_2_53}, data=DATA),
        body_required=True, params=[ID, CLAIM]),
    ("POST", "/v1/orch/heartbeat"): _op(
        "Renew the leases of held attempts; release a lost worker's", "orch", "orch",
        {200: _answer(("renewed", "stale", "released", "lease"))},
        body=_obj(("jobs",), jobs={"type": "array", "maxItems": 4096, "items": HELD},
                  released={"type": "array", "maxItems": 4096, "items": HELD}), body_required=True),
    ("POST", "/v1/orch/workers/{id}/evict"): _op(
        "Evict a worker of this binding", "orch", "orch",
        {200: _answer(("worker_id", "evicted_at", "drain", "requeued"))}, 404, body=_obj(drain=BOOL), params=[ID]),
    ("POST", "/v1/orch/workers/snapshot"): _op(
        "The binding's workers as its orchestrator sees them", "orch", "orch",
        {200: _answer(("unknown", "refused", "revoked", "evicted"))},
        body=_obj(("workers",), workers={"type": "array", "maxItems": 4096, "items": dict(
            WORKER_ENTRY, required=["id"], properties=dict(WORKER_ENTRY["properties"],
                                                            id={"type": "string", "maxLength": 64}))}),
        body_required=True),
    ("POST", "/v1/orch/enrollment/{code}/consumed"): _op(
        "Redeem an enrollment code for a worker", "orch", "orch",
        {201: _answer(("worker_id", "fingerprint", "pinned"))}, 404, 410, body=WORKER_ENTRY, params=[CODE]),
}


# Schemas the document names once, in components, and refers to wherever they occur.
NAMED = {"Job": JOB, "JobSpec": JOB_SPEC, "Agent": AGENT, "Harness": HARNESS, "Model": MODEL, "Sandbox": SANDBOX, "Waiting": WAITING, "Explain": EXPLAIN,
         "Credential": CREDENTIAL, "Chunk": CHUNK, "Held": HELD, "WorkerEntry": WORKER_ENTRY, "Health": HEALTH,
         "Env": ENV, "Bundle": BUNDLE, "Artifact": ARTIFACT, "Tags": TAGS}


def _named(node, skip=None):
    """`node` with every schema of NAMED in it (but `skip`, the one being written) as a $ref."""
    for name, schema in NAMED.items():
        if node is schema and node is not skip:
            return _ref(name)
    if isinstance(node, dict):
        return {k: _named(v, skip) for k, v in node.items()}
    if isinstance(node, list):
        return [_named(v, skip) for v in node]
    return node


def document():
    """The OpenAPI 3.1 document of this pond."""
    paths = {}
    for (method, path), op in OPERATIONS.items():
        op = dict(op, operationId=f"{method.lower()}{path.replace('/', '_').replace('{', '').replace('}', '')}")
        paths.setdefault(path, {})[method.lower()] = _named(op)
    return {
        "openapi": "3.1.0",
        "info": {"title": "pond", "version": __version__,
                 "description": f"pond's HTTP API, protocol {PROTOCOL_VERSION}. What each call does: "
                                "specs/protocol.md; error codes: docs/errors.md."},
        "servers": [{"url": "http://127.0.0.1:8001"}],
        "paths": paths,
        "components": {
            "securitySchemes": {
                "admin": {"type": "http", "scheme": "bearer", "description": "the admin token"},
                "orch": {"type": "http", "scheme": "bearer", "description": "a binding token, orch.<id>.<secret>"}},
            "schemas": {"Error": ERROR, **{name: _named(schema, skip=schema) for name, schema in NAMED.items()}},
            "responses": {f"E{status}": {"description": text, "content": {"application/json": {
                "schema": _ref("Error")}}} for status, text in ERRORS.items()}},
    }


def text():
    """The document as specs/openapi.json holds it."""
    return json.dumps(document(), indent=2) + "\n"


@functools.cache
def _built():
    return document()


def serve(pond, req):
    """GET /v1/openapi.json (open): the same document for every pond of this version."""
    return 200, _built()


if __name__ == "__main__":
    sys.stdout.write(text())

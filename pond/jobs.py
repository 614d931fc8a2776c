"""The job: its states, its transitions, and the /v1/jobs API (submit, inspect, logs, cancel).

    queued ──claim──▶ assigned ──report──▶ running ──report──▶ done | failed | cancelled
     ▲ │                 │  │                   │               ▲
     │ └──cancel─────────┼──┴──report (a short job skips running)┘
     └───lease expired───┴──────────────────────┘   (a new attempt, up to max_attempts)

specs/states.md is the normative table; TRANSITIONS below is the same table, and
every state change goes through transition(), which refuses anything else.
"""

import logging
import re
import time
from enum import Enum

from pond import agents, artifacts, bundles, credentials, matching, sandbox, tokens, wire
from pond.errors import BadRequest, Conflict, InvalidTransition, NotFound, PondError
from pond.settings import MAX_LOG_CAP, MIN_LOG_CAP


class JobState(str, Enum):
    QUEUED = "queued"
    ASSIGNED = "assigned"
    RUNNING = "running"
    DONE = "done"
    FAILED = "failed"
    CANCELLED = "cancelled"


TERMINAL = frozenset({JobState.DONE, JobState.FAILED, JobState.CANCELLED})

TRANSITIONS = {
    JobState.QUEUED: frozenset({JobState.ASSIGNED, JobState.CANCELLED}),
    JobState.ASSIGNED: frozenset({JobState.RUNNING, JobState.DONE, JobState.FAILED, JobState.CANCELLED,
                                  JobState.QUEUED}),
    JobState.RUNNING: frozenset({JobState.DONE, JobState.FAILED, JobState.CANCELLED, JobState.QUEUED}),
    JobState.DONE: frozenset(),
    JobState.FAILED: frozenset(),
    JobState.CANCELLED: frozenset(),
}

log = logging.getLogger("pond")     # one line per job event: submitted, each state change (issue 12)
MAX_TIMEOUT = 7 * 24 * 3600
SUBMIT_FIELDS = ("command", "env", "tags", "capabilities", "sandbox", "timeout", "name", "tenant", "credential",
                 "cancel_grace", "log_cap", "retries", "source", "artifacts", "artifact_cap", "agent")
MAX_RETRIES = 10
MAX_SUBMIT_BATCH = 1000      # jobs in one POST /v1/jobs of a list (the body's 4 MiB bounds it too)
DEFAULT_CANCEL_GRACE = 10.0     # s from SIGTERM to SIGKILL, on cancel and timeout


def requeue(store, job, tried):
    """assigned|running -> queued, for a new attempt: its lease ran out or its worker was evicted
    (dispatch.end_attempt), or it failed and asked for retries (dispatch._retry)."""
    from_state = JobState(job["state"])
    if JobState.QUEUED not in TRANSITIONS[from_state] or not store.requeue_job(
            job["id"], from_state.value, job["attempt"], tried):
        raise InvalidTransition(job["id"], from_state.value, JobState.QUEUED.value)
    log.info("job %s: %s -> queued (attempt %d on worker %s ended)", job["id"], from_state.value, job["attempt"],
             job["worker_id"], extra={"job": job["id"], "event": "requeued", "attempt": job["attempt"],
                                      "worker": job["worker_id"], "state": "queued"})


def transition(store, job, to_state, **fields):
    """Move `job` (a row) to `to_state` if the table allows it; InvalidTransition otherwise."""
    from_state = JobState(job["state"])
    to_state = JobState(to_state)
    if to_state not in TRANSITIONS[from_state]:
        raise InvalidTransition(job["id"], from_state.value, to_state.value)
    if not store.update_job_state(job["id"], from_state.value, to_state.value, fields):
        current = store.job(job["id"])
        raise InvalidTransition(job["id"], current["state"], to_state.value)
    log.info("job %s: %s -> %s (attempt %d%s)", job["id"], from_state.value, to_state.value, job["attempt"],
             "" if fields.get("exit_code") is None else f", exit code {fields['exit_code']}",
             extra={"job": job["id"], "event": to_state.value, "attempt": job["attempt"], "state": to_state.value,
                    "exit_code": fields.get("exit_code")})


IDEMPOTENCY_KEY_RE = re.compile(r"^[A-Za-z0-9._:-]{1,128}\Z")
IDEMPOTENT_FIELDS = ("command", "env", "tags", "capabilities", "sandbox", "timeout", "name", "credential",
                     "cancel_grace", "log_cap", "retries", "source", "artifacts", "artifact_cap", "files", "broker",
                     "agent")


def submit(pond, req):
    """POST /v1/jobs: validate, store as queued, wake the orchestrators' polls.

    The body is one job, or a list of them (a batch: all valid and stored in one
    transaction, or none). With an `Idempotency-Key` header, a retried submit (the client
    lost the answer) gets the jobs the first one made, never a second copy; the n-th job
    of a batch is kept under `KEY:n`.
    """
    key = req.headers.get("Idempotency-Key")
    if key is not None and not IDEMPOTENCY_KEY_RE.match(key):
        raise BadRequest("Idempotency-Key must be 1 to 128 of A-Z a-z 0-9 . _ : -", "a UUID will do")
    if isinstance(req.body, list):
        return _submit_batch(pond, req.body, key)
    status, row = _store(pond, _validated(pond, req.body), key)
    pond.work.notify(new_job=True)
    return status, view(pond, row, explain=status == 200)   # a new job as stored, not read back; `pond job ID` explains


def _submit_batch(pond, bodies, key):
    if not 1 <= len(bodies) <= MAX_SUBMIT_BATCH:
        raise BadRequest(f"a batch is a list of 1 to {MAX_SUBMIT_BATCH} jobs", "send several batches")
    jobs = []
    for i, body in enumerate(bodies):
        try:
            jobs.append(_validated(pond, body))
        except PondError as e:                     # nothing of the batch is stored
            e.message = f"jobs[{i}]: {e.message}"
            raise
    with pond.store.transaction():
        stored = [_store(pond, job, key and f"{key}:{i}") for i, job in enumerate(jobs)]
    pond.work.notify(new_job=True)
    status = 201 if any(status == 201 for status, _ in stored) else 200
    return status, {"jobs": [view(pond, row, explain=False) for _, row in stored]}


def _validated(pond, body):
    """A job as pond stores it, from a submitted body (any bad field: a 4xx naming it)."""
    body = wire.obj(body, "job", SUBMIT_FIELDS)
    if ("command" in body) == ("agent" in body):
        raise BadRequest("a job has a command or an agent, one of them", 'example: {"command": ["python", "-c", '
                         '"print(42)"]}, or {"agent": {"harness": "codex", "model": "gpt", "prompt": "..."}}')
    tenant = wire.optional_string(body.get("tenant"), "tenant", max_len=128, pattern=wire.TAG_RE)
    box = sandbox.parse(body.get("sandbox"), tenant, pond.settings.require_sandbox)
    tags = sorted(set(wire.string_list(body.get("tags"), "tags", wire.TAG_RE,
                                       hint="tags look like repo:acme or pool:trusted")) | set(box.tags))
    caps = sorted(set(wire.string_list(body.get("capabilities"), "capabilities", wire.CAPABILITY_RE,
                                       hint="capabilities look like harness.codex (no globs in a job)"))
                  | set(box.capabilities))
    expanded = _agent(pond, body, box.block)
    if expanded:
        caps = sorted(set(caps) | {expanded["capability"]})
    return {
        "id": tokens.new_id("j"),
        "state": JobState.QUEUED.value,
        "name": wire.optional_string(body.get("name"), "name", max_len=64, pattern=wire.NAME_RE),
        "command": expanded["command"] if expanded else wire.argv(body["command"]),
        "env": {**(expanded or {}).get("env", {}), **wire.env(body.get("env"))},
        "tags": tags,
        "capabilities": caps,
        "sandbox": box.block,
        "timeout": wire.number(body.get("timeout"), "timeout", 1, MAX_TIMEOUT),
        "created_at": pond.now(),
        "credential": expanded["credential"] if expanded else _credential(pond, body.get("credential")),
        "cancel_grace": wire.number(body.get("cancel_grace"), "cancel_grace", 0, 3600, default=DEFAULT_CANCEL_GRACE),
        "log_cap": wire.number(body.get("log_cap"), "log_cap", MIN_LOG_CAP, MAX_LOG_CAP, integer=True,
                               default=pond.settings.log_cap),
        "retries": wire.number(body.get("retries"), "retries", 0, MAX_RETRIES, integer=True, default=0),
        "source": bundles.source_of(pond, body.get("source")),
        "artifacts": artifacts.patterns(body.get("artifacts")),
        "artifact_cap": artifacts.cap(body.get("artifact_cap")),
        **({k: expanded[k] for k in ("files", "broker", "agent")} if expanded else {}),
    }


def _agent(pond, body, box):
    """An agent block expanded into what runs (pond/agents.py), or None for a job with a command."""
    if "agent" not in body:
        return None
    if body.get("credential") is not None:
        raise agents.RegistryInvalid("credential: an agent job takes its credential from its model",
                                     "drop credential; the model's is brokered")
    return agents.expand(pond, body["agent"], box)


def _store(pond, job, key):
    """Insert a validated job: -> (201, its row), or (200, the job stored earlier under `key`)."""
    # The job as validated, not the body as sent: `"env": {}` and no env are the same request.
    request_hash = tokens.digest(wire.canonical({k: job.get(k) for k in IDEMPOTENT_FIELDS})) if key else None
    pinned_only = bool(job["credential"] or job["source"] or job["artifacts"])     # sealed to, or signed by, a key
    earlier = pond.store.add_job(job, matching.requirement_key(job["tags"], job["capabilities"], sealed=pinned_only),
                                 key, request_hash)
    if earlier is not None:
        if earlier["request_hash"] != request_hash:
            raise Conflict(f"Idempotency-Key {key!r} was used for another job ({earlier['id']}) with another body",
                           "use a new key for a new job", code="idempotency_conflict")
        return 200, earlier
    log.info("job %s submitted: tags %s; capabilities %s", job["id"], ",".join(job["tags"]) or "-",
             ",".join(job["capabilities"]) or "-", extra={"job": job["id"], "event": "submitted", "state": "queued"})
    return 201, dict(job, attempt=0, exit_code=None, error=None, assigned_at=None, started_at=None, finished_at=None,
                     worker_id=None, binding_id=None, cancel_requested=0, attestation=None, events=[], tried=[],
                     dropped=None, retries_left=job["retries"], outputs=None, files=job.get("files"),
                     broker=job.get("broker"), agent=job.get("agent"), usage=None)


def _credential(pond, name):
    """The credential a job names (its env reaches the worker sealed): it must exist at submit."""
    if name is None:
        return None
    name = wire.string(name, "credential", 64, credentials.NAME_RE, credentials.NAME_HINT)
    credentials.check_exists(pond, name)
    return name


def get(pond, req):
    return 200, view(pond, _find(pond, req.params["id"]))


def attestation(pond, req):
    """GET /v1/jobs/{id}/attestation: the signed result as pond verified and stored it, with the pinned key."""
    job = _find(pond, req.params["id"])
    if job["attestation"] is None:
        why = ("it has not finished" if JobState(job["state"]) not in TERMINAL else
               "its result was recorded unsigned (the job never ran, or its worker has no pinned keys)")
        raise NotFound(f"job {job['id']} has no attestation: {why}", "see `pond job ID` for its state and events")
    worker = pond.store.worker(job["worker_id"])
    return 200, {"job": job["id"], "attempt": job["attempt"], "worker": job["worker_id"],
                 "fingerprint": worker["fingerprint"], "ed25519_public": worker["ed25519_public"],
                 "envelope": job["attestation"]}


def usage(pond, req):
    """GET /v1/jobs/{id}/usage: an agent job's model calls, tokens and cost, as its worker signed them."""
    job = _find(pond, req.params["id"])
    if not job.get("broker"):
        raise NotFound(f"job {job['id']} is not an agent job: it has no model usage",
                       "submit with an agent block (pond submit --harness KEY --model KEY --prompt TEXT)")
    return 200, agents.usage_view(job)


def list_jobs(pond, req):
    """GET /v1/jobs?state=&tag=&worker=&limit=: the newest jobs first, each filter given narrowing them
    (tag: the job requires it; worker: its last attempt ran there); an empty filter is refused."""
    state, tag, worker = (req.query.get(name) for name in ("state", "tag", "worker"))
    if state is not None and state not in {s.value for s in JobState}:
        raise BadRequest(f"state {state[:40]!r} is unknown", "one of: " + ", ".join(s.value for s in JobState))
    if tag is not None and not wire.TAG_RE.match(tag):
        raise BadRequest(f"tag {tag[:40]!r} is not a tag", "a tag is 1-128 of A-Z a-z 0-9 . _ : / = + -, "
                         "starting with a letter or digit")
    if worker is not None and not wire.ID_RE.match(worker):
        raise BadRequest(f"worker {worker[:40]!r} is not a worker id", "list workers with `pond admin workers`")
    limit = _int_query(req, "limit", 100, 1, 1000)
    return 200, {"jobs": [view(pond, row, explain=False) for row in pond.store.jobs(state, limit, tag, worker)],
                 "counts": pond.store.job_counts()}


def cancel(pond, req):
    """POST /v1/jobs/{id}/cancel: a queued job ends at once; an assigned or running one is told to stop."""
    wire.obj(req.body, "cancel", ())
    job = _find(pond, req.params["id"])
    state = JobState(job["state"])
    if state in TERMINAL:
        return 200, view(pond, job)
    if state is JobState.QUEUED:
        try:
            transition(pond.store, job, JobState.CANCELLED, finished_at=pond.now(), error="cancelled while queued")
        except InvalidTransition:
            pass   # claimed in the meantime: fall through to a cancel request
        else:
            pond.logs.notify()
            return 200, view(pond, pond.store.job(job["id"]))
    pond.store.request_cancel(job["id"])
    pond.work.notify()
    return 202, view(pond, pond.store.job(job["id"]))


def logs(pond, req):
    """GET /v1/jobs/{id}/logs?after=CURSOR&wait=S: chunks after a cursor, held until there are some."""
    job_id = req.params["id"]
    _find(pond, job_id)
    after = _int_query(req, "after", 0, 0, 2**62)
    limit = _int_query(req, "limit", 1000, 1, 5000)
    wait = min(_int_query(req, "wait", 0, 0, 3600), pond.settings.poll_hold)
    deadline = time.monotonic() + wait
    while True:
        snapshot = pond.logs.snapshot()
        job = pond.store.job(job_id)       # state first: a final report stores its chunks before its state
        finished = JobState(job["state"]) in TERMINAL
        rows = pond.store.chunks(job_id, after, limit)
        remaining = deadline - time.monotonic()
        if rows or finished or remaining <= 0:
            break
        pond.logs.wait(snapshot, remaining)
    chunks = [{"cursor": r["id"], "attempt": r["attempt"], "stream": r["stream"], "seq": r["seq"],
               "data": wire.b64encode(r["data"])} for r in rows]
    return 200, {"job": job_id, "chunks": chunks, "next": rows[-1]["id"] if rows else after,
                 "state": job["state"], "exit_code": job["exit_code"],
                 "complete": finished and len(rows) < limit}


def view(pond, row, explain=True):
    """A job row as the API shows it; a queued job says why it waits."""
    out = {k: row[k] for k in ("id", "name", "state", "command", "env", "tags", "capabilities", "sandbox",
                               "timeout", "attempt", "exit_code", "error", "created_at", "assigned_at",
                               "started_at", "finished_at", "credential", "cancel_grace", "log_cap", "dropped",
                               "retries_left", "artifacts", "artifact_cap", "outputs")}
    out["artifacts"] = out["artifacts"] or []
    out["source"] = row["source"] and dict(row["source"])
    out["worker"] = row["worker_id"]
    out["orchestrator"] = row["binding_id"]
    out["cancel_requested"] = bool(row["cancel_requested"])
    # attested: true, the result was signed by the worker's pinned key and verified; false, recorded
    # unsigned (never ran, or an unpinned worker); null, no result yet.
    out["attested"] = (row["attestation"] is not None) if JobState(row["state"]) in TERMINAL else None
    out["events"] = row["events"] or []
    out["warnings"] = sandbox.warnings(row["sandbox"])
    if row.get("broker"):
        out.update(files=row["files"] or [], broker=row["broker"], agent=row["agent"],     # no secret: unfilled
                   usage=agents.usage_view(row))
    if explain and row["state"] == JobState.QUEUED.value:
        out["waiting"] = matching.explain(row, pond.store.workers(), pond.store.active_counts(),
                                          pond.settings.allow_unsigned, _silent(pond))
    return out


def _silent(pond):
    """Orchestrator (binding) id -> seconds since it last held a poll, for those quiet too long."""
    now = pond.now()
    return {b: now - t for b in {w["binding_id"] for w in pond.store.workers()}
            if now - (t := pond.polled.get(b, pond.started)) > matching.POLL_SILENCE}


def explain(pond, req):
    """GET /v1/jobs/{id}/explain: for each pool, what it lacks for this job, or that its matching
    workers are busy, offline or evicted; and, while the job is queued, why it waits."""
    return 200, _explained(pond, _find(pond, req.params["id"]))


def explain_spec(pond, req):
    """POST /v1/jobs/explain: the same for a job (the body of POST /v1/jobs) before it is submitted;
    it is validated as a submit would be, and nothing is stored."""
    return 200, _explained(pond, _validated(pond, req.body), submitted=False)


def _explained(pond, job, submitted=True):
    workers, active, silent = pond.store.workers(), pond.store.active_counts(), _silent(pond)
    unsigned = pond.settings.allow_unsigned
    waiting = matching.explain(job, workers, active, unsigned, silent) if job["state"] == JobState.QUEUED.value else None
    return {"job": job["id"] if submitted else None, "state": job["state"] if submitted else None,
            "tags": job["tags"], "capabilities": job["capabilities"], "credential": job["credential"],
            "waiting": waiting, "pools": matching.pools(job, workers, pond.store.bindings(), active, unsigned, silent)}


def _find(pond, job_id):
    row = pond.store.job(job_id)
    if row is None:
        raise NotFound(f"job {job_id[:40]!r} does not exist", "list jobs with `pond jobs`")
    return row


def _int_query(req, name, default, lo, hi):
    raw = req.query.get(name)
    if raw is None:
        return default
    if not (raw.isascii() and raw.isdigit()) or not lo <= int(raw) <= hi:
        raise BadRequest(f"query parameter {name}={raw[:40]!r} must be a whole number from {lo} to {hi}")
    return int(raw)

"""Dispatch: how queued jobs reach workers, and how their reports come back.

    consumer ── POST /v1/jobs ──▶ store (queued) ── work.notify(new_job) ─┐
                                                                   ▼
    orchestrator ── POST /v1/orch/poll (held ≤ hold s) ──▶ claim(): one transaction that
                                                           assigns queued jobs to this
                                                           binding's online workers
    orchestrator ◀── {jobs: [assignment...], cancels: [...]} ──┘
    orchestrator ── POST /v1/orch/reports (many jobs' state|chunk, each with its claim token) ──▶ report_*()

Free slots are pond's own count: a worker's slots (from the latest snapshot) minus its
jobs that are assigned or running. pond learns a slot is free from the job's final
report, which wakes held polls, so a poll never works from a stale offer
(specs/protocol.md §4 explains why offers are not carried on the poll).
"""

import base64
import contextlib
import dataclasses
import secrets
import threading
import time

from pond import artifacts, attestation, bundles, credentials, matching, sandbox, sealing, tokens, wire
from pond.errors import BadRequest, Forbidden, InvalidTransition, NotFound, PondError, StaleAttempt, Unauthorized
from pond.jobs import TERMINAL, TRANSITIONS, JobState, requeue, transition

MAX_CLAIM = 64          # assignments in one poll answer
TOUCH_EVERY = 5.0       # s between updates of a binding's last_seen
LIVENESS_CHECK = 2.0    # s between checks that a held poll's orchestrator is still connected
BACKSTOP_MARGIN = 30.0    # s past a job's timeout + cancel grace before pond fails it itself
MAX_HEARTBEAT = 4096      # attempts renewed by one heartbeat
MAX_BATCH = 64            # reports in one POST /v1/orch/reports
MAX_VERDICTS = 10000      # groups whose verdict a binding keeps after they emptied
MAX_ENVELOPE = 64 * 1024    # bytes of an attestation: one signature over a statement is ~1.5 KiB
WITHDRAW_AFTER = 1.0      # s a job waits ahead on its worker before a free slot elsewhere may ask for it
REPORT_STATES = (JobState.RUNNING, JobState.DONE, JobState.FAILED, JobState.CANCELLED)


class Notifier:
    """Versions with a condition: wait until something changed since a snapshot.

    Two kinds of change: capacity (a slot freed, a worker or a cancel changed) and new
    jobs. A poll whose workers have no free slot waits for capacity only, and a new job
    wakes nobody unless some waiter could take it: while a pool is full, submits cost
    the held polls nothing.
    """

    def __init__(self):
        self._cond = threading.Condition()
        self.version = 0          # capacity changes
        self.jobs_version = 0     # new jobs
        self._job_waiters = 0
        self.relay = None         # PostgreSQL: tells the other replicas, whose stores call wake() (store_pg.py)
        self._deferred = threading.local()

    def notify(self, new_job=False):
        pending = getattr(self._deferred, "pending", None)
        if pending is not None:
            pending.add(new_job)
            return
        if self.relay is not None:
            self.relay(new_job)
        self.wake(new_job)

    def wake(self, new_job=False):
        """Wake this process's waiters only."""
        with self._cond:
            if new_job:
                self.jobs_version += 1
                if not self._job_waiters:
                    return
            else:
                self.version += 1
            self._cond.notify_all()

    @contextlib.contextmanager
    def deferred(self):
        """Within, this thread's notify() only notes the change; one wake of each kind at the end.
        A batch of 64 reports wakes the held polls once, not 64 times (each wake of every waiter
        costs its thread a switch, and pond a tenth of its CPU at full load)."""
        self._deferred.pending = set()
        try:
            yield
        finally:
            pending, self._deferred.pending = self._deferred.pending, None
            for new_job in sorted(pending):
                self.notify(new_job)

    def snapshot(self):
        return self.version, self.jobs_version

    def wait(self, snapshot, timeout, new_jobs=True):
        with self._cond:
            self._job_waiters += new_jobs
            try:
                self._cond.wait_for(lambda: self.version != snapshot[0]
                                    or (new_jobs and self.jobs_version != snapshot[1]), timeout)
            finally:
                self._job_waiters -= new_jobs


class Fits:
    """Which queued requirement groups each binding's workers fit, kept from one poll to the next.

    A group's verdict depends only on its requirements and on the binding's available
    workers (which ones, their tags, capabilities and whether their keys are pinned), not
    on free slots or on how many jobs wait in it. So a poll matches only the groups that
    appeared since the one before (store.queue_groups), and a group that no worker fits costs
    nothing more until that set of workers changes; then every group is matched again. The
    store leaves out the groups with a tag none of the workers has, the common miss (a
    tenant tag each), so only the others are matched here. Used inside claim()'s
    transaction, which serialises it.
    """

    def __init__(self):
        self._seen = {}         # binding id -> _Seen
        self._workers = {}      # binding id -> (store.workers rows, the available ones, {their id: slots})
        self.checks = 0         # groups matched against a binding's workers, for /metrics

    def available(self, pond, binding_id):
        """(rows, available rows, {worker id: capacity} of those, in enrollment order) for a binding,
        worked out again only when the store's cached rows change: a poll with 1,000 workers
        then walks them once, not once per check. Safe without a lock: it only replaces a tuple.
        A worker's capacity is its slots and pond's --assign-ahead: the jobs it may hold at once,
        those beyond its slots waiting on the worker to start as soon as a slot frees."""
        rows = pond.store.workers(binding_id)
        got = self._workers.get(binding_id)
        if got is None or got[0] is not rows:
            workers = [w for w in rows if _available(pond, w)]
            ahead = pond.settings.assign_ahead
            got = self._workers[binding_id] = (rows, workers, {w["id"]: w["slots"] + ahead for w in workers})
        return got

    def fitting(self, store, binding_id, rows, workers):
        """{req_key: ids of the workers that fit, in enrollment order} of the queued groups some
        of `workers` (the available ones among `rows`, store.workers(binding_id)) fit, free slots aside."""
        seen = self._seen.get(binding_id)
        if seen is None or seen.rows is not rows:      # the rows are cached: the same list until a worker changes
            key = tuple((w["id"], tuple(w["tags"]), tuple(w["capabilities"]), bool(w["fingerprint"])) for w in workers)
            if seen is None or seen.key != key:
                seen = self._seen[binding_id] = _Seen(key, workers)
            seen.rows = rows
        seen.serial, groups = store.queue_groups(seen.serial, seen.all_tags)
        for group in groups:
            self.checks += 1
            fit = seen.match(group)
            if fit:
                seen.fit[group["req_key"]] = fit
            else:
                seen.fit.pop(group["req_key"], None)
        return seen.fit

    def forget(self, binding_id, req_key):
        """The group had no queued job left when this binding looked: the store has dropped it, and
        it comes back as a new group."""
        self._seen[binding_id].fit.pop(req_key, None)


class _Seen:
    """One binding's workers as far as matching goes (worker ids with the same tags, capabilities
    and keys share a profile, matched once per group), the last group serial it matched, and
    the groups they fit."""

    def __init__(self, key, workers):
        self.key, self.rows, self.serial, self.fit = key, None, 0, {}
        self.verdicts = {}      # req_key -> fit, for a group that empties and comes back (each job, often)
        profiles = {}
        self.order = [(w["id"], profiles.setdefault(k[1:], len(profiles))) for w, k in zip(workers, key)]
        self.profiles = [({"tags": tags, "capabilities": caps}, pinned) for tags, caps, pinned in profiles]
        self.all_tags = {t for w in workers for t in w["tags"]}

    def match(self, group):
        fit = self.verdicts.get(group["req_key"])
        if fit is None:
            ok = {i for i, (w, pinned) in enumerate(self.profiles)
                  if (pinned or not group["sealed"]) and matching.matches(w, group["tags"], group["capabilities"])}
            fit = [worker_id for worker_id, profile in self.order if profile in ok]
            if len(self.verdicts) >= MAX_VERDICTS:
                self.verdicts.clear()
            self.verdicts[group["req_key"]] = fit
        return fit


def claim(pond, binding_id, max_jobs=MAX_CLAIM):
    """Assign queued jobs to this binding's online workers with free slots, oldest first.

    One write transaction: two polls can never assign the same job. Queued jobs are
    grouped by requirements; each group that some free worker fits offers its oldest
    jobs, and the offers are taken in submission order across groups. Among matching
    workers, the one with the most free slots gets the job. Which groups fit is kept
    between polls (Fits). With --assign-ahead, a worker's free slots count the jobs it may
    hold beyond its slots too (Fits.available), and a worker left with a free slot of its own and
    nothing to take asks for jobs waiting ahead on busy workers (_withdraw).
    """
    store = pond.store
    with pond.work.deferred(), store.transaction():      # the holders' polls wake once this has committed
        store.claim_lock(binding_id)        # PostgreSQL: one claim per binding across replicas
        rows, workers, capacity = pond.fits.available(pond, binding_id)
        if not workers:
            return []
        free = dict(capacity)
        for worker_id, n in store.active_counts(binding_id).items():
            if worker_id in free:
                free[worker_id] -= n
        if not any(n > 0 for n in free.values()):
            return []
        candidates, emptied = [], []
        for req_key, fitting in pond.fits.fitting(store, binding_id, rows, workers).items():
            room = _room(fitting, free, max_jobs)
            if room:
                jobs = store.queued_jobs(req_key, room)
                # Those with a free slot now; only a requeued job needs them listed (below).
                fit = [w for w in fitting if free[w] > 0] if any(job["tried"] for job in jobs) else fitting
                candidates += [(job["seq"], job, fit) for job in jobs]
                if not jobs:
                    emptied.append(req_key)
        for req_key in emptied:
            pond.fits.forget(binding_id, req_key)
        out = []
        for _, job, fit in sorted(candidates, key=lambda c: c[0]):
            # A job whose lease ran out goes to another worker if one fits: the last may be broken.
            tried = set(job["tried"] or ())
            worker_id = (max(fit, key=lambda w: (w not in tried, free[w])) if tried else
                         max(fit, key=free.__getitem__))        # the first with the most free slots
            if free[worker_id] <= 0:
                continue
            assignment = _assign(pond, job, worker_id, binding_id)
            if assignment is None:
                continue
            out.append(assignment)
            free[worker_id] -= 1
            if len(out) >= max_jobs:
                break
        if len(out) < max_jobs and pond.settings.assign_ahead:
            _withdraw(pond, workers, free)
        return out


def _withdraw(pond, workers, free):
    """Ask back, for this binding's workers with a slot of their own free and nothing queued they
    fit, jobs that have waited ahead on another worker for WITHDRAW_AFTER (specs/protocol.md §4,
    Withdrawal): a job given ahead then waits for the first fitting slot, not only its worker's.
    The holder gives back only a job it has not started; pond then queues it again (_requeue)."""
    ahead = pond.settings.assign_ahead
    idle = [w for w in workers if free[w["id"]] > ahead]
    slots = sum(free[w["id"]] - ahead for w in idle)
    if not slots:
        return
    idle_ids = {w["id"] for w in idle}
    for job in pond.store.withdrawable(pond.now() - WITHDRAW_AFTER, MAX_CLAIM):
        sealed = matching.needs_keys(job, pond.settings.allow_unsigned)
        if job["worker_id"] in idle_ids or not any(
                (w["fingerprint"] or not sealed) and matching.matches(w, job["tags"], job["capabilities"])
                for w in idle):
            continue            # its own worker has a free slot (it starts it now), or no idle one fits
        if pond.store.ask_withdraw(job["id"], job["attempt"]):
            pond.log.info("job %s: asked back from worker %s for a free slot elsewhere (attempt %d)", job["id"],
                          job["worker_id"], job["attempt"],
                          extra={"job": job["id"], "event": "withdraw", "attempt": job["attempt"],
                                 "worker": job["worker_id"]})
            pond.work.notify()          # its holder's poll sends it
            slots -= 1
            if not slots:
                return


def _room(fitting, free, most):
    """Free slots among the fitting workers, counted up to `most` (a big pool need not be walked whole)."""
    room = 0
    for worker_id in fitting:
        if free[worker_id] > 0:
            room += free[worker_id]
            if room >= most:
                return most
    return room


def _available(pond, worker):
    """Whether a worker may be given jobs at all: online, not evicted, and with pinned keys.

    Without pinned keys a worker can neither open a credential nor sign a result: by
    default it takes nothing; with --allow-unsigned-results, nothing that names a credential
    (claim() checks that per requirement group).
    """
    return worker["online"] and worker["evicted_at"] is None and (worker["fingerprint"] or pond.settings.allow_unsigned)


def _has_free_slot(pond, binding_id):
    capacity = pond.fits.available(pond, binding_id)[2]
    active = pond.store.active_counts(binding_id)
    return any(n > active.get(worker_id, 0) for worker_id, n in capacity.items())


def _assign(pond, job, worker_id, binding_id):
    claim_token = secrets.token_urlsafe(24)
    now = pond.now()
    if not pond.store.assign_job(job["id"], worker_id, binding_id, tokens.digest(claim_token), now,
                                 now + pond.settings.lease):
        return None         # not queued any more: never hand out a job the store did not assign
    pond.metrics.assigned(job, now)
    pond.log.info("job %s: queued -> assigned (attempt %d, worker %s)", job["id"], job["attempt"] + 1, worker_id,
                  extra={"job": job["id"], "event": "assigned", "attempt": job["attempt"] + 1, "worker": worker_id,
                         "orchestrator": binding_id, "state": "assigned"})
    return {
        "job_id": job["id"], "attempt": job["attempt"] + 1, "claim_token": claim_token,
        "worker": worker_id, "command": job["command"], "env": job["env"], "name": job["name"],
        "tags": job["tags"], "capabilities": job["capabilities"], "sandbox": job["sandbox"],
        "timeout": sandbox.effective_timeout(job),     # the worker stops the job at the sooner of the two
        "credential": job["credential"],     # the intent only: the worker asks for it sealed (seal())
        "cancel_grace": job["cancel_grace"],
        "log_cap": job["log_cap"],
        **_files(pond, job),
        **{k: job[k] for k in ("files", "broker") if job.get(k) is not None},    # an agent job's (pond/agents.py)
    }


def _files(pond, job):
    """The assignment's source (a one-time redeem token, the digest and size: never the bundle itself)
    and artifact patterns (specs/bundles.md §5)."""
    out = {}
    if job.get("source") and "git" in job["source"]:
        out["source"] = {"git": job["source"]["git"], "ref": job["source"]["ref"]}     # the worker fetches it
    elif job.get("source"):
        out["source"] = {"token": bundles.token_for(pond, job["id"], job["attempt"] + 1),
                         "sha256": job["source"]["sha256"], "size": job["source"]["size"]}
    if job.get("artifacts") or job.get("source"):
        out["artifacts"] = job.get("artifacts") or []
        out["artifact_cap"] = job.get("artifact_cap") or artifacts.DEFAULT_CAP
    return out


def poll(pond, req):
    """POST /v1/orch/poll {wait?, stream?}: work and cancels for this binding, held until there are some.

    Without `stream`, one answer: at once if there is work, else when some arrives or the
    hold ends (empty). With `"stream": true`, the response is a stream of answers, one
    JSON line each, as work arrives, until the hold ends (specs/protocol.md §4): under
    load a pool then costs no poll request per job.
    """
    body = wire.obj(req.body, "poll", ("wait", "stream"))
    hold = min(wire.number(body.get("wait"), "wait", 0, 3600, default=pond.settings.poll_hold),
               pond.settings.poll_hold)
    stream = body.get("stream", False)
    if not isinstance(stream, bool):
        raise BadRequest("poll.stream must be true or false")
    binding = req.principal
    if (binding["last_seen"] or 0) < pond.now() - TOUCH_EVERY:      # a write per poll would be waste
        pond.store.touch_binding(binding["id"], pond.now())
    answers = _answers(pond, binding["id"], time.monotonic() + hold, req.alive)
    if stream:
        return 200, answers
    return 200, next(answers, {"jobs": [], "cancels": []})


def _answers(pond, binding_id, deadline, alive):
    """Yield each non-empty {jobs, cancels} for a binding until `deadline` (monotonic).

    It stops as soon as the orchestrator has hung up, and never claims for one that
    has: a job written to a dead connection would be assigned and never run.
    """
    while True:
        if not alive():
            return
        pond.polled[binding_id] = pond.now()        # a sign of life of its poll loop (jobs.view)
        snapshot = pond.work.snapshot()
        if pond.store.binding(binding_id)["revoked_at"] is not None:
            return              # revoked while held: the next poll is refused (pairing.authenticate)
        free = _has_free_slot(pond, binding_id)     # checked without the write lock
        jobs = claim(pond, binding_id) if free else []
        cancels, withdrawals = pond.store.to_send(binding_id)
        if jobs or cancels or withdrawals:
            pond.logs.notify()
            answer = {"jobs": jobs, "cancels": [{"job_id": c["id"], "attempt": c["attempt"], "worker": c["worker_id"]}
                                                for c in cancels]}
            if withdrawals:     # only when there are some: an answer without them is as it always was
                answer["withdrawals"] = [{"job_id": w["id"], "attempt": w["attempt"], "worker": w["worker_id"]}
                                         for w in withdrawals]
            yield answer
            continue
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            return
        pond.work.wait(snapshot, min(remaining, LIVENESS_CHECK), new_jobs=free)


def _reported_job(pond, req):
    """The job a report is about, if this binding holds its current attempt (fencing)."""
    job = pond.store.job_fence(req.params["id"])
    if job is None or job["binding_id"] != req.principal["id"]:
        raise NotFound(f"job {req.params['id'][:40]!r} is not assigned to this orchestrator",
                       "report only jobs this binding received from /v1/orch/poll")
    attempt = wire.number((req.body or {}).get("attempt") if isinstance(req.body, dict) else None,
                          "attempt", 1, 2**31, integer=True)
    if attempt is None:
        raise BadRequest("report: missing field 'attempt'", "echo the attempt from the assignment")
    claim_token = req.headers.get("X-Claim-Token")
    if not claim_token:
        raise Unauthorized("missing X-Claim-Token header", "echo the claim_token from the assignment")
    if attempt != job["attempt"] or not tokens.matches(claim_token, job["claim_hash"]):
        raise StaleAttempt(f"job {job['id']}: attempt {attempt} is not the current attempt "
                           f"({job['attempt']}) or its claim token does not match",
                           "drop this report: the job was reassigned or cancelled")
    return job, attempt


def report_state(pond, req):
    """POST /v1/orch/jobs/{id}/state: running, or a final state with exit code, trailing output and attestation."""
    job, attempt = _reported_job(pond, req)
    body = wire.obj(req.body, "state report", ("attempt", "state", "exit_code", "error", "chunks", "attestation",
                                               "dropped", "requeue"), ("attempt", "state"))
    if not isinstance(body["state"], str) or body["state"] not in {s.value for s in REPORT_STATES}:
        raise BadRequest(f"state {str(body['state'])[:40]!r} cannot be reported",
                         "one of: " + ", ".join(s.value for s in REPORT_STATES))
    to_state = JobState(body["state"])
    exit_code = wire.number(body.get("exit_code"), "exit_code", -255, 255, integer=True)
    error = wire.optional_string(body.get("error"), "error", max_len=2000)
    _check_outcome(to_state, exit_code, error)
    chunks = wire.chunks(body.get("chunks"))
    envelope = _envelope(body.get("attestation"))
    dropped = _dropped(body.get("dropped"))
    if job["state"] == to_state.value:
        return 200, {"job": job["id"], "state": job["state"], "duplicate": True}
    if body.get("requeue") is not None:
        return _requeue(pond, job, body["requeue"], to_state, exit_code, error)
    if to_state not in TRANSITIONS[JobState(job["state"])]:
        raise InvalidTransition(job["id"], job["state"], to_state.value)     # before storing its output
    if to_state is JobState.RUNNING:
        if chunks:
            pond.store.add_chunks(job["id"], attempt, chunks)
        transition(pond.store, job, to_state, started_at=pond.now())
    else:
        _finish(pond, job, attempt, to_state, exit_code, error, chunks, envelope, dropped)
        pond.work.notify()        # a slot is free
    pond.logs.notify()
    return 200, {"job": job["id"], "state": to_state.value}


def _requeue(pond, job, requeue, to_state, exit_code, error):
    """A worker that could not start the job (an agent job whose harness it lacks): a new attempt,
    on another worker if one fits, up to max_attempts (specs/protocol.md §5), instead of a failure.
    One pond asked back (_withdraw) is queued again whatever its attempts: it did not fail.
    Unsigned: a relay could only delay the job this way, which it can by not relaying at all."""
    if requeue is not True or to_state is not JobState.FAILED or exit_code is not None or not error:
        raise BadRequest("requeue is true, on a failed report with an error and no exit_code",
                         "send it only for a job the worker could not start")
    job = pond.store.job(job["id"])
    if job["withdraw"]:       # pond asked for it back (_withdraw): it did not fail, it goes where a slot is free
        ended = end_attempt(pond, job, "withdrawn", f"worker {job['worker_id']}: {error}", retry_always=True)
    else:
        ended = end_attempt(pond, job, "cannot_start", f"worker {job['worker_id']}: {error}")
    if ended:
        _attempts_ended(pond)
    return 200, {"job": job["id"], "state": pond.store.job(job["id"])["state"], "requeued": True}


def _envelope(value):
    """The attestation of a final report: None, or a DSSE envelope of bounded size (checked by attestation.py)."""
    if value is None:
        return None
    if not isinstance(value, dict) or len(wire.canonical_json(value)) > MAX_ENVELOPE:
        raise BadRequest(f"attestation must be a DSSE envelope (a JSON object) of at most {MAX_ENVELOPE} bytes",
                         "send the envelope the worker signed, unchanged")
    return value


def _dropped(value):
    """{stdout, stderr}: bytes the worker's log cap left out of each stream (zeros when absent)."""
    out = dict(attestation.NOTHING_DROPPED)
    if value is None:
        return out
    value = wire.obj(value, "dropped", tuple(out))
    for stream, n in value.items():
        out[stream] = wire.number(n, f"dropped.{stream}", 0, 2 ** 53, integer=True)
    return out


def _finish(pond, job, attempt, state, exit_code, error, chunks, envelope, dropped):
    """Record a final report, in one transaction with its trailing output, once its result is verified.

    A refused result changes nothing: its output is not stored, the job keeps its state,
    and the refusal is kept as an event on the job and on the worker for the operator.
    """
    worker = _worker(pond, job)
    try:
        with pond.store.transaction():
            if chunks:
                pond.store.add_chunks(job["id"], attempt, chunks)
            signed = _verify_result(pond, job, attempt, worker, (state.value, exit_code, error), envelope, dropped)
            outputs = artifacts.signed(pond, job["id"], attempt, signed) if signed else None
            if state is JobState.FAILED and exit_code is not None and _retry(pond, job, attempt, exit_code):
                return
            transition(pond.store, job, state, started_at=job["started_at"] or pond.now(), finished_at=pond.now(),
                       exit_code=exit_code, error=error, attestation=wire.canonical(envelope) if signed is not None else None,
                       dropped=wire.canonical(dropped) if any(dropped.values()) else None,
                       outputs=wire.canonical(outputs) if outputs else None)
    except Forbidden as e:
        if e.code == "attestation_failed":
            _result_refused(pond, job, attempt, worker, e.detail)
        raise


def _retry(pond, job, attempt, exit_code):
    """A job that ran and failed is run again only if it asked (`retries`): -> whether it was queued
    again. Its failed attempt's output stays, under that attempt's number."""
    if not pond.store.take_retry(job["id"]):
        return False
    requeue(pond.store, job, (pond.store.job(job["id"])["tried"] or []) + [job["worker_id"]])
    pond.store.add_job_event(job["id"], {"at": pond.now(), "event": "retried", "attempt": attempt,
                                         "worker": job["worker_id"], "exit_code": exit_code,
                                         "message": f"attempt {attempt} failed with exit code {exit_code}; "
                                                    "run again (the job asked for retries)"})
    pond.work.notify(new_job=True)
    return True


def _worker(pond, job):
    for w in pond.store.workers(job["binding_id"]):      # cached: no query per report
        if w["id"] == job["worker_id"]:
            return w
    return pond.store.worker(job["worker_id"]) or {"id": job["worker_id"], "fingerprint": None}


def _verify_result(pond, job, attempt, worker, outcome, envelope, dropped):
    """{name: sha256} of the artifacts it names: the report's attestation verifies against the worker's
    pinned key, for this job, attempt, output and outcome. None: it may be recorded unsigned. Refused otherwise.

    Unsigned is allowed only for a job that never ran (no exit code, no output: cancelled
    before it started, refused by its worker) or, with --allow-unsigned-results, for a
    worker without pinned keys. A pinned worker's result is never taken unsigned.
    """
    def never_ran():
        return outcome[1] is None and outcome[0] != JobState.DONE.value and not pond.store.has_output(job["id"], attempt)

    if worker.get("revoked_at") is not None:
        raise attestation.refused(f"worker {worker['id']} was revoked; its results are not recorded")
    if not worker["fingerprint"]:
        if pond.settings.allow_unsigned or never_ran():
            return None
        raise attestation.refused(f"worker {worker['id']} has no pinned keys and pond takes only signed results")
    if envelope is None:
        if never_ran():
            return None
        raise attestation.refused("the result of a pinned worker carries no attestation")
    statement = attestation.verify_envelope(base64.b64decode(worker["ed25519_public"]), envelope)
    output = pond.store.output(job["id"], attempt)
    parts = pond.store.job_spec_parts(job["id"])
    source = bundles.spec_source(parts["source"])
    predicate = attestation.check_statement(statement, job["id"], attempt, worker["fingerprint"], output["stdout"],
                                            output["stderr"], command=parts["command"], outcome=outcome,
                                            dropped=dropped, sandbox=parts["sandbox"], source=source, artifacts=True,
                                            spec=_agent_spec(parts, source))
    if parts["broker"] is not None:
        pond.store.set_job_usage(job["id"], predicate["usage"])
    return {s["name"]: s["digest"]["sha256"] for s in statement["subject"] if s["name"] not in ("stdout", "stderr")}


def _agent_spec(parts, source):
    """The job spec digest a signed result must name: an agent job's only (its files and broker are in it)."""
    if parts["files"] is None and parts["broker"] is None:
        return None
    return sealing.job_spec(parts["command"], parts["env"], parts["sandbox"], parts["files"], parts["broker"],
                            source=source)


def _result_refused(pond, job, attempt, worker, detail):
    event = {"at": pond.now(), "event": "result_refused", "job": job["id"], "attempt": attempt,
             "worker": worker["id"], "detail": detail,
             "message": f"result of job {job['id']} attempt {attempt} refused: {detail}"}
    pond.store.add_job_event(job["id"], event)
    pond.metrics.refused.add("attestation_failed")
    if pond.store.worker(worker["id"]):
        pond.store.add_worker_event(worker["id"], event)
    pond.log.warning("job %s attempt %d: result refused, not recorded: %s", job["id"], attempt, detail,
                     extra={"job": job["id"], "event": "result_refused", "attempt": attempt, "worker": worker["id"]})


def heartbeat(pond, req):
    """POST /v1/orch/heartbeat {jobs: [{job_id, attempt, claim_token}], released?: [same]}: renew the
    leases of the attempts this binding's workers hold, and end at once those it released because
    their worker was lost (specs/protocol.md §4). -> {renewed, stale: [job_id], released}: the
    orchestrator stops the stale ones (they were requeued, cancelled or ended)."""
    body = wire.obj(req.body, "heartbeat", ("jobs", "released"), ("jobs",))
    held, lost = _attempts(body["jobs"], "jobs"), _attempts(body.get("released", []), "released")
    stale = pond.store.renew_leases(req.principal["id"], held, pond.now() + pond.settings.lease) if held else []
    released = 0
    for job in pond.store.held_attempts(req.principal["id"], lost) if lost else ():
        released += end_attempt(pond, job, "worker_lost", f"worker {job['worker_id']} lost on attempt "
                                f"{job['attempt']} (released by its orchestrator)")
    if released:
        _attempts_ended(pond)
    return 200, {"renewed": len(held) - len(stale), "stale": stale, "released": released,
                 "lease": pond.settings.lease}


def _attempts(items, where):
    """[{job_id, attempt, claim_token}] -> [(job id, attempt, SHA-256 of the claim token)]."""
    if not isinstance(items, list) or len(items) > MAX_HEARTBEAT:
        raise BadRequest(f"heartbeat.{where} must be a list of at most {MAX_HEARTBEAT}", "send several heartbeats")
    out = []
    for i, item in enumerate(items):
        fields = ("job_id", "attempt", "claim_token")
        item = wire.obj(item, f"{where}[{i}]", fields, fields)
        out.append((wire.string(item["job_id"], f"{where}[{i}].job_id", 64, wire.ID_RE),
                    wire.number(item["attempt"], f"{where}[{i}].attempt", 1, 2**31, integer=True),
                    tokens.digest(wire.string(item["claim_token"], f"{where}[{i}].claim_token", 128))))
    return out


def expire_leases(pond):
    """The reaper's part: an attempt whose lease ran out is over. Its job is queued again for a
    new attempt (on another worker if one fits), or fails once it has had max_attempts; a job
    whose cancel was asked for ends cancelled. Reports of the old attempt are refused from now
    on (fencing), so a worker that was only slow cannot overwrite the new attempt's result."""
    changed = 0
    for job in pond.store.expired_leases(pond.now()):
        changed += end_attempt(pond, job, "lease_expired",
                               f"lease expired on attempt {job['attempt']} (worker {job['worker_id']})")
    if changed:
        _attempts_ended(pond)
    return changed


def _attempts_ended(pond):
    """Jobs went back to the queue (or ended): wake held polls and log followers."""
    pond.work.notify()
    pond.work.notify(new_job=True)
    pond.logs.notify()


def end_attempt(pond, job, event_name, why, retry_always=False):
    """Take an attempt away from its worker: requeue the job for a new attempt, or end it (a
    cancel was asked for, or it had its max_attempts). -> 1 if the job changed, 0 if a report
    got there first. Reports of the old attempt are refused from now on (fencing)."""
    tried = (job["tried"] or []) + [job["worker_id"]]
    event = {"at": pond.now(), "event": event_name, "attempt": job["attempt"], "worker": job["worker_id"],
             "message": why}
    try:
        with pond.store.transaction():      # the new state with its reason: a reader never sees one alone
            if job["cancel_requested"]:
                transition(pond.store, job, JobState.CANCELLED, finished_at=pond.now(),
                           error=f"cancelled; {why} before it confirmed")
            elif job["attempt"] >= pond.settings.max_attempts and not retry_always:
                transition(pond.store, job, JobState.FAILED, finished_at=pond.now(),
                           error=f"{why}; gave up after {job['attempt']} attempt(s)")
            else:
                requeue(pond.store, job, tried)
            pond.store.add_job_event(job["id"], event)
    except InvalidTransition:
        return 0
    pond.metrics.ended.add(event_name)
    pond.log.warning("job %s: %s", job["id"], why, extra={"job": job["id"], "event": event_name,
                                                          "attempt": job["attempt"], "worker": job["worker_id"]})
    return 1


def expire_overdue(pond):
    """The timeout backstop: a job still not ended BACKSTOP_MARGIN after its effective timeout
    (sandbox.effective_timeout) and grace (the worker enforces both) fails here, and the next
    heartbeat tells its orchestrator to stop it. With --assign-ahead, a job not yet started may be
    waiting on its worker for a slot, which its timeout does not count: only started ones fail here."""
    failed = 0
    # Half a lease at most: a worker that went silent loses its lease first anyway.
    for job in pond.store.overdue_jobs(pond.now(), min(BACKSTOP_MARGIN, pond.settings.lease / 2),
                                       started_only=pond.settings.assign_ahead > 0):
        try:
            transition(pond.store, job, JobState.FAILED, finished_at=pond.now(),
                       error=f"timed out after {sandbox.effective_timeout(job):g} s; its worker did not report the end "
                             f"(pond's backstop)")
        except InvalidTransition:
            continue
        pond.log.warning("job %s: past its timeout and not ended by worker %s; failed by pond",
                         job["id"], job["worker_id"])
        failed += 1
    if failed:
        pond.work.notify()
        pond.logs.notify()


def seal(pond, req):
    """POST /v1/orch/jobs/{id}/seal {attempt} (X-Claim-Token): the job's credential, sealed to the
    pinned X25519 key of the worker the attempt was assigned to (credentials.seal_for)."""
    job, attempt = _reported_job(pond, req)
    wire.obj(req.body, "seal", ("attempt",), ("attempt",))
    if JobState(job["state"]) not in (JobState.ASSIGNED, JobState.RUNNING):
        raise StaleAttempt(f"job {job['id']} is {job['state']}; nothing is sealed for it any more", "drop the job")
    if not job["credential"]:
        raise BadRequest(f"job {job['id']} names no credential", "ask for a seal only when the assignment names one")
    answer = credentials.seal_for(pond, pond.store.job(job["id"]), pond.store.worker(job["worker_id"]), attempt)
    pond.store.add_job_event(job["id"], {"at": pond.now(), "event": "sealed", "attempt": attempt,
                                         "credential": answer["credential"], "fingerprint": answer["fingerprint"]})
    return 200, answer


def _check_outcome(state, exit_code, error):
    if state is JobState.DONE and exit_code != 0:
        raise BadRequest("a done report needs exit_code 0", "report failed for a non-zero exit code")
    if state is JobState.FAILED and exit_code in (None, 0) and not error:
        raise BadRequest("a failed report needs a non-zero exit_code or an error")


def report_batch(pond, req):
    """POST /v1/orch/reports: many jobs' reports in one request, each handled in order as if it
    came alone to /v1/orch/jobs/{id}/state or /chunk; -> one result per report, never failing
    the others (specs/protocol.md §5)."""
    body = wire.obj(req.body, "reports", ("reports",), ("reports",))
    if not isinstance(body["reports"], list) or not 1 <= len(body["reports"]) <= MAX_BATCH:
        raise BadRequest(f"reports must be a list of 1 to {MAX_BATCH} reports",
                         "send the oldest reports first, at most that many at once")
    results = []
    with pond.work.deferred(), pond.logs.deferred():
        for item in body["reports"]:
            results.append(_report_one(pond, req, item))
    return 200, {"results": results}


def _report_one(pond, req, item):
    try:
        item = wire.obj(item, "report", ("job_id", "claim_token", "kind", "body"), ("job_id", "claim_token", "kind"))
        kind = item["kind"] if isinstance(item["kind"], str) else None    # a list is no dict key
        handler = {"state": report_state, "chunk": report_chunk}.get(kind)
        if handler is None or not isinstance(item["job_id"], str) or not isinstance(item["claim_token"], str):
            raise BadRequest("a report has kind state or chunk, and string job_id and claim_token",
                             "echo them from the assignment")
        one = dataclasses.replace(req, params={"id": item["job_id"]}, body=item.get("body"),
                                  headers={"X-Claim-Token": item["claim_token"]})
        status, answer = handler(pond, one)
        return {"status": status, **answer}
    except PondError as e:
        return {"status": e.status, **e.to_json()}


def report_chunk(pond, req):
    """POST /v1/orch/jobs/{id}/chunk: one piece of output; a repeated (stream, seq) is stored once."""
    job, attempt = _reported_job(pond, req)
    body = wire.obj(req.body, "chunk", ("attempt", "stream", "seq", "data"), ("attempt", "stream", "seq", "data"))
    chunks = wire.chunks([{k: body[k] for k in ("stream", "seq", "data")}])
    if JobState(job["state"]) in TERMINAL:
        raise StaleAttempt(f"job {job['id']} has ended; late output is refused", "drop this chunk")
    pond.store.add_chunks(job["id"], attempt, chunks)
    pond.logs.notify()
    return 200, {"job": job["id"], "stored": True}

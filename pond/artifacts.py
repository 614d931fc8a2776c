"""Artifacts: files a job hands back (declared paths under /work, and changes.patch), signed by its worker.

    worker ──▶ orchestrator ── POST /v1/orch/jobs/{id}/artifacts {attempt, name, size, sha256, offset, data}
                                   (pieces of at most 1 MiB, before the final report)
    final report: each artifact's sha256 is a subject of the signed attestation; pond records the
                  ones the signature names (the job's `outputs`), and only once they are all here
    client ── GET /v1/jobs/{id}/artifacts[/{name}?offset=N] ──▶ the list, or a piece of one

specs/bundles.md §6 is normative.
"""

import re

from pond import blobs, bundles, wire
from pond.errors import BadRequest, Conflict, Gone, NotFound, PayloadTooLarge, StaleAttempt

PATCH = "changes.patch"
# An artifact's name: changes.patch, or work/<path relative to /work>, plain characters only.
NAME_RE = re.compile(r"^(?!.*/\.\.?(/|\Z)|.*//|.*/\Z)"
                     r"(changes\.patch|work/[A-Za-z0-9._+@=-][A-Za-z0-9._+@=/-]{0,250})\Z")
PATTERN_RE = re.compile(r"^(?!(.*/)?\.\.(/|\Z))[A-Za-z0-9._+@=*?\[\]/-]{1,200}\Z")
MAX_PATTERNS = 32
MAX_ARTIFACTS = 64                     # per attempt
DEFAULT_CAP = 16 * 1024 * 1024         # bytes per artifact, unless the job says
MAX_CAP = 256 * 1024 * 1024
MIN_CAP = 1024


def patterns(value):
    """A job's `artifacts` at submit: paths or globs relative to /work (or starting /work/), no `..`."""
    if value is None:
        return []
    if not isinstance(value, list) or len(value) > MAX_PATTERNS:
        raise BadRequest(f"artifacts must be a list of at most {MAX_PATTERNS} paths or globs under /work",
                         'example: ["out/*.json", "/work/report.md"]')
    for i, item in enumerate(value):
        wire.string(item, f"artifacts[{i}]", 200, PATTERN_RE,
                    "a relative path or glob under /work: letters, digits, . _ - + @ = / * ? [ ], no ..")
    return sorted(set(value))


def cap(value):
    return wire.number(value, "artifact_cap", MIN_CAP, MAX_CAP, integer=True, default=DEFAULT_CAP)


def _key(job_id, attempt, name):
    return f"artifacts/{job_id}/{attempt}/{name}"


def upload(pond, req):
    """POST /v1/orch/jobs/{id}/artifacts: one piece of one artifact of the attempt the binding holds."""
    from pond.dispatch import _reported_job
    from pond.jobs import JobState
    job, attempt = _reported_job(pond, req)
    body = wire.obj(req.body, "artifact", ("attempt", "name", "size", "sha256", "offset", "data"),
                    ("attempt", "name", "size", "sha256", "offset", "data"))
    if JobState(job["state"]) not in (JobState.ASSIGNED, JobState.RUNNING):
        raise StaleAttempt(f"job {job['id']} has ended; late artifacts are refused", "drop this artifact")
    name = wire.string(body["name"], "name", 256, NAME_RE, "changes.patch, or work/<path under /work>")
    full = pond.store.job(job["id"])
    limit = full["artifact_cap"] or DEFAULT_CAP
    size = wire.number(body["size"], "size", 0, 2**53, integer=True)
    if size > limit:
        raise PayloadTooLarge(f"artifact {name} of {size} bytes is over the job's artifact cap of {limit} bytes",
                              "write less, or submit the job with a larger artifact_cap", code="artifact_too_large")
    sha256 = wire.string(body["sha256"], "sha256", 64, bundles.HEX64_RE, "lowercase hex SHA-256")
    offset = wire.number(body["offset"], "offset", 0, size, integer=True)
    data = wire.b64decode(body["data"], "data")
    row = pond.store.artifact(job["id"], attempt, name)
    store, key = blobs.for_store(pond), _key(job["id"], attempt, name)
    if offset == 0 and (row is None or row["received"] != 0 or (row["size"], row["sha256"]) != (size, sha256)):
        if row is None and len(pond.store.artifacts_of(job["id"], attempt)) >= MAX_ARTIFACTS:
            raise PayloadTooLarge(f"job {job['id']} attempt {attempt} has {MAX_ARTIFACTS} artifacts already",
                                  "declare fewer files", code="artifact_too_large")
        store.delete(key)                     # a new start: what came before goes
        pond.store.add_artifact(job["id"], attempt, name, size, sha256)
        row = pond.store.artifact(job["id"], attempt, name)
    if (row["size"], row["sha256"]) != (size, sha256) or offset != row["received"] or offset + len(data) > size:
        raise Conflict(f"artifact {name}: a piece at offset {offset} does not follow the {row['received']} bytes "
                       f"received of {row['size']}", "start the artifact again at offset 0", code="offset_mismatch")
    received = store.append(key, offset, data)
    if received == size and blobs.sha256(store, key) != sha256:
        store.delete(key)
        pond.store.add_artifact(job["id"], attempt, name, size, sha256)
        raise BadRequest(f"artifact {name}: what arrived does not have the sha256 announced; it was dropped",
                         "send it again from offset 0", code="bundle_invalid")
    pond.store.artifact_received(job["id"], attempt, name, received)
    return 200, {"name": name, "received": received, "complete": received == size}


def signed(pond, job_id, attempt, subjects):
    """The artifacts a verified statement names ({name: sha256} of its subjects but stdout and
    stderr), each complete in the store with that digest -> [{name, size, sha256}] to record.
    Raises attestation_failed otherwise (the caller's transaction changes nothing)."""
    from pond import attestation
    out = []
    for name, digest in sorted(subjects.items()):
        row = pond.store.artifact(job_id, attempt, name)
        if row is None or row["received"] != row["size"] or row["sha256"] != digest:
            raise attestation.refused(f"the statement names artifact {name[:80]!r}, which pond does not hold "
                                      "complete with that sha256")
        out.append({"name": name, "size": row["size"], "sha256": digest})
    return out


def _recorded(pond, job_id):
    from pond.jobs import _find
    job = _find(pond, job_id)
    return job, {a["name"]: a for a in job["outputs"] or []}


def list_all(pond, req):
    """GET /v1/jobs/{id}/artifacts: the artifacts of the job's recorded result, as its worker signed them."""
    job, recorded = _recorded(pond, req.params["id"])
    return 200, {"job": job["id"], "attempt": job["attempt"], "artifacts": list(recorded.values())}


def get(pond, req):
    """GET /v1/jobs/{id}/artifacts/{name}?offset=N: a piece (at most 1 MiB) of one recorded artifact."""
    job, recorded = _recorded(pond, req.params["id"])
    item = recorded.get(req.params["name"])
    if item is None:
        raise NotFound(f"job {job['id']} has no artifact {req.params['name'][:80]!r}",
                       "list them with `pond artifacts ID`")
    raw = req.query.get("offset", "0")
    if not (raw.isascii() and raw.isdigit()) or int(raw) > item["size"]:
        raise BadRequest(f"offset={raw[:20]!r} must be a whole number from 0 to {item['size']}")
    if pond.store.artifact(job["id"], job["attempt"], item["name"]) is None:
        raise Gone(f"job {job['id']}: artifact {item['name'][:80]} was deleted {pond.settings.artifact_retention:g} s "
                   "after the job ended (pond's --artifact-retention)", "run the job again to have it anew",
                   code="expired")
    data = blobs.for_store(pond).read(_key(job["id"], job["attempt"], item["name"]), int(raw), bundles.PIECE)
    return 200, {**item, "offset": int(raw), "data": wire.b64encode(data)}

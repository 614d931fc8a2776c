"""Which worker may take which job, and why a job waits.

A job's required tags must be a subset of the worker's tags; each required
capability must match one of the worker's capability globs (fnmatch-style, case
sensitive: `harness.*` matches `harness.codex`). specs/matching.md states the rule and
specs/vectors/matching.json holds the cases both pond and swarm.py are tested on.
"""

from fnmatch import fnmatchcase

from pond.wire import canonical

SANDBOX_PREFIX = "sandbox."      # a job's sandbox.<backend> capability (pond/sandbox.py)
TENANT_PREFIX = "tenant:"        # a byo job's tenant:<tenant> tag (specs/sandbox.md)
POLL_SILENCE = 15.0              # s without a held poll before a queued job says its orchestrator does not poll


def requirement_key(tags, capabilities, sealed=False):
    """Jobs with equal keys have equal requirements; the queue is grouped by it.

    `sealed`: the job names a credential, so only a worker with pinned keys may take it.
    """
    return canonical([sorted(tags), sorted(capabilities)] + (["sealed"] if sealed else []))


def capability_matches(globs, capability):
    return any(fnmatchcase(capability, glob) for glob in globs)


def missing(worker, tags, capabilities):
    """(tags the worker lacks, capabilities none of its globs match)."""
    have = set(worker["tags"])
    return ([t for t in sorted(tags) if t not in have],
            [c for c in sorted(capabilities) if not capability_matches(worker["capabilities"], c)])


def matches(worker, tags, capabilities):
    lacks_tags, lacks_caps = missing(worker, tags, capabilities)
    return not lacks_tags and not lacks_caps


def needs_keys(job, allow_unsigned):
    """Whether only a worker with pinned keys may take the job: it names a credential or a source
    (sealed to the worker's key) or artifacts (recorded only when signed), or pond accepts only
    signed results (the default)."""
    return bool(job["credential"] or job.get("source") or job.get("artifacts")) or not allow_unsigned


def explain(job, workers, active, allow_unsigned=False, silent=None):
    """Why a queued job has not started: {verdict, reason, online, matching, free, evicted, lacks}.
    `silent`: orchestrator (binding) id -> seconds since it last held a poll, for those quiet too
    long (issue 9: a poll loop that died left jobs "starting on the next poll" that never came).
    The one place that says why a job waits: over all workers for `waiting`, and over each pool's
    workers for GET /v1/jobs/{id}/explain (pools() below). specs/matching.md §5."""
    tags, caps = job["tags"], job["capabilities"]
    enrolled = workers
    workers = [w for w in workers if w.get("evicted_at") is None]      # they take nothing new, whatever they fit
    evicted_fit = [w for w in enrolled if w.get("evicted_at") is not None and matches(w, tags, caps)]
    out = dict(verdict=None, reason=None, online=0, matching=0, free=0, evicted=len(enrolled) - len(workers),
               lacks=None)
    if needs_keys(job, allow_unsigned):
        unpinned = [w for w in workers if w["online"] and not w["fingerprint"] and matches(w, tags, caps)]
        workers = [w for w in workers if w["fingerprint"]]
        if unpinned and not any(w["online"] and matches(w, tags, caps) for w in workers):
            why = ("it names a credential, a source or artifacts: only a pinned worker opens or signs them"
                   if job["credential"] or job.get("source") or job.get("artifacts") else
                   "pond accepts only signed results (pond serve --allow-unsigned-results lets them in)")
            return dict(out, verdict="unpinned", online=len(unpinned), lacks=_lacks([], [], [], pinned_keys=True),
                        reason=f"{len(unpinned)} matching worker(s) online, none with pinned keys: {why}; "
                        "enroll workers with the cryptography package installed")
    online = [w for w in workers if w["online"]]
    fit = [w for w in online if matches(w, tags, caps)]
    free = [w for w in fit if w["slots"] - active.get(w["id"], 0) > 0]
    out.update(online=len(online), matching=len(fit), free=len(free))
    if not workers and enrolled:
        verdict, reason = "evicted", (f"no worker is available: all {len(enrolled)} enrolled worker(s) are evicted; "
                                      "enroll another with a code from `pond admin enrollment-code`")
    elif not workers:
        verdict, reason = "no_workers", "no worker has enrolled; mint a code with `pond admin enrollment-code`"
    elif not online:
        verdict, reason = "offline", f"no worker is online ({len(workers)} enrolled, all offline)"
    elif free and all(w["binding_id"] in (silent or {}) for w in free):
        quiet = sorted({w["binding_id"] for w in free})
        verdict, reason = "silent", (f"a matching worker has a free slot, but its orchestrator ({', '.join(quiet)}) "
                                     f"has not polled for {min(silent[b] for b in quiet):.0f} s: see its /healthz "
                                     "or `swarm.py status`")
    elif free:
        verdict, reason = "free", "a matching worker has a free slot; the job starts on its orchestrator's next poll"
    elif fit:
        verdict, reason = "busy", f"all {len(fit)} matching workers are busy"
    else:
        verdict, reason = "lacks", "; ".join(_gaps(online, tags, caps))
        out["lacks"] = _lacks(online, tags, caps)
    offline_fit = [w for w in workers if not w["online"] and matches(w, tags, caps)]
    if offline_fit and not fit:
        reason += f" ({len(offline_fit)} matching worker(s) enrolled but offline)"
    if evicted_fit and not fit and workers:
        reason += f" ({len(evicted_fit)} matching worker(s) evicted)"
    return dict(out, verdict=verdict, reason=reason)


def _lacks(online, tags, caps, pinned_keys=False):
    """What no online worker has, by kind: {tags, tenant, capabilities, sandbox, pinned_keys}."""
    tags = [t for t in sorted(tags) if not any(t in w["tags"] for w in online)]
    caps = [c for c in sorted(caps) if not any(capability_matches(w["capabilities"], c) for w in online)]
    return {"tags": [t for t in tags if not t.startswith(TENANT_PREFIX)],
            "tenant": next((t.removeprefix(TENANT_PREFIX) for t in tags if t.startswith(TENANT_PREFIX)), None),
            "capabilities": [c for c in caps if not c.startswith(SANDBOX_PREFIX)],
            "sandbox": next((c.removeprefix(SANDBOX_PREFIX) for c in caps if c.startswith(SANDBOX_PREFIX)), None),
            "pinned_keys": pinned_keys}


def pools(job, workers, bindings, active, allow_unsigned=False, silent=None):
    """explain() for each orchestrator's pool, over its own workers: [{orchestrator, name, ...}]."""
    out = []
    for b in bindings:
        own = [w for w in workers if w["binding_id"] == b["id"]]
        if b["revoked_at"] is not None:
            answer = dict(explain(job, [], active), verdict="revoked",
                          reason="its orchestrator's binding is revoked: it takes no job")
        else:
            answer = explain(job, own, active, allow_unsigned, silent)
            outside = [t for t in sorted(job["tags"]) if b["scope"] and t not in b["scope"]]
            if outside and answer["verdict"] == "lacks":
                answer["reason"] += f" (its pool scope allows only tags {', '.join(b['scope'])})"
        out.append({"orchestrator": b["id"], "name": b["name"], "workers": len(own), **answer})
    return out


def _gaps(online, tags, caps):
    gaps = [f"no worker with tag {t}" for t in sorted(tags) if not any(t in w["tags"] for w in online)]
    gaps += [_sandbox_gap(online, c) if c.startswith(SANDBOX_PREFIX) else f"no worker with capability {c}"
             for c in sorted(caps) if not any(capability_matches(w["capabilities"], c) for w in online)]
    if not gaps:
        needs = ", ".join([*sorted(tags), *sorted(caps)])
        gaps.append(f"no single online worker has all of: {needs}")
    return gaps


def _sandbox_gap(online, capability):
    """No online worker enforces the job's sandbox backend: say what each orchestrator's workers do enforce.

    A worker advertises sandbox.<backend> only once its start-up preflight of that provider
    passed (specs/sandbox.md §6), so a missing provider is usually fixed on the worker host.
    """
    by_binding = {}
    for w in online:
        by_binding.setdefault(w["binding_id"], []).append(w)
    pools = []
    for binding, members in sorted(by_binding.items()):
        have = sorted({c for w in members for c in w["capabilities"] if c.startswith(SANDBOX_PREFIX)})
        count = f"{len(members)} online worker{'s' if len(members) > 1 else ''}"
        pools.append(f"pool {binding} has {count} " + (f"with {', '.join(have)} only" if have else "with no sandbox"))
    return (f"no worker enforces sandbox {capability.removeprefix(SANDBOX_PREFIX)}: " + ", ".join(pools)
            + "; a worker drops a sandbox whose start-up preflight failed, see its log")

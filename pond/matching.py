"""Which worker may take which job, and why a job waits.

A job's required tags must be a subset of the worker's tags; each required
capability must match one of the worker's capability globs (fnmatch-style, case
sensitive: `harness.*` matches `harness.codex`). specs/matching.md states the rule and
specs/vectors/matching.json holds the cases both pond and swarm.py are tested on.
"""

from fnmatch import fnmatchcase

from pond.wire import canonical

SANDBOX_PREFIX = "sandbox."      # a job's sandbox.<backend> capability (pond/sandbox.py)
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
    """Why a queued job has not started: {reason, online, matching, free}. `silent`: orchestrator
    (binding) id -> seconds since it last held a poll, for those quiet too long (issue 9: a poll
    loop that died left jobs "starting on the next poll" that never came)."""
    tags, caps = job["tags"], job["capabilities"]
    workers = [w for w in workers if w.get("evicted_at") is None]      # they take nothing new, whatever they fit
    if needs_keys(job, allow_unsigned):
        unpinned = [w for w in workers if w["online"] and not w["fingerprint"] and matches(w, tags, caps)]
        workers = [w for w in workers if w["fingerprint"]]
        if unpinned and not any(w["online"] and matches(w, tags, caps) for w in workers):
            why = ("it names a credential, a source or artifacts: only a pinned worker opens or signs them"
                   if job["credential"] or job.get("source") or job.get("artifacts") else
                   "pond accepts only signed results (pond serve --allow-unsigned-results lets them in)")
            return dict(reason=f"{len(unpinned)} matching worker(s) online, none with pinned keys: {why}; "
                        "enroll workers with the cryptography package installed", online=len(unpinned),
                        matching=0, free=0)
    online = [w for w in workers if w["online"]]
    fit = [w for w in online if matches(w, tags, caps)]
    free = [w for w in fit if w["slots"] - active.get(w["id"], 0) > 0]
    counts = {"online": len(online), "matching": len(fit), "free": len(free)}
    if not workers:
        reason = "no worker has enrolled; mint a code with `pond admin enrollment-code`"
    elif not online:
        reason = f"no worker is online ({len(workers)} enrolled, all offline)"
    elif free and all(w["binding_id"] in (silent or {}) for w in free):
        quiet = sorted({w["binding_id"] for w in free})
        reason = (f"a matching worker has a free slot, but its orchestrator ({', '.join(quiet)}) has not polled for "
                  f"{min(silent[b] for b in quiet):.0f} s: see its /healthz or `swarm.py status`")
    elif free:
        reason = "a matching worker has a free slot; the job starts on its orchestrator's next poll"
    elif fit:
        reason = f"all {len(fit)} matching workers are busy"
    else:
        reason = "; ".join(_gaps(online, tags, caps))
    offline_fit = [w for w in workers if not w["online"] and matches(w, tags, caps)]
    if offline_fit and not fit:
        reason += f" ({len(offline_fit)} matching worker(s) enrolled but offline)"
    return dict(reason=reason, **counts)


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

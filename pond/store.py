"""All of pond's SQL. Other modules call these named functions, never execute().

SQLite in WAL mode with synchronous=NORMAL: a commit survives a crash of pond's
process (kill -9 included); only an OS crash or power loss can take the last few
commits. One connection, guarded by a re-entrant lock; every write that must be
atomic (a claim, a code redemption, a state change) runs in one BEGIN IMMEDIATE
transaction and checks rowcount. pond/store_pg.py implements the same functions on
PostgreSQL for several pond replicas on one database: it runs this class's SQL where it is
portable (so the two cannot drift) and overrides the rest; the hooks subscribe(), claim_lock()
and reaper_turn() cost SQLite nothing.

JSON columns (tags, capabilities, command, env, sandbox, scope) are stored as text
and returned decoded; rows come back as plain dicts.

A disk or database error that may pass by itself (disk full, I/O error, locked) rolls the
transaction back and is raised as StorageUnavailable (503 storage_unavailable, logged once);
`failure` says since when, for /healthz, until a write succeeds again.
"""

import json
import logging
import os
import sqlite3
import threading
import time
from contextlib import contextmanager
from pathlib import Path

from pond.errors import StorageUnavailable
from pond.health import cleared, storage_failure, warn_once

SCHEMA_VERSION = 6

SCHEMA = """
CREATE TABLE IF NOT EXISTS pairing_codes (
    code_hash   TEXT PRIMARY KEY,
    name        TEXT NOT NULL,
    scope       TEXT NOT NULL,
    created_at  REAL NOT NULL,
    expires_at  REAL NOT NULL,
    used_at     REAL,
    binding_id  TEXT
);
CREATE TABLE IF NOT EXISTS bindings (
    id          TEXT PRIMARY KEY,
    name        TEXT NOT NULL,
    token_hash  TEXT NOT NULL,
    scope       TEXT NOT NULL,
    created_at  REAL NOT NULL,
    last_seen   REAL,
    revoked_at  REAL
);
CREATE TABLE IF NOT EXISTS enrollment_codes (
    code_hash   TEXT PRIMARY KEY,
    created_at  REAL NOT NULL,
    expires_at  REAL NOT NULL,
    uses_left   INTEGER NOT NULL,
    uses        INTEGER NOT NULL,
    tag_ceiling TEXT,
    fingerprint TEXT
);
CREATE TABLE IF NOT EXISTS workers (
    id           TEXT PRIMARY KEY,
    binding_id   TEXT NOT NULL,
    name         TEXT NOT NULL,
    tags         TEXT NOT NULL,
    capabilities TEXT NOT NULL,
    slots        INTEGER NOT NULL,
    online       INTEGER NOT NULL DEFAULT 0,
    enrolled_at  REAL NOT NULL,
    last_seen    REAL,
    x25519_public  TEXT,
    ed25519_public TEXT,
    fingerprint    TEXT,
    tag_ceiling    TEXT,
    revoked_at     REAL,
    events         TEXT,
    evicted_at     REAL,
    drain          INTEGER NOT NULL DEFAULT 0
);
CREATE INDEX IF NOT EXISTS workers_binding ON workers(binding_id);
CREATE TABLE IF NOT EXISTS jobs (
    seq              INTEGER PRIMARY KEY,
    id               TEXT NOT NULL UNIQUE,
    state            TEXT NOT NULL,
    name             TEXT,
    command          TEXT NOT NULL,
    env              TEXT NOT NULL,
    tags             TEXT NOT NULL,
    capabilities     TEXT NOT NULL,
    req_key          TEXT NOT NULL,
    sandbox          TEXT NOT NULL,
    timeout          REAL,
    created_at       REAL NOT NULL,
    assigned_at      REAL,
    started_at       REAL,
    finished_at      REAL,
    attempt          INTEGER NOT NULL DEFAULT 0,
    claim_hash       TEXT,
    worker_id        TEXT,
    binding_id       TEXT,
    exit_code        INTEGER,
    error            TEXT,
    cancel_requested INTEGER NOT NULL DEFAULT 0,
    cancel_sent      INTEGER NOT NULL DEFAULT 0,
    withdraw         INTEGER NOT NULL DEFAULT 0,
    credential       TEXT,
    attestation      TEXT,
    events           TEXT,
    lease_until      REAL,
    cancel_grace     REAL,
    log_cap          INTEGER,
    dropped          TEXT,
    retries_left     INTEGER NOT NULL DEFAULT 0,
    tried            TEXT,
    idempotency_key  TEXT,
    request_hash     TEXT,
    source           TEXT,
    artifacts        TEXT,
    artifact_cap     INTEGER,
    outputs          TEXT,
    files            TEXT,
    broker           TEXT,
    agent            TEXT,
    usage            TEXT
);
CREATE UNIQUE INDEX IF NOT EXISTS jobs_idempotency ON jobs(idempotency_key) WHERE idempotency_key IS NOT NULL;
CREATE INDEX IF NOT EXISTS jobs_queue ON jobs(state, req_key, seq);
CREATE INDEX IF NOT EXISTS jobs_binding ON jobs(binding_id, state);
-- The requirement groups (matching.requirement_key) that have a queued job: a job that
-- becomes queued adds its group, the last one to leave the queue drops it (_add_group,
-- _drop_group). A poll matches only the groups with a serial above the last it saw
-- (dispatch.Fits). AUTOINCREMENT: a serial is never reused, so a group that comes back is new.
CREATE TABLE IF NOT EXISTS queue_groups (
    serial       INTEGER PRIMARY KEY AUTOINCREMENT,
    req_key      TEXT NOT NULL UNIQUE,
    tags         TEXT NOT NULL,
    capabilities TEXT NOT NULL,
    sealed       INTEGER NOT NULL
);
CREATE TABLE IF NOT EXISTS chunks (
    id       INTEGER PRIMARY KEY,
    job_id   TEXT NOT NULL,
    attempt  INTEGER NOT NULL,
    stream   TEXT NOT NULL,
    seq      INTEGER NOT NULL,
    data     BLOB NOT NULL,
    UNIQUE (job_id, attempt, stream, seq)
);
CREATE INDEX IF NOT EXISTS chunks_job ON chunks(job_id, id);
CREATE TABLE IF NOT EXISTS credentials (
    name         TEXT PRIMARY KEY,
    provider     TEXT,
    env_names    TEXT NOT NULL,
    secret_names TEXT NOT NULL,
    ciphertext   BLOB NOT NULL,
    key_id       TEXT NOT NULL,
    created_at   REAL NOT NULL,
    updated_at   REAL NOT NULL
);
-- Source bundles (pond/bundles.py): the ciphertext is in the blob store, its data key here,
-- encrypted under the credential key. A one-time redeem token per attempt of a job with a source.
CREATE TABLE IF NOT EXISTS bundles (
    id          TEXT PRIMARY KEY,
    sha256      TEXT NOT NULL,
    size        INTEGER NOT NULL,
    received    INTEGER NOT NULL DEFAULT 0,
    complete    INTEGER NOT NULL DEFAULT 0,
    key_ct      BLOB NOT NULL,
    created_at  REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS source_tokens (
    job_id      TEXT NOT NULL,
    attempt     INTEGER NOT NULL,
    token_hash  TEXT NOT NULL,
    redeemed_at REAL,
    redeemed_by TEXT,
    PRIMARY KEY (job_id, attempt)
);
-- Artifacts a worker uploaded for an attempt (pond/artifacts.py), each a file in the blob store.
CREATE TABLE IF NOT EXISTS artifacts (
    job_id      TEXT NOT NULL,
    attempt     INTEGER NOT NULL,
    name        TEXT NOT NULL,
    size        INTEGER NOT NULL,
    sha256      TEXT NOT NULL,
    received    INTEGER NOT NULL DEFAULT 0,
    PRIMARY KEY (job_id, attempt, name)
);
-- Harnesses and models (pond/agents.py), each one validated JSON object under its key.
CREATE TABLE IF NOT EXISTS registry (
    kind        TEXT NOT NULL,
    key         TEXT NOT NULL,
    body        TEXT NOT NULL,
    created_at  REAL NOT NULL,
    updated_at  REAL NOT NULL,
    PRIMARY KEY (kind, key)
);
"""

# Every table, parents first: what `pond migrate-store` copies (store_pg.PgStore.copy_from).
TABLES = ("pairing_codes", "bindings", "enrollment_codes", "workers", "bundles", "jobs", "queue_groups", "chunks",
          "source_tokens", "artifacts", "credentials", "registry")
_JSON_COLUMNS = ("scope", "tags", "capabilities", "command", "env", "sandbox", "tag_ceiling", "events",
                 "attestation", "env_names", "secret_names", "tried", "dropped", "source", "artifacts", "outputs",
                 "files", "broker", "agent", "usage", "body")
# Columns added since schema 1, by table: an older pond.db gets them with ALTER TABLE when it is
# opened. Schema 2: pinned keys, enrollment ceiling, revocation, events of workers. Schema 3:
# eviction; a job's credential, attestation, events, lease, cancel grace, log cap, retries and
# idempotency key (and the credentials table, created above). Schema 4: a job's source, artifact
# patterns and cap, and the artifacts its result recorded (and the bundle and artifact tables); an
# agent job's runtime files, broker, agent request and usage (and the registry table). Schema 5:
# the worker that redeemed a source token (a lost answer is redeemed again by it alone). Schema 6:
# a job's withdrawal from a busy worker (WITHDRAW_ASKED, WITHDRAW_SENT; dispatch.claim).
ADDED_COLUMNS = {
    "source_tokens": (("redeemed_by", "TEXT"),),
    "workers": (("x25519_public", "TEXT"), ("ed25519_public", "TEXT"), ("fingerprint", "TEXT"),
                ("tag_ceiling", "TEXT"), ("revoked_at", "REAL"), ("events", "TEXT"), ("evicted_at", "REAL"),
                ("drain", "INTEGER NOT NULL DEFAULT 0")),
    "jobs": (("credential", "TEXT"), ("attestation", "TEXT"), ("events", "TEXT"), ("lease_until", "REAL"),
             ("cancel_grace", "REAL"), ("log_cap", "INTEGER"), ("dropped", "TEXT"),
             ("retries_left", "INTEGER NOT NULL DEFAULT 0"), ("tried", "TEXT"), ("idempotency_key", "TEXT"),
             ("request_hash", "TEXT"), ("source", "TEXT"), ("artifacts", "TEXT"), ("artifact_cap", "INTEGER"),
             ("outputs", "TEXT"), ("files", "TEXT"), ("broker", "TEXT"), ("agent", "TEXT"), ("usage", "TEXT"),
             ("withdraw", "INTEGER NOT NULL DEFAULT 0")),
}
WITHDRAW_ASKED, WITHDRAW_SENT = 1, 2      # jobs.withdraw: 0, none asked for this attempt
_GROUP_OF_JOB = ("req_key, tags, capabilities,"                         # a queue_groups row
                 " CASE WHEN COALESCE(credential, '') != '' OR source IS NOT NULL OR artifacts IS NOT NULL"
                 " THEN 1 ELSE 0 END")
_GROUP_EMPTY = "NOT EXISTS (SELECT 1 FROM jobs WHERE state = 'queued' AND jobs.req_key = queue_groups.req_key)"
MAX_EVENTS = 20           # per worker or job, newest last
# What ending an attempt (lease expiry, eviction) needs to know of a job.
ATTEMPT_COLUMNS = "id, state, attempt, worker_id, binding_id, tried, cancel_requested, started_at"


_ROW_PLANS = {}           # column names -> [(index, name) of the JSON columns], see _row


def _row(cursor, row):
    """A row as a dict, its JSON columns decoded. Which columns are JSON is worked out once per
    shape of row, not per column of every row: a job row has 42 columns, and every claim and
    report reads some (this was 13 % of pond's CPU a job)."""
    names = tuple(d[0] for d in cursor.description)
    plan = _ROW_PLANS.get(names)
    if plan is None:
        if len(_ROW_PLANS) > 256:                  # ad hoc queries (the console's filters) cannot grow it for good
            _ROW_PLANS.clear()
        plan = _ROW_PLANS[names] = [(i, name) for i, name in enumerate(names) if name in _JSON_COLUMNS]
    out = dict(zip(names, row))
    for i, name in plan:
        if row[i] is not None:
            out[name] = json.loads(row[i])
    return out


def _dump(value):
    return json.dumps(value, separators=(",", ":"), sort_keys=True)


class Store:
    """The SQLite store. Thread-safe; use transaction() to group writes atomically."""

    def __init__(self, path, readonly=False):
        self._lock = threading.RLock()
        self._depth = 0
        self.dir = Path(path).resolve().parent
        self.failure = None          # {error, since} while the database cannot be written
        # binding id -> its worker rows. Every claim reads them and only enrollment,
        # snapshots and the reaper change them, all through this object (on PostgreSQL, a
        # change made by another replica drops it: store_pg.py).
        self._workers_cache = {}
        if readonly:         # `pond verify`: read a state dir, running pond or not, and change nothing
            self._db = sqlite3.connect(f"{Path(path).resolve().as_uri()}?mode=ro", uri=True,
                                       isolation_level=None, check_same_thread=False)
            self._db.row_factory = _row
            version = self._db.execute("PRAGMA user_version").fetchone()["user_version"]
            if version != SCHEMA_VERSION:
                raise RuntimeError(f"{path} has schema {version}, not {SCHEMA_VERSION}: start this pond on it once")
            return
        # Job output (a secret a job printed, say) lives here: 0600, and SQLite gives the -wal
        # and -shm files the database's mode.
        os.close(os.open(path, os.O_WRONLY | os.O_CREAT, 0o600))
        os.chmod(path, 0o600)
        self._db = sqlite3.connect(str(path), isolation_level=None, check_same_thread=False)
        self._db.row_factory = _row
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=NORMAL")
        self._db.execute("PRAGMA busy_timeout=5000")
        with self.transaction():
            version = self._db.execute("PRAGMA user_version").fetchone()["user_version"]
            if version > SCHEMA_VERSION:
                raise RuntimeError(f"{path} has schema {version}; this pond knows up to {SCHEMA_VERSION}")
            self._migrate(version)       # first: SCHEMA's indexes may name columns an old file lacks
            for statement in SCHEMA.split(";"):
                if statement.strip():
                    self._db.execute(statement)
            # If a pond that did not keep queue_groups wrote this file last, they are set right here.
            self._db.execute(f"DELETE FROM queue_groups WHERE {_GROUP_EMPTY}")
            self._db.execute(f"INSERT INTO queue_groups (req_key, tags, capabilities, sealed)"
                             f" SELECT {_GROUP_OF_JOB} FROM jobs WHERE state = 'queued' ORDER BY seq"
                             f" ON CONFLICT DO NOTHING")
            self._db.execute(f"PRAGMA user_version={SCHEMA_VERSION}")

    def _migrate(self, version):
        """Bring an older schema up to SCHEMA_VERSION (inside the opening transaction)."""
        if version in (0, SCHEMA_VERSION):      # 0: a new file, made by SCHEMA as it is now
            return
        for table, columns in ADDED_COLUMNS.items():
            if not self._db.execute("SELECT 1 FROM sqlite_master WHERE name = ?", (table,)).fetchone():
                continue            # SCHEMA creates it whole
            have = {r["name"] for r in self._db.execute(f"PRAGMA table_info({table})").fetchall()}
            for name, kind in columns:
                if name not in have:
                    self._db.execute(f"ALTER TABLE {table} ADD COLUMN {name} {kind}")

    def close(self):
        with self._lock:
            self._db.close()

    @contextmanager
    def transaction(self):
        """One BEGIN IMMEDIATE transaction; nested calls join the outer one."""
        with self._lock:
            if self._depth:
                self._depth += 1
                try:
                    yield self
                finally:
                    self._depth -= 1
                return
            changes = self._db.total_changes
            try:
                self._db.execute("BEGIN IMMEDIATE")
                self._depth = 1
                yield self
                self._db.execute("COMMIT")      # on a full disk this fails, and SQLite has rolled back
            except BaseException as e:
                if self._db.in_transaction:
                    try:
                        self._db.execute("ROLLBACK")
                    except sqlite3.Error:
                        pass            # SQLite rolled back already (a full disk does)
                self._workers_cache.clear()     # it may hold rows read inside the rolled-back transaction
                if storage_failure(e) is None:
                    raise
                raise self._failed(e) from None
            finally:
                self._depth = 0
            if self.failure is not None and self._db.total_changes != changes:
                self._recovered()

    def _failed(self, e):
        """A disk or database error that may pass, kept for /healthz, logged once -> StorageUnavailable."""
        err = StorageUnavailable(f"pond cannot store this now: {storage_failure(e)}",
                                 f"free space under {self.dir}; pond recovers by itself: retry then")
        if self.failure is None:
            self.failure = {"error": err.message, "hint": err.hint, "since": round(time.time(), 3)}
        # Keyed by the message, as the loops' trouble is: one line for one failure, whoever meets it.
        warn_once(err.message, "storage: %s; free space under %s (pond answers 503 storage_unavailable until "
                  "it can write again)", err.message, self.dir)
        return err

    def _recovered(self):
        logging.getLogger("pond").info("storage: pond.db can be written again after %.0f s",
                                       time.time() - self.failure["since"])
        cleared(self.failure["error"])
        self.failure = None

    def probe(self):
        """While writes fail: try one (the header's user_version), so that /healthz clears without traffic."""
        if self.failure is not None:
            with self.transaction():
                self._db.execute(f"PRAGMA user_version={SCHEMA_VERSION}")
            self._recovered()

    # -- replicas: one pond process owns a SQLite file, so these do nothing here (store_pg.py) ----

    def subscribe(self, work, logs):
        """Wake these notifiers when another pond process changes the database: none can."""

    def claim_lock(self, binding_id):
        """Serialise claims for a binding (inside claim()'s transaction): BEGIN IMMEDIATE already does."""

    def reaper_turn(self):
        """Whether this process reaps expired leases and workers: the only one always does."""
        return True

    def _all(self, sql, args=()):
        with self._lock:
            try:
                return self._db.execute(sql, args).fetchall()
            except sqlite3.OperationalError as e:
                if storage_failure(e) is None:
                    raise
                raise self._failed(e) from None

    def _one(self, sql, args=()):
        with self._lock:
            try:
                return self._db.execute(sql, args).fetchone()
            except sqlite3.OperationalError as e:
                if storage_failure(e) is None:
                    raise
                raise self._failed(e) from None

    def _write(self, sql, args=()):
        with self.transaction():
            return self._db.execute(sql, args).rowcount

    def export(self, table):
        """(column names, rows as stored: JSON undecoded) of one of TABLES, for `pond migrate-store`."""
        with self._lock:
            cursor = self._db.cursor()
            cursor.row_factory = None
            cursor.execute(f"SELECT * FROM {table}")
            return [d[0] for d in cursor.description], cursor.fetchall()

    # -- pairing ---------------------------------------------------------------

    def add_pairing_code(self, code_hash, name, scope, now, expires_at):
        self._write("INSERT INTO pairing_codes (code_hash, name, scope, created_at, expires_at)"
                    " VALUES (?, ?, ?, ?, ?)", (code_hash, name, _dump(scope), now, expires_at))

    def pairing_code(self, code_hash):
        return self._one("SELECT * FROM pairing_codes WHERE code_hash = ?", (code_hash,))

    def use_pairing_code(self, code_hash, binding_id, now):
        """Mark a code used; False if someone else used it first."""
        return self._write("UPDATE pairing_codes SET used_at = ?, binding_id = ?"
                           " WHERE code_hash = ? AND used_at IS NULL",
                           (now, binding_id, code_hash)) == 1

    def add_binding(self, binding_id, name, token_hash, scope, now):
        self._write("INSERT INTO bindings (id, name, token_hash, scope, created_at) VALUES (?, ?, ?, ?, ?)",
                    (binding_id, name, token_hash, _dump(scope), now))

    def binding(self, binding_id):
        return self._one("SELECT * FROM bindings WHERE id = ?", (binding_id,))

    def bindings(self):
        return self._all(
            "SELECT b.id, b.name, b.scope, b.created_at, b.last_seen, b.revoked_at,"
            " (SELECT COUNT(*) FROM workers w WHERE w.binding_id = b.id) AS workers,"
            " (SELECT COUNT(*) FROM workers w WHERE w.binding_id = b.id AND w.online = 1) AS workers_online"
            " FROM bindings b ORDER BY b.created_at")

    def revoke_binding(self, binding_id, now):
        """Revoke a binding and take its workers offline; False if there is no such binding."""
        with self.transaction():
            if self._db.execute("UPDATE bindings SET revoked_at = COALESCE(revoked_at, ?) WHERE id = ?",
                                (now, binding_id)).rowcount != 1:
                return False
            self._worker_write("UPDATE workers SET online = 0 WHERE binding_id = ?", (binding_id,))
            return True

    def touch_binding(self, binding_id, now):
        self._write("UPDATE bindings SET last_seen = ? WHERE id = ?", (now, binding_id))

    # -- enrollment ------------------------------------------------------------

    def add_enrollment_code(self, code_hash, now, expires_at, uses, tag_ceiling, fingerprint):
        self._write("INSERT INTO enrollment_codes (code_hash, created_at, expires_at, uses_left, uses,"
                    " tag_ceiling, fingerprint) VALUES (?, ?, ?, ?, ?, ?, ?)",
                    (code_hash, now, expires_at, uses, uses,
                     None if tag_ceiling is None else _dump(tag_ceiling), fingerprint))

    def enrollment_code(self, code_hash):
        return self._one("SELECT * FROM enrollment_codes WHERE code_hash = ?", (code_hash,))

    def use_enrollment_code(self, code_hash):
        """Take one use of a code; False if none was left."""
        return self._write("UPDATE enrollment_codes SET uses_left = uses_left - 1"
                           " WHERE code_hash = ? AND uses_left > 0", (code_hash,)) == 1

    # -- workers ---------------------------------------------------------------

    def _worker_write(self, sql, args):
        with self.transaction():
            changed = self._db.execute(sql, args).rowcount
            if changed:         # the reaper's expire_workers, every 2 s, mostly changes nothing
                self._workers_cache.clear()
            return changed

    def add_worker(self, worker_id, binding_id, name, tags, capabilities, slots, now, keys=None, tag_ceiling=None):
        """keys: None (an unpinned worker) or (x25519 base64, ed25519 base64, fingerprint)."""
        x_pub, e_pub, fp = keys or (None, None, None)
        self._worker_write("INSERT INTO workers (id, binding_id, name, tags, capabilities, slots, online,"
                    " enrolled_at, last_seen, x25519_public, ed25519_public, fingerprint, tag_ceiling, events)"
                    " VALUES (?, ?, ?, ?, ?, ?, 0, ?, ?, ?, ?, ?, ?, '[]')",
                    (worker_id, binding_id, name, _dump(tags), _dump(capabilities), slots, now, now,
                     x_pub, e_pub, fp, None if tag_ceiling is None else _dump(tag_ceiling)))

    def refuse_worker(self, worker_id, event):
        """A snapshot entry was refused: the worker goes offline, keeps its row, and the event is kept."""
        self.add_worker_event(worker_id, event, offline=True)

    def _events_with(self, table, row_id, event):
        """The row's events with `event` appended, the newest MAX_EVENTS, as stored (inside a transaction)."""
        row = self._one(f"SELECT events FROM {table} WHERE id = ?", (row_id,))
        return _dump((((row or {}).get("events") or []) + [event])[-MAX_EVENTS:])

    def add_worker_event(self, worker_id, event, offline=False):
        with self.transaction():
            self._worker_write("UPDATE workers SET events = ?" + (", online = 0" if offline else "") + " WHERE id = ?",
                               (self._events_with("workers", worker_id, event), worker_id))

    def revoke_worker(self, worker_id, now):
        """Revoke a worker: offline for good; False if there is no such worker."""
        return self._worker_write("UPDATE workers SET revoked_at = COALESCE(revoked_at, ?), online = 0 WHERE id = ?",
                                  (now, worker_id)) == 1

    def evict_worker(self, worker_id, now, drain):
        """No new jobs for this worker, for good; False if there is no such worker."""
        return self._worker_write("UPDATE workers SET evicted_at = COALESCE(evicted_at, ?), drain = ? WHERE id = ?",
                                  (now, int(drain), worker_id)) == 1

    def held_jobs(self, worker_id):
        return self._all(f"SELECT {ATTEMPT_COLUMNS} FROM jobs WHERE worker_id = ? AND state IN ('assigned', 'running')",
                         (worker_id,))

    def worker(self, worker_id):
        return self._one("SELECT * FROM workers WHERE id = ?", (worker_id,))

    def workers(self, binding_id=None):
        """All workers, or one binding's (cached; callers must not change the rows)."""
        if binding_id is None:
            return self._all("SELECT * FROM workers ORDER BY enrolled_at")
        with self._lock:
            rows = self._workers_cache.get(binding_id)
            if rows is None:
                rows = self._workers_cache[binding_id] = self._all(
                    "SELECT * FROM workers WHERE binding_id = ? ORDER BY enrolled_at", (binding_id,))
            return rows

    def update_worker(self, worker_id, binding_id, tags, capabilities, slots, online, last_seen):
        return self._worker_write("UPDATE workers SET tags = ?, capabilities = ?, slots = ?, online = ?, last_seen = ?"
                           " WHERE id = ? AND binding_id = ? AND revoked_at IS NULL",
                           (_dump(tags), _dump(capabilities), slots, int(online), last_seen,
                            worker_id, binding_id)) == 1

    def set_workers_offline(self, binding_id, keep_ids):
        """Mark every worker of a binding that is not in keep_ids offline."""
        marks = ",".join("?" * len(keep_ids)) or "''"
        self._worker_write(f"UPDATE workers SET online = 0 WHERE binding_id = ? AND online = 1 AND id NOT IN ({marks})",
                    (binding_id, *keep_ids))

    def expire_workers(self, before):
        """Workers whose orchestrator has not listed them since `before` go offline."""
        return self._worker_write("UPDATE workers SET online = 0 WHERE online = 1 AND last_seen < ?", (before,))

    def active_counts(self, binding_id=None):
        """worker id -> number of its jobs that are assigned or running."""
        sql = "SELECT worker_id, COUNT(*) AS n FROM jobs WHERE state IN ('assigned', 'running')"
        args = ()
        if binding_id is not None:
            sql += " AND binding_id = ?"
            args = (binding_id,)
        return {r["worker_id"]: r["n"] for r in self._all(sql + " GROUP BY worker_id", args)}

    # -- jobs ------------------------------------------------------------------

    def add_job(self, job, req_key, idempotency_key=None, request_hash=None):
        """Insert a queued job; with an idempotency key, -> the job already stored under it, if any."""
        with self.transaction():
            if idempotency_key is not None:
                row = self._one("SELECT * FROM jobs WHERE idempotency_key = ?", (idempotency_key,))
                if row is not None:
                    return row
            self._db.execute(
                "INSERT INTO jobs (id, state, name, command, env, tags, capabilities, req_key, sandbox, timeout,"
                " cancel_grace, log_cap, retries_left, created_at, credential, events, tried, idempotency_key,"
                " request_hash, source, artifacts, artifact_cap, files, broker, agent)"
                " VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, '[]', '[]', ?, ?, ?, ?, ?, ?, ?, ?)",
                (job["id"], job["state"], job["name"], _dump(job["command"]), _dump(job["env"]),
                 _dump(job["tags"]), _dump(job["capabilities"]), req_key, _dump(job["sandbox"]),
                 job["timeout"], job["cancel_grace"], job["log_cap"], job["retries"], job["created_at"],
                 job["credential"], idempotency_key, request_hash,
                 None if job.get("source") is None else _dump(job["source"]),
                 _dump(job["artifacts"]) if job.get("artifacts") else None, job.get("artifact_cap"),
                 *(None if job.get(k) is None else _dump(job[k]) for k in ("files", "broker", "agent"))))
            self._add_group(job["id"])
            return None

    def job(self, job_id):
        return self._one("SELECT * FROM jobs WHERE id = ?", (job_id,))

    def job_fence(self, job_id):
        """What a report is checked against, without decoding the job's JSON columns."""
        return self._one("SELECT id, state, attempt, binding_id, claim_hash, started_at, worker_id, credential"
                         " FROM jobs WHERE id = ?", (job_id,))

    def job_command_sandbox(self, job_id):
        """(command, sandbox) of a job: what a signed result must name (attestation.check_statement)."""
        row = self._one("SELECT command, sandbox FROM jobs WHERE id = ?", (job_id,))
        return row["command"], row["sandbox"]

    def job_source(self, job_id):
        """A job's source {bundle, sha256, size}, or None: a signed result names it too."""
        return self._one("SELECT source FROM jobs WHERE id = ?", (job_id,))["source"]

    def job_spec_parts(self, job_id):
        """command, env, sandbox, files, broker and source of a job: what sealing.job_spec binds."""
        return self._one("SELECT command, env, sandbox, files, broker, source FROM jobs WHERE id = ?", (job_id,))

    def usage_jobs(self, since, until):
        """Agent jobs whose signed usage pond recorded, finished in [since, until): for GET /v1/usage."""
        return self._all("SELECT id, tags, agent, broker, usage, finished_at FROM jobs WHERE usage IS NOT NULL"
                         " AND finished_at >= ? AND finished_at < ? ORDER BY finished_at", (since, until))

    def set_job_usage(self, job_id, usage):
        """The model usage a verified result signed (an agent job's broker counted it)."""
        self._write("UPDATE jobs SET usage = ? WHERE id = ?", (_dump(usage), job_id))

    def add_job_event(self, job_id, event):
        """Keep an event on the job (a refused result, a seal) for its operator; the newest MAX_EVENTS."""
        with self.transaction():
            self._db.execute("UPDATE jobs SET events = ? WHERE id = ?", (self._events_with("jobs", job_id, event), job_id))

    HAS_TAG = "EXISTS (SELECT 1 FROM json_each(tags) WHERE value = ?)"       # store_pg.py: PostgreSQL's

    def jobs(self, state=None, limit=100, tag=None, worker=None):
        """The newest `limit` jobs, of `state`, requiring `tag`, last run by `worker`: each one given."""
        given = [(sql, value) for sql, value in (("state = ?", state), (self.HAS_TAG, tag), ("worker_id = ?", worker))
                 if value is not None]
        where = " WHERE " + " AND ".join(sql for sql, _ in given) if given else ""
        return self._all(f"SELECT * FROM jobs{where} ORDER BY seq DESC LIMIT ?", (*(v for _, v in given), limit))

    def job_counts(self):
        return {r["state"]: r["n"] for r in self._all("SELECT state, COUNT(*) AS n FROM jobs GROUP BY state")}

    def queue_depths(self, limit):
        """-> (requirement groups with a queued job, [(req_key, queued jobs)] of the `limit` largest)."""
        return (self._one("SELECT COUNT(*) AS n FROM queue_groups")["n"],
                [(r["req_key"], r["n"]) for r in self._all(
                    "SELECT req_key, COUNT(*) AS n FROM jobs WHERE state = 'queued' GROUP BY req_key"
                    " ORDER BY n DESC, req_key LIMIT ?", (limit,))])

    def _add_group(self, job_id):
        """The job was queued: its group has a queued job (inside the transaction that queued it)."""
        self._db.execute(f"INSERT INTO queue_groups (req_key, tags, capabilities, sealed)"
                         f" SELECT {_GROUP_OF_JOB} FROM jobs WHERE id = ? ON CONFLICT DO NOTHING", (job_id,))

    def _drop_group(self, job_id):
        """The job left the queue: drop its group if that was the last of it (inside that transaction)."""
        self._db.execute(f"DELETE FROM queue_groups WHERE req_key = (SELECT req_key FROM jobs WHERE id = ?)"
                         f" AND {_GROUP_EMPTY}", (job_id,))

    def queue_groups(self, after, tags):
        """-> (the highest group serial, the groups above serial `after` whose tags are all among
        `tags`, oldest first).

        A group with a tag outside `tags` (that none of a pool's workers has) is left out here,
        in SQL: with 50,000 groups of a tenant tag each, decoding them took 480 ms, this 36 ms.
        """
        with self._lock:
            top = self._one("SELECT MAX(serial) AS top FROM queue_groups")["top"] or 0
            if top <= after:
                return top, []
            return top, self._all(
                "SELECT serial, req_key, tags, capabilities, sealed FROM queue_groups g WHERE serial > ?"
                " AND NOT EXISTS (SELECT 1 FROM json_each(g.tags) WHERE value NOT IN (SELECT value FROM json_each(?)))"
                " ORDER BY serial", (after, _dump(sorted(tags))))

    def queued_jobs(self, req_key, limit):
        return self._all("SELECT * FROM jobs WHERE state = 'queued' AND req_key = ? ORDER BY seq LIMIT ?",
                         (req_key, limit))

    def assign_job(self, job_id, worker_id, binding_id, claim_hash, now, lease_until):
        """queued -> assigned, as a new attempt with a lease; False if the job was not queued."""
        with self.transaction():
            if self._write(
                    "UPDATE jobs SET state = 'assigned', attempt = attempt + 1, worker_id = ?, binding_id = ?,"
                    " claim_hash = ?, assigned_at = ?, lease_until = ?, withdraw = 0 WHERE id = ? AND state = 'queued'",
                    (worker_id, binding_id, claim_hash, now, lease_until, job_id)) != 1:
                return False
            self._drop_group(job_id)
            return True

    def renew_leases(self, binding_id, held, until):
        """Extend the leases of (job id, attempt, claim hash) this binding still holds; -> the ids it does not."""
        stale = []
        with self.transaction():
            for job_id, attempt, claim_hash in held:
                if self._db.execute(
                        "UPDATE jobs SET lease_until = ? WHERE id = ? AND attempt = ? AND claim_hash = ?"
                        " AND binding_id = ? AND state IN ('assigned', 'running')",
                        (until, job_id, attempt, claim_hash, binding_id)).rowcount != 1:
                    stale.append(job_id)
        return stale

    def held_attempts(self, binding_id, held):
        """The jobs of (job id, attempt, claim hash) this binding still holds (assigned or running)."""
        rows = (self._one(f"SELECT {ATTEMPT_COLUMNS} FROM jobs WHERE id = ? AND attempt = ? AND claim_hash = ?"
                          " AND binding_id = ? AND state IN ('assigned', 'running')",
                          (job_id, attempt, claim_hash, binding_id)) for job_id, attempt, claim_hash in held)
        return [row for row in rows if row]

    def expired_leases(self, now):
        return self._all(f"SELECT {ATTEMPT_COLUMNS} FROM jobs WHERE state IN ('assigned', 'running') AND lease_until < ?",
                         (now,))

    def take_retry(self, job_id):
        """Use one of the retries a job asked for; False if it has none left."""
        return self._write("UPDATE jobs SET retries_left = retries_left - 1 WHERE id = ? AND retries_left > 0",
                           (job_id,)) == 1

    def overdue_jobs(self, now, margin, started_only=False):
        """Jobs with a timeout whose worker has not reported their end long after it should have;
        `started_only`: of those reported running (an assigned one may wait for a slot)."""
        # The effective timeout, sandbox.effective_timeout in SQL: min(timeout, sandbox.limits.timeout),
        # either one alone when the other is null (SQLite's two-argument MIN is null if one is).
        effective = ("COALESCE(MIN(timeout, json_extract(sandbox, '$.limits.timeout')), timeout,"
                     " json_extract(sandbox, '$.limits.timeout'))")
        states = "'running'" if started_only else "'assigned', 'running'"
        return self._all("SELECT id, state, attempt, worker_id, binding_id, timeout, sandbox, started_at FROM jobs"
                         f" WHERE state IN ({states}) AND {effective} IS NOT NULL"
                         # a job from before per-job grace has none stored: the default, 10 s
                         f" AND COALESCE(started_at, assigned_at) + {effective} + COALESCE(cancel_grace, 10) + ? < ?",
                         (margin, now))

    def extend_all_leases(self, until):
        """At start-up: every held job gets a full lease, so orchestrators have time to come back."""
        self._write("UPDATE jobs SET lease_until = MAX(COALESCE(lease_until, 0), ?)"
                    " WHERE state IN ('assigned', 'running')", (until,))

    def requeue_job(self, job_id, from_state, attempt, tried):
        """assigned|running -> queued for a new attempt elsewhere; False if the job moved meanwhile."""
        with self.transaction():
            if self._write(
                    "UPDATE jobs SET state = 'queued', worker_id = NULL, binding_id = NULL, claim_hash = NULL,"
                    " lease_until = NULL, cancel_sent = 0, withdraw = 0, started_at = NULL, tried = ?"
                    " WHERE id = ? AND state = ? AND attempt = ?", (_dump(tried), job_id, from_state, attempt)) != 1:
                return False
            self._add_group(job_id)
            return True

    _UPDATABLE = frozenset(("started_at", "finished_at", "exit_code", "error", "cancel_requested", "attestation",
                            "dropped", "outputs"))

    def update_job_state(self, job_id, from_state, to_state, fields):
        """Move a job from exactly `from_state` to `to_state`, setting fields; False if it was not there."""
        assert set(fields) <= self._UPDATABLE and to_state != "queued", (fields, to_state)   # queued: requeue_job
        sets = "".join(f", {name} = ?" for name in fields)
        with self.transaction():
            if self._write(f"UPDATE jobs SET state = ?{sets} WHERE id = ? AND state = ?",
                           (to_state, *fields.values(), job_id, from_state)) != 1:
                return False
            if from_state == "queued":
                self._drop_group(job_id)
            return True

    def request_cancel(self, job_id):
        return self._write("UPDATE jobs SET cancel_requested = 1 WHERE id = ?", (job_id,)) == 1

    def to_send(self, binding_id):
        """Jobs of this binding with a cancel or a withdrawal asked for and not yet sent; marks them
        sent. -> (cancels, withdrawals), rows of id, attempt, worker_id; a cancel outranks a withdrawal."""
        sql = ("SELECT id, attempt, worker_id, cancel_requested, cancel_sent FROM jobs WHERE binding_id = ?"
               " AND state IN ('assigned', 'running')"
               f" AND ((cancel_requested = 1 AND cancel_sent = 0) OR withdraw = {WITHDRAW_ASKED})")
        if not self._all(sql, (binding_id,)):      # the common case: no write lock taken
            return [], []
        with self.transaction():
            rows = self._all(sql, (binding_id,))
            for r in rows:
                self._db.execute(f"UPDATE jobs SET cancel_sent = cancel_requested, withdraw = {WITHDRAW_SENT}"
                                 " WHERE id = ?", (r["id"],))
            cancels = [r for r in rows if r["cancel_requested"] and not r["cancel_sent"]]
            return cancels, [r for r in rows if not r["cancel_requested"]]

    def withdrawable(self, before, limit):
        """Jobs assigned before `before` and not started, with nothing asked of them yet, newest first:
        those a busy worker holds ahead the longest (dispatch.claim)."""
        return self._all("SELECT id, attempt, worker_id, tags, capabilities, credential, source, artifacts FROM jobs"
                         " WHERE state = 'assigned' AND withdraw = 0 AND cancel_requested = 0 AND assigned_at < ?"
                         " ORDER BY seq DESC LIMIT ?", (before, limit))

    def ask_withdraw(self, job_id, attempt):
        """Ask for this attempt back from its worker; False if it started, moved, or was asked for already."""
        return self._write(f"UPDATE jobs SET withdraw = {WITHDRAW_ASKED} WHERE id = ? AND attempt = ?"
                           " AND state = 'assigned' AND withdraw = 0 AND cancel_requested = 0", (job_id, attempt)) == 1

    # -- chunks ----------------------------------------------------------------

    def add_chunks(self, job_id, attempt, chunks):
        """Store (stream, seq, bytes) chunks; a chunk seen before is ignored."""
        with self.transaction():
            self._db.executemany(
                "INSERT INTO chunks (job_id, attempt, stream, seq, data) VALUES (?, ?, ?, ?, ?) ON CONFLICT DO NOTHING",
                [(job_id, attempt, stream, seq, data) for stream, seq, data in chunks])

    def output(self, job_id, attempt):
        """{"stdout": bytes, "stderr": bytes}: an attempt's output as stored, each stream in seq order."""
        out = {"stdout": bytearray(), "stderr": bytearray()}
        for r in self._all("SELECT stream, data FROM chunks WHERE job_id = ? AND attempt = ? ORDER BY stream, seq",
                           (job_id, attempt)):
            out[r["stream"]] += r["data"]
        return {k: bytes(v) for k, v in out.items()}

    def has_output(self, job_id, attempt):
        return self._one("SELECT 1 AS x FROM chunks WHERE job_id = ? AND attempt = ? LIMIT 1",
                         (job_id, attempt)) is not None

    def chunks(self, job_id, after=0, limit=1000):
        return self._all("SELECT id, attempt, stream, seq, data FROM chunks WHERE job_id = ? AND id > ?"
                         " ORDER BY id LIMIT ?", (job_id, after, limit))

    # -- credentials -------------------------------------------------------------

    def put_credential(self, name, provider, env_names, secret_names, ciphertext, key_id, now):
        """Create or replace a credential; True if it is new."""
        with self.transaction():
            new = self._db.execute("UPDATE credentials SET provider = ?, env_names = ?, secret_names = ?,"
                                   " ciphertext = ?, key_id = ?, updated_at = ? WHERE name = ?",
                                   (provider, _dump(env_names), _dump(secret_names), ciphertext, key_id, now,
                                    name)).rowcount == 0
            if new:
                self._db.execute("INSERT INTO credentials (name, provider, env_names, secret_names, ciphertext,"
                                 " key_id, created_at, updated_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                                 (name, provider, _dump(env_names), _dump(secret_names), ciphertext, key_id,
                                  now, now))
            return new

    def credential(self, name):
        return self._one("SELECT * FROM credentials WHERE name = ?", (name,))

    def credentials(self):
        return self._all("SELECT * FROM credentials ORDER BY name")

    def delete_credential(self, name):
        return self._write("DELETE FROM credentials WHERE name = ?", (name,)) == 1

    # -- source bundles, redeem tokens, artifacts -------------------------------------------

    def add_bundle(self, bundle_id, sha256, size, key_ct, now):
        self._write("INSERT INTO bundles (id, sha256, size, key_ct, created_at) VALUES (?, ?, ?, ?, ?)",
                    (bundle_id, sha256, size, key_ct, now))

    def bundle(self, bundle_id):
        return self._one("SELECT * FROM bundles WHERE id = ?", (bundle_id,))

    def bundle_received(self, bundle_id, received, complete):
        self._write("UPDATE bundles SET received = ?, complete = ? WHERE id = ?", (received, int(complete), bundle_id))

    def delete_bundle(self, bundle_id):
        self._write("DELETE FROM bundles WHERE id = ?", (bundle_id,))

    def add_source_token(self, job_id, attempt, token_hash):
        self._write("INSERT INTO source_tokens (job_id, attempt, token_hash) VALUES (?, ?, ?) ON CONFLICT"
                    " (job_id, attempt) DO UPDATE SET token_hash = excluded.token_hash, redeemed_at = NULL",
                    (job_id, attempt, token_hash))

    def source_token(self, job_id, attempt):
        return self._one("SELECT * FROM source_tokens WHERE job_id = ? AND attempt = ?", (job_id, attempt))

    def redeem_source_token(self, job_id, attempt, now, fingerprint):
        """Mark the attempt's token redeemed by the worker of `fingerprint` -> False if it was already."""
        return self._write("UPDATE source_tokens SET redeemed_at = ?, redeemed_by = ? WHERE job_id = ? AND attempt = ?"
                           " AND redeemed_at IS NULL", (now, fingerprint, job_id, attempt)) == 1

    def bundles_to_collect(self, before, limit):
        """Ids of bundles made before `before` that no job needs: every job that names one ended
        before `before` (specs/bundles.md §9)."""
        held = {r["source"]["bundle"] for r in self._all(
            "SELECT source FROM jobs WHERE source IS NOT NULL AND (state NOT IN ('done', 'failed', 'cancelled')"
            " OR finished_at IS NULL OR finished_at >= ?)", (before,)) if "bundle" in r["source"]}
        rows = self._all("SELECT id FROM bundles WHERE created_at < ? ORDER BY created_at LIMIT ?",
                         (before, limit + len(held)))
        return [r["id"] for r in rows if r["id"] not in held][:limit]

    def artifacts_to_collect(self, before, limit):
        """Artifacts (of any attempt) of jobs that ended before `before`."""
        return self._all("SELECT a.job_id, a.attempt, a.name FROM artifacts a JOIN jobs j ON j.id = a.job_id"
                         " WHERE j.state IN ('done', 'failed', 'cancelled') AND j.finished_at < ?"
                         " ORDER BY j.finished_at LIMIT ?", (before, limit))

    def delete_artifact(self, job_id, attempt, name):
        self._write("DELETE FROM artifacts WHERE job_id = ? AND attempt = ? AND name = ?", (job_id, attempt, name))

    def artifact(self, job_id, attempt, name):
        return self._one("SELECT * FROM artifacts WHERE job_id = ? AND attempt = ? AND name = ?",
                         (job_id, attempt, name))

    def artifacts_of(self, job_id, attempt):
        return self._all("SELECT * FROM artifacts WHERE job_id = ? AND attempt = ? ORDER BY name", (job_id, attempt))

    def add_artifact(self, job_id, attempt, name, size, sha256):
        self._write("INSERT INTO artifacts (job_id, attempt, name, size, sha256) VALUES (?, ?, ?, ?, ?) ON CONFLICT"
                    " (job_id, attempt, name) DO UPDATE SET size = excluded.size, sha256 = excluded.sha256, received = 0",
                    (job_id, attempt, name, size, sha256))

    def artifact_received(self, job_id, attempt, name, received):
        self._write("UPDATE artifacts SET received = ? WHERE job_id = ? AND attempt = ? AND name = ?",
                    (received, job_id, attempt, name))
    # -- harnesses and models ----------------------------------------------------------

    def put_registry(self, kind, key, body, now):
        """Create or replace a harness or a model; True if it is new."""
        with self.transaction():
            if self._db.execute("UPDATE registry SET body = ?, updated_at = ? WHERE kind = ? AND key = ?",
                                (_dump(body), now, kind, key)).rowcount == 1:
                return False
            self._db.execute("INSERT INTO registry (kind, key, body, created_at, updated_at) VALUES (?, ?, ?, ?, ?)",
                             (kind, key, _dump(body), now, now))
            return True

    def registry(self, kind, key):
        row = self._one("SELECT body, created_at, updated_at FROM registry WHERE kind = ? AND key = ?", (kind, key))
        return None if row is None else dict(row["body"], created_at=row["created_at"], updated_at=row["updated_at"])

    def registry_entries(self, kind):
        return [dict(r["body"], created_at=r["created_at"], updated_at=r["updated_at"])
                for r in self._all("SELECT body, created_at, updated_at FROM registry WHERE kind = ? ORDER BY key",
                                   (kind,))]

    def delete_registry(self, kind, key):
        return self._write("DELETE FROM registry WHERE kind = ? AND key = ?", (kind, key)) == 1


def open_store(settings):
    """The store `pond serve` runs on: PostgreSQL with --database (POND_DATABASE_URL), else DIR/pond.db."""
    if settings.database:
        from pond.store_pg import PgStore
        return PgStore(settings.database, pool=settings.database_pool)
    return Store(settings.db_path)

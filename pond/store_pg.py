"""pond's store on PostgreSQL: the interface of store.Store, for several pond replicas on one database.

    replica A ── Store API ──▶ pool of connections ──┐                ┌── LISTEN pond ◀── replica B's
      (a request thread holds one at a time)        ├─▶ PostgreSQL ──┤    listener thread: wakes B's
    replica B ── Store API ──▶ pool of connections ──┘   NOTIFY pond ─┘    held polls and log followers

Every query is store.Store's own where its SQL is portable (`?` marks become `%s` here, nothing
else is rewritten), so the two stores cannot drift; the few that are SQLite's alone (JSON
functions, scalar MIN/MAX, PRAGMA) are overridden below. What several replicas add:

- Claims: queued_jobs() locks the rows it offers (FOR UPDATE SKIP LOCKED), so two replicas never
  assign one job; claim_lock() serialises one binding's claims (its free slots) across replicas.
- Requirement groups (dispatch.Fits): a transaction that adds or drops one holds an advisory lock,
  as SQLite's one write lock does for all, so serials are committed in order and a group is never
  dropped by one replica while another queues a job in it.
- Wake-ups: a dispatch.Notifier's notify() is relayed with NOTIFY (sent in the caller's
  transaction, so it arrives after the commit); each replica's listener wakes its own waiters,
  and drops its cached worker rows when another replica changed them.
- Reaping: one replica at a time holds the reaper's advisory lock (a session lock: it passes to
  another when that replica dies or loses its connection).
- Schema: versioned in pond_schema, created or migrated by one replica at a time (an advisory lock).

Connections: each replica keeps a small pool (--database-pool, default settings.DATABASE_POOL). A thread
takes one for the outermost `with self._lock` or transaction and gives it back at its end, so a
replica's requests run side by side as the replicas do: kept apart by the same row and advisory
locks. The LISTEN connection is the listener thread's own, outside the pool.

The connection string may hold a password: it is never logged or put in an error (redact()).
A connection lost between two statements (a restarted server, a killed backend) is replaced at
the next one; a server that cannot be reached is StorageUnavailable (503 storage_unavailable,
/healthz failing) until it can. copy_from() is `pond migrate-store`.
"""

import collections
import json
import logging
import re
import secrets
import threading
import time
from contextlib import contextmanager
from functools import lru_cache
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

import psycopg

from pond.errors import StorageUnavailable
from pond.health import cleared, warn_once
from pond.settings import DATABASE_POOL
from pond.store import (ADDED_COLUMNS, SCHEMA, SCHEMA_VERSION, TABLES, _GROUP_EMPTY, _GROUP_OF_JOB, _JSON_COLUMNS,
                        Store)

log = logging.getLogger("pond")
CHANNEL = "pond"
CONNECT_TIMEOUT = 10            # s to reach the server
LISTEN_RETRY = 1.0              # s between attempts to get the listener's connection back
LOCK_TIMEOUT = 10               # s a statement waits for a lock another replica holds
POOL_WAIT = 30                  # s a thread waits for a free connection of the pool
STATEMENT_TIMEOUT = 60          # s a statement may run
# Advisory lock keys: (POND, n) for pond's own locks, (POND_CLAIMS, hash of a binding id) for claims.
POND, POND_CLAIMS = 0x706F6E64, 0x706F6E65
MIGRATE, REAPER, GROUPS = 1, 2, 3
POND_BLOBS = 0x706F6E66         # (POND_BLOBS, hash of a blob key): one append to a blob at a time
# Schema 5: the blob store (pond/blobs.py PgBlobs), PostgreSQL's alone (pond on SQLite keeps files).
# A blob is rows of at most BLOB_ROW bytes, `off` its first byte's offset: read and written a row at
# a time, never whole.
BLOB_ROW = 256 * 1024
BLOB_SCHEMA = """CREATE TABLE IF NOT EXISTS blobs (
    key   TEXT NOT NULL,
    off   BIGINT NOT NULL,
    len   INTEGER NOT NULL,
    data  BYTEA NOT NULL,
    PRIMARY KEY (key, off)
)"""
# SQLite's types as PostgreSQL spells them, for store.SCHEMA and ADDED_COLUMNS (one schema, two dialects).
TYPES = [(r"\bINTEGER PRIMARY KEY( AUTOINCREMENT)?", "BIGSERIAL PRIMARY KEY"), (r"\bINTEGER\b", "BIGINT"),
         (r"\bREAL\b", "DOUBLE PRECISION"), (r"\bBLOB\b", "BYTEA")]


def pg_types(ddl):
    for sqlite, pg in TYPES:
        ddl = re.sub(sqlite, pg, ddl)
    return ddl


@lru_cache(maxsize=1024)
def _marks(sql):
    """store.py's `?` parameter marks as psycopg's `%s` (pond's SQL has no `?` or `%` of its own)."""
    return sql.replace("?", "%s")


def redact(url):
    """A connection URL fit for a log line: its password (in the user part or a query parameter) as ***."""
    try:
        parts = urlsplit(url)
        password = parts.password
    except ValueError:
        return "postgresql://(unparsable URL)"
    if password is not None:
        parts = parts._replace(netloc=f"{parts.username or ''}:***@{parts.netloc.rpartition('@')[2]}")
    query = re.sub(r"(?i)(^|&)(password=)[^&]*", r"\1\2***", parts.query)
    return urlunsplit(parts._replace(query=query))


def _scrub(text, url):
    """An error message with the URL's password taken out (and the URL shown redacted)."""
    text = text.replace(url, redact(url))
    try:
        secrets_in = [urlsplit(url).password] + re.findall(r"(?i)(?:^|&)password=([^&]*)", urlsplit(url).query)
    except ValueError:
        return "(an error about an unparsable database URL)"
    for secret in filter(None, secrets_in):
        text = text.replace(secret, "***")
    return text


def _rows(cursor):
    """psycopg row factory: rows as dicts, JSON columns decoded (store._row's rule)."""
    names = [c.name for c in cursor.description or ()]
    decode = [name in _JSON_COLUMNS for name in names]

    def make(values):
        return {name: json.loads(v) if d and v is not None else v for name, d, v in zip(names, decode, values)}
    return make


class _Connection:
    """The psycopg connection as store.Store's code calls self._db: execute(sql with `?`, args)."""

    def __init__(self, url, readonly=False):
        self.conn = psycopg.connect(url, autocommit=True, row_factory=_rows, connect_timeout=CONNECT_TIMEOUT)
        # A lock or statement that waits for long holds up a connection of the pool, and the
        # request on it. Past these it fails as StorageUnavailable (503), which clients retry.
        self.conn.execute(f"SET lock_timeout = '{LOCK_TIMEOUT}s'")
        self.conn.execute(f"SET statement_timeout = '{STATEMENT_TIMEOUT}s'")
        if readonly:         # `pond verify --database`: read, whether a pond runs on it or not, and change nothing
            self.conn.execute("SET SESSION CHARACTERISTICS AS TRANSACTION READ ONLY")

    def execute(self, sql, args=()):
        return self.conn.execute(_marks(sql), args)

    def executemany(self, sql, rows):
        with self.conn.cursor() as cursor:
            cursor.executemany(_marks(sql), rows)

    @property
    def usable(self):
        return not self.conn.closed and not self.conn.broken

    @property
    def in_transaction(self):
        return self.conn.info.transaction_status != psycopg.pq.TransactionStatus.IDLE

    def close(self):
        self.conn.close()


class _Pool:
    """Up to `size` connections, made when first needed; a lost one is dropped and made again."""

    def __init__(self, connect, size):
        self._connect, self.size = connect, size
        self._idle = collections.deque()        # first in, first out: every connection is used, none goes stale
        self._count = 0                         # idle + lent
        self._cond = threading.Condition()
        self._closed = False

    def acquire(self):
        deadline = time.monotonic() + POOL_WAIT
        with self._cond:
            while not self._idle and self._count >= self.size:
                left = deadline - time.monotonic()
                if left <= 0 or self._closed:
                    raise StorageUnavailable(f"all {self.size} of pond's connections to PostgreSQL were busy for "
                                             f"{POOL_WAIT} s", "retry; if it lasts, raise --database-pool or look for "
                                             "a long lock in PostgreSQL (pg_stat_activity)")
                self._cond.wait(left)
            if self._idle:
                return self._idle.popleft()
            self._count += 1
        return self._new()

    def _new(self):
        try:
            return self._connect()
        except BaseException:
            with self._cond:
                self._count -= 1
                self._cond.notify()
            raise

    def release(self, conn):
        with self._cond:
            if not self._closed and conn.usable and not conn.in_transaction:
                self._idle.append(conn)
                self._cond.notify()
                return
            self._count -= 1
            self._cond.notify()
        conn.close()

    def replace(self, conn):
        """A lent connection that was lost -> a new one in its place (StorageUnavailable if none can be made)."""
        conn.close()
        return self._new()

    def close(self):
        with self._cond:
            self._closed = True
            idle, self._idle = list(self._idle), collections.deque()
            self._count -= len(idle)
            self._cond.notify_all()
        for conn in idle:
            conn.close()


class _Thread(threading.local):
    """What one thread holds of the store: its connection, and where it is in a transaction."""
    conn = None
    held = 0                    # depth of `with store._lock` (the connection goes back at 0)
    depth = 0                   # depth of store.transaction()
    groups_locked = False       # this transaction holds the GROUPS lock
    workers_changed = False     # this transaction changed workers: drop the cache again after its commit


class _Lease:
    """`with store._lock`: this thread's connection of the pool, taken at the outermost `with` and
    given back at its end. Store's code holds it around statements that belong together, as it
    holds SQLite's one lock."""

    def __init__(self, pool, thread):
        self._pool, self._thread = pool, thread

    def __enter__(self):
        t = self._thread
        if not t.held:
            t.conn = self._pool.acquire()
        t.held += 1
        return self

    def __exit__(self, *exc):
        t = self._thread
        t.held -= 1
        if not t.held:
            conn, t.conn = t.conn, None
            if conn is not None:
                self._pool.release(conn)


class _WorkersCache(dict):
    """binding id -> worker rows. clear() moves the generation on, so that rows read before it are not
    cached after it (another thread of this replica may be reading them meanwhile)."""

    def __init__(self):
        super().__init__()
        self.generation = 0
        self.mutex = threading.Lock()

    def clear(self):
        with self.mutex:
            self.generation += 1
            super().clear()


class PgStore(Store):
    """The PostgreSQL store. Thread-safe like Store: each thread runs its statements and transaction on
    a connection of the pool it holds meanwhile; threads and replicas run side by side, kept apart by
    row and advisory locks."""

    def __init__(self, url, readonly=False, pool=DATABASE_POOL):
        self._url = url
        self.dir = None
        self.failure = None
        self._workers_cache = _WorkersCache()     # dropped on a change, here or on another replica
        self._reaper = None               # the connection that holds the REAPER lock (a session lock)
        self.instance = secrets.token_hex(8)        # tells this replica's NOTIFYs from the others'
        self._wake = {}
        self._stop = threading.Event()
        self._listener = None
        self._thread = _Thread()
        self._pool = _Pool(lambda: self._connect(readonly), pool)
        self._lock = _Lease(self._pool, self._thread)
        with self._lock:
            pass                # the first connection now: a wrong URL or password fails pond's start
        if readonly:
            exists = self._one("SELECT to_regclass('pond_schema') IS NOT NULL AS x")["x"]
            version = (self._one("SELECT version FROM pond_schema") or {}).get("version") if exists else None
            if version != SCHEMA_VERSION:
                self.close()
                raise RuntimeError(f"the database has pond schema {version}, not {SCHEMA_VERSION}: start this "
                                   "pond on it once")
            return
        with self.transaction():
            self._db.execute(f"SELECT pg_advisory_xact_lock({POND}, {MIGRATE})")   # one replica migrates at a time
            self._db.execute("CREATE TABLE IF NOT EXISTS pond_schema (version INTEGER NOT NULL)")
            row = self._one("SELECT version FROM pond_schema")
            version = row["version"] if row else 0
            if version > SCHEMA_VERSION:
                raise RuntimeError(f"the database has pond schema {version}; this pond knows up to {SCHEMA_VERSION}")
            self._migrate(version)
            for statement in pg_types(SCHEMA).split(";"):
                if statement.strip():
                    self._db.execute(statement)
            self._db.execute(BLOB_SCHEMA)
            self._lock_groups()
            self._db.execute(f"DELETE FROM queue_groups WHERE {_GROUP_EMPTY}")
            self._db.execute(f"INSERT INTO queue_groups (req_key, tags, capabilities, sealed)"
                             f" SELECT {_GROUP_OF_JOB} FROM jobs WHERE state = 'queued' ORDER BY seq"
                             f" ON CONFLICT DO NOTHING")
            self._db.execute("DELETE FROM pond_schema")
            self._db.execute("INSERT INTO pond_schema (version) VALUES (?)", (SCHEMA_VERSION,))

    @property
    def _db(self):
        """This thread's connection (only inside `with self._lock` or a transaction)."""
        conn = self._thread.conn
        if conn is None:
            raise RuntimeError("store_pg: a statement outside `with self._lock` and outside a transaction")
        return conn

    def _connect(self, readonly=False):
        try:
            return _Connection(self._url, readonly)
        except psycopg.Error as e:
            raise self._failed(e) from None

    def _migrate(self, version):
        """Bring an older schema up to SCHEMA_VERSION (inside the opening transaction, under MIGRATE)."""
        if version in (0, SCHEMA_VERSION):
            return
        for table, columns in ADDED_COLUMNS.items():
            for name, kind in columns:
                self._db.execute(f"ALTER TABLE IF EXISTS {table} ADD COLUMN IF NOT EXISTS {name} {pg_types(kind)}")

    def close(self):
        self._stop.set()
        if self._listener is not None:
            self._listener.join(5)
        self._pool.close()

    @contextmanager
    def transaction(self):
        """One transaction (READ COMMITTED) on this thread's connection; nested calls join the outer one."""
        t = self._thread
        with self._lock:
            if t.depth:
                t.depth += 1
                try:
                    yield self
                finally:
                    t.depth -= 1
                return
            try:
                self._fresh("BEGIN")
                t.depth, t.groups_locked, t.workers_changed = 1, False, False
                yield self
                self._db.execute("COMMIT")
            except BaseException as e:
                conn = t.conn
                if conn is not None and conn.usable and conn.in_transaction:
                    try:
                        conn.execute("ROLLBACK")
                    except psycopg.Error:
                        pass
                self._workers_cache.clear()
                if not isinstance(e, psycopg.OperationalError):
                    raise
                raise self._failed(e) from None
            finally:
                t.depth = 0
            if t.workers_changed:       # another thread may have cached the rows before this commit
                self._workers_cache.clear()
            if self.failure is not None:
                self._recovered()

    def _fresh(self, sql, args=()):
        """Run the first statement of a transaction (or one outside any); on a connection that was
        lost meanwhile (a restarted server, a killed backend), once more on a new one."""
        if self._db.usable:
            try:
                return self._db.execute(sql, args)
            except psycopg.OperationalError:
                if self._db.usable:
                    raise
        self._reconnect()
        return self._db.execute(sql, args)

    def _reconnect(self):
        """This thread's connection was lost: a new one in its place. A REAPER lock it held went with
        it (reaper_turn() sees that the connection is closed)."""
        t = self._thread
        conn, t.conn = t.conn, None
        t.conn = self._pool.replace(conn)
        self._workers_cache.clear()

    def _failed(self, e):
        """The database cannot be reached or refused the transaction: kept for /healthz, logged once."""
        why = _scrub(str(e).strip().splitlines()[0] if str(e).strip() else e.__class__.__name__, self._url)
        err = StorageUnavailable(f"pond cannot store this now: {why}",
                                 f"check that PostgreSQL at {redact(self._url)} is up and lets this user in; a running "
                                 "pond reconnects by itself: retry then")
        if self.failure is None:
            self.failure = {"error": err.message, "hint": err.hint, "since": round(time.time(), 3)}
        warn_once(err.message, "storage: %s (pond answers 503 storage_unavailable until it can write again)",
                  err.message)
        return err

    def _recovered(self):
        failure, self.failure = self.failure, None
        if failure is not None:         # two threads may both see the failure end
            log.info("storage: PostgreSQL can be written again after %.0f s", time.time() - failure["since"])
            cleared(failure["error"])

    def probe(self):
        """While writes fail: try one, so that /healthz clears without traffic."""
        if self.failure is not None:
            with self.transaction():
                self._db.execute("UPDATE pond_schema SET version = version")

    def _all(self, sql, args=()):
        with self._lock:
            try:
                if self._thread.depth:
                    return self._db.execute(sql, args).fetchall()
                return self._fresh(sql, args).fetchall()
            except psycopg.OperationalError as e:
                raise self._failed(e) from None

    def _one(self, sql, args=()):
        with self._lock:
            try:
                if self._thread.depth:
                    return self._db.execute(sql, args).fetchone()
                return self._fresh(sql, args).fetchone()
            except psycopg.OperationalError as e:
                raise self._failed(e) from None

    # -- replicas ----------------------------------------------------------------

    def subscribe(self, work, logs):
        """Relay `work` and `logs` (dispatch.Notifier) to the other replicas, and wake them on theirs."""
        self._wake = {"job": lambda: work.wake(new_job=True), "capacity": work.wake, "logs": logs.wake,
                      "workers": self._workers_changed}
        work.relay = lambda new_job: self.publish("job" if new_job else "capacity")
        logs.relay = lambda new_job: self.publish("logs")
        self._listener = threading.Thread(target=self._listen, name="pg-listener", daemon=True)
        self._listener.start()

    def publish(self, kind):
        """NOTIFY the other replicas; inside a transaction it is sent when that commits."""
        try:
            with self._lock:
                self._db.execute("SELECT pg_notify(?, ?)", (CHANNEL, f"{self.instance} {kind}"))
        except psycopg.Error as e:
            # The others still find the work: a held poll looks again every dispatch.LIVENESS_CHECK.
            warn_once("notify", "storage: cannot tell the other replicas (%s)", _scrub(str(e), self._url)[:200])

    def _listen(self):
        """The listener thread: LISTEN on its own connection; wake what another replica's NOTIFY names."""
        while not self._stop.is_set():
            try:
                with psycopg.connect(self._url, autocommit=True, connect_timeout=CONNECT_TIMEOUT) as conn:
                    conn.execute(f"LISTEN {CHANNEL}")
                    for wake in self._wake.values():     # anything may have happened while it was away
                        wake()
                    while not self._stop.is_set():
                        for note in conn.notifies(timeout=0.5):
                            sender, _, kind = note.payload.partition(" ")
                            if sender != self.instance and kind in self._wake:
                                self._wake[kind]()
            except psycopg.Error as e:
                warn_once("listen", "storage: lost the connection that hears other replicas (%s); reconnecting",
                          _scrub(str(e), self._url)[:200])
            except Exception:           # a bug: said loudly, and the replicas keep waking each other
                log.exception("storage: the listener for other replicas failed; starting it again")
            self._stop.wait(LISTEN_RETRY)

    def _workers_changed(self):
        self._workers_cache.clear()

    def _worker_write(self, sql, args):
        with self.transaction():
            changed = super()._worker_write(sql, args)
            if changed:
                self._thread.workers_changed = True
                self.publish("workers")         # the other replicas drop their cached rows
            return changed

    def workers(self, binding_id=None):
        """Store.workers(), its cache kept only if no change came while the rows were read."""
        if binding_id is None:
            return super().workers()
        cache = self._workers_cache
        rows = cache.get(binding_id)
        if rows is None:
            generation = cache.generation
            rows = self._all("SELECT * FROM workers WHERE binding_id = ? ORDER BY enrolled_at", (binding_id,))
            with cache.mutex:
                if cache.generation == generation:
                    cache[binding_id] = rows
        return rows

    def claim_lock(self, binding_id):
        """Claims for one binding on two replicas would both count its free slots: one at a time."""
        self._db.execute(f"SELECT pg_advisory_xact_lock({POND_CLAIMS}, hashtext(?))", (binding_id,))

    def reaper_turn(self):
        """Whether this replica reaps: the one that holds the REAPER lock, until it dies or the pool's
        connection that took it is lost (then the next replica to try takes it)."""
        held = self._reaper
        if held is not None and held.usable:
            return True
        with self._lock:
            got = self._one(f"SELECT pg_try_advisory_lock({POND}, {REAPER}) AS got")["got"]
            self._reaper = self._db if got else None
        return got

    def copy_from(self, source, blob_dir=None):
        """`pond migrate-store`: every row of `source` (a Store on SQLite) and every file under
        `blob_dir` (its FileBlobs: bundles and artifacts) into this empty database, in one
        transaction; -> {table: rows copied, "blobs": files}. Refused (ValueError) if this one holds pond data."""
        with self.transaction():
            self._db.execute(f"LOCK TABLE {', '.join(TABLES)}, blobs IN EXCLUSIVE MODE")   # no pond writes meanwhile
            held = [t for t in (*TABLES, "blobs") if self._one(f"SELECT 1 AS x FROM {t} LIMIT 1")]
            if held:
                raise ValueError(f"the database already holds pond data (in {', '.join(held)})")
            copied = {}
            for table in TABLES:
                columns, rows = source.export(table)
                if rows:
                    marks = ", ".join("?" * len(columns))
                    self._db.executemany(f"INSERT INTO {table} ({', '.join(columns)}) VALUES ({marks})", rows)
                copied[table] = len(rows)
            for table, column in (("jobs", "seq"), ("chunks", "id"), ("queue_groups", "serial")):
                # The next row numbers follow the copied ones (a serial is never reused).
                self._db.execute(f"SELECT setval(pg_get_serial_sequence('{table}', '{column}'),"
                                 f" (SELECT COALESCE(MAX({column}), 0) + 1 FROM {table}), false)")
            copied["blobs"] = self._copy_blobs(Path(blob_dir)) if blob_dir and Path(blob_dir).is_dir() else 0
            return copied

    def _copy_blobs(self, root):
        """Each file under `root` as blob rows, keyed by its path there, a row at a time (never a
        whole file in memory) -> files copied."""
        files = sorted(p for p in root.rglob("*") if p.is_file())
        for path in files:
            key, offset = path.relative_to(root).as_posix(), 0
            with open(path, "rb") as f:
                while data := f.read(BLOB_ROW):
                    self._db.execute("INSERT INTO blobs (key, off, len, data) VALUES (?, ?, ?, ?)",
                                     (key, offset, len(data), data))
                    offset += len(data)
        return len(files)

    # -- the blob store (pond/blobs.py PgBlobs) --------------------------------------

    def blob_append(self, key, offset, data):
        """Add `data` at `offset`, which must be the blob's size now -> the new size (ValueError if not)."""
        with self.transaction():
            self._db.execute(f"SELECT pg_advisory_xact_lock({POND_BLOBS}, hashtext(?))", (key,))
            if self.blob_size(key) != offset:
                raise ValueError("offset is not the end of the blob")
            for i in range(0, len(data), BLOB_ROW):
                row = data[i:i + BLOB_ROW]
                self._db.execute("INSERT INTO blobs (key, off, len, data) VALUES (?, ?, ?, ?)",
                                 (key, offset + i, len(row), row))
            return offset + len(data)

    def blob_size(self, key):
        row = self._one("SELECT off + len AS n FROM blobs WHERE key = ? ORDER BY off DESC LIMIT 1", (key,))
        return row["n"] if row else 0

    def blob_read(self, key, offset, n):
        """At most `n` bytes from `offset`: the rows that hold them, sliced; b"" past the end."""
        rows = self._all("SELECT off, data FROM blobs WHERE key = ? AND off < ? AND off + len > ? ORDER BY off",
                         (key, offset + n, offset))
        out = b"".join(bytes(r["data"]) for r in rows)
        start = offset - rows[0]["off"] if rows else 0
        return out[start:start + n]

    def blob_delete(self, key):
        self._write("DELETE FROM blobs WHERE key = ?", (key,))

    # -- SQL that is SQLite's alone ------------------------------------------------

    def _lock_groups(self):
        """queue_groups changes one transaction at a time: serials then commit in order (dispatch.Fits
        reads those above the last it saw), and a group is never dropped while a job joins it."""
        if not self._thread.groups_locked:
            self._db.execute(f"SELECT pg_advisory_xact_lock({POND}, {GROUPS})")
            self._thread.groups_locked = True

    def _add_group(self, job_id):
        self._lock_groups()
        super()._add_group(job_id)

    def _drop_group(self, job_id):
        self._lock_groups()
        super()._drop_group(job_id)

    HAS_TAG = "tags::jsonb @> jsonb_build_array(?::text)"     # store.Store.jobs's tag filter

    def queue_groups(self, after, tags):
        with self._lock:
            top = self._one("SELECT MAX(serial) AS top FROM queue_groups")["top"] or 0
            if top <= after:
                return top, []
            return top, self._all("SELECT serial, req_key, tags, capabilities, sealed FROM queue_groups"
                                  " WHERE serial > ? AND tags::jsonb <@ ?::jsonb ORDER BY serial",
                                  (after, json.dumps(sorted(tags))))

    def queued_jobs(self, req_key, limit):
        """The oldest queued jobs of a group that no other claim holds, locked until this one ends."""
        rows = self._all("SELECT * FROM jobs WHERE state = 'queued' AND req_key = ? ORDER BY seq LIMIT ?"
                         " FOR UPDATE SKIP LOCKED", (req_key, limit))
        if not rows and self._one("SELECT 1 AS x FROM jobs WHERE state = 'queued' AND req_key = ? LIMIT 1",
                                  (req_key,)):
            # Another replica's claim holds them all. dispatch.Fits forgets a group that offers
            # nothing; should that claim leave some queued, the group comes back as a new one.
            self._lock_groups()
            self._db.execute("UPDATE queue_groups SET serial = nextval(pg_get_serial_sequence('queue_groups',"
                             " 'serial')) WHERE req_key = ?", (req_key,))
        return rows

    def overdue_jobs(self, now, margin, started_only=False):
        # LEAST ignores a null: the sooner of the job's timeout and its sandbox's, or either alone.
        effective = "LEAST(timeout, (sandbox::jsonb #>> '{limits,timeout}')::double precision)"
        states = "'running'" if started_only else "'assigned', 'running'"
        return self._all("SELECT id, state, attempt, worker_id, binding_id, timeout, sandbox, started_at FROM jobs"
                         f" WHERE state IN ({states}) AND {effective} IS NOT NULL"
                         f" AND COALESCE(started_at, assigned_at) + {effective} + COALESCE(cancel_grace, 10) + ? < ?",
                         (margin, now))

    def extend_all_leases(self, until):
        self._write("UPDATE jobs SET lease_until = GREATEST(COALESCE(lease_until, 0), ?)"
                    " WHERE state IN ('assigned', 'running')", (until,))

"""Fixtures: real pond, orchestrator and worker processes on port 0, real SQLite files.

`pytest --store postgres` runs every pond a test starts on PostgreSQL instead (a private server
for the session, a database per pond: tests/pg_cluster.py): ponds started through `pool` (or a
module's own Pool made with store_pool()), and ponds a test starts by hand with pool.pond_env()
(`pond up`, `pond serve` with its own flags, the docs' runnable blocks). A `pond serve` that is
refused at start never opens its store, so those refusals run the same on both. `--store both`
runs the tests that take the `store` fixture once on each. With --store postgres, the files in
STORE_INDEPENDENT (no pond process at all), those in ALWAYS_ON_POSTGRES (on it in the default
pass too), STORE_INCIDENTAL (long, and about the worker's sandbox, not the store) and the tests
marked sqlite_only (about SQLite's files themselves) are skipped with their reason; nothing else
is left out. Nothing of ours is mocked. Every wait has a deadline
(wait_for), and an autouse fixture fails a test that leaves a child process or a thread behind.
"""

import importlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SWARM = str(ROOT / "swarm.py")
READY_TIMEOUT = 20.0
# A Python the jobs themselves can run: a root worker runs each job as its slot's own uid,
# which cannot enter /root, where the interpreter running the tests may live (pyenv, a venv).
JOB_PY = "/usr/bin/python3"


def env_for_children():
    env = dict(os.environ)
    env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    for key in ("POND_URL", "POND_STATE_DIR", "POND_ADMIN_TOKEN", "SWARM_TOKEN", "POND_DATABASE_URL"):
        env.pop(key, None)
    return env


def interop(module):
    """An independent implementation an interop test checks us against (pyhpke, securesystemslib),
    imported when that test runs. Missing, the test fails and names what to install: it never
    skips, so a missing library cannot pass for agreement; the vector tests beside it still run."""
    try:
        return importlib.import_module(module)
    except ImportError as e:
        missing = e
    pytest.fail(f"{module.split('.')[0]} is not installed ({missing}): this interop test needs it; "
                "install the test extra: pip install -e '.[test]'", pytrace=False)


def free_port():
    """A port free now, for a process that must come back on the same one after a restart."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for(predicate, timeout=10.0, interval=0.02, what="condition"):
    """Poll `predicate` until it returns a truthy value; fail the test after `timeout`."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}")
        time.sleep(interval)


class Proc:
    """A started child process whose first stdout line is its ready line."""

    def __init__(self, argv, log_path, env=None, cwd=None):
        self.argv = argv
        self.log_path = Path(log_path)
        self.log = open(self.log_path, "ab")
        self.proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=self.log, stdin=subprocess.DEVNULL,
                                     env=env or env_for_children(), cwd=cwd or ROOT, start_new_session=True)
        self.lines = []
        self._got = threading.Event()
        self._pump = threading.Thread(target=self._read, daemon=True)
        self._pump.start()

    def _read(self):
        for line in self.proc.stdout:
            self.lines.append(line.decode(errors="replace").rstrip("\n"))
            self._got.set()
        self._got.set()

    def ready(self, timeout=READY_TIMEOUT):
        if not self._got.wait(timeout) or not self.lines:
            self.stop()            # closes the log file: read it by name
            raise AssertionError(f"{self.argv[:4]} not ready in {timeout} s; log:\n"
                                 f"{self.log_path.read_text(errors='replace')}")
        return self.lines[0]

    def url(self):
        line = self.ready()
        return line.split(" on ", 1)[1].split()[0]

    def stderr(self):
        self.log.flush()
        return self.log_path.read_text(errors="replace")

    def alive(self):
        return self.proc.poll() is None

    def stop(self, sig=signal.SIGTERM, timeout=15.0):
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(5)
        self._pump.join(5)
        self.proc.stdout.close()
        self.log.close()
        return self.proc.returncode

    def kill(self):
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(5)


def run(argv, timeout=30, env=None, cwd=None, input=None):
    """Run a command to completion (never longer than `timeout`)."""
    return subprocess.run(argv, capture_output=True, text=True, timeout=timeout, env=env or env_for_children(),
                          cwd=cwd or ROOT, input=input)


class PondHandle:
    def __init__(self, proc, state_dir, ca_file=None):
        from pond.client import Client
        self.proc, self.state_dir, self.ca_file = proc, Path(state_dir), ca_file
        self.url = proc.url()
        self.token = (self.state_dir / "admin-token").read_text().strip()
        self.client = Client(self.url, self.token, ca_file=ca_file)

    def api(self, method, path, body=None, token="admin", headers=None, raw=None):
        """(status, decoded JSON) without raising: for checking error answers."""
        import http.client
        from urllib.parse import urlsplit
        parts = urlsplit(self.url)
        if parts.scheme == "https":
            import ssl
            conn = http.client.HTTPSConnection(parts.hostname, parts.port, timeout=30,
                                               context=ssl.create_default_context(cafile=self.ca_file))
        else:
            conn = http.client.HTTPConnection(parts.hostname, parts.port, timeout=30)
        head = {"Content-Type": "application/json"}
        if token == "admin":
            head["Authorization"] = f"Bearer {self.token}"
        elif token:
            head["Authorization"] = f"Bearer {token}"
        head.update(headers or {})
        payload = raw if raw is not None else (None if body is None else json.dumps(body).encode())
        try:
            conn.request(method, path, body=payload, headers=head)
            resp = conn.getresponse()
            data = resp.read()
        finally:
            conn.close()
        try:
            return resp.status, json.loads(data)
        except ValueError:
            return resp.status, data.decode(errors="replace")

    postgres = database = None      # set by Pool.pond on PostgreSQL

    def sql(self, statement, args=()):
        """Run one statement (`?` marks) on this pond's own store, SQLite file or PostgreSQL
        database: a real change to the store, for what no API can do quickly (expire a code).
        -> (rowcount, rows)."""
        if self.database is None:
            import sqlite3
            with sqlite3.connect(self.state_dir / "pond.db", timeout=10) as db:
                cursor = db.execute(statement, args)
                return cursor.rowcount, cursor.fetchall()
        with self.postgres.connect(self.database.rsplit("/", 1)[1]) as db:
            cursor = db.execute(statement.replace("?", "%s"), args)
            return cursor.rowcount, cursor.fetchall() if cursor.description else []

    def stored(self):
        """Everything this pond's store holds, as bytes: the SQLite files, or a dump of its database."""
        if self.database is None:
            files = [self.state_dir / name for name in ("pond.db", "pond.db-wal", "pond.db-shm")]
            return b"".join(f.read_bytes() for f in files if f.exists())
        return self.postgres.dump(self.database.rsplit("/", 1)[1])

    def cli(self, *args, timeout=60):
        tls = ("--ca-file", str(self.ca_file)) if self.ca_file else ()
        env = None if self.database is None else self.postgres.env(dict(env_for_children(),
                                                                        POND_DATABASE_URL=self.database))
        return run([sys.executable, "-m", "pond", "--state-dir", str(self.state_dir), *tls, *args], timeout=timeout,
                   env=env)

    def pairing_code(self, **body):
        return self.client.post("/v1/admin/pool/pairing-codes", body)["code"]

    def enrollment_code(self, **body):
        return self.client.post("/v1/admin/pool/enrollment-codes", body)["code"]

    def job(self, job_id):
        return self.client.get(f"/v1/jobs/{job_id}")

    def submit(self, command, **fields):
        """POST /v1/jobs; the job runs unconfined (`sandbox={"profile": "none"}`) unless `sandbox` is given,
        so a test about something else needs no sandbox provider."""
        fields.setdefault("sandbox", {"profile": "none"})
        return self.client.post("/v1/jobs", dict(command=command, **fields))

    def bare_orchestrator(self):
        """Pair an orchestrator and enroll one online worker that takes profile-none jobs, through
        the API alone: no process behind them, the test speaks the orchestrator's side. -> its token."""
        token = self.client.post("/v1/orch/pair", {"code": self.pairing_code()})["token"]
        worker = self.api("POST", f"/v1/orch/enrollment/{self.enrollment_code()}/consumed", {"tags": []},
                          token=token)[1]
        self.api("POST", "/v1/orch/workers/snapshot", {"workers": [{"id": worker["worker_id"], "online": True,
                                                                      "capabilities": ["sandbox.process"]}]},
                 token=token)
        return token

    def wait_job(self, job_id, states=("done", "failed", "cancelled"), timeout=20):
        return wait_for(lambda: (j := self.job(job_id))["state"] in states and j, timeout,
                        what=f"job {job_id} to reach {states}")

    def output(self, job_id):
        import base64
        out = {"stdout": b"", "stderr": b""}
        page = self.client.get(f"/v1/jobs/{job_id}/logs")
        for c in page["chunks"]:
            out[c["stream"]] += base64.b64decode(c["data"])
        return out


class Pool:
    """Builds pools for a test: pond, orchestrators, workers; stops them all afterwards."""

    def __init__(self, tmp_path, postgres=None):
        self.tmp = tmp_path
        self.procs = []
        self.n = 0
        self.postgres = postgres            # tests/postgres.Cluster: ponds keep their data there
        self.databases = {}                 # state dir -> its pond's database URL

    def _dir(self, name):
        self.n += 1
        d = self.tmp / f"{name}{self.n}"
        d.mkdir()
        return d

    def start(self, argv, name, env=None):
        proc = Proc(argv, self.tmp / f"{name}{self.n}.log", env=env)
        self.procs.append(proc)
        return proc

    def pond(self, poll_hold=5, extra=(), ca_file=None, state=None, port=0, database=None):
        """A pond; give `state` and `port` of an earlier one to restart it where it was. With
        --store postgres (self.postgres), each state dir has a database of its own, or `database`."""
        state = Path(state) if state else self._dir("pond")
        env = None
        if self.postgres is not None:
            database = database or self.databases.get(state) or self.postgres.database()
            self.databases[state] = database
            extra, env = ("--database", database, *extra), self.postgres.env(env_for_children())
        proc = self.start([sys.executable, "-m", "pond", "serve", "--bind", f"127.0.0.1:{port}", "--state-dir", str(state),
                           "--poll-hold", str(poll_hold), *extra], "pond", env)
        handle = PondHandle(proc, state, ca_file)
        handle.postgres, handle.database = self.postgres, database
        return handle

    def pond_env(self, state, env=None):
        """The environment for a pond a test starts by hand (`pond up`, `pond serve` with flags of its
        own) on state dir `state`: on PostgreSQL, POND_DATABASE_URL (that state dir's database) and
        PGPASSWORD; on SQLite, `env` or env_for_children() as is."""
        env = dict(env if env is not None else env_for_children())
        if self.postgres is None:
            return env
        if Path(state) not in self.databases:
            self.databases[Path(state)] = self.postgres.database()
        return self.postgres.env(dict(env, POND_DATABASE_URL=self.databases[Path(state)]))

    def handle(self, proc, state, ca_file=None):
        """A PondHandle for a pond started by hand on `state` (with pond_env)."""
        handle = PondHandle(proc, state, ca_file)
        handle.postgres, handle.database = self.postgres, self.databases.get(Path(state))
        return handle

    def replica(self, pond, poll_hold=5, extra=(), port=0):
        """Another pond on `pond`'s database, with its admin token and credential key."""
        state = self._dir("pond")
        for name in ("admin-token", "credential.key"):
            shutil.copy2(pond.state_dir / name, state / name)
        return self.pond(poll_hold, extra, state=state, database=self.databases[pond.state_dir], port=port)

    def orchestrator(self, pond, token="pool-secret", extra=(), state=None, port=0):
        """An orchestrator, paired with pond; give `state` and `port` of an earlier one to restart it."""
        state = state or self._dir("orch")
        handle = state / "backend-handle.json"
        tls = ("--ca-file", str(pond.ca_file)) if pond.ca_file else ()
        if not handle.exists():
            done = run([sys.executable, SWARM, "pair", "--pond", pond.url, "--code", pond.pairing_code(),
                        "--out", str(handle), *tls])
            assert done.returncode == 0, done.stderr
        token_file = state / "pool-token"
        token_file.write_text(token)
        token_file.chmod(0o600)
        proc = self.start([sys.executable, SWARM, "serve", "--bind", f"127.0.0.1:{port}", "--state-dir", str(state),
                           "--handle", str(handle), "--token-file", str(token_file), "--poll-wait", "5",
                           "--claim-wait", "5", "--snapshot-interval", "1", *extra], "orch")
        proc.state_dir, proc.token_file = state, token_file
        proc.url()
        return proc

    def worker(self, pond, orch, tags="", capabilities="", concurrency=1, code=None, extra=(), state=None,
               wait_online=True):
        """A worker enrolled with pond through `orch`.

        `sandbox.process` is added to `capabilities` unless they already hold a `sandbox.` glob,
        so the worker takes the unconfined jobs PondHandle.submit sends by default; give a
        `sandbox.` glob to choose its sandboxes yourself.
        """
        if "sandbox." not in capabilities:
            capabilities = ",".join(c for c in (capabilities, "sandbox.process") if c)
        state = state or self._dir("worker")
        argv = [sys.executable, SWARM, "worker", "--orchestrator", orch.url(), "--state-dir", str(state),
                "--tags", tags, "--capabilities", capabilities, "--concurrency", str(concurrency),
                "--claim-wait", "5", *extra]
        if not (state / "worker.json").exists():
            argv += ["--enroll-code", code or pond.enrollment_code()]
        proc = self.start(argv, "worker")
        proc.state_dir = state
        line = proc.ready()
        proc.worker_id = line.split()[2]
        if wait_online:
            wait_for(lambda: any(w["id"] == proc.worker_id and w["online"]
                                 for w in pond.client.get("/v1/admin/pool/workers")["workers"]),
                     10, what=f"worker {proc.worker_id} online in pond")
        return proc

    def stop_all(self):
        for proc in self.procs:           # signal all first, so their shutdowns overlap
            if proc.alive():
                proc.proc.send_signal(signal.SIGTERM)
        for proc in reversed(self.procs):
            proc.stop()

    def close(self):
        """The end of the test: stop every process, and give the ponds' databases back to the
        PostgreSQL server to be emptied for another test (pg_cluster.Cluster.recycle())."""
        self.stop_all()
        if self.postgres is not None:
            for database in set(self.databases.values()):
                self.postgres.recycle(database)
            self.databases.clear()


@pytest.fixture
def shared_path():
    """A directory a job may read and write whatever uid it runs as, to meet the test there:
    a root worker runs each slot as its own uid, which cannot enter pytest's 0700 tmp_path."""
    d = Path(tempfile.mkdtemp(prefix="pond-test-shared-"))
    d.chmod(0o777)
    yield d
    shutil.rmtree(d, ignore_errors=True)


# Files that never start pond: under --store postgres they would run exactly as they do on SQLite.
STORE_INDEPENDENT = {
    "test_attestation.py": "signing vectors and interop: swarm.py and pond's functions, no pond process",
    "test_bench_floor.py": "bench/floor.py's switches applied to a copy of the tree, no pond process",
    "test_cli_reference.py": "compares docs/cli.md with the argument parsers",
    "test_egress.py": "swarm.py's egress proxy on loopback sockets",
    "test_errors_doc.py": "reads docs/errors.md and the sources",
    "test_keys.py": "key files and fingerprints: swarm.py and pond's functions, no pond process",
    "test_sealing.py": "HPKE sealing vectors and interop, no pond process",
    "test_swarm_file.py": "reads swarm.py's text",
    "test_vectors.py": "matching vectors against pond.matching and swarm.py, no pond process",
}

# Files whose ponds are on PostgreSQL whatever --store says (pg_pool, the postgres fixture): the
# first pass has run them there already.
ALWAYS_ON_POSTGRES = {
    "test_replicas.py": "two replicas on one database (pg_pool)",
    "test_failover.py": "replicas and URL lists (pg_pool); its one SQLite pond only answers a refusal",
    "test_store_pg.py": "the PostgreSQL store itself, and SQLite beside it in the contract test",
}

# Files that start pond but test something the store plays no part in, and are long: CI's time
# (two passes, installs, well under 30 minutes) keeps them to the first pass.
STORE_INCIDENTAL = {
    "test_sandbox_escape.py": "about 4 minutes of jobs trying to leave their sandbox, judged on the worker; "
                              "pond only submits and records them, which every other file does on PostgreSQL",
}


def pytest_configure(config):
    config.addinivalue_line("markers", "sqlite_only(reason): a test about SQLite's own files; skipped, with the "
                                       "reason, under --store postgres")


def pytest_collection_modifyitems(config, items):
    if config.getoption("--store") != "postgres":
        return
    for item in items:
        name = Path(str(item.fspath)).name
        mark = item.get_closest_marker("sqlite_only")
        if name in STORE_INDEPENDENT:
            item.add_marker(pytest.mark.skip(reason=f"store-independent, run once on SQLite: "
                                                    f"{STORE_INDEPENDENT[name]}"))
        elif name in STORE_INCIDENTAL:
            item.add_marker(pytest.mark.skip(reason=f"store-incidental, run once on SQLite: {STORE_INCIDENTAL[name]}"))
        elif name in ALWAYS_ON_POSTGRES:
            item.add_marker(pytest.mark.skip(reason=f"on PostgreSQL in every pass already: {ALWAYS_ON_POSTGRES[name]}"))
        elif mark is not None:
            item.add_marker(pytest.mark.skip(reason=f"SQLite only: {mark.args[0]}"))


def pytest_addoption(parser):
    parser.addoption("--store", choices=("sqlite", "postgres", "both"), default="sqlite",
                     help="where the ponds of tests that use the `pool` fixture keep their data (default sqlite; "
                          "postgres starts a private server, tests/pg_cluster.py)")


def pytest_generate_tests(metafunc):
    if "store" in metafunc.fixturenames and metafunc.config.getoption("--store") == "both":
        metafunc.parametrize("store", ["sqlite", "postgres"], indirect=True)


@pytest.fixture
def store(request):
    """"sqlite" or "postgres": where this test's ponds keep their data (--store)."""
    return getattr(request, "param", request.config.getoption("--store"))


@pytest.fixture(scope="session")
def postgres():
    """A private PostgreSQL server for the session (tests/pg_cluster.py), stopped at its end. Without
    PostgreSQL installed the tests that need it skip, except under CI=true, where they fail."""
    from pg_cluster import Cluster, binaries
    if binaries() is None:
        message = "PostgreSQL is not installed (apt-get install -y postgresql; .ci/run does)"
        if os.environ.get("CI") == "true":
            pytest.fail(message, pytrace=False)
        pytest.skip(message)
    cluster = Cluster()
    try:
        yield cluster
    finally:
        cluster.stop()


@pytest.fixture
def pg_pool(tmp_path, postgres):
    """A pool whose ponds keep their data in the session's PostgreSQL server, whatever --store says."""
    p = Pool(tmp_path, postgres)
    try:
        yield p
    finally:
        p.close()


def store_pool(request, tmp):
    """A Pool on the store --store names, for a fixture of a wider scope than `pool`'s (a module's)."""
    postgres = request.getfixturevalue("postgres") if request.config.getoption("--store") == "postgres" else None
    return Pool(tmp, postgres)


@pytest.fixture
def pool(tmp_path, store, request):
    p = Pool(tmp_path, request.getfixturevalue("postgres") if store == "postgres" else None)
    try:
        yield p
    finally:
        p.close()


def children(pid):
    """Live (non-zombie) child processes of `pid`, from /proc."""
    out = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                fields = Path(f"/proc/{entry}/stat").read_text().rsplit(")", 1)[1].split()
            except OSError:
                continue
            if int(fields[1]) == pid and fields[0] != "Z":
                out.append(int(entry))
    return out


def _worker_leftovers():
    """What root workers keep outside their state dir: sandbox dirs and v1 cgroups (swarm-<id>).
    A worker removes them when it stops cleanly; one killed with -9 leaves them to its successor."""
    found = set(Path("/var/lib/swarm").glob("sandbox-*")) if os.getuid() == 0 else set()
    for line in Path("/proc/self/cgroup").read_text().splitlines():
        _, names, path = line.split(":", 2)
        for name in names.split(","):
            if name in ("memory", "pids", "cpu"):
                found.update(Path(f"/sys/fs/cgroup/{name}{path}").glob("swarm-*"))
    return found


@pytest.fixture(scope="session", autouse=True)
def no_worker_leftovers_after_the_session():
    """Remove what this session's killed workers left in /var/lib/swarm and the cgroup trees."""
    before = _worker_leftovers()
    yield
    for d in sorted(_worker_leftovers() - before, key=lambda p: -len(p.parts)):
        if str(d).startswith("/sys/fs/cgroup/"):
            lock = Path("/var/lib/swarm") / f"sandbox-{d.name.removeprefix('swarm-')}" / "lock"
            if lock.exists() and not _unlocked(lock):
                continue                     # a live root worker's (another session's, or pytest -n's other process)
            for child in [*d.glob("*/"), d]:
                try:
                    os.rmdir(child)          # refused while a live worker's thread or job is in it
                except OSError:
                    pass
        elif _unlocked(d / "lock"):          # a live worker (pond up in another shell) holds its lock
            shutil.rmtree(d, ignore_errors=True)


def _unlocked(path):
    import fcntl
    try:
        with open(path, "a+") as f:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return True
    except OSError:
        return False


SHARED_PIDS = set()      # processes of a module's long-lived pool (test_sandbox_escape, test_agents): no test's leak


@pytest.fixture(autouse=True)
def no_leaks():
    """Fail a test that leaves a child process or a non-daemon thread behind."""
    threads_before = set(threading.enumerate())
    yield
    left = lambda: [p for p in children(os.getpid()) if p not in SHARED_PIDS]   # noqa: E731
    deadline = time.monotonic() + 5
    while left() and time.monotonic() < deadline:
        time.sleep(0.05)        # a stopped child may take a moment to be reaped
    assert not left(), f"child processes left behind: {left()}"
    extra = [t for t in threading.enumerate() if t not in threads_before and t.is_alive() and not t.daemon]
    assert not extra, f"threads left behind: {extra}"

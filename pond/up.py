"""`pond up`: a whole local pool on loopback, from one command.

    pond up --state-dir DIR
      ├─ python -m pond serve      --state-dir DIR                 (pond.db, admin-token)
      ├─ python swarm.py serve     --state-dir DIR/orchestrator    (paired once)
      └─ python swarm.py worker    --state-dir DIR/worker          (enrolled once)

The first run mints a pairing code and an enrollment code through the admin API and
uses them; later runs on the same DIR find backend-handle.json and the worker's
identity and reuse them, so there is never a second orchestrator or worker. The
three processes run in their own sessions so that Ctrl-C reaches `pond up` alone,
which stops the worker, then the orchestrator, then pond; each child is also told
by the kernel to exit if `pond up` itself dies.
"""

import ctypes
import fcntl
import importlib.util
import os
import secrets
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

from pond.client import Client
from pond.errors import ConfigError
from pond.settings import ADMIN_TOKEN_FILE, read_private, write_private

READY_TIMEOUT = 20.0
STOP_TIMEOUT = 15.0
PR_SET_PDEATHSIG = 1


def swarm_path():
    """swarm.py as installed beside pond (py-modules) or in the source tree."""
    spec = importlib.util.find_spec("swarm")
    if spec and spec.origin and spec.origin.endswith("swarm.py"):
        return Path(spec.origin)
    here = Path(__file__).resolve().parents[1] / "swarm.py"
    if here.exists():
        return here
    raise ConfigError("cannot find swarm.py", "install pond with `pip install -e .` from the repository")


def _die_with_parent():
    try:
        ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGTERM)
    except (OSError, AttributeError):
        pass


class Child:
    """One supervised process: started, waited for its ready line, logged to a file, stopped."""

    def __init__(self, name, argv, log_path, env=None):
        self.name, self.log_path = name, log_path
        self.log = open(log_path, "ab")
        self.proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=self.log, stdin=subprocess.DEVNULL,
                                     env=env, start_new_session=True, preexec_fn=_die_with_parent)
        self.ready_line = None

    def wait_ready(self, timeout=READY_TIMEOUT):
        """Read stdout until the child's ready line; then keep copying stdout to the log."""
        got = threading.Event()

        def pump():
            for line in self.proc.stdout:
                if not got.is_set():
                    self.ready_line = line.decode(errors="replace").strip()
                    got.set()
                self.log.write(line)
                self.log.flush()
            got.set()

        threading.Thread(target=pump, name=f"{self.name}-stdout", daemon=True).start()
        if not got.wait(timeout) or self.ready_line is None:
            self.stop()
            raise ConfigError(f"{self.name} did not start within {timeout:g} s", f"see its log: {self.log_path}")
        return self.ready_line

    def alive(self):
        return self.proc.poll() is None

    def stop(self, timeout=STOP_TIMEOUT):
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(5)
        self.log.close()
        return self.proc.returncode


def _lock(state):
    lock = open(state / "up.lock", "a+")
    try:
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        raise ConfigError(f"another `pond up` is running on {state}",
                          "use that one (Ctrl-C it to stop), or give a different --state-dir") from None
    return lock


def _url_from(line, name):
    url = line.rsplit(" on ", 1)[-1].split()[0] if " on " in line else ""
    if not url.startswith("http://"):
        raise ConfigError(f"{name} printed an unexpected ready line: {line!r}", "see its log")
    return url


def _start_pond(state, bind, explicit_bind, py, logs, logged):
    pond = Child("pond", [py, "-m", "pond", "serve", "--bind", bind, "--state-dir", str(state), *logged],
                 logs / "pond.log")
    try:
        return pond, _url_from(pond.wait_ready(), "pond")
    except ConfigError:
        if explicit_bind:
            raise
    # The default port is taken (or pond failed there): any free loopback port will do,
    # since the CLI finds pond through DIR/endpoint.json.
    pond = Child("pond", [py, "-m", "pond", "serve", "--bind", "127.0.0.1:0", "--state-dir", str(state), *logged],
                 logs / "pond.log")
    return pond, _url_from(pond.wait_ready(), "pond")


def up(state_dir, bind, tags, capabilities, concurrency, out=print, log_format="text"):
    state = Path(state_dir).resolve()
    state.mkdir(parents=True, exist_ok=True)
    os.chmod(state, 0o700)
    lock = _lock(state)
    logs = state / "logs"
    logs.mkdir(exist_ok=True)
    py, swarm = sys.executable, str(swarm_path())
    children = []
    stop = threading.Event()
    signal.signal(signal.SIGINT, lambda *a: stop.set())
    signal.signal(signal.SIGTERM, lambda *a: stop.set())
    try:
        logged = ["--log-format", log_format]          # each child's lines in the one format asked for
        pond, pond_url = _start_pond(state, bind or "127.0.0.1:8001", bind is not None, py, logs, logged)
        children.append(pond)
        admin = Client(pond_url, read_private(state / ADMIN_TOKEN_FILE))
        orch, orch_url = _start_orchestrator(state / "orchestrator", pond_url, admin, py, swarm, logs, logged)
        children.append(orch)
        worker, worker_line = _start_worker(state / "worker", orch_url, admin, py, swarm, logs,
                                            tags, capabilities, concurrency, logged)
        children.append(worker)
        _summary(out, state, pond_url, orch_url, worker_line, state_dir, _sandboxes(admin, worker_line, stop))
        while not stop.wait(0.5):
            dead = [c for c in children if not c.alive()]
            if dead:
                out(f"error: {dead[0].name} exited with status {dead[0].proc.returncode}; stopping the pool")
                out(f"hint: see {dead[0].log_path}")
                return 1
        return 0
    finally:
        for child in reversed(children):
            child.stop()
        if children:
            out("pool stopped")
        lock.close()


def _start_orchestrator(orch_dir, pond_url, admin, py, swarm, logs, logged):
    orch_dir.mkdir(exist_ok=True)
    os.chmod(orch_dir, 0o700)
    handle = orch_dir / "backend-handle.json"
    if not handle.exists():
        code = admin.post("/v1/admin/pool/pairing-codes", {"name": "local"})["code"]
        done = subprocess.run([py, swarm, "pair", "--pond", pond_url, "--code", code, "--out", str(handle)],
                              capture_output=True, text=True, timeout=60)
        if done.returncode:
            raise ConfigError("pairing the local orchestrator failed: " + done.stderr.strip()[-500:])
    token_file = orch_dir / "pool-token"
    if not token_file.exists():
        write_private(token_file, secrets.token_urlsafe(32) + "\n")
    orch = Child("orchestrator", [py, swarm, "serve", "--bind", "127.0.0.1:0", "--state-dir", str(orch_dir),
                                  "--handle", str(handle), "--pond", pond_url, "--token-file", str(token_file),
                                  *logged],
                 logs / "orchestrator.log")
    return orch, _url_from(orch.wait_ready(), "orchestrator")


def _start_worker(worker_dir, orch_url, admin, py, swarm, logs, tags, capabilities, concurrency, logged):
    worker_dir.mkdir(exist_ok=True)
    os.chmod(worker_dir, 0o700)
    repo_root = worker_dir / "checkouts"
    repo_root.mkdir(exist_ok=True)
    argv = [py, swarm, "worker", "--orchestrator", orch_url, "--state-dir", str(worker_dir),
            "--tags", tags, "--capabilities", capabilities, "--concurrency", str(concurrency),
            "--repo-root", str(repo_root), *logged]
    env = None
    if not (worker_dir / "worker.json").exists():     # in the environment, never in an argv `ps` shows
        env = dict(os.environ, SWARM_ENROLL_CODE=admin.post("/v1/admin/pool/enrollment-codes", {})["code"])
    worker = Child("worker", argv, logs / "worker.log", env=env)
    return worker, worker.wait_ready()


def _sandboxes(admin, worker_line, stop, timeout=READY_TIMEOUT):
    """The sandboxes the worker enforces, as pond sees it once the worker is online: what it
    advertised after its start-up preflight. -> a line for the summary."""
    worker_id = worker_line.split()[2] if len(worker_line.split()) > 2 else None
    deadline = time.monotonic() + timeout
    while not stop.is_set() and time.monotonic() < deadline:
        rows = [w for w in admin.get("/v1/admin/pool/workers")["workers"] if w["id"] == worker_id and w["online"]]
        if rows:
            have = sorted(c.removeprefix("sandbox.") for c in rows[0]["capabilities"] if c.startswith("sandbox."))
            if have:
                return "enforces sandboxes: " + ", ".join(have)
            return ("enforces no sandbox: jobs wait until a worker does; its log says why each provider was "
                    "dropped (install bubblewrap, allow unprivileged user namespaces), or submit with --profile none")
        stop.wait(0.2)
    return "not online in pond yet; `pond admin workers` shows the sandboxes it enforces once it is"


def _summary(out, state, pond_url, orch_url, worker_line, state_dir_arg, sandboxes):
    flag = "" if state_dir_arg in (None, ".pond-state") else f" --state-dir {state_dir_arg}"
    out(f"pond          {pond_url}   (state: {state})")
    out(f"console       {pond_url}/ui/   (admin token: {state / 'admin-token'})")
    out(f"orchestrator  {orch_url}")
    out(f"worker        {worker_line.removeprefix('swarm worker ')}")
    out(f"              worker {sandboxes}")
    out(f"logs          {state / 'logs'}")
    out("")
    out(f"submit a job:  pond{flag} submit --wait -- python3 -c 'print(42)'")
    out(f"list jobs:     pond{flag} jobs")
    out("stop:          Ctrl-C")
    sys.stdout.flush()

"""Shared pieces of the sandbox tests: sandbox blocks, a worker run as root or as its own
unprivileged user (the deployment docs/ recommend), and looking at the host's /proc.

A worker "as user" runs as the system user `swarm-ci` (.ci/run creates it) with the system's
/usr/bin/python3 and a copy of swarm.py it can read, inside a memory and pids cgroup
delegated to it the way systemd's Delegate=yes would, and with no credentials.
"""

import http.server
import json
import os
import pwd
import shutil
import socket
import sys
import tempfile
import threading
from pathlib import Path

import pytest

from conftest import SWARM, Proc, wait_for

CI_USER = "swarm-ci"
SYSTEM_PYTHON = "/usr/bin/python3"      # a job's python too: sys.executable lives under /root


def sandbox(profile="untrusted-code-write", allow_hosts=None, **overrides):
    """A job's sandbox block (the wire format of /work/sandbox-plan.md)."""
    block = {"profile": profile}
    if overrides:
        block["overrides"] = overrides
    if allow_hosts is not None:
        block["allow_hosts"] = allow_hosts
    return block


def ci_user():
    """swarm-ci's passwd entry, or None; in CI (CI=true) a missing user fails the run."""
    try:
        return pwd.getpwnam(CI_USER)
    except KeyError:
        if os.environ.get("CI") == "true":
            pytest.fail(f"user {CI_USER} is missing in CI: .ci/run creates it (useradd --system --create-home {CI_USER})")
        return None


# --- the host's /proc ------------------------------------------------------------

def processes():
    """[(pid, real uid, cmdline as text)] of every live process on the host."""
    out = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            status = Path(f"/proc/{entry}/status").read_text()
            cmdline = Path(f"/proc/{entry}/cmdline").read_bytes()
        except OSError:
            continue
        fields = dict(line.split(":", 1) for line in status.splitlines() if ":" in line)
        if fields.get("State", "").strip().startswith("Z"):
            continue
        out.append((int(entry), int(fields["Uid"].split()[0]), cmdline.replace(b"\0", b" ").decode(errors="replace")))
    return out


def with_marker(marker):
    return [p for p in processes() if marker in p[2] and p[0] != os.getpid()]


def of_uids(uids, but_made_ahead=False):
    """Processes of these uids; with `but_made_ahead`, not the sandboxes a slot made ahead for
    its next job (bwrap ... -- /bin/sh -s, and that shell: no job has run in them yet)."""
    return [p for p in processes() if p[1] in uids
            and not (but_made_ahead and (p[2].rstrip().endswith("-- /bin/sh -s") or p[2].rstrip() == "/bin/sh -s"))]


def environ_holding(value):
    """Pids whose environment holds `value` (the test runs as root, so it may read them all)."""
    found = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                if value.encode() in Path(f"/proc/{entry}/environ").read_bytes():
                    found.append(int(entry))
            except OSError:
                pass
    return found


# --- loopback services the tests start ---------------------------------------------

class Listener:
    """A TCP listener on 127.0.0.1 that counts the connections it accepts."""

    def __init__(self):
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(16)
        self.port = self.sock.getsockname()[1]
        self.accepted = 0
        self.thread = threading.Thread(target=self._accept, daemon=True)
        self.thread.start()

    def _accept(self):
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            self.accepted += 1
            conn.close()

    def close(self):
        try:
            self.sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        self.sock.close()
        self.thread.join(5)


class Upstream:
    """An HTTP server on 127.0.0.1 answering every GET with `body`: the allowed upstream."""

    def __init__(self, body):
        payload = body.encode()

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self):
                self.send_response(200)
                self.send_header("Content-Length", str(len(payload)))
                self.end_headers()
                self.wfile.write(payload)

            def log_message(self, *args):
                pass

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.port = self.server.server_address[1]
        self.thread = threading.Thread(target=self.server.serve_forever, args=(0.05,), daemon=True)
        self.thread.start()

    def close(self):
        self.server.shutdown()
        self.server.server_close()
        self.thread.join(5)


# --- workers as root or as swarm-ci ------------------------------------------------

def own_cgroup(controller):
    """This process's cgroup v1 directory for `controller`."""
    for line in Path("/proc/self/cgroup").read_text().splitlines():
        _, names, path = line.split(":", 2)
        if controller in names.split(","):
            return Path(f"/sys/fs/cgroup/{controller}") / path.lstrip("/")
    raise AssertionError(f"no cgroup v1 {controller} controller in /proc/self/cgroup")


def remove_cgroup_tree(d):
    """rmdir a cgroup and its children, deepest first (cgroupfs allows only rmdir)."""
    if not d.is_dir():
        return
    for child in sorted((p for p in d.rglob("*") if p.is_dir()), key=lambda p: -len(p.parts)):
        try:
            os.rmdir(child)
        except OSError:
            pass
    try:
        os.rmdir(d)
    except OSError:
        pass


class UserHome:
    """What a worker run as swarm-ci needs: a readable copy of swarm.py, state dirs it owns,
    and a memory and pids cgroup delegated to it. `close()` removes all of it."""

    def __init__(self, user):
        self.user = user
        self.dir = Path(tempfile.mkdtemp(prefix="swarm-ci-", dir="/tmp"))
        os.chmod(self.dir, 0o755)
        self.swarm = self.dir / "swarm.py"
        shutil.copy(SWARM, self.swarm)
        os.chmod(self.swarm, 0o644)
        self.cgroups = []
        self.n = 0
        self.delegated = 0

    def state_dir(self):
        self.n += 1
        d = self.dir / f"worker{self.n}"
        d.mkdir(mode=0o700)
        os.chown(d, self.user.pw_uid, self.user.pw_gid)
        return d

    def delegate(self):
        """A memory and a pids cgroup for one worker, owned by swarm-ci (systemd Delegate=yes)."""
        made = []
        self.delegated += 1
        for controller in ("memory", "pids"):
            d = own_cgroup(controller) / f"{CI_USER}-{os.getpid()}-{self.dir.name}-{self.delegated}"
            d.mkdir()
            for p in [d, *d.iterdir()]:
                os.chown(p, self.user.pw_uid, self.user.pw_gid)
            made.append(d)
            self.cgroups.append(d)
        return made

    def close(self):
        for d in self.cgroups:
            remove_cgroup_tree(d)
        shutil.rmtree(self.dir, ignore_errors=True)


def user_env(user):
    return {"PATH": "/usr/local/bin:/usr/bin:/bin", "HOME": user.pw_dir, "LANG": "C.UTF-8", "USER": CI_USER}


def start_worker(tmp, logs, pond, orch, kind, home=None, tags="pool:trusted", capabilities="sandbox.bwrap,sandbox.process",
                 concurrency=1, extra=(), state=None, env=None, name="worker"):
    """A worker as root (sys.executable, swarm.py of this tree; its state under `tmp`) or as
    swarm-ci (see UserHome), up and online in pond; its log in `logs`. Its Proc carries state_dir, worker_id and sandbox_dir."""
    if kind == "root":
        state = state or Path(tempfile.mkdtemp(prefix=f"{name}-", dir=tmp))
        sandbox_dir = state.parent / f"{state.name}-slots"          # the slot uids must reach it: 0711 up to /
        argv = [sys.executable, SWARM, "worker"]
    else:
        state = state or home.state_dir()
        sandbox_dir = state / "jobs"
        memory, pids = home.delegate()
        user = home.user
        argv = ["/bin/sh", "-c", f'echo $$ > {memory}/cgroup.procs && echo $$ > {pids}/cgroup.procs && '
                f'exec setpriv --reuid {user.pw_uid} --regid {user.pw_gid} --init-groups "$@"', "sh",
                SYSTEM_PYTHON, "-S", str(home.swarm), "worker"]        # -S: no dist-packages, so no cryptography
        env = env or user_env(user)
    argv += ["--orchestrator", orch.url(), "--state-dir", str(state), "--tags", tags,
             "--capabilities", capabilities, "--concurrency", str(concurrency), "--claim-wait", "5",
             "--sandbox-dir", str(sandbox_dir), *extra]
    if not (state / "worker.json").exists():
        argv += ["--enroll-code", pond.enrollment_code()]
    proc = Proc(argv, Path(logs) / f"{state.name}.log", env=env)
    proc.state_dir, proc.sandbox_dir = state, sandbox_dir
    proc.worker_id = proc.ready().split()[2]
    wait_for(lambda: any(w["id"] == proc.worker_id and w["online"]
                         for w in pond.client.get("/v1/admin/pool/workers")["workers"]),
             10, what=f"worker {proc.worker_id} online in pond")
    return proc


def prepare_root_dirs(tmp):
    """A directory the slot uids of a root worker can pass through (pytest's tmp is 0700)."""
    d = Path(tempfile.mkdtemp(prefix="swarm-escape-", dir="/tmp"))
    os.chmod(d, 0o711)
    return d


def egress_lines(stderr):
    """The proxy's decisions a job's stderr carries."""
    return [json.loads(line.split("swarm-egress: ", 1)[1]) for line in stderr.splitlines()
            if line.startswith("swarm-egress: ")]

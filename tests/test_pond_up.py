"""`pond up` with real processes: a whole local pool from one command, stopped by Ctrl-C, reused on restart."""

import json
import os
import signal
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path

from conftest import children, env_for_children, run, wait_for

PY = sys.executable
READY = "submit a job"


class Up:
    """A running `pond up`, its stdout collected line by line."""

    def __init__(self, state_dir, *extra, env=None):
        """`env`: pool.pond_env(state_dir), so that its pond keeps its data where --store says."""
        self.proc = subprocess.Popen([PY, "-m", "pond", "up", "--state-dir", str(state_dir), "--bind", "127.0.0.1:0",
                                      *extra],
                                     stdout=subprocess.PIPE, stderr=subprocess.PIPE, stdin=subprocess.DEVNULL,
                                     env=env or env_for_children(), start_new_session=True)
        self.lines, self.err = [], []
        self.readers = [threading.Thread(target=lambda: self.lines.extend(
                            line.decode(errors="replace").rstrip("\n") for line in self.proc.stdout), daemon=True),
                        threading.Thread(target=lambda: self.err.extend(self.proc.stderr), daemon=True)]
        for t in self.readers:
            t.start()
        self.children = []

    def wait_ready(self, timeout=40):
        wait_for(lambda: any(READY in line for line in self.lines) or self.proc.poll() is not None, timeout,
                 what="`pond up` to print its summary")
        assert any(READY in line for line in self.lines), f"pond up exited: {self.output()}"
        # Its own children, noted now so that cleanup can reach them even if `pond up` fails.
        self.children = children(self.proc.pid)

    def output(self):
        return "\n".join(self.lines) + "\n" + b"".join(self.err).decode(errors="replace")

    def interrupt(self, timeout=30):
        self.proc.send_signal(signal.SIGINT)
        code = self.proc.wait(timeout)
        for t in self.readers:
            t.join(5)
        return code

    def cleanup(self):
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(5)
        for pid in self.children:        # in their own sessions: not reached by killpg above
            try:
                if alive(pid) and any(b"pond" in a or b"swarm" in a for a in cmdline(pid)):
                    os.kill(pid, signal.SIGKILL)
            except (OSError, ProcessLookupError):
                pass
        self.proc.stdout.close()
        self.proc.stderr.close()


def cmdline(pid):
    return Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")


def alive(pid):
    """True while the process exists and is not a zombie."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def pool_pids(state):
    """pond, orchestrator and worker pids of a running `pond up` on `state`."""
    pond_pid = json.loads((state / "endpoint.json").read_text())["pid"]
    orch_pid = json.loads((state / "orchestrator" / "serve.json").read_text())["pid"]
    return pond_pid, orch_pid


def pond_cli(state, *args, timeout=60):
    return run([PY, "-m", "pond", "--state-dir", str(state), *args], timeout=timeout)


def admin_list(state, what):
    done = pond_cli(state, "admin", what, "--json")
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout)[what]


def test_pond_up_runs_a_job_and_ctrl_c_stops_all_three(tmp_path, pool):
    state = tmp_path / "pool"
    up = Up(state, env=pool.pond_env(state))
    try:
        up.wait_ready()
        pond_pid, orch_pid = pool_pids(state)
        kids = set(up.children)
        workers = [p for p in kids if b"worker" in cmdline(p) and any(a.endswith(b"swarm.py") for a in cmdline(p))]
        assert len(workers) == 1, [cmdline(p) for p in kids]
        assert kids == {pond_pid, orch_pid, workers[0]}
        # The worker's enrollment code is a secret: in its environment, never in an argv `ps` shows.
        assert not [cmdline(p) for p in kids if b"--enroll-code" in cmdline(p)]
        assert "--enroll-code shows the code in `ps`" not in (state / "logs" / "worker.log").read_text()
        # The sandboxes the worker enforces, as pond sees them.
        assert any(line.strip() == "worker enforces sandboxes: bwrap, process" for line in up.lines), up.output()
        # The web console's address, as the README says to open it.
        console = next(line.split()[1] for line in up.lines if line.startswith("console "))
        with urllib.request.urlopen(console, timeout=10) as page:
            assert page.status == 200 and b"/ui/console.js" in page.read()

        # The README's first job, as printed: the default profile, untrusted-code-write, under bwrap.
        done = pond_cli(state, "submit", "--wait", "--", "python3", "-c", "print(42)")
        assert done.returncode == 0, done.stderr
        assert done.stdout == "42\n"

        assert up.interrupt() == 0, up.output()
        assert "pool stopped" in up.lines, up.output()
        for pid in kids:
            wait_for(lambda: not alive(pid), 5, what=f"process {pid} to be gone")
    finally:
        up.cleanup()


def test_second_pond_up_reuses_the_pool_and_a_concurrent_one_is_refused(tmp_path, pool):
    state = tmp_path / "pool"
    first = Up(state, env=pool.pond_env(state))
    try:
        first.wait_ready()
        (orch,) = admin_list(state, "orchestrators")
        (worker,) = wait_for(lambda: admin_list(state, "workers"), 10, what="the worker in pond")
        assert first.interrupt() == 0, first.output()
    finally:
        first.cleanup()

    logs = {name: state / "logs" / f"{name}.log" for name in ("pond", "orchestrator", "worker")}
    seen = {name: path.stat().st_size for name, path in logs.items()}       # the first run's lines, in text
    second = Up(state, "--log-format", "json", env=pool.pond_env(state))
    try:
        second.wait_ready()
        assert [o["id"] for o in admin_list(state, "orchestrators")] == [orch["id"]]
        wait_for(lambda: [(w["id"], w["online"]) for w in admin_list(state, "workers")] == [(worker["id"], True)],
                 15, what="the same single worker online again")
        done = pond_cli(state, "submit", "--wait", "--profile", "none", "--", "python3", "-c", "print(42)")
        assert done.returncode == 0, done.stderr
        assert done.stdout == "42\n"
        (last, *_) = json.loads(pond_cli(state, "jobs", "--json").stdout)["jobs"]
        assert (last["state"], last["worker"]) == ("done", worker["id"])

        started = time.monotonic()
        third = run([PY, "-m", "pond", "up", "--state-dir", str(state), "--bind", "127.0.0.1:0"], timeout=30,
                    env=pool.pond_env(state))
        assert third.returncode == 2, third.stdout + third.stderr
        assert "another `pond up` is running" in third.stderr
        assert "hint:" in third.stderr
        assert time.monotonic() - started < 10, "a refused `pond up` must not start anything first"
        assert second.proc.poll() is None
        assert len(admin_list(state, "orchestrators")) == 1 and len(admin_list(state, "workers")) == 1

        assert second.interrupt() == 0, second.output()
        # --log-format reached all three: their lines of this run are JSON, with the job's events on each.
        for name, path in logs.items():
            lines = path.read_bytes()[seen[name]:].decode().splitlines()
            records = [json.loads(line) for line in lines if line.startswith("{")]
            assert records and all(" INFO " not in line for line in lines if not line.startswith("{")), lines
            assert any(r.get("job") == last["id"] for r in records), (name, lines)
    finally:
        second.cleanup()


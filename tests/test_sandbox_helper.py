"""External sandbox providers (specs/sandbox.md §6.4): a `swarm-sandbox-<name>` on the worker's
PATH is proven at start-up, advertised as sandbox.<name>, and runs jobs from a JSON spec on
its stdin, with the egress proxy on a Unix socket. The helper here is a small stand-in
written by the test (a real one would be gVisor or a microVM); what is tested is swarm.py's
side of the protocol, with a real worker, orchestrator and pond."""

import json
import sys

from conftest import SWARM, Proc, env_for_children, wait_for
from sandboxing import Upstream

# Runs the command as the spec says (env, cwd); for a write job it first fetches the URL in
# its first argument through the worker's proxy, over the spec's Unix socket, and prints
# the status line, as a helper that forwards its sandbox's proxy port would.
HELPER = r'''#!/usr/bin/python3
import json, os, socket, subprocess, sys
spec = json.loads(sys.stdin.read())
print("helper: version=%s profile=%s work_mode=%s uid=%s" % (spec["version"], spec["profile"], spec["work_mode"],
      spec["uid"]), file=sys.stderr, flush=True)
if spec["egress"] and spec["env"].get("FETCH"):
    s = socket.socket(socket.AF_UNIX)
    s.connect(spec["egress"]["unix_socket"])
    s.sendall(("GET %s HTTP/1.1\r\nHost: x\r\n\r\n" % spec["env"]["FETCH"]).encode())
    print("helper: proxy answered", s.recv(4096).split(b"\r\n")[0].decode(), file=sys.stderr, flush=True)
    s.close()
sys.exit(subprocess.run(spec["command"], env=spec["env"], cwd=spec["directories"]["work"]).returncode)
'''


def test_a_helper_provider_is_proven_advertised_and_runs_a_write_job_with_its_proxy(pool, tmp_path):
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    helper = bin_dir / "swarm-sandbox-testbox"
    helper.write_text(HELPER)
    helper.chmod(0o755)
    upstream = Upstream("hi")
    port = upstream.port
    try:
        pond = pool.pond()
        orch = pool.orchestrator(pond)
        env = env_for_children()
        env["PATH"] = f"{bin_dir}:{env['PATH']}"
        state = tmp_path / "helperworker"
        argv = [sys.executable, SWARM, "worker", "--orchestrator", orch.url(), "--state-dir", str(state),
                "--enroll-code", pond.enrollment_code(), "--claim-wait", "5", "--tags", "pool:trusted",
                "--capabilities", "sandbox.testbox", "--egress-allow", "localhost",
                "--egress-ports", str(port), "--egress-allow-loopback", "127.0.0.1"]
        w = Proc(argv, tmp_path / "helperworker.log", env=env)
        pool.procs.append(w)
        line = w.ready()
        assert "sandboxes testbox" in line and "sandbox.testbox" in line, line
        worker_id = line.split()[2]
        wait_for(lambda: any(r["id"] == worker_id and r["online"]
                             for r in pond.client.get("/v1/admin/pool/workers")["workers"]), 10, what="online")

        job = pond.submit(["sh", "-c", "echo ran in $PWD with HOME=$HOME; exit 3"],
                          env={"FETCH": f"http://localhost:{port}/"},
                          sandbox={"profile": "untrusted-code-write", "backend": "testbox"})
        done = pond.wait_job(job["id"], timeout=30)
        out = pond.output(job["id"])
        assert done["state"] == "failed" and done["exit_code"] == 3, (done, out)
        assert done["sandbox"]["backend"] == "testbox"
        stdout, stderr = out["stdout"].decode(), out["stderr"].decode()
        assert stdout.startswith("ran in /") and "/slot-0/work with HOME=/home/swarm" in stdout, stdout
        assert "helper: version=1 profile=untrusted-code-write work_mode=rw" in stderr, stderr
        assert "helper: proxy answered HTTP/1.0 200" in stderr, stderr        # http.server answers 1.0
        decisions = [json.loads(x.split(": ", 1)[1]) for x in stderr.splitlines() if x.startswith("swarm-egress: ")]
        assert [(d["host"], d["verdict"]) for d in decisions] == [("localhost", "allow")], stderr
    finally:
        upstream.close()


def test_a_helper_that_fails_its_preflight_is_dropped_with_the_reason(pool, tmp_path):
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    helper = bin_dir / "swarm-sandbox-broken"
    helper.write_text("#!/bin/sh\necho 'cannot confine: no KVM here' >&2\nexit 125\n")
    helper.chmod(0o755)
    pond = pool.pond()
    orch = pool.orchestrator(pond)
    env = env_for_children()
    env["PATH"] = f"{bin_dir}:{env['PATH']}"
    argv = [sys.executable, SWARM, "worker", "--orchestrator", orch.url(), "--state-dir", str(tmp_path / "w"),
            "--enroll-code", pond.enrollment_code(), "--claim-wait", "5", "--capabilities", "sandbox.*"]
    w = Proc(argv, tmp_path / "w.log", env=env)
    pool.procs.append(w)
    line = w.ready()
    assert "sandboxes bwrap,process" in line and "broken" not in line, line
    log = w.stderr()
    assert "sandbox.broken dropped" in log and "cannot confine: no KVM here" in log, log

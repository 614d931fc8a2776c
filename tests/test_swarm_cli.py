"""The command lines as an operator meets them: `python swarm.py ...` and `pond ...` run as subprocesses.

Exit codes (both tools): 0 ok, 1 error, 2 usage or settings, 3 unreachable, 4 refused.
Errors are `error: ...` plus `hint: ...` lines on stderr, never a traceback.
"""

import json
import os
import re
import socket
import stat
import sys
from pathlib import Path

import pytest

from conftest import JOB_PY, SWARM, Proc, env_for_children, run

SUBCOMMANDS = ("pair", "serve", "worker", "status", "jobs", "cancel")
SLEEPER = [JOB_PY, "-c", "import time; time.sleep(120)"]


def swarm(*args, env=None, cwd=None, timeout=30):
    return run([sys.executable, SWARM, *map(str, args)], timeout=timeout, env=env, cwd=cwd)


def pond_cli(*args, env=None, timeout=30):
    return run([sys.executable, "-m", "pond", *map(str, args)], timeout=timeout, env=env)


def closed_port():
    """A port nothing listens on (bound, then released)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def with_env(**extra):
    env = env_for_children()
    env.update(extra)
    return env


def private_file(path, text):
    path = Path(path)
    path.write_text(text)
    path.chmod(0o600)
    return path


def mode(path):
    return stat.S_IMODE(os.stat(path).st_mode)


def assert_error(done, exit_code, *fragments, hint=True):
    """An operator-facing failure: the exit code, `error:` (and `hint:`) lines, no traceback."""
    where = f"exit {done.returncode}\nstdout: {done.stdout}\nstderr: {done.stderr}"
    assert done.returncode == exit_code, where
    lines = done.stderr.splitlines()
    assert any(line.startswith("error: ") and len(line) > 8 for line in lines), where
    if hint:
        assert any(line.startswith("hint: ") and len(line) > 7 for line in lines), f"no hint line; {where}"
    assert "Traceback" not in done.stderr, where
    for fragment in fragments:
        assert fragment in done.stderr, f"{fragment!r} not in stderr; {where}"


# -- help ---------------------------------------------------------------------------------------------

def test_top_level_help_shows_examples():
    done = swarm("--help")
    assert done.returncode == 0, done.stderr
    assert "examples:" in done.stdout
    for sub in SUBCOMMANDS:
        assert sub in done.stdout, f"--help does not list {sub}"
    assert "swarm.py worker --orchestrator" in done.stdout


@pytest.mark.parametrize("sub", SUBCOMMANDS)
def test_each_subcommand_has_help(sub):
    done = swarm(sub, "--help")
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith(f"usage: swarm.py {sub}"), done.stdout[:200]


# -- usage errors: exit 2 with error and hint ---------------------------------------------------------

# (what, argv after `swarm.py` with {dir} for a fresh directory, extra environment, words stderr must have)
USAGE_ERRORS = [
    ("serve without an operator token", ["serve", "--bind", "127.0.0.1:0", "--state-dir", "{dir}/s"], {},
     ["operator token"]),
    ("serve without backend-handle.json", ["serve", "--bind", "127.0.0.1:0", "--state-dir", "{dir}/s"],
     {"SWARM_TOKEN": "t0ken"}, ["backend-handle.json"]),
    ("serve with a bad --bind", ["serve", "--bind", "nope", "--state-dir", "{dir}/s"], {"SWARM_TOKEN": "t0ken"},
     ["--bind"]),
    ("serve with a port out of range", ["serve", "--bind", "127.0.0.1:70000", "--state-dir", "{dir}/s"],
     {"SWARM_TOKEN": "t0ken"}, ["--bind"]),
    ("worker with --concurrency 0", ["worker", "--orchestrator", "http://127.0.0.1:9", "--concurrency", "0",
                                     "--state-dir", "{dir}/w"], {}, ["--concurrency"]),
    ("worker with a bad --tags entry", ["worker", "--orchestrator", "http://127.0.0.1:9", "--tags",
                                        "pool:trusted,bad tag!", "--state-dir", "{dir}/w"], {}, ["--tags", "bad tag!"]),
    ("worker with a capability glob that claims any sandbox", ["worker", "--orchestrator", "http://127.0.0.1:9",
                                                               "--capabilities", "*", "--state-dir", "{dir}/w"], {},
     ["sandbox"]),
    ("worker with a bad enrollment code", ["worker", "--orchestrator", "http://127.0.0.1:9", "--enroll-code",
                                           "not a code!", "--state-dir", "{dir}/w"], {}, ["--enroll-code"]),
    ("worker with an orchestrator URL that is not http", ["worker", "--orchestrator", "ftp://host/x",
                                                          "--enroll-code", "ABCD-EFGH-JKMN", "--state-dir", "{dir}/w"],
     {}, ["ftp://host/x"]),
    ("pair without --code", ["pair", "--pond", "http://127.0.0.1:9", "--out", "{dir}/h.json"], {}, ["code"]),
    ("pair with a pond URL that is not http", ["pair", "--pond", "localhost:8001", "--code", "ABCD-EFGH-JKMN",
                                               "--out", "{dir}/h.json"], {}, ["localhost:8001"]),
    ("status without a token", ["status", "--orchestrator", "http://127.0.0.1:9"], {}, ["token"]),
    ("status without --orchestrator or serve.json", ["status", "--state-dir", "{dir}/none"], {"SWARM_TOKEN": "x"},
     ["orchestrator"]),
]


def test_usage_errors_exit_2_with_error_and_hint(tmp_path, subtests):
    for i, (what, argv, extra_env, fragments) in enumerate(USAGE_ERRORS):
        with subtests.test(what):
            d = tmp_path / f"case{i}"
            d.mkdir()
            done = swarm(*[a.replace("{dir}", str(d)) for a in argv], env=with_env(**extra_env), cwd=d)
            assert_error(done, 2, *fragments)


def test_serve_refuses_a_handle_others_can_read(tmp_path):
    handle = tmp_path / "backend-handle.json"
    handle.write_text(json.dumps({"pond_url": "http://127.0.0.1:9", "binding_id": "o_x", "token": "orch.o_x.s",
                                  "protocol_version": 1}))
    handle.chmod(0o644)
    done = swarm("serve", "--bind", "127.0.0.1:0", "--state-dir", tmp_path / "s", "--handle", handle,
                 env=with_env(SWARM_TOKEN="t0ken"), cwd=tmp_path)
    assert_error(done, 2, "chmod 600")


def test_pair_against_a_closed_port_exits_3_with_a_hint(tmp_path):
    done = swarm("pair", "--pond", f"http://127.0.0.1:{closed_port()}", "--code", "ABCD-EFGH-JKMN",
                 "--out", tmp_path / "h.json")
    assert_error(done, 3, "cannot reach")
    assert not (tmp_path / "h.json").exists()


def test_pair_with_an_unknown_code_exits_4(pool, tmp_path):
    pond = pool.pond()
    done = swarm("pair", "--pond", pond.url, "--code", "ABCD-EFGH-JKMN", "--out", tmp_path / "h.json")
    assert_error(done, 4, "not known")
    assert not (tmp_path / "h.json").exists()


# -- operator commands against a running orchestrator ------------------------------------------------

def test_operator_commands_print_tables_json_and_refuse_a_wrong_token(pool, tmp_path):
    pond = pool.pond()
    orch = pool.orchestrator(pond, token="op-secret")
    worker = pool.worker(pond, orch, tags="lane:cli")
    by_dir = ["--state-dir", orch.state_dir, "--token-file", orch.token_file]   # serve.json names the URL
    by_url = ["--orchestrator", orch.url()]
    env = with_env(SWARM_TOKEN="op-secret")

    done = swarm("status", *by_dir)
    assert done.returncode == 0, done.stderr
    # pond_reachable turns true only when the first held poll returns, so it may still say no here.
    assert done.stdout.startswith(("pond reachable: yes;", "pond reachable: no;")), done.stdout
    header, *rows = done.stdout.splitlines()[1:]
    assert header.split() == ["ID", "NAME", "ONLINE", "EVICTED", "SLOTS", "RUNNING", "TAGS", "CAPABILITIES", "LAST",
                              "SEEN"]
    assert any(row.startswith(worker.worker_id) for row in rows), done.stdout

    done = swarm("status", *by_url, "--json", env=env)
    assert done.returncode == 0, done.stderr
    assert worker.worker_id in [w["id"] for w in json.loads(done.stdout)["workers"]]

    job = pond.submit(SLEEPER, tags=["lane:cli"])
    pond.wait_job(job["id"], ("running",))
    done = swarm("jobs", *by_url, env=env)
    assert done.returncode == 0, done.stderr
    header, *rows = done.stdout.splitlines()
    assert header.split() == ["ID", "STATE", "EXIT", "WORKER", "ENDED", "COMMAND"]
    assert any(row.split()[:4] == [job["id"], "running", "-", worker.worker_id] for row in rows), done.stdout
    done = swarm("jobs", *by_dir, "--json")
    assert done.returncode == 0, done.stderr
    assert job["id"] in [j["job_id"] for j in json.loads(done.stdout)["jobs"]]

    wrong = private_file(tmp_path / "wrong-token", "not-the-secret")
    for argv in (["status"], ["jobs"], ["cancel", job["id"]]):
        done = swarm(*argv, *by_url, "--token-file", wrong)
        assert_error(done, 4, "not valid")
    assert pond.job(job["id"])["state"] == "running", "a refused cancel must not stop the job"

    done = swarm("cancel", job["id"], *by_dir)
    assert done.returncode == 0, done.stderr
    assert f"{job['id']}: cancel sent" in done.stdout
    ended = pond.wait_job(job["id"], timeout=20)
    assert ended["state"] == "cancelled", ended
    # Ended jobs too, as `pond jobs` shows them: exit code, when, the command quoted on one line, escapes shown.
    odd = pond.submit([JOB_PY, "-c", "import sys\nsys.exit(3)", "\x1b[31mred"], tags=["lane:cli"])
    pond.wait_job(odd["id"])
    done = swarm("jobs", *by_url, env=env)
    assert done.returncode == 0 and "\x1b" not in done.stdout, done.stdout
    header, *rows = done.stdout.splitlines()
    assert [row.split()[:4] for row in rows[:2]] == [[odd["id"], "failed", "3", worker.worker_id],
                                                     [job["id"], "cancelled", "143", worker.worker_id]], done.stdout
    assert re.fullmatch(r"\d+s", rows[0].split()[4]) and rows[0].split()[5] == "ago", rows[0]
    assert "'import sys\\x0asys.exit(3)' '\\x1b[31mred'" in rows[0], rows[0]

    done = swarm("cancel", "j_000000000000", *by_url, env=env)
    assert_error(done, 4, "not held")


def test_operator_command_against_a_stopped_orchestrator_exits_3(tmp_path):
    done = swarm("status", "--orchestrator", f"http://127.0.0.1:{closed_port()}", env=with_env(SWARM_TOKEN="x"))
    assert_error(done, 3, "cannot reach")


# -- the pond CLI ----------------------------------------------------------------------------------------

def test_pond_jobs_without_a_running_pond_names_pond_up(tmp_path):
    done = pond_cli("--state-dir", tmp_path, "jobs")
    assert_error(done, 2, "pond up")


def test_pond_jobs_against_a_dead_pond_exits_3(tmp_path):
    token = private_file(tmp_path / "token", "pond_admin_x")
    done = pond_cli("--pond", f"http://127.0.0.1:{closed_port()}", "--token-file", token, "jobs")
    assert_error(done, 3, "cannot reach pond")


def test_pond_cli_refusals_and_usage(pool):
    pond = pool.pond()
    done = pond.cli("job", "nope")
    assert_error(done, 4, "'nope' does not exist")
    done = pond.cli("submit")
    assert_error(done, 2, "no command")
    done = pond.cli("submit", "--")
    assert_error(done, 2, "no command")
    done = pond.cli("submit", "--env", "NOEQUALS", "--", "true")
    assert_error(done, 2, "NOEQUALS")
    done = pond.cli("submit", "--sandbox", "{not json", "--", "true")
    assert_error(done, 2, "--sandbox")
    done = pond.cli("submit", "--sandbox", '{"profile": "bogus"}', "--", "true")
    assert_error(done, 4, "bogus")
    assert pond.client.get("/v1/jobs")["jobs"] == [], "no refused submit may create a job"


# -- secrets: not on command lines, files 0600 in 0700 directories ------------------------------------

def cmdline(proc):
    return Path(f"/proc/{proc.proc.pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()


def test_tokens_stay_off_command_lines_and_in_private_files(pool, tmp_path):
    pond = pool.pond()
    orch = pool.orchestrator(pond, token="file-secret-7f3a")        # given with --token-file
    worker = pool.worker(pond, orch)
    handle = orch.state_dir / "backend-handle.json"
    binding_token = json.loads(handle.read_text())["token"]
    worker_token = json.loads((worker.state_dir / "worker.json").read_text())["token"]

    assert "file-secret-7f3a" not in cmdline(orch)
    assert binding_token not in cmdline(orch)
    assert worker_token not in cmdline(worker)
    assert pond.token not in cmdline(pond.proc)

    # SWARM_TOKEN: a second orchestrator takes its token from the environment only.
    state = tmp_path / "env-orch"
    state.mkdir()
    paired = swarm("pair", "--pond", pond.url, "--code", pond.pairing_code(), "--out", state / "backend-handle.json")
    assert paired.returncode == 0, paired.stderr
    env = with_env(SWARM_TOKEN="env-secret-91c2")
    second = Proc([sys.executable, SWARM, "serve", "--bind", "127.0.0.1:0", "--state-dir", str(state),
                   "--poll-wait", "5", "--claim-wait", "5"], tmp_path / "env-orch.log", env=env)
    pool.procs.append(second)              # so the pool stops it
    url = second.url()
    assert "env-secret-91c2" not in cmdline(second)
    done = swarm("status", "--orchestrator", url, env=env)
    assert done.returncode == 0, f"the token from SWARM_TOKEN did not work: {done.stderr}"

    for path in (handle, state / "backend-handle.json", worker.state_dir / "worker.json",
                 pond.state_dir / "admin-token"):
        assert mode(path) == 0o600, f"{path} has mode {oct(mode(path))}"
        assert mode(path.parent) == 0o700, f"{path.parent} has mode {oct(mode(path.parent))}"


def test_pair_creates_the_handle_directory_private(pool, tmp_path):
    pond = pool.pond()
    out = tmp_path / "new" / "dir" / "backend-handle.json"
    done = swarm("pair", "--pond", pond.url, "--code", pond.pairing_code(), "--out", out)
    assert done.returncode == 0, done.stderr
    assert mode(out) == 0o600
    assert mode(out.parent) == 0o700, f"pair created {out.parent} with mode {oct(mode(out.parent))}"

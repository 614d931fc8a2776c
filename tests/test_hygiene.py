"""Small leftovers of issue 9, each a way the servers misbehaved on input a user can give: a path's
secret echoed in an answer (items 5's redaction missed pond's 404/405), an empty environment
setting that gave a traceback, a full disk at start that gave a traceback, and a slow body from a
client without a token that held a thread. Real processes on port 0."""

import socket
import sys
import time

import pytest

from conftest import SWARM, env_for_children, run
from test_faults import small_disk
from test_slow_clients import address, closed_within


def test_pond_s_404_and_405_answers_do_not_echo_a_code_or_token_in_the_path(pool):
    pond = pool.pond()
    code = pond.enrollment_code(uses=5)                 # a live, multi-use code
    token = "wkr.abcdef012345.s3cr3tS3cr3tS3cr3t"
    for method, path, status in (("GET", f"/v1/orch/enrollment/{code}/consumed", 405),
                                 ("GET", f"/v1/orch/enrollment/{code}/nope", 404),
                                 ("GET", f"/v1/nope/{token}", 404)):
        got, answer = pond.api(method, path)
        assert got == status, (method, path, got, answer)
        text = str(answer)
        assert code not in text and token not in text and "s3cr3t" not in text, answer
        assert "[redacted]" in answer["error"]["message"], answer


POND_SERVE_ENV = ("POND_BIND", "POND_STATE_DIR", "POND_POLL_HOLD", "POND_LEASE", "POND_MAX_ATTEMPTS", "POND_LOG_CAP",
                  "POND_ADMIN_TOKEN", "POND_CREDENTIAL_KEY_FILE", "POND_ALLOW_UNSIGNED_RESULTS", "POND_REQUIRE_SANDBOX")


def refused(done, name):
    assert done.returncode == 2, f"{name}: exit {done.returncode}: {done.stderr[-600:]}"
    assert "Traceback" not in done.stderr, done.stderr
    assert f"{name} is set but empty" in done.stderr, done.stderr


@pytest.mark.parametrize("name", POND_SERVE_ENV)
def test_pond_serve_refuses_an_empty_environment_setting_by_name(tmp_path, name):
    env = dict(env_for_children(), **{name: ""})
    flags = () if name == "POND_STATE_DIR" else ("--state-dir", str(tmp_path / "p"))
    flags += () if name == "POND_BIND" else ("--bind", "127.0.0.1:0")
    refused(run([sys.executable, "-m", "pond", "serve", *flags], timeout=30, env=env), name)


@pytest.mark.parametrize("name, argv", [
    ("POND_URL", ("jobs",)), ("POND_ADMIN_TOKEN", ("jobs",)), ("POND_CA_FILE", ("jobs",)),
    ("POND_RETRY_FOR", ("jobs",)), ("POND_STATE_DIR", ("verify", "j_x"))])
def test_the_pond_cli_refuses_an_empty_environment_setting_by_name(tmp_path, name, argv):
    env = dict(env_for_children(), POND_URL="http://127.0.0.1:9", POND_ADMIN_TOKEN="pond_admin_x")
    env[name] = ""
    refused(run([sys.executable, "-m", "pond", *argv], timeout=30, env=env, cwd=tmp_path), name)


@pytest.mark.parametrize("name, argv", [("SWARM_TOKEN", ("serve", "--bind", "127.0.0.1:0")),
                                        ("SWARM_ENROLL_CODE", ("worker", "--orchestrator", "http://127.0.0.1:9"))])
def test_swarm_refuses_an_empty_environment_setting_by_name(tmp_path, name, argv):
    env = dict(env_for_children(), **{name: ""})
    refused(run([sys.executable, SWARM, *argv, "--state-dir", str(tmp_path / "s")], timeout=30, env=env), name)


def test_started_on_a_full_disk_each_server_exits_with_one_clear_error(pool, tmp_path):
    """pond serve, swarm.py serve and swarm.py worker whose state dir is on a full disk exit 1 with
    `storage unavailable` and a hint, not a traceback: a supervisor restarts them once it has room."""
    pond = pool.pond()
    with small_disk(pool, tmp_path / "disk", "1m") as disk:
        handle = disk.path / "serve" / "backend-handle.json"
        handle.parent.mkdir(mode=0o700)
        paired = run([sys.executable, SWARM, "pair", "--pond", pond.url, "--code", pond.pairing_code(),
                      "--out", str(handle)])
        assert paired.returncode == 0, paired.stderr
        disk.fill()
        for argv in ([sys.executable, "-m", "pond", "serve", "--state-dir", str(disk.path / "pond"),
                      "--bind", "127.0.0.1:0"],
                     [sys.executable, SWARM, "serve", "--state-dir", str(handle.parent), "--bind", "127.0.0.1:0",
                      "--token", "x"],
                     [sys.executable, SWARM, "worker", "--state-dir", str(disk.path / "worker"),
                      "--orchestrator", "http://127.0.0.1:9", "--enroll-code", "ABCD-EFGH-JKMN"]):
            done = run(argv, timeout=30)
            what = " ".join(argv[1:4])
            assert done.returncode == 1, f"{what}: exit {done.returncode}: {done.stderr[-800:]}"
            assert "Traceback" not in done.stderr, done.stderr
            assert "error: storage unavailable:" in done.stderr and "hint: free space" in done.stderr, done.stderr
        disk.free()


@pytest.fixture(params=["pond", "orchestrator"])
def slow_body_server(request, pool):
    """-> (url, a route that needs a token, an open route that takes a body) on a server with a 1 s
    head timeout and a 3 s request timeout."""
    flags = ("--head-timeout", "1", "--request-timeout", "3")
    if request.param == "pond":
        return pool.pond(extra=flags).url, "/v1/jobs", "/v1/orch/pair"
    return pool.orchestrator(pool.pond(), extra=flags).url(), "/v1/worker/claim", "/v1/worker/enroll"


def answer_to_a_head_without_its_body(url, path, token=None):
    """Send a POST head announcing 100 bytes of body, and none of them. -> (status line, seconds)."""
    with socket.create_connection(address(url), timeout=10) as sock:
        auth = f"Authorization: Bearer {token}\r\n" if token else ""
        start = time.monotonic()
        sock.sendall(f"POST {path} HTTP/1.1\r\nHost: x\r\n{auth}Content-Length: 100\r\n\r\n".encode())
        line = sock.recv(4096).split(b"\r\n", 1)[0]
        took = time.monotonic() - start
        assert closed_within(sock, 2.0) is not None, "the connection stays open with its body unread"
    return line, took


def test_a_slow_body_without_a_valid_token_is_refused_before_it_is_read(slow_body_server):
    url, private, public = slow_body_server
    for token in (None, "wkr.aaaaaaaaaaaa.bbbbbbbbbbbbbbbb"):
        line, took = answer_to_a_head_without_its_body(url, private, token)
        assert line.split()[1] in (b"401", b"403") and took < 0.8, (line, took)   # not the 3 s body wait
    # An open route reads the body, but gives it the head timeout (1 s), not the request timeout.
    line, took = answer_to_a_head_without_its_body(url, public)
    assert line.split()[1] == b"400" and 0.8 < took < 2.5, (line, took)

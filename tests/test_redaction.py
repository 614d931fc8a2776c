"""No code or token in any log line (issue 9, item 5).

`pond serve --access-log` wrote `/v1/orch/enrollment/{code}/consumed` with a live, multi-use
enrollment code in clear. Now every line pond and swarm.py log, and every error message
that names a request, goes through one redact() per codebase (pond/tokens.py, swarm.py
"Utilities"): path segments that carry a code, secret query parameters, token headers and
anything shaped like a code or bearer token become [redacted]; the route shape stays.

A) One list of cases, run against both implementations.
B) The HTTP clients of both sides, answered without JSON by a foreign server (a proxy's
   error page), name the request without the code.
C) A real pond with --access-log, a real orchestrator and worker: pair, enroll, run a job,
   and send pond requests that carry codes and tokens where they do not belong; then no
   log file and no captured output of any process holds any of them.
"""

import json
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

import swarm
from conftest import JOB_PY, SWARM, run
from pond import client, server, tokens

CODE = "ABCD-EFGH-JKMN"
TOKEN = "orch.o_0123456789ab.c2VjcmV0LXNlY3JldC1zZWNyZXQ"

# (text as it would be logged, what the log line says instead)
CASES = [
    (f"POST /v1/orch/enrollment/{CODE}/consumed 201", "POST /v1/orch/enrollment/[redacted]/consumed 201"),
    ("POST /v1/orch/enrollment/abcdefghjkmn/consumed", "POST /v1/orch/enrollment/[redacted]/consumed"),
    ("POST /v1/orch/enrollment/AB%20CD?x=1", "POST /v1/orch/enrollment/[redacted]?x=1"),
    ("GET /v1/jobs?state=queued&token=s3cret", "GET /v1/jobs?state=queued&token=[redacted]"),
    ("GET /v1/jobs?access_token=s3cret&limit=5", "GET /v1/jobs?access_token=[redacted]&limit=5"),
    ("GET /x?code=ABCD&API_KEY=k&password=p&sig=s#f", "GET /x?code=[redacted]&API_KEY=[redacted]&password=[redacted]"
                                                      "&sig=[redacted]#f"),
    (f"GET /v1/orch/{TOKEN}/whoami", "GET /v1/orch/[redacted]/whoami"),
    ("pond_admin_Zm9vYmFy-_x in a message", "[redacted] in a message"),
    (f"Authorization: Bearer {TOKEN}", "Authorization: [redacted]"),
    ("x-claim-token: abc123\nContent-Length: 2", "x-claim-token: [redacted]\nContent-Length: 2"),
    ("Proxy-Authorization:Basic dXNlcjpwYXNz", "Proxy-Authorization:[redacted]"),
    ("sent bearer abc.def, then", "sent bearer [redacted], then"),
    (f"the code {CODE} was typed", "the code [redacted] was typed"),
    # What carries no secret is left as it is.
    ("GET /v1/jobs/j_0123456789ab/logs?after=0&wait=20 200", "GET /v1/jobs/j_0123456789ab/logs?after=0&wait=20 200"),
    ("POST /v1/admin/pool/enrollment-codes 201", "POST /v1/admin/pool/enrollment-codes 201"),
    ("POST /v1/orch/jobs/j_0123456789ab/state 200", "POST /v1/orch/jobs/j_0123456789ab/state 200"),
]
REDACTORS = {"pond": tokens.redact, "swarm": swarm.redact}
CLEANERS = {"pond": server._clean, "swarm": swarm.clean}


@pytest.mark.parametrize("impl", sorted(REDACTORS))
def test_both_sides_redact_codes_and_tokens_alike(impl, subtests):
    for text, expected in CASES:
        with subtests.test(text):
            assert REDACTORS[impl](text) == expected


@pytest.mark.parametrize("impl", sorted(CLEANERS))
def test_a_log_line_is_redacted_before_it_is_cut_short(impl):
    # Cut first, the code would lose its tail and its shape, and its first 8 characters would stay.
    assert CLEANERS[impl]("x" * 188 + f" {CODE}") == "x" * 188 + " [redacted]"


class NotPond(BaseHTTPRequestHandler):
    """A foreign server in front of pond (a proxy's error page): every answer is HTML."""

    def do_POST(self):
        self.rfile.read(int(self.headers.get("Content-Length") or 0))
        body = b"<html>404 not here</html>"
        self.send_response(404)
        self.send_header("Content-Type", "text/html")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args):
        pass


@pytest.fixture
def not_pond():
    server = ThreadingHTTPServer(("127.0.0.1", 0), NotPond)
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05})
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()
        thread.join(5)


def test_client_errors_name_the_request_without_its_code(not_pond):
    path = f"/v1/orch/enrollment/{CODE}/consumed"
    with pytest.raises(swarm.Refused) as caught:
        swarm.HttpClient(not_pond, what="pond").call("POST", path, {})
    assert CODE not in caught.value.message
    assert "POST /v1/orch/enrollment/[redacted]/consumed answered 404" in caught.value.message
    with pytest.raises(client.ClientError) as caught:
        client.Client(not_pond, "t").post(path)
    assert CODE not in caught.value.message
    assert "POST /v1/orch/enrollment/[redacted]/consumed answered 404" in caught.value.message


def test_no_code_or_token_reaches_any_log(pool, tmp_path):
    pond = pool.pond(extra=("--access-log",))
    # Pair by hand, to know the pairing code; then the orchestrator, and a worker enrolled with a known code.
    orch_dir = tmp_path / "orch"
    orch_dir.mkdir()
    pairing_code = pond.pairing_code()
    done = run([sys.executable, SWARM, "pair", "--pond", pond.url, "--code", pairing_code,
                "--out", str(orch_dir / "backend-handle.json")])
    assert done.returncode == 0, done.stderr
    orch_token = json.loads((orch_dir / "backend-handle.json").read_text())["token"]
    orch = pool.orchestrator(pond, state=orch_dir)
    code = pond.enrollment_code(uses=3)
    worker = pool.worker(pond, orch, code=code)
    worker_token = json.loads((worker.state_dir / "worker.json").read_text())["token"]
    job = pond.submit([JOB_PY, "-c", "print('hi')"])
    assert pond.wait_job(job["id"])["state"] == "done"

    # Codes and tokens where they do not belong, straight at pond: each request is logged.
    raw = code.replace("-", "").lower()
    assert pond.api("POST", f"/v1/orch/enrollment/{raw}/consumed", {"name": "w2"}, token=orch_token)[0] == 201
    for path in (f"/v1/orch/enrollment/{code}%20x/consumed", f"/v1/orch/{orch_token}/whoami",
                 f"/v1/orch/whoami?access_token={worker_token}"):
        pond.api("GET", path, token=orch_token)
    pond.api("GET", f"/v1/jobs?state=queued&token={pond.token}")
    pool.stop_all()

    secrets = {"pairing code": pairing_code, "enrollment code": code, "enrollment code as typed": raw,
               "code without dashes": code.replace("-", ""), "admin token": pond.token,
               "binding token": orch_token, "worker token": worker_token,
               "binding token's secret": orch_token.split(".")[2], "worker token's secret": worker_token.split(".")[2]}
    logs = {path.name: path.read_text(errors="replace") for path in tmp_path.glob("*.log")}
    logs.update({f"{proc.argv[2]} stdout": "\n".join(proc.lines) for proc in pool.procs})
    assert len(logs) >= 6
    for name, text in logs.items():
        for what, secret in secrets.items():
            assert secret not in text, f"the {what} is in {name}"
    access = next(text for name, text in logs.items() if name.startswith("pond"))
    for line in ("POST /v1/orch/pair 201", "POST /v1/orch/enrollment/[redacted]/consumed 201",
                 "GET /v1/orch/enrollment/[redacted]/consumed 404", "GET /v1/orch/[redacted]/whoami 404",
                 "GET /v1/jobs?state=queued&token=[redacted] 400", "GET /v1/orch/whoami?access_token=[redacted] 400",
                 "POST /v1/orch/workers/snapshot 200"):
        assert line in access, f"{line!r} is not in pond's access log"

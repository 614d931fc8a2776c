"""Bad input at every endpoint of pond and of the orchestrator: always a JSON 4xx, never a 5xx, never a crash.

The sweep is a catalogue: one Case per bad request (method, path, auth, headers, body -> expected status
and error code), grouped by endpoint. Each group runs against real processes from the `pool` fixture,
one case per subtest, and ends by checking that the server is healthy and that what it accepted before
the sweep is still there. Every request goes over a raw socket, so a case can send what an HTTP client
library refuses to (NUL bytes, bad request lines, wrong Content-Length).

Placeholders like <job> in a path, header, auth or body string are filled from the world the group
built (see PondWorld / OrchestratorWorld).

Then the protocol checks of reports (fencing by attempt and claim token, bindings, duplicates), driven
by hand through the orchestrator protocol, and a hypothesis fuzz of POST /v1/jobs.
"""

import json
import re
import socket
from dataclasses import dataclass
from urllib.parse import urlsplit

from hypothesis import HealthCheck, given, settings, strategies as st

from conftest import JOB_PY, wait_for

NO_BODY = object()
MIB = 1024 * 1024
UNKNOWN_JOB = "j_000000000000"
UNKNOWN_CODE = "ABCD-EFGH-JKMN"                 # well formed, never minted
DEEP_JSON = b"[" * 100_000 + b"]" * 100_000       # valid JSON, nested deeper than any parser's recursion
BIG_INT = b"9" * 5000                             # over Python's 4300-digit int parsing limit


@dataclass(frozen=True)
class Case:
    """One bad request and the answer it must get."""

    what: str
    method: str = "GET"
    path: str = "/"
    body: object = NO_BODY          # a JSON value to send, or NO_BODY
    raw: bytes = None               # a body sent as is (overrides `body`)
    auth: str = None                # "admin" | "orch" | "orch_b" | "worker" | "operator" | a literal header value
    headers: tuple = ()             # extra (name, value) pairs
    request: bytes = None           # the whole request, sent as is (overrides everything above)
    status: object = 400            # an int, or a tuple of acceptable ints
    code: object = "bad_request"    # the error code, a tuple of acceptable codes, or None for any
    says: str = ""                  # a word the message or hint must contain (a field name, a value)
    silent_ok: bool = False         # the server may also just close the connection without an answer

    @property
    def label(self):
        return f"{self.method} {self.path}: {self.what}"


# -- sending -------------------------------------------------------------------------------------------

PLACEHOLDER = re.compile(r"<([a-z_]+)>")


def fill(value, ctx):
    """Replace <name> placeholders (known names only) in strings, recursively."""
    if isinstance(value, str):
        return PLACEHOLDER.sub(lambda m: str(ctx[m[1]]) if m[1] in ctx else m[0], value)
    if isinstance(value, list):
        return [fill(v, ctx) for v in value]
    if isinstance(value, dict):
        return {fill(k, ctx): fill(v, ctx) for k, v in value.items()}
    return value


def build_request(case, ctx):
    if case.request is not None:
        return case.request
    headers = [("Host", "test"), ("Connection", "close"), ("Content-Type", "application/json")]
    if case.auth is not None:
        auth = ctx["tokens"].get(case.auth)
        headers.append(("Authorization", f"Bearer {auth}" if auth else fill(case.auth, ctx)))
    headers += [(name, fill(value, ctx)) for name, value in case.headers]
    if case.raw is not None:
        body = case.raw
    elif case.body is not NO_BODY:
        body = json.dumps(fill(case.body, ctx)).encode()
    else:
        body = None
    if body is not None and not any(name.lower() == "content-length" for name, _ in headers):
        headers.append(("Content-Length", str(len(body))))
    head = f"{case.method} {fill(case.path, ctx)} HTTP/1.1\r\n" + "".join(f"{n}: {v}\r\n" for n, v in headers)
    return (head + "\r\n").encode("latin-1") + (body or b"")


def exchange(url, data, timeout=20, half_close=True):
    """Send bytes on a fresh connection; -> (status or None if closed silently, decoded body).

    A sweep case half-closes after sending, so a server waiting for bytes that never
    come (a short body) answers at once. A well-formed call (api) must not: a held
    poll or claim takes a half-closed connection for a client that hung up.
    """
    parts = urlsplit(url)
    with socket.create_connection((parts.hostname, parts.port), timeout=timeout) as sock:
        try:
            sock.sendall(data)
            if half_close:
                sock.shutdown(socket.SHUT_WR)
        except OSError:
            pass                    # the server may answer (413, 431) and close before reading it all
        answer = b""
        try:
            while chunk := sock.recv(65536):
                answer += chunk
        except ConnectionResetError:
            pass
    if not answer:
        return None, None
    head, _, body = answer.partition(b"\r\n\r\n")
    status = int(head.split(b" ", 2)[1])
    length = re.search(rb"(?im)^content-length:\s*(\d+)", head)
    if length:
        body = body[:int(length[1])]
    try:
        return status, json.loads(body)
    except ValueError:
        return status, body.decode(errors="replace")


def check(case, status, payload):
    where = f"{case.label}\n  got {status}: {str(payload)[:400]}"
    if status is None:
        assert case.silent_ok, f"no answer at all; {where}"
        return
    assert status < 500, f"a 5xx for bad input; {where}"
    wanted = case.status if isinstance(case.status, tuple) else (case.status,)
    assert status in wanted, f"expected {wanted}; {where}"
    if status < 400 or case.method == "HEAD":     # a tolerated oddity, or an answer that has no body by HTTP
        return
    assert isinstance(payload, dict) and set(payload) == {"error"}, f"not a JSON error body; {where}"
    err = payload["error"]
    assert isinstance(err, dict) and {"code", "message", "hint"} <= set(err), f"error lacks code/message/hint; {where}"
    assert isinstance(err["code"], str) and err["code"], where
    assert isinstance(err["message"], str) and err["message"], where
    assert isinstance(err["hint"], str), where
    if case.code is not None:
        codes = case.code if isinstance(case.code, tuple) else (case.code,)
        assert err["code"] in codes, f"expected code {codes}; {where}"
    if case.says:
        assert case.says in err["message"] + " " + err["hint"], f"the error does not mention {case.says!r}; {where}"


def sweep(url, cases, ctx, subtests):
    for case in cases:
        with subtests.test(msg=case.label):
            status, payload = exchange(url, build_request(case, ctx))
            check(case, status, payload)


def api(url, method, path, body=NO_BODY, auth=None, headers=()):
    """A well-formed request (for building worlds and checking outcomes): -> (status, JSON)."""
    case = Case("api", method, path, body=body, auth=auth, headers=tuple(headers))
    return exchange(url, build_request(case, {"tokens": {}}), half_close=False)


# -- case builders shared by the catalogues -------------------------------------------------------------

def admin_auth_cases(method, path, body=NO_BODY):
    return [
        Case("no Authorization header", method, path, body, status=401, code="unauthorized"),
        Case("Basic instead of Bearer", method, path, body, auth="Basic YWRtaW46YWRtaW4=", status=401,
             code="unauthorized"),
        Case("bearer in lower case", method, path, body, auth="bearer <admin_token>", status=401,
             code="unauthorized"),
        Case("an empty bearer token", method, path, body, auth="Bearer ", status=(401, 403),
             code=("unauthorized", "token_invalid")),
        Case("a wrong admin token", method, path, body, auth="Bearer pond_admin_wrong", status=403,
             code="token_invalid"),
        Case("an orchestrator token", method, path, body, auth="orch", status=403, code="token_invalid"),
        Case("the admin token with a byte too many", method, path, body, auth="Bearer <admin_token>x",
             status=403, code="token_invalid"),
        Case("a token of non-ASCII bytes", method, path, body, auth="Bearer \xc3\xa9\xff", status=403,
             code="token_invalid"),
    ]


def orch_auth_cases(method, path, body=NO_BODY, headers=()):
    return [
        Case("no Authorization header", method, path, body, headers=headers, status=401, code="unauthorized"),
        Case("a garbled bearer token", method, path, body, auth="Bearer garbage", headers=headers, status=401,
             code="unauthorized"),
        Case("a token with an empty id", method, path, body, auth="Bearer orch..secret", headers=headers,
             status=401, code="unauthorized"),
        Case("a token of the wrong kind", method, path, body, auth="Bearer wkr.<binding>.secret", headers=headers,
             status=401, code="unauthorized"),
        Case("the admin token", method, path, body, auth="admin", headers=headers, status=401, code="unauthorized"),
        Case("an unknown binding", method, path, body, auth="Bearer orch.o_000000000000.secret", headers=headers,
             status=403, code="token_invalid"),
        Case("the right binding with a wrong secret", method, path, body, auth="Bearer orch.<binding>.wrong",
             headers=headers, status=403, code="token_invalid"),
        Case("a token of non-ASCII bytes", method, path, body, auth="Bearer orch.\xc3\xa9.\xff", headers=headers,
             status=(401, 403), code=("unauthorized", "token_invalid")),
    ]


def body_shape_cases(method, path, auth, valid, headers=(), null_ok=False, list_ok=False):
    """A body that is not JSON, JSON that is not an object (a list may be a batch: `list_ok`),
    and an object with an unknown field."""
    cases = [
        Case("a body that is not JSON", method, path, raw=b"{command: nope", auth=auth, headers=headers),
        Case("a body cut short", method, path, raw=b'{"a": [1, 2', auth=auth, headers=headers),
        Case("a body that is not UTF-8", method, path, raw=b'{"a": "\xff\xfe"}', auth=auth, headers=headers),
        Case("a body of NUL bytes", method, path, raw=b"\x00" * 16, auth=auth, headers=headers),
        Case("JSON nested 100000 deep", method, path, raw=DEEP_JSON, auth=auth, headers=headers),
        Case("a 5000-digit number", method, path, raw=b'{"n": ' + BIG_INT + b"}", auth=auth, headers=headers),
        *([] if list_ok else [Case("a JSON list", method, path, [valid], auth=auth, headers=headers)]),
        Case("a JSON string", method, path, "hello", auth=auth, headers=headers),
        Case("a JSON number", method, path, 42, auth=auth, headers=headers),
        Case("JSON true", method, path, True, auth=auth, headers=headers),
        Case("an unknown field", method, path, dict(valid, bogus_field=1), auth=auth, headers=headers,
             says="bogus_field"),
    ]
    if not null_ok:
        cases.append(Case("JSON null", method, path, None, auth=auth, headers=headers))
    return cases


def get_body_cases(method, path, auth):
    """A GET ignores its body, but a body that is not JSON is still refused by the HTTP layer."""
    return [
        Case("a GET with a body that is not JSON", method, path, raw=b"not json", auth=auth),
        Case("a GET with a body nested 100000 deep", method, path, raw=DEEP_JSON, auth=auth),
    ]


def protocol_cases(post_path, get_path, header_cap=True):
    """HTTP-level abuse, the same for pond and the orchestrator."""
    big_headers = "".join(f"X-Filler-{i}: {'a' * 1000}\r\n" for i in range(17))
    head = f"POST {post_path} HTTP/1.1\r\nHost: test\r\nConnection: close\r\n"
    cases = [
        Case("raw garbage instead of a request line", "RAW", "-", request=b"\x00\x01\x02garbage\r\n\r\n",
             code="protocol"),
        Case("a request line of three random words", "RAW", "-", request=b"HELLO THERE FRIEND\r\n\r\n",
             status=(400, 505), code="protocol"),
        Case("a request line with too many words", "RAW", "-", request=b"GET / / HTTP/1.1\r\n\r\n", code="protocol"),
        Case("a binary request line", "RAW", "-", request=bytes(range(1, 256)) + b"\r\n\r\n", code="protocol"),
        Case("an HTTP/0.9 request", "RAW", "-", request=b"GET /\r\n\r\n", status=(400, 404),
             code=("protocol", "not_found"), silent_ok=True),
        Case("an empty request", "RAW", "-", request=b"\r\n\r\n", code="protocol", silent_ok=True),
        Case("a request line of 70000 bytes", "RAW", "-", request=b"GET /" + b"a" * 70_000 + b" HTTP/1.1\r\n\r\n",
             status=414, code="protocol"),
        Case("a header line without a colon", "GET", get_path,
             request=f"GET {get_path} HTTP/1.1\r\nConnection: close\r\nno colon here\r\n\r\n".encode(),
             status=400, code="protocol"),
        Case("a header name with a space", "GET", get_path,
             request=f"GET {get_path} HTTP/1.1\r\nConnection: close\r\nX Bad: 1\r\n\r\n".encode(),
             status=400, code="protocol"),
        Case("HTTP/1.2", "RAW", "-", request=f"GET {get_path} HTTP/1.2\r\n\r\n".encode(), status=400,
             code="protocol"),
        Case("two Content-Length headers", "POST", post_path,
             request=f"{head}Content-Length: 2\r\nContent-Length: 3\r\n\r\n{{}}".encode(), status=400,
             code="protocol"),
        Case("headers over 16 KiB", "GET", get_path, request=f"GET {get_path} HTTP/1.1\r\nConnection: close\r\n"
             f"{big_headers}\r\n".encode(), status=431, code="headers_too_large"),
        Case("a header line over 64 KiB", "GET", get_path, request=f"GET {get_path} HTTP/1.1\r\nX-Long: "
             f"{'a' * 70_000}\r\n\r\n".encode(), status=431, code="headers_too_large"),
        Case("more than 100 headers", "GET", get_path, request=f"GET {get_path} HTTP/1.1\r\n".encode()
             + b"".join(b"X-%d: y\r\n" % i for i in range(150)) + b"\r\n", status=431,
             code="headers_too_large"),
        Case("a body over 4 MiB (declared)", "POST", post_path,
             request=f"{head}Content-Length: {4 * MIB + 1}\r\n\r\n".encode(), status=413, code="payload_too_large"),
        Case("a body over 4 MiB (sent)", "POST", post_path,
             request=f"{head}Content-Length: {4 * MIB + 1}\r\n\r\n".encode() + b"x" * (4 * MIB + 1), status=413,
             code="payload_too_large"),
        Case("Transfer-Encoding: chunked", "POST", post_path,
             request=f"{head}Transfer-Encoding: chunked\r\n\r\n2\r\n{{}}\r\n0\r\n\r\n".encode()),
        Case("Content-Length that is not a number", "POST", post_path,
             request=f"{head}Content-Length: ten\r\n\r\n{{}}".encode()),
        Case("a negative Content-Length", "POST", post_path, request=f"{head}Content-Length: -1\r\n\r\n{{}}".encode()),
        Case("Content-Length in exponent form", "POST", post_path,
             request=f"{head}Content-Length: 1e1\r\n\r\n{{}}".encode()),
        Case("Content-Length in superscript digits", "POST", post_path,
             request=head.encode() + b"Content-Length: \xb2\r\n\r\n{}"),
        Case("Content-Length of 10**30", "POST", post_path,
             request=f"{head}Content-Length: {10 ** 30}\r\n\r\n{{}}".encode(), status=413, code="payload_too_large"),
        Case("a body shorter than its Content-Length", "POST", post_path,
             request=f"{head}Content-Length: 100\r\n\r\n{{}}".encode()),
        Case("a header value with a NUL byte", "POST", post_path,
             request=f"{head}X-Nul: a\x00b\r\nContent-Length: 1\r\n\r\n[".encode()),
        Case("an unknown method", "BREW", get_path, status=405, code="method_not_allowed"),
        Case("OPTIONS", "OPTIONS", get_path, status=405, code="method_not_allowed"),
        Case("TRACE", "TRACE", get_path, status=405, code="method_not_allowed"),
        Case("PATCH", "PATCH", get_path, status=405, code="method_not_allowed"),
        Case("HEAD", "HEAD", post_path, status=405, code="method_not_allowed"),
        Case("DELETE", "DELETE", get_path, status=405, code="method_not_allowed"),
        Case("the root path", "GET", "/", status=404, code="not_found"),
        Case("a path with a trailing slash", "GET", get_path + "/", status=404, code="not_found"),
        Case("a path in upper case", "GET", get_path.upper(), status=404, code="not_found"),
        Case("a path with a dot-dot", "GET", "/v1/../healthz", status=404, code="not_found"),
        Case("a percent-encoded path", "GET", "/%68ealthz", status=404, code="not_found"),
        Case("an absolute-form URL", "GET", "http://evil.example/nothing", status=404, code="not_found"),
        Case("a path of 8000 bytes", "GET", "/" + "a" * 8000, status=404, code="not_found"),
        Case("a path with non-ASCII bytes", "GET", "/v1/\xe9\xff", status=404, code="not_found"),
    ]
    if not header_cap:
        cases = [c for c in cases if c.what != "headers over 16 KiB"]
    return cases


# -- pond: the world a sweep runs in ---------------------------------------------------------------------

class PondWorld:
    """A pond with: a queued job nobody can take (kept), a job assigned to binding A by a real poll,
    a job binding A finished unsigned, a credential (kept) and a queued job that names it, a second
    binding B, a worker of A, and fresh and used pairing/enrollment codes."""

    def __init__(self, pool):
        # The worker below is enrolled by hand without keys: unsigned results must be allowed for it to
        # get jobs. Signed results and their refusals are swept in test_results.py.
        self.pond = pond = pool.pond(poll_hold=1, extra=("--allow-unsigned-results",))
        self.url = pond.url
        self.kept = pond.submit([JOB_PY, "-c", "print('kept')"], tags=["lane:kept"], name="kept")["id"]
        self.victim = pond.submit(["true"], tags=["lane:kept"], name="victim")["id"]
        self.binding, self.token_a = self.pair("alpha")
        self.binding_b, self.token_b = self.pair("beta")
        self.used_pcode = pond.pairing_code()
        self.pair("gamma", self.used_pcode)
        self.used_ecode = pond.enrollment_code()
        self.worker = self.enroll(self.token_a, self.used_ecode)
        self.online(self.token_a, self.worker)
        self.assigned, self.claim_token = self.assign(["lane:manual"])
        self.finished, self.finished_claim = self.assign(["lane:manual"])
        status, body = self.report(self.finished, {"attempt": 1, "state": "done", "exit_code": 0},
                                   self.finished_claim)
        assert status == 200 and body["state"] == "done", body
        self.credential = pond.client.post("/v1/admin/credentials", KEPT_CREDENTIAL)
        self.sealed = pond.submit(["true"], tags=["lane:nobody"], credential="kept")["id"]
        self.ctx = {
            "tokens": {"admin": pond.token, "orch": self.token_a, "orch_b": self.token_b},
            "admin_token": pond.token, "binding": self.binding, "job": self.kept, "victim": self.victim,
            "assigned": self.assigned, "claim": self.claim_token, "worker": self.worker,
            "finished": self.finished, "finished_claim": self.finished_claim, "sealed": self.sealed,
            "pcode": pond.pairing_code(), "used_pcode": self.used_pcode,
            "ecode": pond.enrollment_code(), "used_ecode": self.used_ecode,
        }

    def pair(self, name, code=None):
        status, body = api(self.url, "POST", "/v1/orch/pair", {"code": code or self.pond.pairing_code(), "name": name})
        assert status == 201, body
        return body["binding_id"], body["token"]

    def enroll(self, token, code, tags=("lane:manual",)):
        status, body = api(self.url, "POST", f"/v1/orch/enrollment/{code}/consumed",
                           {"name": "manual", "tags": list(tags), "capabilities": ["harness.*", "sandbox.process"], "slots": 4},
                           auth=f"Bearer {token}")
        assert status == 201, body
        return body["worker_id"]

    def online(self, token, worker, tags=("lane:manual",)):
        status, body = api(self.url, "POST", "/v1/orch/workers/snapshot",
                           {"workers": [{"id": worker, "tags": list(tags), "capabilities": ["harness.*", "sandbox.process"],
                                         "slots": 4, "online": True}]}, auth=f"Bearer {token}")
        assert status == 200 and body["unknown"] == [], body

    def assign(self, tags, token=None):
        """Submit a job for binding A's worker and take its assignment with a real poll."""
        job = self.pond.submit([JOB_PY, "-c", "pass"], tags=tags)["id"]
        status, body = api(self.url, "POST", "/v1/orch/poll", {"wait": 0}, auth=f"Bearer {token or self.token_a}")
        assert status == 200 and [j["job_id"] for j in body["jobs"]] == [job], body
        assignment = body["jobs"][0]
        assert assignment["attempt"] == 1 and assignment["worker"] == self.worker, assignment
        return job, assignment["claim_token"]

    def report(self, job, body, claim, token=None, kind="state"):
        return api(self.url, "POST", f"/v1/orch/jobs/{job}/{kind}", body, auth=f"Bearer {token or self.token_a}",
                   headers=[("X-Claim-Token", claim)])

    def assert_intact(self):
        """Healthy, and nothing accepted before the sweep was lost or changed."""
        status, body = api(self.url, "GET", "/healthz")
        assert status == 200 and body["ok"] is True, body
        kept = self.pond.job(self.kept)
        assert kept["state"] == "queued" and kept["command"][-1] == "print('kept')", kept
        assert self.pond.job(self.victim)["state"] == "queued", "a refused request cancelled a job"
        assigned = self.pond.job(self.assigned)
        assert (assigned["state"], assigned["attempt"]) == ("assigned", 1), assigned
        bindings = {o["id"] for o in self.pond.client.get("/v1/admin/pool/orchestrators")["orchestrators"]}
        assert {self.binding, self.binding_b} <= bindings
        assert self.pond.job(self.finished)["state"] == "done"
        listed = self.pond.client.get("/v1/admin/credentials")["credentials"]
        assert listed == [self.credential], f"a refused request stored, changed or deleted a credential: {listed}"


# -- pond catalogue ------------------------------------------------------------------------------------

KEPT_SECRET = "kept-secret-value"
KEPT_CREDENTIAL = {"name": "kept", "provider": "anthropic", "env": {"KEPT_REGION": "eu"},
                   "secrets": {"KEPT_TOKEN": KEPT_SECRET}}

def submit(what, body=NO_BODY, **kw):
    return Case(what, "POST", "/v1/jobs", body, auth="admin", **kw)


def job_with(**fields):
    return dict({"command": ["true"], "sandbox": {"profile": "none"}}, **fields)


def bad_sandbox(what, sandbox, says, code="sandbox_invalid", **fields):
    """A job whose sandbox block pond refuses: 422 naming the field (specs/sandbox.md §5)."""
    return submit(what, job_with(sandbox=sandbox, **fields), status=422, code=code, says=says)


WRITE = "untrusted-code-write"


POND_SUBMIT_CASES = [
    *admin_auth_cases("POST", "/v1/jobs", job_with()),
    *body_shape_cases("POST", "/v1/jobs", "admin", job_with(), list_ok=True),
    # a batch (a list of jobs): all valid or none stored, the bad one named by its index
    submit("an empty batch", [], says="batch"),
    submit("a batch of 1001 jobs", [job_with()] * 1001, says="batch"),
    submit("a batch with a string", [job_with(), "true"], says="jobs[1]"),
    submit("a batch with a job without a sandbox", [job_with(), {"command": ["true"]}], status=422,
           code="sandbox_required", says="jobs[1]"),
    submit("a batch with a bad tag", [job_with(tags=["no spaces"])], says="jobs[0]"),
    submit("a batch of batches", [[job_with()]], says="jobs[0]"),
    # command
    # A pattern's `$` also matches before a final newline: every name ends at \Z, so these are refused.
    submit("a tag ending in a newline", job_with(tags=["repo:acme\n"]), says="tags"),
    submit("a capability ending in a newline", job_with(capabilities=["harness.codex\n"]), says="capabilities"),
    submit("an env name ending in a newline", job_with(env={"MODE\n": "x"}), says="env"),
    submit("a name ending in a newline", job_with(name="build\n"), says="name"),
    submit("a credential name ending in a newline", job_with(credential="kept\n"), says="credential"),
    submit("no command", {}, says="command"),
    submit("command null", job_with(command=None), says="command"),
    submit("command a string", job_with(command="ls -l"), says="command"),
    submit("command an empty list", job_with(command=[]), says="command"),
    submit("command an object", job_with(command={"0": "ls"}), says="command"),
    submit("command with a number", job_with(command=["ls", 1]), says="command[1]"),
    submit("command with null", job_with(command=[None]), says="command[0]"),
    submit("command with a list", job_with(command=[["ls"]]), says="command[0]"),
    submit("command with an empty program", job_with(command=[""]), says="command[0]"),
    submit("command with a NUL byte", job_with(command=["ls", "a\x00b"]), says="command[1]"),
    submit("command with a lone surrogate", job_with(command=["echo", "\ud800"]), says="command[1]"),
    submit("command with a 33 KiB argument", job_with(command=["echo", "x" * (33 * 1024)]), says="command[1]"),
    submit("command with 257 arguments", job_with(command=["echo"] * 257), says="command"),
    # env
    submit("env a list", job_with(env=["A=1"]), says="env"),
    submit("env a string", job_with(env="A=1"), says="env"),
    submit("env with a bad name", job_with(env={"1BAD": "x"}), says="env"),
    submit("env with an empty name", job_with(env={"": "x"}), says="env"),
    submit("env with a name with '='", job_with(env={"A=B": "x"}), says="env"),
    submit("env with a number value", job_with(env={"A": 1}), says="env"),
    submit("env with a null value", job_with(env={"A": None}), says="env"),
    submit("env with a NUL in a value", job_with(env={"A": "x\x00y"}), says="env"),
    submit("env with a 40 KiB value", job_with(env={"A": "x" * 40_000}), says="env"),
    submit("env with 129 names", job_with(env={f"V{i}": "x" for i in range(129)}), says="env"),
    # tags
    submit("tags a string", job_with(tags="repo:acme"), says="tags"),
    submit("tags an object", job_with(tags={"repo": "acme"}), says="tags"),
    submit("tags with a number", job_with(tags=[1]), says="tags[0]"),
    submit("tags with null", job_with(tags=[None]), says="tags[0]"),
    submit("tags with a list", job_with(tags=[["a"]]), says="tags[0]"),
    submit("tags with an empty string", job_with(tags=[""]), says="tags[0]"),
    submit("tags with a space", job_with(tags=["repo acme"]), says="tags[0]"),
    submit("tags with a NUL byte", job_with(tags=["a\x00"]), says="tags[0]"),
    submit("tags with a 200-character tag", job_with(tags=["a" * 200]), says="tags[0]"),
    submit("tags with 65 tags", job_with(tags=[f"t{i}" for i in range(65)]), says="tags"),
    # capabilities
    submit("capabilities a string", job_with(capabilities="harness.codex"), says="capabilities"),
    submit("capabilities with a glob", job_with(capabilities=["harness.*"]), says="capabilities[0]"),
    submit("capabilities in upper case", job_with(capabilities=["Harness"]), says="capabilities[0]"),
    submit("capabilities with a number", job_with(capabilities=[7]), says="capabilities[0]"),
    submit("capabilities with an empty string", job_with(capabilities=[""]), says="capabilities[0]"),
    # sandbox (tests/test_sandbox_policy.py has the rules; these are the shapes)
    submit("no sandbox", {"command": ["true"]}, status=422, code="sandbox_required", says="sandbox"),
    submit("sandbox null", job_with(sandbox=None), status=422, code="sandbox_required", says="sandbox"),
    bad_sandbox("sandbox a string", "none", "sandbox"),
    bad_sandbox("sandbox a list", ["none"], "sandbox"),
    bad_sandbox("sandbox without a profile", {"tier": "any"}, "profile"),
    bad_sandbox("sandbox with an unknown field", {"profile": "none", "profle": "none"}, "profle"),
    bad_sandbox("sandbox.profile unknown", {"profile": "bogus"}, "bogus"),
    bad_sandbox("sandbox.profile a number", {"profile": 1}, "sandbox.profile"),
    bad_sandbox("sandbox.profile a list", {"profile": ["none"]}, "sandbox.profile"),
    bad_sandbox("sandbox.profile null", {"profile": None}, "sandbox.profile"),
    bad_sandbox("sandbox.tier unknown", {"profile": "none", "tier": "gold"}, "gold"),
    bad_sandbox("sandbox.tier an object", {"profile": "none", "tier": {}}, "sandbox.tier"),
    bad_sandbox("sandbox.tier byo without a tenant", {"profile": "none", "tier": "byo"}, "tenant"),
    bad_sandbox("sandbox.backend empty", {"profile": WRITE, "backend": ""}, "sandbox.backend"),
    bad_sandbox("sandbox.backend with a glob", {"profile": WRITE, "backend": "*"}, "sandbox.backend"),
    bad_sandbox("sandbox.backend a number", {"profile": WRITE, "backend": 3}, "sandbox.backend"),
    bad_sandbox("sandbox.backend null", {"profile": WRITE, "backend": None}, "sandbox.backend"),
    bad_sandbox("sandbox.overrides a list", {"profile": "none", "overrides": []}, "sandbox.overrides"),
    bad_sandbox("sandbox.overrides with an unknown field", {"profile": "none", "overrides": {"gpu": 1}}, "gpu"),
    bad_sandbox("sandbox.overrides.pids_limit (the old name)", {"profile": "none", "overrides": {"pids_limit": 1}},
                "pids_limit"),
    bad_sandbox("sandbox.overrides with a list value", {"profile": "none", "overrides": {"memory": [1]}},
                "sandbox.overrides.memory"),
    bad_sandbox("sandbox.overrides with a boolean", {"profile": "none", "overrides": {"cpus": True}},
                "sandbox.overrides.cpus"),
    bad_sandbox("sandbox.overrides.memory of 65 characters", {"profile": "none", "overrides": {"memory": "1" * 65}},
                "sandbox.overrides.memory"),
    bad_sandbox("sandbox.overrides.memory with a NUL", {"profile": "none", "overrides": {"memory": "1\x00G"}},
                "sandbox.overrides.memory"),
    bad_sandbox("sandbox.allow_hosts a string", {"profile": WRITE, "allow_hosts": "example.org"},
                "sandbox.allow_hosts"),
    bad_sandbox("sandbox.allow_hosts with a lone surrogate", {"profile": WRITE, "allow_hosts": ["\ud800.org"]},
                "sandbox.allow_hosts[0]"),
    # timeout
    submit("timeout 0", job_with(timeout=0), says="timeout"),
    submit("timeout negative", job_with(timeout=-5), says="timeout"),
    submit("timeout over a week", job_with(timeout=604_801), says="timeout"),
    submit("timeout a string", job_with(timeout="60"), says="timeout"),
    submit("timeout a boolean", job_with(timeout=True), says="timeout"),
    submit("timeout a list", job_with(timeout=[60]), says="timeout"),
    submit("timeout NaN", raw=b'{"command": ["true"], "sandbox": {"profile": "none"}, "timeout": NaN}', says="timeout"),
    submit("timeout Infinity", raw=b'{"command": ["true"], "sandbox": {"profile": "none"}, "timeout": Infinity}', says="timeout"),
    submit("timeout 1e400", raw=b'{"command": ["true"], "sandbox": {"profile": "none"}, "timeout": 1e400}', says="timeout"),
    # name and tenant
    submit("name empty", job_with(name=""), says="name"),
    submit("name a number", job_with(name=5), says="name"),
    submit("name with a NUL byte", job_with(name="a\x00b"), says="name"),
    submit("name with a newline", job_with(name="a\nb"), says="name"),
    submit("name of 65 characters", job_with(name="n" * 65), says="name"),
    submit("name of 3 MiB", job_with(name="n" * (3 * MIB)), says="name"),
    submit("tenant empty", job_with(tenant=""), says="tenant"),
    submit("tenant a list", job_with(tenant=["acme"]), says="tenant"),
    submit("tenant with a space", job_with(tenant="ac me"), says="tenant"),
    # credential (the name of one stored with POST /v1/admin/credentials)
    submit("credential a number", job_with(credential=1), says="credential"),
    submit("credential empty", job_with(credential=""), says="credential"),
    submit("credential a list", job_with(credential=["kept"]), says="credential"),
    submit("credential with a space", job_with(credential="ke pt"), says="credential"),
    submit("credential of 65 characters", job_with(credential="k" * 65), says="credential"),
    submit("a credential that does not exist", job_with(credential="absent"), status=(400, 404),
           code=("bad_request", "not_found"), says="absent"),
]


def job_get(what, path, status=404, code="not_found", **kw):
    return Case(what, "GET", path, auth="admin", status=status, code=code, **kw)


POND_JOB_READ_CASES = [
    *admin_auth_cases("GET", "/v1/jobs"),
    *admin_auth_cases("GET", "/v1/jobs/<job>"),
    *admin_auth_cases("GET", "/v1/jobs/<job>/logs"),
    *admin_auth_cases("POST", "/v1/jobs/<victim>/cancel"),
    *get_body_cases("GET", "/v1/jobs", "admin"),
    *get_body_cases("GET", "/v1/jobs/<job>", "admin"),
    *get_body_cases("GET", "/v1/jobs/<job>/logs", "admin"),
    # GET /v1/jobs?state=&limit=
    job_get("state unknown", "/v1/jobs?state=bogus", 400, "bad_request", says="bogus"),
    job_get("state empty", "/v1/jobs?state=", 400, "bad_request"),
    job_get("state in upper case", "/v1/jobs?state=QUEUED", 400, "bad_request"),
    job_get("state with a NUL byte", "/v1/jobs?state=queued%00", 400, "bad_request"),
    job_get("state not UTF-8", "/v1/jobs?state=%FF%FE", 400, "bad_request"),
    job_get("limit not a number", "/v1/jobs?limit=abc", 400, "bad_request", says="limit"),
    job_get("limit empty", "/v1/jobs?limit=", 400, "bad_request", says="limit"),
    job_get("limit 0", "/v1/jobs?limit=0", 400, "bad_request", says="limit"),
    job_get("limit negative", "/v1/jobs?limit=-1", 400, "bad_request", says="limit"),
    job_get("limit a fraction", "/v1/jobs?limit=1.5", 400, "bad_request", says="limit"),
    job_get("limit over the cap", "/v1/jobs?limit=1001", 400, "bad_request", says="limit"),
    job_get("limit of 400 digits", "/v1/jobs?limit=" + "9" * 400, 400, "bad_request", says="limit"),
    job_get("limit in superscript digits", "/v1/jobs?limit=%C2%B2", 400, "bad_request", says="limit"),
    job_get("a query parameter pond does not take", "/v1/jobs?stat=queued", 400, "bad_request", says="stat"),
    job_get("tag empty", "/v1/jobs?tag=", 400, "bad_request", says="tag"),
    job_get("worker not an id", "/v1/jobs?worker=..%2F", 400, "bad_request", says="worker"),
    job_get("logs with a query parameter it does not take", "/v1/jobs/<job>/logs?cursor=3", 400, "bad_request",
            says="cursor"),
    # GET /v1/jobs/{id}
    job_get("a job that does not exist", f"/v1/jobs/{UNKNOWN_JOB}", says=UNKNOWN_JOB),
    job_get("a job id of 65 characters", "/v1/jobs/" + "j" * 65),
    job_get("a job id with a dot", "/v1/jobs/j_1.2"),
    job_get("a job id with a percent-encoded NUL", "/v1/jobs/j_%00"),
    job_get("a job id with a space", "/v1/jobs/j%201"),
    job_get("an empty job id", "/v1/jobs//logs"),
    # GET /v1/jobs/{id}/logs?after=&wait=&limit=
    job_get("logs of a job that does not exist", f"/v1/jobs/{UNKNOWN_JOB}/logs"),
    job_get("logs after=-1", "/v1/jobs/<job>/logs?after=-1", 400, "bad_request", says="after"),
    job_get("logs after not a number", "/v1/jobs/<job>/logs?after=abc", 400, "bad_request", says="after"),
    job_get("logs after over 2**62", f"/v1/jobs/<job>/logs?after={2 ** 62 + 1}", 400, "bad_request", says="after"),
    job_get("logs wait negative", "/v1/jobs/<job>/logs?wait=-1", 400, "bad_request", says="wait"),
    job_get("logs wait a fraction", "/v1/jobs/<job>/logs?wait=0.5", 400, "bad_request", says="wait"),
    job_get("logs wait over an hour", "/v1/jobs/<job>/logs?wait=3601", 400, "bad_request", says="wait"),
    job_get("logs limit 0", "/v1/jobs/<job>/logs?limit=0", 400, "bad_request", says="limit"),
    job_get("logs limit over the cap", "/v1/jobs/<job>/logs?limit=5001", 400, "bad_request", says="limit"),
    # GET /v1/jobs/{id}/attestation: only a signed result has one (these workers have no keys)
    *admin_auth_cases("GET", "/v1/jobs/<finished>/attestation"),
    *get_body_cases("GET", "/v1/jobs/<finished>/attestation", "admin"),
    job_get("the attestation of a job that does not exist", f"/v1/jobs/{UNKNOWN_JOB}/attestation", says=UNKNOWN_JOB),
    job_get("the attestation of a queued job", "/v1/jobs/<job>/attestation", says="not finished"),
    job_get("the attestation of an assigned job", "/v1/jobs/<assigned>/attestation", says="not finished"),
    job_get("the attestation of a job finished unsigned", "/v1/jobs/<finished>/attestation", says="unsigned"),
    job_get("the attestation of a malformed job id", "/v1/jobs/a.b/attestation"),
    job_get("the attestation of a job id of 65 characters", "/v1/jobs/" + "j" * 65 + "/attestation"),
    Case("POST on an attestation", "POST", "/v1/jobs/<finished>/attestation", {}, auth="admin", status=405,
         code="method_not_allowed"),
    # GET /v1/jobs/{id}/explain; POST /v1/jobs/explain: a spec, validated as a submit, nothing stored
    *admin_auth_cases("GET", "/v1/jobs/<job>/explain"),
    *get_body_cases("GET", "/v1/jobs/<job>/explain", "admin"),
    job_get("explain a job that does not exist", f"/v1/jobs/{UNKNOWN_JOB}/explain", says=UNKNOWN_JOB),
    job_get("explain a malformed job id", "/v1/jobs/a.b/explain"),
    *admin_auth_cases("POST", "/v1/jobs/explain", job_with()),
    *body_shape_cases("POST", "/v1/jobs/explain", "admin", job_with()),
    Case("explain a spec without a command", "POST", "/v1/jobs/explain", {"sandbox": {"profile": "none"}},
         auth="admin", says="command"),
    Case("explain a spec with an unknown profile", "POST", "/v1/jobs/explain", job_with(sandbox={"profile": "x"}),
         auth="admin", status=422, code="sandbox_invalid", says="profile"),
    # POST /v1/jobs/{id}/cancel: a refused cancel must not cancel the victim
    Case("cancel a job that does not exist", "POST", f"/v1/jobs/{UNKNOWN_JOB}/cancel", auth="admin", status=404,
         code="not_found"),
    Case("cancel with a malformed id", "POST", "/v1/jobs/not.an.id/cancel", auth="admin", status=404,
         code="not_found"),
    *body_shape_cases("POST", "/v1/jobs/<victim>/cancel", "admin", {}),
    Case("GET on cancel", "GET", "/v1/jobs/<victim>/cancel", auth="admin", status=405, code="method_not_allowed"),
    Case("DELETE on a job", "DELETE", "/v1/jobs/<victim>", auth="admin", status=405, code="method_not_allowed"),
]


def admin_post(what, path, body, **kw):
    return Case(what, "POST", path, body, auth="admin", **kw)


PAIRING_CODES = "/v1/admin/pool/pairing-codes"
ENROLLMENT_CODES = "/v1/admin/pool/enrollment-codes"
REVOKE_BINDING = "/v1/admin/pool/orchestrators/o_unknown"
REVOKE_WORKER = "/v1/admin/pool/workers/w_unknown"

POND_ADMIN_CASES = [
    *get_body_cases("GET", "/healthz", None),
    *get_body_cases("GET", "/metrics", None),
    Case("POST on /healthz", "POST", "/healthz", {}, status=405, code="method_not_allowed"),
    Case("PUT on /metrics", "PUT", "/metrics", status=405, code="method_not_allowed"),
    *get_body_cases("GET", "/v1/openapi.json", None),
    Case("POST on /v1/openapi.json", "POST", "/v1/openapi.json", {}, status=405, code="method_not_allowed"),
    *get_body_cases("GET", "/ui/", None),
    Case("POST on the console", "POST", "/ui/", {}, status=405, code="method_not_allowed"),
    Case("a file the console does not have", "GET", "/ui/console.py", status=404, code="not_found"),
    Case("a dot-dot under /ui/", "GET", "/ui/..", status=404, code="not_found"),
    # pairing codes
    *admin_auth_cases("POST", PAIRING_CODES, {}),
    *body_shape_cases("POST", PAIRING_CODES, "admin", {"ttl": 60}),
    admin_post("ttl under 30 s", PAIRING_CODES, {"ttl": 29}, says="ttl"),
    admin_post("ttl over a week", PAIRING_CODES, {"ttl": 604_801}, says="ttl"),
    admin_post("ttl a fraction", PAIRING_CODES, {"ttl": 60.5}, says="ttl"),
    admin_post("ttl a string", PAIRING_CODES, {"ttl": "60"}, says="ttl"),
    admin_post("ttl a boolean", PAIRING_CODES, {"ttl": True}, says="ttl"),
    admin_post("ttl 10**30", PAIRING_CODES, {"ttl": 10 ** 30}, says="ttl"),
    admin_post("name empty", PAIRING_CODES, {"name": ""}, says="name"),
    admin_post("name a list", PAIRING_CODES, {"name": ["orch"]}, says="name"),
    admin_post("name with a NUL byte", PAIRING_CODES, {"name": "o\x00"}, says="name"),
    admin_post("name of 100 KiB", PAIRING_CODES, {"name": "o" * 100_000}, says="name"),
    Case("GET on pairing codes", "GET", PAIRING_CODES, auth="admin", status=405, code="method_not_allowed"),
    admin_post("scope a string", PAIRING_CODES, {"scope": "pool:byo"}, says="scope"),
    admin_post("scope empty", PAIRING_CODES, {"scope": []}, says="scope"),
    admin_post("scope with a space in a tag", PAIRING_CODES, {"scope": ["pool byo"]}, says="scope"),
    admin_post("scope with a number", PAIRING_CODES, {"scope": [1]}, says="scope"),
    # enrollment codes
    *admin_auth_cases("POST", ENROLLMENT_CODES, {}),
    *body_shape_cases("POST", ENROLLMENT_CODES, "admin", {"uses": 2}),
    admin_post("uses 0", ENROLLMENT_CODES, {"uses": 0}, says="uses"),
    admin_post("uses over 10000", ENROLLMENT_CODES, {"uses": 10_001}, says="uses"),
    admin_post("uses negative", ENROLLMENT_CODES, {"uses": -1}, says="uses"),
    admin_post("uses a string", ENROLLMENT_CODES, {"uses": "2"}, says="uses"),
    admin_post("uses a fraction", ENROLLMENT_CODES, {"uses": 1.5}, says="uses"),
    admin_post("ttl under 30 s", ENROLLMENT_CODES, {"ttl": 1}, says="ttl"),
    admin_post("ttl null in a list", ENROLLMENT_CODES, {"ttl": [None]}, says="ttl"),
    admin_post("fingerprint in upper case", ENROLLMENT_CODES, {"fingerprint": "AB" * 32}, says="fingerprint"),
    admin_post("fingerprint of 63 characters", ENROLLMENT_CODES, {"fingerprint": "a" * 63}, says="fingerprint"),
    admin_post("fingerprint a number", ENROLLMENT_CODES, {"fingerprint": 42}, says="fingerprint"),
    admin_post("fingerprint empty", ENROLLMENT_CODES, {"fingerprint": ""}, says="fingerprint"),
    admin_post("tags a string", ENROLLMENT_CODES, {"tags": "pool:byo"}, says="tags"),
    admin_post("tags empty", ENROLLMENT_CODES, {"tags": []}, says="tags"),
    admin_post("tags with a NUL byte", ENROLLMENT_CODES, {"tags": ["a\x00"]}, says="tags"),
    # revocation (unknown ids only: the sweep must not revoke the world it runs in)
    *admin_auth_cases("DELETE", REVOKE_BINDING),
    *admin_auth_cases("DELETE", REVOKE_WORKER),
    Case("revoke an unknown orchestrator", "DELETE", REVOKE_BINDING, auth="admin", status=404, code="not_found"),
    Case("revoke an unknown worker", "DELETE", REVOKE_WORKER, auth="admin", status=404, code="not_found"),
    Case("revoke an orchestrator with a body", "DELETE", REVOKE_BINDING, {}, auth="admin"),
    Case("revoke a worker with a body", "DELETE", REVOKE_WORKER, {"why": "x"}, auth="admin"),
    Case("revoke a worker id with a dot", "DELETE", "/v1/admin/pool/workers/w.1", auth="admin", status=404,
         code="not_found"),
    Case("revoke a worker id of 65 characters", "DELETE", "/v1/admin/pool/workers/" + "w" * 65, auth="admin",
         status=404, code="not_found"),
    Case("revoke every orchestrator", "DELETE", "/v1/admin/pool/orchestrators", auth="admin", status=405,
         code="method_not_allowed"),
    Case("POST on a worker", "POST", REVOKE_WORKER, {}, auth="admin", status=405, code="method_not_allowed"),
    # eviction (unknown ids only, as for revocation)
    *admin_auth_cases("POST", REVOKE_WORKER + "/evict", {}),
    *body_shape_cases("POST", REVOKE_WORKER + "/evict", "admin", {}),
    admin_post("evict with drain a string", REVOKE_WORKER + "/evict", {"drain": "yes"}, says="drain"),
    admin_post("evict with drain null", REVOKE_WORKER + "/evict", {"drain": None}, says="drain"),
    admin_post("evict with an unknown field", REVOKE_WORKER + "/evict", {"now": True}, says="now"),
    admin_post("evict an unknown worker", REVOKE_WORKER + "/evict", {}, status=404, code="not_found"),
    admin_post("evict a worker id with a dot", "/v1/admin/pool/workers/w.1/evict", {}, status=404,
               code="not_found"),
    Case("GET on evict", "GET", REVOKE_WORKER + "/evict", auth="admin", status=405, code="method_not_allowed"),
    # listings
    *admin_auth_cases("GET", "/v1/admin/pool/orchestrators"),
    *admin_auth_cases("GET", "/v1/admin/pool/workers"),
    *get_body_cases("GET", "/v1/admin/pool/orchestrators", "admin"),
    *get_body_cases("GET", "/v1/admin/pool/workers", "admin"),
    Case("POST on the worker list", "POST", "/v1/admin/pool/workers", {}, auth="admin", status=405,
         code="method_not_allowed"),
    Case("an unknown admin path", "GET", "/v1/admin/pool/secrets", auth="admin", status=404, code="not_found"),
]


CREDENTIALS = "/v1/admin/credentials"
KEPT = "/v1/admin/credentials/kept"


def credential_with(**fields):
    return dict({"name": "fresh", "secrets": {"FRESH_TOKEN": KEPT_SECRET}}, **fields)


def put_credential(what, body=NO_BODY, **kw):
    return Case(what, "POST", CREDENTIALS, body, auth="admin", **kw)


# Every refused request here carries KEPT_SECRET, and none may store anything (PondWorld.assert_intact)
# or say the secret back (test_pond_credential_endpoints_refuse_bad_input).
POND_CREDENTIAL_CASES = [
    # POST /v1/admin/credentials
    *admin_auth_cases("POST", CREDENTIALS, credential_with(name="intruder")),
    *body_shape_cases("POST", CREDENTIALS, "admin", credential_with()),
    put_credential("no body", says="name"),
    put_credential("no name", {"secrets": {"A": KEPT_SECRET}}, says="name"),
    put_credential("name null", credential_with(name=None), says="name"),
    put_credential("name a number", credential_with(name=7), says="name"),
    put_credential("name empty", credential_with(name=""), says="name"),
    put_credential("name with a space", credential_with(name="my key"), says="name"),
    put_credential("name with a slash", credential_with(name="a/b"), says="name"),
    put_credential("name starting with a dot", credential_with(name=".hidden"), says="name"),
    put_credential("name starting with a dash", credential_with(name="-x"), says="name"),
    put_credential("name of 65 characters", credential_with(name="n" * 65), says="name"),
    put_credential("name with a NUL byte", credential_with(name="a\x00"), says="name"),
    put_credential("name with a newline", credential_with(name="a\nb"), says="name"),
    put_credential("name with a trailing newline", credential_with(name="a\n"), says="name"),
    put_credential("name not ASCII", credential_with(name="cl\u00e9"), says="name"),
    put_credential("name with a lone surrogate", credential_with(name="a\ud800"), says="name"),
    put_credential("no secrets", {"name": "fresh", "env": {"A": "1"}}, says="secrets"),
    put_credential("secrets null", credential_with(secrets=None), says="secrets"),
    put_credential("secrets empty", credential_with(secrets={}), says="secrets"),
    put_credential("secrets a list", credential_with(secrets=["A=" + KEPT_SECRET]), says="secrets"),
    put_credential("secrets a string", credential_with(secrets=KEPT_SECRET), says="secrets"),
    put_credential("secrets with a bad name", credential_with(secrets={"1BAD": KEPT_SECRET}), says="secrets"),
    put_credential("secrets with an empty name", credential_with(secrets={"": KEPT_SECRET}), says="secrets"),
    put_credential("secrets with a name with '='", credential_with(secrets={"A=B": KEPT_SECRET}), says="secrets"),
    put_credential("secrets with a name ending in a newline", credential_with(secrets={"A\n": KEPT_SECRET}),
                   says="secrets"),
    put_credential("secrets with a number value", credential_with(secrets={"A": 1}), says="secrets"),
    put_credential("secrets with a null value", credential_with(secrets={"A": None}), says="secrets"),
    put_credential("secrets with an object value", credential_with(secrets={"A": {"v": KEPT_SECRET}}),
                   says="secrets"),
    put_credential("secrets with a NUL in a value", credential_with(secrets={"A": KEPT_SECRET + "\x00"}),
                   says="secrets"),
    put_credential("secrets with a 40 KiB value", credential_with(secrets={"A": "x" * 40_000}), says="secrets"),
    put_credential("secrets with 129 names", credential_with(secrets={f"V{i}": KEPT_SECRET for i in range(129)}),
                   says="secrets"),
    put_credential("env a list", credential_with(env=["A=1"]), says="env"),
    put_credential("env a string", credential_with(env="A=1"), says="env"),
    put_credential("env with a bad name", credential_with(env={"1BAD": "x"}), says="env"),
    put_credential("env with a name ending in a newline", credential_with(env={"REGION\n": "eu"}), says="env"),
    put_credential("env with a number value", credential_with(env={"REGION": 1}), says="env"),
    put_credential("env with a NUL in a value", credential_with(env={"REGION": "e\x00u"}), says="env"),
    put_credential("a name in both env and secrets", credential_with(env={"FRESH_TOKEN": "x"}), says="FRESH_TOKEN"),
    put_credential("provider a number", credential_with(provider=1), says="provider"),
    put_credential("provider empty", credential_with(provider=""), says="provider"),
    put_credential("provider in upper case", credential_with(provider="Anthropic"), says="provider"),
    put_credential("provider with a space", credential_with(provider="open ai"), says="provider"),
    put_credential("provider with a trailing newline", credential_with(provider="anthropic\n"), says="provider"),
    put_credential("provider of 65 characters", credential_with(provider="p" * 65), says="provider"),
    # a bad replacement leaves the stored credential as it was
    put_credential("replace kept with empty secrets", dict(KEPT_CREDENTIAL, secrets={}), says="secrets"),
    put_credential("replace kept with a bad secret name", dict(KEPT_CREDENTIAL, secrets={"1BAD": KEPT_SECRET}),
                   says="secrets"),
    put_credential("replace kept with a name in both", dict(KEPT_CREDENTIAL, env={"KEPT_TOKEN": "x"}),
                   says="KEPT_TOKEN"),
    put_credential("replace kept with an unknown field", dict(KEPT_CREDENTIAL, value=KEPT_SECRET), says="value"),
    put_credential("replace kept with a bad provider", dict(KEPT_CREDENTIAL, provider="A B"), says="provider"),
    Case("PUT on credentials", "PUT", CREDENTIALS, credential_with(), auth="admin", status=405,
         code="method_not_allowed"),
    Case("DELETE on credentials", "DELETE", CREDENTIALS, auth="admin", status=405, code="method_not_allowed"),
    # GET /v1/admin/credentials and /v1/admin/credentials/{name}
    *admin_auth_cases("GET", CREDENTIALS),
    *get_body_cases("GET", CREDENTIALS, "admin"),
    *admin_auth_cases("GET", KEPT),
    *get_body_cases("GET", KEPT, "admin"),
    Case("a credential that does not exist", "GET", CREDENTIALS + "/absent", auth="admin", status=404,
         code="not_found", says="absent"),
    Case("a credential name in another case", "GET", CREDENTIALS + "/KEPT", auth="admin", status=404,
         code="not_found"),
    Case("a credential name of 65 characters", "GET", CREDENTIALS + "/" + "k" * 65, auth="admin", status=404,
         code="not_found"),
    Case("a credential name with a space", "GET", CREDENTIALS + "/ke%20pt", auth="admin", status=404,
         code="not_found"),
    Case("a credential name with a percent-encoded NUL", "GET", CREDENTIALS + "/kept%00", auth="admin",
         status=404, code="not_found"),
    Case("a credential name starting with a dot", "GET", CREDENTIALS + "/.kept", auth="admin", status=404,
         code="not_found"),
    Case("a credential path with a dot-dot", "GET", CREDENTIALS + "/../credentials", auth="admin", status=404,
         code="not_found"),
    Case("POST on a credential", "POST", KEPT, credential_with(name="kept"), auth="admin", status=405,
         code="method_not_allowed"),
    # DELETE /v1/admin/credentials/{name}: unknown or refused only, the sweep must not delete kept
    *admin_auth_cases("DELETE", KEPT),
    Case("delete a credential that does not exist", "DELETE", CREDENTIALS + "/absent", auth="admin", status=404,
         code="not_found"),
    Case("delete a credential name of 65 characters", "DELETE", CREDENTIALS + "/" + "k" * 65, auth="admin",
         status=404, code="not_found"),
    Case("delete a credential name with a slash", "DELETE", CREDENTIALS + "/kept/x", auth="admin", status=404,
         code="not_found"),
    Case("delete a credential with a body", "DELETE", KEPT, {"why": "x"}, auth="admin"),
]


HARNESSES, MODELS = "/v1/admin/harnesses", "/v1/admin/models"
HARNESS = {"key": "fresh", "capability": "harness.fresh", "command_template": ["fresh", "{{PROMPT}}"]}
MODEL = {"key": "fresh", "provider": "openai", "model_id": "m", "credential": "kept", "base_url": "https://x.test/v1"}

# Harnesses and models (specs/agents.md): a bad shape is 400, a bad field 422 naming it; nothing is stored.
POND_AGENT_CASES = [
    *admin_auth_cases("POST", HARNESSES, HARNESS),
    *body_shape_cases("POST", HARNESSES, "admin", HARNESS),
    Case("a harness without its command", "POST", HARNESSES, {"key": "x", "capability": "harness.x"}, auth="admin",
         says="command_template"),
    Case("a harness with an unknown placeholder", "POST", HARNESSES, dict(HARNESS, command_template=["x", "{{KEY}}"]),
         auth="admin", status=422, code="registry_invalid", says="command_template[1]"),
    Case("a harness file outside HOME", "POST", HARNESSES, dict(HARNESS, files=[{"path": "../x", "content": ""}]),
         auth="admin", status=422, code="registry_invalid", says="files[0].path"),
    Case("a harness file that is absolute", "POST", HARNESSES, dict(HARNESS, files=[{"path": "/x", "content": ""}]),
         auth="admin", status=422, code="registry_invalid", says="files[0].path"),
    Case("a harness key with a slash", "POST", HARNESSES, dict(HARNESS, key="a/b"), auth="admin", status=422,
         code="registry_invalid", says="key"),
    *admin_auth_cases("POST", MODELS, MODEL),
    *body_shape_cases("POST", MODELS, "admin", MODEL),
    Case("a model of an unknown provider", "POST", MODELS, dict(MODEL, provider="x"), auth="admin", status=422,
         code="registry_invalid", says="provider"),
    Case("a model over plain http", "POST", MODELS, dict(MODEL, base_url="http://x.test/v1"), auth="admin",
         status=422, code="registry_invalid", says="base_url"),
    Case("a model with no such credential", "POST", MODELS, dict(MODEL, credential="absent"), auth="admin",
         status=422, code="registry_invalid", says="credential"),
    *[c for path in (HARNESSES, MODELS, HARNESSES + "/kept", MODELS + "/kept") for c in admin_auth_cases("GET", path)],
    Case("a harness that does not exist", "GET", HARNESSES + "/absent", auth="admin", status=404, code="not_found"),
    Case("a model that does not exist", "GET", MODELS + "/absent", auth="admin", status=404, code="not_found"),
    Case("delete a harness that does not exist", "DELETE", HARNESSES + "/absent", auth="admin", status=404,
         code="not_found"),
    Case("delete a model that does not exist", "DELETE", MODELS + "/absent", auth="admin", status=404, code="not_found"),
    *admin_auth_cases("DELETE", HARNESSES + "/absent"),
    *admin_auth_cases("DELETE", MODELS + "/absent"),
    *admin_auth_cases("GET", "/v1/jobs/<job>/usage"),
    *admin_auth_cases("GET", "/v1/usage"),
    Case("usage by something unknown", "GET", "/v1/usage?by=colour", auth="admin", says="by"),
    Case("usage since that is not a number", "GET", "/v1/usage?since=yesterday", auth="admin", says="since"),
    Case("usage until before 1970", "GET", "/v1/usage?until=-5", auth="admin", says="until"),
    Case("the usage of a job that is not an agent's", "GET", "/v1/jobs/<job>/usage", auth="admin", status=404,
         code="not_found", says="agent"),
]


def orch_post(what, path, body=NO_BODY, **kw):
    kw.setdefault("auth", "orch")
    return Case(what, "POST", path, body, **kw)


STATE = "/v1/orch/jobs/<assigned>/state"
CHUNK = "/v1/orch/jobs/<assigned>/chunk"
SEAL = "/v1/orch/jobs/<assigned>/seal"
A_SEAL = {"attempt": 1}
CLAIM = (("X-Claim-Token", "<claim>"),)
RUNNING = {"attempt": 1, "state": "running"}
A_CHUNK = {"attempt": 1, "stream": "stdout", "seq": 0, "data": "aGk="}
SNAPSHOT = "/v1/orch/workers/snapshot"
HEARTBEAT = "/v1/orch/heartbeat"
CONSUMED = "/v1/orch/enrollment/<ecode>/consumed"
ENROLL_BODY = {"tags": ["lane:x"], "capabilities": ["harness.*"], "slots": 1}
# Worker A of specs/vectors/keys.json
KEYS_A = {"x25519_public": "hSDwCYkwp1R0i33ctD73Wg2/Og0mOBr066SpjqqbTmo=",
          "ed25519_public": "11qYAYKxCrfVS/7TyWQHOg7hcvPapiMlrwIaaPcHURo="}


def snapshot_of(**fields):
    return {"workers": [dict({"id": "<worker>", "tags": ["lane:manual"], "capabilities": ["harness.*"], "slots": 4,
                              "online": True}, **fields)]}


def state_report(what, body=NO_BODY, **kw):
    kw.setdefault("headers", CLAIM)
    return orch_post(what, kw.pop("path", STATE), body, **kw)


def chunk_report(what, body=NO_BODY, **kw):
    kw.setdefault("headers", CLAIM)
    return orch_post(what, kw.pop("path", CHUNK), body, **kw)


REPORTS = "/v1/orch/reports"


def batch_of(**fields):
    """A batch of one report (specs/protocol.md §5); per-report refusals are in its answer, tested
    in tests/test_batches.py: here, only what refuses the whole batch."""
    return {"reports": [dict({"job_id": "<assigned>", "claim_token": "<claim>", "kind": "state",
                              "body": {"attempt": 1, "state": "running"}}, **fields)]}


def heartbeat_of(**fields):
    return {"jobs": [dict({"job_id": "<assigned>", "attempt": 1, "claim_token": "<claim>"}, **fields)]}


def seal_request(what, body=NO_BODY, **kw):
    kw.setdefault("headers", CLAIM)
    return orch_post(what, kw.pop("path", SEAL), body, **kw)


def report_with_chunk(**fields):
    return dict(RUNNING, chunks=[dict({"stream": "stdout", "seq": 0, "data": "aGk="}, **fields)])


POND_ORCH_CASES = [
    # pair (open)
    *body_shape_cases("POST", "/v1/orch/pair", None, {"code": "<pcode>"}),
    orch_post("pair without a code", "/v1/orch/pair", {"name": "x"}, auth=None, says="code"),
    orch_post("pair with a code that is a number", "/v1/orch/pair", {"code": 123456789012}, auth=None),
    orch_post("pair with a code that is a list", "/v1/orch/pair", {"code": ["<pcode>"]}, auth=None),
    orch_post("pair with an empty code", "/v1/orch/pair", {"code": ""}, auth=None),
    orch_post("pair with a malformed code", "/v1/orch/pair", {"code": "nope"}, auth=None),
    orch_post("pair with a code with a NUL byte", "/v1/orch/pair", {"code": "ABCD-EFGH-JKM\x00"}, auth=None),
    orch_post("pair with a code of 1 MiB", "/v1/orch/pair", {"code": "A" * MIB}, auth=None),
    orch_post("pair with an unknown code", "/v1/orch/pair", {"code": UNKNOWN_CODE}, auth=None, status=403,
              code="code_unknown"),
    orch_post("pair with a used code", "/v1/orch/pair", {"code": "<used_pcode>"}, auth=None, status=410,
              code="code_used"),
    orch_post("pair with a bad name (the code stays unused)", "/v1/orch/pair", {"code": "<pcode>", "name": "!"},
              auth=None, says="name"),
    orch_post("pair with a name that is a number", "/v1/orch/pair", {"code": "<pcode>", "name": 1}, auth=None,
              says="name"),
    # whoami
    *orch_auth_cases("GET", "/v1/orch/whoami"),
    *get_body_cases("GET", "/v1/orch/whoami", "orch"),
    Case("POST on whoami", "POST", "/v1/orch/whoami", {}, auth="orch", status=405, code="method_not_allowed"),
    # poll
    *orch_auth_cases("POST", "/v1/orch/poll", {"wait": 0}),
    *body_shape_cases("POST", "/v1/orch/poll", "orch", {"wait": 0}),
    orch_post("poll wait negative", "/v1/orch/poll", {"wait": -1}, says="wait"),
    orch_post("poll wait over an hour", "/v1/orch/poll", {"wait": 3601}, says="wait"),
    orch_post("poll wait a string", "/v1/orch/poll", {"wait": "5"}, says="wait"),
    orch_post("poll wait a boolean", "/v1/orch/poll", {"wait": False}, says="wait"),
    orch_post("poll wait NaN", "/v1/orch/poll", raw=b'{"wait": NaN}', says="wait"),
    # state reports
    *orch_auth_cases("POST", STATE, RUNNING, headers=CLAIM),
    *body_shape_cases("POST", STATE, "orch", RUNNING, headers=CLAIM),
    state_report("no X-Claim-Token", RUNNING, headers=(), status=401, code="unauthorized"),
    state_report("an empty X-Claim-Token", RUNNING, headers=(("X-Claim-Token", ""),), status=(401, 409),
                 code=("unauthorized", "stale_attempt")),
    state_report("a wrong X-Claim-Token", RUNNING, headers=(("X-Claim-Token", "not-the-claim"),), status=409,
                 code="stale_attempt"),
    state_report("an X-Claim-Token of non-ASCII bytes", RUNNING, headers=(("X-Claim-Token", "\xc3\xa9\xff"),),
                 status=409, code="stale_attempt"),
    state_report("the claim token with a byte too many", RUNNING, headers=(("X-Claim-Token", "<claim>x"),),
                 status=409, code="stale_attempt"),
    state_report("the next attempt", dict(RUNNING, attempt=2), status=409, code="stale_attempt"),
    state_report("attempt missing", {"state": "running"}, says="attempt"),
    state_report("attempt 0", dict(RUNNING, attempt=0), says="attempt"),
    state_report("attempt a string", dict(RUNNING, attempt="1"), says="attempt"),
    state_report("attempt a fraction", dict(RUNNING, attempt=1.5), says="attempt"),
    state_report("attempt a boolean", dict(RUNNING, attempt=True), says="attempt"),
    state_report("attempt over 2**31", dict(RUNNING, attempt=2 ** 31 + 1), says="attempt"),
    state_report("state missing", {"attempt": 1}, says="state"),
    state_report("state unknown", dict(RUNNING, state="bogus"), says="bogus"),
    state_report("state empty", dict(RUNNING, state="")),
    state_report("state in upper case", dict(RUNNING, state="RUNNING")),
    state_report("state queued", dict(RUNNING, state="queued"), says="queued"),
    state_report("state assigned", dict(RUNNING, state="assigned"), says="assigned"),
    state_report("state a number", dict(RUNNING, state=3)),
    state_report("state a list", dict(RUNNING, state=["done"])),
    state_report("state an object", dict(RUNNING, state={"done": True})),
    state_report("done without exit_code", {"attempt": 1, "state": "done"}, says="exit_code"),
    state_report("requeue on a done report", {"attempt": 1, "state": "done", "exit_code": 0, "requeue": True},
                 says="requeue"),
    state_report("requeue false", {"attempt": 1, "state": "failed", "error": "x", "requeue": False}, says="requeue"),
    state_report("requeue with an exit code", {"attempt": 1, "state": "failed", "exit_code": 127, "error": "x",
                                               "requeue": True}, says="requeue"),
    state_report("dropped a number", {"attempt": 1, "state": "done", "exit_code": 0, "dropped": 5}, says="dropped"),
    state_report("dropped with another stream", {"attempt": 1, "state": "done", "exit_code": 0,
                                                 "dropped": {"stdin": 1}}, says="stdin"),
    state_report("dropped negative", {"attempt": 1, "state": "done", "exit_code": 0,
                                      "dropped": {"stdout": -1}}, says="dropped.stdout"),
    state_report("done with exit_code 1", {"attempt": 1, "state": "done", "exit_code": 1}, says="exit_code"),
    state_report("failed with exit_code 0 and no error", {"attempt": 1, "state": "failed", "exit_code": 0}),
    state_report("exit_code a string", {"attempt": 1, "state": "failed", "exit_code": "1"}, says="exit_code"),
    state_report("exit_code over 255", {"attempt": 1, "state": "failed", "exit_code": 256}, says="exit_code"),
    state_report("exit_code under -255", {"attempt": 1, "state": "failed", "exit_code": -256}, says="exit_code"),
    state_report("exit_code a fraction", {"attempt": 1, "state": "failed", "exit_code": 1.5}, says="exit_code"),
    state_report("exit_code a boolean", {"attempt": 1, "state": "failed", "exit_code": True}, says="exit_code"),
    state_report("error empty", {"attempt": 1, "state": "failed", "error": ""}, says="error"),
    state_report("error a number", {"attempt": 1, "state": "failed", "error": 5}, says="error"),
    state_report("error with a NUL byte", {"attempt": 1, "state": "failed", "error": "a\x00b"}, says="error"),
    state_report("error of 2001 characters", {"attempt": 1, "state": "failed", "error": "e" * 2001}, says="error"),
    state_report("chunks a string", dict(RUNNING, chunks="hi"), says="chunks"),
    state_report("chunks an object", dict(RUNNING, chunks={"stream": "stdout"}), says="chunks"),
    state_report("chunks with a number", dict(RUNNING, chunks=[1]), says="chunks[0]"),
    state_report("65 chunks", dict(RUNNING, chunks=[{"stream": "stdout", "seq": i, "data": ""} for i in range(65)]),
                 says="chunks"),
    state_report("a chunk without data", dict(RUNNING, chunks=[{"stream": "stdout", "seq": 0}]), says="data"),
    state_report("a chunk with an unknown field", report_with_chunk(extra=1), says="extra"),
    state_report("a chunk on stdin", report_with_chunk(stream="stdin"), says="stream"),
    state_report("a chunk with a negative seq", report_with_chunk(seq=-1), says="seq"),
    state_report("a chunk with seq over 2**53", report_with_chunk(seq=2 ** 53 + 1), says="seq"),
    state_report("a chunk with data not base64", report_with_chunk(data="not base64!"), says="data"),
    state_report("a chunk with data a number", report_with_chunk(data=5), says="data"),
    state_report("a job that does not exist", RUNNING, path=f"/v1/orch/jobs/{UNKNOWN_JOB}/state", status=404,
                 code="not_found"),
    state_report("a queued job no binding holds", RUNNING, path="/v1/orch/jobs/<job>/state", status=404,
                 code="not_found"),
    state_report("a job of another binding", RUNNING, auth="orch_b", status=404, code="not_found"),
    state_report("a malformed job id", RUNNING, path="/v1/orch/jobs/a.b/state", status=404, code="not_found"),
    Case("GET on a state report", "GET", STATE, auth="orch", status=405, code="method_not_allowed"),
    # chunk reports
    *orch_auth_cases("POST", CHUNK, A_CHUNK, headers=CLAIM),
    *body_shape_cases("POST", CHUNK, "orch", A_CHUNK, headers=CLAIM),
    chunk_report("no X-Claim-Token", A_CHUNK, headers=(), status=401, code="unauthorized"),
    chunk_report("a wrong X-Claim-Token", A_CHUNK, headers=(("X-Claim-Token", "nope"),), status=409,
                 code="stale_attempt"),
    chunk_report("the next attempt", dict(A_CHUNK, attempt=2), status=409, code="stale_attempt"),
    chunk_report("stream missing", {"attempt": 1, "seq": 0, "data": ""}, says="stream"),
    chunk_report("stream unknown", dict(A_CHUNK, stream="stdin"), says="stream"),
    chunk_report("stream a list", dict(A_CHUNK, stream=["stdout"]), says="stream"),
    chunk_report("seq negative", dict(A_CHUNK, seq=-1), says="seq"),
    chunk_report("seq a string", dict(A_CHUNK, seq="0"), says="seq"),
    chunk_report("seq a fraction", dict(A_CHUNK, seq=0.5), says="seq"),
    chunk_report("data not base64", dict(A_CHUNK, data="%%%"), says="data"),
    chunk_report("data base64 without padding", dict(A_CHUNK, data="aGk"), says="data"),
    chunk_report("data null", dict(A_CHUNK, data=None), says="data"),
    chunk_report("data over 1 MiB", dict(A_CHUNK, data="QUFB" * (MIB // 3 + 2)), says="data"),
    chunk_report("a job of another binding", A_CHUNK, auth="orch_b", status=404, code="not_found"),
    chunk_report("a job that does not exist", A_CHUNK, path=f"/v1/orch/jobs/{UNKNOWN_JOB}/chunk", status=404,
                 code="not_found"),
    # seal: fenced like a report, then the job must still run and name a credential
    *orch_auth_cases("POST", SEAL, A_SEAL, headers=CLAIM),
    *body_shape_cases("POST", SEAL, "orch", A_SEAL, headers=CLAIM),
    seal_request("no X-Claim-Token", A_SEAL, headers=(), status=401, code="unauthorized"),
    seal_request("an empty X-Claim-Token", A_SEAL, headers=(("X-Claim-Token", ""),), status=401,
                 code="unauthorized"),
    seal_request("a wrong X-Claim-Token", A_SEAL, headers=(("X-Claim-Token", "nope"),), status=409,
                 code="stale_attempt"),
    seal_request("the claim token with a byte too many", A_SEAL, headers=(("X-Claim-Token", "<claim>x"),),
                 status=409, code="stale_attempt"),
    seal_request("the claim token of another job", A_SEAL, headers=(("X-Claim-Token", "<finished_claim>"),),
                 status=409, code="stale_attempt"),
    seal_request("an X-Claim-Token of non-ASCII bytes", A_SEAL, headers=(("X-Claim-Token", "\xc3\xa9\xff"),),
                 status=409, code="stale_attempt"),
    seal_request("the next attempt", {"attempt": 2}, status=409, code="stale_attempt"),
    seal_request("attempt missing", {}, says="attempt"),
    seal_request("no body", says="attempt"),
    seal_request("attempt 0", {"attempt": 0}, says="attempt"),
    seal_request("attempt a string", {"attempt": "1"}, says="attempt"),
    seal_request("attempt a fraction", {"attempt": 1.5}, says="attempt"),
    seal_request("attempt a boolean", {"attempt": True}, says="attempt"),
    seal_request("attempt null", {"attempt": None}, says="attempt"),
    seal_request("attempt over 2**31", {"attempt": 2 ** 31 + 1}, says="attempt"),
    seal_request("a job that names no credential", A_SEAL, says="credential"),
    seal_request("a job that has ended", A_SEAL, path="/v1/orch/jobs/<finished>/seal",
                 headers=(("X-Claim-Token", "<finished_claim>"),), status=409, code="stale_attempt"),
    seal_request("a job that does not exist", A_SEAL, path=f"/v1/orch/jobs/{UNKNOWN_JOB}/seal", status=404,
                 code="not_found"),
    seal_request("a queued credential job no binding holds", A_SEAL, path="/v1/orch/jobs/<sealed>/seal",
                 status=404, code="not_found"),
    seal_request("a job of another binding", A_SEAL, auth="orch_b", status=404, code="not_found"),
    seal_request("an ended job of another binding", A_SEAL, auth="orch_b", path="/v1/orch/jobs/<finished>/seal",
                 headers=(("X-Claim-Token", "<finished_claim>"),), status=404, code="not_found"),
    seal_request("a malformed job id", A_SEAL, path="/v1/orch/jobs/a.b/seal", status=404, code="not_found"),
    seal_request("a job id of 65 characters", A_SEAL, path="/v1/orch/jobs/" + "j" * 65 + "/seal", status=404,
                 code="not_found"),
    Case("GET on a seal", "GET", SEAL, auth="orch", headers=CLAIM, status=405, code="method_not_allowed"),
    # heartbeats (a refused one renews nothing; one that names a stale attempt is answered, not refused)
    *orch_auth_cases("POST", REPORTS, batch_of()),
    *body_shape_cases("POST", REPORTS, "orch", batch_of()),
    orch_post("reports missing", REPORTS, {}, says="reports"),
    orch_post("reports null", REPORTS, {"reports": None}, says="reports"),
    orch_post("reports an object", REPORTS, {"reports": batch_of()["reports"][0]}, says="reports"),
    orch_post("no reports", REPORTS, {"reports": []}, says="reports"),
    orch_post("65 reports", REPORTS, {"reports": batch_of()["reports"] * 65}, says="reports"),
    Case("GET on reports", "GET", REPORTS, auth="orch", status=405, code="method_not_allowed"),
    *orch_auth_cases("POST", HEARTBEAT, heartbeat_of()),
    *body_shape_cases("POST", HEARTBEAT, "orch", heartbeat_of()),
    orch_post("jobs missing", HEARTBEAT, {}, says="jobs"),
    orch_post("jobs null", HEARTBEAT, {"jobs": None}, says="jobs"),
    orch_post("jobs an object", HEARTBEAT, {"jobs": heartbeat_of()["jobs"][0]}, says="jobs"),
    orch_post("jobs a string", HEARTBEAT, {"jobs": "<assigned>"}, says="jobs"),
    orch_post("4097 jobs", HEARTBEAT, {"jobs": heartbeat_of()["jobs"] * 4097}, says="jobs"),
    orch_post("a job that is a number", HEARTBEAT, {"jobs": [1]}, says="jobs[0]"),
    orch_post("a job that is null", HEARTBEAT, {"jobs": [None, None]}, says="jobs"),
    orch_post("a job with an unknown field", HEARTBEAT, heartbeat_of(lease=600), says="lease"),
    orch_post("a job without a job_id", HEARTBEAT, {"jobs": [{"attempt": 1, "claim_token": "<claim>"}]},
              says="job_id"),
    orch_post("a job without an attempt", HEARTBEAT, {"jobs": [{"job_id": "<assigned>", "claim_token": "<claim>"}]},
              says="attempt"),
    orch_post("a job without a claim_token", HEARTBEAT, {"jobs": [{"job_id": "<assigned>", "attempt": 1}]},
              says="claim_token"),
    orch_post("a job_id that is a number", HEARTBEAT, heartbeat_of(job_id=7), says="job_id"),
    orch_post("a job_id with a dot", HEARTBEAT, heartbeat_of(job_id="a.b"), says="job_id"),
    orch_post("a job_id of 65 characters", HEARTBEAT, heartbeat_of(job_id="j" * 65), says="job_id"),
    orch_post("an attempt of 0", HEARTBEAT, heartbeat_of(attempt=0), says="attempt"),
    orch_post("an attempt that is a string", HEARTBEAT, heartbeat_of(attempt="1"), says="attempt"),
    orch_post("an attempt that is a boolean", HEARTBEAT, heartbeat_of(attempt=True), says="attempt"),
    orch_post("an attempt over 2**31", HEARTBEAT, heartbeat_of(attempt=2 ** 31 + 1), says="attempt"),
    orch_post("a claim_token that is empty", HEARTBEAT, heartbeat_of(claim_token=""), says="claim_token"),
    orch_post("a claim_token that is a number", HEARTBEAT, heartbeat_of(claim_token=5), says="claim_token"),
    orch_post("a claim_token of 129 characters", HEARTBEAT, heartbeat_of(claim_token="c" * 129),
              says="claim_token"),
    orch_post("a claim_token with a NUL byte", HEARTBEAT, heartbeat_of(claim_token="<claim>\x00"),
              says="claim_token"),
    orch_post("a good job, then a bad one", HEARTBEAT, {"jobs": heartbeat_of()["jobs"] + [{"job_id": 1}]},
              says="jobs[1]"),
    orch_post("released an object", HEARTBEAT, {"jobs": [], "released": heartbeat_of()["jobs"][0]}, says="released"),
    orch_post("released null", HEARTBEAT, {"jobs": [], "released": None}, says="released"),
    orch_post("4097 released", HEARTBEAT, {"jobs": [], "released": heartbeat_of()["jobs"] * 4097}, says="released"),
    orch_post("a released job with an unknown field", HEARTBEAT,
              {"jobs": [], "released": heartbeat_of(lease=1)["jobs"]}, says="lease"),
    orch_post("a released job_id with a dot", HEARTBEAT, {"jobs": [], "released": heartbeat_of(job_id="a.b")["jobs"]},
              says="released[0].job_id"),
    orch_post("a good job, then a bad release (nothing renewed, nothing released)", HEARTBEAT,
              dict(heartbeat_of(), released=heartbeat_of()["jobs"] + [{"job_id": 1}]), says="released[1]"),
    Case("GET on heartbeat", "GET", HEARTBEAT, auth="orch", status=405, code="method_not_allowed"),
    # eviction asked by the orchestrator (swarm.py evict): only for a worker of its own binding
    *orch_auth_cases("POST", "/v1/orch/workers/w_unknown/evict", {}),
    *body_shape_cases("POST", "/v1/orch/workers/w_unknown/evict", "orch", {}),
    orch_post("evict with drain a number", "/v1/orch/workers/w_unknown/evict", {"drain": 1}, says="drain"),
    orch_post("evict an unknown worker", "/v1/orch/workers/w_unknown/evict", {}, status=404, code="not_found"),
    orch_post("evict a worker of another binding", "/v1/orch/workers/<worker>/evict", {}, auth="orch_b",
              status=404, code="not_found"),
    Case("GET on an orchestrator's evict", "GET", "/v1/orch/workers/w_unknown/evict", auth="orch", status=405,
         code="method_not_allowed"),
    # snapshots
    *orch_auth_cases("POST", SNAPSHOT, snapshot_of()),
    *body_shape_cases("POST", SNAPSHOT, "orch", snapshot_of()),
    orch_post("workers missing", SNAPSHOT, {}, says="workers"),
    orch_post("workers an object", SNAPSHOT, {"workers": {"id": "<worker>"}}, says="workers"),
    orch_post("workers with a number", SNAPSHOT, {"workers": [1]}, says="workers[0]"),
    orch_post("workers with null", SNAPSHOT, {"workers": [None, None]}, says="workers"),
    orch_post("a worker without an id", SNAPSHOT, {"workers": [{"slots": 1}]}, says="id"),
    orch_post("a worker id that is a number", SNAPSHOT, snapshot_of(id=5), says="id"),
    orch_post("a worker id of 1000 characters", SNAPSHOT, snapshot_of(id="w" * 1000), says="id"),
    orch_post("a worker with an unknown field", SNAPSHOT, snapshot_of(gpu=True), says="gpu"),
    orch_post("a worker with 0 slots", SNAPSHOT, snapshot_of(slots=0), says="slots"),
    orch_post("a worker with 257 slots", SNAPSHOT, snapshot_of(slots=257), says="slots"),
    orch_post("a worker with slots a string", SNAPSHOT, snapshot_of(slots="4"), says="slots"),
    orch_post("a worker with tags a string", SNAPSHOT, snapshot_of(tags="lane:manual"), says="tags"),
    orch_post("a worker with a bad tag", SNAPSHOT, snapshot_of(tags=["no spaces"]), says="tags"),
    orch_post("a worker with a bad capability glob", SNAPSHOT, snapshot_of(capabilities=["Harness.*"]),
              says="capabilities"),
    orch_post("a worker with an empty name", SNAPSHOT, snapshot_of(name=""), says="name"),
    orch_post("a worker with online a string", SNAPSHOT, snapshot_of(online="yes"), says="online"),
    orch_post("a worker with online a number", SNAPSHOT, snapshot_of(online=1), says="online"),
    orch_post("4097 workers", SNAPSHOT, {"workers": [{"id": f"w{i}"} for i in range(4097)]}, says="workers"),
    # enrollment consumed
    *orch_auth_cases("POST", CONSUMED, ENROLL_BODY),
    *body_shape_cases("POST", CONSUMED, "orch", ENROLL_BODY),
    orch_post("a malformed enrollment code", "/v1/orch/enrollment/nope/consumed", ENROLL_BODY),
    orch_post("an enrollment code with forbidden letters", "/v1/orch/enrollment/AAAA-BBBB-CCC0/consumed",
              ENROLL_BODY),
    orch_post("an unknown enrollment code", f"/v1/orch/enrollment/{UNKNOWN_CODE}/consumed", ENROLL_BODY,
              status=403, code="code_unknown"),
    orch_post("a used enrollment code", "/v1/orch/enrollment/<used_ecode>/consumed", ENROLL_BODY, status=410,
              code="code_used"),
    orch_post("an enrollment code of 33 characters", "/v1/orch/enrollment/" + "A" * 33 + "/consumed", ENROLL_BODY,
              status=404, code="not_found"),
    orch_post("an enrollment code with a dot", "/v1/orch/enrollment/AB.CD/consumed", ENROLL_BODY, status=404,
              code="not_found"),
    orch_post("a worker id chosen by the orchestrator", CONSUMED, dict(ENROLL_BODY, id="w_mine"), says="id"),
    orch_post("tags a string", CONSUMED, dict(ENROLL_BODY, tags="lane:x"), says="tags"),
    orch_post("tags with a number", CONSUMED, dict(ENROLL_BODY, tags=[1]), says="tags"),
    orch_post("capabilities with upper case", CONSUMED, dict(ENROLL_BODY, capabilities=["X"]), says="capabilities"),
    orch_post("capabilities with null", CONSUMED, dict(ENROLL_BODY, capabilities=[None]), says="capabilities"),
    orch_post("slots 0", CONSUMED, dict(ENROLL_BODY, slots=0), says="slots"),
    orch_post("slots a fraction", CONSUMED, dict(ENROLL_BODY, slots=1.5), says="slots"),
    orch_post("name with a NUL byte", CONSUMED, dict(ENROLL_BODY, name="w\x00"), says="name"),
    orch_post("online a string", CONSUMED, dict(ENROLL_BODY, online="no"), says="online"),
    orch_post("x25519_public not base64", CONSUMED, dict(ENROLL_BODY, **dict(KEYS_A, x25519_public="!" * 44)),
              says="x25519_public"),
    orch_post("ed25519_public of 31 bytes", CONSUMED, dict(ENROLL_BODY, **dict(KEYS_A, ed25519_public="A" * 40 + "AA==")),
              says="ed25519_public"),
    orch_post("ed25519_public a number", CONSUMED, dict(ENROLL_BODY, **dict(KEYS_A, ed25519_public=7)), says="ed25519_public"),
    orch_post("one public key without the other", CONSUMED, dict(ENROLL_BODY, x25519_public=KEYS_A["x25519_public"]),
              says="ed25519_public"),
    orch_post("a fingerprint without keys", CONSUMED, dict(ENROLL_BODY, fingerprint="a" * 64), says="keys"),
    orch_post("a fingerprint in upper case", CONSUMED, dict(ENROLL_BODY, **KEYS_A, fingerprint="A" * 64),
              says="fingerprint"),
    orch_post("a fingerprint that is not the keys'", CONSUMED, dict(ENROLL_BODY, **KEYS_A, fingerprint="a" * 64),
              code="fingerprint_invalid", says="fingerprint"),
    orch_post("a snapshot fingerprint of 65 characters", SNAPSHOT, snapshot_of(fingerprint="a" * 65),
              says="fingerprint"),
    orch_post("a snapshot with one key only", SNAPSHOT, snapshot_of(ed25519_public=KEYS_A["ed25519_public"]),
              says="x25519_public"),
    Case("GET on consumed", "GET", CONSUMED, auth="orch", status=405, code="method_not_allowed"),
]

BUNDLES = "/v1/bundles"
NO_BUNDLE = "/v1/bundles/b_unknown"
A_BUNDLE = {"key": "A" * 43 + "=", "sha256": "0" * 64, "size": 100}
A_PART = {"offset": 0, "data": "aGk="}
SOURCE = "/v1/orch/jobs/<assigned>/source"
A_REDEEM = {"attempt": 1, "token": "t" * 32}
AN_ARTIFACT = {"attempt": 1, "name": "work/x", "size": 2, "sha256": "0" * 64, "offset": 0, "data": "aGk="}


def files_cases(path, body):
    """An orchestrator's source redeem, source read or artifact piece (specs/bundles.md §5, §6)."""
    return [*orch_auth_cases("POST", path, body, CLAIM), *body_shape_cases("POST", path, "orch", body, CLAIM),
            orch_post("no X-Claim-Token", path, body, status=401, code="unauthorized"),
            orch_post("the next attempt", path, dict(body, attempt=2), headers=CLAIM, status=409,
                      code="stale_attempt")]


# Source bundles and artifacts (issue 11): uploads by the admin, redeem and pieces by an orchestrator.
POND_FILES_CASES = [
    *admin_auth_cases("POST", BUNDLES, A_BUNDLE),
    *body_shape_cases("POST", BUNDLES, "admin", A_BUNDLE),
    admin_post("a data key of 31 bytes", BUNDLES, dict(A_BUNDLE, key="A" * 40 + "=="), says="key"),
    admin_post("a data key that is not base64", BUNDLES, dict(A_BUNDLE, key="!" * 44), says="key"),
    admin_post("a sha256 in upper case", BUNDLES, dict(A_BUNDLE, sha256="A" * 64), says="sha256"),
    admin_post("a size smaller than a header and a tag", BUNDLES, dict(A_BUNDLE, size=10), says="size"),
    admin_post("a size over pond's limit", BUNDLES, dict(A_BUNDLE, size=2 ** 40), status=413,
               code="payload_too_large"),
    admin_post("a size that is a string", BUNDLES, dict(A_BUNDLE, size="100"), says="size"),
    *admin_auth_cases("GET", NO_BUNDLE),
    job_get("a bundle that does not exist", NO_BUNDLE),
    *admin_auth_cases("POST", NO_BUNDLE + "/parts", A_PART),
    *body_shape_cases("POST", NO_BUNDLE + "/parts", "admin", A_PART),
    admin_post("a part of a bundle that does not exist", NO_BUNDLE + "/parts", A_PART, status=404,
               code="not_found"),
    admin_post("a part at a negative offset", NO_BUNDLE + "/parts", dict(A_PART, offset=-1), says="offset"),
    admin_post("a part that is not base64", NO_BUNDLE + "/parts", dict(A_PART, data="!!"), says="data"),
    *admin_auth_cases("GET", "/v1/jobs/<job>/artifacts"),
    *admin_auth_cases("GET", "/v1/jobs/<job>/artifacts/changes.patch"),
    job_get("artifacts of a job that does not exist", f"/v1/jobs/{UNKNOWN_JOB}/artifacts"),
    job_get("an artifact the job does not have", "/v1/jobs/<job>/artifacts/changes.patch", says="artifacts"),
    job_get("an artifact name with a space", "/v1/jobs/<job>/artifacts/a%20b"),
    *files_cases(SOURCE, A_REDEEM),
    orch_post("a redeem token that is not the attempt's", SOURCE, A_REDEEM, headers=CLAIM, status=403,
              code="token_invalid"),
    orch_post("a redeem without a token", SOURCE, {"attempt": 1}, headers=CLAIM, says="token"),
    *files_cases(SOURCE + "/read", dict(A_REDEEM, offset=0)),
    orch_post("a read with a token that is not the attempt's", SOURCE + "/read", dict(A_REDEEM, offset=0),
              headers=CLAIM, status=403, code="token_invalid"),
    *files_cases("/v1/orch/jobs/<assigned>/artifacts", AN_ARTIFACT),
    orch_post("an artifact name with ..", "/v1/orch/jobs/<assigned>/artifacts", dict(AN_ARTIFACT, name="work/../x"),
              headers=CLAIM, says="name"),
    orch_post("an artifact name that is absolute", "/v1/orch/jobs/<assigned>/artifacts",
              dict(AN_ARTIFACT, name="/etc/passwd"), headers=CLAIM, says="name"),
    orch_post("an artifact name with an empty part", "/v1/orch/jobs/<assigned>/artifacts",
              dict(AN_ARTIFACT, name="work/a//b"), headers=CLAIM, says="name"),
    orch_post("an artifact name outside work/", "/v1/orch/jobs/<assigned>/artifacts",
              dict(AN_ARTIFACT, name="x.txt"), headers=CLAIM, says="name"),
    orch_post("an artifact over the job's cap", "/v1/orch/jobs/<assigned>/artifacts",
              dict(AN_ARTIFACT, size=2 ** 40), headers=CLAIM, status=413, code="artifact_too_large"),
    orch_post("an artifact piece past its size", "/v1/orch/jobs/<assigned>/artifacts", dict(AN_ARTIFACT, size=1),
              headers=CLAIM, status=409, code="offset_mismatch"),
]

POND_PROTOCOL_CASES = protocol_cases("/v1/orch/pair", "/healthz")    # open: a token is checked before a body is read

POND_CATALOGUE = (POND_PROTOCOL_CASES + POND_SUBMIT_CASES + POND_JOB_READ_CASES + POND_ADMIN_CASES
                  + POND_CREDENTIAL_CASES + POND_ORCH_CASES + POND_FILES_CASES + POND_AGENT_CASES)


# -- pond sweeps ------------------------------------------------------------------------------------------

def test_pond_refuses_malformed_http_and_keeps_its_jobs(pool, subtests):
    world = PondWorld(pool)
    sweep(world.url, POND_PROTOCOL_CASES, world.ctx, subtests)
    world.assert_intact()
    # The job accepted before the sweep still runs once a worker that fits comes online.
    orch = pool.orchestrator(world.pond)
    pool.worker(world.pond, orch, tags="lane:kept")
    done = world.pond.wait_job(world.kept, timeout=30)
    assert done["state"] == "done", done
    assert world.pond.output(world.kept)["stdout"] == b"kept\n"


def test_pond_refuses_bad_job_submissions(pool, subtests):
    world = PondWorld(pool)
    before = world.pond.client.get("/v1/jobs", limit=1000)["counts"]
    sweep(world.url, POND_SUBMIT_CASES, world.ctx, subtests)
    assert world.pond.client.get("/v1/jobs", limit=1000)["counts"] == before, "a refused submission made a job"
    world.assert_intact()


def test_pond_refuses_bad_job_ids_and_queries(pool, subtests):
    world = PondWorld(pool)
    sweep(world.url, POND_JOB_READ_CASES, world.ctx, subtests)
    world.assert_intact()


def test_pond_admin_endpoints_refuse_bad_input(pool, subtests):
    world = PondWorld(pool)
    sweep(world.url, POND_ADMIN_CASES, world.ctx, subtests)
    world.assert_intact()


def test_pond_bundle_and_artifact_endpoints_refuse_bad_input(pool, subtests):
    world = PondWorld(pool)
    sweep(world.url, POND_FILES_CASES, world.ctx, subtests)
    world.assert_intact()


def test_pond_agent_endpoints_refuse_bad_input(pool, subtests):
    world = PondWorld(pool)
    sweep(world.url, POND_AGENT_CASES, world.ctx, subtests)
    world.assert_intact()
    for path in (HARNESSES, MODELS):
        assert api(world.url, "GET", path, auth=f"Bearer {world.pond.token}")[1] in ({"harnesses": []}, {"models": []})


def test_pond_orchestrator_endpoints_refuse_bad_input(pool, subtests):
    world = PondWorld(pool)
    sweep(world.url, POND_ORCH_CASES, world.ctx, subtests)
    world.assert_intact()
    # The codes the sweep showed with bad bodies are still unused, so they still work.
    status, body = api(world.url, "POST", "/v1/orch/pair", {"code": world.ctx["pcode"]})
    assert status == 201, f"a refused pair used up its code: {body}"
    status, body = api(world.url, "POST", f"/v1/orch/enrollment/{world.ctx['ecode']}/consumed", ENROLL_BODY,
                       auth=f"Bearer {world.token_a}")
    assert status == 201, f"the enrollment code was used up by a request the sweep expected to be refused: {body}"
    # The worker is still listed as the last valid snapshot left it.
    workers = {w["id"]: w for w in world.pond.client.get("/v1/admin/pool/workers")["workers"]}
    assert workers[world.worker]["online"] and workers[world.worker]["slots"] == 4, workers[world.worker]


def test_pond_credential_endpoints_refuse_bad_input(pool, subtests):
    world = PondWorld(pool)
    for case in POND_CREDENTIAL_CASES:
        with subtests.test(msg=case.label):
            status, payload = exchange(world.url, build_request(case, world.ctx))
            check(case, status, payload)
            assert KEPT_SECRET not in str(payload), f"{case.label}: the answer says a secret back: {payload}"
    world.assert_intact()
    # What any read shows of a credential is the names of its variables, never a value.
    for path in (CREDENTIALS, KEPT):
        status, body = api(world.url, "GET", path, auth=f"Bearer {world.pond.token}")
        assert status == 200 and KEPT_SECRET not in json.dumps(body), body
    assert world.pond.client.get(KEPT) == world.credential == dict(
        world.credential, name="kept", provider="anthropic", env=["KEPT_REGION"], secrets=["KEPT_TOKEN"])


def matches_route(case, method, pattern):
    path = fill(case.path, {k: "x_0" for k in ("job", "victim", "assigned", "worker", "binding", "x", "y",
                                               "finished", "sealed")}
                | {k: UNKNOWN_CODE for k in ("pcode", "used_pcode", "ecode", "used_ecode")})
    return case.method == method and re.fullmatch(pattern, urlsplit(path).path) is not None


def test_the_pond_catalogue_covers_every_route():
    from pond.server import ROUTES
    missing = [f"{m} {p}" for m, p, _, _ in ROUTES if not any(matches_route(c, m, p) for c in POND_CATALOGUE)]
    assert not missing, f"routes with no bad-input case: {missing}"
    for m, p, who, _ in ROUTES:
        if who is not None:
            kinds = {c.auth for c in POND_CATALOGUE if matches_route(c, m, p)}
            assert None in kinds and len(kinds) >= 4, f"{m} {p}: auth is not swept ({kinds})"


# -- pond: protocol checks of reports ------------------------------------------------------------------

def test_stale_attempt_or_claim_token_is_refused_and_changes_nothing(pool):
    world = PondWorld(pool)
    job, claim = world.assigned, world.claim_token
    for body, token in (({"attempt": 2, "state": "running"}, claim),
                        ({"attempt": 2, "state": "done", "exit_code": 0}, claim),
                        ({"attempt": 1, "state": "running"}, claim[:-1] + ("A" if claim[-1] != "A" else "B")),
                        ({"attempt": 1, "state": "failed", "exit_code": 3}, "forged-claim-token")):
        status, answer = world.report(job, body, token)
        assert (status, answer["error"]["code"]) == (409, "stale_attempt"), (body, answer)
    status, answer = world.report(job, {"attempt": 2, "stream": "stdout", "seq": 0, "data": "aGk="}, claim,
                                  kind="chunk")
    assert (status, answer["error"]["code"]) == (409, "stale_attempt"), answer
    row = world.pond.job(job)
    assert (row["state"], row["attempt"], row["exit_code"], row["started_at"]) == ("assigned", 1, None, None), row
    assert world.pond.output(job) == {"stdout": b"", "stderr": b""}, "a stale chunk was stored"
    # The holder of the real claim is not disturbed by the refusals.
    assert world.report(job, {"attempt": 1, "state": "running"}, claim)[0] == 200
    assert world.pond.job(job)["state"] == "running"


def test_report_on_a_job_of_another_binding_is_not_found(pool):
    world = PondWorld(pool)
    for kind, body in (("state", {"attempt": 1, "state": "failed", "exit_code": 9}),
                       ("chunk", {"attempt": 1, "stream": "stdout", "seq": 0, "data": "aGk="})):
        status, answer = world.report(world.assigned, body, world.claim_token, token=world.token_b, kind=kind)
        assert (status, answer["error"]["code"]) == (404, "not_found"), answer
    assert world.pond.job(world.assigned)["state"] == "assigned"
    assert world.pond.output(world.assigned)["stdout"] == b""


def test_duplicate_final_report_is_accepted_once_and_keeps_the_outcome(pool):
    world = PondWorld(pool)
    job, claim = world.assigned, world.claim_token
    done = {"attempt": 1, "state": "done", "exit_code": 0,
            "chunks": [{"stream": "stdout", "seq": 0, "data": "b2sK"}]}
    status, first = world.report(job, done, claim)
    assert status == 200 and first["state"] == "done" and not first.get("duplicate"), first
    finished = world.pond.job(job)
    status, again = world.report(job, done, claim)
    assert status == 200 and again.get("duplicate") is True, again
    for late in ({"attempt": 1, "state": "failed", "exit_code": 2, "error": "late"},
                 {"attempt": 1, "state": "cancelled"}, {"attempt": 1, "state": "running"}):
        status, answer = world.report(job, late, claim)
        assert (status, answer["error"]["code"]) == (409, "invalid_transition"), (late, answer)
    status, answer = world.report(job, {"attempt": 1, "stream": "stdout", "seq": 1, "data": "eA=="}, claim,
                                  kind="chunk")
    assert (status, answer["error"]["code"]) == (409, "stale_attempt"), answer
    row = world.pond.job(job)
    assert {k: row[k] for k in ("state", "exit_code", "error", "finished_at")} == \
           {k: finished[k] for k in ("state", "exit_code", "error", "finished_at")} == \
           {"state": "done", "exit_code": 0, "error": None, "finished_at": finished["finished_at"]}
    assert world.pond.output(job)["stdout"] == b"ok\n", "the duplicate report or a late chunk changed the output"

    # The same for a failed outcome: a second failed report with another exit code changes nothing.
    job, claim = world.assign(["lane:manual"])
    assert world.report(job, {"attempt": 1, "state": "failed", "exit_code": 3}, claim)[0] == 200
    status, again = world.report(job, {"attempt": 1, "state": "failed", "exit_code": 4, "error": "other"}, claim)
    assert status == 200 and again.get("duplicate") is True, again
    row = world.pond.job(job)
    assert (row["state"], row["exit_code"], row["error"]) == ("failed", 3, None), row


def test_done_report_with_a_non_zero_exit_code_is_refused(pool):
    world = PondWorld(pool)
    for code in (1, -1, 255):
        status, answer = world.report(world.assigned, {"attempt": 1, "state": "done", "exit_code": code},
                                      world.claim_token)
        assert (status, answer["error"]["code"]) == (400, "bad_request"), answer
        assert "exit_code" in answer["error"]["message"]
    row = world.pond.job(world.assigned)
    assert (row["state"], row["exit_code"]) == ("assigned", None), row
    status, answer = world.report(world.assigned, {"attempt": 1, "state": "failed", "exit_code": 1},
                                  world.claim_token)
    assert status == 200 and world.pond.job(world.assigned)["state"] == "failed", answer


# -- pond: fuzzed job submissions ---------------------------------------------------------------------------

SUBMIT_FIELDS = ("command", "env", "tags", "capabilities", "sandbox", "timeout", "name", "tenant")
# Text that often holds what breaks naive code: NUL, lone surrogates, separators, globs, non-ASCII.
tricky_text = st.text(st.sampled_from(["a", "Z", "0", "_", "-", ".", ":", "=", "*", " ", "\n", "\x00", "\ud800",
                                       "\udfff", "\u00e9", "\u2028", "\U0001f600"]), max_size=8)
any_text = st.text(st.characters(exclude_categories=()), max_size=12) | tricky_text
json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-2 ** 70, 2 ** 70) | st.floats() | st.text(max_size=12) | any_text,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
    max_leaves=12)
field_values = {
    "command": st.lists(st.text(max_size=8) | any_text | json_values, max_size=4) | json_values,
    "env": st.dictionaries(any_text, any_text | json_values, max_size=3) | json_values,
    "tags": st.lists(st.from_regex(r"[a-z]{1,5}:[a-z]{1,5}", fullmatch=True) | json_values, max_size=3),
    "capabilities": st.lists(st.from_regex(r"[a-z*.]{1,8}", fullmatch=True) | json_values, max_size=3),
    "sandbox": st.dictionaries(st.sampled_from(["profile", "tier", "backend", "overrides", "allow_hosts", "x"]),
                               st.sampled_from(["none", "byo", "trusted", "any", "process", "bwrap", "*"])
                               | json_values, max_size=5) | json_values,
"timeout": st.integers(-10, 10 ** 7) | st.floats() | json_values,
    "name": st.text(max_size=70) | any_text | json_values,
    "tenant": any_text | json_values,
}
valid_values = {
    "command": st.lists(st.text(min_size=1, max_size=8).filter(lambda a: "\x00" not in a), min_size=1, max_size=3),
    "env": st.dictionaries(st.from_regex(r"[A-Z_][A-Z0-9_]{0,5}", fullmatch=True), st.text(max_size=8), max_size=2),
    "tags": st.lists(st.from_regex(r"[a-z]{1,5}:[a-z]{1,5}", fullmatch=True), max_size=2),
    "capabilities": st.lists(st.from_regex(r"[a-z]{1,5}\.[a-z]{1,5}", fullmatch=True), max_size=2),
    "sandbox": st.fixed_dictionaries({"profile": st.sampled_from(["none", "untrusted-code-read", WRITE])}, optional={
        "tier": st.sampled_from(["trusted", "any"]), "backend": st.sampled_from(["process", "bwrap", "docker"]),
        "overrides": st.dictionaries(st.sampled_from(["memory", "cpus", "pids", "tmpfs_size", "timeout"]),
                                     st.integers(1, 512) | st.sampled_from(["1G", "256M", "64K"]), max_size=2),
        "allow_hosts": st.lists(st.sampled_from(["pypi.org", "*.example.org", "10.0.0.1", "2001:db8::1"]),
                                max_size=2)}),
"timeout": st.integers(1, 604_800) | st.floats(1, 604_800),
    "name": st.from_regex(r"[A-Za-z0-9][A-Za-z0-9._ -]{0,10}", fullmatch=True),
    "tenant": st.from_regex(r"[a-z]{1,8}", fullmatch=True),
}
valid_jobs = st.fixed_dictionaries({"command": valid_values["command"], "sandbox": valid_values["sandbox"]},
                                   optional={k: v for k, v in valid_values.items() if k not in ("command", "sandbox")})
# Mostly-valid bodies reach the deeper checks: a valid job with one field (or one command argument) made hostile.
one_field_hostile = st.builds(lambda job, kv: {**job, kv[0]: kv[1]}, valid_jobs,
                              st.sampled_from(SUBMIT_FIELDS).flatmap(lambda k: st.tuples(st.just(k), field_values[k])))
one_argument_hostile = st.builds(lambda job, i, arg: {**job, "command": job["command"][:i] + [arg] + job["command"][i:]},
                                 valid_jobs, st.integers(0, 3), any_text | json_values)
job_bodies = st.one_of(one_field_hostile, one_argument_hostile, valid_jobs, json_values,
                       st.fixed_dictionaries({}, optional={k: json_values for k in SUBMIT_FIELDS}))


def test_fuzzed_job_submissions_never_get_a_5xx(pool):
    world = PondWorld(pool)
    accepted = []

    @settings(max_examples=150, deadline=None, database=None, derandomize=True,
              suppress_health_check=list(HealthCheck))
    @given(body=job_bodies)
    def submit_is_answered(body):
        raw = json.dumps(body).encode()           # NaN and Infinity go out as the tokens Python's json reads
        status, payload = exchange(world.url, build_request(Case("fuzz", "POST", "/v1/jobs", raw=raw, auth="admin"),
                                                            world.ctx))
        assert status is not None and status < 500, f"{status} for {raw[:300]!r}: {payload}"
        if status == 201:
            assert payload["state"] == "queued", payload
            accepted.append(payload["id"])
        else:
            check(Case("fuzz", "POST", "/v1/jobs", status=status, code=None), status, payload)

    submit_is_answered()
    for job_id in accepted[:20]:
        assert world.pond.job(job_id)["state"] == "queued"
    world.assert_intact()


def test_fuzzed_bytes_never_get_a_5xx(pool):
    world = PondWorld(pool)

    @settings(max_examples=100, deadline=None, database=None, derandomize=True,
              suppress_health_check=list(HealthCheck))
    @given(raw=st.binary(max_size=64) | st.text(max_size=64).map(str.encode))
    def bytes_are_answered(raw):
        for path in ("/v1/jobs", "/v1/orch/poll"):
            auth = "admin" if path == "/v1/jobs" else "orch"
            status, payload = exchange(world.url, build_request(Case("fuzz", "POST", path, raw=raw, auth=auth),
                                                                world.ctx))
            assert status is not None and status < 500, f"{status} for {raw!r} on {path}: {payload}"

    bytes_are_answered()
    world.assert_intact()


# -- the orchestrator: the world a sweep runs in --------------------------------------------------------------

class OrchestratorWorld:
    """A pond, a real `swarm.py serve`, and a worker enrolled by hand that holds two jobs (x and y)."""

    def __init__(self, pool):
        self.pond = pond = pool.pond(poll_hold=5, extra=("--allow-unsigned-results",))    # an unpinned worker
        # Its worker is hand-enrolled and never beats: give it an hour before it counts as lost.
        self.orch = pool.orchestrator(pond, token="op-secret", extra=("--worker-lost-after", "3600"))
        self.url = self.orch.url()
        status, body = api(self.url, "POST", "/v1/worker/enroll",
                           {"code": pond.enrollment_code(), "name": "manual", "tags": ["lane:manual"],
                            "capabilities": ["harness.*", "sandbox.process"], "slots": 2})
        assert status == 201, body
        self.worker, self.token = body["worker_id"], body["token"]
        jobs = [pond.submit([JOB_PY, "-c", "pass"], tags=["lane:manual"])["id"] for _ in range(2)]
        self.held = {}

        def claim():
            status, body = api(self.url, "POST", "/v1/worker/claim", {"wait": 2}, auth=f"Bearer {self.token}")
            assert status == 200, body
            self.held.update({j["job_id"]: j for j in body["jobs"]})
            return len(self.held) == 2

        wait_for(claim, 30, what="the hand-enrolled worker to hold two jobs")
        self.x, self.y = (self.held[j] for j in jobs)
        assert self.x["attempt"] == self.y["attempt"] == 1, self.held      # the catalogue's bodies say attempt 1
        self.ctx = {
            "tokens": {"worker": self.token, "operator": "op-secret"},
            "worker": self.worker, "x": self.x["job_id"], "y": self.y["job_id"], "claim": self.x["claim_token"],
            "claim_y": self.y["claim_token"],
        }

    def report(self, job, body, kind="state", claim=None):
        return api(self.url, "POST", f"/v1/worker/jobs/{job['job_id']}/{kind}", body, auth=f"Bearer {self.token}",
                   headers=[("X-Claim-Token", claim or job["claim_token"])])

    def assert_intact(self):
        status, body = api(self.url, "GET", "/healthz")
        assert status == 200 and body["ok"] is True, body
        assert self.orch.alive()
        status, body = api(self.url, "POST", "/v1/worker/claim", {"wait": 0}, auth=f"Bearer {self.token}")
        assert status == 200, f"the enrolled worker was lost: {body}"
        status, body = api(self.url, "GET", "/v1/pool/jobs", auth="Bearer op-secret")
        assert status == 200, body
        assert self.y["job_id"] in {j["job_id"] for j in body["jobs"]}, f"held job y lost: {body}"

    def assert_reports_still_reach_pond(self):
        """Both held jobs can still be finished, and pond hears about it: y (never touched by the sweep) first."""
        for job in (self.y, self.x):
            status, body = self.report(job, {"attempt": job["attempt"], "state": "done", "exit_code": 0})
            assert status == 200, (f"{job['job_id']}: a valid final report was refused after the sweep; the "
                                   f"orchestrator dropped the job on an invalid report it accepted: {body}")
            try:
                self.pond.wait_job(job["job_id"], ("done",), timeout=10)
            except AssertionError:
                raise AssertionError(f"{job['job_id']}: the orchestrator accepted a valid final report, but pond "
                                     f"never got it (is its outbox stuck behind a report pond refuses?); pond has "
                                     f"{self.pond.job(job['job_id'])['state']}") from None


# -- orchestrator catalogue ---------------------------------------------------------------------------------

def worker_auth_cases(method, path, body=NO_BODY, headers=()):
    return [
        Case("no Authorization header", method, path, body, headers=headers, status=401, code="unauthorized"),
        Case("Basic instead of Bearer", method, path, body, auth="Basic d2tyOng=", headers=headers, status=401,
             code="unauthorized"),
        Case("a garbled bearer token", method, path, body, auth="Bearer garbage", headers=headers,
             status=(401, 403), code=("unauthorized", "token_invalid")),
        Case("a token of the wrong kind", method, path, body, auth="Bearer orch.<worker>.secret", headers=headers,
             status=(401, 403), code=("unauthorized", "token_invalid")),
        Case("an unknown worker", method, path, body, auth="Bearer wkr.w_000000000000.secret", headers=headers,
             status=403, code="token_invalid"),
        Case("the right worker with a wrong secret", method, path, body, auth="Bearer wkr.<worker>.wrong",
             headers=headers, status=403, code="token_invalid"),
        Case("the operator token", method, path, body, auth="operator", headers=headers, status=(401, 403),
             code=("unauthorized", "token_invalid")),
        Case("a token of non-ASCII bytes", method, path, body, auth="Bearer wkr.\xc3\xa9.\xff", headers=headers,
             status=(401, 403), code=("unauthorized", "token_invalid")),
    ]


def operator_auth_cases(method, path, body=NO_BODY):
    return [
        Case("no Authorization header", method, path, body, status=401, code="unauthorized"),
        Case("Basic instead of Bearer", method, path, body, auth="Basic b3A6c2VjcmV0", status=401,
             code="unauthorized"),
        Case("a wrong operator token", method, path, body, auth="Bearer op-wrong", status=403, code="token_invalid"),
        Case("the operator token with a byte too many", method, path, body, auth="Bearer op-secretx", status=403,
             code="token_invalid"),
        Case("a worker token", method, path, body, auth="worker", status=403, code="token_invalid"),
        Case("a token of non-ASCII bytes", method, path, body, auth="Bearer \xc3\xa9\xff", status=403,
             code="token_invalid"),
    ]


ENROLL = "/v1/worker/enroll"
WCLAIM = "/v1/worker/claim"
WSTATE = "/v1/worker/jobs/<x>/state"
WCHUNK = "/v1/worker/jobs/<x>/chunk"
WSEAL = "/v1/worker/jobs/<x>/seal"
WREPORTS = "/v1/worker/reports"
WBEAT = "/v1/worker/heartbeat"
WCLAIM_X = (("X-Claim-Token", "<claim>"),)
X_RUNNING = {"attempt": 1, "state": "running"}
X_CHUNK = {"attempt": 1, "stream": "stdout", "seq": 0, "data": "aGk="}


def enroll(what, body=NO_BODY, **kw):
    return Case(what, "POST", ENROLL, body, **kw)


def claim(what, body=NO_BODY, **kw):
    return Case(what, "POST", WCLAIM, body, auth="worker", **kw)


def worker_state(what, body=NO_BODY, **kw):
    kw.setdefault("headers", WCLAIM_X)
    return Case(what, "POST", kw.pop("path", WSTATE), body, auth="worker", **kw)


def worker_chunk(what, body=NO_BODY, **kw):
    kw.setdefault("headers", WCLAIM_X)
    return Case(what, "POST", kw.pop("path", WCHUNK), body, auth="worker", **kw)


def worker_seal(what, body=NO_BODY, **kw):
    kw.setdefault("headers", WCLAIM_X)
    return Case(what, "POST", kw.pop("path", WSEAL), body, auth="worker", **kw)


def enroll_with(**fields):
    return dict({"code": UNKNOWN_CODE}, **fields)


ORCH_PROTOCOL_CASES = protocol_cases(ENROLL, "/healthz")

ORCH_WORKER_CASES = [
    *get_body_cases("GET", "/healthz", None),
    *get_body_cases("GET", "/metrics", None),
    # enroll (open; the orchestrator checks the shape, pond checks the code)
    *body_shape_cases("POST", ENROLL, None, enroll_with()),
    enroll("no code", {"name": "w"}, says="code"),
    enroll("code a number", enroll_with(code=123)),
    enroll("code empty", enroll_with(code="")),
    enroll("code with a slash", enroll_with(code="AB/CD")),
    enroll("code with a NUL byte", enroll_with(code="ABCD\x00")),
    enroll("code of 1 MiB", enroll_with(code="A" * MIB)),
    enroll("code malformed for pond", enroll_with(code="nope")),
    enroll("an unknown code", enroll_with(), status=403, code="code_unknown"),
    enroll("tags a string", enroll_with(tags="lane:x"), says="tags"),
    enroll("tags with a number", enroll_with(tags=[1]), says="tags"),
    enroll("tags with a space", enroll_with(tags=["a b"]), says="tags"),
    enroll("capabilities with upper case", enroll_with(capabilities=["Harness.*"]), says="capabilities"),
    enroll("slots 0", enroll_with(slots=0), says="slots"),
    enroll("slots 257", enroll_with(slots=257), says="slots"),
    enroll("slots a string", enroll_with(slots="2"), says="slots"),
    enroll("slots a boolean", enroll_with(slots=True), says="slots"),
    enroll("slots NaN", raw=f'{{"code": "{UNKNOWN_CODE}", "slots": NaN}}'.encode(), says="slots"),
    enroll("name a number", enroll_with(name=5), says="name"),
    enroll("name with a NUL byte", enroll_with(name="w\x00"), says="name"),
    enroll("x25519_public a number", enroll_with(x25519_public=5), says="x25519_public"),
    enroll("fingerprint of 1 MiB", enroll_with(fingerprint="a" * MIB), says="fingerprint"),
    enroll("fingerprint not hex (pond says)", enroll_with(fingerprint="z" * 64), says="fingerprint"),
    enroll("keys not the fingerprint's (pond says)", enroll_with(**KEYS_A, fingerprint="a" * 64),
           code="fingerprint_invalid"),
    Case("GET on enroll", "GET", ENROLL, status=405, code="method_not_allowed"),
    # claim
    *worker_auth_cases("POST", WCLAIM, {"wait": 0}),
    *body_shape_cases("POST", WCLAIM, "worker", {"wait": 0}),
    claim("wait negative", {"wait": -1}, says="wait"),
    claim("wait over an hour", {"wait": 3601}, says="wait"),
    claim("wait a string", {"wait": "1"}, says="wait"),
    claim("wait NaN", {"wait": 0}, raw=b'{"wait": NaN}', says="wait"),
    claim("tags a string", {"wait": 0, "tags": "lane:manual"}, says="tags"),
    claim("tags with a number", {"wait": 0, "tags": [1]}, says="tags"),
    claim("capabilities with null", {"wait": 0, "capabilities": [None]}, says="capabilities"),
    claim("slots 0", {"wait": 0, "slots": 0}, says="slots"),
    claim("slots a list", {"wait": 0, "slots": [2]}, says="slots"),
    claim("holding a string", {"wait": 0, "holding": "j_1"}, says="holding"),
    claim("holding with a malformed id", {"wait": 0, "holding": ["j.1"]}, says="holding"),
    claim("holding 4097 ids", {"wait": 0, "holding": [f"j_{i}" for i in range(4097)]}, says="holding"),
    # a batch of reports: what refuses it whole (each report's own answer: tests/test_batches.py)
    *worker_auth_cases("POST", WREPORTS, {"reports": [{"job_id": "<x>", "claim_token": "<claim>", "kind": "state",
                                                        "body": {"attempt": 1, "state": "running"}}]}),
    *body_shape_cases("POST", WREPORTS, "worker", {"reports": []}),
    Case("reports missing", "POST", WREPORTS, {}, auth="worker", says="reports"),
    Case("reports a string", "POST", WREPORTS, {"reports": "x"}, auth="worker", says="reports"),
    Case("no reports", "POST", WREPORTS, {"reports": []}, auth="worker", says="reports"),
    Case("65 reports", "POST", WREPORTS, {"reports": [{"kind": "state"}] * 65}, auth="worker", says="reports"),
    # heartbeat: no body, or {}
    *worker_auth_cases("POST", WBEAT),
    *body_shape_cases("POST", WBEAT, "worker", {}),
    Case("GET on heartbeat", "GET", WBEAT, auth="worker", status=405, code="method_not_allowed"),
    # reports: who holds the job
    *worker_auth_cases("POST", WSTATE, X_RUNNING, headers=WCLAIM_X),
    *worker_auth_cases("POST", WCHUNK, X_CHUNK, headers=WCLAIM_X),
    worker_state("no X-Claim-Token", X_RUNNING, headers=(), status=(401, 409), code=("unauthorized", "stale_attempt")),
    worker_state("a wrong X-Claim-Token", X_RUNNING, headers=(("X-Claim-Token", "nope"),), status=409,
                 code="stale_attempt"),
    worker_state("the claim token of another job", X_RUNNING, headers=(("X-Claim-Token", "<claim_y>"),), status=409,
                 code="stale_attempt"),
    worker_state("an X-Claim-Token of non-ASCII bytes", X_RUNNING, headers=(("X-Claim-Token", "\xc3\xa9\xff"),),
                 status=409, code="stale_attempt"),
    worker_state("the next attempt", dict(X_RUNNING, attempt=2), status=409, code="stale_attempt"),
    worker_state("a job this worker does not hold", X_RUNNING, path=f"/v1/worker/jobs/{UNKNOWN_JOB}/state",
                 status=(404, 409), code=("not_found", "stale_attempt")),
    worker_state("a malformed job id", X_RUNNING, path="/v1/worker/jobs/a.b/state", status=404, code="not_found"),
    worker_chunk("a wrong X-Claim-Token", X_CHUNK, headers=(("X-Claim-Token", "nope"),), status=409,
                 code="stale_attempt"),
    worker_chunk("a job this worker does not hold", X_CHUNK, path=f"/v1/worker/jobs/{UNKNOWN_JOB}/chunk",
                 status=(404, 409), code=("not_found", "stale_attempt")),
    # seal: the orchestrator checks who holds the job, pond checks the rest (x names no credential)
    *worker_auth_cases("POST", WSEAL, {"attempt": 1}, headers=WCLAIM_X),
    *body_shape_cases("POST", WSEAL, "worker", {"attempt": 1}, headers=WCLAIM_X),
    worker_seal("no X-Claim-Token", {"attempt": 1}, headers=(), status=401, code="unauthorized"),
    worker_seal("an empty X-Claim-Token", {"attempt": 1}, headers=(("X-Claim-Token", ""),), status=401,
                code="unauthorized"),
    worker_seal("a wrong X-Claim-Token", {"attempt": 1}, headers=(("X-Claim-Token", "nope"),), status=409,
                code="stale_attempt"),
    worker_seal("the claim token of another job", {"attempt": 1}, headers=(("X-Claim-Token", "<claim_y>"),),
                status=409, code="stale_attempt"),
    worker_seal("an X-Claim-Token of non-ASCII bytes", {"attempt": 1},
                headers=(("X-Claim-Token", "\xc3\xa9\xff"),), status=409, code="stale_attempt"),
    worker_seal("the next attempt", {"attempt": 2}, status=409, code="stale_attempt"),
    worker_seal("attempt a string", {"attempt": "1"}, status=(400, 409), code=("bad_request", "stale_attempt")),
    worker_seal("attempt a boolean", {"attempt": True}, status=(400, 409), code=("bad_request", "stale_attempt")),
    worker_seal("attempt missing", {}, says="attempt"),
    worker_seal("no body", says="attempt"),
    worker_seal("a job this worker does not hold", {"attempt": 1}, path=f"/v1/worker/jobs/{UNKNOWN_JOB}/seal",
                status=409, code="stale_attempt"),
    worker_seal("a malformed job id", {"attempt": 1}, path="/v1/worker/jobs/a.b/seal", status=404,
                code="not_found"),
    worker_seal("a job that names no credential (pond says)", {"attempt": 1}, says="credential"),
    # source redeem, reads and artifact pieces: relayed to pond as they are, once the worker holds the job
    *[case for what, body in (("source", {"attempt": 1, "token": "t" * 32}),
                              ("source/read", {"attempt": 1, "token": "t" * 32, "offset": 0}),
                              ("artifacts", {"attempt": 1, "name": "work/x", "size": 2, "sha256": "0" * 64,
                                             "offset": 0, "data": "aGk="}))
      for case in (*worker_auth_cases("POST", f"/v1/worker/jobs/<x>/{what}", body, headers=WCLAIM_X),
                   *body_shape_cases("POST", f"/v1/worker/jobs/<x>/{what}", "worker", body, headers=WCLAIM_X),
                   worker_seal("no X-Claim-Token", body, path=f"/v1/worker/jobs/<x>/{what}", headers=(),
                               status=401, code="unauthorized"),
                   worker_seal("the next attempt", dict(body, attempt=2), path=f"/v1/worker/jobs/<x>/{what}",
                               status=409, code="stale_attempt"),
                   worker_seal("attempt missing", {}, path=f"/v1/worker/jobs/<x>/{what}", says="attempt"),
                   worker_seal("pond's refusal, relayed (a token not the attempt's, a wrong sha256)", body,
                               path=f"/v1/worker/jobs/<x>/{what}", status=(400, 403),
                               code=("token_invalid", "bundle_invalid")))],
    Case("GET on a seal", "GET", WSEAL, auth="worker", headers=WCLAIM_X, status=405, code="method_not_allowed"),
    # reports: what they say (the orchestrator must refuse what pond would refuse, or the job is stranded)
    *body_shape_cases("POST", WSTATE, "worker", X_RUNNING, headers=WCLAIM_X),
    worker_state("attempt missing", {"state": "running"}, says="attempt"),
    worker_state("attempt a string", dict(X_RUNNING, attempt="1"), status=(400, 409),
                 code=("bad_request", "stale_attempt")),
    worker_state("state missing", {"attempt": 1}, says="state"),
    worker_state("state unknown", dict(X_RUNNING, state="bogus"), says="bogus"),
    worker_state("state queued", dict(X_RUNNING, state="queued")),
    worker_state("state a list", dict(X_RUNNING, state=["done"])),
    worker_state("chunks a string", dict(X_RUNNING, chunks="hi"), says="chunks"),
    *body_shape_cases("POST", WCHUNK, "worker", X_CHUNK, headers=WCLAIM_X),
    worker_chunk("stream unknown", dict(X_CHUNK, stream="stdin"), says="stream"),
    worker_chunk("seq negative", dict(X_CHUNK, seq=-1), says="seq"),
    worker_chunk("data not base64", dict(X_CHUNK, data="%%%"), says="data"),
    worker_chunk("data over 1 MiB", dict(X_CHUNK, data="QUFB" * (MIB // 3 + 2)), says="data"),
    # last: final reports pond refuses (one the orchestrator wrongly accepts takes the job out of the worker's hands)
    worker_state("exit_code a string", {"attempt": 1, "state": "failed", "exit_code": "1"}, says="exit_code"),
    worker_state("error a number", {"attempt": 1, "state": "failed", "error": 7}, says="error"),
    worker_state("requeue on a done report", {"attempt": 1, "state": "done", "exit_code": 0, "requeue": True},
                 says="requeue"),
    worker_state("requeue with an exit code", {"attempt": 1, "state": "failed", "exit_code": 1, "error": "x",
                                               "requeue": True}, says="requeue"),
    worker_state("done with exit_code 1", {"attempt": 1, "state": "done", "exit_code": 1}, says="exit_code"),
    worker_state("failed with neither exit_code nor error", {"attempt": 1, "state": "failed"}, says="failed"),
    worker_state("an error of 2001 characters", {"attempt": 1, "state": "failed", "error": "e" * 2001},
                 says="error"),
    worker_state("an error with a NUL byte", {"attempt": 1, "state": "failed", "error": "e\x00"}, says="error"),
    worker_state("an error with a lone surrogate", {"attempt": 1, "state": "failed", "error": "\ud800"},
                 says="error"),
    worker_state("attempt 1.0", {"attempt": 1.0, "state": "failed", "exit_code": 3}, says="attempt"),
    worker_state("65 chunks", {"attempt": 1, "state": "failed", "exit_code": 3,
                               "chunks": [dict(stream="stdout", seq=i, data="aGk=") for i in range(65)]},
                 says="chunks"),
    worker_chunk("the next attempt", dict(X_CHUNK, attempt=2), status=409, code="stale_attempt"),
]

ORCH_OPERATOR_CASES = [
    *operator_auth_cases("GET", "/v1/pool/status"),
    *operator_auth_cases("GET", "/v1/pool/jobs"),
    *operator_auth_cases("POST", "/v1/pool/jobs/<x>/cancel"),
    *get_body_cases("GET", "/v1/pool/status", "operator"),
    *get_body_cases("GET", "/v1/pool/jobs", "operator"),
    Case("cancel a job the pool does not hold", "POST", f"/v1/pool/jobs/{UNKNOWN_JOB}/cancel", auth="operator",
         status=404, code="not_found"),
    Case("cancel a malformed job id", "POST", "/v1/pool/jobs/a.b/cancel", auth="operator", status=404,
         code="not_found"),
    Case("cancel a job id of 65 characters", "POST", "/v1/pool/jobs/" + "j" * 65 + "/cancel", auth="operator",
         status=404, code="not_found"),
    *body_shape_cases("POST", f"/v1/pool/jobs/{UNKNOWN_JOB}/cancel", "operator", {}),
    Case("POST on status", "POST", "/v1/pool/status", {}, auth="operator", status=405, code="method_not_allowed"),
    Case("GET on cancel", "GET", "/v1/pool/jobs/<x>/cancel", auth="operator", status=405,
         code="method_not_allowed"),
    Case("an unknown pool path", "GET", "/v1/pool/secrets", auth="operator", status=404, code="not_found"),
    *operator_auth_cases("POST", "/v1/pool/workers/w_unknown/evict", {}),
    *body_shape_cases("POST", "/v1/pool/workers/w_unknown/evict", "operator", {}),
    Case("evict with drain a string", "POST", "/v1/pool/workers/w_unknown/evict", {"drain": "no"}, auth="operator",
         status=400, code="bad_request"),
    Case("evict a worker the pool does not have", "POST", "/v1/pool/workers/w_unknown/evict", {}, auth="operator",
         status=404, code="not_found"),
    Case("GET on evict", "GET", "/v1/pool/workers/w_unknown/evict", auth="operator", status=405,
         code="method_not_allowed"),
]

ORCH_CATALOGUE = ORCH_PROTOCOL_CASES + ORCH_WORKER_CASES + ORCH_OPERATOR_CASES


# -- orchestrator sweeps ---------------------------------------------------------------------------------------

def test_orchestrator_refuses_malformed_http(pool, subtests):
    world = OrchestratorWorld(pool)
    sweep(world.url, ORCH_PROTOCOL_CASES, world.ctx, subtests)
    world.assert_intact()
    world.assert_reports_still_reach_pond()


def test_orchestrator_worker_endpoints_refuse_bad_input(pool, subtests):
    world = OrchestratorWorld(pool)
    sweep(world.url, ORCH_WORKER_CASES, world.ctx, subtests)
    world.assert_intact()
    world.assert_reports_still_reach_pond()


def test_orchestrator_operator_endpoints_refuse_bad_input(pool, subtests):
    world = OrchestratorWorld(pool)
    sweep(world.url, ORCH_OPERATOR_CASES, world.ctx, subtests)
    world.assert_intact()
    world.assert_reports_still_reach_pond()


def test_the_orchestrator_catalogue_covers_every_route():
    import swarm
    routes = [(m, p) for m, p, *_ in swarm.orchestrator_routes(None, "")]
    missing = [f"{m} {p}" for m, p in routes if not any(matches_route(c, m, p) for c in ORCH_CATALOGUE)]
    assert not missing, f"routes with no bad-input case: {missing}"

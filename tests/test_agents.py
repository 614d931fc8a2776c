"""Agent jobs (issue 10): harness and model registries, expansion before storing, and the worker's
credential broker between a job in bwrap and a fake OpenAI- or Anthropic-compatible upstream on loopback.

Real processes throughout: pond on port 0, `swarm.py serve`, a root `swarm.py worker` whose jobs run in
bwrap as their slot's uid, and the upstreams below (http on 127.0.0.1, which a model may name). The
"agent" is a small stdlib script run as the harness: it calls the model through the broker as an SDK
would, and prints everything it can see (its env, the files in its HOME, the /proc of its sandbox), so
the test can search all of it, and every process on the host, for the real key.
"""

import json
import os
import secrets
import shutil
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from conftest import JOB_PY, SHARED_PIDS, Proc, store_pool, wait_for
from sandboxing import environ_holding, prepare_root_dirs, processes, start_worker

from pond import sealing

SLOT_UID_BASE = 200_000_000 + 512 * (os.getpid() % 50_000)     # this run's own slot uids
JOB_TIMEOUT = 60


# -- fake upstreams -------------------------------------------------------------------------------------

class FakeModel(BaseHTTPRequestHandler):
    """OpenAI's /v1/chat/completions and Anthropic's /v1/messages, streamed (SSE) or not, with usage.
    It records the key each call carried; a prompt of ECHO_KEY gets a 401 that quotes the key back."""

    protocol_version = "HTTP/1.1"

    def do_POST(self):
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        srv = self.server
        key = self.headers.get("x-api-key") if srv.kind == "anthropic" else self.headers.get("Authorization", "")[7:]
        srv.calls.append({"path": self.path, "key": key, "headers": dict(self.headers.items()), "body": body})
        if json.dumps(body).find("ECHO_KEY") >= 0:
            return self._send(401, {"error": {"message": f"Incorrect API key provided: {key}"}})
        if self.path.endswith("/responses"):
            return self._responses(body)
        if body.get("stream"):
            return self._stream(body)
        if srv.kind == "openai":
            return self._send(200, {"id": "c1", "object": "chat.completion", "model": body["model"],
                                    "choices": [{"index": 0, "message": {"role": "assistant", "content": "hello from gpt"}}],
                                    "usage": {"prompt_tokens": 11, "completion_tokens": 7, "total_tokens": 18}})
        self._send(200, {"id": "m1", "type": "message", "role": "assistant", "model": body["model"],
                         "content": [{"type": "text", "text": "hello from claude"}],
                         "usage": {"input_tokens": 13, "output_tokens": 5}})

    def _send(self, status, payload):
        data = json.dumps(payload).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def _responses(self, body):
        """OpenAI's Responses API, streamed, as `codex exec` speaks it: first a tool call that writes a file
        in /work, then, once its output comes back, a final message."""
        done = any(item.get("type") == "function_call_output" for item in body.get("input", []))
        tools = {t.get("name") for t in body.get("tools", [])}
        write = "echo written-by-codex > /work/hello.txt && tr a-z A-Z < /work/hello.txt"
        call = ({"name": "exec_command", "arguments": json.dumps({"cmd": write, "tty": False})} if "exec_command" in tools
                else {"name": "shell_command", "arguments": json.dumps({"command": write})} if "shell_command" in tools
                else {"name": "shell", "arguments": json.dumps({"command": ["sh", "-c", write]})})
        item = ({"type": "message", "id": "msg_1", "role": "assistant", "content": [{"type": "output_text",
                                                                                     "text": "wrote hello.txt"}]}
                if done else {"type": "function_call", "id": "fc_1", "call_id": "call_1", **call})
        events = [{"type": "response.created", "response": {"id": "resp_1"}},
                  {"type": "response.output_item.done", "item": item},
                  {"type": "response.completed", "response": {"id": "resp_1", "usage": {
                      "input_tokens": 1000, "output_tokens": 40, "total_tokens": 1040}}}]
        self._chunks([f"event: {e['type']}\ndata: {json.dumps(e)}\n\n" for e in events])

    def _chunks(self, lines):
        self.send_response(200)
        self.send_header("Content-Type", "text/event-stream")
        self.send_header("Transfer-Encoding", "chunked")
        self.end_headers()
        for line in lines:
            data = line.encode()
            self.wfile.write(b"%x\r\n%b\r\n" % (len(data), data))
            self.wfile.flush()
            time.sleep(self.server.gap)
        self.wfile.write(b"0\r\n\r\n")

    def _stream(self, body):
        if self.server.kind == "openai":
            events = [{"choices": [{"delta": {"content": word}}]} for word in ("hello ", "streamed ", "gpt")]
            if (body.get("stream_options") or {}).get("include_usage"):
                events.append({"choices": [], "usage": {"prompt_tokens": 21, "completion_tokens": 9}})
            lines = [f"data: {json.dumps(e)}\n\n" for e in events] + ["data: [DONE]\n\n"]
        else:
            events = [("message_start", {"type": "message_start", "message": {"usage": {"input_tokens": 23,
                                                                                       "output_tokens": 1}}})]
            events += [("content_block_delta", {"type": "content_block_delta", "delta": {"type": "text_delta",
                                                                                        "text": w}})
                       for w in ("hello ", "streamed ", "claude")]
            events += [("message_delta", {"type": "message_delta", "usage": {"output_tokens": 6}}),
                       ("message_stop", {"type": "message_stop"})]
            lines = [f"event: {name}\ndata: {json.dumps(e)}\n\n" for name, e in events]
        self._chunks(lines)

    def log_message(self, *args):
        pass


class Upstream:
    def __init__(self, kind, gap=0.01):
        self.server = ThreadingHTTPServer(("127.0.0.1", 0), FakeModel)
        self.server.kind, self.server.calls, self.server.gap = kind, [], gap
        self.thread = threading.Thread(target=self.server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
        self.thread.start()
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}" + ("/v1" if kind == "openai" else "")

    @property
    def calls(self):
        return self.server.calls

    def close(self):
        self.server.shutdown()
        self.server.server_close()
        self.thread.join(5)


# -- the "agent" a harness runs -------------------------------------------------------------------------

AGENT = r"""
import json, os, sys, urllib.request, urllib.error
model, task = sys.argv[1], sys.argv[2]
provider = "openai" if "OPENAI_BASE_URL" in os.environ else "anthropic"
if provider == "openai":
    url = os.environ["OPENAI_BASE_URL"] + "/chat/completions"
    headers = {"Authorization": "Bearer " + os.environ["OPENAI_API_KEY"]}
    body = {"model": model, "messages": [{"role": "user", "content": task}]}
else:
    url = os.environ["ANTHROPIC_BASE_URL"] + "/v1/messages"
    headers = {"x-api-key": os.environ["ANTHROPIC_API_KEY"], "anthropic-version": "2023-06-01"}
    body = {"model": model, "max_tokens": 64, "messages": [{"role": "user", "content": task}]}
headers["Content-Type"] = "application/json"

def call(stream=False, target=url):
    data = json.dumps(dict(body, stream=stream)).encode()
    req = urllib.request.Request(target, data=data, headers=headers, method="POST")
    try:
        with urllib.request.urlopen(req, timeout=30) as r:
            out = b""
            while chunk := r.read1(65536):
                out += chunk
            return r.status, out.decode()
    except urllib.error.HTTPError as e:
        return e.code, e.read().decode()

if task == "runaway":
    for i in range(50):
        status, text = call()
        print("CALL", i, status, text[:200])
        if status != 200:
            break
elif task == "other-host":
    import socket
    s = socket.create_connection(("127.0.0.1", 8787), timeout=10)
    s.sendall(b"POST http://api.example.com/v1/chat/completions HTTP/1.1\r\nHost: api.example.com\r\n"
              b"Content-Length: 2\r\n\r\n{}")
    print("OTHER", s.recv(4096).decode().split("\r\n")[0])
    status, text = call(target=url.replace("127.0.0.1:8787", "127.0.0.1:8787/../admin"))
    print("TRAVERSAL", status)
    headers["Authorization"] = headers["x-api-key"] = "not-the-token"
    print("BADTOKEN", call()[0])
else:
    for stream in (False, True):
        status, text = call(stream)
        print("STATUS", stream, status)
        print("ANSWER", json.dumps(text))
print("ENV", json.dumps(dict(os.environ)))
home = os.environ["HOME"]
for root, dirs, files in os.walk(home):
    for name in files:
        path = os.path.join(root, name)
        print("FILE", os.path.relpath(path, home), oct(os.stat(path).st_mode & 0o777), open(path).read())
for pid in os.listdir("/proc"):
    if pid.isdigit():
        for what in ("environ", "cmdline"):
            try:
                print("PROC", pid, what, open(f"/proc/{pid}/{what}", "rb").read().replace(b"\0", b" ").decode())
            except OSError:
                pass
open("/work/agent-was-here", "w").write("done\n")
"""


def agent_harness(key="fake-agent", **extra):
    return dict({"key": key, "label": "a stdlib agent for tests", "capability": "harness.python3",
                 "command_template": [JOB_PY, "-c", AGENT, "{{MODEL}}", "{{PROMPT}}"],
                 "files": [{"path": ".config/agent/config.toml",
                            "content": 'model = "{{MODEL}}"\nbase_url = "{{BROKER_URL}}"\n'}],
                 "env": {"AGENT_MODEL": "{{MODEL}}"}}, **extra)


# -- one pool for the module -----------------------------------------------------------------------------


class Agents:
    def __init__(self, tmp, pool):
        self.tmp, self.dir, self.pool = tmp, prepare_root_dirs(tmp), pool
        self.upstreams = {"openai": Upstream("openai"), "anthropic": Upstream("anthropic")}
        self.keys = {kind: f"sk-real-{kind}-" + secrets.token_urlsafe(24) for kind in self.upstreams}
        self.pond = self.pool.pond()
        self.orch = self.pool.orchestrator(self.pond)
        self.worker = start_worker(self.dir, tmp, self.pond, self.orch, "root", tags="pool:trusted",
                                   capabilities="sandbox.bwrap,harness.python3,harness.codex",
                                   extra=("--slot-uids", str(SLOT_UID_BASE)), name="agents")
        self.pool.procs.append(self.worker)
        SHARED_PIDS.update(p.proc.pid for p in self.pool.procs)
        api = self.pond.api
        for kind, upstream in self.upstreams.items():
            var = "OPENAI_API_KEY" if kind == "openai" else "ANTHROPIC_API_KEY"
            assert api("POST", "/v1/admin/credentials", {"name": kind, "secrets": {var: self.keys[kind]}})[0] == 201
            model = {"key": kind, "provider": kind, "model_id": f"{kind}-model-1", "credential": kind,
                     "base_url": upstream.url, "input_cost_per_mtok": 2.0, "output_cost_per_mtok": 10.0}
            assert api("POST", "/v1/admin/models", model)[0] == 201
        assert api("POST", "/v1/admin/harnesses", agent_harness())[0] == 201

    def run(self, model, prompt, **agent):
        body = {"agent": {"harness": "fake-agent", "model": model, "prompt": prompt, **agent},
                "sandbox": {"profile": "untrusted-code-write"}}
        job = self.pond.client.post("/v1/jobs", body)
        job = self.pond.wait_job(job["id"], timeout=JOB_TIMEOUT)
        out = self.pond.output(job["id"])
        return job, out["stdout"].decode(errors="replace"), out["stderr"].decode(errors="replace")

    def close(self):
        self.pool.stop_all()
        for upstream in self.upstreams.values():
            upstream.close()
        shutil.rmtree(self.dir, ignore_errors=True)


@pytest.fixture(scope="module")
def agents(request, tmp_path_factory):
    if os.getuid() != 0 or not shutil.which("bwrap"):
        pytest.skip("the broker runs beside a bwrap sandbox: root and bwrap needed")
    tmp = tmp_path_factory.mktemp("agents")
    pool = Agents(tmp, store_pool(request, tmp))
    try:
        yield pool
    finally:
        pool.close()


def lines(stdout, tag):
    return [line.split(" ", 1)[1] for line in stdout.splitlines() if line.startswith(tag + " ")]


def assert_key_nowhere(agents, key, *texts):
    """The real key is in no output, no file the job saw, no process's environment or command line."""
    for text in texts:
        assert key not in text
    assert environ_holding(key) == []
    assert not [p for p in processes() if key in p[2]]
    for path in files_under(agents.worker.state_dir, agents.worker.sandbox_dir, agents.orch.state_dir):
        try:
            assert key.encode() not in path.read_bytes(), path
        except (PermissionError, FileNotFoundError):    # not ours to read, or gone since the walk saw it
            pass


def files_under(*roots):
    """Every regular file under `roots`, walked while jobs may still remove theirs (a harness's
    .codex/sessions): a directory that vanishes mid-walk has nothing left to check; any other
    error but a permission one is raised."""
    def vanished_or_refused(error):
        if not isinstance(error, (FileNotFoundError, PermissionError)):
            raise error
    for root in roots:
        for top, _, names in os.walk(root, onerror=vanished_or_refused):
            for name in names:
                path = Path(top, name)
                if path.is_file() and not path.is_symlink():
                    yield path


# -- through the broker ------------------------------------------------------------------------------------

@pytest.mark.parametrize("kind", ["openai", "anthropic"])
def test_an_agent_calls_its_model_through_the_broker_which_alone_holds_the_key(agents, kind):
    upstream, key = agents.upstreams[kind], agents.keys[kind]
    before = len(upstream.calls)
    job, out, err = agents.run(kind, "say hello")
    assert job["state"] == "done", (job, out[-2000:], err[-2000:])
    calls = upstream.calls[before:]
    assert [c["key"] for c in calls] == [key, key]                  # the upstream gets the real key
    assert calls[1]["body"]["stream"] is True
    assert lines(out, "STATUS") == ["False 200", "True 200"]
    answers = lines(out, "ANSWER")
    assert "hello from" in answers[0] and "streamed" in answers[1] and "data:" in answers[1]
    env = json.loads(lines(out, "ENV")[0])
    prefix = kind.upper()
    assert env[f"{prefix}_API_KEY"].startswith("swarm-") and env[f"{prefix}_API_KEY"] != key
    assert env[f"{prefix}_BASE_URL"] == env["BROKER_URL"] == "http://127.0.0.1:8787" + ("/v1" if kind == "openai" else "")
    assert env["AGENT_MODEL"] == f"{kind}-model-1" and "127.0.0.1" in env["NO_PROXY"]
    files = lines(out, "FILE")
    assert files[0].startswith(".config/agent/config.toml 0o644 model = \"" + f"{kind}-model-1")
    assert f'base_url = "{env["BROKER_URL"]}"' in out
    assert_key_nowhere(agents, key, out, err, json.dumps(job))
    usage = agents.pond.client.get(f"/v1/jobs/{job['id']}/usage")
    expected = (11 + 21, 7 + 9) if kind == "openai" else (13 + 23, 5 + 6)
    assert (usage["input_tokens"], usage["output_tokens"]) == expected and usage["attested"] is True
    assert [c["status"] for c in usage["calls"]] == [200, 200] and usage["calls"][0]["model"] == f"{kind}-model-1"
    assert usage["cost"] == pytest.approx(expected[0] * 2e-6 + expected[1] * 10e-6)
    shown = agents.pond.cli("job", job["id"])
    assert shown.returncode == 0 and f"{expected[0]} tokens in, {expected[1]} out, 2 calls" in shown.stdout
    verified = agents.pond.cli("verify", job["id"])
    assert verified.returncode == 0, verified.stderr
    assert "swarm-broker: " in err and key not in err


def test_the_broker_is_no_proxy_and_scrubs_the_key_from_upstream_errors(agents):
    key = agents.keys["openai"]
    job, out, err = agents.run("openai", "other-host")
    assert lines(out, "OTHER") == ["HTTP/1.1 403 Forbidden"] and lines(out, "TRAVERSAL") == ["403"]
    assert lines(out, "BADTOKEN") == ["401"]
    job, out, err = agents.run("openai", "ECHO_KEY")
    assert lines(out, "STATUS")[:1] == ["False 401"], (job, out[-3000:], err[-3000:])
    assert "[redacted]" in lines(out, "ANSWER")[0]
    assert agents.upstreams["openai"].calls[-1]["key"] == key          # it was sent, and its echo scrubbed
    assert_key_nowhere(agents, key, out, err)


def test_a_budget_stops_a_runaway_agent(agents):
    upstream = agents.upstreams["anthropic"]
    before = len(upstream.calls)
    job, out, err = agents.run("anthropic", "runaway", max_tokens=50)
    calls = lines(out, "CALL")
    assert calls[-1].split()[1] == "429" and "budget of 50 tokens" in calls[-1], calls
    assert len(upstream.calls) - before == 3                          # 18 tokens a call: the 4th is refused
    usage = agents.pond.client.get(f"/v1/jobs/{job['id']}/usage")
    assert usage["refused"] == 1 and usage["input_tokens"] + usage["output_tokens"] == 54
    assert "budget-exhausted" in err


def test_codex_exec_from_npm_runs_in_bwrap_through_the_broker_and_writes_in_work(agents):
    """The real `codex exec` (npm @openai/codex, which .ci/run installs), the codex preset, the fake
    upstream speaking the Responses API: one tool call that writes /work/hello.txt, then a message."""
    if not shutil.which("codex", path="/usr/local/bin:/usr/bin:/bin"):
        if os.environ.get("CI") == "true":
            pytest.fail("codex is missing in CI: .ci/run installs it (npm install -g @openai/codex)")
        pytest.skip("codex is not installed (npm install -g @openai/codex)")
    assert agents.pond.cli("admin", "harness", "from-preset", "codex").returncode == 0
    upstream, key = agents.upstreams["openai"], agents.keys["openai"]
    before = len(upstream.calls)
    body = {"agent": {"harness": "codex", "model": "openai", "prompt": "write hello.txt"},
            "sandbox": {"profile": "untrusted-code-write"}}
    job = agents.pond.wait_job(agents.pond.client.post("/v1/jobs", body)["id"], timeout=120)
    out = agents.pond.output(job["id"])
    out, err = out["stdout"].decode(errors="replace"), out["stderr"].decode(errors="replace")
    assert job["state"] == "done", (job["error"], out[-3000:], err[-3000:])
    calls = upstream.calls[before:]
    assert [c["path"] for c in calls] == ["/v1/responses", "/v1/responses"] and {c["key"] for c in calls} == {key}
    assert "WRITTEN-BY-CODEX" in json.dumps(calls[1]["body"]["input"])     # its tool wrote /work/hello.txt
    assert "wrote hello.txt" in out + err
    usage = agents.pond.client.get(f"/v1/jobs/{job['id']}/usage")
    assert (usage["input_tokens"], usage["output_tokens"], len(usage["calls"])) == (2000, 80, 2)
    assert_key_nowhere(agents, key, out, err)


def test_usage_sums_the_signed_usage_per_model_harness_and_tenant(agents):
    job, out, err = agents.run("anthropic", "say hello")
    assert job["state"] == "done", err[-2000:]
    done = agents.pond.cli("usage", "--by", "model", "--json")
    assert done.returncode == 0, done.stderr
    by_model = {g["model"]: g for g in json.loads(done.stdout)["usage"]}
    one = agents.pond.client.get(f"/v1/jobs/{job['id']}/usage")
    assert by_model["anthropic"]["input_tokens"] >= one["input_tokens"] > 0 and by_model["anthropic"]["jobs"] >= 1
    assert by_model["anthropic"]["cost"] >= one["cost"] > 0
    by_harness = agents.pond.client.get("/v1/usage", by="harness")["usage"]
    assert "fake-agent" in {g["harness"] for g in by_harness}
    assert agents.pond.client.get("/v1/usage", since=str(time.time() + 3600))["usage"] == []
    table = agents.pond.cli("usage", "--by", "harness", "--days", "1")
    assert table.returncode == 0 and "fake-agent" in table.stdout and "TOKENS IN" in table.stdout
    assert agents.pond.api("GET", "/v1/usage?by=colour")[0] == 400


def test_an_agent_job_whose_harness_is_missing_goes_back_to_the_queue_not_127(agents):
    """The worker advertises harness.python3 but this harness's executable is not there: each
    attempt goes back to the queue with the reason (another worker may have it), and after
    max_attempts the job fails saying so; it never runs, never exits 127, and nothing is unsealed."""
    ghost = agent_harness(key="ghost", command_template=["ghost-agent-not-installed", "{{PROMPT}}"])
    assert agents.pond.api("POST", "/v1/admin/harnesses", ghost)[0] == 201
    body = {"agent": {"harness": "ghost", "model": "openai", "prompt": "boo"}, "sandbox": {"profile": "untrusted-code-write"}}
    job = agents.pond.wait_job(agents.pond.client.post("/v1/jobs", body)["id"], timeout=JOB_TIMEOUT)
    assert job["state"] == "failed" and job["exit_code"] is None, job
    assert "ghost-agent-not-installed is not installed on this worker" in job["error"] and "gave up" in job["error"]
    events = [e["event"] for e in job["events"]]
    assert events.count("cannot_start") == 3 and "sealed" not in events, events


# -- pond: registries and expansion -------------------------------------------------------------------------

def test_registries_validate_entries_and_name_the_field(agents):
    api = agents.pond.api
    good = agent_harness(key="h2")
    cases = [
        ({**good, "command_template": ["x", "{{NOPE}}"]}, "command_template[1]"),
        ({**good, "files": [{"path": "/etc/passwd", "content": "x"}]}, "files[0].path"),
        ({**good, "files": [{"path": "~/.x", "content": "x"}]}, "files[0].path"),
        ({**good, "files": [{"path": "a/../../x", "content": "x"}]}, "files[0].path"),
        ({**good, "files": [{"path": "a", "content": "{{SECRET:OPENAI_API_KEY}}"}]}, "files"),
        ({**good, "capability": "codex"}, "capability"),
    ]
    for body, field in cases:
        status, answer = api("POST", "/v1/admin/harnesses", body)
        assert status == 422 and answer["error"]["code"] == "registry_invalid", (body, answer)
        assert answer["error"]["message"].startswith(field), answer
    model = {"key": "m2", "provider": "openai", "model_id": "x", "credential": "openai", "base_url": "https://x.test/v1"}
    for change, field in [({"provider": "gemini"}, "provider"), ({"credential": "nope"}, "credential"),
                          ({"base_url": "http://api.example.com/v1"}, "base_url"),
                          ({"base_url": "ftp://127.0.0.1/"}, "base_url"), ({"input_cost_per_mtok": -1}, "input_cost")]:
        status, answer = api("POST", "/v1/admin/models", {**model, **change})
        assert status == 422 and answer["error"]["message"].startswith(field), answer
    assert api("POST", "/v1/admin/models", model)[0] == 201
    listed = agents.pond.cli("admin", "model", "list")
    assert listed.returncode == 0 and "m2" in listed.stdout and "https://x.test/v1" in listed.stdout
    shown = agents.pond.cli("admin", "model", "show", "m2")
    assert json.loads(shown.stdout)["credential"] == "openai"
    assert agents.pond.cli("admin", "model", "delete", "m2").returncode == 0
    assert api("GET", "/v1/admin/models/m2")[0] == 404


def test_presets_and_the_claude_code_configuration_they_render(agents):
    for preset in ("codex", "claude-code", "llm"):
        done = agents.pond.cli("admin", "harness", "from-preset", preset)
        assert done.returncode == 0, done.stderr
    listed = agents.pond.cli("admin", "harness", "list")
    assert all(k in listed.stdout for k in ("harness.codex", "harness.claude", "harness.llm"))
    body = {"agent": {"harness": "claude-code", "model": "anthropic", "prompt": "fix it", "system_prompt": "be brief"},
            "sandbox": {"profile": "untrusted-code-write"}, "tags": ["nowhere:0"]}   # stays queued
    job = agents.pond.client.post("/v1/jobs", body)
    assert job["command"] == ["claude", "-p", "fix it", "--model", "anthropic-model-1", "--append-system-prompt",
                              "be brief", "--dangerously-skip-permissions"]
    assert "harness.claude" in job["capabilities"] and job["credential"] == "anthropic"
    assert job["broker"]["key_env"] == "ANTHROPIC_API_KEY"
    assert [f["path"] for f in job["files"]] == [".claude/settings.json", ".claude.json"]
    assert json.loads(job["files"][0]["content"]) == {"model": "anthropic-model-1", "includeCoAuthoredBy": False}
    assert json.loads(job["files"][1]["content"]) == {"hasCompletedOnboarding": True}
    stored = agents.pond.client.get(f"/v1/jobs/{job['id']}")
    assert stored["broker"] == job["broker"]
    agents.pond.client.post(f"/v1/jobs/{job['id']}/cancel", {})


def test_an_agent_job_s_files_and_broker_are_in_the_sealed_spec():
    box = {"profile": "untrusted-code-write"}
    plain = sealing.job_spec(["a"], {}, box)
    files = [{"path": ".x", "content": "1"}]
    broker = {"base_url": "https://api.openai.com/v1"}
    assert sealing.job_spec(["a"], {}, box, None, None) == plain
    assert len({plain, sealing.job_spec(["a"], {}, box, files), sealing.job_spec(["a"], {}, box, files, broker),
                sealing.job_spec(["a"], {}, box, [{"path": ".x", "content": "2"}], broker),
                sealing.job_spec(["a"], {}, box, files, {"base_url": "https://evil.test/v1"})}) == 5


def test_agent_jobs_are_refused_unconfined_or_with_their_own_credential(agents):
    api = agents.pond.api
    agent = {"harness": "fake-agent", "model": "openai", "prompt": "x"}
    for body, field in [({"agent": agent, "sandbox": {"profile": "none"}}, "sandbox.profile"),
                        ({"agent": agent, "sandbox": {"profile": "untrusted-code-write"}, "credential": "openai"},
                         "credential"),
                        ({"agent": {**agent, "harness": "nope"}, "sandbox": {"profile": "untrusted-code-read"}},
                         "agent.harness"),
                        ({"agent": {**agent, "max_tokens": 0}, "sandbox": {"profile": "untrusted-code-read"}},
                         "agent.max_tokens")]:
        status, answer = api("POST", "/v1/jobs", body)
        assert status == 422 and answer["error"]["message"].startswith(field), answer
    status, answer = api("POST", "/v1/jobs", {"agent": agent, "command": ["x"], "sandbox": {"profile": "none"}})
    assert status == 400 and "one of them" in answer["error"]["message"]


def test_pond_submit_builds_an_agent_job(agents, tmp_path):
    prompt = tmp_path / "task.txt"
    prompt.write_text("from a file")
    done = agents.pond.cli("submit", "--harness", "fake-agent", "--model", "openai", "--prompt-file", str(prompt),
                           "--max-tokens", "1000", "--tag", "nowhere:0", "--json")
    assert done.returncode == 0, done.stderr
    job = json.loads(done.stdout)
    assert job["command"][-1] == "from a file" and job["agent"]["max_tokens"] == 1000
    agents.pond.client.post(f"/v1/jobs/{job['id']}/cancel", {})
    done = agents.pond.cli("submit", "--harness", "fake-agent", "--", "true")
    assert done.returncode == 2 and "--harness" in done.stderr


# -- harness capabilities -----------------------------------------------------------------------------------

def test_harness_glob_advertises_only_harnesses_the_worker_finds(pool, tmp_path):
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    fake = bin_dir / "codex"
    fake.write_text("#!/bin/sh\necho fake codex\n")
    fake.chmod(0o755)
    pond = pool.pond()
    orch = pool.orchestrator(pond)
    env = dict(os.environ, PATH=f"{bin_dir}:/usr/bin:/bin")
    state = tmp_path / "w"
    state.mkdir()
    argv = [sys.executable, str(Path(__file__).parents[1] / "swarm.py"), "worker", "--orchestrator", orch.url(),
            "--state-dir", str(state), "--capabilities", "harness.*,sandbox.process", "--claim-wait", "5",
            "--enroll-code", pond.enrollment_code()]
    proc = Proc(argv, tmp_path / "w.log", env=env)
    pool.procs.append(proc)
    worker_id = proc.ready().split()[2]
    worker = wait_for(lambda: next((w for w in pond.client.get("/v1/admin/pool/workers")["workers"]
                                    if w["id"] == worker_id and w["online"]), None), 10, what="worker online")
    caps = worker["capabilities"]
    assert "harness.codex" in caps and "harness.*" not in caps
    assert ("harness.claude" in caps) == bool(shutil.which("claude", path="/usr/local/bin:/usr/bin:/bin"))
    job = pond.submit(["true"], capabilities=["harness.mini-swe-agent"])
    assert "harness.mini-swe-agent" in pond.job(job["id"])["waiting"]["reason"]

"""The `pond` command: the only module that prints or exits.

Exit codes: 0 ok; 1 error; 2 usage; 3 pond unreachable; 4 pond refused the request;
`pond submit --wait` exits with the job's own exit code (130 if it was cancelled).
Results go to stdout, errors to stderr as `error: ...` and `hint: ...`.
"""

import argparse
import base64
import json
import os
import shlex
import sqlite3
import sys
import time
import uuid
from pathlib import Path

from pond import __version__
from pond.client import Client
from pond.errors import ConfigError, PondError
from pond.health import storage_failure
from pond.settings import (DB_FILE, DEFAULT_STATE_DIR, client_settings, env_number, env_setting, read_private,
                           server_settings)

EXIT_CANCELLED = 130
RETRY_FOR = 10.0        # s the CLI waits for a pond that is down or busy before it gives up (exit 3)
TERMINAL = ("done", "failed", "cancelled")
STATES = ("queued", "assigned", "running", *TERMINAL)      # pond.jobs.JobState

EXAMPLES = """examples:
  pond up                                        # a whole local pool; Ctrl-C stops it
  pond submit --wait -- python3 -c 'print(42)'   # run a job, print its output, exit with its code
  pond submit --tag repo:acme --capability harness.codex -- ./agent.sh
  pond submit --memory 1G --allow-host api.example.org -- ./agent.sh   # sandbox untrusted-code-write (default)
  pond submit --profile none -- make test        # your own code, unconfined (a warning)
  pond jobs; pond job ID; pond logs ID --follow; pond cancel ID
  pond serve --bind 127.0.0.1:8001 --state-dir ./pond-state
  pond admin pairing-code; pond admin enrollment-code --uses 5; pond admin workers
"""


def _client(args):
    token = read_private(args.token_file) if args.token_file else None
    s = client_settings(args.pond, args.state_dir, token, os.environ, ca_file=args.ca_file)
    retry_for = args.retry_for if args.retry_for is not None else env_number(os.environ, "POND_RETRY_FOR", float,
                                                                             RETRY_FOR)
    return Client(s.url, s.token, s.timeout, s.ca_file, retry_for=retry_for)


def _print_json(data):
    print(json.dumps(data, indent=2, sort_keys=True))


def _safe(text):
    """Text from a job or a worker made safe for one terminal line: a newline, a tab or a terminal
    escape shows as its backslash escape (\\n, \\x1b), never raw."""
    text = str(text)
    return text if text.isprintable() else "".join(
        c if c.isprintable() else c.encode("unicode_escape").decode() for c in text)


def _shown(argv):
    """A job's command as a shell would read it: `sh -c 'a; b'`; an argument with a newline or a
    control character in bash's $'...' quoting, so it stays on one line and copies back exactly."""
    def quote(arg):
        if arg.isprintable():
            return shlex.quote(arg)
        return "$'" + _safe(arg.replace("\\", "\\\\").replace("'", "\\'")) + "'"
    return " ".join(quote(a) for a in argv)


def _yes(value):
    return None if value is None else "yes" if value else "no"


def _table(rows, columns):
    """An aligned text table; columns are (title, key-or-function)."""
    def cell(row, key):
        value = key(row) if callable(key) else row.get(key)
        return "-" if value is None else _safe(value)

    cells = [[title for title, _ in columns]] + [[cell(r, key) for _, key in columns] for r in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(columns))]
    for r in cells:
        print("  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip())


def _ago(ts):
    if not ts:
        return None
    s = max(0, time.time() - ts)
    return f"{s:.0f}s ago" if s < 120 else f"{s / 60:.0f}m ago" if s < 7200 else f"{s / 3600:.0f}h ago"


# -- commands -------------------------------------------------------------------

def cmd_serve(args):
    from pond.server import serve
    settings = server_settings(args.bind, args.state_dir, os.environ, args.admin_token_file,
                               args.poll_hold, args.access_log, args.request_timeout,
                               args.tls_cert, args.tls_key, args.insecure_no_tls,
                               args.credential_key_file, args.allow_unsigned_results, args.lease,
                               args.max_attempts, args.log_cap, args.require_sandbox,
                               head_timeout=args.head_timeout, max_pending=args.max_pending,
                               max_pending_per_address=args.max_pending_per_address, database=args.database,
                               log_format=args.log_format, bundle_retention=args.bundle_retention,
                               artifact_retention=args.artifact_retention, database_pool=args.database_pool,
                               assign_ahead=args.assign_ahead)
    return serve(settings)


def cmd_up(args):
    from pond.up import up
    state = args.state_dir or env_setting(os.environ, "POND_STATE_DIR", DEFAULT_STATE_DIR)
    log_format = args.log_format or os.environ.get("POND_LOG_FORMAT") or "text"
    if log_format not in ("text", "json"):
        raise ConfigError(f"log format {log_format!r} is not text or json", "give --log-format text|json")
    return up(state, args.bind, args.tags, args.capabilities, args.concurrency, log_format=log_format)


def cmd_submit(args):
    client = _client(args)
    if args.batch is not None:
        return _submit_batch(client, args)
    agent = _agent_arg(args)
    if not args.command and agent is None:
        raise PondError("no command to run", "example: pond submit --wait -- python3 -c 'print(42)'; or an agent: "
                        "pond submit --harness codex --model gpt --prompt 'fix the tests'", code="usage")
    if args.command and agent is not None:
        raise PondError("an agent job runs its harness: give --harness with no command after --",
                        "drop the command, or drop --harness/--model/--prompt", code="usage")
    body = {"tags": args.tag, "capabilities": args.capability, "env": dict(_env_pair(e) for e in args.env),
            **({"agent": agent} if agent is not None else {"command": args.command})}
    # A flag given is sent as given, 0 and "" too: pond refuses what it cannot take, never a default instead.
    body.update(_given(args, "timeout", "name", "tenant", "credential", "cancel_grace", "retries"))
    body["sandbox"] = _sandbox_arg(args)
    if args.artifact:
        body["artifacts"] = args.artifact
    if args.source is not None:
        body["source"] = _upload_source(client, args.source)
    # Always a key: a submit retried after a lost answer then gives back the same job, never two.
    key = f"pond-cli-{uuid.uuid4().hex}" if args.idempotency_key is None else args.idempotency_key
    if args.explain:
        return _print_explain(client.post("/v1/jobs/explain", body), args.json)
    job = client.post("/v1/jobs", body, headers={"Idempotency-Key": key})
    _say_warnings(job)
    if not args.wait:
        _print_json(job) if args.json else print(job["id"])
        return 0
    print(f"submitted {job['id']}", file=sys.stderr)
    return _follow(client, job["id"], announce_wait=True)


def _upload_source(client, directory):
    """Pack DIR (git-tracked files of a work tree, else all but .git), encrypt it with a fresh key, upload it."""
    import tempfile
    from pond import bundles
    if not Path(directory).is_dir():
        raise PondError(f"--source {directory}: not a directory", "give the checkout the job works on", code="usage")
    with tempfile.TemporaryDirectory(prefix="pond-bundle-") as tmp:
        packed = bundles.pack_and_encrypt(directory, Path(tmp) / "bundle")
        bundle_id = bundles.upload(client, Path(tmp) / "bundle", packed["key"], packed["sha256"], packed["size"])
    print(f"source: {packed['files']} files, {_size(packed['size'])} bytes encrypted, sha256 {packed['sha256']}",
          file=sys.stderr)
    return {"bundle": bundle_id}


def cmd_artifacts(args):
    """List a job's artifacts; --get NAME downloads one (its signed sha256 checked); --apply applies changes.patch."""
    client = _client(args)
    listing = client.get(f"/v1/jobs/{args.id}/artifacts")
    items = {a["name"]: a for a in listing["artifacts"]}
    name = "changes.patch" if args.apply else args.get
    if name is None:
        if args.json:
            return _print_json(listing)
        _table(listing["artifacts"], (("NAME", "name"), ("SIZE", "size"), ("SHA256", "sha256")))
        return 0
    if name not in items:
        raise PondError(f"job {args.id} has no artifact {name!r}",
                        "list them with `pond artifacts ID`" if items else "its result recorded no artifacts",
                        code="not_found")
    data = _download(client, args.id, items[name])
    if not args.apply:
        if args.output in (None, "-"):
            sys.stdout.buffer.write(data)
        else:
            Path(args.output).write_bytes(data)
        return 0
    return _apply(data, Path(args.dir))


def _download(client, job_id, item):
    import hashlib
    from urllib.parse import quote
    parts, got = [], 0
    while True:
        piece = client.get(f"/v1/jobs/{job_id}/artifacts/{quote(item['name'])}", offset=str(got))
        parts.append(base64.b64decode(piece["data"]))
        got += len(parts[-1])
        if got >= item["size"] or not parts[-1]:
            break
    data = b"".join(parts)
    if hashlib.sha256(data).hexdigest() != item["sha256"]:
        raise PondError(f"artifact {item['name']} does not match the sha256 its worker signed",
                        "download it again; if it persists, run `pond verify ID` on pond's host",
                        code="artifact_mismatch")
    return data


def _apply(patch, directory):
    """git apply changes.patch in DIR, only if all of it applies cleanly."""
    import subprocess
    for check in (True, False):
        done = subprocess.run(["git", "-C", str(directory), "apply", "--binary", "--whitespace=nowarn",
                               *(["--check"] if check else []), "-"], input=patch, capture_output=True, timeout=120)
        if done.returncode != 0:
            raise PondError(f"changes.patch does not apply cleanly in {directory}: "
                            f"{done.stderr.decode(errors='replace').strip()[:300]}",
                            "apply it to the checkout it was packed from, at the same commit; or save it with "
                            "--get changes.patch -o FILE", code="patch_refused")
    print(f"applied changes.patch in {directory}", file=sys.stderr)
    return 0


def _submit_batch(client, args):
    """--batch FILE: one job object per line (the body of POST /v1/jobs), sent in batches of
    up to 1,000 (each all or nothing, idempotent under its own key); prints the ids in order."""
    per_job = [flag for flag, value in (("--tag", args.tag), ("--capability", args.capability), ("--env", args.env),
                                        ("--timeout", args.timeout), ("--name", args.name), ("--tenant", args.tenant),
                                        ("--sandbox", args.sandbox), ("--credential", args.credential),
                                        ("--cancel-grace", args.cancel_grace), ("--retries", args.retries),
                                        ("--wait", args.wait or None), ("--explain", args.explain or None),
                                        ("a command", args.command or None))
               if value not in (None, [])]
    per_job += [flag for attr, flag in SANDBOX_FLAGS + AGENT_FLAGS if getattr(args, attr) not in (None, [])]
    if per_job:
        raise PondError(f"--batch takes each job whole from its file; {per_job[0]} would be ignored",
                        "put the field in each job's JSON line instead", code="usage")
    try:
        with (sys.stdin if args.batch == "-" else open(args.batch, encoding="utf-8")) as f:
            lines = [(n, line) for n, line in enumerate(f, 1) if line.strip()]
    except OSError as e:
        raise PondError(f"cannot read {args.batch}: {e.strerror}", "give a file of JSON lines, or - for stdin",
                        code="usage") from None
    jobs = []
    for n, line in lines:
        try:
            jobs.append(json.loads(line))
        except ValueError as e:
            raise PondError(f"{args.batch}, line {n}: not JSON ({e})", "one job object per line", code="usage") from None
    if not jobs:
        raise PondError(f"{args.batch} has no jobs", "one job object per line", code="usage")
    key = f"pond-cli-{uuid.uuid4().hex}" if args.idempotency_key is None else args.idempotency_key
    warned = {}
    for start in range(0, len(jobs), SUBMIT_BATCH):
        answer = client.post("/v1/jobs", jobs[start:start + SUBMIT_BATCH], headers={"Idempotency-Key": f"{key}.{start}"})
        for job in answer["jobs"]:
            for warning in job.get("warnings") or []:
                warned.setdefault(warning["code"], [0, warning])[0] += 1
            _print_json(job) if args.json else print(job["id"])
    for count, warning in warned.values():        # once each, not once a job
        print(f"warning: {count} job(s): {warning['message']}", file=sys.stderr)
        if warning.get("hint"):
            print(f"hint: {warning['hint']}", file=sys.stderr)
    return 0


SUBMIT_BATCH = 1000
SANDBOX_FLAGS = (("profile", "--profile"), ("tier", "--tier"), ("backend", "--backend"),
                 ("allow_host", "--allow-host"), ("memory", "--memory"), ("cpus", "--cpus"), ("pids", "--pids"),
                 ("tmpfs", "--tmpfs"))
DEFAULT_PROFILE = "untrusted-code-write"


AGENT_FLAGS = (("harness", "--harness"), ("model", "--model"), ("prompt", "--prompt"), ("prompt_file", "--prompt-file"),
               ("system_prompt", "--system-prompt"), ("max_tokens", "--max-tokens"), ("max_cost", "--max-cost"),
               ("temperature", "--temperature"))


def _agent_arg(args):
    """The job's agent block from --harness, --model, --prompt/--prompt-file and the rest, or None."""
    given = [flag for attr, flag in AGENT_FLAGS if getattr(args, attr) is not None]
    if not given:
        return None
    if args.harness is None or args.model is None or (args.prompt is None) == (args.prompt_file is None):
        raise PondError(f"{given[0]} makes an agent job, which needs --harness, --model and one of --prompt, "
                        "--prompt-file", "example: pond submit --harness codex --model gpt --prompt 'fix the tests'",
                        code="usage")
    prompt = args.prompt
    if args.prompt_file is not None:
        try:
            with (sys.stdin if args.prompt_file == "-" else open(args.prompt_file, encoding="utf-8")) as f:
                prompt = f.read()
        except OSError as e:
            raise PondError(f"cannot read {args.prompt_file}: {e.strerror}", "give a text file, or - for stdin",
                            code="usage") from None
    return {"harness": args.harness, "model": args.model, "prompt": prompt,
            **_given(args, "system_prompt", "max_tokens", "max_cost", "temperature")}


def _given(args, *names):
    """The flags among `names` that were given: {name: value}, whatever the value."""
    return {name: getattr(args, name) for name in names if getattr(args, name) is not None}


def _sandbox_arg(args):
    """The job's sandbox block: --sandbox JSON as given, else one built from the sandbox flags."""
    given = [flag for attr, flag in SANDBOX_FLAGS if getattr(args, attr) not in (None, [])]
    if args.sandbox is not None:
        if given:
            raise PondError(f"--sandbox and {given[0]} both say what the sandbox is",
                            "give --sandbox JSON alone, or the flags (--profile, --memory, ...) without it",
                            code="usage")
        return _json_arg(args.sandbox, "--sandbox")
    block = {"profile": args.profile or DEFAULT_PROFILE, **_given(args, "tier", "backend")}
    overrides = {key: value for key, value in (("memory", args.memory), ("cpus", args.cpus), ("pids", args.pids),
                                               ("tmpfs_size", args.tmpfs)) if value is not None}
    if overrides:
        block["overrides"] = overrides
    if args.allow_host:
        block["allow_hosts"] = args.allow_host
    return block


def _say_warnings(job):
    for warning in job.get("warnings") or []:
        print(f"warning: {warning['message']}", file=sys.stderr)
        if warning.get("hint"):
            print(f"hint: {warning['hint']}", file=sys.stderr)


def _env_pair(text):
    name, sep, value = text.partition("=")
    if not sep:
        raise PondError(f"--env {text!r} is not NAME=VALUE", "example: --env MODE=fast", code="usage")
    return name, value


def _json_arg(text, flag):
    try:
        return json.loads(text)
    except ValueError:
        raise PondError(f"{flag} is not valid JSON", f"""example: {flag} '{{"profile": "none"}}'""",
                        code="usage") from None


def _follow(client, job_id, announce_wait=False):
    """Stream a job's output until it ends; return its exit status for the shell. With
    `announce_wait`, a job still queued after the first second says why it waits, once."""
    after, attempt, said_waiting, hold = 0, None, not announce_wait, 1
    while True:
        page = client.get(f"/v1/jobs/{job_id}/logs", after=after, wait=hold)
        hold = FOLLOW_HOLD
        attempt = _write_chunks(page["chunks"], attempt)
        after = page["next"]
        if not said_waiting and page["state"] == "queued" and not page["chunks"]:
            waiting = client.get(f"/v1/jobs/{job_id}").get("waiting")
            if waiting:
                print(f"waiting: {waiting['reason']}", file=sys.stderr, flush=True)
                said_waiting = True
        if page["complete"]:
            job = client.get(f"/v1/jobs/{job_id}")
            _say_dropped(job)
            return _exit_status(job)


FOLLOW_HOLD = 20        # s a follower's logs request is held when there is no new output


def _write_chunks(chunks, attempt):
    """Write output chunks to stdout and stderr; a line on stderr marks where a new attempt's output
    begins (a requeued or retried job runs again, and its earlier output stays). -> the last attempt."""
    for chunk in chunks:
        if chunk["attempt"] != attempt and (attempt is not None or chunk["attempt"] > 1):
            sys.stdout.flush()
            print(f"[pond: attempt {chunk['attempt']} begins]", file=sys.stderr, flush=True)
        attempt = chunk["attempt"]
        stream = sys.stdout if chunk["stream"] == "stdout" else sys.stderr
        stream.buffer.write(base64.b64decode(chunk["data"]))
        stream.flush()
    return attempt


def _exit_status(job):
    if job["state"] == "done":
        return 0
    if job["state"] == "cancelled":
        print(f"job {job['id']} was cancelled", file=sys.stderr)
        return EXIT_CANCELLED
    if job.get("error"):
        print(f"job {job['id']} failed: {job['error']}", file=sys.stderr)
    code = job.get("exit_code")
    return code if isinstance(code, int) and 0 < code < 256 else 1


def cmd_jobs(args):
    data = _client(args).get("/v1/jobs", state=args.state, tag=args.tag, worker=args.worker, limit=args.limit)
    if args.json:
        return _print_json(data)
    _table(data["jobs"], [("ID", "id"), ("STATE", "state"), ("EXIT", "exit_code"), ("WORKER", "worker"),
                          ("CREATED", lambda j: _ago(j["created_at"])), ("COMMAND", lambda j: _shown(j["command"])[:60])])


def cmd_job(args):
    client = _client(args)
    if args.explain:
        return _print_explain(client.get(f"/v1/jobs/{args.id}/explain"), args.json)
    job = client.get(f"/v1/jobs/{args.id}")
    if args.json:
        return _print_json(job)
    line = lambda key, value: print(f"{key + ':':14}{_safe(value)}")
    for key in ("id", "name", "state", "exit_code", "error", "worker", "orchestrator", "attempt", "credential"):
        if job.get(key) not in (None, ""):
            line(key, job[key])
    if job.get("attested") is not None:
        line("attested", _yes(job["attested"]))
    if any((job.get("dropped") or {}).values()):
        line("dropped", ", ".join(f"{stream} {n} bytes" for stream, n in job["dropped"].items() if n)
             + " past the log cap (between head and tail)")
    for key, value in _times(job):
        line(key, value)
    line("command", _shown(job["command"]))
    line("needs", f"tags {', '.join(job['tags']) or '-'}; capabilities {', '.join(job['capabilities']) or '-'}"
         + (f" (group {job['group']})" if job.get("group") else ""))     # its name on /metrics
    line("sandbox", _sandbox_line(job["sandbox"]))
    if job.get("agent"):
        u, agent = job["usage"], job["agent"]
        line("agent", f"harness {agent['harness']}, model {agent['model']} ({job['broker']['model']})"
             + (f"; budget {agent['max_tokens']} tokens" if agent.get("max_tokens") else "")
             + (f", {agent['max_cost']} cost" if agent.get("max_cost") else ""))
        line("usage", f"{u['input_tokens']} tokens in, {u['output_tokens']} out, {len(u['calls'])} calls"
             + (f" ({u['refused']} refused)" if u["refused"] else "") + f"; cost {u['cost']:.6f}"
             + ("" if u["attested"] else " (no signed result yet)"))
    for warning in job.get("warnings") or []:
        line("warning", warning["message"])
    if job.get("waiting"):
        line("waiting", job["waiting"]["reason"])
    for event in job.get("events", []):
        detail = event.get("message") or " ".join(f"{k}={v}" for k, v in event.items()
                                                  if k not in ("at", "event", "job"))
        line("event", f"{time.strftime('%H:%M:%S', time.localtime(event['at']))} {event['event']} {detail}")


def _print_explain(data, as_json):
    """GET /v1/jobs/{id}/explain or POST /v1/jobs/explain, for a person: why it waits, then each pool."""
    if as_json:
        return _print_json(data)
    what = f"job {data['job']} ({data['state']})" if data["job"] else "this job"
    print(_safe(f"{what} needs tags {', '.join(data['tags']) or '-'}; capabilities "
                f"{', '.join(data['capabilities']) or '-'}" + (f"; credential {data['credential']}"
                                                               if data["credential"] else "")))
    if data["waiting"]:
        print(_safe(f"waiting: {data['waiting']['reason']}"))
    if not data["pools"]:
        print("no orchestrator has paired: mint a code with `pond admin pairing-code`")
        return
    _table(data["pools"], [("ORCHESTRATOR", "orchestrator"), ("NAME", "name"), ("WORKERS", "workers"),
                           ("ONLINE", "online"), ("MATCHING", "matching"), ("FREE", "free"),
                           ("EVICTED", "evicted"), ("VERDICT", "verdict"), ("REASON", "reason")])


def _when(ts):
    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(ts))


def _seconds(s):
    return f"{s:.1f} s" if s < 120 else f"{s / 60:.1f} min" if s < 7200 else f"{s / 3600:.1f} h"


def _times(job):
    """created, started, finished (local time) and how long it queued and ran, for `pond job`."""
    created, started, finished = job["created_at"], job.get("started_at"), job.get("finished_at")
    out = [("created", _when(created))]
    if started:
        out.append(("started", f"{_when(started)} (queued {_seconds(max(0, started - created))})"))
    if finished:
        out.append(("finished", _when(finished)))
    if started:
        ran = (finished or time.time()) - started
        out.append(("duration", _seconds(max(0, ran)) + ("" if finished else " so far")))
    elif finished:
        out.append(("duration", f"never ran (ended {_seconds(max(0, finished - created))} after it was created)"))
    return out


def _sandbox_line(block):
    """profile, tier, backend; limits; allow_hosts: one line for `pond job`."""
    limits = block.get("limits") or {}
    shown = []
    for key, name in (("memory", "memory"), ("cpus", "cpus"), ("pids", "pids"), ("tmpfs_size", "tmpfs"),
                      ("timeout", "timeout")):
        if key in limits:
            value = limits[key]
            shown.append(f"{name} {_size(value) if key in ('memory', 'tmpfs_size') else value}"
                         + (" s" if key == "timeout" else ""))
    line = f"{block.get('profile')}, tier {block.get('tier')}, backend {block.get('backend') or '-'}"
    if shown:
        line += "; " + ", ".join(shown)
    if block.get("allow_hosts"):
        line += "; allow_hosts " + ", ".join(block["allow_hosts"])
    return line


def _size(n):
    for suffix, unit in (("G", 1024 ** 3), ("M", 1024 ** 2), ("K", 1024)):
        if isinstance(n, int) and n and n % unit == 0:
            return f"{n // unit}{suffix}"
    return str(n)


def cmd_verify(args):
    """Re-check a job's attestation and stored output with the pinned key, from the state dir: no server."""
    from pond.attestation import verify_job
    from pond.settings import database_url
    from pond.store import Store
    state = Path(args.state_dir or env_setting(os.environ, "POND_STATE_DIR", DEFAULT_STATE_DIR))
    database = database_url(args.database, os.environ)
    if not database and not (state / DB_FILE).exists():
        raise PondError(f"no {DB_FILE} in {state}", "pass --state-dir DIR, pond's state dir (or --database URL)",
                        code="usage")
    try:
        if database:
            from pond.store_pg import PgStore
            store = PgStore(database, readonly=True)
        else:
            store = Store(state / DB_FILE, readonly=True)
    except RuntimeError as e:
        raise PondError(str(e), "run the pond release that wrote it", code="config") from None
    try:
        job, worker, statement = verify_job(store, args.id, state)
    except PondError as e:
        if e.code == "attestation_failed":
            e.message = f"job {args.id} does not verify: {e.detail}"
            e.hint = "the stored result is not what the worker signed; `pond job ID` shows the job's events"
        raise
    finally:
        store.close()
    predicate = statement["predicate"]
    subjects = {s["name"]: s["digest"]["sha256"] for s in statement["subject"]}
    if args.json:
        return _print_json({"verified": True, "job": job["id"], "attempt": job["attempt"], "worker": worker["id"],
                            "fingerprint": worker["fingerprint"], "state": predicate["state"],
                            "exit_code": predicate["exit_code"], "sha256": subjects})
    print(f"verified: job {job['id']} attempt {job['attempt']}: {predicate['state']}, exit code "
          f"{predicate['exit_code']}")
    print(f"{'worker:':10}{worker['id']} fingerprint {worker['fingerprint']}")
    for name, digest in subjects.items():
        print(f"{name + ':':10}sha256 {digest}")


def cmd_migrate_store(args):
    """Copy a stopped pond's SQLite store (DIR/pond.db) into an empty PostgreSQL database."""
    from pond.settings import database_url
    from pond.store import Store
    from pond.store_pg import PgStore, redact
    kind, sep, where = args.source.partition(":")
    if kind != "sqlite" or not sep or not where:
        raise PondError(f"--from {args.source[:100]!r} is not sqlite:DIR", "example: --from sqlite:./pond-state",
                        code="usage")
    state = Path(where)
    if not (state / DB_FILE).exists():
        raise PondError(f"no {DB_FILE} in {state}", "give pond's state dir: --from sqlite:DIR", code="usage")
    endpoint = state / "endpoint.json"
    try:
        pid = json.loads(endpoint.read_text())["pid"]
        os.kill(pid, 0)
        raise PondError(f"pond (pid {pid}) still runs on {state}", "stop it first: what it wrote meanwhile would be "
                        "lost", code="usage")
    except (OSError, ValueError, KeyError, TypeError):
        pass                # no endpoint file, or its pond is gone
    url = database_url(args.target, os.environ, "--to")
    if not url:
        raise PondError("no --to URL and no POND_DATABASE_URL", "example: --to postgresql://pond@db:5432/pond",
                        code="usage")
    source = Store(state / DB_FILE, readonly=True)
    target = PgStore(url)
    try:
        copied = target.copy_from(source, state / "blobs")
    except ValueError as e:
        raise PondError(str(e), "give an empty database; nothing was copied", code="usage") from None
    finally:
        target.close()
        source.close()
    print(f"copied {state / DB_FILE} to {redact(url)}: "
          + ", ".join(f"{n} {table}" for table, n in copied.items()))
    print(f"start pond with --database and the same state dir ({state}): it holds the admin token and the "
          "credential key")


def cmd_logs(args):
    client = _client(args)
    if args.follow:
        _follow(client, args.id)
        return 0
    after, attempt = 0, None
    while True:
        page = client.get(f"/v1/jobs/{args.id}/logs", after=after)
        attempt = _write_chunks(page["chunks"], attempt)
        if not page["chunks"]:
            break
        after = page["next"]
    _say_dropped(client.get(f"/v1/jobs/{args.id}"))


def _say_dropped(job):
    for stream, n in (job.get("dropped") or {}).items():
        if n:
            print(f"[{stream}: {n} bytes past the log cap were dropped between its head and its tail]",
                  file=sys.stderr)


def cmd_cancel(args):
    """Exit 1 for a job that had finished before: a cancel ends no job that is done or failed."""
    job = _client(args).post(f"/v1/jobs/{args.id}/cancel")
    if args.json:
        _print_json(job)
    if job["state"] in ("done", "failed"):
        raise PondError(f"job {job['id']} had already finished ({job['state']}, exit code {job['exit_code']}); "
                        "nothing to cancel", "`pond job ID` shows how it ended")
    if not args.json:
        print(f"{job['id']} {job['state']}" + (" (cancel requested)" if job["cancel_requested"] else ""))


def cmd_pairing_code(args):
    body = _given(args, "ttl", "name")
    if args.scope is not None:
        body["scope"] = _tag_list(args.scope)
    client = _client(args)
    data = client.post("/v1/admin/pool/pairing-codes", body)
    if args.json:
        return _print_json(data)
    print(data["code"])
    ca = " --ca-file CA.pem" if client.url.startswith("https://") else ""
    print(f"one-time, expires in {data['ttl']} s; on the orchestrator host run:\n"
          f"  python swarm.py pair --pond {','.join(client.urls)}{ca} --code {data['code']}", file=sys.stderr)


def cmd_enrollment_code(args):
    body = _given(args, "ttl", "uses", "fingerprint")
    if args.tags is not None:
        body["tags"] = _tag_list(args.tags)
    data = _client(args).post("/v1/admin/pool/enrollment-codes", body)
    if args.json:
        return _print_json(data)
    print(data["code"])
    limits = "".join([f"; only for fingerprint {data['fingerprint']}" if data.get("fingerprint") else "",
                      f"; tags within {','.join(data['tags'])}" if data.get("tags") else ""])
    print(f"enrolls up to {data['uses']} worker(s), expires in {data['ttl']} s{limits}; on a worker host run:\n"
          f"  python swarm.py worker --orchestrator URL --enroll-code {data['code']} --tags ... --capabilities ...",
          file=sys.stderr)


def _tag_list(text):
    return [t.strip() for t in text.split(",") if t.strip()]


def cmd_credential_set(args):
    """Secrets come from the environment or a file, never from the command line (ps shows it)."""
    body = {"name": args.name, "env": dict(_env_pair(e) for e in args.env), "secrets": _secrets(args)}
    body.update(_given(args, "provider"))
    data = _client(args).post("/v1/admin/credentials", body)
    if args.json:
        return _print_json(data)
    print(f"credential {data['name']}: secrets {', '.join(data['secrets'])}; env {', '.join(data['env']) or '-'}")


def _secrets(args):
    out = {}
    for name in args.secret:
        if "=" in name:
            raise PondError(f"--secret {name.partition('=')[0]}=... puts the secret on the command line, where "
                            "`ps` and shell history show it", f"export {name.partition('=')[0]} and pass "
                            f"--secret {name.partition('=')[0]}, or use --secrets-file FILE", code="usage")
        if name not in os.environ:
            raise PondError(f"--secret {name}: ${name} is not set", f"export {name}=... first, or use "
                            "--secrets-file FILE", code="usage")
        out[name] = os.environ[name]
    if args.secrets_file:
        out.update(_secrets_file(args.secrets_file))
    if not out:
        raise PondError("no secrets given", "pass --secret NAME (value from $NAME) or --secrets-file FILE",
                        code="usage")
    return out


def _secrets_file(path):
    """NAME=VALUE lines (blank lines and # comments skipped), from a file only its owner can read."""
    out = {}
    for number, line in enumerate(read_private(path).splitlines(), 1):
        if line.strip() and not line.lstrip().startswith("#"):
            name, sep, value = line.partition("=")
            if not sep:
                raise PondError(f"{path} line {number} is not NAME=VALUE", "one secret per line: NAME=VALUE",
                                code="usage")
            out[name.strip()] = value
    return out


def cmd_credential_list(args):
    data = _client(args).get("/v1/admin/credentials")
    if args.json:
        return _print_json(data)
    _table(data["credentials"], [("NAME", "name"), ("PROVIDER", "provider"),
                                 ("SECRETS", lambda c: ",".join(c["secrets"])),
                                 ("ENV", lambda c: ",".join(c["env"]) or None),
                                 ("UPDATED", lambda c: _ago(c["updated_at"]))])


def cmd_credential_delete(args):
    data = _client(args).delete(f"/v1/admin/credentials/{args.name}")
    if args.json:
        return _print_json(data)
    print(f"credential {data['name']} deleted")


def cmd_registry_create(args):
    """pond admin harness|model create: the entry from flags, or whole from --from FILE (JSON)."""
    kind = args.registry_kind
    if args.from_file is not None:
        try:
            with (sys.stdin if args.from_file == "-" else open(args.from_file, encoding="utf-8")) as f:
                body = json.load(f)
        except (OSError, ValueError) as e:
            raise PondError(f"cannot read {args.from_file} as JSON: {e}", f"give the {kind} as one JSON object",
                            code="usage") from None
    elif kind == "harness":
        body = {"key": args.key, "capability": args.capability, "label": args.label,
                "command_template": _json_arg(args.command_template, "--command-template") if args.command_template
                else None, "env": dict(_env_pair(e) for e in args.env), "files": [_file_arg(f) for f in args.file],
                "secret_files": args.secret_file}
    else:
        body = {"key": args.key, "label": args.label, "provider": args.provider, "model_id": args.model_id,
                "credential": args.credential, "base_url": args.base_url,
                "input_cost_per_mtok": args.input_cost, "output_cost_per_mtok": args.output_cost}
    return _registry_post(args, kind, {k: v for k, v in body.items() if v not in (None, [], {})})


def cmd_harness_preset(args):
    from pond.agents import PRESETS
    if args.preset not in PRESETS:
        raise PondError(f"no preset {args.preset!r}", "presets: " + ", ".join(sorted(PRESETS)), code="usage")
    body = dict(PRESETS[args.preset], **({"key": args.key} if args.key else {}))
    return _registry_post(args, "harness", body)


def _registry_post(args, kind, body):
    data = _client(args).post(f"/v1/admin/{'harnesses' if kind == 'harness' else 'models'}", body)
    if args.json:
        return _print_json(data)
    print(f"{kind} {data['key']}: " + (f"{data['capability']}, runs {' '.join(data['command_template'])}"
                                       if kind == "harness" else
                                       f"{data['provider']} {data['model_id']} at {data['base_url']}, "
                                       f"credential {data['credential']}"))


def _file_arg(text):
    path, sep, local = text.partition("=")
    if not sep:
        raise PondError(f"--file {text!r} is not PATH=LOCAL_FILE", "example: --file .codex/config.toml=./config.toml",
                        code="usage")
    try:
        return {"path": path, "content": Path(local).read_text(encoding="utf-8")}
    except OSError as e:
        raise PondError(f"cannot read {local}: {e.strerror}", "give a readable text file", code="usage") from None


def cmd_registry_list(args):
    plural = "harnesses" if args.registry_kind == "harness" else "models"
    data = _client(args).get(f"/v1/admin/{plural}")
    if args.json:
        return _print_json(data)
    if args.registry_kind == "harness":
        _table(data[plural], [("KEY", "key"), ("CAPABILITY", "capability"), ("LABEL", "label"),
                              ("COMMAND", lambda h: " ".join(h["command_template"])[:60])])
    else:
        _table(data[plural], [("KEY", "key"), ("PROVIDER", "provider"), ("MODEL", "model_id"),
                              ("CREDENTIAL", "credential"), ("BASE URL", "base_url"),
                              ("IN/MTOK", "input_cost_per_mtok"), ("OUT/MTOK", "output_cost_per_mtok")])


def cmd_registry_show(args):
    plural = "harnesses" if args.registry_kind == "harness" else "models"
    _print_json(_client(args).get(f"/v1/admin/{plural}/{args.key}"))


def cmd_registry_delete(args):
    plural = "harnesses" if args.registry_kind == "harness" else "models"
    data = _client(args).delete(f"/v1/admin/{plural}/{args.key}")
    if args.json:
        return _print_json(data)
    print(f"{args.registry_kind} {data['key']} deleted")


def cmd_usage(args):
    """Tokens and cost of agent jobs, per model, harness or tenant (GET /v1/usage)."""
    now = time.time()
    query = {"by": args.by, "since": now - args.days * 86400 if args.days is not None else None}
    data = _client(args).get("/v1/usage", **{k: v for k, v in query.items() if v is not None})
    if args.json:
        return _print_json(data)
    _table(data["usage"], [(args.by.upper(), args.by), ("JOBS", "jobs"), ("CALLS", "calls"),
                           ("TOKENS IN", "input_tokens"), ("TOKENS OUT", "output_tokens"), ("REFUSED", "refused"),
                           ("COST", lambda g: f"{g['cost']:.6f}")])


def cmd_revoke(args):
    kind = {"orchestrator": "orchestrators", "worker": "workers"}[args.kind]
    data = _client(args).delete(f"/v1/admin/pool/{kind}/{args.id}")
    if args.json:
        return _print_json(data)
    print(f"revoked {args.kind} {args.id}")


def cmd_evict(args):
    data = _client(args).post(f"/v1/admin/pool/workers/{args.id}/evict", {"drain": args.drain})
    if args.json:
        return _print_json(data)
    print(f"evicted worker {args.id}: " + ("its running jobs finish first" if args.drain else
                                          f"{data['requeued']} job(s) queued again"))


def cmd_orchestrators(args):
    data = _client(args).get("/v1/admin/pool/orchestrators")
    if args.json:
        return _print_json(data)
    _table(data["orchestrators"], [("ID", "id"), ("NAME", "name"), ("SCOPE", lambda o: ",".join(o["scope"]) or "-"),
                                   ("REVOKED", lambda o: "yes" if o["revoked_at"] else "no"), ("WORKERS", "workers"),
                                   ("ONLINE", "workers_online"), ("LAST SEEN", lambda o: _ago(o["last_seen"]))])


def cmd_workers(args):
    data = _client(args).get("/v1/admin/pool/workers")
    if args.json:
        return _print_json(data)
    _table(data["workers"], [("ID", "id"), ("ORCHESTRATOR", "orchestrator"), ("ONLINE", lambda w: _yes(w["online"])),
                             ("FINGERPRINT", lambda w: (w["fingerprint"] or "unpinned")[:16]),
                             ("REVOKED", lambda w: "yes" if w["revoked"] else "no"),
                             ("EVICTED", lambda w: ("draining" if w["drain"] else "yes") if w["evicted"] else "no"),
                             ("LAST EVENT", lambda w: w["last_event"] or "-"),
                             ("SLOTS", "slots"), ("FREE", "free"), ("TAGS", lambda w: ",".join(w["tags"])),
                             ("CAPABILITIES", lambda w: ",".join(w["capabilities"])),
                             ("LAST SEEN", lambda w: _ago(w["last_seen"]))])


# -- parser ---------------------------------------------------------------------

def _named(text):
    """The argparse type of a flag that names something (a file, a URL, a code, tags): an empty value
    is refused, never read as "not given", which would fall back to a default or drop a restriction
    (`--tags ''` would have minted a code without a tag ceiling)."""
    if not text.strip():
        raise argparse.ArgumentTypeError("is empty: give a value, or leave the flag out")
    return text


def _common(suppress):
    """Options every command takes, before or after its name (`pond --state-dir D jobs` = `pond jobs --state-dir D`)."""
    c = argparse.ArgumentParser(add_help=False)
    default = argparse.SUPPRESS if suppress else None
    c.add_argument("--pond", type=_named, metavar="URL", default=default,
                   help="pond's URL; replicas: a comma-separated list, tried in turn "
                        "(default: from --state-dir, or $POND_URL)")
    c.add_argument("--state-dir", type=_named, metavar="DIR", default=default,
                   help=f"pond's state dir, to find its URL and admin token (default: $POND_STATE_DIR or {DEFAULT_STATE_DIR})")
    c.add_argument("--token-file", type=_named, metavar="FILE", default=default,
                   help="file holding the admin token (default: DIR/admin-token)")
    c.add_argument("--ca-file", type=_named, metavar="FILE", default=default,
                   help="CA certificate (PEM) to verify an https:// pond with (default: $POND_CA_FILE, "
                        "else the system trust store)")
    c.add_argument("--retry-for", type=float, metavar="S", default=default,
                   help=f"seconds to wait for a pond that is down or busy (default: $POND_RETRY_FOR or {RETRY_FOR:g})")
    c.add_argument("--json", action="store_true", default=argparse.SUPPRESS if suppress else False,
                   help="print JSON instead of a table")
    return c


def build_parser():
    common = _common(suppress=True)
    p = argparse.ArgumentParser(prog="pond", description="pond: control plane of a pull-based worker pool",
                                epilog=EXAMPLES, formatter_class=argparse.RawDescriptionHelpFormatter,
                                parents=[_common(suppress=False)])
    p.add_argument("--version", action="version", version=f"pond {__version__}")
    sub = p.add_subparsers(dest="cmd", metavar="COMMAND", required=True)

    s = sub.add_parser("serve", help="run pond", parents=[common])
    s.add_argument("--bind", type=_named, metavar="HOST:PORT",
                   help="default 127.0.0.1:8001 (port 0: any free port)")
    s.add_argument("--admin-token-file", type=_named, metavar="FILE",
                   help="admin token (required off loopback)")
    s.add_argument("--poll-hold", type=float, metavar="S", help="seconds an idle poll is held (default 25)")
    s.add_argument("--access-log", action="store_true", help="log every request")
    s.add_argument("--log-format", choices=("text", "json"),
                   help="text lines, or one JSON object a line (default: $POND_LOG_FORMAT, else text)")
    s.add_argument("--tls-cert", type=_named, metavar="FILE", help="serve HTTPS with this PEM certificate (chain)")
    s.add_argument("--tls-key", type=_named, metavar="FILE", help="the certificate's PEM private key")
    s.add_argument("--insecure-no-tls", action="store_true",
                   help="allow plain HTTP off loopback (a trusted overlay network only)")
    s.add_argument("--request-timeout", type=float, metavar="S",
                   help="seconds a client has to send a request body, and a kept-alive connection may sit idle "
                        "(default 30)")
    s.add_argument("--head-timeout", type=float, metavar="S",
                   help="seconds a client has to send a request head, TLS handshake included (default 5)")
    s.add_argument("--max-pending", type=int, metavar="N",
                   help="connections that may wait to send a request head at once (default 256)")
    s.add_argument("--max-pending-per-address", type=int, metavar="N",
                   help="... of them from one client address (default 64)")
    s.add_argument("--credential-key-file", type=_named, metavar="FILE",
                   help="key that encrypts credentials at rest, base64 of 32 bytes, mode 0600 "
                        "(default: $POND_CREDENTIAL_KEY_FILE, else DIR/credential.key, created)")
    s.add_argument("--allow-unsigned-results", action="store_true",
                   help="let workers without pinned keys (no cryptography package) take jobs that name no "
                        "credential; their results are recorded unsigned")
    s.add_argument("--lease", type=float, metavar="S",
                   help="seconds an attempt lives without a heartbeat before its job is requeued (default 60)")
    s.add_argument("--log-cap", type=int, metavar="BYTES",
                   help="output kept per job unless it says: the head and tail of each stream (default 4 MiB)")
    s.add_argument("--max-attempts", type=int, metavar="N",
                   help="attempts of a job whose leases run out before it fails (default 3)")
    s.add_argument("--assign-ahead", type=int, metavar="N",
                   help="jobs each worker may hold beyond its free slots, started as soon as a slot frees "
                        "(one that waits over 1 s while another worker has a free slot goes there; 0: none) "
                        "(default: $POND_ASSIGN_AHEAD, else 4)")
    s.add_argument("--bundle-retention", type=float, metavar="S",
                   help="seconds a source bundle is kept once no job needs it (default: $POND_BUNDLE_RETENTION, "
                        "else 604800: 7 days)")
    s.add_argument("--artifact-retention", type=float, metavar="S",
                   help="seconds a job's artifacts are kept after it ends (default: $POND_ARTIFACT_RETENTION, "
                        "else 604800: 7 days)")
    s.add_argument("--require-sandbox", action="store_true",
                   help="refuse jobs with sandbox profile none (default: $POND_REQUIRE_SANDBOX, else off)")
    s.add_argument("--database", type=_named, metavar="URL",
                   help="keep pond's data in PostgreSQL, shared by several pond replicas: postgresql://USER@HOST/DB, "
                        "password in PGPASSWORD or .pgpass (default: $POND_DATABASE_URL, else DIR/pond.db; "
                        "needs pip install 'pond-swarm[postgres]')")
    s.add_argument("--database-pool", type=int, metavar="N",
                   help="connections this pond keeps to PostgreSQL, for requests side by side "
                        "(default: $POND_DATABASE_POOL, else 4; 1 to 64)")
    s.set_defaults(fn=cmd_serve)

    s = sub.add_parser("up", help="run a whole local pool (pond, one orchestrator, one worker)", parents=[common])
    s.add_argument("--bind", type=_named, metavar="HOST:PORT",
                   help="where pond listens (default 127.0.0.1:8001, else any free port)")
    s.add_argument("--tags", default="pool:trusted,pool:local", help="the worker's tags (default: %(default)s)")
    s.add_argument("--capabilities", default="harness.*,sandbox.*", help="the worker's capability globs (default: %(default)s)")
    s.add_argument("--concurrency", type=int, default=2, help="the worker's slots (default: %(default)s)")
    s.add_argument("--log-format", choices=("text", "json"),
                   help="the three processes' log lines, text or one JSON object a line "
                        "(default: $POND_LOG_FORMAT, else text)")
    s.set_defaults(fn=cmd_up)

    s = sub.add_parser("submit", help="submit a job: pond submit [options] -- COMMAND [ARG...]", parents=[common])
    s.add_argument("--tag", action="append", default=[], help="a tag the worker must have (repeatable)")
    s.add_argument("--capability", action="append", default=[], help="a capability the worker must have (repeatable)")
    s.add_argument("--env", action="append", default=[], metavar="NAME=VALUE", help="environment for the job")
    s.add_argument("--timeout", type=float, metavar="S", help="seconds the job may run")
    s.add_argument("--name", help="a label for the job")
    s.add_argument("--tenant", help="tenant id (for sandbox tier byo)")
    s.add_argument("--profile", choices=("none", "untrusted-code-read", "untrusted-code-write"),
                   help=f"sandbox profile (default {DEFAULT_PROFILE}; none runs unconfined)")
    s.add_argument("--tier", choices=("trusted", "byo", "any"),
                   help="which workers: trusted (pool:trusted), byo (pool:byo and tenant:<tenant>), any "
                        "(default: trusted, or any for profile none)")
    s.add_argument("--backend", metavar="NAME", help="sandbox provider (default bwrap, or process for profile none)")
    s.add_argument("--allow-host", action="append", default=[], metavar="HOST",
                   help="a host the job may reach through the egress proxy: name, *.suffix or IP (repeatable; "
                        "untrusted-code-write only)")
    s.add_argument("--memory", metavar="SIZE", help="memory limit, at most the default 4G (e.g. 512M)")
    s.add_argument("--cpus", type=float, metavar="N", help="CPUs, at most the default 2 (e.g. 0.5)")
    s.add_argument("--pids", type=int, metavar="N", help="processes, at most the default 512")
    s.add_argument("--tmpfs", metavar="SIZE", help="size of the job's /tmp, at most the default 1G")
    s.add_argument("--sandbox", metavar="JSON",
                   help='the whole sandbox block instead of the flags above, e.g. \'{"profile": "none"}\'')
    s.add_argument("--credential", metavar="NAME", help="a credential whose env the job gets, sealed to its worker")
    s.add_argument("--harness", metavar="KEY", help="an agent job: run this harness (pond admin harness list)")
    s.add_argument("--model", metavar="KEY", help="an agent job: with this model, its key kept by the worker's broker")
    s.add_argument("--prompt", metavar="TEXT", help="an agent job: the task")
    s.add_argument("--prompt-file", type=_named, metavar="FILE", help="an agent job: the task, from FILE (- for stdin)")
    s.add_argument("--system-prompt", metavar="TEXT", help="an agent job: a system prompt")
    s.add_argument("--max-tokens", type=int, metavar="N", help="an agent job: tokens its broker lets it spend")
    s.add_argument("--max-cost", type=float, metavar="X", help="an agent job: cost its broker lets it spend")
    s.add_argument("--temperature", type=float, metavar="T", help="an agent job: sampling temperature")
    s.add_argument("--cancel-grace", type=float, metavar="S",
                   help="seconds from SIGTERM to SIGKILL when the job is cancelled or times out (default 10)")
    s.add_argument("--retries", type=int, metavar="N",
                   help="run the job again up to N times (0..10) if it exits non-zero (default 0)")
    s.add_argument("--idempotency-key", metavar="KEY",
                   help="submit at most once: the same key gives back the same job (safe to retry)")
    s.add_argument("--source", type=_named, metavar="DIR",
                   help="ship DIR to /work (its git-tracked files, or all but .git), encrypted to the worker")
    s.add_argument("--artifact", action="append", default=[], metavar="PATH",
                   help="a path or glob under /work to hand back (repeatable); see `pond artifacts ID`")
    s.add_argument("--wait", action="store_true", help="stream the output and exit with the job's exit code")
    s.add_argument("--explain", action="store_true",
                   help="submit nothing: say which pools could take this job now, and what the others lack")
    s.add_argument("--batch", metavar="FILE", type=_named, help="submit the jobs in FILE (- for stdin), one JSON job object per "
                   "line, 1,000 per request; prints their ids")
    s.add_argument("command", nargs=argparse.REMAINDER, help="the command, after --")
    s.set_defaults(fn=cmd_submit)

    s = sub.add_parser("jobs", help="list jobs", parents=[common])
    s.add_argument("--state", choices=STATES, help="only jobs in this state")
    s.add_argument("--tag", type=_named, metavar="TAG", help="only jobs that require this tag (pond filters all its jobs)")
    s.add_argument("--worker", type=_named, metavar="ID", help="only jobs whose last attempt ran on this worker")
    s.add_argument("--limit", type=int, default=50, help="the newest N that match (default: %(default)s)")
    s.set_defaults(fn=cmd_jobs)

    s = sub.add_parser("job", help="show one job (and why it waits)", parents=[common])
    s.add_argument("id")
    s.add_argument("--explain", action="store_true",
                   help="for each pool, what it lacks for this job, or that its matching workers are busy, "
                        "offline or evicted")
    s.set_defaults(fn=cmd_job)
    s = sub.add_parser("cancel", help="cancel a job (exit 1 if it had already finished)", parents=[common])
    s.add_argument("id")
    s.set_defaults(fn=cmd_cancel)

    s = sub.add_parser("usage", help="tokens and cost of agent jobs, per model, harness or tenant", parents=[common])
    s.add_argument("--by", choices=("model", "harness", "tenant"), default="model")
    s.add_argument("--days", type=float, metavar="N", help="only jobs that finished in the last N days")
    s.set_defaults(fn=cmd_usage)

    s = sub.add_parser("verify", help="re-check a job's signed result and stored output, offline",
                       parents=[common])
    s.add_argument("id")
    s.add_argument("--database", type=_named, metavar="URL",
                   help="pond's PostgreSQL database (default: $POND_DATABASE_URL, else DIR/pond.db)")
    s.set_defaults(fn=cmd_verify)

    s = sub.add_parser("artifacts", help="list a job's artifacts, download one, or apply its changes.patch",
                       parents=[common])
    s.add_argument("id")
    s.add_argument("--get", metavar="NAME", help="download this artifact (its signed sha256 is checked)")
    s.add_argument("-o", "--output", metavar="FILE", help="write it here (default: stdout)")
    s.add_argument("--apply", action="store_true", help="git apply changes.patch in --dir, refusing if it does not "
                   "apply cleanly")
    s.add_argument("--dir", default=".", metavar="DIR", help="the checkout to apply to (default: .)")
    s.set_defaults(fn=cmd_artifacts)
    s = sub.add_parser("migrate-store", help="copy a stopped pond's SQLite store into an empty PostgreSQL database",
                       parents=[common], epilog="example: PGPASSWORD=... pond migrate-store --from sqlite:./pond-state "
                                                "--to postgresql://pond@db.internal:5432/pond")
    s.add_argument("--from", dest="source", required=True, type=_named, metavar="sqlite:DIR",
                   help="the state dir of the pond to move (stopped)")
    s.add_argument("--to", dest="target", type=_named, metavar="URL",
                   help="an empty PostgreSQL database, password in PGPASSWORD or .pgpass (default: $POND_DATABASE_URL)")
    s.set_defaults(fn=cmd_migrate_store)

    s = sub.add_parser("logs", help="print a job's output", parents=[common])
    s.add_argument("id")
    s.add_argument("--follow", "-f", action="store_true", help="keep printing until the job ends")
    s.set_defaults(fn=cmd_logs)

    admin = sub.add_parser("admin", help="pool administration").add_subparsers(dest="admin_cmd", metavar="COMMAND",
                                                                                required=True)
    s = admin.add_parser("pairing-code", help="mint a one-time orchestrator pairing code", parents=[common])
    s.add_argument("--ttl", type=int, metavar="S", help="seconds it stays valid (default 600)")
    s.add_argument("--name", help="a name for the orchestrator")
    s.add_argument("--scope", type=_named, metavar="TAGS", help="pool scope: the only tags its workers may have (a,b)")
    s.set_defaults(fn=cmd_pairing_code)
    s = admin.add_parser("enrollment-code", help="mint a worker enrollment code", parents=[common])
    s.add_argument("--ttl", type=int, metavar="S", help="seconds it stays valid (default 3600)")
    s.add_argument("--uses", type=int, help="how many workers it may enroll (default 1)")
    s.add_argument("--fingerprint", type=_named, metavar="FP",
                   help="expected worker fingerprint (`swarm.py worker --show-fingerprint` on the worker host)")
    s.add_argument("--tags", type=_named, metavar="TAGS", help="tag ceiling: the only tags the worker may have (a,b)")
    s.set_defaults(fn=cmd_enrollment_code)
    s = admin.add_parser("revoke", help="revoke an orchestrator binding or a worker", parents=[common])
    s.add_argument("kind", choices=("orchestrator", "worker"))
    s.add_argument("id")
    s.set_defaults(fn=cmd_revoke)
    credential = admin.add_parser("credential", help="credentials: set, list, delete").add_subparsers(
        dest="credential_cmd", metavar="COMMAND", required=True)
    s = credential.add_parser("set", help="create or replace a credential", parents=[common])
    s.add_argument("name")
    s.add_argument("--secret", action="append", default=[], metavar="NAME",
                   help="a secret variable, its value taken from $NAME (repeatable; never NAME=VALUE)")
    s.add_argument("--secrets-file", type=_named, metavar="FILE", help="secret NAME=VALUE lines, from a 0600 file")
    s.add_argument("--env", action="append", default=[], metavar="NAME=VALUE", help="a variable that is not secret")
    s.add_argument("--provider", help="e.g. anthropic")
    s.set_defaults(fn=cmd_credential_set)
    s = credential.add_parser("list", help="list credentials (names only, never values)", parents=[common])
    s.set_defaults(fn=cmd_credential_list)
    s = credential.add_parser("delete", help="delete a credential", parents=[common])
    s.add_argument("name")
    s.set_defaults(fn=cmd_credential_delete)
    for kind in ("harness", "model"):
        plural = "harnesses" if kind == "harness" else "models"
        reg = admin.add_parser(kind, help=f"{plural}: create, list, show, delete"
                               + (", from-preset" if kind == "harness" else "")).add_subparsers(
            dest=f"{kind}_cmd", metavar="COMMAND", required=True)
        s = reg.add_parser("create", help=f"create or replace a {kind}", parents=[common])
        s.add_argument("--from", dest="from_file", type=_named, metavar="FILE", help=f"the {kind} as JSON (- for stdin)")
        s.add_argument("--key", help=f"the {kind}'s key, e.g. " + ("codex" if kind == "harness" else "gpt-mini"))
        s.add_argument("--label", help="a description")
        if kind == "harness":
            s.add_argument("--capability", help="what a worker advertises for it, e.g. harness.codex")
            s.add_argument("--command-template", metavar="JSON", help='argv with placeholders, e.g. '
                           '\'["codex", "exec", "--model", "{{MODEL}}", "{{PROMPT}}"]\'')
            s.add_argument("--file", action="append", default=[], metavar="PATH=LOCAL_FILE",
                           help="a runtime file under the job's HOME, its content from LOCAL_FILE (repeatable)")
            s.add_argument("--env", action="append", default=[], metavar="NAME=VALUE", help="environment (repeatable)")
            s.add_argument("--secret-file", action="append", default=[], metavar="NAME",
                           help="a secret its files need in clear text ({{SECRET:NAME}}; a warning on each job)")
        else:
            s.add_argument("--provider", choices=("openai", "anthropic"), help="the API the model speaks")
            s.add_argument("--model-id", help="the provider's name of the model")
            s.add_argument("--credential", help="the credential holding its key (pond admin credential set)")
            s.add_argument("--base-url", help="its API, https (or http on loopback), e.g. https://api.openai.com/v1")
            s.add_argument("--input-cost", type=float, metavar="X", help="cost per million input tokens")
            s.add_argument("--output-cost", type=float, metavar="X", help="cost per million output tokens")
        s.set_defaults(fn=cmd_registry_create, registry_kind=kind)
        s = reg.add_parser("list", help=f"list {plural}", parents=[common])
        s.set_defaults(fn=cmd_registry_list, registry_kind=kind)
        for verb, fn in (("show", cmd_registry_show), ("delete", cmd_registry_delete)):
            s = reg.add_parser(verb, help=f"{verb} one {kind}", parents=[common])
            s.add_argument("key")
            s.set_defaults(fn=fn, registry_kind=kind)
        if kind == "harness":
            s = reg.add_parser("from-preset", help="add a preset harness: codex, claude-code, llm", parents=[common])
            s.add_argument("preset")
            s.add_argument("--key", help="store it under another key")
            s.set_defaults(fn=cmd_harness_preset)
    s = admin.add_parser("evict", help="take a worker out of the pool: no new jobs, then disconnected",
                         parents=[common])
    s.add_argument("id")
    s.add_argument("--drain", action="store_true", help="let its running jobs finish (default: requeue them now)")
    s.set_defaults(fn=cmd_evict)
    s = admin.add_parser("orchestrators", help="list paired orchestrators", parents=[common])
    s.set_defaults(fn=cmd_orchestrators)
    s = admin.add_parser("workers", help="list enrolled workers", parents=[common])
    s.set_defaults(fn=cmd_workers)
    return p


def main(argv=None):
    args = build_parser().parse_args(argv)
    if getattr(args, "command", None) and args.command[0] == "--":
        args.command = args.command[1:]
    try:
        return args.fn(args) or 0
    except PondError as e:
        print(f"error: {e.message}", file=sys.stderr)
        if e.hint:
            print(f"hint: {e.hint}", file=sys.stderr)
        return getattr(e, "exit_code", 2 if e.code in ("usage", "config") else 1)
    except (OSError, sqlite3.Error) as e:
        if storage_failure(e) is None:
            raise
        print(f"error: storage unavailable: cannot write pond's state now: {storage_failure(e)}", file=sys.stderr)
        print("hint: free space on the disk of the state dir (--state-dir), or fix it; then run this again",
              file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return EXIT_CANCELLED
    except BrokenPipeError:
        return 0

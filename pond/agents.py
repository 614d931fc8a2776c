"""Agents: the harness and model registries, and the expansion of an agent job (issue 10).

    operator ── POST /v1/admin/harnesses {key, label, capability, command_template, files, env, secret_files}
    operator ── POST /v1/admin/models {key, label, provider, model_id, credential, base_url, prices}
    consumer ── POST /v1/jobs {agent: {harness, model, prompt, ...}, sandbox} ──▶ expand() ──▶ the job stored:
                command, env, files, capabilities, credential and the broker block, all concrete

pond expands an agent job before it stores it, so what the seal and the signed result bind
(sealing.job_spec: command, env, sandbox, files, broker) is exactly what runs. The worker
fills only what pond cannot know: {{BROKER_URL}} (its broker inside the job's network) and
{{SECRET:NAME}} (a value it unseals) in the runtime files. The model's real key never
enters the job: the worker's broker holds it (specs/agents.md).
"""

import ipaddress
import re
from urllib.parse import urlsplit

from pond import credentials, wire
from pond.errors import BadRequest, NotFound, RegistryInvalid

KEY_RE = re.compile(r"^[a-z0-9][a-z0-9._-]{0,63}\Z")
KEY_HINT = "keys look like codex or gpt-5-mini: lower-case letters, digits, . _ -"
PROVIDERS = {"openai": "OPENAI", "anthropic": "ANTHROPIC"}     # -> the prefix of its *_BASE_URL and *_API_KEY
POND_PLACEHOLDERS = ("MODEL", "PROMPT", "SYSTEM_PROMPT", "MAX_TOKENS", "TEMPERATURE")
WORKER_PLACEHOLDERS = ("BROKER_URL",)           # and SECRET:NAME: filled by the worker, in files only
PLACEHOLDER_RE = re.compile(r"\{\{([^{}]*)\}\}")
SECRET_RE = re.compile(r"^SECRET:([A-Za-z_][A-Za-z0-9_]{0,127})\Z")
MAX_FILES = 16
MAX_FILE_BYTES = 64 * 1024
MAX_PATH = 255
MAX_PROMPT = 256 * 1024
MAX_COST_PER_MTOK = 10_000.0
HARNESS_FIELDS = ("key", "label", "capability", "command_template", "files", "env", "secret_files")
MODEL_FIELDS = ("key", "label", "provider", "model_id", "credential", "base_url", "input_cost_per_mtok",
                "output_cost_per_mtok")
AGENT_FIELDS = ("harness", "model", "prompt", "role", "system_prompt", "temperature", "max_tokens", "max_cost",
                "tools")
BROKERED_PROFILES = ("untrusted-code-read", "untrusted-code-write")

# Presets (`pond admin harness from-preset NAME`): harnesses that talk to the broker through the
# variables and files below. Their executables are what a worker looks for to advertise them.
PRESETS = {
    "codex": {
        "key": "codex", "label": "OpenAI Codex CLI (npm @openai/codex)", "capability": "harness.codex",
        # pond's bwrap is the sandbox: codex's own (Landlock, or bwrap in bwrap) cannot start inside it.
        "command_template": ["codex", "exec", "--skip-git-repo-check", "--dangerously-bypass-approvals-and-sandbox",
                             "--model", "{{MODEL}}", "{{PROMPT}}"],
        "files": [{"path": ".codex/config.toml", "content":
                   'model = "{{MODEL}}"\nmodel_provider = "pond"\n\n[model_providers.pond]\n'
                   'name = "pond broker"\nbase_url = "{{BROKER_URL}}"\nenv_key = "OPENAI_API_KEY"\n'
                   'wire_api = "responses"\n'}],
        "env": {},
    },
    "claude-code": {
        "key": "claude-code", "label": "Claude Code (npm @anthropic-ai/claude-code)", "capability": "harness.claude",
        "command_template": ["claude", "-p", "{{PROMPT}}", "--model", "{{MODEL}}",
                             "--append-system-prompt", "{{SYSTEM_PROMPT}}", "--dangerously-skip-permissions"],
        "files": [{"path": ".claude/settings.json", "content": '{"model": "{{MODEL}}", "includeCoAuthoredBy": false}\n'},
                  {"path": ".claude.json", "content": '{"hasCompletedOnboarding": true}\n'}],
        "env": {"DISABLE_AUTOUPDATER": "1", "DISABLE_TELEMETRY": "1"},
    },
    "llm": {
        "key": "llm", "label": "llm (PyPI llm): one prompt, its answer on stdout", "capability": "harness.llm",
        "command_template": ["llm", "prompt", "--no-log", "-m", "pond-model", "-s", "{{SYSTEM_PROMPT}}", "{{PROMPT}}"],
        "files": [{"path": ".config/io.datasette.llm/extra-openai-models.yaml", "content":
                   '- model_id: pond-model\n  model_name: "{{MODEL}}"\n  api_base: "{{BROKER_URL}}"\n'}],
        "env": {"LLM_USER_PATH": "/home/swarm/.config/io.datasette.llm"},
    },
}


def _invalid(field, message, hint=""):
    return RegistryInvalid(f"{field}: {message}", hint)


def _field(check, field, *args, **kw):
    """A wire check whose 400 becomes a 422 naming the registry field."""
    try:
        return check(*args, **kw)
    except RegistryInvalid:
        raise
    except BadRequest as e:
        raise RegistryInvalid(e.message if e.message.startswith(field) else f"{field}: {e.message}", e.hint) from None


# -- validation -----------------------------------------------------------------------

def placeholders(text):
    return PLACEHOLDER_RE.findall(text)


def _check_placeholders(text, field, allowed):
    for name in placeholders(text):
        if name not in allowed and not (SECRET_RE.match(name) and "SECRET" in allowed):
            raise _invalid(field, f"unknown placeholder {{{{{name[:40]}}}}}",
                           "known: " + ", ".join("{{%s}}" % p for p in allowed if p != "SECRET")
                           + (", {{SECRET:NAME}}" if "SECRET" in allowed else ""))


def safe_path(path, field):
    """A runtime file's path relative to the job's HOME: refused if absolute, ~, .. or not plain."""
    if not isinstance(path, str) or not path or len(path) > MAX_PATH or "\x00" in path or "\\" in path:
        raise _invalid(field, f"must be a relative path of 1 to {MAX_PATH} characters")
    parts = path.split("/")
    if path.startswith("/") or path.startswith("~") or ".." in parts or "" in parts or "." in parts:
        raise _invalid(field, f"{path[:80]!r} is absolute, starts with ~, or contains .., . or //",
                       "give a path under the job's HOME, such as .codex/config.toml")
    return path


def check_files(value, field, allowed):
    if value is None:
        return []
    if not isinstance(value, list) or len(value) > MAX_FILES:
        raise _invalid(field, f"must be a list of at most {MAX_FILES} {{path, content}} objects")
    out, seen = [], set()
    for i, item in enumerate(value):
        where = f"{field}[{i}]"
        item = _field(wire.obj, where, item, where, ("path", "content"), ("path", "content"))
        path = safe_path(item["path"], f"{where}.path")
        if path in seen:
            raise _invalid(f"{where}.path", f"{path!r} is given twice")
        seen.add(path)
        content = item["content"]
        if not isinstance(content, str) or len(content.encode("utf-8", "replace")) > MAX_FILE_BYTES:
            raise _invalid(f"{where}.content", f"must be a string of at most {MAX_FILE_BYTES} bytes")
        _field(wire.utf8, f"{where}.content", content, f"{where}.content")
        _check_placeholders(content, f"{where}.content", allowed)
        out.append({"path": path, "content": content})
    return out


def check_harness(body):
    body = wire.obj(body, "harness", HARNESS_FIELDS, ("key", "capability", "command_template"))    # its shape: 400
    key = _field(wire.string, "key", body["key"], "key", 64, KEY_RE, KEY_HINT)
    capability = _field(wire.string, "capability", body["capability"], "capability", 128, wire.CAPABILITY_RE)
    if not capability.startswith("harness."):
        raise _invalid("capability", f"{capability!r} does not start with harness.",
                       "workers advertise harnesses as harness.<executable>, e.g. harness.codex")
    template = _field(wire.argv, "command_template", body["command_template"], "command_template")
    for i, arg in enumerate(template):
        _check_placeholders(arg, f"command_template[{i}]", POND_PLACEHOLDERS)
    if placeholders(template[0]):
        raise _invalid("command_template[0]", "the program is not a placeholder", "name the harness's executable")
    env = _field(wire.env, "env", body.get("env"), "env")
    for name, value in env.items():
        _check_placeholders(value, f"env[{name!r}]", ("MODEL",))
    secret_files = _field(wire.string_list, "secret_files", body.get("secret_files"), "secret_files", wire.ENV_NAME_RE,
                          hint="the secret variables this harness's files need in clear text")
    files = check_files(body.get("files"), "files", ("MODEL", "BROKER_URL", "SECRET"))
    for f in files:
        for name in placeholders(f["content"]):
            secret = SECRET_RE.match(name)
            if secret and secret.group(1) not in secret_files:
                raise _invalid("files", f"{f['path']} needs {{{{{name}}}}}, and secret_files does not name "
                               f"{secret.group(1)}", "a harness that needs a key in clear text must say so in "
                               "secret_files; the broker holds keys otherwise")
    label = _field(wire.optional_string, "label", body.get("label"), "label", max_len=200)
    return {"key": key, "label": label or key, "capability": capability, "command_template": template,
            "files": files, "env": env, "secret_files": secret_files}


def base_url(value, field="base_url"):
    """An upstream the broker may call: https, or http to a loopback address only; no user, query or fragment."""
    url = _field(wire.string, field, value, field, 2000)
    try:
        parts = urlsplit(url)
        parts.port                  # raises on a port that is not a number in range
    except ValueError:
        raise _invalid(field, f"{url[:80]!r} is not a URL") from None
    if parts.scheme not in ("https", "http") or not parts.hostname or "@" in parts.netloc or parts.query \
            or parts.fragment:
        raise _invalid(field, f"{url[:80]!r} must be https://host[:port][/path]",
                       "no user, query or fragment; for example https://api.openai.com/v1")
    if parts.scheme == "http":
        try:
            loopback = ipaddress.ip_address(parts.hostname).is_loopback
        except ValueError:
            loopback = False
        if not loopback:
            raise _invalid(field, f"{url[:80]!r} is plain http to a host that is not a loopback address",
                           "use https; plain http only to 127.0.0.1 or ::1 (a test upstream)")
    return url.rstrip("/")


def check_model(pond, body):
    body = wire.obj(body, "model", MODEL_FIELDS, ("key", "provider", "model_id", "credential", "base_url"))
    key = _field(wire.string, "key", body["key"], "key", 64, KEY_RE, KEY_HINT)
    provider = body["provider"]
    if provider not in PROVIDERS:
        raise _invalid("provider", f"{str(provider)[:40]!r} is unknown", "one of: " + ", ".join(PROVIDERS))
    model_id = _field(wire.string, "model_id", body["model_id"], "model_id", 200)
    name = _field(wire.string, "credential", body["credential"], "credential", 64, credentials.NAME_RE,
                  credentials.NAME_HINT)
    row = pond.store.credential(name)
    if row is None:
        raise _invalid("credential", f"{name!r} does not exist", "set it first with `pond admin credential set`")
    key_var(provider, row["secret_names"], "credential")
    prices = {p: _field(wire.number, p, body.get(p), p, 0, MAX_COST_PER_MTOK, default=0)
              for p in ("input_cost_per_mtok", "output_cost_per_mtok")}
    label = _field(wire.optional_string, "label", body.get("label"), "label", max_len=200)
    return {"key": key, "label": label or key, "provider": provider, "model_id": model_id, "credential": name,
            "base_url": base_url(body["base_url"]), **prices}


def key_var(provider, secret_names, field):
    """The secret of a credential that holds the model's key: <PROVIDER>_API_KEY, or its only secret."""
    wanted = f"{PROVIDERS[provider]}_API_KEY"
    if wanted in secret_names:
        return wanted
    if len(secret_names) == 1:
        return secret_names[0]
    raise _invalid(field, f"the credential has no secret {wanted} and more than one other",
                   f"name the key {wanted} in the credential's secrets")


# -- /v1/admin/harnesses and /v1/admin/models ---------------------------------------------

def put_harness(pond, req):
    harness = check_harness(req.body)
    created = pond.store.put_registry("harness", harness["key"], harness, pond.now())
    return (201 if created else 200), pond.store.registry("harness", harness["key"])


def put_model(pond, req):
    model = check_model(pond, req.body)
    created = pond.store.put_registry("model", model["key"], model, pond.now())
    return (201 if created else 200), pond.store.registry("model", model["key"])


def _kind(req):
    return "harness" if "/harnesses" in req.path else "model"


def list_entries(pond, req):
    kind = _kind(req)
    return 200, {("harnesses" if kind == "harness" else "models"): pond.store.registry_entries(kind)}


def get_entry(pond, req):
    return 200, find(pond, _kind(req), req.params["id"])


def delete_entry(pond, req):
    if req.body is not None:
        raise BadRequest("DELETE takes no body", "send the request without one")
    kind = _kind(req)
    find(pond, kind, req.params["id"])
    pond.store.delete_registry(kind, req.params["id"])
    return 200, {"key": req.params["id"], "deleted": True}


def find(pond, kind, key, field=None):
    entry = pond.store.registry(kind, key) if isinstance(key, str) else None
    if entry is None:
        message = f"{kind} {str(key)[:64]!r} does not exist"
        hint = f"list them with `pond admin {kind} list`; add one with `pond admin {kind} create`"
        if field:
            raise _invalid(field, message, hint)
        raise NotFound(message, hint)
    return entry


# -- expanding an agent job ------------------------------------------------------------------

def _fill(text, values):
    return PLACEHOLDER_RE.sub(lambda m: values.get(m.group(1), m.group(0)), text)


def expand(pond, value, box):
    """A submitted `agent` block -> the job fields it stands for: command, env, files, capability,
    credential, broker, agent (the request as pond understood it). 422 naming the field otherwise."""
    agent = _field(wire.obj, "agent", value, "agent", AGENT_FIELDS, ("harness", "model", "prompt"))
    harness = find(pond, "harness", agent["harness"], "agent.harness")
    model = find(pond, "model", agent["model"], "agent.model")
    if box["profile"] not in BROKERED_PROFILES or box["backend"] != "bwrap":
        raise _invalid("sandbox.profile", f"an agent job runs under bwrap in {' or '.join(BROKERED_PROFILES)}, "
                       f"not {box['profile']} ({box['backend']})", 'use "sandbox": {"profile": "untrusted-code-write"}: '
                       "the model's key stays in the worker's broker, outside the sandbox")
    prompt = _field(wire.string, "agent.prompt", agent["prompt"], "agent.prompt", MAX_PROMPT)
    system = _field(wire.optional_string, "agent.system_prompt", agent.get("system_prompt"), "agent.system_prompt",
                    max_len=MAX_PROMPT) or ""
    role = _field(wire.optional_string, "agent.role", agent.get("role"), "agent.role", max_len=64, pattern=KEY_RE)
    temperature = _field(wire.number, "agent.temperature", agent.get("temperature"), "agent.temperature", 0, 2)
    max_tokens = _field(wire.number, "agent.max_tokens", agent.get("max_tokens"), "agent.max_tokens", 1, 10**9,
                        integer=True)
    max_cost = _field(wire.number, "agent.max_cost", agent.get("max_cost"), "agent.max_cost", 0, 10**6)
    tools = _field(wire.string_list, "agent.tools", agent.get("tools"), "agent.tools", KEY_RE)
    row = pond.store.credential(model["credential"])
    if row is None:
        raise _invalid("agent.model", f"model {model['key']} names credential {model['credential']!r}, which "
                       "no longer exists", "set the credential again with `pond admin credential set`")
    values = {"MODEL": model["model_id"], "PROMPT": prompt, "SYSTEM_PROMPT": system,
              "MAX_TOKENS": "" if max_tokens is None else str(max_tokens),
              "TEMPERATURE": "" if temperature is None else str(temperature)}
    command = [_fill(arg, values) for arg in harness["command_template"]]
    _field(wire.argv, "agent", command, "command (expanded from the harness)")
    files = [{"path": f["path"], "content": _fill(f["content"], {"MODEL": model["model_id"]})}
             for f in harness["files"]]
    env = {name: _fill(text, {"MODEL": model["model_id"]}) for name, text in harness["env"].items()}
    broker = {"provider": model["provider"], "base_url": model["base_url"], "model": model["model_id"],
              "key_env": key_var(model["provider"], row["secret_names"], "agent.model"),
              "max_tokens": max_tokens, "max_cost": max_cost,
              "input_cost_per_mtok": model["input_cost_per_mtok"], "output_cost_per_mtok": model["output_cost_per_mtok"],
              "secret_files": harness["secret_files"]}
    request = {"harness": harness["key"], "model": model["key"], "role": role, "temperature": temperature,
               "max_tokens": max_tokens, "max_cost": max_cost, "tools": tools}
    return {"command": command, "env": env, "files": files, "capability": harness["capability"],
            "credential": model["credential"], "broker": broker, "agent": request}


# -- usage ----------------------------------------------------------------------------

def cost(usage, broker):
    """The cost of a job's model calls at its model's prices (per million tokens)."""
    if not usage or not broker:
        return 0.0
    return round(usage.get("input_tokens", 0) * broker["input_cost_per_mtok"] / 1e6
                 + usage.get("output_tokens", 0) * broker["output_cost_per_mtok"] / 1e6, 6)


def usage_view(job):
    usage = job.get("usage") or {"calls": [], "input_tokens": 0, "output_tokens": 0}
    agent = job.get("agent") or {}
    return {"job": job["id"], "harness": agent.get("harness"), "model": agent.get("model"),
            "model_id": (job.get("broker") or {}).get("model"), "input_tokens": usage.get("input_tokens", 0),
            "output_tokens": usage.get("output_tokens", 0), "calls": usage.get("calls", []),
            "refused": usage.get("refused", 0), "cost": cost(usage, job.get("broker")),
            "attested": job.get("usage") is not None}


USAGE_BY = ("model", "harness", "tenant")


def usage_summary(pond, req):
    """GET /v1/usage?since=&until=&by=model|harness|tenant: tokens, calls and cost of the agent jobs that
    finished in [since, until) (Unix seconds; default: all), summed per model, harness or tenant."""
    q = req.query
    by = q.get("by", "model")
    if by not in USAGE_BY:
        raise BadRequest(f"by={by[:40]!r} is unknown", "one of: " + ", ".join(USAGE_BY))
    since, until = (_seconds(q.get(name), name, default) for name, default in (("since", 0.0), ("until", 1e12)))
    groups = {}
    for job in pond.store.usage_jobs(since, until):
        tenant = next((t[len("tenant:"):] for t in job["tags"] if t.startswith("tenant:")), None)
        key = {"model": (job["agent"] or {}).get("model"), "harness": (job["agent"] or {}).get("harness"),
               "tenant": tenant}[by]
        g = groups.setdefault(key, {by: key, "jobs": 0, "calls": 0, "input_tokens": 0, "output_tokens": 0,
                                    "refused": 0, "cost": 0.0})
        usage = job["usage"]
        g["jobs"] += 1
        g["calls"] += len(usage.get("calls", []))
        for k in ("input_tokens", "output_tokens", "refused"):
            g[k] += usage.get(k, 0)
        g["cost"] = round(g["cost"] + cost(usage, job["broker"]), 6)
    return 200, {"by": by, "since": since, "until": until,
                 "usage": sorted(groups.values(), key=lambda g: (g[by] is None, str(g[by])))}


def _seconds(raw, name, default):
    if raw is None:
        return default
    try:
        value = float(raw)
    except ValueError:
        value = -1.0
    if not 0 <= value <= 1e12:
        raise BadRequest(f"query parameter {name}={raw[:40]!r} must be Unix seconds", "e.g. since=1795271248")
    return value

"""Wire format: request-body validation, canonical JSON, base64 output chunks.

Every handler validates its body through these helpers, so every bad field gets the
same 400 shape: which field, what was wrong, what is allowed. specs/protocol.md §1
defines the limits; swarm.py's "Wire format" section mirrors them.
"""

import base64
import binascii
import json
import re

from pond.errors import BadRequest

TAG_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._:/=+-]{0,127}\Z")
CAPABILITY_RE = re.compile(r"^[a-z0-9][a-z0-9._-]{0,127}\Z")
CAPABILITY_GLOB_RE = re.compile(r"^[a-z0-9*?\[\]][a-z0-9._*?\[\]!-]{0,127}\Z")
ENV_NAME_RE = re.compile(r"^[A-Za-z_][A-Za-z0-9_]{0,127}\Z")
NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._ -]{0,63}\Z")
ID_RE = re.compile(r"^[A-Za-z0-9_-]{1,64}\Z")       # a job, worker or binding id, as in URL paths
STREAMS = ("stdout", "stderr")

MAX_TAGS = 64
MAX_ARGV = 256
MAX_ARG_BYTES = 32 * 1024
MAX_ENV = 128
MAX_ENV_VALUE = 32 * 1024
MAX_CHUNK_BYTES = 1024 * 1024
MAX_CHUNKS_PER_REPORT = 64


def canonical(value):
    """The one JSON encoding used for keys and digests: sorted keys, no spaces."""
    return json.dumps(value, sort_keys=True, separators=(",", ":"))


def canonical_json(value):
    """The bytes signed or sealed for a JSON value (specs/sealing.md §2, attestation.md §2):
    sorted keys, no spaces, UTF-8 (not ASCII escapes)."""
    return json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode("utf-8")


def obj(value, where, allowed, required=()):
    if value is None:
        value = {}
    if not isinstance(value, dict):
        raise BadRequest(f"{where} must be a JSON object", "send Content-Type: application/json with {...}")
    unknown = sorted(set(value) - set(allowed))
    if unknown:
        raise BadRequest(f"{where}: unknown field {unknown[0]!r}",
                         "allowed fields: " + ", ".join(sorted(allowed)))
    for key in required:
        if key not in value:
            raise BadRequest(f"{where}: missing field {key!r}", "required fields: " + ", ".join(required))
    return value


def string(value, where, max_len=256, pattern=None, hint=""):
    if not isinstance(value, str) or not value or len(value) > max_len or "\x00" in value:
        raise BadRequest(f"{where} must be a non-empty string of at most {max_len} characters", hint)
    utf8(value, where)
    if pattern is not None and not pattern.match(value):
        raise BadRequest(f"{where}: {value[:80]!r} is not allowed", hint or f"it must match {pattern.pattern}")
    return value


def optional_string(value, where, **kw):
    return None if value is None else string(value, where, **kw)


def number(value, where, lo, hi, default=None, integer=False):
    if value is None:
        return default
    kind = int if integer else (int, float)
    if isinstance(value, bool) or not isinstance(value, kind) or not lo <= value <= hi:
        noun = "a whole number" if integer else "a number"
        raise BadRequest(f"{where} must be {noun} from {lo} to {hi}", f"got {str(value)[:40]}")
    return value


def string_list(value, where, pattern, max_items=MAX_TAGS, hint=""):
    if value is None:
        return []
    if not isinstance(value, list) or len(value) > max_items:
        raise BadRequest(f"{where} must be a list of at most {max_items} strings", hint)
    return sorted({string(v, f"{where}[{i}]", 128, pattern, hint) for i, v in enumerate(value)})


def argv(value, where="command"):
    if not isinstance(value, list) or not 1 <= len(value) <= MAX_ARGV:
        raise BadRequest(f"{where} must be a list of 1 to {MAX_ARGV} strings (argv)",
                         'example: {"command": ["python", "-c", "print(42)"]}')
    for i, arg in enumerate(value):
        if not isinstance(arg, str) or "\x00" in arg or len(utf8(arg, f"{where}[{i}]")) > MAX_ARG_BYTES:
            raise BadRequest(f"{where}[{i}] must be a string without NUL of at most {MAX_ARG_BYTES} bytes")
    if not value[0]:
        raise BadRequest(f"{where}[0] is empty", "the first element is the program to run")
    return value


def utf8(text, where):
    """The UTF-8 bytes of a string; 400 for one JSON can carry but UTF-8 cannot (a lone surrogate)."""
    try:
        return text.encode()
    except UnicodeEncodeError:
        raise BadRequest(f"{where} is not valid Unicode (a lone surrogate?)", "send UTF-8 text") from None


def env(value, where="env"):
    if value is None:
        return {}
    if not isinstance(value, dict) or len(value) > MAX_ENV:
        raise BadRequest(f"{where} must be an object of at most {MAX_ENV} NAME: value strings")
    for name, val in value.items():
        string(name, f"{where} name", 128, ENV_NAME_RE, "names look like MY_VAR")
        if not isinstance(val, str) or "\x00" in val or len(utf8(val, f"{where}[{name!r}]")) > MAX_ENV_VALUE:
            raise BadRequest(f"{where}[{name!r}] must be a string without NUL of at most {MAX_ENV_VALUE} bytes")
    return value


def b64decode(value, where):
    if not isinstance(value, str) or len(value) > (MAX_CHUNK_BYTES * 4) // 3 + 4:
        raise BadRequest(f"{where} must be base64 of at most {MAX_CHUNK_BYTES} bytes")
    try:
        return base64.b64decode(value, validate=True)
    except (binascii.Error, ValueError):
        raise BadRequest(f"{where} is not valid base64") from None


def b64encode(data):
    return base64.b64encode(data).decode()


def chunks(value, where="chunks"):
    """[{stream, seq, data}] -> [(stream, seq, bytes)], validated."""
    if value is None:
        return []
    if not isinstance(value, list) or len(value) > MAX_CHUNKS_PER_REPORT:
        raise BadRequest(f"{where} must be a list of at most {MAX_CHUNKS_PER_REPORT} chunks")
    out = []
    for i, item in enumerate(value):
        item = obj(item, f"{where}[{i}]", ("stream", "seq", "data"), ("stream", "seq", "data"))
        if item["stream"] not in STREAMS:
            raise BadRequest(f"{where}[{i}].stream must be one of: " + ", ".join(STREAMS))
        seq = number(item["seq"], f"{where}[{i}].seq", 0, 2**53, integer=True)
        out.append((item["stream"], seq, b64decode(item["data"], f"{where}[{i}].data")))
    return out

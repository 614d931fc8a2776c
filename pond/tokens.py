"""Identifiers, one-time codes and bearer tokens.

Codes and tokens are random, shown once, and stored only as their SHA-256. A bearer
token is `<kind>.<id>.<secret>`: the id finds the record, the secret's hash is then
compared in constant time (hmac.compare_digest), so a lookup never leaks how much of
a secret matched.

None of them is ever written to a log line: `redact` takes them out of any text first.
"""

import hashlib
import hmac
import re
import secrets

from pond.errors import BadRequest, Unauthorized

CODE_ALPHABET = "ABCDEFGHJKMNPQRSTUVWXYZ23456789"   # no 0/O, 1/I/L: typable from a screen
CODE_LENGTH = 12                                     # ~59 bits


def new_id(prefix):
    return f"{prefix}_{secrets.token_hex(6)}"


def new_code():
    raw = "".join(secrets.choice(CODE_ALPHABET) for _ in range(CODE_LENGTH))
    return "-".join(raw[i:i + 4] for i in range(0, CODE_LENGTH, 4))


def normalize_code(text):
    """Accept a code with or without dashes, any case; BadRequest if it cannot be one."""
    raw = str(text).replace("-", "").replace(" ", "").upper()
    if len(raw) != CODE_LENGTH or any(c not in CODE_ALPHABET for c in raw):
        raise BadRequest("that is not a pairing or enrollment code",
                         "codes look like ABCD-EFGH-JKMN; mint one with `pond admin pairing-code`")
    return raw


def digest(secret):
    return hashlib.sha256(secret.encode()).hexdigest()


def new_token(kind, record_id):
    """-> (token to give out once, hash to store)."""
    secret = secrets.token_urlsafe(32)
    return f"{kind}.{record_id}.{secret}", digest(secret)


def split_token(token, kind):
    """'<kind>.<id>.<secret>' -> (id, secret); Unauthorized for anything else."""
    parts = token.split(".")
    if len(parts) != 3 or parts[0] != kind or not parts[1] or not parts[2]:
        raise Unauthorized("the bearer token is malformed",
                           "use the token from backend-handle.json (written by `swarm.py pair`)")
    return parts[1], parts[2]


REDACTED = "[redacted]"
# What `redact` takes out of text bound for a log line (docs/security.md §4), keeping the shape around it.
# swarm.py's redact() has the same table: the two are checked against one list of cases.
_SECRETS = [
    (re.compile(r"(/enrollment/)[^/?#\s]+"), r"\1"),                  # the {code} of .../enrollment/{code}/consumed
    (re.compile(r"([?&][^=&#\s]*(?:token|code|secret|key|pass|auth|sig)[^=&#\s]*=)[^&#\s]*", re.I), r"\1"),
    (re.compile(r"\b((?:proxy-)?authorization|cookie|x-[a-z0-9-]*token)(\s*:\s*)[^\r\n]*", re.I), r"\1\2"),
    (re.compile(r"\b(bearer\s+)[^\s,;]+", re.I), r"\1"),              # a bearer token anywhere else
    (re.compile(r"\b(?:orch|wkr)\.[\w-]+\.[\w-]+|\bpond_admin_[\w-]+"), ""),   # tokens by their shape
    (re.compile(rf"\b[{CODE_ALPHABET}]{{4}}-[{CODE_ALPHABET}]{{4}}-[{CODE_ALPHABET}]{{4}}\b"), ""),   # codes by shape
]


def redact(text):
    """`text` (a request line, a URL, a path, header lines, a message) with every code and token
    in it replaced by [redacted]: path segments that carry one, secret query parameters, token
    headers, and anything shaped like a pond code or bearer token."""
    text = str(text)
    for pattern, keep in _SECRETS:
        text = pattern.sub(keep + REDACTED, text)
    return text


def matches(secret, stored_hash):
    return hmac.compare_digest(digest(secret), stored_hash or "")


def same(a, b):
    return hmac.compare_digest(a.encode(), b.encode())

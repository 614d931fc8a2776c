"""Settings, resolved once: flags > environment (POND_*) > state-dir files > defaults.

The rest of pond never reads os.environ or argparse namespaces; it gets a frozen
ServerSettings or ClientSettings from here.
"""

import ipaddress
import json
import os
import secrets
from dataclasses import dataclass, field
from pathlib import Path

from pond.errors import ConfigError

DEFAULT_STATE_DIR = ".pond-state"       # the public docs' POND_STATE_DIR default
DEFAULT_BIND = "127.0.0.1:8001"          # the public docs' example port
DATABASE_POOL = 4                        # connections per pond to PostgreSQL (store_pg.py)
MAX_DATABASE_POOL = 64
DEFAULT_POLL_HOLD = 25.0                 # s a /v1/orch/poll is held open when there is no work
MAX_POLL_HOLD = 60.0                     # s; a client asking for more gets this
MAX_BODY = 4 * 1024 * 1024               # bytes in one request body
MAX_HEADER_BYTES = 16 * 1024             # bytes of request headers
REQUEST_TIMEOUT = 30.0                   # s for a request's body; s a kept-alive connection may sit idle
MAX_CONNECTIONS = 256                    # requests in progress (held polls included); more get 503
HEAD_TIMEOUT = 5.0                       # s for a request head (a new connection's: TLS handshake included)
MAX_PENDING = 256                        # connections still sending a request head (or idle between requests)
MAX_PENDING_PER_ADDRESS = 64             # ... of them from one client address
PAIRING_TTL = 600                        # s a pairing code stays valid (max MAX_CODE_TTL)
ENROLLMENT_TTL = 3600                    # s an enrollment code stays valid
MAX_CODE_TTL = 7 * 24 * 3600
WORKER_OFFLINE_AFTER = 60.0              # s without a snapshot that lists a worker online
LEASE = 60.0                             # s an attempt lives without a heartbeat from its orchestrator
MAX_ATTEMPTS = 3                         # attempts of a job whose leases run out, before it fails
MAX_ASSIGN_AHEAD = 64                    # jobs a worker may be given beyond its free slots (--assign-ahead)
ASSIGN_AHEAD = 4                         # the default: 4-34 % more jobs/s of /bin/true than 0; 8 or 16 no more
LOG_CAP = 4 * 1024 * 1024                # bytes of a job's output kept (head and tail), unless the job says
MIN_LOG_CAP, MAX_LOG_CAP = 64 * 1024, 1024 ** 3
# s a source bundle is kept after its last job ended (or, never used, after its upload), and a job's
# artifacts after it ended: a week, so a change made on Friday can be reviewed and applied on Monday
# (specs/bundles.md §9). The reaper deletes them then.
BUNDLE_RETENTION = ARTIFACT_RETENTION = 7 * 24 * 3600.0
MAX_RETENTION = 3650 * 24 * 3600.0

ADMIN_TOKEN_FILE = "admin-token"         # in the state dir, mode 0600
ENDPOINT_FILE = "endpoint.json"          # in the state dir: where this pond listens
DB_FILE = "pond.db"


@dataclass(frozen=True)
class ServerSettings:
    host: str
    port: int
    state_dir: Path
    admin_token: str
    poll_hold: float = DEFAULT_POLL_HOLD
    max_body: int = MAX_BODY
    request_timeout: float = REQUEST_TIMEOUT
    max_connections: int = MAX_CONNECTIONS
    head_timeout: float = HEAD_TIMEOUT
    max_pending: int = MAX_PENDING
    max_pending_per_address: int = MAX_PENDING_PER_ADDRESS
    access_log: bool = False
    log_format: str = "text"             # or "json": one object a line (pond/logfmt.py)
    tls_cert: str = ""                   # both set: serve HTTPS
    tls_key: str = ""
    credential_key: bytes = field(default=b"", repr=False)     # encrypts credentials at rest
    allow_unsigned: bool = False         # accept results of workers without pinned keys
    lease: float = LEASE
    max_attempts: int = MAX_ATTEMPTS
    assign_ahead: int = ASSIGN_AHEAD     # jobs each worker may hold beyond its slots, to start when one frees
    log_cap: int = LOG_CAP
    require_sandbox: bool = False        # refuse jobs with sandbox profile none (specs/sandbox.md §5)
    database: str = field(default="", repr=False)     # postgresql://... (store_pg.py); "": DIR/pond.db
    database_pool: int = DATABASE_POOL   # connections to it (store_pg.py's pool)
    bundle_retention: float = BUNDLE_RETENTION
    artifact_retention: float = ARTIFACT_RETENTION

    @property
    def database_shown(self):
        """The database URL as logs may show it: no password."""
        from pond.store_pg import redact
        return redact(self.database)

    @property
    def scheme(self):
        return "https" if self.tls_cert else "http"

    @property
    def db_path(self):
        return self.state_dir / DB_FILE


@dataclass(frozen=True)
class ClientSettings:
    url: str
    token: str
    state_dir: Path
    timeout: float = 30.0
    ca_file: str = ""                    # CA to verify an https:// pond with; "" = the system trust store


def parse_bind(text):
    """'HOST:PORT' -> (host, port); raise ConfigError with an example otherwise."""
    host, sep, port = text.rpartition(":")
    if not sep or not host or not port.isdigit() or int(port) > 65535:
        raise ConfigError(f"--bind {text!r} is not HOST:PORT", "example: --bind 127.0.0.1:8001")
    return host.strip("[]"), int(port)


def is_loopback(host):
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def write_private(path, text):
    """Write a file that only its owner can read (0600), atomically."""
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(text)
    os.chmod(tmp, 0o600)
    os.replace(tmp, path)


def read_private(path):
    """Read a secret file, refusing one that others can read."""
    path = Path(path)
    try:
        mode = path.stat().st_mode & 0o077
    except FileNotFoundError:
        raise ConfigError(f"{path} does not exist", "check the path of the token file") from None
    if mode:
        raise ConfigError(f"{path} is readable by group or others (mode {oct(path.stat().st_mode & 0o777)})",
                          f"run: chmod 600 {path}")
    return path.read_text().strip()


def env_setting(env, name, default=None):
    """The environment setting `name`, or `default` when it is unset. One set but empty (or blank) is
    refused: it would silently mean the default, and a number could not be read from it."""
    value = env.get(name)
    if value is None:
        return default
    if not value.strip():
        raise ConfigError(f"{name} is set but empty", f"give {name} a value, or unset it: unset {name}")
    return value


def env_number(env, name, kind, default):
    """A numeric environment setting (float or int), else `default`; text that is not one is refused."""
    value = env_setting(env, name, default)
    try:
        return kind(value)
    except (TypeError, ValueError):
        raise ConfigError(f"{name}={str(value)[:40]!r} is not a {'whole ' if kind is int else ''}number",
                          f"give {name} a number, or unset it") from None


def server_settings(bind, state_dir, env, admin_token_file=None, poll_hold=None, access_log=False,
                    request_timeout=None, tls_cert=None, tls_key=None, insecure_no_tls=False,
                    credential_key_file=None, allow_unsigned=False, lease=None, max_attempts=None,
                    log_cap=None, require_sandbox=False, head_timeout=None, max_pending=None,
                    max_pending_per_address=None, database=None, log_format=None, bundle_retention=None,
                    artifact_retention=None, database_pool=None, assign_ahead=None):
    host, port = parse_bind(bind or env_setting(env, "POND_BIND", DEFAULT_BIND))
    state = Path(state_dir or env_setting(env, "POND_STATE_DIR", DEFAULT_STATE_DIR)).resolve()
    state.mkdir(parents=True, exist_ok=True)
    os.chmod(state, 0o700)
    token = _server_admin_token(host, state, env, admin_token_file)
    tls_cert, tls_key = _server_tls(host, tls_cert, tls_key, insecure_no_tls)
    hold = float(poll_hold) if poll_hold is not None else env_number(env, "POND_POLL_HOLD", float, DEFAULT_POLL_HOLD)
    if not 0 < hold <= MAX_POLL_HOLD:
        raise ConfigError(f"poll hold {hold} s is out of range", f"give a value in (0, {MAX_POLL_HOLD:g}]")
    lease = float(lease) if lease is not None else env_number(env, "POND_LEASE", float, LEASE)
    if not 2 <= lease <= 3600:
        raise ConfigError(f"lease {lease} s is out of range", "give a value from 2 to 3600 (default 60)")
    attempts = int(max_attempts) if max_attempts is not None else env_number(env, "POND_MAX_ATTEMPTS", int,
                                                                              MAX_ATTEMPTS)
    if not 1 <= attempts <= 100:
        raise ConfigError(f"max attempts {attempts} is out of range", "give a value from 1 to 100 (default 3)")
    ahead = int(assign_ahead) if assign_ahead is not None else env_number(env, "POND_ASSIGN_AHEAD", int, ASSIGN_AHEAD)
    if not 0 <= ahead <= MAX_ASSIGN_AHEAD:
        raise ConfigError(f"assign ahead {ahead} is out of range",
                          f"give 0 to {MAX_ASSIGN_AHEAD} jobs a worker may hold beyond its slots "
                          f"(default {ASSIGN_AHEAD})")
    cap = int(log_cap) if log_cap is not None else env_number(env, "POND_LOG_CAP", int, LOG_CAP)
    if not MIN_LOG_CAP <= cap <= MAX_LOG_CAP:
        raise ConfigError(f"log cap {cap} bytes is out of range", f"give {MIN_LOG_CAP} to {MAX_LOG_CAP} (default 4 MiB)")
    timeout = float(request_timeout if request_timeout is not None else REQUEST_TIMEOUT)
    if not 0 < timeout <= 600:
        raise ConfigError(f"request timeout {timeout} s is out of range", "give a value in (0, 600]")
    head_timeout = float(HEAD_TIMEOUT if head_timeout is None else head_timeout)
    if not 0 < head_timeout <= 600:
        raise ConfigError(f"head timeout {head_timeout} s is out of range", "give a value in (0, 600] (default 5)")
    pending = int(MAX_PENDING if max_pending is None else max_pending)
    per_address = int(min(pending, MAX_PENDING_PER_ADDRESS) if max_pending_per_address is None
                      else max_pending_per_address)
    if not 1 <= per_address <= pending <= 65536:
        raise ConfigError(f"max pending {pending} and per address {per_address} are out of range",
                          f"give 1 <= per address <= max pending <= 65536 (defaults {MAX_PENDING_PER_ADDRESS}, "
                          f"{MAX_PENDING})")
    pool = int(database_pool) if database_pool is not None else env_number(env, "POND_DATABASE_POOL", int,
                                                                            DATABASE_POOL)
    if not 1 <= pool <= MAX_DATABASE_POOL:
        raise ConfigError(f"database pool {pool} is out of range",
                          f"give 1 to {MAX_DATABASE_POOL} connections (default {DATABASE_POOL})")
    retention = {}
    for name, flag, default in (("bundle", bundle_retention, BUNDLE_RETENTION),
                                ("artifact", artifact_retention, ARTIFACT_RETENTION)):
        value = float(flag) if flag is not None else env_number(env, f"POND_{name.upper()}_RETENTION", float, default)
        if not 1 <= value <= MAX_RETENTION:
            raise ConfigError(f"{name} retention {value:g} s is out of range",
                              f"give --{name}-retention 1 to {MAX_RETENTION:.0f} seconds (default {default:.0f}: 7 days)")
        retention[name] = value
    log_format = log_format or env.get("POND_LOG_FORMAT") or "text"
    if log_format not in ("text", "json"):
        raise ConfigError(f"log format {log_format!r} is not text or json", "give --log-format text|json")
    return ServerSettings(host=host, port=port, state_dir=state, admin_token=token, log_format=log_format,
                          poll_hold=hold, access_log=access_log, request_timeout=timeout,
                          tls_cert=tls_cert, tls_key=tls_key,
                          credential_key=_credential_key(state, env, credential_key_file),
                          allow_unsigned=allow_unsigned or env_setting(env, "POND_ALLOW_UNSIGNED_RESULTS") == "1",
                          lease=lease, max_attempts=attempts, assign_ahead=ahead, log_cap=cap,
                          require_sandbox=require_sandbox or _env_flag(env, "POND_REQUIRE_SANDBOX"),
                          head_timeout=head_timeout, max_pending=pending, max_pending_per_address=per_address,
                          database=database_url(database, env), bundle_retention=retention["bundle"],
                          artifact_retention=retention["artifact"], database_pool=pool)


def database_url(flag, env, name="--database"):
    """The PostgreSQL URL from --database or POND_DATABASE_URL, checked; "" for SQLite in the state dir.

    A password in the flag is refused: `ps` shows every process's arguments to every user of the
    host. The environment is private to pond's user, and so are PGPASSWORD and a .pgpass file.
    """
    url = flag or env_setting(env, "POND_DATABASE_URL", "")
    if not url:
        return ""
    where = name if flag else "POND_DATABASE_URL"
    scheme, sep, rest = url.partition("://")
    if scheme not in ("postgresql", "postgres") or not sep:
        raise ConfigError(f"{where} must be a postgresql:// URL",
                          f"example: {name} postgresql://pond@db.example:5432/pond (password in PGPASSWORD)")
    try:
        from pond.store_pg import redact
    except ImportError:
        raise ConfigError(f"{where} needs the psycopg package, which is not installed",
                          "install it: pip install 'pond-swarm[postgres]'") from None
    if flag and redact(url) != url:
        raise ConfigError(f"{name} holds a password, which `ps` shows to every user of this host",
                          "put the password in PGPASSWORD or a .pgpass file (PGPASSFILE), or give the whole URL "
                          "in POND_DATABASE_URL")
    return url


def _env_flag(env, name):
    """A true/false environment setting; anything else is refused rather than guessed."""
    value = env_setting(env, name, "").strip().lower()
    if value not in ("", "true", "false", "1", "0"):
        raise ConfigError(f"{name}={env[name][:40]!r} is not true or false", f"set {name}=true or unset it")
    return value in ("true", "1")


def _credential_key(state, env, key_file):
    """The key credentials are encrypted under: the operator's file, else one pond keeps in its state dir."""
    from pond.credentials import KEY_FILE, load_key
    given = key_file or env_setting(env, "POND_CREDENTIAL_KEY_FILE")
    return load_key(Path(given), create=False) if given else load_key(state / KEY_FILE, create=True)


def _server_tls(host, cert, key, insecure_no_tls):
    """(cert, key) paths, checked by loading them; plain HTTP off loopback only when asked for explicitly."""
    if bool(cert) != bool(key):
        raise ConfigError("--tls-cert and --tls-key go together", "pass both: --tls-cert FILE --tls-key FILE")
    if cert:
        from pond.tls import server_context
        server_context(cert, key)          # fail at start-up, not at the first connection
        return str(Path(cert).resolve()), str(Path(key).resolve())
    if not is_loopback(host) and not insecure_no_tls:
        raise ConfigError(
            f"refusing to serve plain HTTP on {host}: tokens would cross the network in clear text",
            "pass --tls-cert FILE --tls-key FILE, or --insecure-no-tls on a trusted overlay network only",
        )
    return "", ""


def _server_admin_token(host, state, env, token_file):
    if token_file:
        return read_private(token_file)
    if env_setting(env, "POND_ADMIN_TOKEN"):
        return env["POND_ADMIN_TOKEN"]
    path = state / ADMIN_TOKEN_FILE
    if path.exists():
        return read_private(path)
    if not is_loopback(host):
        raise ConfigError(
            f"refusing to listen on {host} without an admin token",
            "pass --admin-token-file FILE (mode 0600) or set POND_ADMIN_TOKEN, or bind 127.0.0.1",
        )
    token = "pond_admin_" + secrets.token_urlsafe(32)
    write_private(path, token + "\n")
    return token


def client_settings(url, state_dir, token, env, timeout=30.0, ca_file=None):
    """Find pond and its admin token: flags, then POND_URL/POND_ADMIN_TOKEN, then the state dir."""
    state = Path(state_dir or env_setting(env, "POND_STATE_DIR", DEFAULT_STATE_DIR))
    url = url or env_setting(env, "POND_URL") or _endpoint_url(state)
    if not url:
        raise ConfigError(
            f"cannot find pond: no --pond, no POND_URL, and no {state / ENDPOINT_FILE}",
            "start one with `pond up`, or pass --pond URL (or --state-dir DIR of a running pond)",
        )
    token = token or env_setting(env, "POND_ADMIN_TOKEN") or _state_token(state)
    if not token:
        raise ConfigError(
            f"no admin token: no --token, no POND_ADMIN_TOKEN, and no {state / ADMIN_TOKEN_FILE}",
            "pass --token-file FILE, set POND_ADMIN_TOKEN, or point --state-dir at pond's state dir",
        )
    return ClientSettings(url=url.rstrip("/"), token=token, state_dir=state, timeout=timeout,
                          ca_file=ca_file or env_setting(env, "POND_CA_FILE", ""))


def _endpoint_url(state):
    try:
        return json.loads((state / ENDPOINT_FILE).read_text())["url"]
    except (OSError, ValueError, KeyError, TypeError):
        return None


def _state_token(state):
    path = state / ADMIN_TOKEN_FILE
    return read_private(path) if path.exists() else None

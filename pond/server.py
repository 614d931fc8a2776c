"""The HTTP adapter: the only module that touches http.server.

It owns the route table, caps header and body sizes, reads request heads on one thread
(HeadReader) so that a slow client holds no thread, caps requests in progress and
connections still sending a head, parses JSON in and writes JSON out in one buffered write with
TCP_NODELAY (the stock handler costs ~44 ms per kept-alive POST: Nagle against delayed
ACKs, see ../shared/reference/perf-baselines.md), and renders every PondError as
{"error": {"code", "message", "hint"}}. Anything else becomes a 500 without a
traceback, which is logged here and is always a bug.
"""

import collections
import json
import logging
import os
import re
import select
import selectors
import signal
import ssl
import socket
import sys
import threading
import time
import types
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, HTTPServer
from urllib.parse import parse_qsl, urlsplit

from pond import (PROTOCOL_VERSION, __version__, agents, artifacts, blobs, bundles, console, credentials, dispatch,
                  enrollment, health, jobs, logfmt, metrics, openapi, pairing, tokens)
from pond.errors import (BadRequest, ConfigError, HeadersTooLarge, MethodNotAllowed, NotFound, PayloadTooLarge, PondError,
                         StorageUnavailable, Unauthorized, Unavailable, Unhealthy, Forbidden)
from pond.metrics import Metrics
from pond.settings import ENDPOINT_FILE, MAX_HEADER_BYTES, WORKER_OFFLINE_AFTER, write_private
from pond.store import Store, open_store

log = logging.getLogger("pond")
REAPER_INTERVAL = 2.0
_ID = r"(?P<id>[A-Za-z0-9_-]{1,64})"
_NAME = r"(?P<id>[A-Za-z0-9][A-Za-z0-9._-]{0,63})"       # a credential name (wire.NAME_RE without spaces)


def healthz(pond, req):
    """200 while every loop works and pond.db can be written; else 503 naming what fails (protocol.md §9)."""
    ok, parts, failing = health.report(pond.loops, pond.store.failure)
    body = {"ok": ok, "version": __version__, "protocol_version": PROTOCOL_VERSION, **parts}
    if ok:
        return 200, body
    return 503, dict(body, **Unhealthy(failing, "see pond's log; a retrying loop or storage recovers by itself, "
                                                "a dead one means pond is stopping (its supervisor restarts it)").to_json())


# (method, path pattern, who may call, handler). "admin": the admin token;
# "orch": a binding token; None: open.
ROUTES = [
    ("GET", r"/healthz", None, healthz),
    ("GET", r"/metrics", None, metrics.render),
    ("GET", r"/v1/openapi\.json", None, openapi.serve),
    ("GET", r"/ui(?P<name>/[A-Za-z0-9._-]{0,64})?", None, console.static),     # files only; the page asks for the token
    ("POST", r"/v1/jobs", "admin", jobs.submit),
    ("GET", r"/v1/jobs", "admin", jobs.list_jobs),
    ("GET", rf"/v1/jobs/{_ID}", "admin", jobs.get),
    ("GET", rf"/v1/jobs/{_ID}/logs", "admin", jobs.logs),
    ("GET", rf"/v1/jobs/{_ID}/attestation", "admin", jobs.attestation),
    ("GET", rf"/v1/jobs/{_ID}/explain", "admin", jobs.explain),
    ("POST", r"/v1/jobs/explain", "admin", jobs.explain_spec),
    ("POST", rf"/v1/jobs/{_ID}/cancel", "admin", jobs.cancel),
    ("GET", rf"/v1/jobs/{_ID}/artifacts", "admin", artifacts.list_all),
    ("GET", rf"/v1/jobs/{_ID}/artifacts/(?P<name>[A-Za-z0-9._+@=/-]{{1,256}})", "admin", artifacts.get),
    ("POST", r"/v1/bundles", "admin", bundles.create),
    ("GET", rf"/v1/bundles/{_ID}", "admin", bundles.get),
    ("POST", rf"/v1/bundles/{_ID}/parts", "admin", bundles.put_part),
    ("POST", r"/v1/admin/pool/pairing-codes", "admin", pairing.mint_code),
    ("POST", r"/v1/admin/pool/enrollment-codes", "admin", enrollment.mint_code),
    ("GET", r"/v1/admin/pool/orchestrators", "admin", pairing.list_orchestrators),
    ("GET", r"/v1/admin/pool/workers", "admin", enrollment.list_workers),
    ("DELETE", rf"/v1/admin/pool/orchestrators/{_ID}", "admin", pairing.revoke),
    ("DELETE", rf"/v1/admin/pool/workers/{_ID}", "admin", enrollment.revoke),
    ("POST", rf"/v1/admin/pool/workers/{_ID}/evict", "admin", enrollment.evict),
    ("POST", r"/v1/admin/credentials", "admin", credentials.put),
    ("GET", r"/v1/admin/credentials", "admin", credentials.list_all),
    ("GET", rf"/v1/admin/credentials/{_NAME}", "admin", credentials.get),
    ("DELETE", rf"/v1/admin/credentials/{_NAME}", "admin", credentials.delete),
    ("GET", rf"/v1/jobs/{_ID}/usage", "admin", jobs.usage),
    ("GET", r"/v1/usage", "admin", agents.usage_summary),
    ("POST", r"/v1/admin/harnesses", "admin", agents.put_harness),
    ("GET", r"/v1/admin/harnesses", "admin", agents.list_entries),
    ("GET", rf"/v1/admin/harnesses/{_NAME}", "admin", agents.get_entry),
    ("DELETE", rf"/v1/admin/harnesses/{_NAME}", "admin", agents.delete_entry),
    ("POST", r"/v1/admin/models", "admin", agents.put_model),
    ("GET", r"/v1/admin/models", "admin", agents.list_entries),
    ("GET", rf"/v1/admin/models/{_NAME}", "admin", agents.get_entry),
    ("DELETE", rf"/v1/admin/models/{_NAME}", "admin", agents.delete_entry),
    ("POST", r"/v1/orch/pair", None, pairing.pair),
    ("GET", r"/v1/orch/whoami", "orch", pairing.whoami),
    ("POST", r"/v1/orch/poll", "orch", dispatch.poll),
    ("POST", r"/v1/orch/reports", "orch", dispatch.report_batch),
    ("POST", rf"/v1/orch/jobs/{_ID}/state", "orch", dispatch.report_state),
    ("POST", rf"/v1/orch/jobs/{_ID}/chunk", "orch", dispatch.report_chunk),
    ("POST", rf"/v1/orch/jobs/{_ID}/seal", "orch", dispatch.seal),
    ("POST", rf"/v1/orch/jobs/{_ID}/source", "orch", bundles.redeem),
    ("POST", rf"/v1/orch/jobs/{_ID}/source/read", "orch", bundles.read),
    ("POST", rf"/v1/orch/jobs/{_ID}/artifacts", "orch", artifacts.upload),
    ("POST", r"/v1/orch/heartbeat", "orch", dispatch.heartbeat),
    ("POST", rf"/v1/orch/workers/{_ID}/evict", "orch", enrollment.evict_from_orchestrator),
    ("POST", r"/v1/orch/workers/snapshot", "orch", enrollment.snapshot),
    ("POST", r"/v1/orch/enrollment/(?P<code>[A-Za-z0-9-]{1,32})/consumed", "orch", enrollment.consumed),
]
_COMPILED = [(m, re.compile(p + r"\Z"), who, fn) for m, p, who, fn in ROUTES]
# The query parameters a handler reads; any other is refused (400), on every route, so that a typo
# (?stat=queued) is never taken for "no filter". tests/test_openapi.py checks the document says the same.
QUERY = {jobs.list_jobs: ("state", "tag", "worker", "limit"), jobs.logs: ("after", "wait", "limit"),
         artifacts.get: ("offset",), agents.usage_summary: ("since", "until", "by")}


@dataclass
class Request:
    method: str
    path: str
    params: dict
    query: dict
    headers: object
    body: object
    principal: object = None
    alive: object = None        # () -> False once the client has hung up (held requests check it)


def peer_gone(sock):
    """Whether the client closed its end: a held request has nothing more to send, so a
    readable socket with no byte to peek at means it hung up (or died)."""
    try:
        readable, _, _ = select.select([sock], [], [], 0)
        return bool(readable) and _peek(sock) == b""
    except OSError:
        return True


def _peek(sock):
    """One byte of what the client sent, left unread. An SSLSocket cannot peek, so peek at
    the TCP socket under it: b"" still means the client hung up (an encrypted alert does not)."""
    if not isinstance(sock, ssl.SSLSocket):
        return sock.recv(1, socket.MSG_PEEK)
    raw = socket.socket(fileno=os.dup(sock.fileno()))
    try:
        return raw.recv(1, socket.MSG_PEEK | socket.MSG_DONTWAIT)
    except BlockingIOError:
        return b"?"
    finally:
        raw.close()


@dataclass
class Pond:
    """What every handler gets: the store, the settings, the two wake-up notifiers, the clock."""

    settings: object
    store: Store
    work: dispatch.Notifier = field(default_factory=dispatch.Notifier)   # polls wait on it
    logs: dispatch.Notifier = field(default_factory=dispatch.Notifier)   # log followers wait on it
    fits: dispatch.Fits = field(default_factory=dispatch.Fits)           # which queued groups each pool fits
    now: object = time.time
    log: logging.Logger = log
    requests: int = 0
    loops: list = field(default_factory=list)      # health.Loop: what /healthz reports
    polled: dict = field(default_factory=dict)     # binding id -> when a poll of it was last held
    started: float = field(default_factory=time.time)
    metrics: Metrics = field(default_factory=Metrics)    # what /metrics counts
    collected_at: float = None                     # monotonic s of the reaper's last blob collection


def _route_name(fn):
    """A handler as /metrics labels its route: jobs.submit, dispatch.poll; none before one was found."""
    return f"{fn.__module__.rpartition('.')[2]}.{fn.__name__}" if fn else "none"


def route(method, path):
    allowed = []
    for m, pattern, who, fn in _COMPILED:
        match = pattern.match(path)
        if match:
            if m == method:
                return who, fn, match.groupdict()
            allowed.append(m)
    if allowed:        # the path may carry a code or token (.../enrollment/{code}/...): never echoed
        raise MethodNotAllowed(f"{method} is not allowed on {_clean(path)[:100]}", "allowed: " + ", ".join(allowed))
    raise NotFound(f"no such endpoint: {_clean(path)[:100]}", "see specs/protocol.md for the endpoints")


def _clean(text):
    """Untrusted text made safe for one log line: no code or token (tokens.redact), printable, short."""
    return "".join(c if c.isprintable() else f"\\x{ord(c):02x}" for c in tokens.redact(text)[:200])


class Headers(dict):
    """Request headers by lower-cased name. A name seen twice keeps its first value."""

    def get(self, name, default=None):
        return super().get(name.lower(), default)


MAX_HEADERS = 100
FRAMING = ("content-length", "transfer-encoding")
MAX_REQUEST_LINE = 65536                 # http.server's limit: a longer request line is answered 414
# Bytes parse_request may read before it refuses a head without a blank line (414 or 431):
# the request line, the header limit, and the one line that crosses it.
HEAD_LIMIT = 2 * (MAX_REQUEST_LINE + 1) + MAX_HEADER_BYTES
LINGER = 0.05            # s a request's thread waits for the next request on its connection before handing it back


def parse_head(rfile, max_bytes):
    """Read header lines up to the blank line -> Headers, or (status, message) if they are refused.

    Replaces http.client.parse_headers, which builds an email.message.Message per
    request: most of a small request's parsing cost here.
    """
    headers, total = Headers(), 0
    while True:
        raw = rfile.readline(65537)
        if raw in (b"\r\n", b"\n", b""):
            return headers
        total += len(raw)
        if total > max_bytes or len(headers) >= MAX_HEADERS:
            return 431, f"request headers over {max_bytes} bytes or {MAX_HEADERS} lines"
        name, sep, value = raw.decode("iso-8859-1").partition(":")
        key = name.lower()
        if not sep or not name or name != name.strip() or " " in name:
            return 400, "malformed header line"
        if key in headers:
            if key in FRAMING:     # two lengths are how requests get smuggled past proxies
                return 400, f"duplicate {name} header"
            continue
        headers[key] = value.strip()


def head_complete(data, start=0):
    """Whether `data` holds a whole request head (up to its blank line), or enough of one for
    parse_request to refuse it: either way the parser will not wait for another byte.
    `start`: where new bytes begin, less two (a blank line may straddle the old end)."""
    return (len(data) >= HEAD_LIMIT or data.startswith((b"\n", b"\r\n"))
            or data.find(b"\n\n", start) >= 0 or data.find(b"\n\r\n", start) >= 0)


class Stream:
    """A connection's rfile and wfile in one. It reads first the bytes the head reader took
    off the socket, then the socket; it writes whole (sendall). What is left unread after an
    answer (`buf`) goes back to the head reader with a kept-alive connection."""

    def __init__(self, sock, data=b""):
        self.sock, self.buf = sock, bytearray(data)

    def _fill(self):
        part = self.sock.recv(65536)
        self.buf += part
        return part

    def _take(self, n):
        part = bytes(self.buf[:n])
        del self.buf[:n]
        return part

    def readline(self, limit):
        while (end := self.buf.find(b"\n", 0, limit)) < 0 and len(self.buf) < limit and self._fill():
            pass
        return self._take(end + 1 if end >= 0 else limit)

    def read1(self, n):
        if not self.buf:
            self._fill()
        return self._take(n)

    def linger(self, seconds):
        """Wait up to `seconds` for the next request after an answer -> the bytes of it here so
        far (b"": none yet); None if the client hung up."""
        if not head_complete(self.buf):
            self.sock.settimeout(seconds)
            try:
                if not self._fill():
                    return None
            except TimeoutError:
                pass
            except OSError:
                return None
        return bytes(self.buf)

    def write(self, data):
        self.sock.sendall(data)

    def flush(self):
        pass


class Handler(BaseHTTPRequestHandler):
    """Answers one request whose head the server's HeadReader has read already (`head`)."""

    protocol_version = "HTTP/1.1"
    server_version = f"pond/{__version__}"
    pond = None          # set by make_server

    def __init__(self, request, client_address, server, head=b""):
        self.head = head
        super().__init__(request, client_address, server)

    def setup(self):
        self.connection = self.request
        self.connection.settimeout(self.timeout)
        self.connection.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, True)
        self.rfile = self.wfile = Stream(self.connection, self.head)

    def handle(self):
        """One request; the server gives a kept-alive connection back to its head reader after."""
        self.close_connection = True
        self.handle_one_request()

    def finish(self):
        pass

    def parse_request(self):
        """Request line and headers, without http.server's email-based parser (see parse_head)."""
        self.command, self.request_version, self.close_connection = None, "HTTP/0.9", True
        self.requestline = str(self.raw_requestline, "iso-8859-1").rstrip("\r\n")
        words = self.requestline.split()
        if len(words) != 3 or not words[2].startswith("HTTP/"):
            self.send_error(400, "malformed request line", "send METHOD PATH HTTP/1.1")
            return False
        if words[2] not in ("HTTP/1.1", "HTTP/1.0"):
            self.send_error(400, f"{words[2][:20]} is not supported", "use HTTP/1.1")
            return False
        self.command, self.path, self.request_version = words
        head = parse_head(self.rfile, MAX_HEADER_BYTES)
        if isinstance(head, tuple):
            self.send_error(*head)
            return False
        self.headers = head
        connection = head.get("Connection", "").lower()
        self.close_connection = connection == "close" or (words[2] == "HTTP/1.0" and connection != "keep-alive")
        if head.get("Expect", "").lower() == "100-continue":
            self.wfile.write(b"HTTP/1.1 100 Continue\r\n\r\n")
        return True

    def do_GET(self):
        self._handle("GET")

    def do_POST(self):
        self._handle("POST")

    def do_PUT(self):
        self._handle("PUT")

    def do_DELETE(self):
        self._handle("DELETE")

    def do_PATCH(self):
        self._handle("PATCH")

    def do_HEAD(self):
        self._handle("HEAD")

    def _handle(self, method):
        pond, fn, started = self.pond, None, time.monotonic()
        pond.requests += 1
        try:
            fn, req = self._request(method)
            status, payload = fn(pond, req)
            if isinstance(payload, types.GeneratorType):
                pond.metrics.request(_route_name(fn), status, time.monotonic() - started)
                return self._stream(status, payload)
        except PondError as e:
            status, payload = e.status, e.to_json()
            if e.status in (413, 431):
                self.close_connection = True
        except Exception as e:
            status, payload = self._unexpected(e, method)
        pond.metrics.request(_route_name(fn), status, time.monotonic() - started)
        self._send(status, payload)

    def _unexpected(self, e, method):
        """A full or failing disk is 503 storage_unavailable, said once in the log; anything else is a bug."""
        why = health.storage_failure(e)
        if why is not None:
            err = StorageUnavailable(f"pond cannot store this now: {why}",
                                     f"free space under {self.pond.settings.state_dir}; pond recovers by itself: "
                                     "retry then")
            health.warn_once(err.message, "storage: %s (pond answers 503 storage_unavailable)", err.message)
            return err.status, err.to_json()
        log.exception("unhandled error in %s %s", method, _clean(self.path))
        return 500, PondError("internal error; pond logged the details",
                              "report it with pond's log around this time").to_json()

    def _request(self, method):
        """Route and authenticate on the head alone, then read the body: a client without a token
        cannot hold a thread with a slow body (specs/protocol.md §1.1). Until the body is read,
        an error answer closes the connection (the unread body would be taken for a request)."""
        length, keep = self._length(), self.close_connection
        self.close_connection = keep or bool(length)
        parts = urlsplit(self.path)
        who, fn, params = route(method, parts.path)
        principal = None
        if who == "admin":
            self._check_admin()
        elif who == "orch":
            principal = pairing.authenticate(self.pond, self.headers.get("Authorization"))
        query = dict(parse_qsl(parts.query, keep_blank_values=True))
        unknown = sorted(set(query) - set(QUERY.get(fn, ())))
        if unknown:         # before the body is read; a value may be a secret (?token=...): only the name is echoed
            allowed = QUERY.get(fn)
            raise BadRequest(f"unknown query parameter {_clean(unknown[0])[:40]!r}",
                             "allowed: " + ", ".join(allowed) if allowed else "this endpoint takes no query parameters")
        s = self.pond.settings                  # an open route's body is small: it gets the head's time
        raw = self._read_exactly(length, s.request_timeout if who else s.head_timeout) if length else None
        self.close_connection = keep
        body = None if raw is None else self._json(raw)
        req = Request(method, parts.path, params, query, self.headers, body,
                      alive=lambda: not peer_gone(self.connection))
        req.principal = principal
        return fn, req

    def _check_admin(self):
        header = self.headers.get("Authorization") or ""
        if not header.startswith("Bearer "):
            raise Unauthorized("missing admin token",
                               "send Authorization: Bearer <token>; on loopback it is in <state-dir>/admin-token")
        if not tokens.same(header[7:].strip(), self.pond.settings.admin_token):
            raise Forbidden("the admin token is not valid", "use the token in pond's <state-dir>/admin-token",
                            code="token_invalid")

    def _length(self):
        """The body's length as the head gives it (0: none), or refused before any of it is read."""
        if self.headers.get("Transfer-Encoding"):
            self.close_connection = True
            raise BadRequest("chunked request bodies are not accepted", "send a Content-Length")
        raw_length = self.headers.get("Content-Length")
        if raw_length is None:
            return 0
        if not (raw_length.isascii() and raw_length.isdigit()):
            self.close_connection = True
            raise BadRequest("Content-Length is not a number")
        length = int(raw_length)
        if length > self.pond.settings.max_body:
            raise PayloadTooLarge(f"request body of {length} bytes is over the {self.pond.settings.max_body} limit",
                                  "send output in chunks of at most 1 MiB")
        return length

    @staticmethod
    def _json(raw):
        try:
            value = json.loads(raw)
        except (ValueError, UnicodeDecodeError, RecursionError):
            raise BadRequest("request body is not valid JSON", "send a JSON object") from None
        if value is None:
            raise BadRequest("request body is JSON null", "send a JSON object, or no body")
        return value

    def _read_exactly(self, length, seconds):
        """Read the body within `seconds` in total, not per recv: a trickling client cannot hold a thread."""
        deadline = time.monotonic() + seconds
        parts, got = [], 0
        while got < length:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                self.close_connection = True
                raise BadRequest(f"request body not received within {seconds:g} s",
                                 "send the whole body promptly", code="request_timeout")
            self.connection.settimeout(remaining)
            try:
                part = self.rfile.read1(min(length - got, 65536))
            except TimeoutError:
                part = b""
            if not part:
                self.close_connection = True
                raise BadRequest("request body ended early", f"Content-Length said {length} bytes")
            parts.append(part)
            got += len(part)
        self.connection.settimeout(self.pond.settings.request_timeout)
        return b"".join(parts)

    def _send(self, status, payload):
        extra = ""
        if isinstance(payload, console.File):
            body, ctype, extra = payload.body, payload.content_type, console.HEADERS
        elif isinstance(payload, str):
            body, ctype = payload.encode(), "text/plain; version=0.0.4"
        else:
            body, ctype = json.dumps(payload, separators=(",", ":")).encode(), "application/json"
        # No answer is cached (the console's data is the admin's) or read as another type than it says.
        head = (f"HTTP/1.1 {status} {self.responses.get(status, ('',))[0]}\r\n"
                f"Content-Type: {ctype}\r\nContent-Length: {len(body)}\r\n{extra}"
                "Cache-Control: no-store\r\nX-Content-Type-Options: nosniff\r\n"
                f"Connection: {'close' if self.close_connection else 'keep-alive'}\r\n\r\n")
        if self.command == "HEAD":
            body = b""
        try:
            self.wfile.write(head.encode() + body)
        except OSError:
            self.close_connection = True
        if self.pond.settings.access_log:
            log.info("%s %s %s", self.command, _clean(self.path), status)

    def _stream(self, status, answers):
        """A chunked response of JSON lines, one chunk each, written as the generator yields them."""
        chunked = self.request_version == "HTTP/1.1"      # an HTTP/1.0 client reads until the close
        self.close_connection = self.close_connection or not chunked
        try:
            self.wfile.write(f"HTTP/1.1 {status} OK\r\nContent-Type: application/x-ndjson\r\n".encode() +
                             (b"Transfer-Encoding: chunked\r\nConnection: keep-alive\r\n\r\n" if chunked
                              else b"Connection: close\r\n\r\n"))
            for answer in answers:
                line = json.dumps(answer, separators=(",", ":")).encode() + b"\n"
                self.wfile.write(b"%x\r\n%s\r\n" % (len(line), line) if chunked else line)
            if chunked:
                self.wfile.write(b"0\r\n\r\n")
        except OSError:
            self.close_connection = True
            answers.close()
        except Exception as e:            # the answers failed midway: cut the stream, the client polls again
            self.close_connection = True
            if isinstance(e, StorageUnavailable):
                health.warn_once(e.message, "storage: %s (a streamed answer was cut short)", e.message)
            else:
                log.exception("streamed answer to %s %s failed; cut short", self.command, _clean(self.path))
        if self.pond.settings.access_log:
            log.info("%s %s %s (stream)", self.command, _clean(self.path), status)

    def send_error(self, code, message=None, explain=None):
        """Protocol errors found by http.server itself (bad request line, huge header) answer JSON too."""
        self.close_connection = True
        if code == 501:          # a method http.server has no do_X for
            code, message, explain = 405, f"{self.command} is not allowed", "see specs/protocol.md"
            err = PondError(message, explain, code="method_not_allowed")
        elif code == 431:
            err = HeadersTooLarge(message, "send fewer or shorter headers")
        else:
            err = PondError(message or "malformed request", explain or "", code="protocol")
        err.status = code
        if not hasattr(self, "command") or self.command is None:
            self.command = ""
        self._send(code, err.to_json())

    def log_message(self, fmt, *args):
        pass


@dataclass(eq=False)
class Waiting:
    """A connection in the head reader: its socket, what it has sent so far, when it is cut."""

    sock: object
    address: tuple
    deadline: float               # monotonic
    data: bytearray
    handshake: bool = False       # its TLS handshake is still to finish
    idle: bool = False            # kept alive, and not a byte of its next request yet
    scanned: int = 0              # head_complete has looked at data up to here
    events: int = selectors.EVENT_READ


def expendable(w):
    """Which waiting connection the caps close first: an idle kept-alive one, the longest idle."""
    return not w.idle, w.deadline


class HeadReader:
    """One thread that reads request heads, so that a connection takes a thread and one of
    max_connections only once it has sent a whole head (specs/protocol.md §1.1).

    A new connection must finish its TLS handshake and its first head within head_timeout.
    A kept-alive one comes back here after each answer and may wait request_timeout for its
    next request, whose head must then arrive within head_timeout of its first byte. At most
    max_pending connections wait here, max_pending_per_address of them from one address;
    admitting one more closes an idle kept-alive one first (the longest idle: its client just
    connects again), else the one whose deadline comes first (it had the least time left
    anyway). A slow client thus costs a socket and a buffer, never a thread, and cannot keep
    out a client that sends its head at once.
    """

    def __init__(self, settings, ready, close):
        self.s, self._ready, self._close = settings, ready, close   # ready(sock, address, head); close(sock)
        self._waiting = {}                              # socket -> Waiting; this thread's alone
        self._inbox = collections.deque()               # (sock, address, data) from other threads
        self._selector = selectors.DefaultSelector()
        self._wake, self._waker = socket.socketpair()
        for end in (self._wake, self._waker):
            end.setblocking(False)
        self._selector.register(self._wake, selectors.EVENT_READ)
        self._stopped = False
        self.timed_out = self.evicted = 0               # since the last log line
        self._thread = threading.Thread(target=self._run, name="heads", daemon=True)
        self._thread.start()

    def add(self, sock, address, data=None):
        """Wait for a head on `sock`: a new connection (data None), or a kept-alive one with the
        bytes read past its last request."""
        if self._stopped:
            self._close(sock)
            return
        self._inbox.append((sock, address, data))
        try:
            self._waker.send(b"\0")
        except OSError:
            pass                                        # full: a wake-up is pending already

    def close(self):
        self._stopped = True
        try:
            self._waker.send(b"\0")
        except OSError:
            pass                                        # a wake-up is pending already, or closed before
        self._thread.join(5)

    def _run(self):
        sweep = report = now = 0.0
        while not self._stopped:
            try:
                for key, _ in self._selector.select(0.5 if self._waiting else None):
                    if key.data is None:
                        self._wake.recv(4096)                   # woken up: the inbox has news
                    else:
                        self._read(key.data)
                while self._inbox and not self._stopped:
                    self._admit(*self._inbox.popleft())
                now = time.monotonic()
                if now >= sweep:
                    sweep = now + 0.5
                    for w in [w for w in self._waiting.values() if w.deadline <= now]:
                        self.timed_out += not w.idle
                        self._drop(w)
            except Exception:
                log.exception("reading request heads")     # a bug: a connection is lost, not the server
            if (self.timed_out or self.evicted) and now >= report:      # at most a line per 10 s
                log.info("closed %d connection(s) without a whole request head in %g s, %d over the caps",
                         self.timed_out, self.s.head_timeout, self.evicted)
                report, self.timed_out, self.evicted = now + 10, 0, 0
        for w in list(self._waiting.values()):
            self._drop(w)
        for sock, _, _ in self._inbox:
            self._close(sock)
        self._selector.close()
        self._wake.close()
        self._waker.close()

    def _admit(self, sock, address, data):
        now = time.monotonic()
        if data is None:
            w = Waiting(sock, address, now + self.s.head_timeout, bytearray(), isinstance(sock, ssl.SSLSocket))
        else:
            w = Waiting(sock, address, now + (self.s.head_timeout if data else self.s.request_timeout),
                        bytearray(data), idle=not data)
        same = [o for o in self._waiting.values() if o.address[0] == address[0]]
        if len(same) >= self.s.max_pending_per_address:
            self._drop(min(same, key=expendable), evicted=True)
        if len(self._waiting) >= self.s.max_pending:
            self._drop(min(self._waiting.values(), key=expendable), evicted=True)
        try:
            sock.setblocking(False)
            self._selector.register(sock, selectors.EVENT_READ, w)
        except (OSError, ValueError):
            self._close(sock)                           # closed meanwhile
            return
        self._waiting[sock] = w
        self._read(w)

    def _read(self, w):
        """Take what `w` has sent; hand it on once its head is in."""
        try:
            if w.handshake:
                w.sock.do_handshake()
                w.handshake = False
            while not head_complete(w.data, w.scanned):
                w.scanned = max(0, len(w.data) - 2)
                part = w.sock.recv(65536)
                if not part:
                    return self._drop(w)                # the client hung up
                if w.idle:
                    w.idle, w.deadline = False, min(w.deadline, time.monotonic() + self.s.head_timeout)
                w.data += part
        except (BlockingIOError, ssl.SSLWantReadError):
            return self._want(w, selectors.EVENT_READ)
        except ssl.SSLWantWriteError:
            return self._want(w, selectors.EVENT_WRITE)
        except OSError as e:
            if isinstance(e, ssl.SSLError):
                log.info("connection from %s dropped: %s", w.address[0], e)
            return self._drop(w)
        self._forget(w)
        self._ready(w.sock, w.address, bytes(w.data))

    def _want(self, w, events):
        if w.events != events:
            w.events = events
            self._selector.modify(w.sock, events, w)

    def _forget(self, w):
        del self._waiting[w.sock]
        self._selector.unregister(w.sock)

    def _drop(self, w, evicted=False):
        self._forget(w)
        self._close(w.sock)
        self.evicted += evicted


class Server(HTTPServer):
    """Accepts connections for the head reader; a thread per request whose head is in."""

    allow_reuse_address = True
    request_queue_size = 128

    def __init__(self, address, handler, settings):
        super().__init__(address, handler)
        self._slots = threading.BoundedSemaphore(settings.max_connections)
        self.heads = HeadReader(settings, self._head_arrived, self.shutdown_request)

    def process_request(self, request, client_address):
        self.heads.add(request, client_address)

    def _head_arrived(self, sock, address, head):
        if self._slots.acquire(blocking=False):
            try:
                threading.Thread(target=self._serve, args=(sock, address, head), daemon=True).start()
                return
            except RuntimeError:                        # no thread to be had: as if over the cap
                self._slots.release()
        body = json.dumps(Unavailable("too many requests in progress", "retry in a second").to_json()).encode()
        try:
            sock.send(b"HTTP/1.1 503 Service Unavailable\r\nContent-Type: application/json\r\nRetry-After: 1\r\n"
                      b"Connection: close\r\nContent-Length: %d\r\n\r\n" % len(body) + body)
        except OSError:
            pass
        self.shutdown_request(sock)

    def _serve(self, sock, address, head):
        """Answer the request whose head is in, and the next ones while each comes within LINGER
        of an answer (a busy client skips the head reader); then give a kept-alive connection
        back to the head reader."""
        rest = None
        try:
            while True:
                handler = self.RequestHandlerClass(sock, address, self, head)
                rest = None if handler.close_connection else handler.rfile.linger(LINGER)
                if rest is None or not head_complete(rest):
                    break
                head = rest
        except Exception:
            rest = None
            self.handle_error(sock, address)
        finally:
            self._slots.release()
        if rest is None:
            self.shutdown_request(sock)
        else:
            self.heads.add(sock, address, rest)

    def handle_error(self, request, client_address):
        """A client that hangs up or times out is its own problem: one log line, no traceback."""
        e = sys.exc_info()[1]
        if isinstance(e, (ssl.SSLError, ConnectionError, TimeoutError)):
            log.info("connection from %s dropped: %s", client_address[0], e)
            return
        super().handle_error(request, client_address)

    def server_close(self):
        super().server_close()
        self.heads.close()


def make_server(settings):
    store = open_store(settings)
    # pond was down: no orchestrator could renew a lease meanwhile. A full lease from now
    # lets them reconnect before any held job is given up on.
    store.extend_all_leases(time.time() + settings.lease)
    pond = Pond(settings=settings, store=store)
    store.subscribe(pond.work, pond.logs)       # PostgreSQL: wake-ups to and from the other replicas
    handler = type("PondHandler", (Handler,), {"pond": pond, "timeout": settings.request_timeout})
    try:
        server = Server((settings.host, settings.port), handler, settings)
    except OSError as e:
        store.close()
        raise ConfigError(f"cannot listen on {settings.host}:{settings.port}: {e.strerror}",
                          "pick a free port with --bind HOST:PORT (port 0: any free port)") from None
    if settings.tls_cert:
        from pond.tls import server_context
        # The head reader runs the handshake, so a slow or silent client never holds up
        # accept() or a thread; head_timeout bounds it with the first request head.
        server.socket = server_context(settings.tls_cert, settings.tls_key).wrap_socket(
            server.socket, server_side=True, do_handshake_on_connect=False)
    return pond, server


def _reap(pond):
    """One pass of background upkeep: workers whose orchestrator went silent go offline; leases
    and timeouts expire. While pond.db refuses writes, the pass retries (health.Loop)."""
    pond.store.probe()
    if not pond.store.reaper_turn():        # PostgreSQL: one replica reaps for all (an advisory lock)
        return
    if pond.store.expire_workers(pond.now() - WORKER_OFFLINE_AFTER):
        pond.work.notify()
    dispatch.expire_leases(pond)
    dispatch.expire_overdue(pond)
    blobs.collect_if_due(pond)               # bundles and artifacts past their retention


def serve(settings, ready=None):
    """Run pond until SIGINT/SIGTERM. Prints one 'pond listening on URL' line on stdout when ready."""
    logfmt.setup(settings.log_format)
    pond, server = make_server(settings)
    host, port = server.server_address[:2]
    url = f"{settings.scheme}://{host}:{port}"
    write_private(settings.state_dir / ENDPOINT_FILE, json.dumps({"url": url, "pid": os.getpid()}) + "\n")
    stop, died = threading.Event(), []

    def shutdown(signum, frame):
        threading.Thread(target=server.shutdown, daemon=True).start()

    reaper = health.Loop("reaper", lambda: _reap(pond), REAPER_INTERVAL, stop,
                         on_death=lambda: (died.append(1), shutdown(None, None)))
    pond.loops.append(reaper)
    reaper.thread.start()

    signal.signal(signal.SIGTERM, shutdown)
    signal.signal(signal.SIGINT, shutdown)
    database = f", database {settings.database_shown}" if settings.database else ""
    print(f"pond listening on {url} (state dir {settings.state_dir}{database})", flush=True)
    if ready:
        ready(url)
    try:
        server.serve_forever(poll_interval=0.5)
    finally:
        stop.set()
        server.server_close()
        reaper.thread.join(timeout=5)
        pond.store.close()
        log.info("stopped")
    return 1 if died else 0

"""The HTTP adapter: the only module that touches http.server.

It owns the route table, caps header and body sizes, bounds each socket read in time,
caps open connections, parses JSON in and writes JSON out in one buffered write with
TCP_NODELAY (the stock handler costs ~44 ms per kept-alive POST: Nagle against delayed
ACKs, see ../shared/reference/perf-baselines.md), and renders every PondError as
{"error": {"code", "message", "hint"}}. Anything else becomes a 500 without a
traceback, which is logged here and is always a bug.
"""

import json
import logging
import os
import re
import select
import signal
import ssl
import socket
import sys
import threading
import time
import types
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qsl, urlsplit

from pond import PROTOCOL_VERSION, __version__, credentials, dispatch, enrollment, health, jobs, pairing, tokens
from pond.errors import (BadRequest, ConfigError, HeadersTooLarge, MethodNotAllowed, NotFound, PayloadTooLarge, PondError,
                         StorageUnavailable, Unauthorized, Unavailable, Unhealthy, Forbidden)
from pond.settings import ENDPOINT_FILE, MAX_HEADER_BYTES, WORKER_OFFLINE_AFTER, write_private
from pond.store import Store

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


def metrics(pond, req):
    lines = ["# TYPE pond_jobs gauge"]
    for state, n in sorted(pond.store.job_counts().items()):
        lines.append(f'pond_jobs{{state="{state}"}} {n}')
    workers = pond.store.workers()
    lines += ["# TYPE pond_workers gauge",
              f'pond_workers{{online="true"}} {sum(1 for w in workers if w["online"])}',
              f'pond_workers{{online="false"}} {sum(1 for w in workers if not w["online"])}',
              "# TYPE pond_orchestrators gauge", f"pond_orchestrators {len(pond.store.bindings())}",
              "# TYPE pond_http_requests_total counter", f"pond_http_requests_total {pond.requests}"]
    return 200, "\n".join(lines) + "\n"


# (method, path pattern, who may call, handler). "admin": the admin token;
# "orch": a binding token; None: open.
ROUTES = [
    ("GET", r"/healthz", None, healthz),
    ("GET", r"/metrics", None, metrics),
    ("POST", r"/v1/jobs", "admin", jobs.submit),
    ("GET", r"/v1/jobs", "admin", jobs.list_jobs),
    ("GET", rf"/v1/jobs/{_ID}", "admin", jobs.get),
    ("GET", rf"/v1/jobs/{_ID}/logs", "admin", jobs.logs),
    ("GET", rf"/v1/jobs/{_ID}/attestation", "admin", jobs.attestation),
    ("POST", rf"/v1/jobs/{_ID}/cancel", "admin", jobs.cancel),
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
    ("POST", r"/v1/orch/pair", None, pairing.pair),
    ("GET", r"/v1/orch/whoami", "orch", pairing.whoami),
    ("POST", r"/v1/orch/poll", "orch", dispatch.poll),
    ("POST", r"/v1/orch/reports", "orch", dispatch.report_batch),
    ("POST", rf"/v1/orch/jobs/{_ID}/state", "orch", dispatch.report_state),
    ("POST", rf"/v1/orch/jobs/{_ID}/chunk", "orch", dispatch.report_chunk),
    ("POST", rf"/v1/orch/jobs/{_ID}/seal", "orch", dispatch.seal),
    ("POST", r"/v1/orch/heartbeat", "orch", dispatch.heartbeat),
    ("POST", rf"/v1/orch/workers/{_ID}/evict", "orch", enrollment.evict_from_orchestrator),
    ("POST", r"/v1/orch/workers/snapshot", "orch", enrollment.snapshot),
    ("POST", r"/v1/orch/enrollment/(?P<code>[A-Za-z0-9-]{1,32})/consumed", "orch", enrollment.consumed),
]
_COMPILED = [(m, re.compile(p + r"\Z"), who, fn) for m, p, who, fn in ROUTES]


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
    now: object = time.time
    log: logging.Logger = log
    requests: int = 0
    loops: list = field(default_factory=list)      # health.Loop: what /healthz reports
    polled: dict = field(default_factory=dict)     # binding id -> when a poll of it was last held
    started: float = field(default_factory=time.time)


def route(method, path):
    allowed = []
    for m, pattern, who, fn in _COMPILED:
        match = pattern.match(path)
        if match:
            if m == method:
                return who, fn, match.groupdict()
            allowed.append(m)
    if allowed:
        raise MethodNotAllowed(f"{method} is not allowed on {path[:100]}", "allowed: " + ", ".join(allowed))
    raise NotFound(f"no such endpoint: {path[:100]}", "see specs/protocol.md for the endpoints")


def _clean(text):
    """Untrusted text made safe for one log line: no code or token (tokens.redact), printable, short."""
    return "".join(c if c.isprintable() else f"\\x{ord(c):02x}" for c in tokens.redact(text)[:200])


class Headers(dict):
    """Request headers by lower-cased name. A name seen twice keeps its first value."""

    def get(self, name, default=None):
        return super().get(name.lower(), default)


MAX_HEADERS = 100
FRAMING = ("content-length", "transfer-encoding")


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


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server_version = f"pond/{__version__}"
    disable_nagle_algorithm = True
    pond = None          # set by make_server

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

    def handle_one_request(self):
        self.server.reading(self.connection, self.pond.settings.request_timeout)
        super().handle_one_request()

    def _handle(self, method):
        pond = self.pond
        pond.requests += 1
        try:
            fn, req = self._request(method)
            self.server.done_reading(self.connection)      # read in full; a held poll may now wait
            status, payload = fn(pond, req)
            if isinstance(payload, types.GeneratorType):
                return self._stream(status, payload)
        except PondError as e:
            status, payload = e.status, e.to_json()
            if e.status in (413, 431):
                self.close_connection = True
        except Exception as e:
            status, payload = self._unexpected(e, method)
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
        body = self._body()           # first, so an error answer never leaves a body unread on the connection
        parts = urlsplit(self.path)
        who, fn, params = route(method, parts.path)
        query = dict(parse_qsl(parts.query, keep_blank_values=True))
        req = Request(method, parts.path, params, query, self.headers, body,
                      alive=lambda: not peer_gone(self.connection))
        if who == "admin":
            self._check_admin()
        elif who == "orch":
            req.principal = pairing.authenticate(self.pond, self.headers.get("Authorization"))
        return fn, req

    def _check_admin(self):
        header = self.headers.get("Authorization") or ""
        if not header.startswith("Bearer "):
            raise Unauthorized("missing admin token",
                               "send Authorization: Bearer <token>; on loopback it is in <state-dir>/admin-token")
        if not tokens.same(header[7:].strip(), self.pond.settings.admin_token):
            raise Forbidden("the admin token is not valid", "use the token in pond's <state-dir>/admin-token",
                            code="token_invalid")

    def _body(self):
        if self.headers.get("Transfer-Encoding"):
            self.close_connection = True
            raise BadRequest("chunked request bodies are not accepted", "send a Content-Length")
        raw_length = self.headers.get("Content-Length")
        if raw_length is None:
            return None
        if not (raw_length.isascii() and raw_length.isdigit()):
            self.close_connection = True
            raise BadRequest("Content-Length is not a number")
        length = int(raw_length)
        if length > self.pond.settings.max_body:
            raise PayloadTooLarge(f"request body of {length} bytes is over the {self.pond.settings.max_body} limit",
                                  "send output in chunks of at most 1 MiB")
        if length == 0:
            return None
        raw = self._read_exactly(length)
        try:
            value = json.loads(raw)
        except (ValueError, UnicodeDecodeError, RecursionError):
            raise BadRequest("request body is not valid JSON", "send a JSON object") from None
        if value is None:
            raise BadRequest("request body is JSON null", "send a JSON object, or no body")
        return value

    def _read_exactly(self, length):
        """Read the body within request_timeout in total, not per recv: a trickling client cannot hold a thread."""
        deadline = time.monotonic() + self.pond.settings.request_timeout
        parts, got = [], 0
        while got < length:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                self.close_connection = True
                raise BadRequest(f"request body not received within {self.pond.settings.request_timeout:g} s",
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
        if isinstance(payload, str):
            body, ctype = payload.encode(), "text/plain; version=0.0.4"
        else:
            body, ctype = json.dumps(payload, separators=(",", ":")).encode(), "application/json"
        head = (f"HTTP/1.1 {status} {self.responses.get(status, ('',))[0]}\r\n"
                f"Content-Type: {ctype}\r\nContent-Length: {len(body)}\r\n"
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


class Server(ThreadingHTTPServer):
    daemon_threads = True
    allow_reuse_address = True
    request_queue_size = 128

    def __init__(self, address, handler, max_connections):
        super().__init__(address, handler)
        self._slots = threading.BoundedSemaphore(max_connections)
        self._reading = {}          # connection -> monotonic deadline for reading its current request
        self._reading_lock = threading.Lock()

    def reading(self, connection, seconds):
        """A request is being read on `connection`: it must be in within `seconds`."""
        with self._reading_lock:
            self._reading[connection] = time.monotonic() + seconds

    def done_reading(self, connection):
        with self._reading_lock:
            self._reading.pop(connection, None)

    def cut_slow_readers(self):
        """Close connections still sending a request past its deadline.

        A socket timeout bounds each recv, not the request: a client trickling one byte
        of its request line or headers at a time would hold a thread forever (slowloris).
        """
        now = time.monotonic()
        with self._reading_lock:
            late = [c for c, deadline in self._reading.items() if deadline < now]
            for connection in late:
                del self._reading[connection]
        for connection in late:
            try:
                connection.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
        return len(late)

    def handle_error(self, request, client_address):
        """A client that fails the TLS handshake or hangs up is its own problem: one log line, no traceback."""
        e = sys.exc_info()[1]
        if isinstance(e, (ssl.SSLError, ConnectionError, TimeoutError)):
            log.info("connection from %s dropped: %s", client_address[0], e)
            return
        super().handle_error(request, client_address)

    def process_request(self, request, client_address):
        if not self._slots.acquire(blocking=False):
            if isinstance(request, ssl.SSLSocket):      # no handshake yet: writing would block the accept loop
                self.shutdown_request(request)
                return
            try:
                body = json.dumps(Unavailable("too many open connections", "retry in a second").to_json()).encode()
                request.sendall(b"HTTP/1.1 503 Service Unavailable\r\nContent-Type: application/json\r\n"
                                b"Connection: close\r\nContent-Length: %d\r\n\r\n" % len(body) + body)
            except OSError:
                pass
            self.shutdown_request(request)
            return
        super().process_request(request, client_address)

    def process_request_thread(self, request, client_address):
        try:
            super().process_request_thread(request, client_address)
        finally:
            self.done_reading(request)
            self._slots.release()


def make_server(settings):
    store = Store(settings.db_path)
    # pond was down: no orchestrator could renew a lease meanwhile. A full lease from now
    # lets them reconnect before any held job is given up on.
    store.extend_all_leases(time.time() + settings.lease)
    pond = Pond(settings=settings, store=store)
    handler = type("PondHandler", (Handler,), {"pond": pond, "timeout": settings.request_timeout})
    try:
        server = Server((settings.host, settings.port), handler, settings.max_connections)
    except OSError as e:
        store.close()
        raise ConfigError(f"cannot listen on {settings.host}:{settings.port}: {e.strerror}",
                          "pick a free port with --bind HOST:PORT (port 0: any free port)") from None
    if settings.tls_cert:
        from pond.tls import server_context
        # The handshake runs in the connection's own thread (on its first read), so a slow
        # or silent client never holds up accept(); cut_slow_readers bounds it like a request.
        server.socket = server_context(settings.tls_cert, settings.tls_key).wrap_socket(
            server.socket, server_side=True, do_handshake_on_connect=False)
    return pond, server


def _reap(pond, server):
    """One pass of background upkeep: slow requests are cut; workers whose orchestrator went silent
    go offline; leases and timeouts expire. While pond.db refuses writes, the pass retries (health.Loop)."""
    if server.cut_slow_readers():
        log.info("closed connection(s) that did not send a request within %g s", pond.settings.request_timeout)
    pond.store.probe()
    if pond.store.expire_workers(pond.now() - WORKER_OFFLINE_AFTER):
        pond.work.notify()
    dispatch.expire_leases(pond)
    dispatch.expire_overdue(pond)


def serve(settings, ready=None):
    """Run pond until SIGINT/SIGTERM. Prints one 'pond listening on URL' line on stdout when ready."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s pond %(levelname)s %(message)s",
                        stream=sys.stderr)
    pond, server = make_server(settings)
    host, port = server.server_address[:2]
    url = f"{settings.scheme}://{host}:{port}"
    write_private(settings.state_dir / ENDPOINT_FILE, json.dumps({"url": url, "pid": os.getpid()}) + "\n")
    stop, died = threading.Event(), []

    def shutdown(signum, frame):
        threading.Thread(target=server.shutdown, daemon=True).start()

    reaper = health.Loop("reaper", lambda: _reap(pond, server), REAPER_INTERVAL, stop,
                         on_death=lambda: (died.append(1), shutdown(None, None)))
    pond.loops.append(reaper)
    reaper.thread.start()

    signal.signal(signal.SIGTERM, shutdown)
    signal.signal(signal.SIGINT, shutdown)
    print(f"pond listening on {url} (state dir {settings.state_dir})", flush=True)
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

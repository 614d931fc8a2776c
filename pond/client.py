"""A small keep-alive JSON client for pond's API, used by the CLI and `pond up`.

One http.client connection per thread, reused across calls (urllib opens a new TCP
connection per request). A stale kept-alive connection that the server closed is
retried once at once. With `retry_for`, a pond that is down or overloaded is waited for,
with capped exponential backoff and full jitter, saying what it waits for: a refused
connection or a 502/503 never reached pond's handlers, or was rolled back whole (503
storage_unavailable: a full disk), so any request may be sent again;
a request cut off on the way is sent again only when that is safe (a GET, or a submit with
an Idempotency-Key).

`url` may list several replicas of one pond, comma-separated (`--pond A,B`, POND_URL=A,B):
when the current one cannot be reached, the same request goes to the next at once, under
the same rules (a request cut off on the way only when it is safe to send again); an
answer, even a refusal, is final.
"""

import http.client
import json
import random
import socket
import ssl
import sys
import threading
import time
from urllib.parse import urlencode, urlsplit

from pond.errors import PondError
from pond.tokens import redact

EXIT_UNREACHABLE = 3
EXIT_REFUSED = 4
BACKOFF_START, BACKOFF_MAX = 0.2, 5.0      # s, doubling, full jitter


class ClientError(PondError):
    """An error answer from pond, or no answer at all; carries the CLI exit code."""

    def __init__(self, message, hint="", status=None, code="client", exit_code=EXIT_REFUSED):
        super().__init__(message, hint, code=code)
        self.status = status
        self.exit_code = exit_code


class Client:
    def __init__(self, url, token=None, timeout=30.0, ca_file=None, retry_for=0.0):
        self.urls = [u.strip().rstrip("/") for u in url.split(",")]
        for u in self.urls:
            parts = urlsplit(u)
            if parts.scheme not in ("http", "https") or not parts.hostname:
                raise ClientError(f"pond URL {u!r} is not http(s)://HOST:PORT",
                                  "example: --pond https://pond.lan:8001 (replicas: a comma-separated list)",
                                  exit_code=2)
        self.ca_file = ca_file
        self._use(0)
        self.token = token
        self.timeout = timeout
        self.retry_for = retry_for
        self._local = threading.local()

    def _use(self, index):
        """Talk to URL number `index` from now on (every thread)."""
        self.current, self.url = index, self.urls[index]
        parts = urlsplit(self.url)
        self.host, self.port = parts.hostname, parts.port or (443 if parts.scheme == "https" else 80)
        self._tls = None
        if parts.scheme == "https":
            from pond.tls import client_context
            self._tls = client_context(self.ca_file)

    def _next_url(self, e, safe):
        """After `e`, whether to send the request to the next replica now (and switch to it)."""
        cause = e.__cause__ or e.__context__
        if (len(self.urls) == 1 or e.code != "unreachable"
                or not (safe or isinstance(cause, ConnectionRefusedError) or getattr(e, "unsent", False))):
            return False
        failed = self.url
        self.close()
        self._use((self.current + 1) % len(self.urls))
        print(f"pond at {failed} is unreachable; trying {self.url}", file=sys.stderr, flush=True)
        return True

    def _conn(self, timeout):
        conn = getattr(self._local, "conn", None)
        if conn is None:
            if self._tls:
                conn = http.client.HTTPSConnection(self.host, self.port, timeout=timeout, context=self._tls)
            else:
                conn = http.client.HTTPConnection(self.host, self.port, timeout=timeout)
            conn.connect()
            conn.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            self._local.conn = conn
        conn.sock.settimeout(timeout)
        return conn

    def close(self):
        conn = getattr(self._local, "conn", None)
        if conn is not None:
            conn.close()
            self._local.conn = None

    def request(self, method, path, body=None, query=None, timeout=None, headers=None):
        deadline, delay = time.monotonic() + self.retry_for, BACKOFF_START
        safe = method == "GET" or "Idempotency-Key" in (headers or {})
        tried = 1
        while True:
            try:
                return self._request(method, path, body, query, timeout, headers)
            except ClientError as e:
                if tried < len(self.urls) and self._next_url(e, safe):
                    tried += 1
                    continue
                tried = 1
                wait = random.uniform(0, delay)
                if not self._retryable(e, safe) or time.monotonic() + wait > deadline:
                    raise
                print(f"waiting for pond at {self.url} ({e.message.rpartition(': ')[2] or e.code}); "
                      f"retrying in {wait:.1f} s", file=sys.stderr, flush=True)
                time.sleep(wait)
                delay = min(delay * 2, BACKOFF_MAX)

    @staticmethod
    def _retryable(e, safe):
        if e.status in (502, 503):
            return True
        cause = e.__cause__ or e.__context__
        if e.code != "unreachable" or isinstance(cause, ssl.SSLError):
            return False          # a certificate does not get better by waiting
        return isinstance(cause, ConnectionRefusedError) or safe

    def _request(self, method, path, body, query, timeout, headers):
        if query:
            path += "?" + urlencode({k: v for k, v in query.items() if v is not None})
        payload = None if body is None else json.dumps(body).encode()
        headers = {"Content-Type": "application/json", **(headers or {})}
        if self.token:
            headers["Authorization"] = f"Bearer {self.token}"
        for attempt in (1, 2):
            reused = getattr(self._local, "conn", None) is not None
            try:
                conn = self._conn(timeout or self.timeout)
                conn.request(method, path, body=payload, headers=headers)
                resp = conn.getresponse()
                raw = resp.read()
                break
            except (http.client.RemoteDisconnected, BrokenPipeError, ConnectionResetError) as e:
                self.close()
                if reused and attempt == 1:
                    continue
                raise self._unreachable(e) from e
            except (OSError, http.client.HTTPException) as e:
                unsent = getattr(self._local, "conn", None) is None     # the connection never opened
                self.close()
                error = self._unreachable(e)
                error.unsent = unsent
                raise error from e
        if resp.getheader("Connection", "").lower() == "close":
            self.close()
        return self._decode(resp.status, raw, method, path)

    def _unreachable(self, e):
        hint = "is it running? start a local pool with `pond up`, or pass --pond URL"
        if isinstance(e, ssl.SSLError):
            hint = ("pond's TLS certificate did not verify: pass --ca-file FILE (or set POND_CA_FILE) with the CA "
                    "that signed it" if isinstance(e, ssl.SSLCertVerificationError) else
                    "a TLS handshake failed: is the URL's scheme right (https:// only if pond has --tls-cert)? "
                    "for a private CA pass --ca-file FILE")
        return ClientError(f"cannot reach pond at {self.url}: {e.__class__.__name__}: {e}", hint,
                           code="unreachable", exit_code=EXIT_UNREACHABLE)

    def _decode(self, status, raw, method, path):
        try:
            data = json.loads(raw) if raw else {}
        except ValueError:
            data = None
        if 200 <= status < 300 and data is not None:
            return data
        err = (data or {}).get("error") if isinstance(data, dict) else None
        if isinstance(err, dict):
            raise ClientError(err.get("message", "error"), err.get("hint", ""), status, err.get("code", "error"))
        snippet = raw[:200].decode(errors="replace")
        raise ClientError(f"{method} {redact(path)} answered {status} with a non-JSON body: {snippet!r}",
                          "is --pond pointing at pond, not at something else?", status)

    def get(self, path, **query):
        return self.request("GET", path, query=query or None)

    def post(self, path, body=None, timeout=None, headers=None):
        return self.request("POST", path, body=body if body is not None else {}, timeout=timeout, headers=headers)

    def delete(self, path):
        return self.request("DELETE", path)

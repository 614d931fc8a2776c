"""The slow-client storm (issue 9, items 4 and 11). While 300 connections to pond and 300 to
the orchestrator each send one byte of a request head a second and never a token, whoever
sends whole requests is served at once: jobs submitted one after another start within
100 ms (p99), calls with a token on fresh connections are answered at the first attempt,
and the held poll and claims that were open before the storm are not cut.

The slow clients come from 127.0.0.1, like the pool's own processes and this test's calls
(the per-address cap must not shut out a well-behaved client that shares an address with
them), or from five other addresses (the cap on all waiting connections and the head
timeout do the work then).
"""

import base64
import heapq
import http.client
import json
import random
import selectors
import socket
import statistics
import sys
import threading
import time
from urllib.parse import urlsplit

import pytest

from conftest import SWARM, run

SLOW_PER_SERVER = 300
JOBS = 50
PICKUP_P99_MS = 100.0        # twice that on PostgreSQL: a pickup is ~2 x SQLite's there (bench/README.md, "Store")
JOB_DEADLINE = 60.0          # s one job may take from its first submit attempt (before the fix: 30 s and more)
STORM_DEADLINE = 150.0       # s for all the jobs: before the fix they would take half an hour
WARM_UP = 3.0                # s of storm before the first measurement: every slow client has connected
HEAD_TIMEOUT = 5.0           # s, the servers' default: the storm outlasts it, so its clients are cut and come back
# The start of a request head that never ends: each tick sends its next byte, then 'a's forever.
HEAD = b"POST /v1/jobs HTTP/1.1\r\nHost: storm\r\nContent-Type: application/json\r\nX-Slow: "


class Storm:
    """`n` slow clients per address, on one thread and one selector, from `sources` in turn.
    Each sends the next byte of its head every ~`interval` s and never ends it; one the server
    closes connects again at its next tick. A context manager: every socket is closed and the
    thread joined on exit."""

    def __init__(self, addresses, n, sources=("127.0.0.1",), interval=1.0):
        self.targets = [(a, sources[i % len(sources)]) for a in addresses for i in range(n)]
        self.interval = interval
        self.opened = self.closed_by_server = 0
        self.error = None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="slow-clients")

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join(10)
        assert not self._thread.is_alive(), "the slow-client thread did not stop"
        if self.error:                  # a storm that died would make any test pass
            raise self.error

    def _run(self):
        rng = random.Random(9)
        sel = selectors.DefaultSelector()
        conns = {}                  # target index -> [socket, bytes of the head sent]
        start = time.monotonic()
        due = [(rng.uniform(0, self.interval), i) for i in range(len(self.targets))]
        heapq.heapify(due)
        try:
            while not self._stop.is_set():
                now = time.monotonic() - start
                while due[0][0] <= now:
                    at, i = heapq.heappop(due)
                    self._tick(sel, conns, i)
                    heapq.heappush(due, (at + self.interval * rng.uniform(0.9, 1.1), i))
                for key, _ in sel.select(max(0.0, min(0.1, due[0][0] - now))):
                    try:
                        if key.fileobj.recv(4096):
                            continue            # an answer (a 503): the close follows
                    except BlockingIOError:
                        continue
                    except OSError:
                        pass
                    self._drop(sel, conns, key.data)
                    self.closed_by_server += 1
        except Exception as e:
            self.error = e
        finally:
            for sock, _ in conns.values():
                sock.close()
            sel.close()

    def _tick(self, sel, conns, i):
        if i not in conns:
            sock = socket.socket()
            conns[i] = [sock, 0]        # closed by _run's finally whatever happens next
            sock.setblocking(False)
            sock.bind((self.targets[i][1], 0))
            sock.connect_ex(self.targets[i][0])
            sel.register(sock, selectors.EVENT_READ, i)
            self.opened += 1
            return
        sock, sent = conns[i]
        try:
            sent += sock.send(HEAD[sent:sent + 1] or b"a")
            conns[i][1] = sent
        except BlockingIOError:
            pass                        # still connecting
        except OSError:
            self._drop(sel, conns, i)
            self.closed_by_server += 1

    @staticmethod
    def _drop(sel, conns, i):
        sock, _ = conns.pop(i)
        sel.unregister(sock)
        sock.close()


def address(url):
    parts = urlsplit(url)
    return parts.hostname, parts.port


def call(url, method, path, token=None, body=None, timeout=10.0):
    """One request on a fresh connection -> (status, decoded JSON). Raises OSError or
    HTTPException if the connection is refused or dropped."""
    conn = http.client.HTTPConnection(*address(url), timeout=timeout)
    head = {"Content-Type": "application/json"}
    if token:
        head["Authorization"] = f"Bearer {token}"
    try:
        conn.request(method, path, body=None if body is None else json.dumps(body).encode(), headers=head)
        resp = conn.getresponse()
        return resp.status, json.loads(resp.read() or b"null")
    finally:
        conn.close()


def patiently(url, method, path, token, body=None, deadline=None):
    """`call`, again after a 503 or a dropped connection until `deadline`, as a patient client
    would; -> (status, answer, attempts)."""
    attempts = 0
    while True:
        attempts += 1
        try:
            status, answer = call(url, method, path, token, body)
            if status != 503:
                return status, answer, attempts
        except (OSError, http.client.HTTPException):
            pass
        if time.monotonic() > deadline:
            raise AssertionError(f"{method} {path} not answered after {attempts} attempts")
        time.sleep(0.05)


def percentile(values, q):
    xs = sorted(values)
    pos = (len(xs) - 1) * q / 100
    lo = int(pos)
    return xs[lo] + (xs[min(lo + 1, len(xs) - 1)] - xs[lo]) * (pos - lo)


def run_job(pond, until=float("inf")):
    """Submit `date +%s.%N` (an echo of its own start time) and follow its output to the end ->
    (pickup s, state, error). Pickup is from the first submit attempt to the command starting."""
    t0 = time.time()
    deadline = min(until, time.monotonic() + JOB_DEADLINE)
    body = {"command": ["/usr/bin/date", "+%s.%N"], "sandbox": {"profile": "none"}}
    status, job, _ = patiently(pond.url, "POST", "/v1/jobs", pond.token, body, deadline)
    assert status == 201, job
    after, out = 0, b""
    while True:             # one held request at a time, not a poll every few ms
        _, page, _ = patiently(pond.url, "GET", f"/v1/jobs/{job['id']}/logs?after={after}&wait=5", pond.token,
                               deadline=deadline)
        out += b"".join(base64.b64decode(c["data"]) for c in page["chunks"] if c["stream"] == "stdout")
        after = page["next"]
        if page["complete"]:
            break
        assert time.monotonic() < deadline, f"job {job['id']} still {page['state']} after {JOB_DEADLINE} s"
    if page["state"] != "done":
        return None, page["state"], pond.job(job["id"])["error"]
    return float(out) - t0, "done", None


@pytest.mark.parametrize("sources", [("127.0.0.1",), tuple(f"127.0.0.{i}" for i in range(2, 7))],
                         ids=["from-our-address", "from-five-others"])
def test_jobs_start_promptly_during_a_slow_client_storm(pool, sources):
    pond = pool.pond()
    orch = pool.orchestrator(pond)
    pool.worker(pond, orch)
    run_job(pond)                                   # the pool is warm: the first job pays for imports
    pickups, states, failure = [], {}, None
    rng = random.Random(4)
    with Storm([address(pond.url), address(orch.url())], SLOW_PER_SERVER, sources) as storm:
        time.sleep(WARM_UP)
        began = time.monotonic()
        for _ in range(JOBS):
            time.sleep(rng.uniform(0.05, 0.15))     # not phase-locked to anything; the storm outlasts a head timeout
            try:
                pickup, state, error = run_job(pond, until=began + STORM_DEADLINE)
            except AssertionError as e:
                failure = str(e)
                break
            states[state] = states.get(state, 0) + 1
            if error:
                failure = f"a job ended {state}: {error}"
                break
            pickups.append(pickup * 1000)
        took = time.monotonic() - began
    p50, p99 = (statistics.median(pickups), percentile(pickups, 99)) if pickups else (float("nan"),) * 2
    print(f"\nslow-client storm from {len(sources)} address(es): {SLOW_PER_SERVER} slow connections each to pond "
          f"and the orchestrator "
          f"({storm.opened} opened, {storm.closed_by_server} closed by the servers); {len(pickups)} jobs in "
          f"{took:.1f} s: pickup p50 {p50:.1f} ms, p99 {p99:.1f} ms, max {max(pickups, default=0):.1f} ms; "
          f"states {states}")
    assert storm.opened >= 2 * SLOW_PER_SERVER
    assert failure is None, failure
    assert states == {"done": JOBS}, states
    bound = PICKUP_P99_MS * (2 if pond.database else 1)
    assert p99 < bound, f"pickup p99 {p99:.1f} ms during the storm (want < {bound:g} ms)"


def test_calls_with_a_token_and_held_connections_survive_a_slow_client_storm(pool):
    pond = pool.pond()
    orch = pool.orchestrator(pond)
    worker = pool.worker(pond, orch)
    slow = {"pond": [], "orchestrator": []}
    with Storm([address(pond.url), address(orch.url())], SLOW_PER_SERVER) as storm:
        time.sleep(WARM_UP)
        until = time.monotonic() + 2 * HEAD_TIMEOUT      # through two rounds of head timeouts
        while time.monotonic() < until:
            for name, url, path, token in (("pond", pond.url, "/v1/admin/pool/workers", pond.token),
                                           ("orchestrator", orch.url(), "/v1/pool/status", "pool-secret")):
                began = time.monotonic()
                status, answer, attempts = patiently(url, "GET", path, token, deadline=began + 30)
                slow[name].append(time.monotonic() - began)
                assert (status, attempts) == (200, 1), \
                    f"{name} {path}: {status} {str(answer)[:200]} after {attempts} attempts"
            time.sleep(0.2)
        pickup, state, error = run_job(pond)    # the worker's claim, held since before the storm, still takes work
    print(f"\nslow-client storm: {storm.opened} connections opened, {storm.closed_by_server} closed by the "
          f"servers; calls with a token on fresh connections, max ms: pond {max(slow['pond']) * 1000:.1f}, "
          f"orchestrator {max(slow['orchestrator']) * 1000:.1f}; a job's pickup {(pickup or 0) * 1000:.1f} ms")
    assert state == "done", error
    assert max(slow["pond"] + slow["orchestrator"]) < 2.0
    # The storm's own connections were closed by the servers, not left to hold anything.
    assert storm.closed_by_server >= 2 * SLOW_PER_SERVER
    # A cut hold would show as a reconnect in the log of the side that held it open.
    assert "waiting for pond" not in orch.stderr()
    assert "waiting for the orchestrator" not in worker.stderr()


# -- the rules behind it, on each server, with small numbers -----------------------------------

@pytest.fixture(params=["pond", "orchestrator"])
def server(request, pool):
    """-> (url, token) of a pond or an orchestrator with a 1 s head timeout, a 3 s idle
    timeout and caps of 6 waiting connections, 3 per address."""
    flags = ("--head-timeout", "1", "--request-timeout", "3", "--max-pending", "6", "--max-pending-per-address", "3")
    if request.param == "pond":
        pond = pool.pond(extra=flags)
        return pond.url, pond.token
    return pool.orchestrator(pool.pond(), extra=flags).url(), "pool-secret"


def closed_within(sock, seconds):
    """Seconds until the server closed `sock`, or None if it is still open after `seconds`."""
    start = time.monotonic()
    sock.settimeout(seconds)
    try:
        while sock.recv(4096):
            pass
    except TimeoutError:
        return None
    except OSError:
        pass
    return time.monotonic() - start


def connect(url, source="127.0.0.1"):
    sock = socket.create_connection(address(url), timeout=5, source_address=(source, 0))
    time.sleep(0.1)                     # let the server take it before the next one
    return sock


def test_a_kept_alive_connection_may_idle_but_not_trickle(server):
    url, token = server
    with connect(url) as sock:
        sock.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
        assert sock.recv(4096).startswith(b"HTTP/1.1 200")
        assert closed_within(sock, 2.0) is None          # idle past the head timeout: still open
        took = closed_within(sock, 3.0)
        assert took is not None and took < 2.0          # closed at the 3 s idle timeout
    with connect(url) as sock:
        sock.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
        assert sock.recv(4096).startswith(b"HTTP/1.1 200")
        sock.sendall(b"GET /heal")                       # a next head begun: the head timeout counts
        took = closed_within(sock, 3.0)
        assert took is not None and took < 2.0
    assert call(url, "GET", "/healthz")[0] == 200


def test_the_waiting_caps_close_the_connection_whose_deadline_comes_first(server):
    url, token = server
    socks = {}
    try:
        for name in ("a1", "a2", "a3", "b1", "b2", "b3"):       # 6 waiting: both caps reached
            socks[name] = connect(url, "127.0.0.1" if name[0] == "a" else "127.0.0.2")
        socks["a4"] = connect(url, "127.0.0.1")                 # over 3 from 127.0.0.1: a1 goes, not b1
        assert closed_within(socks["a1"], 0.5) is not None
        assert closed_within(socks["b1"], 0.1) is None
        socks["c1"] = connect(url, "127.0.0.3")                 # over 6 in all: the oldest, a2, goes
        assert closed_within(socks["a2"], 0.5) is not None
        assert all(closed_within(socks[n], 0.05) is None for n in ("a3", "a4", "b1", "b2", "b3", "c1"))
        socks["c1"].sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        assert socks["c1"].recv(4096).startswith(b"HTTP/1.1 200")
    finally:
        for sock in socks.values():
            sock.close()


@pytest.mark.parametrize("flags", [("--head-timeout", "0"), ("--max-pending", "0"),
                                   ("--max-pending-per-address", "0"),
                                   ("--max-pending", "8", "--max-pending-per-address", "9")])
def test_bounds_that_would_shut_out_everyone_are_refused_at_start(tmp_path, flags):
    """A zero never means "no limit" or "the default": both servers refuse to start (exit 2)."""
    pond = run([sys.executable, "-m", "pond", "serve", "--state-dir", str(tmp_path / "p"), "--bind", "127.0.0.1:0",
                *flags], timeout=30)
    serve = run([sys.executable, SWARM, "serve", "--state-dir", str(tmp_path / "s"), "--bind", "127.0.0.1:0",
                 "--token", "x", *flags], timeout=30)
    for name, done in (("pond", pond), ("swarm.py serve", serve)):
        assert done.returncode == 2, f"{name}: exit {done.returncode}: {done.stderr[-400:]}"
        assert "out of range" in done.stderr, done.stderr

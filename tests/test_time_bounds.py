"""Every request is bounded in time, not only each recv: a client that trickles its request
head a byte at a time is cut off (--head-timeout), while held polls and claims (already read
in full) are not cut by the request timeout."""

import socket
import time
from urllib.parse import urlsplit

from conftest import JOB_PY, wait_for

TIMEOUT = 2       # --head-timeout or --request-timeout for these servers; checked every 0.5 s


def trickle_until_closed(url, limit=15.0):
    """Send a request line and then one header byte every 0.3 s; -> seconds until the server hung up."""
    parts = urlsplit(url)
    start = time.monotonic()
    with socket.create_connection((parts.hostname, parts.port), timeout=limit) as sock:
        sock.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\nX-Slow: ")
        sock.settimeout(0.3)
        while time.monotonic() - start < limit:
            try:
                sock.sendall(b"a")
                if sock.recv(1) == b"":
                    return time.monotonic() - start
            except TimeoutError:
                continue
            except OSError:
                return time.monotonic() - start
    raise AssertionError(f"the server still read a trickled request after {limit} s")


def test_pond_cuts_a_request_that_trickles_in(pool):
    pond = pool.pond(extra=("--head-timeout", str(TIMEOUT)))
    took = trickle_until_closed(pond.url)
    assert TIMEOUT <= took < TIMEOUT + 4, took
    assert pond.client.get("/healthz")["ok"]


def test_the_orchestrator_cuts_a_request_that_trickles_in(pool):
    pond = pool.pond()
    orch = pool.orchestrator(pond, extra=("--head-timeout", str(TIMEOUT)))
    took = trickle_until_closed(orch.url())
    assert TIMEOUT <= took < TIMEOUT + 4, took


def test_held_polls_and_claims_outlive_the_request_timeout(pool):
    """Holds of 5 s on both hops with 2 s request timeouts: a job submitted after the holds
    began still starts at once, because the held requests were not cut."""
    pond = pool.pond(poll_hold=5, extra=("--request-timeout", str(TIMEOUT)))
    orch = pool.orchestrator(pond, extra=("--request-timeout", str(TIMEOUT)))
    worker = pool.worker(pond, orch)
    time.sleep(TIMEOUT + 2.5)        # deliberately past the request timeout and a reaper pass, inside the holds
    job = pond.submit([JOB_PY, "-c", "print('still connected')"])
    done = pond.wait_job(job["id"], timeout=10)
    assert done["state"] == "done"
    assert wait_for(lambda: pond.output(job["id"])["stdout"], 5, what="output") == b"still connected\n"
    # A cut hold would show as a reconnect in the logs of the side that held it open.
    assert "waiting for pond" not in orch.stderr()
    assert "waiting for the orchestrator" not in worker.stderr()

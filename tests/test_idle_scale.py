"""1,000 workers on one orchestrator (issue 9, item 8): an idle worker sends no heartbeat
(specs/protocol.md §7.5). It has nothing to lose, and its held claim shows it connected; 1,000
idle workers beating every 4 s cost the orchestrator a quarter of a core (bench/workers.py). What
the heartbeat guarantees still holds: a worker given a job must beat, or the job runs elsewhere
within the grace, and an idle worker that dies is offline within seconds (its claim's connection
closed). Real processes; pond's lease stays 60 s, so only the orchestrator can move a job this soon."""

import os
import signal
import socket
import time

from conftest import JOB_PY, wait_for
from test_slow_clients import address, closed_within, connect, server  # noqa: F401  (server: a fixture)
from test_worker_loss import lost_events


def online(pond, worker_id):
    return any(w["id"] == worker_id and w["online"] for w in pond.client.get("/v1/admin/pool/workers")["workers"])


def given_while_stopped(pool, pond, orch, stopped, tag, timeout=20):
    """A job for `tag` given to `stopped` (a worker the caller stopped with SIGSTOP), then another
    worker with `tag` started: -> (the job once it ended, that worker, seconds from given to ended)."""
    job = pond.submit([JOB_PY, "-c", "print('ran')"], tags=[tag])
    wait_for(lambda: pond.job(job["id"])["worker"] == stopped.worker_id, 10, what="the job given to the stopped worker")
    given = time.monotonic()
    other = pool.worker(pond, orch, tags=tag)
    return pond.wait_job(job["id"], timeout=timeout), other, time.monotonic() - given


def test_an_idle_worker_stopped_past_the_grace_is_not_lost_until_it_is_given_a_job(pool):
    pond = pool.pond(extra=("--assign-ahead", "0"))        # the job is not asked back for the other worker
    orch = pool.orchestrator(pond, extra=("--worker-lost-after", "3"))      # a busy worker beats every 1.2 s
    idle = pool.worker(pond, orch, tags="lane:a")
    wait_for(lambda: online(pond, idle.worker_id), 10, what="the worker online")
    os.kill(idle.proc.pid, signal.SIGSTOP)              # alive, its held claim open, silent
    try:
        time.sleep(6)                                   # twice the grace
        assert "lost" not in orch.stderr(), orch.stderr()
        assert online(pond, idle.worker_id)
        # Given a job, it has 3 s to beat: it cannot, so the job runs on another worker.
        done, other, took = given_while_stopped(pool, pond, orch, idle, "lane:a")
    finally:
        os.kill(idle.proc.pid, signal.SIGCONT)
    print(f"\njob given to a stopped idle worker (grace 3 s) to done on another: {took:.1f} s")
    assert done["state"] == "done" and done["worker"] == other.worker_id, done
    assert took < 10, took
    event = lost_events(done)[0]
    assert event["worker"] == idle.worker_id and event["attempt"] == 1, done["events"]
    assert f"worker {idle.worker_id} lost (no heartbeat for" in orch.stderr()


def test_an_idle_worker_killed_is_offline_within_seconds(pool):
    pond = pool.pond()
    orch = pool.orchestrator(pond)                      # the default grace, 10 s
    idle = pool.worker(pond, orch)
    wait_for(lambda: online(pond, idle.worker_id), 10, what="the worker online")
    time.sleep(1)
    killed = time.monotonic()
    idle.kill()                                         # kill -9: its held claim's connection closes
    wait_for(lambda: not online(pond, idle.worker_id), 10, interval=0.1, what="the killed worker offline")
    took = time.monotonic() - killed
    print(f"\nkill -9 of an idle worker to offline in pond: {took:.1f} s")
    assert took < 8, took                               # not WORKER_GRACE (15 s) after its claim ended
    assert f"worker {idle.worker_id} lost (its connection closed" in orch.stderr()


# -- the head reader's caps with many workers behind one address (issue 9, item 8) -------------


def test_an_idle_kept_alive_connection_is_closed_before_one_still_sending_its_head(server):
    """Over a cap, the head reader closes an idle kept-alive connection (its client just connects
    again) before one whose head is under way: 1,000 workers behind one NAT keep many idle."""
    url, token = server                                 # caps: 6 waiting, 3 per address
    socks = {}
    try:
        for name in ("idle1", "idle2", "idle3"):
            socks[name] = connect(url)
            socks[name].sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
            assert socks[name].recv(4096).startswith(b"HTTP/1.1 200")
        socks["slow"] = connect(url)                    # over 3 from 127.0.0.1: idle1 goes
        socks["slow"].sendall(b"GET /healthz HTTP/1.1\r\n")      # half a head (a TLS handshake on a slow link)
        socks["new"] = connect(url)                     # over again: idle2 goes, not the slow one
        assert closed_within(socks["slow"], 0.2) is None
        socks["slow"].sendall(b"Host: x\r\nConnection: close\r\n\r\n")
        assert socks["slow"].recv(4096).startswith(b"HTTP/1.1 200")
        assert [closed_within(socks[n], 0.2) is not None for n in ("idle1", "idle2", "idle3")] == [True, True, False]
    finally:
        for sock in socks.values():
            sock.close()


def test_serve_s_waiting_caps_grow_with_its_enrolled_workers(pool):
    """Without --max-pending flags, each enrolled worker adds 3 to both caps: 68 connections from one
    address, idle between requests, stay open on an orchestrator with 3 workers (64 + 9 per address,
    the workers' own idle ones included)."""
    pond = pool.pond()
    orch = pool.orchestrator(pond)
    for _ in range(3):
        pool.worker(pond, orch)
    socks = []
    try:
        for _ in range(68):
            sock = socket.create_connection(address(orch.url()), timeout=5)
            socks.append(sock)
            sock.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
            assert sock.recv(4096).startswith(b"HTTP/1.1 200")
        time.sleep(0.3)
        assert sum(closed_within(sock, 0.01) is not None for sock in socks) == 0
    finally:
        for sock in socks:
            sock.close()

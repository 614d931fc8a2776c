"""Several pond replicas on one PostgreSQL database (issue 13): what one does, the others see at once.

Each test starts its own ponds on a fresh database of the session's private server
(conftest.postgres); they share an admin token and a credential key (Pool.replica).
"""

import statistics
import threading
import time


from conftest import JOB_PY, free_port, wait_for

SUBMIT = {"command": [JOB_PY, "-c", "pass"], "sandbox": {"profile": "none"}}


def bare(pond, slots=1):
    """The token of an orchestrator the test speaks for, paired through `pond`, with one unpinned worker."""
    token = pond.bare_orchestrator()
    binding = pond.api("GET", "/v1/orch/whoami", token=token)[1]["binding_id"]
    (w,) = [w for w in pond.client.get("/v1/admin/pool/workers")["workers"] if w["orchestrator"] == binding]
    status, _ = pond.api("POST", "/v1/orch/workers/snapshot", {"workers": [
        {"id": w["id"], "online": True, "slots": slots, "capabilities": ["sandbox.process"]}]}, token=token)
    assert status == 200
    return token


def test_a_job_submitted_to_one_replica_is_run_by_a_pool_paired_with_another(pg_pool):
    a = pg_pool.pond()
    b = pg_pool.replica(a)
    orch = pg_pool.orchestrator(b)
    pg_pool.worker(b, orch)
    job = a.submit([JOB_PY, "-c", "print('ran')"])
    done = a.wait_job(job["id"], timeout=30)
    assert done["state"] == "done" and done["exit_code"] == 0, done
    assert b.job(job["id"])["state"] == "done" and a.output(job["id"])["stdout"] == b"ran\n"
    # One pool, seen alike through either replica.
    assert a.client.get("/v1/admin/pool/workers") == b.client.get("/v1/admin/pool/workers")


def test_a_poll_held_on_one_replica_wakes_within_milliseconds_of_a_submit_to_another(pg_pool):
    """Without NOTIFY the held poll would find the job only at its next look, up to
    dispatch.LIVENESS_CHECK (2 s) later."""
    a = pg_pool.pond(extra=("--allow-unsigned-results",))
    b = pg_pool.replica(a, poll_hold=20, extra=("--allow-unsigned-results",))
    delays = []
    for _ in range(5):
        token = bare(b)             # a fresh binding with a free slot each round
        answer = {}

        def held():
            answer["status"], answer["body"] = b.api("POST", "/v1/orch/poll", {"wait": 15}, token=token)
            answer["at"] = time.monotonic()

        poll = threading.Thread(target=held)
        poll.start()
        time.sleep(0.5)             # the poll is held: no job yet
        assert not answer
        job = a.client.post("/v1/jobs", SUBMIT)
        submitted = time.monotonic()
        poll.join(15)
        assert answer["status"] == 200 and [j["job_id"] for j in answer["body"]["jobs"]] == [job["id"]], answer
        delays.append(answer["at"] - submitted)
    print(f"held poll on B woken by a submit on A: median {statistics.median(delays) * 1000:.0f} ms, "
          f"max {max(delays) * 1000:.0f} ms")
    assert max(delays) < 0.5, delays


def test_claims_on_two_replicas_never_assign_a_job_twice(pg_pool):
    a = pg_pool.pond(extra=("--allow-unsigned-results",))
    b = pg_pool.replica(a, extra=("--allow-unsigned-results",))
    tokens = [(a, bare(a, slots=200)), (b, bare(b, slots=200))]
    got, start = {a: [], b: []}, threading.Barrier(3)

    def take(pond, token):
        start.wait(10)
        deadline = time.monotonic() + 30
        while sum(len(v) for v in got.values()) < 300 and time.monotonic() < deadline:
            status, body = pond.api("POST", "/v1/orch/poll", {"wait": 1}, token=token)
            assert status == 200, body
            got[pond] += [j["job_id"] for j in body["jobs"]]

    threads = [threading.Thread(target=take, args=pair) for pair in tokens]
    for t in threads:
        t.start()
    start.wait(10)
    ids = []
    for _ in range(3):              # three batches of 100, while both replicas claim
        ids += [j["id"] for j in a.client.post("/v1/jobs", [SUBMIT] * 100)["jobs"]]
    for t in threads:
        t.join(40)
    taken = got[a] + got[b]
    assert len(taken) == len(set(taken)) and sorted(taken) == sorted(ids), (len(taken), len(set(taken)))
    assert got[a] and got[b], "both replicas claimed"
    jobs = {j["id"]: j for j in a.client.get("/v1/jobs", limit=1000)["jobs"]}
    assert all(jobs[i]["state"] == "assigned" and jobs[i]["attempt"] == 1 for i in ids)


def test_an_expired_lease_is_reaped_once_and_the_reaper_moves_when_its_replica_dies(pg_pool):
    a = pg_pool.pond(extra=("--lease", "2", "--allow-unsigned-results"))
    b = pg_pool.replica(a, extra=("--lease", "2", "--allow-unsigned-results"))
    token = bare(b)                 # its binding token works on either replica
    job = a.submit(["sleep", "60"])

    def claimed(pond, attempt):
        status, body = pond.api("POST", "/v1/orch/poll", {"wait": 5}, token=token)
        assert status == 200 and [(j["job_id"], j["attempt"]) for j in body["jobs"]] == [(job["id"], attempt)], body

    def expired(pond):
        return [e["attempt"] for e in pond.job(job["id"])["events"] if e["event"] == "lease_expired"]

    claimed(b, 1)                   # and never a heartbeat: the lease runs out after 2 s
    wait_for(lambda: expired(a), 20, what="the first lease to expire")
    time.sleep(4)                   # two more passes of each replica's reaper
    assert expired(a) == [1]
    said = [p for p in (a, b) if "lease expired on attempt 1" in p.proc.stderr()]
    assert len(said) == 1, said     # one replica reaped it
    # The reaper's replica dies; the other takes the advisory lock and reaps the next attempt.
    other = b if said == [a] else a
    said[0].proc.kill()
    claimed(other, 2)
    wait_for(lambda: expired(other) == [1, 2], 20, what="the second lease to expire, reaped by the survivor")
    assert "lease expired on attempt 2" in other.proc.stderr()


def test_a_worker_evicted_through_one_replica_gets_no_job_from_another(pg_pool):
    """Each replica caches its pools' worker rows: a change on another replica drops them (NOTIFY)."""
    a = pg_pool.pond(extra=("--allow-unsigned-results",))
    b = pg_pool.replica(a, extra=("--allow-unsigned-results",))
    token = bare(b, slots=4)
    first = a.client.post("/v1/jobs", SUBMIT)
    status, body = b.api("POST", "/v1/orch/poll", {"wait": 5}, token=token)     # b reads and caches the worker
    assert status == 200 and [j["job_id"] for j in body["jobs"]] == [first["id"]], body
    (worker,) = a.client.get("/v1/admin/pool/workers")["workers"]
    assert a.api("POST", f"/v1/admin/pool/workers/{worker['id']}/evict", {"drain": True})[0] == 200
    second = a.client.post("/v1/jobs", SUBMIT)
    status, body = b.api("POST", "/v1/orch/poll", {"wait": 1}, token=token)
    assert status == 200 and body["jobs"] == [], body
    assert a.job(second["id"])["state"] == "queued"


def test_kill_9_of_either_replica_during_a_stream_loses_no_job_and_records_none_twice(pg_pool):
    """Jobs are submitted to both replicas in turn, each with an Idempotency-Key, and sent again
    to the other one when a replica does not answer; the pool is paired with b. a, then b, is
    killed with -9 and restarted where it was."""
    ports = [free_port(), free_port()]
    a = pg_pool.pond(port=ports[0], extra=("--lease", "4"))
    ponds = [a, pg_pool.replica(a, port=ports[1], extra=("--lease", "4"))]
    orch = pg_pool.orchestrator(ponds[1])
    for _ in range(2):
        pg_pool.worker(ponds[1], orch, concurrency=2)
    ids, total = {}, 60

    def submit(i):
        body = dict(SUBMIT, command=[JOB_PY, "-c", f"print({i})"])
        for attempt in range(40):
            try:
                status, job = ponds[(i + attempt) % 2].api("POST", "/v1/jobs", body,
                                                           headers={"Idempotency-Key": f"stream-{i}"})
            except OSError:
                status = None           # that replica is down: the other one, the same key
            if status in (200, 201):
                return job["id"]
            time.sleep(0.1)
        raise AssertionError(f"job {i} was not accepted by either replica")

    for i in range(total):
        ids[i] = submit(i)
        if i in (15, 35):           # kill -9 a, then b (the pool's), mid-stream; back on its port shortly
            n = 0 if i == 15 else 1
            ponds[n].proc.kill()
            ids[i + 1] = submit(i + 1)          # answered by the other replica meanwhile
            ponds[n] = pg_pool.pond(state=ponds[n].state_dir, port=ports[n], extra=("--lease", "4"))
    wait_for(lambda: all(ponds[0].job(j)["state"] in ("done", "failed", "cancelled") for j in ids.values()), 90,
             interval=0.5, what="every job to end")
    jobs = ponds[0].client.get("/v1/jobs", limit=1000)["jobs"]
    assert len(jobs) == total == len(set(ids.values())), (len(jobs), len(set(ids.values())))
    for i, job_id in ids.items():
        job = ponds[1].job(job_id)
        assert job["state"] == "done" and job["attested"], job
        assert ponds[1].output(job_id)["stdout"] == f"{i}\n".encode(), (i, ponds[1].output(job_id))

"""Submitting many jobs at once (specs/protocol.md §9, POST /v1/jobs with a list; `pond submit
--batch FILE`): all valid and stored in one transaction, or none; idempotent under one key."""

import json

from conftest import JOB_PY

NONE = {"profile": "none"}


def job(i, **fields):
    return dict({"command": [JOB_PY, "-c", f"print({i})"], "sandbox": NONE}, **fields)


def counts(pond):
    return sum(pond.client.get("/v1/jobs", limit=1)["counts"].values())


def test_a_batch_of_jobs_is_stored_in_order_and_each_runs(pool):
    pond = pool.pond()
    orch = pool.orchestrator(pond)
    pool.worker(pond, orch, concurrency=2)
    status, answer = pond.api("POST", "/v1/jobs", [job(i) for i in range(5)])
    assert status == 201, answer
    ids = [j["id"] for j in answer["jobs"]]
    assert len(set(ids)) == 5 and all(j["state"] == "queued" for j in answer["jobs"])
    assert [j["command"][-1] for j in answer["jobs"]] == [f"print({i})" for i in range(5)]
    assert answer["jobs"][0]["warnings"][0]["code"] == "unconfined_sandbox"
    for i, job_id in enumerate(ids):
        assert pond.wait_job(job_id)["state"] == "done"
        assert pond.output(job_id)["stdout"] == f"{i}\n".encode()


def test_one_bad_job_refuses_the_whole_batch_naming_it(pool):
    pond = pool.pond()
    before = counts(pond)
    status, answer = pond.api("POST", "/v1/jobs", [job(0), job(1, sandbox={"profile": "rootful"}), job(2)])
    assert status == 422 and answer["error"]["code"] == "sandbox_invalid", answer
    assert answer["error"]["message"].startswith("jobs[1]: "), answer
    status, answer = pond.api("POST", "/v1/jobs", [job(0), {"command": "not a list", "sandbox": NONE}])
    assert status == 400 and "jobs[1]" in answer["error"]["message"], answer
    for body in ([], [job(0)] * 1001, [job(0), 5]):
        status, answer = pond.api("POST", "/v1/jobs", body)
        assert status == 400 and answer["error"]["hint"], answer
    assert counts(pond) == before, "a refused batch stored a job"


def test_a_batch_retried_with_its_key_gives_back_the_same_jobs(pool):
    pond = pool.pond()
    batch = [job(i) for i in range(3)]
    status, first = pond.api("POST", "/v1/jobs", batch, headers=[("Idempotency-Key", "nightly-42")])
    assert status == 201, first
    status, again = pond.api("POST", "/v1/jobs", batch, headers=[("Idempotency-Key", "nightly-42")])
    assert status == 200, again
    assert [j["id"] for j in again["jobs"]] == [j["id"] for j in first["jobs"]]
    assert counts(pond) == 3
    status, other = pond.api("POST", "/v1/jobs", [job(9)] + batch[1:], headers=[("Idempotency-Key", "nightly-42")])
    assert status == 409 and other["error"]["code"] == "idempotency_conflict", other
    assert counts(pond) == 3


def test_pond_submit_batch_reads_json_lines_and_prints_the_ids(pool, tmp_path):
    pond = pool.pond()
    orch = pool.orchestrator(pond)
    pool.worker(pond, orch)
    lines = tmp_path / "jobs.jsonl"
    lines.write_text("\n".join(json.dumps(job(i)) for i in range(3)) + "\n\n")
    done = pond.cli("submit", "--batch", str(lines))
    assert done.returncode == 0, done.stderr
    ids = done.stdout.split()
    assert len(ids) == 3
    assert done.stderr.count("warning: 3 job(s): sandbox profile none") == 1, done.stderr
    for i, job_id in enumerate(ids):
        assert pond.wait_job(job_id)["state"] == "done"
        assert pond.output(job_id)["stdout"] == f"{i}\n".encode()

    lines.write_text(json.dumps(job(0)) + "\n{not json\n")
    bad = pond.cli("submit", "--batch", str(lines))
    assert bad.returncode != 0 and "line 2" in bad.stderr, bad.stderr
    flag = pond.cli("submit", "--batch", str(lines), "--tag", "repo:acme")
    assert flag.returncode != 0 and "--tag" in flag.stderr and "would be ignored" in flag.stderr, flag.stderr
    missing = pond.cli("submit", "--batch", str(tmp_path / "nope.jsonl"))
    assert missing.returncode != 0 and "cannot read" in missing.stderr, missing.stderr
    assert counts(pond) == 3

"""GET /v1/jobs?tag=&worker= and `pond jobs --tag --worker` (issue 12): pond filters all its jobs, not
the newest page of them, newest first under the usual limit; an empty or malformed filter, and a query
parameter pond does not take (?stat=queued, a typo), is a 400 naming what it takes, never every job.
A real pond and worker; run with --store postgres for PostgreSQL's filter."""

import json

from conftest import JOB_PY


def ids(pond, query):
    status, answer = pond.api("GET", "/v1/jobs?" + query)
    assert status == 200, answer
    return [job["id"] for job in answer["jobs"]]


def test_jobs_filter_by_tag_and_worker_over_every_job_newest_first(pool):
    pond = pool.pond()
    orch = pool.orchestrator(pond)
    worker = pool.worker(pond, orch, tags="repo:acme,gpu")
    ran = [pond.submit([JOB_PY, "-c", "print(1)"], tags=tags)["id"] for tags in (["gpu"], [], ["repo:acme"])]
    for job_id in ran:
        assert pond.wait_job(job_id)["state"] == "done"
    # Newer than all of them: jobs no worker takes, more than a page (limit 5).
    status, batch = pond.api("POST", "/v1/jobs", [{"command": ["true"], "tags": ["repo:nobody"],
                                            "sandbox": {"profile": "none"}}] * 6)
    assert status == 201, batch
    waiting = [job["id"] for job in batch["jobs"]]

    assert ids(pond, "tag=gpu&limit=5") == [ran[0]]
    assert ids(pond, "tag=repo:acme") == [ran[2]]
    assert ids(pond, "tag=gp") == [] and ids(pond, "tag=repo") == []          # a whole tag, not a part of one
    assert ids(pond, f"worker={worker.worker_id}&limit=5") == ran[::-1]
    assert ids(pond, f"worker={worker.worker_id}&limit=2") == ran[:0:-1]      # the newest two, under the limit
    assert ids(pond, f"worker={worker.worker_id}&tag=gpu&state=done") == [ran[0]]
    assert ids(pond, f"worker={worker.worker_id}&state=queued") == []
    assert ids(pond, "worker=w_nobody") == []
    assert ids(pond, "tag=repo:nobody&state=queued&limit=1000") == waiting[::-1]

    # The same from the command line.
    done = pond.cli("jobs", "--worker", worker.worker_id, "--tag", "repo:acme", "--json")
    assert done.returncode == 0, done.stderr
    assert [job["id"] for job in json.loads(done.stdout)["jobs"]] == [ran[2]]
    done = pond.cli("jobs", "--tag", "gpu")
    assert done.returncode == 0 and ran[0] in done.stdout and ran[1] not in done.stdout, done.stdout


def test_an_empty_or_malformed_filter_and_an_unknown_query_parameter_are_refused(pool):
    pond = pool.pond()
    pond.submit(["true"])
    for query, says in (("tag=", "tag"), ("worker=", "worker"), ("tag=%20gpu", "tag"), ("worker=w/1", "worker")):
        status, answer = pond.api("GET", "/v1/jobs?" + query)
        assert status == 400 and says in answer["error"]["message"], (query, answer)
    status, answer = pond.api("GET", "/v1/jobs?stat=queued")
    assert status == 400 and "'stat'" in answer["error"]["message"], answer
    assert answer["error"]["hint"] == "allowed: state, tag, worker, limit"
    for method, path in (("GET", "/healthz?verbose=1"), ("GET", "/v1/admin/pool/workers?all=1"),
                         ("POST", "/v1/admin/pool/enrollment-codes?uses=5")):
        status, answer = pond.api(method, path, {} if method == "POST" else None)
        assert status == 400 and answer["error"]["hint"] == "this endpoint takes no query parameters", (path, answer)
    # A secret put in a query parameter's value is not echoed back.
    status, answer = pond.api("GET", f"/v1/jobs?token={pond.token}")
    assert status == 400 and pond.token not in json.dumps(answer)
    done = pond.cli("jobs", "--tag", "")
    assert done.returncode == 2 and "tag" in done.stderr, (done.returncode, done.stderr)

"""Logs (issue 4): the per-job cap keeps the head and the tail of each stream and records what
it dropped, and the signature still verifies; chunks sent twice or out of order are stored
once each and served in seq order of arrival. Real processes."""

import base64

from conftest import JOB_PY

LINES = 40_000                          # 8 bytes a line: 320,000 bytes of stdout
PRINT_LINES = [JOB_PY, "-c", f"import sys; sys.stdout.write(''.join(f'{{i:07d}}\\n' for i in range({LINES})))"]


def test_output_past_the_cap_keeps_head_and_tail_and_says_how_much_was_dropped(pool):
    pond = pool.pond()
    orch = pool.orchestrator(pond)
    pool.worker(pond, orch)
    cap = 128 * 1024                    # a quarter (32 KiB) of head and of tail per stream
    job = pond.submit(PRINT_LINES, log_cap=cap)
    done = pond.wait_job(job["id"], timeout=30)
    whole = "".join(f"{i:07d}\n" for i in range(LINES)).encode()
    quarter = cap // 4
    assert done["state"] == "done" and done["attested"] is True, done
    assert done["log_cap"] == cap and done["dropped"] == {"stdout": len(whole) - 2 * quarter, "stderr": 0}
    assert pond.output(job["id"])["stdout"] == whole[:quarter] + whole[-quarter:]
    verified = pond.cli("verify", job["id"])
    assert verified.returncode == 0, verified.stderr
    for follow in ((), ("--follow",)):
        logs = pond.cli("logs", job["id"], *follow)
        assert logs.returncode == 0 and f"{len(whole) - 2 * quarter} bytes past the log cap" in logs.stderr


def test_output_under_the_cap_is_whole_and_nothing_is_dropped(pool):
    pond = pool.pond(extra=("--log-cap", str(4 * 1024 * 1024)))
    orch = pool.orchestrator(pond)
    pool.worker(pond, orch)
    job = pond.submit(PRINT_LINES)
    done = pond.wait_job(job["id"], timeout=30)
    assert done["log_cap"] == 4 * 1024 * 1024 and done["dropped"] is None, done
    assert len(pond.output(job["id"])["stdout"]) == 8 * LINES


def test_a_log_cap_out_of_range_is_refused(pool):
    pond = pool.pond()
    for cap in (1024, 2 ** 31, "big", True):
        status, body = pond.api("POST", "/v1/jobs", {"command": ["true"], "log_cap": cap, "sandbox": {"profile": "none"}})
        assert status == 400 and "log_cap" in body["error"]["message"], body


def test_duplicated_and_reordered_chunks_are_stored_once_each(pool):
    pond = pool.pond(extra=("--allow-unsigned-results",))
    token = pond.bare_orchestrator()
    job_id = pond.submit(["true"])["id"]
    (job,) = pond.api("POST", "/v1/orch/poll", {"wait": 5}, token=token)[1]["jobs"]
    head = {"X-Claim-Token": job["claim_token"]}

    def chunk(seq, data):
        body = {"attempt": 1, "stream": "stdout", "seq": seq, "data": base64.b64encode(data).decode()}
        return pond.api("POST", f"/v1/orch/jobs/{job_id}/chunk", body, token=token, headers=head)

    for seq, data in ((1, b"b"), (0, b"a"), (1, b"b"), (2, b"c"), (0, b"X")):     # reordered, repeated
        assert chunk(seq, data)[0] == 200
    status, body = pond.api("POST", f"/v1/orch/jobs/{job_id}/state",
                            {"attempt": 1, "state": "done", "exit_code": 0}, token=token, headers=head)
    assert status == 200, body
    page = pond.client.get(f"/v1/jobs/{job_id}/logs")
    assert [(c["seq"], base64.b64decode(c["data"])) for c in page["chunks"]] == [(1, b"b"), (0, b"a"), (2, b"c")]
    assert pond.output(job_id)["stdout"] == b"bac"    # served in arrival order: the cursor is the arrival number

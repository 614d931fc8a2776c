"""Small leftovers of issue 9, each a way the servers misbehaved on input a user can give: a path's
secret echoed in an answer (items 5's redaction missed pond's 404/405), an empty environment
setting that gave a traceback, a full disk at start that gave a traceback, and a slow body from a
client without a token that held a thread. Real processes on port 0."""

import pytest


def test_pond_s_404_and_405_answers_do_not_echo_a_code_or_token_in_the_path(pool):
    pond = pool.pond()
    code = pond.enrollment_code(uses=5)                 # a live, multi-use code
    token = "wkr.abcdef012345.s3cr3tS3cr3tS3cr3t"
    for method, path, status in (("GET", f"/v1/orch/enrollment/{code}/consumed", 405),
                                 ("GET", f"/v1/orch/enrollment/{code}/nope", 404),
                                 ("GET", f"/v1/nope/{token}", 404)):
        got, answer = pond.api(method, path)
        assert got == status, (method, path, got, answer)
        text = str(answer)
        assert code not in text and token not in text and "s3cr3t" not in text, answer
        assert "[redacted]" in answer["error"]["message"], answer

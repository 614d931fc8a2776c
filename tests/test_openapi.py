"""pond's OpenAPI document (issue 12): specs/openapi.json is what pond/openapi.py builds, pond
serves it at GET /v1/openapi.json, it lists exactly the routes pond answers, and schemathesis,
sending generated requests (valid and invalid) to a real pond with a real admin token and a
real binding, finds no 5xx and no answer the document does not allow."""

import base64
import hashlib
import json
import re

import pytest

from conftest import ROOT
from pond import console, openapi, server

pytest.importorskip("schemathesis")
import schemathesis  # noqa: E402
from hypothesis import HealthCheck, Phase, given, settings  # noqa: E402
from hypothesis.errors import Unsatisfiable  # noqa: E402
from schemathesis import GenerationMode  # noqa: E402
from schemathesis.checks import not_a_server_error  # noqa: E402
from schemathesis.specs.openapi.checks import (content_type_conformance, negative_data_rejection,  # noqa: E402
                                               response_schema_conformance, status_code_conformance)

# negative_data_rejection: what the document calls invalid, pond refuses (the document is no
# stricter than pond). Not positive_data_acceptance: a valid shape may still be refused for what
# it names (an unknown code, a job without a credential to seal).
CHECKS = [not_a_server_error, status_code_conformance, content_type_conformance, response_schema_conformance,
          negative_data_rejection]
EXAMPLES = 6          # per operation and mode, plus the requests about things that exist: about 470 requests


# The web console's files (/ui, /ui/, /ui/console.js: one route, an optional path) are pages for a
# browser, not the JSON API the document describes; tests/test_console.py checks them.
NOT_API = {console.static}


def routes(what=lambda who, fn: who):
    """server.ROUTES as {(METHOD, /path/{param}): who may call (or `what` of it)}: each named group becomes {name}."""
    return {(method, re.sub(r"\(\?P<(\w+)>[^)]*\)", r"{\1}", pattern).replace("\\.", ".")): what(who, fn)
            for method, pattern, who, fn in server.ROUTES if fn not in NOT_API}


def test_specs_openapi_json_is_current():
    assert (ROOT / "specs" / "openapi.json").read_text() == openapi.text(), \
        "run: python -m pond.openapi > specs/openapi.json"


def test_the_document_lists_exactly_the_routes_pond_answers_with_their_auth():
    documented = {(method.upper(), path): op for path, ops in openapi.document()["paths"].items()
                  for method, op in ops.items()}
    assert set(documented) == set(routes()), (f"only in the document: {sorted(set(documented) - set(routes()))}; "
                                              f"only in server.ROUTES: {sorted(set(routes()) - set(documented))}")
    for key, who in routes().items():
        assert documented[key]["security"] == ([{who: []}] if who else []), f"{key}: auth {who}"


def test_the_document_lists_exactly_the_query_parameters_pond_takes_on_each_route():
    """pond refuses any other query parameter (server.QUERY), so the two lists must be one."""
    takes = routes(lambda who, fn: set(server.QUERY.get(fn, ())))
    documented = {(method.upper(), path): {p["name"] for p in op.get("parameters", []) if p["in"] == "query"}
                  for path, ops in openapi.document()["paths"].items() for method, op in ops.items()}
    assert documented == takes


def test_pond_serves_the_document_without_a_token(pool):
    pond = pool.pond()
    status, served = pond.api("GET", "/v1/openapi.json", token=None)
    assert status == 200 and served == json.loads((ROOT / "specs" / "openapi.json").read_text())


def test_schemathesis_finds_no_5xx_and_no_answer_outside_the_document(pool):
    # A held poll answers within 50 ms; the held attempt's lease outlasts a slow run; the worker has no keys.
    pond = pool.pond(poll_hold=0.05, extra=("--allow-unsigned-results", "--lease", "3600"))
    orch_token = pond.bare_orchestrator()     # a real binding, with one online worker of one slot
    held = pond.submit(["true"])["id"]
    (a,) = pond.api("POST", "/v1/orch/poll", {"wait": 1}, token=orch_token)[1]["jobs"]   # held: a claim token
    queued = pond.submit(["true"])["id"]      # the slot is taken: it waits (to explain, then cancel)
    pond.client.post("/v1/admin/credentials", {"name": "api", "secrets": {"API_KEY": "s3cret"}})
    pond.client.post("/v1/admin/credentials", {"name": "llm", "secrets": {"OPENAI_API_KEY": "s3cret"}})
    harness = {"key": "h", "capability": "harness.h", "command_template": ["h", "{{PROMPT}}"]}
    model = {"key": "m", "provider": "openai", "model_id": "gpt", "credential": "llm",
             "base_url": "https://api.openai.com/v1"}
    pond.client.post("/v1/admin/harnesses", dict(harness, key="pre"))
    pond.client.post("/v1/admin/models", dict(model, key="pre"))
    agent_job = pond.client.post("/v1/jobs", {"agent": {"harness": "pre", "model": "pre", "prompt": "hi"},
                                              "sandbox": {"profile": "untrusted-code-write"}})["id"]
    spare = [pond.api("POST", f"/v1/orch/enrollment/{pond.enrollment_code()}/consumed", {}, token=orch_token)[1]
             ["worker_id"] for _ in range(2)]
    other = pond.client.post("/v1/orch/pair", {"code": pond.pairing_code()})["binding_id"]
    piece = b"pond-bundle-v1\n" + bytes(16)    # 20 of a bundle's 31 bytes (pond checks the sha256 at the end)
    bundle = {"key": base64.b64encode(bytes(32)).decode(), "sha256": hashlib.sha256(bytes(31)).hexdigest(),
              "size": 31}
    bundle_id = pond.client.post("/v1/bundles", bundle)["id"]
    tokens = {"admin": pond.token, "orch": orch_token}
    claim = {"X-Claim-Token": a["claim_token"]}
    chunk = {"stream": "stdout", "seq": 0, "data": "aGk="}
    job_spec = {"command": ["true"], "sandbox": {"profile": "none"}}
    # Requests about things that exist, beside the generated ones, which mostly name nothing.
    fixed = {
        ("GET", "/v1/jobs/{id}"): dict(path_parameters={"id": queued}),
        ("GET", "/v1/jobs/{id}/logs"): dict(path_parameters={"id": held}),
        ("GET", "/v1/jobs/{id}/explain"): dict(path_parameters={"id": queued}),
        ("GET", "/v1/jobs/{id}/attestation"): dict(path_parameters={"id": held}),
        ("POST", "/v1/jobs/{id}/cancel"): dict(path_parameters={"id": queued}),
        ("POST", "/v1/jobs"): dict(body=job_spec),
        ("POST", "/v1/jobs/explain"): dict(body=job_spec),
        ("GET", "/v1/admin/credentials/{id}"): dict(path_parameters={"id": "api"}),
        ("DELETE", "/v1/admin/credentials/{id}"): dict(path_parameters={"id": "api"}),
        ("POST", "/v1/admin/pool/workers/{id}/evict"): dict(path_parameters={"id": spare[0]}),
        ("DELETE", "/v1/admin/pool/workers/{id}"): dict(path_parameters={"id": spare[0]}),
        ("POST", "/v1/orch/workers/{id}/evict"): dict(path_parameters={"id": spare[1]}),
        ("DELETE", "/v1/admin/pool/orchestrators/{id}"): dict(path_parameters={"id": other}),
        ("POST", "/v1/orch/pair"): dict(body={"code": pond.pairing_code()}),
        ("POST", "/v1/orch/enrollment/{code}/consumed"): dict(path_parameters={"code": pond.enrollment_code()},
                                                              body={}),
        ("POST", "/v1/orch/jobs/{id}/state"): dict(path_parameters={"id": held}, headers=claim,
                                                   body={"attempt": a["attempt"], "state": "running"}),
        ("POST", "/v1/orch/jobs/{id}/chunk"): dict(path_parameters={"id": held}, headers=claim,
                                                   body=dict(chunk, attempt=a["attempt"])),
        ("POST", "/v1/orch/jobs/{id}/seal"): dict(path_parameters={"id": held}, headers=claim,
                                                  body={"attempt": a["attempt"]}),
        ("GET", "/v1/jobs/{id}/usage"): dict(path_parameters={"id": agent_job}),
        ("POST", "/v1/admin/harnesses"): dict(body=harness),
        ("GET", "/v1/admin/harnesses/{id}"): dict(path_parameters={"id": "h"}),
        ("DELETE", "/v1/admin/harnesses/{id}"): dict(path_parameters={"id": "h"}),
        ("POST", "/v1/admin/models"): dict(body=model),
        ("GET", "/v1/admin/models/{id}"): dict(path_parameters={"id": "m"}),
        ("DELETE", "/v1/admin/models/{id}"): dict(path_parameters={"id": "m"}),
        ("POST", "/v1/bundles"): dict(body=bundle),
        ("GET", "/v1/bundles/{id}"): dict(path_parameters={"id": bundle_id}),
        ("POST", "/v1/bundles/{id}/parts"): dict(path_parameters={"id": bundle_id},
                                                 body={"offset": 0, "data": base64.b64encode(piece[:20]).decode()}),
        ("GET", "/v1/jobs/{id}/artifacts"): dict(path_parameters={"id": held}),
        ("POST", "/v1/orch/jobs/{id}/artifacts"): dict(path_parameters={"id": held}, headers=claim, body={
            "attempt": a["attempt"], "name": "work/out.txt", "size": 2, "sha256": hashlib.sha256(b"hi").hexdigest(),
            "offset": 0, "data": "aGk="}),
        ("POST", "/v1/orch/reports"): dict(body={"reports": [{
            "job_id": held, "claim_token": a["claim_token"], "kind": "chunk",
            "body": dict(chunk, seq=1, attempt=a["attempt"])}]}),
    }
    schema = schemathesis.openapi.from_dict(openapi.document())
    # pond ignores query parameters and headers it does not know, as HTTP servers do: an extra
    # one makes no request invalid (a body's unknown field does: 400, and the document says so).
    schema.config.generation.update(allow_extra_parameters=False)
    failures, sent, ok = [], [0], set()

    def check(operation, mode, **fixed):
        security = operation.definition.raw.get("security") or []
        token = tokens[next(iter(security[0]))] if security else None

        @settings(max_examples=EXAMPLES, deadline=None, database=None, derandomize=True,
                  phases=[Phase.explicit, Phase.generate], suppress_health_check=list(HealthCheck))
        @given(case=operation.as_strategy(generation_mode=mode, **fixed))
        def run(case):
            headers = {"Authorization": f"Bearer {token}"} if token else {}
            sent[0] += 1
            response = case.call(base_url=pond.url, headers=headers, timeout=10)
            if response.status_code < 300:
                ok.add((operation.method.upper(), operation.path))
            case.validate_response(response, checks=CHECKS, headers=headers)

        try:
            run()
        except Unsatisfiable:                  # nothing to make invalid: no parameter, no body
            pass
        except (Exception, BaseExceptionGroup) as e:   # one operation's failure: note it, test the others
            found = "\n".join(str(x) for x in getattr(e, "exceptions", [e]))
            failures.append(f"{operation.method.upper()} {operation.path} ({mode}, {fixed}): {found}"[:3000])

    for result in schema.get_all_operations():
        operation = result.ok()
        key = (operation.method.upper(), operation.path)
        if key in fixed:
            check(operation, GenerationMode.POSITIVE, **fixed[key])
        for mode in (GenerationMode.POSITIVE, GenerationMode.NEGATIVE):
            check(operation, mode)
    assert not failures, f"{len(failures)} failing of {sent[0]} requests:\n\n" + "\n\n".join(failures)
    # Requests reached every handler and were answered 2xx, but for a signed result and what only
    # a pinned worker gets (this worker has no keys): the attestation, a recorded artifact, a
    # job's source (sealed to a pinned key; read once redeemed); and a sealed credential (the job names none).
    unreached = set(openapi.OPERATIONS) - ok
    assert unreached == {("GET", "/v1/jobs/{id}/attestation"), ("POST", "/v1/orch/jobs/{id}/seal"),
                         ("GET", "/v1/jobs/{id}/artifacts/{name}"), ("POST", "/v1/orch/jobs/{id}/source"),
                         ("POST", "/v1/orch/jobs/{id}/source/read")}, unreached
    assert pond.api("GET", "/healthz", token=None)[0] == 200

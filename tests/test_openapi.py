"""pond's OpenAPI document (issue 12): specs/openapi.json is what pond/openapi.py builds, pond
serves it at GET /v1/openapi.json, it lists exactly the routes pond answers, and schemathesis,
sending generated requests (valid and invalid) to a real pond with a real admin token and a
real binding, finds no 5xx and no answer the document does not allow."""

import json
import re

import pytest

from conftest import ROOT
from pond import openapi, server

pytest.importorskip("schemathesis")
import schemathesis  # noqa: E402
from hypothesis import HealthCheck, Phase, given, settings  # noqa: E402
from hypothesis.errors import Unsatisfiable  # noqa: E402
from schemathesis import GenerationMode  # noqa: E402
from schemathesis.checks import not_a_server_error  # noqa: E402
from schemathesis.specs.openapi.checks import (content_type_conformance, response_schema_conformance,  # noqa: E402
                                               status_code_conformance)

CHECKS = [not_a_server_error, status_code_conformance, content_type_conformance, response_schema_conformance]
EXAMPLES = 6          # per operation and generation mode: 35 operations x 2 modes x 6 = 420 requests


def route_set():
    """server.ROUTES as (METHOD, /path/{param}) pairs: each named group becomes {name}."""
    return {(method, re.sub(r"\(\?P<(\w+)>[^)]*\)", r"{\1}", pattern).replace("\\.", "."))
            for method, pattern, _, _ in server.ROUTES}


def test_specs_openapi_json_is_current():
    assert (ROOT / "specs" / "openapi.json").read_text() == openapi.text(), \
        "run: python -m pond.openapi > specs/openapi.json"


def test_the_document_lists_exactly_the_routes_pond_answers():
    documented = {(method.upper(), path) for path, ops in openapi.document()["paths"].items() for method in ops}
    assert documented == route_set(), (f"only in the document: {sorted(documented - route_set())}; "
                                       f"only in server.ROUTES: {sorted(route_set() - documented)}")
    for (method, path), op in openapi.OPERATIONS.items():
        who = next(who for m, p, who, _ in server.ROUTES if (m, p) == (method, _pattern_of(path)))
        assert op["security"] == ([{who: []}] if who else []), f"{method} {path}: auth {who}"


def _pattern_of(path):
    for method, pattern, _, _ in server.ROUTES:
        if re.sub(r"\(\?P<(\w+)>[^)]*\)", r"{\1}", pattern).replace("\\.", ".") == path:
            return pattern
    return None


def test_pond_serves_the_document_without_a_token(pool):
    pond = pool.pond()
    status, served = pond.api("GET", "/v1/openapi.json", token=None)
    assert status == 200 and served == json.loads((ROOT / "specs" / "openapi.json").read_text())


def test_schemathesis_finds_no_5xx_and_no_answer_outside_the_document(pool):
    pond = pool.pond(poll_hold=0.05)          # a held poll or logs wait answers within 50 ms
    orch_token = pond.bare_orchestrator()
    job = pond.submit(["true"])["id"]         # something to list, explain and cancel
    pond.client.post("/v1/admin/credentials", {"name": "api", "secrets": {"API_KEY": "s3cret"}})
    tokens = {"admin": pond.token, "orch": orch_token}
    # Requests about things that exist, beside the generated ids that mostly do not.
    known = {"/v1/jobs/{id}": job, "/v1/jobs/{id}/logs": job, "/v1/jobs/{id}/explain": job,
             "/v1/jobs/{id}/attestation": job, "/v1/jobs/{id}/cancel": job, "/v1/admin/credentials/{id}": "api"}
    schema = schemathesis.openapi.from_dict(openapi.document())
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
        for mode in (GenerationMode.POSITIVE, GenerationMode.NEGATIVE):
            check(operation, mode)
        if operation.path in known:
            check(operation, GenerationMode.POSITIVE, path_parameters={"id": known[operation.path]})
    assert not failures, f"{len(failures)} failing of {sent[0]} requests:\n\n" + "\n\n".join(failures)
    # Generated requests got past validation into every handler that can answer 2xx to them
    # (the per-attempt reports need a claim token no generator can guess).
    unreached = set(openapi.OPERATIONS) - ok
    assert unreached <= {("POST", p) for p in ("/v1/orch/pair", "/v1/orch/reports", "/v1/orch/jobs/{id}/state",
                                               "/v1/orch/jobs/{id}/chunk", "/v1/orch/jobs/{id}/seal",
                                               "/v1/orch/enrollment/{code}/consumed", "/v1/jobs",
                                               "/v1/jobs/explain", "/v1/orch/workers/{id}/evict",
                                               "/v1/admin/pool/workers/{id}/evict")} | {
        ("GET", "/v1/jobs/{id}/attestation"), ("DELETE", "/v1/admin/pool/orchestrators/{id}"),
        ("DELETE", "/v1/admin/pool/workers/{id}")}, sorted(unreached)
    assert pond.api("GET", "/healthz", token=None)[0] == 200

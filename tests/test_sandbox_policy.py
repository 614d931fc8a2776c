"""pond's sandbox policy (specs/sandbox.md): what a job may declare, what pond stores, and what it refuses.

All through a real pond on port 0 (and the real `pond` CLI); the attestation check runs pond's own
verification over a real signed envelope from specs/vectors/attestation.json.
"""

import base64
import copy
import json
import sys
from pathlib import Path

import pytest

from conftest import JOB_PY, Proc, env_for_children, run, wait_for
from pond import attestation
from pond.errors import Forbidden
from pond.sandbox import DEFAULT_LIMITS, GIB, MIB

ROOT = Path(__file__).resolve().parents[1]
PY = sys.executable
WRITE, READ = "untrusted-code-write", "untrusted-code-read"
DEFAULTS = DEFAULT_LIMITS[WRITE]


@pytest.fixture
def pond(pool):
    return pool.pond()


def submit(pond, sandbox, **fields):
    """(status, answer) of POST /v1/jobs with this sandbox; no sandbox key at all when sandbox is ...."""
    body = dict({"command": ["true"]}, **fields)
    if sandbox is not ...:
        body["sandbox"] = sandbox
    return pond.api("POST", "/v1/jobs", body)


# -- refusals: 422 naming the field -------------------------------------------------------------------------

REFUSED = [
    # (what, sandbox, word the message or hint must contain, code)
    ("no sandbox block", ..., "sandbox", "sandbox_required"),
    ("no profile", {"tier": "trusted"}, "profile", "sandbox_invalid"),
    ("an unknown profile", {"profile": "trusted-code"}, "sandbox.profile", "sandbox_invalid"),
    ("an unknown tier", {"profile": WRITE, "tier": "gold"}, "sandbox.tier", "sandbox_invalid"),
    ("an unknown field", {"profile": WRITE, "network": "host"}, "network", "sandbox_invalid"),
    ("a backend that is not a name", {"profile": WRITE, "backend": "bw rap"}, "sandbox.backend", "sandbox_invalid"),
    ("process with untrusted-code-write", {"profile": WRITE, "backend": "process"}, "network", "sandbox_invalid"),
    ("process with untrusted-code-read", {"profile": READ, "backend": "process"}, "sandbox.backend",
     "sandbox_invalid"),
    ("none with bwrap", {"profile": "none", "backend": "bwrap"}, "sandbox.backend", "sandbox_invalid"),
    ("none with a helper", {"profile": "none", "backend": "gvisor"}, "sandbox.backend", "sandbox_invalid"),
    ("memory wider than 4G", {"profile": WRITE, "overrides": {"memory": "5G"}}, "sandbox.overrides.memory",
     "sandbox_invalid"),
    ("memory one byte wider", {"profile": WRITE, "overrides": {"memory": 4 * GIB + 1}}, "sandbox.overrides.memory",
     "sandbox_invalid"),
    ("cpus wider than 2", {"profile": WRITE, "overrides": {"cpus": 2.5}}, "sandbox.overrides.cpus",
     "sandbox_invalid"),
    ("pids wider than 512", {"profile": READ, "overrides": {"pids": 513}}, "sandbox.overrides.pids",
     "sandbox_invalid"),
    ("tmpfs wider than 1G", {"profile": WRITE, "overrides": {"tmpfs_size": "1025M"}},
     "sandbox.overrides.tmpfs_size", "sandbox_invalid"),
    ("timeout wider than a day", {"profile": "none", "overrides": {"timeout": 86401}}, "sandbox.overrides.timeout",
     "sandbox_invalid"),
    ("an unknown override", {"profile": WRITE, "overrides": {"network": "host"}}, "network", "sandbox_invalid"),
    ("an image override (not a limit)", {"profile": WRITE, "overrides": {"image": "x"}}, "image", "sandbox_invalid"),
    ("a size with a T suffix", {"profile": WRITE, "overrides": {"memory": "1T"}}, "sandbox.overrides.memory",
     "sandbox_invalid"),
    ("a size with a unit word", {"profile": WRITE, "overrides": {"memory": "1 GiB"}}, "sandbox.overrides.memory",
     "sandbox_invalid"),
    ("a negative size", {"profile": WRITE, "overrides": {"tmpfs_size": -1}}, "sandbox.overrides.tmpfs_size",
     "sandbox_invalid"),
    ("a zero size", {"profile": WRITE, "overrides": {"memory": 0}}, "sandbox.overrides.memory", "sandbox_invalid"),
    ("a float size", {"profile": WRITE, "overrides": {"memory": 1.5}}, "sandbox.overrides.memory",
     "sandbox_invalid"),
    ("cpus zero", {"profile": WRITE, "overrides": {"cpus": 0}}, "sandbox.overrides.cpus", "sandbox_invalid"),
    ("cpus a string", {"profile": WRITE, "overrides": {"cpus": "1"}}, "sandbox.overrides.cpus", "sandbox_invalid"),
    ("pids a fraction", {"profile": WRITE, "overrides": {"pids": 1.5}}, "sandbox.overrides.pids", "sandbox_invalid"),
    ("pids zero", {"profile": WRITE, "overrides": {"pids": 0}}, "sandbox.overrides.pids", "sandbox_invalid"),
    ("timeout under a second", {"profile": WRITE, "overrides": {"timeout": 0.5}}, "sandbox.overrides.timeout",
     "sandbox_invalid"),
    ("allow_hosts on untrusted-code-read", {"profile": READ, "allow_hosts": ["pypi.org"]}, "sandbox.allow_hosts",
     "sandbox_invalid"),
    ("allow_hosts on none", {"profile": "none", "allow_hosts": []}, "sandbox.allow_hosts", "sandbox_invalid"),
    ("a host with a port", {"profile": WRITE, "allow_hosts": ["example.org:443"]}, "sandbox.allow_hosts[0]",
     "sandbox_invalid"),
    ("a host with a scheme", {"profile": WRITE, "allow_hosts": ["https://example.org"]}, "sandbox.allow_hosts[0]",
     "sandbox_invalid"),
    ("a bare star", {"profile": WRITE, "allow_hosts": ["*"]}, "sandbox.allow_hosts[0]", "sandbox_invalid"),
    ("a star inside a name", {"profile": WRITE, "allow_hosts": ["api.*.example.org"]}, "sandbox.allow_hosts[0]",
     "sandbox_invalid"),
    ("an underscore", {"profile": WRITE, "allow_hosts": ["ok.org", "a_b.example.org"]}, "sandbox.allow_hosts[1]",
     "sandbox_invalid"),
    ("a label starting with a hyphen", {"profile": WRITE, "allow_hosts": ["-a.example.org"]},
     "sandbox.allow_hosts[0]", "sandbox_invalid"),
    ("a trailing dot", {"profile": WRITE, "allow_hosts": ["example.org."]}, "sandbox.allow_hosts[0]",
     "sandbox_invalid"),
    ("a 64-character label", {"profile": WRITE, "allow_hosts": ["a" * 64 + ".org"]}, "sandbox.allow_hosts[0]",
     "sandbox_invalid"),
    ("IPv6 in brackets", {"profile": WRITE, "allow_hosts": ["[2001:db8::1]"]}, "brackets", "sandbox_invalid"),
    ("IPv6 with a zone", {"profile": WRITE, "allow_hosts": ["fe80::1%eth0"]}, "sandbox.allow_hosts[0]",
     "sandbox_invalid"),
    ("a short numeric address", {"profile": WRITE, "allow_hosts": ["10.1"]}, "sandbox.allow_hosts[0]",
     "sandbox_invalid"),
    ("a non-ASCII name", {"profile": WRITE, "allow_hosts": ["bücher.example"]}, "sandbox.allow_hosts[0]",
     "sandbox_invalid"),
    ("an empty host", {"profile": WRITE, "allow_hosts": [""]}, "sandbox.allow_hosts[0]", "sandbox_invalid"),
    ("a host that is a number", {"profile": WRITE, "allow_hosts": [7]}, "sandbox.allow_hosts[0]", "sandbox_invalid"),
    ("65 hosts", {"profile": WRITE, "allow_hosts": [f"h{i}.example.org" for i in range(65)]}, "at most 64",
     "sandbox_invalid"),
    ("byo without a tenant", {"profile": WRITE, "tier": "byo"}, "tenant", "sandbox_invalid"),
]


def test_every_bad_sandbox_is_refused_422_naming_the_field(pond, subtests):
    for what, sandbox, says, code in REFUSED:
        with subtests.test(msg=what):
            status, answer = submit(pond, sandbox)
            assert status == 422, (what, status, answer)
            error = answer["error"]
            assert error["code"] == code and error["hint"], (what, error)
            assert says in error["message"] + " " + error["hint"], (what, error)
    assert pond.client.get("/v1/jobs")["jobs"] == [], "no refused submit may create a job"


def test_the_missing_block_hint_says_what_to_add(pond):
    status, answer = submit(pond, ...)
    assert status == 422 and answer["error"]["code"] == "sandbox_required"
    assert '"profile": "untrusted-code-write"' in answer["error"]["hint"] and "none" in answer["error"]["hint"]


def test_a_wider_override_says_the_default(pond):
    status, answer = submit(pond, {"profile": WRITE, "overrides": {"memory": "8G"}})
    assert status == 422 and "8G" in answer["error"]["message"] and "4G" in answer["error"]["hint"], answer


# -- what pond stores ---------------------------------------------------------------------------------------

def test_defaults_are_filled_in_and_become_tags_and_capabilities(pond):
    status, job = submit(pond, {"profile": WRITE})
    assert status == 201, job
    assert job["sandbox"] == {"profile": WRITE, "tier": "trusted", "backend": "bwrap",
                              "limits": {"memory": 4 * GIB, "cpus": 2, "pids": 512, "tmpfs_size": GIB,
                                         "timeout": 86400},
                              "allow_hosts": []}
    assert job["tags"] == ["pool:trusted"] and job["capabilities"] == ["sandbox.bwrap"]
    assert job["warnings"] == []

    _, read = submit(pond, {"profile": READ})
    assert (read["sandbox"]["tier"], read["sandbox"]["backend"]) == ("trusted", "bwrap")
    _, unconfined = submit(pond, {"profile": "none"})
    assert (unconfined["sandbox"]["tier"], unconfined["sandbox"]["backend"]) == ("any", "process")
    assert unconfined["tags"] == [] and unconfined["capabilities"] == ["sandbox.process"]
    # What pond stores is what it answered.
    assert pond.job(job["id"])["sandbox"] == job["sandbox"]


def test_tiers_and_helper_backends(pond):
    _, byo = submit(pond, {"profile": WRITE, "tier": "byo", "backend": "gvisor"}, tenant="acme",
                    tags=["repo:x"], capabilities=["harness.codex"])
    assert byo["tags"] == ["pool:byo", "repo:x", "tenant:acme"], byo
    assert byo["capabilities"] == ["harness.codex", "sandbox.gvisor"], byo
    _, anywhere = submit(pond, {"profile": READ, "tier": "any"})
    assert anywhere["tags"] == [] and anywhere["capabilities"] == ["sandbox.bwrap"]


def test_overrides_are_normalized_to_bytes_and_whole_numbers(pond):
    status, job = submit(pond, {"profile": WRITE, "overrides": {"memory": "1G", "cpus": 1.0, "pids": 128,
                                                                "tmpfs_size": "256m", "timeout": 600.0}})
    assert status == 201, job
    limits = job["sandbox"]["limits"]
    assert limits == {"memory": GIB, "cpus": 1, "pids": 128, "tmpfs_size": 256 * MIB, "timeout": 600}
    assert all(type(v) is int for v in limits.values()), limits           # 1, not 1.0: canonical JSON is stable
    _, exact = submit(pond, {"profile": WRITE, "overrides": {"memory": 4 * GIB, "cpus": 0.5, "tmpfs_size": "64K"}})
    assert exact["sandbox"]["limits"] == dict(DEFAULTS, memory=4 * GIB, cpus=0.5, tmpfs_size=64 * 1024)


def test_allow_hosts_are_lower_cased_sorted_and_deduplicated(pond):
    hosts = ["PyPI.org", "*.Example.NET", "pypi.org", "10.0.0.7", "2001:DB8::1", "localhost", "pypi.org"]
    status, job = submit(pond, {"profile": WRITE, "allow_hosts": hosts})
    assert status == 201, job
    assert job["sandbox"]["allow_hosts"] == ["*.example.net", "10.0.0.7", "2001:db8::1", "localhost", "pypi.org"]
    _, empty = submit(pond, {"profile": WRITE, "allow_hosts": []})
    assert empty["sandbox"]["allow_hosts"] == []
    _, many = submit(pond, {"profile": WRITE, "allow_hosts": [f"h{i}.example.org" for i in range(64)]})
    assert len(many["sandbox"]["allow_hosts"]) == 64


def test_the_same_block_written_two_ways_is_the_same_job_for_idempotency(pond):
    first = pond.api("POST", "/v1/jobs", {"command": ["true"], "sandbox": {"profile": WRITE}},
                     headers={"Idempotency-Key": "k-1"})
    again = pond.api("POST", "/v1/jobs", {"command": ["true"], "sandbox": {
        "profile": WRITE, "tier": "trusted", "backend": "bwrap", "overrides": {"memory": "4G"}}},
        headers={"Idempotency-Key": "k-1"})
    assert (first[0], again[0]) == (201, 200) and again[1]["id"] == first[1]["id"], (first, again)


# -- warnings and --require-sandbox -------------------------------------------------------------------------

def test_profile_none_is_accepted_with_a_warning_on_submit_and_on_the_job(pond):
    status, job = submit(pond, {"profile": "none"})
    assert status == 201
    (warning,) = job["warnings"]
    assert warning["code"] == "unconfined_sandbox" and "unconfined" in warning["message"] and warning["hint"]
    assert pond.job(job["id"])["warnings"] == job["warnings"]
    assert all(j.get("warnings") is not None for j in pond.client.get("/v1/jobs")["jobs"])


def test_require_sandbox_refuses_profile_none(pool):
    pond = pool.pond(extra=("--require-sandbox",))
    status, answer = submit(pond, {"profile": "none"})
    assert status == 422 and answer["error"]["code"] == "unconfined_refused", answer
    assert "--require-sandbox" in answer["error"]["message"]
    assert submit(pond, {"profile": WRITE})[0] == 201


def test_pond_require_sandbox_env_refuses_profile_none(pool, tmp_path):
    state = tmp_path / "pond-env"
    state.mkdir()
    argv = [PY, "-m", "pond", "serve", "--bind", "127.0.0.1:0", "--state-dir", str(state)]
    proc = Proc(argv, tmp_path / "pond-env.log", env=pool.pond_env(state, dict(env_for_children(),
                                                                                 POND_REQUIRE_SANDBOX="true")))
    pool.procs.append(proc)
    pond = pool.handle(proc, state)
    status, answer = submit(pond, {"profile": "none"})
    assert status == 422 and answer["error"]["code"] == "unconfined_refused", answer

    bad = run(argv, env=dict(env_for_children(), POND_REQUIRE_SANDBOX="maybe"), timeout=30)
    assert bad.returncode == 2 and "POND_REQUIRE_SANDBOX" in bad.stderr and "hint:" in bad.stderr, bad.stderr


# -- why a job waits ----------------------------------------------------------------------------------------

def test_a_bwrap_job_on_a_pool_of_process_workers_says_which_provider_is_missing_where(pool):
    pond = pool.pond()
    orch = pool.orchestrator(pond)
    pool.worker(pond, orch, tags="pool:trusted")
    pool.worker(pond, orch, tags="pool:trusted")
    binding = json.loads((orch.state_dir / "backend-handle.json").read_text())["binding_id"]
    job = pond.submit(["true"], sandbox={"profile": WRITE})
    reason = wait_for(lambda: pond.job(job["id"]).get("waiting"), 10, what="a waiting reason")["reason"]
    assert reason.startswith("no worker enforces sandbox bwrap: "), reason
    assert f"pool {binding} has 2 online workers with sandbox.process only" in reason, reason
    assert "preflight" in reason and "log" in reason, reason
    shown = pond.cli("job", job["id"])
    assert shown.returncode == 0 and "no worker enforces sandbox bwrap" in shown.stdout, shown.stderr
    # An unconfined job next to it runs: only the missing provider holds the first one back.
    done = pond.wait_job(pond.submit([JOB_PY, "-c", "pass"])["id"])
    assert done["state"] == "done" and pond.job(job["id"])["state"] == "queued"


# -- the effective timeout ----------------------------------------------------------------------------------

def test_the_sandbox_timeout_bounds_the_assignment_and_the_backstop(pool):
    """A job's own timeout of 60 s, its sandbox's of 1 s: the worker is told 1 s, and pond's backstop
    fails the job after 1 s (+ grace + margin) when its worker never reports (--assign-ahead 0: as
    tests/test_leases.py's backstop test)."""
    pond = pool.pond(extra=("--lease", "4", "--allow-unsigned-results", "--assign-ahead", "0"))
    token = pond.bare_orchestrator()
    job = pond.submit(["sleep", "600"], timeout=60, cancel_grace=0,
                      sandbox={"profile": "none", "overrides": {"timeout": 1}})
    status, answer = pond.api("POST", "/v1/orch/poll", {"wait": 5}, token=token)
    (held,) = answer["jobs"]
    assert held["timeout"] == 1 and held["sandbox"]["limits"]["timeout"] == 1, held
    assert pond.job(job["id"])["timeout"] == 60          # the job's own stays as submitted
    beat = {"jobs": [{k: held[k] for k in ("job_id", "attempt", "claim_token")}]}

    def failed():
        assert pond.api("POST", "/v1/orch/heartbeat", beat, token=token)[0] == 200
        state = pond.job(job["id"])
        return state["state"] == "failed" and state

    state = wait_for(failed, 20, interval=0.5, what="the backstop at the sandbox's timeout")
    assert "timed out after 1 s" in state["error"] and "backstop" in state["error"], state


# -- the pond CLI -------------------------------------------------------------------------------------------

def cli_job(pond, *args):
    done = pond.cli("submit", "--json", *args, "--", "true")
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout), done.stderr


def test_pond_submit_defaults_to_untrusted_code_write(pool):
    pond = pool.pond()
    job, stderr = cli_job(pond)
    assert job["sandbox"]["profile"] == WRITE and job["sandbox"]["backend"] == "bwrap", job
    assert job["warnings"] == [] and "warning" not in stderr


def test_pond_submit_sandbox_flags(pool):
    pond = pool.pond()
    job, _ = cli_job(pond, "--memory", "1G", "--cpus", "1", "--pids", "64", "--tmpfs", "128M",
                     "--allow-host", "Example.org", "--allow-host", "*.pypi.org", "--tier", "any", "--timeout", "30")
    assert job["sandbox"] == {"profile": WRITE, "tier": "any", "backend": "bwrap",
                              "limits": dict(DEFAULTS, memory=GIB, cpus=1, pids=64, tmpfs_size=128 * MIB),
                              "allow_hosts": ["*.pypi.org", "example.org"]}, job
    assert job["timeout"] == 30
    read, _ = cli_job(pond, "--profile", READ, "--backend", "gvisor")
    assert (read["sandbox"]["profile"], read["capabilities"]) == (READ, ["sandbox.gvisor"])

    shown = pond.cli("job", job["id"])
    assert shown.returncode == 0, shown.stderr
    line = next(x for x in shown.stdout.splitlines() if x.startswith("sandbox:"))
    for part in (WRITE, "tier any", "backend bwrap", "memory 1G", "cpus 1", "pids 64", "tmpfs 128M",
                 "timeout 86400 s", "allow_hosts *.pypi.org, example.org"):
        assert part in line, (part, line)


def test_pond_submit_profile_none_prints_the_warning(pool):
    pond = pool.pond()
    job, stderr = cli_job(pond, "--profile", "none")
    assert job["sandbox"]["backend"] == "process"
    assert "warning: sandbox profile none" in stderr and "hint:" in stderr, stderr
    shown = pond.cli("job", job["id"])
    assert "warning:" in shown.stdout and "unconfined" in shown.stdout, shown.stdout


def test_pond_submit_sandbox_json_and_its_refusals(pool):
    pond = pool.pond()
    job, _ = cli_job(pond, "--sandbox", json.dumps({"profile": READ, "overrides": {"pids": 10}}))
    assert job["sandbox"]["limits"]["pids"] == 10
    both = pond.cli("submit", "--sandbox", '{"profile": "none"}', "--memory", "1G", "--", "true")
    assert both.returncode == 2 and "--memory" in both.stderr and "hint:" in both.stderr, both.stderr
    wider = pond.cli("submit", "--memory", "5G", "--", "true")
    assert wider.returncode == 4 and "sandbox.overrides.memory" in wider.stderr, wider.stderr
    host = pond.cli("submit", "--profile", READ, "--allow-host", "pypi.org", "--", "true")
    assert host.returncode == 4 and "sandbox.allow_hosts" in host.stderr, host.stderr
    assert len(pond.client.get("/v1/jobs")["jobs"]) == 1, "no refused submit may create a job"


# -- attestation: the signed sandbox must be the stored one -------------------------------------------------

VECTORS = json.loads((ROOT / "specs" / "vectors" / "attestation.json").read_text())


def vector_check(case, sandbox):
    """pond's own checks over a vector's real signed envelope, against a job whose stored block is `sandbox`."""
    inputs = case["inputs"]
    public = bytes.fromhex(VECTORS["signer"]["ed25519_public"])
    statement = attestation.verify_envelope(public, case["envelope"])
    return attestation.check_statement(
        statement, inputs["job_id"], inputs["attempt"], inputs["worker_fingerprint"],
        base64.b64decode(inputs["stdout_b64"]), base64.b64decode(inputs["stderr_b64"]),
        command=inputs["command"], sandbox=sandbox)


@pytest.mark.parametrize("case", VECTORS["valid"], ids=lambda c: c["name"])
def test_a_result_that_signed_the_jobs_sandbox_is_accepted(case):
    assert vector_check(case, case["inputs"]["sandbox"])["sandbox"] == case["inputs"]["sandbox"]


@pytest.mark.parametrize("change, differs", [
    (lambda b: b.update(profile="none"), "profile"),
    (lambda b: b["limits"].update(memory=b["limits"]["memory"] // 2), "limits"),
    (lambda b: b.update(allow_hosts=b["allow_hosts"] + ["zz.example"]), "allow_hosts"),
    (lambda b: b.update(backend="gvisor"), "backend"),
    (lambda b: b.pop("tier"), "tier"),
])
def test_a_result_that_signed_another_sandbox_is_refused(change, differs):
    case = next(c for c in VECTORS["valid"] if c["inputs"]["sandbox"]["allow_hosts"])
    stored = copy.deepcopy(case["inputs"]["sandbox"])
    change(stored)
    with pytest.raises(Forbidden) as caught:
        vector_check(case, stored)
    assert caught.value.code == "attestation_failed"
    assert "signed sandbox" in caught.value.detail and differs in caught.value.detail, caught.value.detail


def test_a_signed_sandbox_that_is_not_an_object_is_refused():
    case = VECTORS["valid"][0]
    with pytest.raises(Forbidden) as caught:
        attestation.check_statement(dict(case["statement"], predicate=dict(case["statement"]["predicate"],
                                                                           sandbox=None)),
                                    case["inputs"]["job_id"], case["inputs"]["attempt"],
                                    case["inputs"]["worker_fingerprint"],
                                    base64.b64decode(case["inputs"]["stdout_b64"]),
                                    base64.b64decode(case["inputs"]["stderr_b64"]), sandbox=case["inputs"]["sandbox"])
    assert "signed sandbox" in caught.value.detail

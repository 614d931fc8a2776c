"""specs/vectors/matching.json against both implementations: pond.matching and swarm.py.

The matching cases run through one test body with two adapters, so pond and the worker
cannot drift apart on which job fits which worker. Capability resolution is worker-side
only (swarm.resolve_capabilities); its output must still be acceptable to pond's wire.
"""

import json
from pathlib import Path

import pytest

import swarm
from pond import matching, wire

VECTORS = json.loads((Path(__file__).resolve().parents[1] / "specs" / "vectors" / "matching.json").read_text())
MATCHING = VECTORS["matching"]
RESOLUTION = VECTORS["resolution"]


def pond_verdict(job, worker):
    lacks_tags, lacks_caps = matching.missing(worker, job["tags"], job["capabilities"])
    return matching.matches(worker, job["tags"], job["capabilities"]), lacks_tags, lacks_caps


def swarm_verdict(job, worker):
    # swarm.py names only the first gap, so each requirement is asked about on its own.
    ok, _ = swarm.job_matches(worker["tags"], worker["capabilities"], job)
    lacks_tags = [t for t in sorted(job["tags"])
                  if not swarm.job_matches(worker["tags"], worker["capabilities"], {"tags": [t]})[0]]
    lacks_caps = [c for c in sorted(job["capabilities"])
                  if not swarm.capability_matches(worker["capabilities"], c)]
    return ok, lacks_tags, lacks_caps


IMPLEMENTATIONS = {"pond": pond_verdict, "swarm": swarm_verdict}


@pytest.mark.parametrize("case", MATCHING, ids=[c["name"] for c in MATCHING])
@pytest.mark.parametrize("impl", sorted(IMPLEMENTATIONS))
def test_matching_vector(impl, case):
    verdict = IMPLEMENTATIONS[impl](case["job"], case["worker"])
    assert verdict == (case["match"], case["missing_tags"], case["missing_capabilities"])


@pytest.mark.parametrize("case", [c for c in MATCHING if not c["match"]], ids=lambda c: c["name"])
def test_swarm_refusal_names_the_first_gap(case):
    ok, reason = swarm.job_matches(case["worker"]["tags"], case["worker"]["capabilities"], case["job"])
    assert not ok
    if case["missing_tags"]:
        assert reason == f"worker lacks tag {case['missing_tags'][0]}"
    else:
        assert reason == f"worker lacks capability {case['missing_capabilities'][0]}"


@pytest.mark.parametrize("case", [c for c in MATCHING if c.get("wire_valid", True)], ids=lambda c: c["name"])
def test_matching_vector_strings_are_valid_on_both_wires(case):
    for tag in case["job"]["tags"] + case["worker"]["tags"]:
        assert wire.TAG_RE.match(tag) and swarm.TAG_RE.match(tag), tag
    for cap in case["job"]["capabilities"]:
        assert wire.CAPABILITY_RE.match(cap), cap
    for glob in case["worker"]["capabilities"]:
        assert wire.CAPABILITY_GLOB_RE.match(glob) and swarm.CAPABILITY_GLOB_RE.match(glob), glob


@pytest.mark.parametrize("case", [c for c in MATCHING if not c.get("wire_valid", True)], ids=lambda c: c["name"])
def test_function_only_vectors_are_refused_by_the_wire(case):
    """A case marked wire_valid: false must really be unsendable, or the flag hides a wire case."""
    job, worker = case["job"], case["worker"]
    bad = ([t for t in job["tags"] + worker["tags"] if not wire.TAG_RE.match(t)]
           + [c for c in job["capabilities"] if not wire.CAPABILITY_RE.match(c)]
           + [g for g in worker["capabilities"] if not wire.CAPABILITY_GLOB_RE.match(g)])
    assert bad


@pytest.mark.parametrize("case", RESOLUTION, ids=[c["name"] for c in RESOLUTION])
def test_capability_resolution_vector(case):
    if case["refused"]:
        with pytest.raises(swarm.SwarmError) as refused:
            swarm.resolve_capabilities(case["globs"], backends=tuple(case["backends"]))
        assert refused.value.exit_code == 2
        return
    advertised, warnings = swarm.resolve_capabilities(case["globs"], backends=tuple(case["backends"]))
    assert (advertised, len(warnings)) == (case["advertised"], case["warnings"])
    for glob in advertised:          # what the worker advertises, pond must accept at enrollment
        assert wire.CAPABILITY_GLOB_RE.match(glob), glob


def test_vector_file_is_well_formed():
    for section in (MATCHING, RESOLUTION):
        names = [c["name"] for c in section]
        assert len(names) == len(set(names)), "vector names must be unique"
    for case in MATCHING:
        assert set(case["job"]) == {"tags", "capabilities"} and set(case["worker"]) == {"tags", "capabilities"}
        assert case["missing_tags"] == sorted(case["missing_tags"])
        assert case["missing_capabilities"] == sorted(case["missing_capabilities"])
        assert case["match"] == (not case["missing_tags"] and not case["missing_capabilities"]), case["name"]
    for case in RESOLUTION:
        assert case["advertised"] == sorted(case["advertised"])
        assert not case["refused"] or (case["advertised"], case["warnings"]) == ([], 0), case["name"]


SANDBOX = json.loads((Path(__file__).resolve().parents[1] / "specs" / "vectors" / "sandbox.json").read_text())


@pytest.mark.parametrize("case", SANDBOX["cases"], ids=[c["name"] for c in SANDBOX["cases"]])
def test_sandbox_vectors_pond_stores_and_swarm_enforces_the_same_block(case):
    """specs/vectors/sandbox.json: pond's stored block, what the worker enforces from it, and the
    stdin an external provider gets (specs/sandbox.md §6.4), byte for byte."""
    from pond import sandbox
    parsed = sandbox.parse(case["submitted"], case["tenant"])
    assert parsed.block == case["stored"]
    assert list(parsed.tags) == case["required_tags"] and list(parsed.capabilities) == case["required_capabilities"]
    conf = swarm.confinement(case["stored"])
    assert dict(conf, allow_hosts=list(conf["allow_hosts"])) == case["enforced"]
    slot = swarm.Slot(Path(case["slot"]["root"]), case["slot"]["uid"])
    env = swarm.sandbox_env(conf, case["job_env"], slot, conf["backend"])
    assert swarm.canonical_json(swarm.helper_spec(conf, case["command"], env, slot)).decode() == case["helper_stdin"]


def test_the_sandbox_vectors_file_is_what_its_script_writes(tmp_path):
    import subprocess
    import sys
    out = tmp_path / "sandbox.json"
    subprocess.run([sys.executable, str(Path(__file__).resolve().parents[1] / "specs" / "vectors" / "make_sandbox.py"),
                    str(out)], check=True, timeout=60)
    assert out.read_text() == (Path(__file__).resolve().parents[1] / "specs" / "vectors" / "sandbox.json").read_text()


def test_a_worker_clamps_a_widened_block_to_its_own_defaults():
    """An orchestrator that widened the limits on the way gains nothing: the worker enforces its own caps."""
    conf = swarm.confinement({"profile": "untrusted-code-read", "limits": {"memory": 2**50, "pids": 10**6,
                                                                           "timeout": 10**9, "cpus": 64},
                              "allow_hosts": ["evil.example"]})
    assert conf["limits"] == swarm.PROFILE_LIMITS and conf["allow_hosts"] == ()
    from pond import sandbox
    assert swarm.PROFILE_LIMITS == sandbox.DEFAULT_LIMITS["untrusted-code-read"]

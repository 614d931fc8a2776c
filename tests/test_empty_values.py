"""An explicit empty or zero value never widens anything (issue 9, item 6).

A flag given as "" or 0 used to read as "not given": `pond admin enrollment-code --tags ''`
minted a code without a tag ceiling, `--fingerprint ''` one without the key check,
`pond admin pairing-code --scope ''` an unscoped orchestrator, `--uses 0` and `--ttl 0` the
defaults; `swarm.py pair --code ''` paired with $SWARM_PAIRING_CODE, `--ca-file ''` trusted
the system store. Now a flag that names something (a file, a URL, a code, tags) refuses ""
when the command line is parsed (exit 2), and a value meant for pond is sent as given, so
pond refuses what it cannot take (exit 4). `--tags ''`, `--capabilities ''`, `--egress-allow ''`
and `--egress-deny ''` of `swarm.py worker` keep meaning "none", which is what they say.

Every case runs the real command line against a real pond.
"""

import sys

from conftest import SWARM, env_for_children, run

EMPTY = "is empty: give a value, or leave the flag out"


def pond_cli(*args, env=None, timeout=30):
    return run([sys.executable, "-m", "pond", *args], env=env, timeout=timeout)


def swarm(*args, env=None, timeout=30):
    return run([sys.executable, SWARM, *args], env=env, timeout=timeout)


def rows(pond, table):
    return pond.sql(f"SELECT COUNT(*) FROM {table}")[1][0][0]


def assert_refused_empty(done, flag):
    where = f"exit {done.returncode}\nstdout: {done.stdout}\nstderr: {done.stderr}"
    assert done.returncode == 2, where
    assert f"argument {flag}: {EMPTY}" in done.stderr, where
    assert done.stdout == "" and "Traceback" not in done.stderr, where


def assert_pond_refused(done, *fragments):
    where = f"exit {done.returncode}\nstdout: {done.stdout}\nstderr: {done.stderr}"
    assert done.returncode == 4, where
    assert done.stdout == "" and "Traceback" not in done.stderr, where
    for fragment in fragments:
        assert fragment in done.stderr, where


def test_pond_codes_with_an_empty_or_zero_limit_are_refused_not_minted_unlimited(pool, subtests):
    pond = pool.pond()
    state = ["--state-dir", str(pond.state_dir)]
    refused_empty = [
        (["admin", "enrollment-code", "--tags", ""], "--tags"),
        (["admin", "enrollment-code", "--fingerprint", ""], "--fingerprint"),
        (["admin", "pairing-code", "--scope", ""], "--scope"),
    ]
    for argv, flag in refused_empty:
        with subtests.test(" ".join(argv)):
            assert_refused_empty(pond_cli(*argv, *state), flag)
    refused_by_pond = [
        (["admin", "enrollment-code", "--tags", " , "], "tags must name at least one tag"),
        (["admin", "enrollment-code", "--uses", "0"], "uses must be a whole number from 1"),
        (["admin", "enrollment-code", "--ttl", "0"], "ttl must be a whole number from 30"),
        (["admin", "pairing-code", "--scope", ","], "scope must name at least one tag"),
        (["admin", "pairing-code", "--ttl", "0"], "ttl must be a whole number from 30"),
        (["admin", "pairing-code", "--name", ""], "name must be a non-empty string"),
    ]
    for argv, message in refused_by_pond:
        with subtests.test(" ".join(argv)):
            assert_pond_refused(pond_cli(*argv, *state), message)
    assert rows(pond, "enrollment_codes") == 0 and rows(pond, "pairing_codes") == 0, "a code was minted"
    # What is not empty still works, and still means what it says.
    done = pond_cli("admin", "enrollment-code", "--tags", "pool:a,,pool:b", "--uses", "2", "--json", *state)
    assert done.returncode == 0, done.stderr
    assert '"tags": [\n    "pool:a",\n    "pool:b"\n  ]' in done.stdout and '"uses": 2' in done.stdout


def test_pond_submit_sends_an_empty_or_zero_value_as_given(pool, subtests):
    pond = pool.pond()
    state = ["--state-dir", str(pond.state_dir)]
    cases = [
        (["--timeout", "0"], "timeout must be a number from 1"),
        (["--name", ""], "name must be a non-empty string"),
        (["--tenant", ""], "tenant must be a non-empty string"),
        (["--credential", ""], "credential must be a non-empty string"),
        (["--backend", ""], "backend"),
        (["--idempotency-key", ""], "Idempotency-Key must be 1 to 128"),
        (["--allow-host", ""], "allow_hosts"),
    ]
    for flags, message in cases:
        with subtests.test(" ".join(flags)):
            assert_pond_refused(pond_cli("submit", *flags, *state, "--", "true"), message)
    with subtests.test("--sandbox ''"):
        done = pond_cli("submit", "--sandbox", "", *state, "--", "true")
        assert done.returncode == 2 and "--sandbox is not valid JSON" in done.stderr, done.stderr
    with subtests.test("credential set --provider ''"):
        env = dict(env_for_children(), API_KEY="k")
        done = pond_cli("admin", "credential", "set", "c1", "--secret", "API_KEY", "--provider", "", *state,
                        env=env)
        assert_pond_refused(done, "provider")
    assert rows(pond, "jobs") == 0 and rows(pond, "credentials") == 0


def test_pond_flags_that_name_a_file_url_or_address_refuse_empty(pool, tmp_path, subtests):
    pond = pool.pond()
    state = ["--state-dir", str(pond.state_dir)]
    client = [
        (["jobs", "--ca-file", "", *state], "--ca-file"),
        (["jobs", "--token-file", "", *state], "--token-file"),
        (["jobs", "--pond", "", *state], "--pond"),
        (["jobs", "--state-dir", ""], "--state-dir"),
        (["verify", "j_000000000000", "--state-dir", ""], "--state-dir"),
        (["admin", "credential", "set", "c1", "--secrets-file", "", *state], "--secrets-file"),
    ]
    # Had the empty value been taken, --poll-hold 0 would stop `serve` at start instead of serving,
    # and a state dir that is a file would stop `up`.
    serve = ["serve", "--state-dir", str(tmp_path / "other"), "--poll-hold", "0"]
    not_a_dir = tmp_path / "file"
    not_a_dir.write_text("")
    server = [
        ([*serve, "--bind", ""], "--bind"),
        ([*serve, "--bind", "127.0.0.1:0", "--admin-token-file", ""], "--admin-token-file"),
        ([*serve, "--bind", "127.0.0.1:0", "--tls-cert", "", "--tls-key", ""], "--tls-cert"),
        ([*serve, "--bind", "127.0.0.1:0", "--credential-key-file", ""], "--credential-key-file"),
        (["up", "--bind", "", "--state-dir", str(not_a_dir)], "--bind"),
    ]
    for argv, flag in client + server:
        with subtests.test(" ".join(argv)):
            assert_refused_empty(pond_cli(*argv), flag)


def test_pond_serve_refuses_a_zero_request_timeout(tmp_path):
    done = pond_cli("serve", "--state-dir", str(tmp_path), "--bind", "127.0.0.1:0", "--request-timeout", "0",
                    timeout=20)
    assert done.returncode == 2, done.stderr
    assert "request timeout 0.0 s is out of range" in done.stderr


def test_swarm_pair_with_an_empty_code_does_not_use_the_environment_s(pool, tmp_path):
    pond = pool.pond()
    env = dict(env_for_children(), SWARM_PAIRING_CODE=pond.pairing_code())
    done = swarm("pair", "--pond", pond.url, "--code", "", "--out", str(tmp_path / "h.json"), env=env)
    assert_refused_empty(done, "--code")
    assert rows(pond, "bindings") == 0 and not (tmp_path / "h.json").exists()


def test_swarm_flags_that_name_something_refuse_empty(pool, tmp_path, subtests):
    pond = pool.pond()
    out = ["--out", str(tmp_path / "h.json")]
    pair = [
        (["pair", "--pond", pond.url, "--code", pond.pairing_code(), "--ca-file", "", *out], "--ca-file"),
        (["pair", "--pond", pond.url, "--code", pond.pairing_code(), "--name", "", *out], "--name"),
        (["pair", "--pond", pond.url, "--code", pond.pairing_code(), "--out", ""], "--out"),
        (["pair", "--pond", "", "--code", pond.pairing_code(), *out], "--pond"),
    ]
    # The missing handle stops a serve that took the empty value; --concurrency 0 a worker.
    serve = ["serve", "--bind", "127.0.0.1:0", "--state-dir", str(tmp_path / "s"), "--handle", str(tmp_path / "none")]
    serve_cases = [(["serve", "--bind", "127.0.0.1:0", "--handle", ""], "--handle")] + [
        ([*serve, flag, ""], flag) for flag in ("--token", "--token-file", "--pond", "--ca-file", "--tls-cert")]
    serve_cases.append((["serve", "--bind", "127.0.0.1:0", "--state-dir", ""], "--state-dir"))
    worker = ["worker", "--orchestrator", "http://127.0.0.1:9", "--state-dir", str(tmp_path / "w"), "--concurrency", "0"]
    worker_cases = [([*worker, flag, ""], flag) for flag in ("--ca-file", "--enroll-code", "--repo-root", "--name",
                                                             "--sandbox-dir", "--egress-ports")]
    worker_cases += [(["worker", "--orchestrator", "", "--concurrency", "0"], "--orchestrator"),
                     (["worker", "--show-fingerprint", "--state-dir", ""], "--state-dir")]
    operator = [([command, *extra, "--orchestrator", "http://127.0.0.1:9", "--token", "t", flag, ""], flag)
                for command, extra in (("status", []), ("jobs", []), ("cancel", ["j_1"]), ("evict", ["w_1"]))
                for flag in ("--ca-file", "--state-dir", "--token-file")]
    operator += [(["status", "--orchestrator", "", "--token", "t"], "--orchestrator"),
                 (["jobs", "--orchestrator", "http://127.0.0.1:9", "--token", ""], "--token")]
    env = dict(env_for_children(), SWARM_TOKEN="pool-secret", SWARM_ENROLL_CODE="ABCD-EFGH-JKMN")
    for argv, flag in pair + serve_cases + worker_cases + operator:
        with subtests.test(" ".join(argv)):
            assert_refused_empty(swarm(*argv, env=env, timeout=20), flag)
    assert rows(pond, "bindings") == 0


def test_swarm_worker_empty_lists_still_mean_none(tmp_path):
    """--tags '' and --capabilities '' (no tags, no capabilities), --egress-allow '' (no host) are kept."""
    done = swarm("worker", "--orchestrator", "http://127.0.0.1:9", "--state-dir", str(tmp_path / "w"),
                 "--tags", "", "--capabilities", "", "--egress-allow", "", "--egress-deny", "", "--concurrency", "0")
    assert done.returncode == 2 and "--concurrency must be from 1 to 256" in done.stderr, done.stderr

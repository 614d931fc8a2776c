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

"""The docs' command blocks marked runnable run as printed, against a real pool (issue 12).

The marker is the line `<!-- runnable -->` right before a ```sh block, in README.md or
docs/*.md. The blocks of one file run in order, in one new empty directory (so `./pond-state`
and the other relative paths land there), one command at a time: a line that ends in `\\`
goes on to the next, blank and comment lines are skipped, the rest is bash's
(`bash -e -o pipefail -c LINE`), with `pond` and `python` on PATH meaning this checkout's.

- A server (`pond serve`, `pond up`, `python -m swarm serve`, `python -m swarm worker`, after any
  `NAME=value` that sets its environment) starts in the background and is waited for until it
  prints its ready line; it is stopped once the file's last block has run.
- `NAME=$(...)` keeps its value for the commands after it, as a shell would.
- Any other command must exit 0.

The only change to the text: the docs' fixed ports, 127.0.0.1:8001 and 127.0.0.1:8080, become
free ports, so the test runs beside a `pond up` or another test. A block that needs what a
test machine lacks (a real host name, a certificate, an API key) is not marked.
"""

import os
import re
import shlex
import sys
from pathlib import Path

import pytest

from conftest import ROOT, Proc, env_for_children, free_port, run

MARKER = "<!-- runnable -->"
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
PORTS = ("127.0.0.1:8001", "127.0.0.1:8080")
ASSIGNMENT = re.compile(r"^([A-Za-z_][A-Za-z0-9_]*)=\$\(")
ASSIGNMENT_PREFIX = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*=")          # NAME=value before a command


def runnable_blocks(path):
    """The runnable ```sh blocks of a file: [(line number, [logical command lines])]."""
    lines, blocks = path.read_text().splitlines(), []
    for i, line in enumerate(lines):
        if line.strip() != MARKER:
            continue
        assert i + 1 < len(lines) and lines[i + 1].strip() == "```sh", \
            f"{path.name}:{i + 1}: {MARKER} must come right before a ```sh block"
        end = lines.index("```", i + 2)
        commands, pending = [], ""
        for text in lines[i + 2:end]:
            pending += text + "\n"
            if text.endswith("\\"):
                continue
            if pending.strip() and not pending.lstrip().startswith("#"):
                commands.append(pending.rstrip("\n"))
            pending = ""
        blocks.append((i + 2, commands))
    return blocks


def is_server(command):
    words = shlex.split(command, comments=True)
    while words and ASSIGNMENT_PREFIX.match(words[0]):       # SWARM_ENROLL_CODE="$CODE" python -m swarm worker
        words = words[1:]
    if words[:2] in (["pond", "serve"], ["pond", "up"]):
        return True
    return (words[:3] in (["python", "-m", "swarm"], ["python3", "-m", "swarm"]) and len(words) > 3
            and words[3] in ("serve", "worker") and "--show-fingerprint" not in words)


def marked_files():
    return [p for p in DOCS if runnable_blocks(p)]


def test_the_readme_and_the_operator_guide_have_runnable_blocks():
    assert {p.name for p in marked_files()} >= {"README.md", "operator-guide.md"}


@pytest.mark.parametrize("doc", marked_files(), ids=lambda p: p.name)
def test_runnable_blocks_run_as_printed(doc, tmp_path, pool):
    work, bin_dir = tmp_path / "work", tmp_path / "bin"
    work.mkdir()
    bin_dir.mkdir()
    for name, argv in (("python", ""), ("pond", " -m pond")):
        (bin_dir / name).write_text(f'#!/bin/sh\nexec {shlex.quote(sys.executable)}{argv} "$@"\n')
        (bin_dir / name).chmod(0o755)
    env = pool.pond_env(work / "pond-state")     # on PostgreSQL, the docs' pond keeps its data there
    env["PATH"] = f"{bin_dir}{os.pathsep}{env['PATH']}"
    ports = {text: f"127.0.0.1:{free_port()}" for text in PORTS}
    servers = []
    try:
        for line, commands in runnable_blocks(doc):
            for command in commands:
                for text, port in ports.items():
                    command = command.replace(text, port)
                where = f"{doc.name}, block at line {line}: {command}"
                if is_server(command):
                    # `NAME=value exec server`: the assignments reach the server; exec keeps its pid the Proc's
                    prefix = re.match(r"((?:[A-Za-z_][A-Za-z0-9_]*=(?:\"[^\"]*\"|'[^']*'|\S+)\s+)*)", command)[1]
                    proc = Proc(["bash", "-c", f"{prefix}exec {command[len(prefix):]}"],
                                tmp_path / f"server{len(servers)}.log", env=dict(env), cwd=work)
                    servers.append(proc)
                    proc.ready()
                    assert proc.alive(), f"{where}\nexited: {proc.stderr()}"
                    continue
                name = ASSIGNMENT.match(command)
                script = command + (f'\nprintf %s "${name[1]}"' if name else "")
                done = run(["bash", "-e", "-o", "pipefail", "-c", script], timeout=60, env=dict(env), cwd=work)
                assert done.returncode == 0, (f"{where}\nexit {done.returncode}\nstdout:\n{done.stdout}\n"
                                              f"stderr:\n{done.stderr}")
                if name:
                    assert done.stdout, f"{where}\nset ${name[1]} to nothing; stderr:\n{done.stderr}"
                    env[name[1]] = done.stdout
    finally:
        for proc in reversed(servers):
            proc.stop()

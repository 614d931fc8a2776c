"""A slot's spawner (specs/sandbox.md §6.1) driven directly through swarm.py's Sandboxes, with what
no pond would send: an orchestrator is not trusted, and the assignment it relays reaches the
spawner as NUL-terminated fields."""

import errno
import os
import sys
import types
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import swarm  # noqa: E402


@pytest.fixture
def slot(tmp_path):
    tmp_path.chmod(0o711)
    (tmp_path / "state").mkdir(mode=0o700)
    s = types.SimpleNamespace(state_dir=tmp_path / "state", sandbox_dir=str(tmp_path / "sandbox"),
                              slot_uid_base=61000 if os.geteuid() == 0 else None, keep_job_dirs=False,
                              repo_root=tmp_path)
    sandboxes = swarm.Sandboxes(s, ["process"])
    try:
        if sandboxes.helper is None:
            pytest.skip("no C compiler: the spawner is Python's, which takes the plan as JSON")
        yield sandboxes, sandboxes.slot(0)
    finally:
        sandboxes.close()


def run(sandboxes, slot, argv, env):
    """One `profile: none` job in the slot -> (exit code, stdout); OSError if it cannot start."""
    conf = swarm.confinement({"profile": "none"})
    sandboxes.open_slot(slot, "j_test", 1, conf)
    launch = sandboxes.providers["process"].launch(conf, argv, slot, swarm.sandbox_env(conf, env, slot, "process"))
    try:
        proc = launch.spawn()
        out, _ = proc.communicate(timeout=30)
        return proc.returncode, out
    finally:
        if launch.proc is not None:
            launch.signal(9)
        launch.end()
        sandboxes.close_slot(slot)


def test_a_nul_byte_in_a_job_s_argv_or_environment_never_reaches_the_spawner(slot):
    """A NUL inside a field would shift the fields after it (an environment entry made out of an
    argument's tail): the worker refuses such a job before sending it, and the spawner, which
    never saw it, starts the next job as usual."""
    sandboxes, s = slot
    for argv, env in ((["/bin/echo", "a\0b"], {}), (["/bin/echo", "x"], {"X": "1\0LD_PRELOAD=/nowhere.so"})):
        with pytest.raises(OSError) as refused:
            run(sandboxes, s, argv, env)
        assert refused.value.errno == errno.EINVAL and "NUL" in str(refused.value), refused.value
    assert s.spawner.alive
    assert run(sandboxes, s, ["/bin/echo", "next"], {"X": "1"}) == (0, b"next\n")


def test_the_start_helper_is_the_spawner_and_its_jobs_are_its_children(slot):
    """No program runs between the spawner and the job: the job's parent is the helper serving
    the slot, and its exec failures come back as errno, as Popen raises them."""
    sandboxes, s = slot
    assert Path(f"/proc/{s.spawner.pid}/cmdline").read_bytes().split(b"\0")[1:2] == [b"--serve"]
    code, out = run(sandboxes, s, ["/bin/sh", "-c", "grep PPid /proc/$$/status"], {})
    assert code == 0 and out.split() == [b"PPid:", str(s.spawner.pid).encode()], out
    with pytest.raises(OSError) as missing:
        run(sandboxes, s, ["/no/such/command"], {})
    assert missing.value.errno == errno.ENOENT, missing.value

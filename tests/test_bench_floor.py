"""bench/floor.py measures the pool with its per-job guarantees switched off in scratch copies.
Its switches are text replacements in swarm.py and pond/: this keeps them applying to the code
as it moves, so the figure in bench/README.md can be made again. Nothing here runs a pool."""

import importlib.util
import py_compile

import pytest

from conftest import ROOT


@pytest.fixture(scope="module")
def floor():
    spec = importlib.util.spec_from_file_location("floor", ROOT / "bench" / "floor.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_each_switch_applies_once_and_leaves_code_that_compiles(floor, tmp_path):
    copy = floor.copy_tree(tmp_path / "copy", list(floor.SWITCHES))
    for name, changes in floor.SWITCHES.items():
        for rel, old, new in changes:
            text = (copy / rel).read_text()
            assert new in text and (ROOT / rel).read_text().count(old) == 1, (name, rel)
            py_compile.compile(str(copy / rel), doraise=True)
    assert (ROOT / "swarm.py").read_text() != (copy / "swarm.py").read_text()     # this tree is untouched


def test_a_switch_that_no_longer_applies_stops_the_run_with_what_to_update(floor, tmp_path, monkeypatch):
    monkeypatch.setitem(floor.SWITCHES, "logs", [("swarm.py", "no such line\n", "x\n")])
    with pytest.raises(SystemExit) as stopped:
        floor.copy_tree(tmp_path / "copy", ["logs"])
    assert "switch 'logs' no longer applies to swarm.py" in str(stopped.value)
    assert "update bench/floor.py" in str(stopped.value)

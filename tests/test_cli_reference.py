"""docs/cli.md is what the parsers of `pond` and `swarm.py` say today (issue 12): a flag added,
renamed or reworded without running `python docs/cli_reference.py` fails here."""

import sys

from conftest import ROOT, run


def test_cli_reference_is_current():
    done = run([sys.executable, str(ROOT / "docs" / "cli_reference.py"), "--check"], timeout=60)
    assert done.returncode == 0, done.stderr + "\nrun: python docs/cli_reference.py"


def test_cli_reference_names_every_command_and_flag():
    text = (ROOT / "docs" / "cli.md").read_text()
    for heading in ("### `pond submit`", "### `pond admin credential set`", "### `swarm.py worker`",
                    "### `swarm.py evict`"):
        assert heading in text
    for flag in ("`--idempotency-key KEY`", "`--egress-allow HOSTS`", "`--worker-lost-after S`", "`--follow`, `-f`"):
        assert flag in text
    assert "--egress-allow-loopback" not in text          # hidden flags (help=SUPPRESS) stay hidden

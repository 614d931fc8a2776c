"""Write docs/cli.md, the command-line reference, from the argparse parsers of `pond` and `swarm.py`.

    python docs/cli_reference.py            # rewrite docs/cli.md
    python docs/cli_reference.py --check    # exit 1 if docs/cli.md is not what the parsers say

The parsers are the one source: a flag's name, its value's name and its help text are read
from them, so the reference cannot say what the programs do not. Tables are written here, not
taken from argparse's own help, whose layout changes between Python versions.
"""

import argparse
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import swarm  # noqa: E402
from pond import cli  # noqa: E402

OUT = ROOT / "docs" / "cli.md"
HEAD = """# Command-line reference

Every command of `pond` (the control plane and its client) and of `swarm.py` (the orchestrator,
the worker and their operator commands), with every flag. Written by `python docs/cli_reference.py`
from the programs' own parsers (a test checks it is current); `--help` on any command says the same.
Exit codes: [errors.md](errors.md). Where to start: [quickstart.md](quickstart.md).
"""


def _subcommands(parser):
    """[(name, help, subparser)] of a parser's sub-commands, in the order they were added."""
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            helps = {a.dest: a.help for a in action._choices_actions}
            return [(name, helps.get(name, ""), sub) for name, sub in action.choices.items()]
    return []


def _cell(text):
    return " ".join(str(text).split()).replace("|", "\\|")


def _help(action, prog):
    if not action.help:
        return ""
    params = {k: v for k, v in vars(action).items() if v is not argparse.SUPPRESS}
    params["prog"] = prog
    for key in ("choices", "default"):
        if isinstance(params.get(key), (list, tuple)):
            params[key] = ", ".join(map(str, params[key]))
    return action.help % params


def _flag(action):
    if not action.option_strings:
        return f"`{action.metavar or action.dest}`" + (" ..." if action.nargs == argparse.REMAINDER else "")
    value = ""
    if action.nargs != 0:
        value = " " + (action.metavar or ("{" + ",".join(action.choices) + "}" if action.choices
                                          else action.dest.upper()))
    return ", ".join(f"`{name}{value}`" for name in action.option_strings)


def _command(prog, helptext, parser, out, common=()):
    """A command's section, then its sub-commands'. `common`: the (flag, help) rows of the
    top command that a sub-command repeats (pond's --pond, --state-dir...), said once there."""
    hidden = (argparse._HelpAction, argparse._SubParsersAction)
    rows = [(_flag(a), _help(a, prog)) for a in parser._actions
            if a.help is not argparse.SUPPRESS and not isinstance(a, hidden)]
    shared = [row for row in rows if row in common and row[0] != "`--version`"]
    rows = [row for row in rows if row not in shared]
    subs = _subcommands(parser)
    out += [f"### `{prog}`", ""]
    if helptext:
        out += [_cell(helptext[0].upper() + helptext[1:]) + ".", ""]
    if shared:
        names = ", ".join("`" + flag.split()[0].strip("`") + "`" for flag, _ in shared)
        out += [f"Takes the options of `{prog.split()[0]}` above ({names}).", ""]
    if subs:
        out += ["Commands: " + ", ".join(f"`{name}`" for name, _, _ in subs) + ".", ""]
    if rows:
        out += ["| Argument | What it does |", "|---|---|"]
        out += [f"| {flag} | {_cell(text)} |" for flag, text in rows]
        out.append("")
    for name, subhelp, sub in subs:
        _command(f"{prog} {name}", subhelp, sub, out, common or rows)


def render():
    out = [HEAD]
    for title, parser in (("pond", cli.build_parser()), ("swarm.py", swarm.build_parser())):
        out += [f"## {title}", "", _cell(parser.description) + ".", ""]
        _command(parser.prog, "", parser, out)
    return "\n".join(out).rstrip("\n") + "\n"


def main(argv):
    text = render()
    if argv[1:] == ["--check"]:
        if OUT.read_text() != text:
            print(f"{OUT} is not current: run python docs/cli_reference.py", file=sys.stderr)
            return 1
        return 0
    OUT.write_text(text)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))

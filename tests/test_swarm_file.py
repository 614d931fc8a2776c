"""swarm.py is one file that an operator copies to a host: standard library only, readable, in order.

These are static checks of the source (AST and text); none of them runs swarm.py.
"""

import ast
import re
import sys
from pathlib import Path

import pytest

from conftest import ROOT, SWARM

MAX_LINES = 7145     # issue 12 egress and broker counts in final reports (+23), issue 12 (+4), issue 10's broker and agent jobs (+403), issue 13 pond URL lists (+57), issue 9 idle workers and leftovers (+69), issue 11 bundles and artifacts, issue 12 log format and orchestrator metrics, issue 9 the start helper (its C source, +190) and cheaper log lines, issue 11 blob stores, retention, mirror cap, redeem retry (+33), issue 12 orchestrator job lines, status/jobs tables (+37), issue 9 a job waiting ahead is cancelled at once, one not started is handed back at a stop (+13), issue 9 no scratch dir for a job without a source (+5), a delivered batch leaves the outbox in one commit (+4), the start helper serves as the slot's spawner: its C loop, the worker's plan for it (+172), withdrawals: the orchestrator relays them, a worker gives back a job not started (+33)
# Modules swarm.py may import beyond the standard library, and only inside a function
# (so the file still runs where they are not installed).
OPTIONAL_LAZY = {"cryptography"}

# The banner titles in the order the file has them (the text before any "(...)").
# Reordering or renaming a section must be a deliberate edit of this list.
EXPECTED_SECTIONS = [
    "Imports",
    "Constants and defaults",
    "Errors",
    "Utilities",
    "Wire format",
    "Keys and fingerprint",
    "Sealing",
    "Attestation",
    "HTTP client",
    "HTTP server",
    "Settings",
    "Pairing",
    "Orchestrator: worker registry",
    "Orchestrator: the pool",
    "Orchestrator: the two links to pond",
    "Job proxies",
    "Credential broker",
    "Worker: identity and enrollment",
    "Worker: reporting to the orchestrator",
    "Sandbox: confining one job",
    "Sandbox: starting a job",
    "Sandbox providers",
    "Sandbox slots",
    "Bundles and artifacts",
    "Worker: running one job",
    "Worker: the claim loop and slots",
    "Operator commands: status, jobs, cancel",
    "Command line",
]

BANNER_RULE = re.compile(r"^# ={20,}$")

# Lines each section may grow to: a section past its budget should be split or cut, on purpose.
SECTION_BUDGETS = {
    "Imports": 51, "Constants and defaults": 49, "Errors": 70, "Utilities": 270, "Wire format": 81,
    "Keys and fingerprint": 125, "Sealing": 100, "Attestation": 63, "HTTP client": 216, "HTTP server": 733,
    "Settings": 252, "Pairing": 30, "Orchestrator: worker registry": 178, "Orchestrator: the pool": 725,
    "Orchestrator: the two links to pond": 294, "Job proxies": 420, "Credential broker": 296, "Worker: identity and enrollment": 75,
    "Worker: reporting to the orchestrator": 104, "Sandbox: confining one job": 375, "Sandbox: starting a job": 950,
    "Sandbox providers": 200, "Sandbox slots": 317,
    "Worker: running one job": 421, "Worker: the claim loop and slots": 222,
    "Operator commands: status, jobs, cancel": 83, "Command line": 172, "Bundles and artifacts": 350,
}


@pytest.fixture(scope="module")
def source():
    return Path(SWARM).read_text()


@pytest.fixture(scope="module")
def tree(source):
    return ast.parse(source, filename=SWARM)


def imports(tree):
    """(root module name, line, inside a function?) for every import statement."""
    out = []

    def visit(node, in_function):
        for child in ast.iter_child_nodes(node):
            nested = in_function or isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda))
            if isinstance(child, ast.Import):
                out.extend((alias.name.split(".")[0], child.lineno, in_function) for alias in child.names)
            elif isinstance(child, ast.ImportFrom):
                if child.level:            # a relative import: swarm.py is not a package
                    out.append((f".{child.module or ''}", child.lineno, in_function))
                else:
                    out.append((child.module.split(".")[0], child.lineno, in_function))
            visit(child, nested)

    visit(tree, False)
    return out


def dynamic_imports(tree):
    """Module names given as string literals to __import__ / importlib.import_module."""
    out = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Call) and node.args and isinstance(node.args[0], ast.Constant):
            fn = node.func
            name = fn.id if isinstance(fn, ast.Name) else fn.attr if isinstance(fn, ast.Attribute) else ""
            if name in ("__import__", "import_module") and isinstance(node.args[0].value, str):
                out.append((node.args[0].value.split(".")[0], node.lineno))
    return out


def banner_titles(source):
    """Titles of `# ====` / `# Title` / `# ====` banners, in file order."""
    lines = source.splitlines()
    titles = []
    for i in range(len(lines) - 2):
        if BANNER_RULE.match(lines[i]) and BANNER_RULE.match(lines[i + 2]) and lines[i + 1].startswith("# "):
            titles.append((i + 1, lines[i + 1][2:].strip()))
    return titles


def test_swarm_imports_only_the_standard_library(tree):
    stdlib = set(sys.stdlib_module_names)
    bad = [(name, line) for name, line, _ in imports(tree) if name not in stdlib and name not in OPTIONAL_LAZY]
    bad += [(name, line) for name, line in dynamic_imports(tree) if name not in stdlib and name not in OPTIONAL_LAZY]
    assert not bad, f"swarm.py imports modules outside the standard library: {bad}"


def test_optional_modules_are_imported_only_inside_functions(tree):
    eager = [(name, line) for name, line, in_function in imports(tree) if name in OPTIONAL_LAZY and not in_function]
    assert not eager, (f"swarm.py imports optional modules at module level, so it fails where they are "
                       f"not installed: {eager}")


def test_swarm_is_under_the_line_budget(source):
    n = len(source.splitlines())
    assert n < MAX_LINES, f"swarm.py has {n} lines; the budget for one readable file is {MAX_LINES}"


def test_each_section_is_within_its_budget(source):
    titles = banner_titles(source)
    ends = [line for line, _ in titles[1:]] + [len(source.splitlines()) + 1]
    over = [(title.split(" (")[0], end - line, SECTION_BUDGETS.get(title.split(" (")[0]))
            for (line, title), end in zip(titles, ends)
            if end - line > SECTION_BUDGETS.get(title.split(" (")[0], 0)]
    assert not over, f"sections over their line budget (section, lines, budget): {over}"


def test_banner_sections_appear_in_the_expected_order(source):
    found = [title.split(" (")[0] for _, title in banner_titles(source)]
    assert found == EXPECTED_SECTIONS, (
        "swarm.py's banner sections changed; if on purpose, update EXPECTED_SECTIONS.\n"
        f"found:    {found}\nexpected: {EXPECTED_SECTIONS}")


def test_every_top_level_definition_lives_in_a_section(source, tree):
    first_banner = banner_titles(source)[0][0]
    outside = [node.name for node in tree.body
               if isinstance(node, (ast.FunctionDef, ast.ClassDef)) and node.lineno < first_banner]
    assert not outside, f"defined before the first banner section: {outside}"
    starts = [line for line, _ in banner_titles(source)] + [len(source.splitlines()) + 1]
    empty = [title for (line, title), end in zip(banner_titles(source), starts[1:])
             if not any(line < node.lineno < end for node in tree.body)]
    assert not empty, f"banner sections with no code: {empty}"


def test_main_is_the_last_top_level_function(tree):
    functions = [node for node in tree.body if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef))]
    assert functions and functions[-1].name == "main", \
        f"the last top-level function is {functions[-1].name if functions else None}, not main"
    after_main = tree.body[tree.body.index(functions[-1]) + 1:]
    later = [ast.unparse(node).splitlines()[0] for node in after_main
             if not (isinstance(node, ast.If) and "__name__" in ast.unparse(node.test))]
    assert not later, f"only the `if __name__ == '__main__':` block may follow main(); found {later}"


def test_dunder_all_names_exist(tree):
    assigned = [node for node in tree.body if isinstance(node, ast.Assign)
                and any(isinstance(t, ast.Name) and t.id == "__all__" for t in node.targets)]
    assert assigned, "swarm.py has no __all__"
    names = ast.literal_eval(assigned[0].value)
    defined = set()
    for node in tree.body:
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            defined.add(node.name)
        elif isinstance(node, ast.Assign):
            for target in node.targets:
                for leaf in ast.walk(target):
                    if isinstance(leaf, ast.Name):
                        defined.add(leaf.id)
    missing = [name for name in names if name not in defined]
    assert not missing, f"__all__ names that swarm.py does not define at top level: {missing}"
    import swarm            # the names must also resolve on the imported module
    assert all(hasattr(swarm, name) for name in names)


def test_pond_never_imports_swarm():
    offenders = []
    for path in sorted((ROOT / "pond").glob("*.py")):
        tree = ast.parse(path.read_text(), filename=str(path))
        names = [name for name, _, _ in imports(tree)] + [name for name, _ in dynamic_imports(tree)]
        if "swarm" in names:
            offenders.append(path.name)
    assert not offenders, f"pond modules import swarm (pond only starts it as a process): {offenders}"


def test_swarm_never_imports_pond(tree):
    names = [(name, line) for name, line, _ in imports(tree) if name == "pond"]
    names += [(name, line) for name, line in dynamic_imports(tree) if name == "pond"]
    assert not names, f"swarm.py imports pond (it must run on a host without pond installed): {names}"


def _bound_locally(node):
    """Names a function or class binds itself (arguments, assignments, imports, nested defs)."""
    bound = set()
    for sub in ast.walk(node):
        if isinstance(sub, ast.arg):
            bound.add(sub.arg)
        elif isinstance(sub, ast.Name) and isinstance(sub.ctx, ast.Store):
            bound.add(sub.id)
        elif isinstance(sub, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)) and sub is not node:
            bound.add(sub.name)
        elif isinstance(sub, (ast.Import, ast.ImportFrom)):
            bound.update((a.asname or a.name).split(".")[0] for a in sub.names)
    return bound


def test_each_section_uses_only_what_is_above_it(source, tree):
    """swarm.py reads top to bottom: code in a section uses names defined in it or above it,
    never one from a later section (main() in "Command line", the last, may use anything)."""
    starts = [line for line, _ in banner_titles(source)]
    titles = [title.split(" (")[0] for _, title in banner_titles(source)]

    def section(lineno):
        return max(i for i, start in enumerate(starts) if start <= lineno)

    defined = {}
    for node in tree.body:
        names = []
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            names = [node.name]
        elif isinstance(node, (ast.Assign, ast.AnnAssign)):
            targets = node.targets if isinstance(node, ast.Assign) else [node.target]
            names = [leaf.id for t in targets for leaf in ast.walk(t) if isinstance(leaf, ast.Name)]
        for name in names:
            defined.setdefault(name, section(node.lineno))
    later = []
    for node in tree.body:
        if node.lineno < starts[0] or isinstance(node, ast.If):
            continue
        here = section(node.lineno)
        local = _bound_locally(node) if isinstance(node, (ast.FunctionDef, ast.ClassDef)) else set()
        for sub in ast.walk(node):
            if isinstance(sub, ast.Name) and isinstance(sub.ctx, ast.Load) and sub.id not in local:
                where = defined.get(sub.id)
                if where is not None and where > here:
                    later.append(f"{titles[here]}: line {sub.lineno} uses {sub.id} from {titles[where]}")
    assert not later, "sections using names defined below them:\n" + "\n".join(sorted(set(later)))

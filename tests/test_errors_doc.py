"""docs/errors.md lists every error code pond and swarm.py can produce, with its HTTP status.

The codes are collected from the source, not from a list kept here, so a new code without
a row in docs/errors.md (or a row for a code that no longer exists) fails this test.
"""

import ast
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
POND = sorted((ROOT / "pond").glob("*.py"))
SWARM = ROOT / "swarm.py"
DOC = ROOT / "docs" / "errors.md"

# Modules whose errors end in the CLI (stderr + exit code) and never travel over HTTP.
CLIENT_SIDE_MODULES = {"cli.py", "client.py", "up.py", "settings.py", "__main__.py"}
# Raised at start-up only, never rendered as an HTTP answer (errors.py says so).
CLIENT_SIDE_CLASSES = {"ConfigError"}
ROW = re.compile(r"^\|\s*`([a-z_]+)`\s*\|([^|]*)\|")


def _pond_error_classes():
    """class name -> HTTP status, following the hierarchy in pond/errors.py."""
    tree = ast.parse((ROOT / "pond" / "errors.py").read_text())
    own, bases = {}, {}
    for node in tree.body:
        if isinstance(node, ast.ClassDef):
            bases[node.name] = node.bases[0].id if node.bases and isinstance(node.bases[0], ast.Name) else None
            for stmt in node.body:
                if (isinstance(stmt, ast.Assign) and any(getattr(t, "id", None) == "status" for t in stmt.targets)
                        and isinstance(stmt.value, ast.Constant)):
                    own[node.name] = stmt.value.value

    def status(name):
        while name is not None and name not in own:
            name = bases.get(name)
        return own.get(name)

    return {name: status(name) for name in bases}, tree


def _const_str(node):
    return node.value if isinstance(node, ast.Constant) and isinstance(node.value, str) else None


def source_codes():
    """code -> set of HTTP statuses the source gives it (empty when not fixed in the source)."""
    classes, errors_tree = _pond_error_classes()
    codes = {}

    def add(code, status=None):
        codes.setdefault(code, set())
        if status is not None:
            codes[code].add(status)

    for node in errors_tree.body:          # class-level `code = "..."`
        if isinstance(node, ast.ClassDef):
            for stmt in node.body:
                if (isinstance(stmt, ast.Assign) and any(getattr(t, "id", None) == "code" for t in stmt.targets)
                        and _const_str(stmt.value)):
                    add(stmt.value.value, None if node.name in CLIENT_SIDE_CLASSES else classes[node.name])

    for path in [*POND, SWARM]:
        server_side = path.name not in CLIENT_SIDE_MODULES
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Call):
                func = getattr(node.func, "id", None) or getattr(node.func, "attr", None)
                for kw in node.keywords:        # PondError subclasses: Forbidden(..., code="code_unknown")
                    if kw.arg == "code" and _const_str(kw.value):
                        # PondError itself has no fixed status: server.py sets it per answer (send_error).
                        fixed = server_side and path != SWARM and func in classes and func != "PondError"
                        add(kw.value.value, classes[func] if fixed else None)
                if func in ("HttpError", "Refused") and len(node.args) >= 2 and _const_str(node.args[1]):
                    status = node.args[0].value if func == "HttpError" and isinstance(node.args[0], ast.Constant) \
                        else None
                    add(node.args[1].value, status)
            elif isinstance(node, ast.Dict):      # literal error bodies: {"code": "internal", "message": ...}
                keys = [_const_str(k) if k is not None else None for k in node.keys]
                if "code" in keys and "message" in keys:
                    value = _const_str(node.values[keys.index("code")])
                    if value:
                        add(value)
            elif isinstance(node, ast.FunctionDef):   # keyword defaults: ClientError(..., code="client")
                args = node.args
                for arg, default in zip(args.args[len(args.args) - len(args.defaults):], args.defaults):
                    if arg.arg == "code" and _const_str(default):
                        add(default.value)
    return codes


def documented_codes():
    """code -> set of HTTP statuses in its docs/errors.md row."""
    rows = {}
    for line in DOC.read_text().splitlines():
        m = ROW.match(line)
        if m:
            rows.setdefault(m.group(1), set()).update(int(s) for s in re.findall(r"\b[1-5]\d\d\b", m.group(2)))
    return rows


def test_collector_finds_codes_from_every_kind_of_source():
    codes = source_codes()
    # one of each: class attribute, keyword, swarm HttpError, literal body, client-side default
    for code in ("stale_attempt", "code_unknown", "pond_unreachable", "protocol", "client", "bad_answer"):
        assert code in codes, code


def test_every_error_code_is_documented():
    missing = sorted(set(source_codes()) - set(documented_codes()))
    assert not missing, f"add rows to docs/errors.md for: {missing}"


def test_every_documented_code_exists_in_the_source():
    stale = sorted(set(documented_codes()) - set(source_codes()))
    assert not stale, f"docs/errors.md documents codes the source no longer has: {stale}"


def test_documented_status_matches_the_source():
    documented = documented_codes()
    wrong = {code: sorted(statuses - documented.get(code, set())) for code, statuses in source_codes().items()
             if statuses - documented.get(code, set())}
    assert not wrong, f"docs/errors.md lacks these HTTP statuses: {wrong}"

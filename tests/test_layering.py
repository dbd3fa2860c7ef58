"""The module layering: every jpeft module imports only modules below it (no import cycle,
function-level imports included), and ``import jpeft`` stays light while reaching every module."""

import ast
import json
import pathlib
import subprocess
import sys

ROOT = pathlib.Path(__file__).parents[1]
PACKAGE = ROOT / "jpeft"


def _name(path: pathlib.Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {_name(p): p for p in PACKAGE.rglob("*.py")}


def _imports(module: str) -> set[str]:
    """The jpeft modules ``module`` imports anywhere in its code (in functions too). A
    ``from jpeft.X import name`` counts as importing ``jpeft.X.name`` where that is a module.
    Python imports a package before its submodules; that implicit import is not counted."""
    path = MODULES[module]
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative: from the module's package up
                up = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(up + ([base] if base else []))
            found |= {f"{base}.{a.name}" if f"{base}.{a.name}" in MODULES else base for a in node.names}
    return {m for m in found if m in MODULES and m != module}


GRAPH = {m: _imports(m) for m in MODULES}


def _below(module: str) -> set[str]:
    seen, todo = set(), [module]
    while todo:
        for dep in GRAPH[todo.pop()] - seen:
            seen.add(dep)
            todo.append(dep)
    return seen


def test_no_import_cycle():
    state: dict[str, str] = {}

    def visit(m, stack):
        state[m] = "open"
        for dep in sorted(GRAPH[m]):
            if state.get(dep) == "open":
                cycle = stack[stack.index(dep):] + [dep]
                raise AssertionError("import cycle: " + " -> ".join(cycle))
            if dep not in state:
                visit(dep, stack + [dep])
        state[m] = "done"

    for m in sorted(MODULES):
        if m not in state:
            visit(m, [m])


def test_layers():
    """The bottom of the stack imports nothing above it: paths, layouts and nodes sit below
    the methods, the methods and the hook protocol below the public operations of core."""
    for low in ("jpeft.node", "jpeft.tree", "jpeft.layout"):
        assert not {m for m in _below(low) if m.startswith("jpeft.methods") or m == "jpeft.core"}, low
    for mid in ("jpeft.methods", "jpeft.methods.registry", "jpeft.hooks", "jpeft.quantized", "jpeft.checkpoint",
                "jpeft.sharding"):
        assert "jpeft.core" not in _below(mid), mid
    assert "jpeft.core" in _below("jpeft.wrap") and "jpeft.hooks" in _below("jpeft.core")


def test_import_jpeft_is_light_and_reaches_every_module():
    """``import jpeft`` imports none of the heavy modules (they load on first attribute use);
    then ``jpeft.NAME`` is the module for every module file of the package."""
    public = sorted(p.stem if p.is_file() else p.name for p in PACKAGE.iterdir()
                    if (p.suffix == ".py" and p.stem != "__init__") or (p / "__init__.py").exists())
    # jpeft.methods is the method registry and jpeft.wrap the function, as the API has them
    names = [n for n in public if n not in ("methods", "wrap")]
    code = f"""
import json, sys, types
import jpeft
heavy = [m for m in ("jpeft.bench", "jpeft.pipeline", "jpeft.models", "jpeft.train", "jpeft.checkpoint",
                     "torch", "transformers", "flax", "orbax") if m in sys.modules]
modules = {{n: isinstance(getattr(jpeft, n), types.ModuleType) and getattr(jpeft, n).__name__ == "jpeft." + n
           for n in {names!r}}}
print(json.dumps({{"heavy": heavy, "modules": modules, "listed": sorted(set({names!r}) - set(dir(jpeft))),
                  "methods": type(jpeft.methods).__name__, "wrap": callable(jpeft.wrap)}}))
"""
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-3000:]
    got = json.loads(proc.stdout.splitlines()[-1])
    assert got["heavy"] == []
    assert got["modules"] == {n: True for n in names} and got["listed"] == []
    assert got["methods"] == "dict" and got["wrap"]

"""The package's layering: imports run one way (no cycle, lazy imports included) and
every third-party module it imports is a declared dependency."""

import ast
import sys
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
# Where each installed package's sources live (pyproject's `package-dir`).
PACKAGES = {"bicache_jax": ROOT / "bicache_jax", "bicache_jax.convert": ROOT / "convert",
            "bicache_jax.pallas_kernels": ROOT / "pallas_kernels"}
# Imported only where an optional install provides them, behind a clear error.
OPTIONAL = {"torch": "pytorch_model*.bin conversion", "lm_eval": "the [eval] extra"}


def _modules() -> dict[str, Path]:
    mods = {}
    for pkg, folder in PACKAGES.items():
        for f in folder.glob("*.py"):
            mods[pkg if f.stem == "__init__" else f"{pkg}.{f.stem}"] = f
    return mods


def _imports(name: str, path: Path, modules) -> tuple[set[str], set[str]]:
    """(package modules, third-party top-level names) imported anywhere in the file
    (function bodies too: a lazy import closes a circle as well)."""
    is_pkg = path.stem == "__init__"
    base = name.split(".") if is_pkg else name.split(".")[:-1]
    inner, outer = set(), set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            targets = [(a.name, None) for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                mod = ".".join(base[:len(base) - node.level + 1] +
                               ([node.module] if node.module else []))
            else:
                mod = node.module
            targets = [(mod, a.name) for a in node.names]
        else:
            continue
        for mod, attr in targets:
            if mod.split(".")[0] != "bicache_jax":
                outer.add(mod.split(".")[0])
            elif attr and f"{mod}.{attr}" in modules:  # `from . import tasks`: the module
                inner.add(f"{mod}.{attr}")
            elif mod in modules:
                inner.add(mod)
    inner.discard(name)  # a module naming itself (e.g. for a registry) is no circle
    return inner, outer


def _graph():
    modules = _modules()
    return {m: _imports(m, p, modules) for m, p in modules.items()}


def _cycle(edges: dict[str, set[str]]) -> list[str] | None:
    """One import circle as [a, b, ..., a], or None (depth-first search)."""
    state, stack = {}, []

    def visit(m):
        state[m] = "open"
        stack.append(m)
        for n in sorted(edges.get(m, ())):
            if state.get(n) == "open":
                return stack[stack.index(n):] + [n]
            if n not in state and (found := visit(n)):
                return found
        stack.pop()
        state[m] = "done"
        return None

    for m in sorted(edges):
        if m not in state and (found := visit(m)):
            return found
    return None


def test_cycle_finder_finds_a_circle():
    assert _cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert _cycle({"a": {"b"}, "b": set()}) is None


def test_no_import_cycle_in_the_package():
    graph = _graph()
    assert "bicache_jax.model" in graph["bicache_jax.generate"][0]  # the parser sees imports
    cycle = _cycle({m: inner for m, (inner, _) in graph.items()})
    assert cycle is None, "import circle: " + " -> ".join(cycle)


def test_every_imported_library_is_a_declared_dependency():
    meta = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    declared = {d.split("[")[0].split(">")[0].split("=")[0].split("<")[0].strip()
                .replace("-", "_") for d in meta["dependencies"]}
    declared |= {"orbax"} if "orbax_checkpoint" in declared else set()
    used = set().union(*(outer for _, outer in _graph().values()))
    third_party = used - set(sys.stdlib_module_names) - set(OPTIONAL) - {"__future__"}
    missing = sorted(third_party - declared)
    assert not missing, f"imported but not in pyproject's dependencies: {missing}"

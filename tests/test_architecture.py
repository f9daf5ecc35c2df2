"""The layers of DESIGN §2 hold: the import graph of ``engine`` and ``kernels``, read from the source with
``ast`` (module-level and in-function imports, absolute and relative), has no edge pointing up a layer,
no cycle, no import of another module's private (underscore) names, and one ``deepspeed.initialize``.

Layers, bottom to top (docs/architecture.md): ``kernels`` < ``engine.models`` < ``engine.teacher``,
``engine.objectives``, ``engine.data`` < ``engine.sampling``, ``engine.eval`` < ``engine.trainer`` (the one
loop) < ``engine.diffusion_task``, ``engine.videogpa`` (what the trainer trains) < ``engine.train``.
Within the middle layer the peers may import each other (no cycles): ``teacher`` reads ``data`` (the
windows a cache holds) and ``objectives`` reads the teacher's feature keys; ``data`` imports no model.
"""
from __future__ import annotations

import ast
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
NAMESPACE = "geoforge"          # the folders engine/ and kernels/ are imported as geoforge.engine, geoforge.kernels
PACKAGES = ("engine", "kernels")


def q(name: str) -> str:
    """The import name of a module named by its folder path (``engine.models`` -> ``geoforge.engine.models``)."""
    return f"{NAMESPACE}.{name}"


@dataclass(frozen=True)
class Import:
    importer: str      # dotted module name
    target: str        # the dotted module it resolves to (the longest known module prefix)
    name: str | None   # the imported name for ``from X import name`` (None for ``import X``)
    line: int


def find_modules() -> dict[str, Path]:
    out = {}
    for top in PACKAGES:
        for path in sorted((ROOT / top).rglob("*.py")):
            parts = list(path.relative_to(ROOT).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts = parts[:-1]
            out[".".join([NAMESPACE, *parts])] = path
    return out


MODULES = find_modules()


def _known(name: str) -> str | None:
    """The longest prefix of dotted ``name`` that is a module of the tree (None: outside it)."""
    while name:
        if name in MODULES:
            return name
        name = name.rpartition(".")[0]
    return None


def imports_of(module: str) -> Iterator[Import]:
    """Every import statement of ``module`` (anywhere in the file: top level, functions, classes)."""
    path = MODULES[module]
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            for alias in node.names:
                target = _known(alias.name)
                if target:
                    yield Import(module, target, None, node.lineno)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[:len(package.split(".")) - (node.level - 1)]
                source = ".".join(base + ([node.module] if node.module else []))
            else:
                source = node.module or ""
            for alias in node.names:
                sub = f"{source}.{alias.name}"
                target = sub if sub in MODULES else _known(source)
                if target:
                    yield Import(module, target, alias.name, node.lineno)


IMPORTS = [imp for module in MODULES for imp in imports_of(module)]
GRAPH: dict[str, set[str]] = {m: set() for m in MODULES}
for _imp in IMPORTS:
    if _imp.target != _imp.importer:
        GRAPH[_imp.importer].add(_imp.target)


def _in(module: str, package: str) -> bool:
    return module == package or module.startswith(package + ".")


def _edges(src: str, dst: str) -> list[str]:
    return sorted({f"{i.importer} -> {i.target} ({MODULES[i.importer].relative_to(ROOT)}:{i.line})"
                   for i in IMPORTS if _in(i.importer, src) and _in(i.target, dst) and not _in(i.importer, dst)})


# (importer package, forbidden target package): each pair one rule of DESIGN §2 / docs/architecture.md
ABOVE_MIDDLE = ("engine.sampling", "engine.eval", "engine.trainer", "engine.diffusion_task", "engine.videogpa",
                "engine.train")
FORBIDDEN_BY_FOLDER = [
    ("kernels", "engine"),
    *[("engine.models", p) for p in ("engine.teacher", "engine.objectives", "engine.data", *ABOVE_MIDDLE)],
    *[("engine.data", p) for p in ("engine.models", "engine.teacher", "engine.objectives", *ABOVE_MIDDLE)],
    *[(low, high) for low in ("engine.teacher", "engine.objectives") for high in ABOVE_MIDDLE],
    *[(low, high) for low in ("engine.sampling", "engine.eval") for high in ABOVE_MIDDLE[2:]],
    *[("engine.trainer", high) for high in ABOVE_MIDDLE[3:]],
    *[(low, high) for low in ("engine.diffusion_task", "engine.videogpa") for high in ABOVE_MIDDLE[3:] if low != high],
]
FORBIDDEN = [(q(low), q(high)) for low, high in FORBIDDEN_BY_FOLDER]


def test_the_graph_is_read():
    """The reader sees the imports it must judge: package-relative, in-function and module-level ones."""
    assert {q("engine.train"), q("engine.teacher.live"), q("kernels.align"), q("engine.models.dit")} <= set(MODULES)
    assert q("engine.models.vggt") in GRAPH[q("engine.teacher.live")]
    assert q("kernels.align") in GRAPH[q("engine.objectives.geometry_forcing")]
    assert any(i.target == q("engine.teacher.builder") for i in IMPORTS if i.importer == q("engine.diffusion_task"))


@pytest.mark.parametrize("low,high", [
    pytest.param(q(a), q(b), id=f"{a}-not->{b}") for a, b in FORBIDDEN_BY_FOLDER])
def test_imports_point_down_the_layers(low, high):
    bad = _edges(low, high)
    assert not bad, f"{low} must not import {high}:\n  " + "\n  ".join(bad)


def _cycle() -> list[str] | None:
    """One import cycle of GRAPH (its modules in order, the first repeated at the end), or None."""
    state: dict[str, int] = {}   # 1: on the current path, 2: done
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for nxt in sorted(GRAPH[node]):
            if state.get(nxt) == 1:
                return path[path.index(nxt):] + [nxt]
            if nxt not in state:
                found = visit(nxt)
                if found:
                    return found
        path.pop()
        state[node] = 2
        return None

    for start in sorted(GRAPH):
        if start not in state:
            found = visit(start)
            if found:
                return found
    return None


def test_no_import_cycles():
    cycle = _cycle()
    assert cycle is None, "import cycle (in-function imports count): " + " -> ".join(cycle)


def _private_owner(imp: Import) -> str | None:
    """The module or package that owns the private name ``imp`` reaches (None: a public name)."""
    if imp.name is not None and imp.name.startswith("_") and not imp.name.startswith("__"):
        sub = f"{imp.target}.{imp.name}" if not imp.target.endswith("." + imp.name) else imp.target
        if sub in MODULES:   # a private submodule: private to its package
            return sub.rpartition(".")[0]
        return imp.target    # a private name: private to its module
    hidden = [p for p in imp.target.split(".") if p.startswith("_") and not p.startswith("__")]
    if hidden:               # ``import a._b`` / ``from a._b import x``: private to ``a``
        parts = imp.target.split(".")
        return ".".join(parts[:parts.index(hidden[0])])
    return None


def test_no_module_imports_private_names_of_another():
    """``_name`` is private to its module (a ``_module`` to its package): nothing outside imports it."""
    bad = []
    for imp in IMPORTS:
        owner = _private_owner(imp)
        if owner is not None and not _in(imp.importer, owner):
            bad.append(f"{imp.importer} imports {imp.name or imp.target} of {owner} "
                       f"({MODULES[imp.importer].relative_to(ROOT)}:{imp.line})")
    assert not bad, "private names imported across modules:\n  " + "\n  ".join(bad)


def test_no_module_reads_private_attributes_of_another_module():
    """``import geoforge.engine.x as m; m._helper`` is the same leak as ``from geoforge.engine.x import _helper``."""
    bad = []
    for module, path in MODULES.items():
        tree = ast.parse(path.read_text(), str(path))
        bound: dict[str, str] = {}   # local name -> module of the tree it is bound to
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                for alias in node.names:
                    if alias.name in MODULES and alias.asname:
                        bound[alias.asname] = alias.name
        for imp in IMPORTS:   # ``from package import module [as m]``
            if imp.importer == module and imp.name and imp.target.endswith("." + imp.name):
                bound[imp.name] = imp.target
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom):
                for alias in node.names:
                    if alias.asname and alias.name in bound:
                        bound[alias.asname] = bound[alias.name]
        for node in ast.walk(tree):
            if (isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id in bound
                    and node.attr.startswith("_") and not node.attr.startswith("__")
                    and not _in(module, bound[node.value.id])):
                bad.append(f"{module} reads {bound[node.value.id]}.{node.attr} ({path.relative_to(ROOT)}:{node.lineno})")
    assert not bad, "private attributes read across modules:\n  " + "\n  ".join(bad)


def _deepspeed_initialize_calls() -> list[str]:
    out = []
    for module, path in MODULES.items():
        tree = ast.parse(path.read_text(), str(path))
        aliases = {a.asname or a.name for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)
                   and n.module == "deepspeed" for a in n.names if a.name == "initialize"}
        for node in ast.walk(tree):
            if not isinstance(node, ast.Call):
                continue
            f = node.func
            if (isinstance(f, ast.Attribute) and f.attr == "initialize" and isinstance(f.value, ast.Name)
                    and f.value.id == "deepspeed") or (isinstance(f, ast.Name) and f.id in aliases):
                out.append(f"{module}:{node.lineno}")
    return out


def test_one_module_calls_deepspeed_initialize():
    calls = _deepspeed_initialize_calls()
    assert len({c.split(":")[0] for c in calls}) == 1, f"deepspeed.initialize is called in: {calls}"

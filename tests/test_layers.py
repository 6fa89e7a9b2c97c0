"""The package's layers (docs/ARCHITECTURE.md, "The layers"), checked from the source: every
module's imports, deferred ones inside functions and ``TYPE_CHECKING`` ones included, are parsed
with ``ast``; each module belongs to one layer, imports only its own layer and those below, and
no chain of imports leads back to where it started. ``import srdistill`` itself loads no module
of the package (the public API in ``srdistill/__init__.py`` is lazy)."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "srdistill"

#: Layer number -> the modules (and packages, with everything in them) that make it up.
LAYERS = {
    0: ("srdistill.config", "srdistill.storage", "srdistill.corpus", "srdistill.datasets", "srdistill.weights"),
    1: ("srdistill.sr",),
    2: ("srdistill.distill", "srdistill.zeroshot"),
    3: ("srdistill.run",),
    4: ("srdistill.cli", "srdistill.k8s"),
}
#: What a module may import from the package root without depending on the public API.
ROOT_NAMES = {"__version__"}


def _modules() -> dict[str, Path]:
    out = {}
    for path in PACKAGE.rglob("*.py"):
        parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        out[".".join(parts)] = path
    return out


def _layer(module: str) -> int | None:
    for number, members in LAYERS.items():
        if any(module == m or module.startswith(m + ".") for m in members):
            return number
    return None


def _imports(module: str, source: str, is_package: bool, modules: set[str]) -> set[str]:
    """The package modules that ``module`` (its ``source``; ``is_package``: an ``__init__.py``)
    imports anywhere in it, of ``modules`` (the root package only for names other than
    ``ROOT_NAMES``)."""
    out = set()
    package = module.split(".") if is_package else module.split(".")[:-1]
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            targets = [(a.name, None) for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                base = ".".join(package[: len(package) - node.level + 1] + ([base] if base else []))
            targets = [(base, a.name) for a in node.names]
        else:
            continue
        for name, attr in targets:
            if name != "srdistill" and not name.startswith("srdistill."):
                continue
            if name == "srdistill" and (attr is None or attr in ROOT_NAMES):
                continue  # the root package itself: loaded before any of its modules anyway
            target = f"{name}.{attr}" if attr and f"{name}.{attr}" in modules else name
            if target != module:
                out.add(target)
    return out


def _graph() -> dict[str, set[str]]:
    modules = _modules()
    return {m: _imports(m, p.read_text(), p.name == "__init__.py", set(modules)) for m, p in modules.items()}


def _upward(graph: dict[str, set[str]]) -> list[str]:
    """The imports of ``graph`` from a module to one of a higher layer, one line each."""
    return sorted(f"{m} (layer {_layer(m)}) imports {t} (layer {_layer(t)})"
                  for m, targets in graph.items() if m != "srdistill"
                  for t in targets if t != "srdistill" and _layer(t) > _layer(m))  # fmt: skip


def _cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One cycle of ``graph`` as ``[a, b, ..., a]``, or None (depth-first search)."""
    state: dict[str, int] = {}  # 1 on the current path, 2 finished
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                return path[path.index(nxt):] + [nxt]
            if nxt not in state and (found := visit(nxt)):
                return found
        path.pop()
        state[node] = 2
        return None

    for start in sorted(graph):
        if start not in state and (found := visit(start)):
            return found
    return None


def test_every_module_has_a_layer_and_imports_only_down_or_sideways():
    graph = _graph()
    unplaced = sorted(m for m in graph if m != "srdistill" and _layer(m) is None)
    assert not unplaced, f"modules in no layer of LAYERS: {unplaced}"
    upward = _upward(graph)
    assert not upward, "upward imports:\n" + "\n".join(upward)
    below_root = sorted(m for m, targets in graph.items() if m != "srdistill" and "srdistill" in targets)
    assert not below_root, f"modules importing the public API of srdistill/__init__.py: {below_root}"


def test_no_import_cycles():
    assert _cycle(_graph()) is None, f"import cycle: {' -> '.join(_cycle(_graph()))}"


def test_the_checks_catch_what_they_look_for():
    # a deferred upward import, and relative imports resolved from the importing module
    modules = {"srdistill.run.pipeline", "srdistill.sr.training", "srdistill.sr.imaging"}
    source = "from . import imaging\nfrom .. import __version__\n\ndef f():\n    from srdistill.run import pipeline\n"
    graph = {"srdistill.sr.training": _imports("srdistill.sr.training", source, False, modules)}
    assert graph["srdistill.sr.training"] == {"srdistill.sr.imaging", "srdistill.run.pipeline"}
    assert _upward(graph) == ["srdistill.sr.training (layer 1) imports srdistill.run.pipeline (layer 3)"]
    assert _cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert _cycle({"a": {"b"}, "b": set(), "c": {"a", "b"}}) is None


def test_import_srdistill_loads_no_module_of_the_package():
    code = "import sys, srdistill; print(sorted(m for m in sys.modules if m.startswith('srdistill.')))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         cwd=PACKAGE.parent).stdout.strip()  # fmt: skip
    assert out == "[]"

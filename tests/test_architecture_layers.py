"""The package's layer order (docs/architecture.md): no import cycle, no import of a higher layer, and
no import between the sibling packages of one layer (algorithm/ and export/ both sit on quantization/
and know nothing of each other). Module-level and function-level imports count; ``TYPE_CHECKING``
blocks do not."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

#: lowest first; a module belongs to the first entry whose prefix it starts with. Entries of the same
#: rank are siblings: they may import lower ranks, never each other.
LAYERS: list[tuple[int, str]] = [
    (0, "quark.torch.quantization.config"),
    (1, "quark.torch.quantization.numerics"),
    (1, "quark.torch.utils"),
    (2, "quark.torch.quantization"),
    (3, "quark.torch.algorithm"),
    (3, "quark.torch.export"),
    (3, "quark.torch.evaluation"),
    (4, "quark.torch.quantization.api"),  # ModelQuantizer: ties algorithms and file-to-file export together
    (5, "quark.torch"),  # the package's public facade (quark/torch/__init__.py)
    (6, "quark.torch.testing"),
    (6, "quark.cli"),
    (7, "quark"),
]
RANKS = {prefix: rank for rank, prefix in LAYERS}


def _modules() -> dict[str, Path]:
    out = {}
    for path in (ROOT / "quark").rglob("*.py"):
        name = ".".join(path.relative_to(ROOT).with_suffix("").parts)
        out[name.removesuffix(".__init__")] = path
    return out


def _imports(name: str, path: Path, modules: dict[str, Path]) -> set[str]:
    tree = ast.parse(path.read_text())
    skip = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            skip |= {id(n) for n in ast.walk(node)}
    package = name.split(".") if path.name == "__init__.py" else name.split(".")[:-1]
    found = set()
    for node in ast.walk(tree):
        if id(node) in skip:
            continue
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                base = ".".join(package[: len(package) - node.level + 1] + ([node.module] if node.module else []))
            targets = [base] + [f"{base}.{a.name}" for a in node.names]
        else:
            continue
        for t in targets:
            # the deepest module of the package that the name refers to
            while t and t not in modules:
                t = t.rpartition(".")[0]
            if t and t != name and not name.startswith(t + "."):
                found.add(t)
    return found


def _layer(name: str) -> tuple[int, str]:
    prefix = max((p for p in RANKS if name == p or name.startswith(p + ".")), key=len)
    return RANKS[prefix], prefix


def _graph() -> dict[str, set[str]]:
    modules = _modules()
    return {name: _imports(name, path, modules) for name, path in modules.items()}


def test_every_module_has_a_layer():
    for name in _graph():
        assert _layer(name)


def test_no_import_reaches_up_or_sideways():
    bad = []
    for name, targets in _graph().items():
        rank, prefix = _layer(name)
        for t in targets:
            t_rank, t_prefix = _layer(t)
            if t_rank > rank or (t_rank == rank and t_prefix != prefix):
                bad.append(f"{name} (layer {rank}, {prefix}) imports {t} (layer {t_rank}, {t_prefix})")
    assert not bad, "\n".join(sorted(bad))


def test_no_import_cycle():
    graph = _graph()
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on: set[str] = set()
    cycles = []

    def visit(v: str) -> None:  # Tarjan's strongly connected components
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                cycles.append(" <-> ".join(sorted(comp)))

    for v in graph:
        if v not in index:
            visit(v)
    assert not cycles, "\n".join(cycles)

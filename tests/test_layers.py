"""The package's layers (ARCHITECTURE.md): imports flow one way and nothing imports in a circle.

Every import of ``latentlm`` inside ``src/latentlm`` counts, including imports inside functions
(a lazy import hides a cycle from the interpreter, not from the design); imports under
``if TYPE_CHECKING:`` are annotations only and are skipped.
"""

from __future__ import annotations

import ast
from collections import defaultdict
from pathlib import Path

SRC = Path(__file__).resolve().parents[1] / "src" / "latentlm"

# Lower number = lower layer. A module may import its own layer's modules (acyclically) and any
# lower layer, never a higher one.
LAYERS = {
    "errors": 0, "config": 0, "precision": 0, "io": 0, "device": 0,
    "data": 1,
    "nn": 2, "structured": 2,
    "models": 3,
    "inference": 4,
    "system": 5,
    "evaluation": 6,
    "training": 7,
    "report": 8, "cli": 9, "demo": 9, "__init__": 10,
}


def _module_name(path: Path) -> str:
    parts = path.relative_to(SRC.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _type_checking_lines(tree: ast.AST) -> set[int]:
    lines: set[int] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            for child in node.body:
                lines.update(range(child.lineno, (child.end_lineno or child.lineno) + 1))
    return lines


def _imports() -> dict[str, set[tuple[str, int]]]:
    modules = {_module_name(p): p for p in SRC.rglob("*.py")}
    graph: dict[str, set[tuple[str, int]]] = defaultdict(set)
    for name, path in modules.items():
        tree = ast.parse(path.read_text(encoding="utf-8"))
        skip = _type_checking_lines(tree)
        for node in ast.walk(tree):
            if getattr(node, "lineno", None) in skip:
                continue
            targets: list[str] = []
            if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                base = node.module
                # `from latentlm.data import vocab` imports the submodule latentlm.data.vocab
                targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in modules else base for a in node.names]
            elif isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            for target in targets:
                if target.startswith("latentlm") and target != name:
                    graph[name].add((target, node.lineno))
    return graph


def _layer(module: str) -> tuple[str, int]:
    parts = module.split(".")
    top = parts[1] if len(parts) > 1 else "__init__"
    assert top in LAYERS, f"{module}: package {top!r} has no layer; add it to LAYERS and ARCHITECTURE.md"
    return top, LAYERS[top]


def test_imports_flow_one_way():
    against = []
    for module, targets in _imports().items():
        top, level = _layer(module)
        for target, line in targets:
            ttop, tlevel = _layer(target)
            if tlevel > level:
                against.append(f"{module}:{line} imports {target} ({top}={level} < {ttop}={tlevel})")
    assert not against, "imports against the layer order:\n  " + "\n  ".join(sorted(against))


def test_no_import_cycles():
    graph = {m: {t for t, _ in ts} for m, ts in _imports().items()}
    # A package's __init__ re-exports its modules; an edge module -> its own package's __init__
    # is what creates spurious "cycles", and no module should import its own package anyway.
    cycles, state = [], {}

    def visit(node: str, stack: list[str]) -> None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                cycles.append(" -> ".join(stack[stack.index(nxt):] + [nxt]))
            elif nxt not in state:
                visit(nxt, stack)
        stack.pop()
        state[node] = 2

    for module in sorted(graph):
        if module not in state:
            visit(module, [])
    assert not cycles, "import cycles:\n  " + "\n  ".join(cycles)


def test_capabilities_are_declared_not_probed():
    """Models, posteriors and batches declare what they can do (base classes, isinstance);
    no `hasattr` probe decides behaviour (ARCHITECTURE.md, "Declared capabilities")."""
    probes = [f"{p.relative_to(SRC.parent)}:{node.lineno}"
              for p in SRC.rglob("*.py")
              for node in ast.walk(ast.parse(p.read_text(encoding="utf-8")))
              if isinstance(node, ast.Call) and getattr(node.func, "id", None) == "hasattr"]
    assert not probes, "hasattr probes: " + ", ".join(probes)

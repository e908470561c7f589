"""The layout DESIGN.md promises, checked: every stage imports only stages listed before it (`cli` on top, the
root helpers at the bottom), and no two modules import each other, directly or round a longer circle. Imports
inside functions count too (they are how a circle hides)."""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[2] / "tunesmith"
# the order of DESIGN.md's layout; the root helpers (errors, files, progress, the package itself) come first
STAGES = ["<root>", "config", "data", "models", "train", "export", "infer", "serve", "evaluate", "bench", "cli"]


def module_name(path: Path) -> str:
    parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def stage_of(module: str) -> str:
    parts = module.split(".")
    if module == "tunesmith.__main__":  # `python -m tunesmith` is the command line itself
        return "cli"
    return parts[1] if len(parts) > 1 and parts[1] in STAGES else "<root>"


def imports_of(path: Path) -> set[str]:
    """Every tunesmith module ``path`` imports (``from a import b`` counts as ``a.b`` when that is a module)."""
    found = set()
    tree = ast.parse(path.read_text(encoding="utf-8"))
    here = module_name(path).split(".")
    package = here if path.name == "__init__.py" else here[:-1]
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                base = ".".join(package[: len(package) - node.level + 1] + ([base] if base else []))
            names = [base] + [f"{base}.{a.name}" for a in node.names]
        else:
            continue
        for name in names:
            if name.startswith("tunesmith") and _exists(name):
                found.add(name)
    return found


def _exists(module: str) -> bool:
    rel = Path(*module.split("."))
    return (PACKAGE.parent / rel).with_suffix(".py").is_file() or (PACKAGE.parent / rel / "__init__.py").is_file()


def graph() -> dict[str, set[str]]:
    return {module_name(p): imports_of(p) - {module_name(p)} for p in PACKAGE.rglob("*.py")}


def test_stages_import_only_stages_before_them():
    upward = []
    for module, targets in graph().items():
        for target in targets:
            if STAGES.index(stage_of(target)) > STAGES.index(stage_of(module)):
                upward.append(f"{module} -> {target}")
    assert not upward, "imports against the layout:\n" + "\n".join(sorted(upward))


def test_no_circles_between_modules():
    edges = graph()
    # a package's __init__ re-exporting its own modules is not a circle of ideas
    for module, targets in edges.items():
        edges[module] = {t for t in targets if not (module.startswith(t + ".") and t in edges)}
    circles, state = [], {}

    def visit(node: str, path: list[str]) -> None:
        state[node] = "open"
        for nxt in sorted(edges.get(node, ())):
            if state.get(nxt) == "open":
                circles.append(" -> ".join(path[path.index(nxt):] + [nxt]))
            elif nxt not in state:
                visit(nxt, path + [nxt])
        state[node] = "done"

    for module in sorted(edges):
        if module not in state:
            visit(module, [module])
    assert not circles, "modules that import each other:\n" + "\n".join(circles)

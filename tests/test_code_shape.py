"""Shape rules for the library and the plugin: short modules, short functions."""

from __future__ import annotations

import ast
from pathlib import Path

SRC = Path(__file__).resolve().parents[1] / "src"
MAX_FILE_LINES = 400
MAX_FUNCTION_LINES = 80


def _sources() -> list[Path]:
    files = sorted(SRC.rglob("*.py"))
    assert files, f"no Python files under {SRC}"
    return files


def test_no_module_is_over_400_lines():
    too_long = []
    for path in _sources():
        lines = len(path.read_text(encoding="utf-8").splitlines())
        if lines > MAX_FILE_LINES:
            too_long.append(f"{path.relative_to(SRC)}: {lines} lines")
    assert not too_long, f"modules over {MAX_FILE_LINES} lines:\n" + "\n".join(too_long)


def test_no_function_is_over_80_lines():
    too_long = []
    for path in _sources():
        tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
        parents = {child: node for node in ast.walk(tree) for child in ast.iter_child_nodes(node)}
        for node in ast.walk(tree):
            if not isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                continue
            length = (node.end_lineno or node.lineno) - node.lineno + 1
            if length > MAX_FUNCTION_LINES:
                names, parent = [node.name], parents.get(node)
                while parent is not None:
                    if isinstance(parent, (ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
                        names.insert(0, parent.name)
                    parent = parents.get(parent)
                too_long.append(f"{path.relative_to(SRC)}:{node.lineno}: {'.'.join(names)} ({length} lines)")
    assert not too_long, f"functions over {MAX_FUNCTION_LINES} lines:\n" + "\n".join(too_long)

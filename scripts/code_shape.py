"""The shape of the package's code, for a review: every module with its line count, the
largest functions, and the functions that take more than ``--max-params`` parameters.

    python scripts/code_shape.py [--top 15] [--max-params 8] [ROOT=limoe]
"""

from __future__ import annotations

import argparse
import ast
from pathlib import Path


def functions(path: Path) -> list[tuple[str, int, int]]:
    """``(qualified name, lines, parameters)`` of every function in ``path``; ``self`` and
    ``cls`` are not counted as parameters."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    found = []

    def visit(node: ast.AST, prefix: str) -> None:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.ClassDef):
                visit(child, f"{prefix}{child.name}.")
            elif isinstance(child, ast.FunctionDef | ast.AsyncFunctionDef):
                a = child.args
                names = [p.arg for p in (*a.posonlyargs, *a.args, *a.kwonlyargs)]
                names += [p.arg for p in (a.vararg, a.kwarg) if p is not None]
                count = len([n for n in names if n not in ("self", "cls")])
                lines = child.end_lineno - child.lineno + 1
                found.append((f"{prefix}{child.name}", lines, count))
                visit(child, f"{prefix}{child.name}.")

    visit(tree, "")
    return found


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("root", nargs="?", default="limoe")
    parser.add_argument("--top", type=int, default=15)
    parser.add_argument("--max-params", type=int, default=8)
    args = parser.parse_args()
    root = Path(args.root)
    modules = sorted(root.rglob("*.py"))
    total = 0
    print(f"# {root}/: modules and lines")
    for path in modules:
        lines = len(path.read_text(encoding="utf-8").splitlines())
        total += lines
        print(f"{lines:6d}  {path}")
    print(f"{total:6d}  total ({len(modules)} modules)")
    rows = [(f"{p}:{name}", n, k) for p in modules for name, n, k in functions(p)]
    print(f"\n# the {args.top} largest functions (lines)")
    for name, n, _ in sorted(rows, key=lambda r: -r[1])[: args.top]:
        print(f"{n:6d}  {name}")
    many = sorted((r for r in rows if r[2] > args.max_params), key=lambda r: -r[2])
    print(f"\n# functions with more than {args.max_params} parameters: {len(many)}")
    for name, _, k in many:
        print(f"{k:6d}  {name}")


if __name__ == "__main__":
    main()

"""Print the package's layers as a picture: each layer with its modules (lines of code), lowest at the
bottom, and which lower layers it imports (read from the code's imports, as tests/test_architecture.py
reads them).

    .venv/bin/python scripts/package_picture.py
"""

from __future__ import annotations

import ast
from collections import defaultdict
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "austeer_pl"
LAYERS = ("core", "methods", "tasks", "scoring", "fit", "lightning", "export", "cli", "analyses")


def layer_imports(folder: Path) -> set[str]:
    used = set()
    for path in folder.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            names = []
            if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                names = [node.module]
            elif isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            for name in names:
                parts = name.split(".")
                if parts[0] == "austeer_pl" and len(parts) > 1 and parts[1] in LAYERS and parts[1] != folder.name:
                    used.add(parts[1])
    return used


def main() -> None:
    width = 100
    lines_of = defaultdict(dict)
    for layer in LAYERS:
        for path in sorted((PACKAGE / layer).rglob("*.py")):
            n = len(path.read_text().splitlines())
            if path.name != "__init__.py" or n > 3:
                lines_of[layer][str(path.relative_to(PACKAGE / layer).with_suffix(""))] = n
    for layer in reversed(LAYERS):
        modules = lines_of[layer]
        uses = sorted(layer_imports(PACKAGE / layer), key=LAYERS.index)
        head = f" {layer}/  {sum(modules.values()):,} lines"
        body, row = [], " "
        for name, n in sorted(modules.items(), key=lambda kv: -kv[1]):
            cell = f"{name} {n}  "
            if len(row) + len(cell) > width - 4:
                body.append(row)
                row = " "
            row += cell
        body.append(row)
        print("+" + "-" * (width - 2) + "+")
        for text in (head, *body):
            print("|" + text.ljust(width - 2) + "|")
        print("+" + "-" * (width - 2) + "+")
        print(f"     uses: {', '.join(uses) or '(torch, transformers, safetensors)'}")
    print(" + errors.py, _version.py at the root, usable by every layer")


if __name__ == "__main__":
    main()

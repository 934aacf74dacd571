"""The package's shape: what the core needs, and an import graph without cycles."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "austeer_pl"


def test_core_loads_applies_and_merges_a_state_with_the_fit_extras_blocked(tiny_dir, tmp_path):
    """`pip install austeer-pl` (torch, transformers, safetensors) is enough to use a saved state."""
    code = f"""
import sys, importlib.abc, importlib.machinery
BLOCKED = ("lightning", "pytorch_lightning", "torchmetrics", "wandb", "datasets", "matplotlib", "jsonargparse")

class Refuse(importlib.abc.Loader):
    def create_module(self, spec):
        raise ImportError(f"blocked: {{spec.name}}")

    def exec_module(self, module):
        pass

class Block(importlib.abc.MetaPathFinder):
    # Probes (find_spec) still see the package; importing it fails, as it would without it.
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in BLOCKED:
            return importlib.machinery.ModuleSpec(name, Refuse())
        return None

sys.meta_path.insert(0, Block())
import torch
from austeer_pl import SteeringState, load_model, locate_units
from austeer_pl.core.selection import Selection

model, tok = load_model({str(tiny_dir)!r})
layout = locate_units(model)
sel = Selection(("attention",), torch.zeros(3, dtype=torch.long), torch.tensor([0, 1, 2]), torch.tensor([1, 5, 9]), torch.tensor([0.5, -0.4, 0.3]))
state = SteeringState.from_selection(sel, layout, alpha=4.0, base_model="tiny")
folder = state.save_pretrained({str(tmp_path / "state")!r})
loaded = SteeringState.from_pretrained(folder)
ids = torch.tensor([[3, 4, 5, 6]])
with torch.no_grad():
    plain = model(ids).logits
    with loaded.apply(model):
        hooked = model(ids).logits
    assert torch.equal(model(ids).logits, plain) and not torch.equal(hooked, plain)
    loaded.merge_into(model)
    assert torch.allclose(model(ids).logits, hooked, atol=1e-5)
loaded_mods = [m for m in sys.modules if m.split(".")[0] in BLOCKED]
assert not loaded_mods, loaded_mods
print("ok")
"""
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert proc.returncode == 0 and proc.stdout.strip().endswith("ok"), proc.stderr[-3000:]


def _imports(path: Path) -> set[str]:
    """The austeer_pl modules ``path`` imports, at module level or inside functions."""
    tree = ast.parse(path.read_text())
    # Imports for type checkers only (`if TYPE_CHECKING:`) are not imports.
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and getattr(node.test, "id", getattr(node.test, "attr", None)) == "TYPE_CHECKING":
            node.body = []
    out: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom):
            if node.level == 1:
                base = node.module or ""
                if base:
                    out.add(base.split(".")[0])
                else:
                    out.update(alias.name for alias in node.names)
            elif node.module and node.module.startswith("austeer_pl."):
                out.add(node.module.split(".")[1])
        elif isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.startswith("austeer_pl."):
                    out.add(alias.name.split(".")[1])
    return out


def test_import_graph_has_no_cycle():
    modules = {p.stem for p in PACKAGE.glob("*.py")}
    graph = {m: sorted(i for i in _imports(PACKAGE / f"{m}.py") if i in modules and i != m) for m in modules if m != "__init__"}
    for deps in graph.values():
        if "__init__" in deps:
            deps.remove("__init__")
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(node: str) -> None:
        state[node] = 1
        stack.append(node)
        for nxt in graph.get(node, []):
            if state.get(nxt) == 1:
                cycle = stack[stack.index(nxt):] + [nxt]
                raise AssertionError("import cycle: " + " -> ".join(cycle))
            if nxt not in state:
                visit(nxt)
        stack.pop()
        state[node] = 2

    for module in sorted(graph):
        if module not in state:
            visit(module)


def test_core_modules_import_no_fitting_layer():
    """The core never imports Lightning, the drivers or the fit extras (lazily or not)."""
    core = ["sites", "reading", "momentum", "selection", "steering", "hooks", "strength", "prefix", "batching", "engine",
            "methods", "baselines", "dataconfig", "tasks", "scoring", "evaluation", "fit", "models", "merge", "fileio", "errors"]
    drivers = {"lightning", "datamodule", "cli", "compare", "analyses", "runtime"}
    for module in core:
        path = PACKAGE / f"{module}.py"
        if not path.exists():
            continue
        assert not (_imports(path) & drivers), (module, _imports(path) & drivers)
        external = {alias.name.split(".")[0] for node in ast.walk(ast.parse(path.read_text())) if isinstance(node, ast.Import) for alias in node.names}
        external |= {node.module.split(".")[0] for node in ast.walk(ast.parse(path.read_text())) if isinstance(node, ast.ImportFrom) and node.level == 0 and node.module}
        assert not external & {"lightning", "pytorch_lightning", "torchmetrics", "wandb", "jsonargparse"}, (module, external)

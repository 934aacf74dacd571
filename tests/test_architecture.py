"""The package's shape, read from the tree: layers by folder, no import cycle, small modules, and a
core that needs only torch, transformers and safetensors."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

from helpers import ROOT

PACKAGE = ROOT / "austeer_pl"
#: The layers, lowest first: a module may import its own layer and the ones before it (and the
#: package's root modules, ``errors`` and ``_version``). Every folder of the package is a layer.
LAYERS = ("core", "methods", "tasks", "scoring", "fit", "lightning", "export", "cli", "analyses")
ROOT_MODULES = ("errors", "_version")
#: What the core may import besides the standard library.
CORE_THIRD_PARTY = {"torch", "transformers", "safetensors", "numpy", "huggingface_hub", "gguf"}
MAX_LINES = 400
#: A module may be longer only if its docstring declares it a data table (the paper protocol's specification).
DATA_TABLE = "a data table"


def modules() -> dict[str, Path]:
    """Every module of the package by dotted name (``austeer_pl.core.state``), read from the tree."""
    out = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        parts = path.relative_to(ROOT).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        out[name] = path
    return out


def imports(path: Path) -> list[tuple[str, int, bool]]:
    """``(module imported, line, inside a function)`` for every import of ``path``, the ones under
    ``if TYPE_CHECKING:`` and inside functions included."""
    tree = ast.parse(path.read_text())
    found: list[tuple[str, int, bool]] = []

    def visit(node: ast.AST, in_function: bool) -> None:
        for child in ast.iter_child_nodes(node):
            inside = in_function or isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef))
            if isinstance(child, ast.Import):
                found.extend((alias.name, child.lineno, in_function) for alias in child.names)
            elif isinstance(child, ast.ImportFrom) and child.module and child.level == 0:
                found.append((child.module, child.lineno, in_function))
                found.extend((f"{child.module}.{alias.name}", child.lineno, in_function) for alias in child.names)
            visit(child, inside)

    visit(tree, False)
    return found


def layer_of(module: str) -> int | None:
    parts = module.split(".")
    if parts[0] != "austeer_pl":
        return None
    if len(parts) == 1 or parts[1] in ROOT_MODULES:
        return -1
    return LAYERS.index(parts[1]) if parts[1] in LAYERS else None


def test_every_folder_of_the_package_is_a_layer():
    folders = {p.name for p in PACKAGE.iterdir() if p.is_dir() and p.name != "__pycache__"}
    assert folders == set(LAYERS), folders ^ set(LAYERS)
    loose = {p.stem for p in PACKAGE.glob("*.py")} - {"__init__", *ROOT_MODULES}
    assert not loose, f"modules outside the layers: {sorted(loose)}"


def test_tests_mirror_the_layers():
    """A test module lives in the folder of the layer it tests (``tests/core/test_merge.py``); only
    the tests of the whole package's shape stay at the top."""
    folders = {p.name for p in (ROOT / "tests").iterdir() if p.is_dir() and p.name not in ("fixtures", "__pycache__")}
    assert folders <= set(LAYERS), folders - set(LAYERS)
    at_top = sorted(p.name for p in (ROOT / "tests").glob("test_*.py"))
    assert at_top == ["test_architecture.py"], at_top
    names = [p.name for p in (ROOT / "tests").rglob("test_*.py")]
    assert len(names) == len(set(names)), "test module names must be unique (pytest imports them by basename)"


def test_no_layer_imports_a_layer_above_it():
    known = modules()
    wrong = []
    for name, path in known.items():
        mine = layer_of(name)
        mine = 0 if name == "austeer_pl" else mine  # the public face is the core's
        for target, line, _ in imports(path):
            theirs = layer_of(target)
            if (
                theirs is not None
                and mine is not None
                and theirs > mine
                and (target in known or target.rsplit(".", 1)[0] in known)
            ):
                wrong.append(
                    f"{path.relative_to(ROOT)}:{line} ({LAYERS[mine] if mine >= 0 else 'root'}) imports {target}"
                )
    assert not wrong, "\n".join(sorted(set(wrong)))


def test_import_graph_has_no_cycle():
    """No cycle among modules, counting imports inside functions and under ``TYPE_CHECKING``."""
    known = modules()

    def resolve(target: str) -> str | None:
        while target and target not in known:
            target = target.rpartition(".")[0]
        return target or None

    graph = {
        name: sorted(
            {r for t, _, _ in imports(path) if (r := resolve(t)) and r != name and not name.startswith(r + ".")}
            - {"austeer_pl"}
        )
        for name, path in known.items()
    }
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(node: str) -> None:
        state[node] = 1
        stack.append(node)
        for nxt in graph.get(node, []):
            if state.get(nxt) == 1:
                raise AssertionError("import cycle: " + " -> ".join([*stack[stack.index(nxt) :], nxt]))
            if nxt not in state:
                visit(nxt)
        stack.pop()
        state[node] = 2

    for name in sorted(graph):
        if name not in state:
            visit(name)


def test_imports_inside_functions_are_optional_dependencies_that_say_so():
    """A function imports only a dependency a user may not have installed (the fit extras, GGUF,
    plots, W&B), with a comment on the line saying so; the package's own modules are imported at the top."""
    wrong = []
    for path in modules().values():
        lines = path.read_text().splitlines()
        for target, line, in_function in imports(path):
            if not in_function:
                continue
            text = lines[line - 1]
            if target.startswith("austeer_pl"):
                wrong.append(f"{path.relative_to(ROOT)}:{line} imports {target} inside a function")
            elif "#" not in text:
                wrong.append(
                    f"{path.relative_to(ROOT)}:{line} imports {target} inside a function without a comment saying why"
                )
    assert not wrong, "\n".join(sorted(set(wrong)))


def test_the_core_imports_only_torch_transformers_and_safetensors():
    stdlib = set(sys.stdlib_module_names)
    wrong = []
    for name, path in modules().items():
        if layer_of(name) not in (-1, 0) and name != "austeer_pl":
            continue
        for target, line, in_function in imports(path):
            top = target.split(".")[0]
            if top not in stdlib and top != "austeer_pl" and top not in CORE_THIRD_PARTY and not in_function:
                wrong.append(f"{path.relative_to(ROOT)}:{line} imports {target}")
    assert not wrong, "\n".join(wrong)


def test_tasks_read_with_the_standard_library_alone():
    """A task file is checked and loaded without torch: no module of the task layer imports a third
    party package at the top, directly or through the package modules it imports."""
    known = modules()
    stdlib = set(sys.stdlib_module_names)

    def resolve(target: str) -> str | None:
        while target and target not in known:
            target = target.rpartition(".")[0]
        return target or None

    wrong, seen = [], set()
    todo = [name for name in known if name.startswith("austeer_pl.tasks")]
    while todo:
        name = todo.pop()
        if name in seen:
            continue
        seen.add(name)
        for target, line, in_function in imports(known[name]):
            top = target.split(".")[0]
            if in_function:
                continue
            if top == "austeer_pl":
                if (found := resolve(target)) and found != "austeer_pl":
                    todo.append(found)
            elif top not in stdlib:
                wrong.append(f"{known[name].relative_to(ROOT)}:{line} imports {target}")
    assert not wrong, "\n".join(sorted(wrong))


def test_no_module_imports_another_modules_private_names():
    """What two modules share is public (no leading underscore): a private name is the module's own business."""
    wrong = []
    for path in modules().values():
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("austeer_pl"):
                wrong += [
                    f"{path.relative_to(ROOT)}:{node.lineno} imports {node.module}.{a.name}"
                    for a in node.names
                    if a.name.startswith("_") and not a.name.startswith("__")
                ]
    assert not wrong, "\n".join(wrong)


def test_every_module_says_what_it_is_for():
    """A module opens with a docstring of at least a sentence (an ``__init__`` of a folder may be empty)."""
    wrong = []
    for path in modules().values():
        text = path.read_text()
        doc = ast.get_docstring(ast.parse(text))
        if path.name == "__init__.py" and not text.strip():
            continue
        if not doc or len(doc.split()) < 6 or doc.strip().upper().startswith("TODO"):
            wrong.append(f"{path.relative_to(ROOT)}: {doc!r}")
    assert not wrong, "\n".join(wrong)


def test_no_module_is_over_400_lines_but_a_declared_data_table():
    long = {
        str(p.relative_to(ROOT)): n for p in modules().values() if (n := len(p.read_text().splitlines())) > MAX_LINES
    }
    tables = {name for name in long if DATA_TABLE in (ast.get_docstring(ast.parse((ROOT / name).read_text())) or "")}
    assert set(long) == tables, {name: n for name, n in long.items() if name not in tables}
    assert len(tables) <= 1, tables  # the paper protocol's specification


@pytest.mark.slow
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


def test_console_scripts_and_root_scripts_point_at_functions_that_exist():
    """Every ``[project.scripts]`` entry and every root ``*.py`` command imports what it names."""
    import importlib.util
    import tomllib

    scripts = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["scripts"]
    for name, target in scripts.items():
        module, _, attr = target.partition(":")
        assert callable(getattr(importlib.import_module(module), attr, None)), f"{name} = {target}"
    for script in ("train.py", "evaluate.py", "analyze.py", "export.py", "generate.py"):
        for target, _, _ in imports(ROOT / script):
            if target.startswith("austeer_pl."):
                module, _, attr = target.rpartition(".")
                assert hasattr(importlib.import_module(module), attr) or importlib.util.find_spec(target), (
                    f"{script}: {target}"
                )

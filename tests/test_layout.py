"""The architecture's rules (README.md, Layout), checked on the modules' source:

- the math (losses, sampling, noise, inversion) imports neither Ray nor DeepSpeed nor a stage;
- nothing in the library outside ``digits/`` imports the embedded default;
- only ``train/distributed.py`` imports DeepSpeed, and no library module imports Ray;
- nothing outside ``backends/`` matches on a model or pipeline class name (``backends/registry.py`` does);
- no import cycles among noiserefine modules, counting imports at module level and inside functions (not
  those under ``if TYPE_CHECKING:``, never run), and ``storage/`` imports no stage (targets, train,
  evaluation, digits).
"""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "noiserefine"
MATH = ("losses", "sampling", "noise", "inversion")


def imports_of(path: Path) -> set[str]:
    """Absolute dotted names a module imports (relative imports resolved against its package)."""
    package = path.relative_to(PACKAGE.parent).with_suffix("").parts[:-1]
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        names |= _imported(node, package)
    return names


def _imported(node: ast.AST, package: tuple[str, ...]) -> set[str]:
    """The dotted names one ``import`` / ``from ... import`` node imports (none for any other node)."""
    if isinstance(node, ast.Import):
        return {alias.name for alias in node.names}
    if isinstance(node, ast.ImportFrom):
        base = list(package[:len(package) - node.level + 1]) if node.level else []
        module = ".".join(base + ([node.module] if node.module else []))
        return {module} | {f"{module}.{alias.name}" for alias in node.names}
    return set()


def modules() -> list[Path]:
    return sorted(PACKAGE.rglob("*.py"))


def test_the_rules_see_imports():
    """Guard: the parser finds what a known module imports (else every rule below would pass vacuously)."""
    loop = imports_of(PACKAGE / "train" / "loop.py")
    assert "noiserefine.train.distributed" in loop and "noiserefine.losses.build_loss" in loop
    assert "deepspeed" in imports_of(PACKAGE / "train" / "distributed.py")


@pytest.mark.parametrize("name", MATH)
def test_math_imports_no_stage_and_no_distributed_framework(name):
    bad = {n for n in imports_of(PACKAGE / f"{name}.py")
           if n.split(".")[0] in ("ray", "deepspeed") or n.startswith(("noiserefine.targets", "noiserefine.train"))}
    assert not bad, f"{name}.py imports {sorted(bad)}"


def test_nothing_outside_digits_imports_digits():
    offenders = {str(p.relative_to(PACKAGE)): sorted(n for n in imports_of(p) if n.startswith("noiserefine.digits"))
                 for p in modules() if "digits" not in p.relative_to(PACKAGE).parts[:1]}
    assert not {k: v for k, v in offenders.items() if v}


def test_only_the_distributed_module_imports_deepspeed_and_none_imports_ray():
    users = {str(p.relative_to(PACKAGE)): sorted(n for n in imports_of(p) if n.split(".")[0] in ("ray", "deepspeed"))
             for p in modules()}
    assert {k for k, v in users.items() if v} == {"train/distributed.py"}, users


# --- model families are named in backends/ only ---------------------------------------------------------------
# A diffusers model or pipeline class name (dispatch on it belongs to backends/registry.py and the backend modules).
MODEL_CLASS = re.compile(r"[A-Z][A-Za-z0-9]*(?:Pipeline|Model|Transformer[A-Za-z0-9]*)|(?:StableDiffusion|UNet)"
                         r"[A-Za-z0-9]*")
ENTRY_SCRIPTS = [PACKAGE.parent / "pipeline" / "generate_targets.py", PACKAGE.parent / "trainer" / "train.py"]


def model_class_matches(source: str) -> list[str]:
    """Where code matches on a model class name: a string that is one (not a docstring: comparisons, dict keys,
    ``type(x).__name__ == ...``), or an ``isinstance``/``issubclass`` against one."""
    tree = ast.parse(source)
    docs = {id(node.value) for node in ast.walk(tree) if isinstance(node, ast.Expr)}
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Constant) and isinstance(node.value, str) and id(node) not in docs:
            if MODEL_CLASS.fullmatch(node.value.strip()):
                found.append(f"line {node.lineno}: {node.value!r}")
        elif isinstance(node, ast.Call) and getattr(node.func, "id", "") in ("isinstance", "issubclass"):
            names = [ast.unparse(n) for n in ast.walk(node.args[1]) if isinstance(n, (ast.Name, ast.Attribute))]
            found += [f"line {node.lineno}: {ast.unparse(node)}" for name in names
                      if MODEL_CLASS.fullmatch(name.rsplit(".", 1)[-1])]
    return found


def test_the_model_class_rule_sees_dispatch():
    """Guard: the dispatch the registry replaced, and an isinstance one, are caught; messages and docs are not."""
    old = 'if type(denoiser).__name__ == "SD3Transformer2DModel":\n    pass\n'
    assert model_class_matches(old) == ["line 1: 'SD3Transformer2DModel'"]
    assert model_class_matches("FAMILY = {'StableDiffusionXL': 1}\nok = isinstance(m, diffusers.UNet2DConditionModel)")
    assert len(model_class_matches("FAMILY = {'StableDiffusionXL': 1}\nok = isinstance(m, UNet2DConditionModel)")) == 2
    assert not model_class_matches('"""Loads a StableDiffusionPipeline."""\nraise ValueError("DiTPipeline asked")')


def test_nothing_outside_backends_matches_on_model_class_names():
    files = [p for p in modules() if p.relative_to(PACKAGE).parts[0] != "backends"] + ENTRY_SCRIPTS
    offenders = {str(p.relative_to(PACKAGE.parent)): model_class_matches(p.read_text()) for p in files}
    assert not {k: v for k, v in offenders.items() if v}, "model families are named in noiserefine/backends/ only"


# --- import cycles and the storage layer's independence ---------------------------------------------------------

def _runtime_imports(path: Path) -> set[str]:
    """Like :func:`imports_of`, at module level and inside functions alike, but without the imports under
    ``if TYPE_CHECKING:`` (never executed)."""
    package = path.relative_to(PACKAGE.parent).with_suffix("").parts[:-1]
    names: set[str] = set()

    def visit(node: ast.AST) -> None:
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            for child in node.orelse:
                visit(child)
            return
        names.update(_imported(node, package))
        for child in ast.iter_child_nodes(node):
            visit(child)

    visit(ast.parse(path.read_text()))
    return names


def module_graph() -> dict[str, set[str]]:
    """noiserefine module -> the noiserefine modules it imports when run (a package is its ``__init__``; the
    implicit import of a module's parent packages is not counted: Python runs those first, they cannot cycle
    back unless their own imports, which are counted, do)."""
    def name_of(path: Path) -> str:
        parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
        return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)

    paths = {name_of(p): p for p in modules()}
    graph = {}
    for name, path in paths.items():
        targets = set()
        for imported in _runtime_imports(path):
            while imported and imported not in paths:  # `from .x import f` -> module .x; `from . import x` -> .x
                imported = imported.rpartition(".")[0]
            if imported and imported != name:
                targets.add(imported)
        graph[name] = targets
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components of more than one module (Tarjan), each sorted."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    found: list[list[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        for target in sorted(graph[node]):
            if target not in index:
                visit(target)
                low[node] = min(low[node], low[target])
            elif target in stack:
                low[node] = min(low[node], index[target])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                component.append(member)
                if member == node:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return found


def test_the_cycle_check_sees_a_function_level_cycle():
    """Guard: a cycle held together by an import inside a function is a cycle (what storage had)."""
    graph = {"a": {"b"}, "b": {"a"}, "c": {"a"}}
    assert cycles(graph) == [["a", "b"]]
    assert "noiserefine.storage.base" in module_graph()["noiserefine.storage.local"]


def test_no_import_cycles_among_noiserefine_modules():
    assert cycles(module_graph()) == []


def test_the_storage_layer_imports_no_stage():
    stages = ("noiserefine.targets", "noiserefine.train", "noiserefine.evaluation", "noiserefine.digits")
    offenders = {str(p.relative_to(PACKAGE)): sorted(n for n in _runtime_imports(p) | imports_of(p)
                                                     if n.startswith(stages))
                 for p in sorted((PACKAGE / "storage").rglob("*.py"))}
    assert offenders and not {k: v for k, v in offenders.items() if v}, offenders


def test_the_evaluation_imports_no_training_stage():
    """The generic evaluation (``evaluation/``) runs without the trainer: its helpers live in neutral modules."""
    offenders = {str(p.relative_to(PACKAGE)): sorted(n for n in imports_of(p) if n.startswith("noiserefine.train"))
                 for p in sorted((PACKAGE / "evaluation").glob("*.py"))}
    assert not {k: v for k, v in offenders.items() if v}, offenders


def test_the_checkpointer_imports_nothing_about_caches_manifests_or_scales():
    """It saves and restores the stateful objects it is given (the stream owns its shard rows)."""
    about_data = ("noiserefine.targets", "noiserefine.shards", "noiserefine.storage", "noiserefine.train.stream",
                  "noiserefine.train.reader", "noiserefine.train.multi_scale", "noiserefine.train.order.GlobalOrder",
                  "noiserefine.train.mixture", "noiserefine.mixture")
    for name in ("checkpoint.py", "checkpoint_files.py"):
        bad = sorted(n for n in imports_of(PACKAGE / "train" / name) if n.startswith(about_data))
        assert not bad, f"train/{name} imports {bad}"

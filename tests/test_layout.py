"""The architecture's import rules, checked on the modules' import statements (DESIGN.md, Layout).

- the math (losses, sampling, noise, inversion) imports neither Ray nor DeepSpeed nor a stage;
- nothing in the library outside ``digits/`` imports the embedded default;
- only ``train/distributed.py`` imports DeepSpeed, and no library module imports Ray.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "noiserefine"
MATH = ("losses", "sampling", "noise", "inversion")


def imports_of(path: Path) -> set[str]:
    """Absolute dotted names a module imports (relative imports resolved against its package)."""
    package = path.relative_to(PACKAGE.parent).with_suffix("").parts[:-1]
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = list(package[:len(package) - node.level + 1]) if node.level else []
            module = ".".join(base + ([node.module] if node.module else []))
            names.add(module)
            names.update(f"{module}.{alias.name}" for alias in node.names)
    return names


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


def test_the_checkpointer_imports_nothing_about_caches_manifests_or_scales():
    """It saves and restores the stateful objects it is given (the stream owns its shard rows)."""
    about_data = ("noiserefine.targets", "noiserefine.shards", "noiserefine.storage", "noiserefine.train.stream",
                  "noiserefine.train.reader", "noiserefine.train.multi_scale", "noiserefine.train.order.GlobalOrder")
    for name in ("checkpoint.py", "checkpoint_files.py"):
        bad = sorted(n for n in imports_of(PACKAGE / "train" / name) if n.startswith(about_data))
        assert not bad, f"train/{name} imports {bad}"

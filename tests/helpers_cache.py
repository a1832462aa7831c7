"""Test helper: a tiny trained digit teacher and tiny teacher-target caches, built once per session.

The teacher (30 training steps) and the cache (4 shards of 16 samples, 3 teacher
steps) are built by calling the library directly (no Ray: starting Ray costs
about a minute here). Both live under pytest's session base temp directory and
are rebuilt only if missing, so the fixtures may be imported into several test
modules and still train the teacher once.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from conftest import one_intra_op_thread
from noiserefine.backends import load_backend
from noiserefine.digits.teacher import ensure_digits_teacher
from noiserefine.targets.cache import prepare_cache_dir, record_shards
from noiserefine.targets.scan import scan_cache
from noiserefine.config import load_config
from noiserefine.targets.identity import teacher_key
from noiserefine.targets.generate import generate_shard
from noiserefine.targets.plan import Plan

REPO = Path(__file__).resolve().parents[1]
DIGITS_YAML = REPO / "configs" / "digits.yaml"

NUM_SHARDS = 4
SHARD_SIZE = 16
# Everything small: 3 sampler steps, 64 cached samples, a 4-rank-LoRA.
# The tiny teacher's recipe. epsilon: a 30-step v-prediction teacher's guided and unguided rollouts are so close
# (MSD loss ~0.005) that the trainer tests' "loss falls by 30% in 32 steps" has nothing to learn.
TINY_TEACHER = ["model.digits.train_steps=30", "model.digits.prediction_type=epsilon"]
TINY = ["model.digits.train_steps=30", "teacher.num_steps=3", "student.num_steps=3",
        f"data.num_samples={NUM_SHARDS * SHARD_SIZE}", f"data.shard_size={SHARD_SIZE}",
        "pipeline.batch_size=16", "refiner.lora_rank=4", "refiner.lora_alpha=4.0",
        "train.global_batch_size=8", "train.num_loader_workers=0", "eval.num_samples=20", "eval.batch_size=20"]


def tiny_overrides(root: Path, teacher: Path) -> list[str]:
    """Overrides that point a digits config at the tiny teacher and a cache root under ``root``."""
    return TINY + [f"model.path={teacher}", f"data.cache_root={root / 'cache'}"]


def tiny_config(root: Path, teacher: Path, extra: list[str] | None = None):
    return load_config(DIGITS_YAML, tiny_overrides(root, teacher) + list(extra or []))


def build_cache(cfg) -> Path:
    """Generate every missing shard of ``cfg``'s cache in this process (the Ray job's per-shard work)."""
    cache_dir = prepare_cache_dir(cfg)
    plan = Plan.from_config(cfg.data)
    state = scan_cache(cache_dir, plan)
    if state.missing:
        backend = load_backend(cfg.model)
        key = teacher_key(cfg)
        infos = [generate_shard(backend, cfg, plan.shard(index), index, cache_dir, key)
                 for index in state.missing]
        record_shards(cache_dir, infos)
    return cache_dir


def copy_cache(cache_dir: Path, destination: Path) -> Path:
    """A private copy of a cache (for tests that damage shards)."""
    shutil.copytree(cache_dir, destination)
    return destination


@pytest.fixture(scope="session")
def tiny_teacher(tmp_path_factory) -> Path:
    path = tmp_path_factory.getbasetemp() / "tiny-teacher"
    settings = load_config(DIGITS_YAML, TINY_TEACHER).model.digits
    with one_intra_op_thread():  # the weights of a whole run, also in a run of one module (see there)
        return ensure_digits_teacher(settings, path, progress=False)


@pytest.fixture(scope="session")
def tiny_root(tmp_path_factory, tiny_teacher) -> Path:
    """Session directory holding the tiny cache (``cache/``) and the digit classifier."""
    root = tmp_path_factory.getbasetemp() / "tiny-root"
    root.mkdir(exist_ok=True)
    with one_intra_op_thread():
        build_cache(tiny_config(root, tiny_teacher))
    return root


@pytest.fixture(scope="session")
def tiny_cache(tiny_root, tiny_teacher) -> Path:
    from noiserefine.targets.cache import cache_dir_for

    return cache_dir_for(tiny_config(tiny_root, tiny_teacher))

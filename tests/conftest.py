"""Shared fixtures: tiny random backends (milliseconds) and one trained digit teacher per session."""

from __future__ import annotations

import contextlib
import os
from pathlib import Path

import pytest
import torch

from helpers_s3 import s3_server  # noqa: F401  (one S3 server per session, for every test that names it)
from noiserefine.backends.digits import DigitsBackend, SCHEDULER_CONFIG, build_unet

REPO = Path(__file__).resolve().parents[1]


def tiny_digits_backend(seed: int = 0, scheduler_overrides: dict | None = None) -> DigitsBackend:
    """A random-initialised digits backend: same classes as the real one, no training."""
    torch.manual_seed(seed)
    unet = build_unet([8, 16], 16)
    # Random init leaves conv_out near zero; scale it up so outputs depend visibly on inputs.
    with torch.no_grad():
        for p in unet.conv_out.parameters():
            p.normal_(0, 0.3)
    embedding = torch.randn(11, 1, 16)
    return DigitsBackend(unet, embedding, {**SCHEDULER_CONFIG, **(scheduler_overrides or {})})


@pytest.fixture
def tiny_backend() -> DigitsBackend:
    return tiny_digits_backend()


@pytest.fixture(scope="session")
def trained_teacher_dir(tmp_path_factory) -> Path:
    """The default digit teacher's recipe (configs/digits.yaml) at 200 of its 800 steps, trained once per session.

    200 steps (~55 s here) keep the suite inside its time budget; the full 800 are the
    demo's, whose guidance sweep and goals table judge that teacher. NOISEREFINE_TEST_TEACHER may
    point at an existing teacher directory to skip training.
    """
    from noiserefine.digits.teacher import ensure_digits_teacher
    from noiserefine.config import load_config

    existing = os.environ.get("NOISEREFINE_TEST_TEACHER")
    if existing:
        return Path(existing)
    cfg = load_config(REPO / "configs" / "digits.yaml", ["model.digits.train_steps=200"])
    with one_intra_op_thread():
        return ensure_digits_teacher(cfg.model.digits, tmp_path_factory.mktemp("teacher") / "digits",
                                     progress=False)


@contextlib.contextmanager
def one_intra_op_thread():
    """Torch's intra-op threads pinned to 1 for the block (then restored).

    Small networks: one thread is faster, and much faster on a shared 2-core machine. The session's teachers
    train under it: in a whole run the in-process teacher-target job (``pipeline.cpus_per_worker=1``, first
    in tests/faults/test_cache.py) has set 1 thread for the rest of the session before any teacher trains, so
    pinned they are the same weights in a whole run and in a run of one module (where 2 threads on a busy
    machine made the tiny teacher's 30 steps cost ~6x the CPU time)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def one_thread():
    """Tiny networks: one intra-op thread is faster, and much faster on a shared 2-core machine."""
    with one_intra_op_thread():
        yield


# prompts that name different digits (and one that names none), for refiner tests
REFINER_PROMPTS = ["a handwritten seven", "digit 3", "a cat", "nine"]


def refiner_inputs(backend):
    """Noise of seeds 0..3 and the conditioning of :data:`REFINER_PROMPTS`."""
    from noiserefine.noise import noise_from_seeds

    return noise_from_seeds(range(len(REFINER_PROMPTS)), backend.latent_shape), backend.encode_prompts(REFINER_PROMPTS)


def randomise_lora(refiner, seed=1, std=0.1):
    """Give the refiner's LoRA random weights (at init its correction is exactly zero)."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for parameter in refiner.trainable_parameters():
            parameter.copy_(torch.randn(parameter.shape, generator=generator) * std)

"""Fault tests of the stock-pipeline helpers (``noiserefine.pipelines``, issue 21 item 5): the refiner attached to a
pipeline is the one whose weights are in the directory now, not the one first loaded from that path."""

from __future__ import annotations

import pytest
import torch
from diffusers import StableDiffusionPipeline

from noiserefine.pipelines import refined_latents

from .tiny_refiner import save_tiny_refiner, tiny_sd_and_refiner

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


def pipeline(directory):
    pipe = StableDiffusionPipeline.from_pretrained(directory, safety_checker=None, requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.mark.slow  # >= 1 s on an idle 2-core machine: `make test` only, not the fast lane
def test_another_refiner_saved_at_the_same_path_is_reloaded(tmp_path, monkeypatch):
    monkeypatch.setenv("NOISEREFINE_HASH_CACHE", str(tmp_path / "file_hashes.json"))
    cfg, refiner_dir = tiny_sd_and_refiner(tmp_path)
    pipe = pipeline(tmp_path / "sd")
    first = refined_latents(pipe, refiner_dir, "a red cat", seeds=[0, 1])
    assert torch.equal(first, refined_latents(pipe, refiner_dir, "a red cat", seeds=[0, 1]))  # attached once

    save_tiny_refiner(cfg, refiner_dir, seed=1)  # another refiner, same directory
    again = refined_latents(pipe, refiner_dir, "a red cat", seeds=[0, 1])
    fresh = refined_latents(pipeline(tmp_path / "sd"), refiner_dir, "a red cat", seeds=[0, 1])
    assert (first - fresh).abs().max() > 1e-3  # the two refiners differ
    assert torch.equal(again, fresh)

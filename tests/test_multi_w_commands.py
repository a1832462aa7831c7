"""The guidance scale w of a refiner trained for a range of scales, through the commands and helpers
(``noiserefine.refiner_scales``: sample, evaluate, ``refined_latents``, ``enable_refiner``)."""

from __future__ import annotations

import json
import warnings

import pytest
import torch
from omegaconf import OmegaConf

from conftest import tiny_digits_backend
from noiserefine.backends import load_backend
from noiserefine.config import load_config, save_config
from noiserefine.evaluation.settings import REFINED_ROW, build_settings
from noiserefine.refiner import CONFIG_FILE, Refiner, save_refiner
from noiserefine.refiner_scales import refiner_guidance_scale, saved_refiner_config, trained_scales

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py

MULTI = ["data.guidance_scales=[1.5,3.0]", "refiner.guidance_timestep_slope=200"]
SMALL = ["refiner.lora_rank=4", "refiner.lora_alpha=4.0", "student.num_steps=2"]


# --- the rules (configs only: milliseconds) -------------------------------------------------------------------

def test_a_refiner_of_one_scale_takes_none_or_its_own_and_names_another():
    cfg = load_config(overrides=["teacher.guidance_scale=3.0"])
    assert trained_scales(cfg) == [3.0]
    assert refiner_guidance_scale(cfg, None, "r1") is None
    assert refiner_guidance_scale(cfg, 3.0, "r1") is None  # its own w: accepted, the refiner is not told w
    with pytest.raises(ValueError, match=r"r1: .*guidance scale 3 only.*guidance_scale=2\.5"):
        refiner_guidance_scale(cfg, 2.5, "r1")


def test_a_refiner_told_w_needs_one_warns_outside_its_range_and_refuses_a_negative_time():
    cfg = load_config(overrides=MULTI)
    assert trained_scales(cfg) == [1.5, 3.0]
    with pytest.raises(ValueError, match=r"rm: .*range of guidance scales \(1\.5, 3,.*--guidance-scale"):
        refiner_guidance_scale(cfg, None, "rm")
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # inside the range: no warning
        assert refiner_guidance_scale(cfg, 2, "rm") == 2.0
        assert refiner_guidance_scale(cfg, 1.5, "rm") == 1.5
    with pytest.warns(UserWarning, match=r"rm: guidance_scale=4 is outside .*\[1\.5, 3\]"):
        assert refiner_guidance_scale(cfg, 4.0, "rm") == 4.0
    with pytest.raises(ValueError, match=r"guidance_scale=7 gives the refiner time .* -201 < 0"):
        refiner_guidance_scale(cfg, 7.0, "rm")  # 999 - 200 * 6
    with pytest.raises(ValueError, match="guidance_scale nan is not finite"):
        refiner_guidance_scale(cfg, float("nan"), "rm")
    with pytest.raises(ValueError, match="guidance_scale 'strong' is not a number"):
        refiner_guidance_scale(cfg, "strong", "rm")


def test_a_mixture_refiner_told_w_has_its_components_scales():
    cfg = load_config(overrides=["refiner.guidance_timestep_slope=100",
                                 "data.mixture=[{name: low, teacher: {guidance_scale: 1.25}}, "
                                 "{name: high, teacher: {guidance_scale: 2.0}}]"])
    assert trained_scales(cfg) == [1.25, 2.0]
    with pytest.warns(UserWarning, match=r"outside .*\[1\.25, 2\]"):
        refiner_guidance_scale(cfg, 1.1, "mix")


def test_a_config_saved_before_the_slope_existed_is_a_refiner_of_one_scale(tmp_path):
    cfg = load_config(overrides=["teacher.guidance_scale=2.0"])
    save_config(cfg, tmp_path / CONFIG_FILE)
    text = OmegaConf.load(tmp_path / CONFIG_FILE)
    del text.refiner["guidance_timestep_slope"]
    del text.data["guidance_scales"]
    OmegaConf.save(text, tmp_path / CONFIG_FILE)
    saved = saved_refiner_config(tmp_path)
    assert refiner_guidance_scale(saved, None, tmp_path) is None
    with pytest.raises(ValueError, match="guidance scale 2 only"):
        refiner_guidance_scale(saved, 3.0, tmp_path)


# --- saved refiners on a tiny random digits model ---------------------------------------------------------------

def _saved(root, name: str, *overrides: str):
    """A refiner with random LoRA weights on the tiny digits teacher under ``root/teacher``, saved to ``root/name``."""
    teacher = root / "teacher"
    if not teacher.is_dir():
        tiny_digits_backend().save_pretrained(teacher)
    cfg = load_config(overrides=[f"model.path={teacher}", *SMALL, *overrides])
    refiner = Refiner(load_backend(cfg.model), cfg.refiner)
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for parameter in refiner.trainable_parameters():
            parameter.copy_(torch.randn(parameter.shape, generator=generator) * 0.1)
    return cfg, save_refiner(refiner, root / name, cfg)


@pytest.fixture(scope="module")
def refiners(tmp_path_factory):
    root = tmp_path_factory.mktemp("multi-w")
    return {"multi": _saved(root, "multi", *MULTI), "single": _saved(root, "single", "teacher.guidance_scale=3.0")}


@pytest.mark.slow  # builds two tiny refiners (~2 s)
def test_evaluate_refines_at_the_guided_rows_scale_and_keys_it(refiners):
    cfg, directory = refiners["multi"]
    rows = {w: [r for r in build_settings(load_config(directory / CONFIG_FILE,
                                                      [f"teacher.guidance_scale={w}"]), None, 2, directory, None)
                if r.slug == REFINED_ROW][0] for w in (1.5, 3.0)}
    assert [rows[w].refiner_scale for w in rows] == [1.5, 3.0]
    assert rows[1.5].identity["refiner"]["guidance_scale"] == 1.5
    assert rows[1.5].identity != rows[3.0].identity  # another w: another store, never resumed from the other
    single_cfg, single = refiners["single"]
    row = [r for r in build_settings(single_cfg, None, 2, single, None) if r.slug == REFINED_ROW][0]
    assert row.refiner_scale is None and "guidance_scale" not in row.identity["refiner"]  # run keys as before


@pytest.mark.slow  # the refiners fixture
def test_evaluate_cli_refuses_another_scale_for_a_refiner_of_one_scale(refiners):
    from noiserefine.evaluate import main, parser

    assert parser().parse_args(["--refiner", "r", "--guidance-scale", "2.5"]).guidance_scale == 2.5
    with pytest.raises(ValueError, match=r"--guidance-scale: .*guidance scale 3 only.*guidance_scale=2\.5"):
        main(["--refiner", str(refiners["single"][1]), "--guidance-scale", "2.5"])


@pytest.mark.slow  # runs the sample command four times (~1 s each)
def test_sample_cli_forwards_the_scale_and_names_a_missing_or_wrong_one(refiners, tmp_path):
    from noiserefine.sample import main

    def sample(directory, out, *extra):
        return main(["--refiner", str(directory), "--prompt", "seven", "--prompt", "2", "--seeds", "0-1",
                     "--out", str(tmp_path / out), "--no-progress", *extra])

    multi, single = refiners["multi"][1], refiners["single"][1]
    assert sample(multi, "low", "--guidance-scale", "1.5", "--compare") == 0
    assert sample(multi, "high", "--guidance-scale", "3") == 0
    record = json.loads((tmp_path / "low" / "sample.json").read_text())
    assert record["refiner_guidance_scale"] == 1.5
    assert record["guidance"]["config"]["guidance_scale"] == 1.5  # the guided row of --compare at the same w
    low, high = ((tmp_path / out / "refined" / "0000_0.png").read_bytes() for out in ("low", "high"))
    assert low != high, "the refiner's w must change the refined images"
    with pytest.raises(ValueError, match=r"--guidance-scale: .*range of guidance scales \(1\.5, 3"):
        sample(multi, "none")
    with pytest.raises(ValueError, match=r"guidance scale 3 only.*guidance_scale=2"):
        sample(single, "wrong", "--guidance-scale", "2")
    assert sample(single, "own", "--guidance-scale", "3") == 0
    assert json.loads((tmp_path / "own" / "sample.json").read_text())["refiner_guidance_scale"] is None

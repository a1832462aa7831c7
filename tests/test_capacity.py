"""The capacity calculator's arithmetic (``python -m noiserefine.capacity``): sizes against real shards written
by the one shard writer, the time formulas against hand-computed values, the worked example of docs/scale.md
(from the measured figures passed in: ``--measured`` / ``figures=``, never read from bench/ by the library)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
from diffusers.guiders import ClassifierFreeGuidance

from noiserefine import capacity
from noiserefine.config import load_config
from noiserefine.guidance import PipelinePAG
from noiserefine.shards import ShardSample, sample_key, write_shard

REPO = Path(__file__).resolve().parents[1]
GPU_CHECK = REPO / "bench" / "results" / "2026-11-26-h200-gpu_check.json"


def gpu_check(architecture: str, samples_per_s: float, latent: list[int], msd: dict[int, float]) -> dict:
    """A GPU check's JSON (``bench/gpu_check.py``) with one measured architecture, CFG+PAG at 10 steps."""
    build = {"architecture": architecture, "latent_shape": latent}
    return {"cases": [
        {"name": f"{architecture}_generation", "figures": {"batch": 4, "teacher_steps": 10, "guidance": "cfg_pag",
                                                          "generation_samples_per_s": samples_per_s, "build": build}},
        {"name": f"{architecture}_losses", "figures": {"batch": 2, "build": build, "rows": [
            {"loss": "msd", "steps": n, "seconds": t, "status": "ok"} for n, t in msd.items()]}},
        {"name": "gpu_tests", "figures": {"passed": 3}}]}


@pytest.mark.parametrize("latent, dtype, count", [((4, 8, 8), "float16", 3), ((4, 8, 8), "float32", 5),
                                                   ((1, 16, 16), "float16", 16), ((4, 30, 30), "float16", 2)])
def test_sizes_are_those_of_real_shards(latent, dtype, count, tmp_path):
    prompt = "x" * 300  # data.max_prompt_chars: the longest prompt a sample can hold
    meta = {"prompt": prompt, "source": "pickapic", "teacher_key": "sdxl-0123456789ab",
            "noise_fingerprint": "0123456789abcdef"}
    samples = [ShardSample(sample_key(i), {**meta, "sample_id": i, "seed": 2**63 - 1 - i},
                           {"target": np.zeros(latent, dtype)}) for i in range(count)]
    info = write_shard(tmp_path / "shard-000000.tar", samples)
    per_sample = capacity.sample_bytes(latent, dtype, 300)
    assert capacity.shard_bytes(count, per_sample) == info.num_bytes
    assert capacity.cache_bytes(2 * count + 1, count, per_sample) == 2 * info.num_bytes + \
        capacity.shard_bytes(1, per_sample)


def test_known_sizes():
    assert capacity.sample_bytes((1, 16, 16), "float16", 300) == 2560  # the digits cache: 16 samples in 51200 B
    assert capacity.shard_bytes(16, 2560) == 51200
    assert capacity.sample_bytes((4, 128, 128), "float16", 300) == 512 + 512 + 512 + 131584  # SDXL
    assert capacity.sample_bytes((4, 64, 64), "float16", 300) == 34816  # SD 2.1 (512 x 512)


def test_time_formulas():
    # 10 steps x 3 forwards (CFG+PAG) x 10 ms; a latent with 4x the pixels costs 4x
    pag, cfg = PipelinePAG(guidance_scale=7.5, perturbed_guidance_scale=3.0), ClassifierFreeGuidance(7.5)
    assert capacity.teacher_seconds_per_sample(0.01, 10, pag, (4, 64, 64), (4, 64, 64)) == pytest.approx(0.3)
    assert capacity.teacher_seconds_per_sample(0.01, 10, cfg, (4, 128, 128), (4, 64, 64)) == pytest.approx(0.8)
    # measured 1 s at N=10 and 3 s at N=50 (batch 4): N=30 takes 2 s -> 2 samples/s
    assert capacity.train_samples_per_second({10: 1.0, 50: 3.0}, 4, 30) == pytest.approx(2.0)
    assert capacity.train_samples_per_second({10: 1.0}, 4, 20) == pytest.approx(2.0)


def test_sdxl_million_samples_from_the_measured_h200_figures():
    cfg = load_config(REPO / "configs" / "sdxl.yaml")
    table = capacity.plan(cfg, 1_000_000, wall_hours=24, gpus_per_node=8, figures=capacity.load_measured(GPU_CHECK))
    assert table["latent_shape"] == [4, 128, 128] and table["shards"] == 1000
    assert table["cache_bytes"] == 1000 * capacity.shard_bytes(1000, 133120)
    # 1.799 samples/s at 10 CFG+PAG steps -> per sample-forward 1/(1.799*30) s; the config's CFG teacher: 20 steps x 2
    assert (cfg.teacher.guidance, cfg.teacher.num_steps, cfg.student.num_steps) == ("cfg", 20, 10)
    per_sample = 20 * 2 / (1.799 * 30)
    assert table["teacher_seconds_per_sample"] == pytest.approx(per_sample, rel=1e-3)
    assert table["teacher_gpu_hours"] == pytest.approx(1e6 * per_sample / 3600, rel=1e-3)
    assert table["teacher_gpus_for_wall_hours"] == math.ceil(table["teacher_gpu_hours"] / 24)
    # MSD, batch 1: 1.016 s at N=10, 3.5903 s at N=50 -> N=10 (the config's student): 1/1.016 samples/s
    assert table["train_samples_per_s_per_gpu"] == pytest.approx(1 / 1.016, rel=1e-3)
    assert table["train_samples_seen"] == 39000 * 8


def test_figures_are_data_and_apply_to_the_measured_family_scaled_by_latent_pixels():
    figures = capacity.measured_points(gpu_check("sd21", 2.0, [4, 64, 64], {10: 1.0, 50: 3.0}), "mine.json")
    per_forward = 1 / (2.0 * 10 * 3)
    assert figures["sd21"]["teacher"].seconds_per_forward == pytest.approx(per_forward)
    cfg = load_config(REPO / "configs" / "sd15.yaml")  # SD 1.5 (64x64 latents) uses SD 2.1's point
    table = capacity.plan(cfg, 1000, figures=figures)
    assert table["architecture"] == "sd15" and table["teacher_source"].startswith("mine.json: sd21_generation")
    steps, forwards = cfg.teacher.num_steps, 3
    assert table["teacher_seconds_per_sample"] == pytest.approx(steps * forwards * per_forward)
    # the student's N=50 step takes 3 s at batch 2
    assert table["train_samples_per_s_per_gpu"] == pytest.approx(2 / 3.0)
    big = capacity.plan(load_config(REPO / "configs" / "sd21_768.yaml"), 1000, figures=figures)
    assert big["teacher_seconds_per_sample"] == pytest.approx(steps * forwards * per_forward * 96**2 / 64**2)
    for other in ("sdxl", "sit_xl2", "sd3"):  # another family: sizes, no times
        table = capacity.plan(load_config(REPO / "configs" / f"{other}.yaml"), 1000, figures=figures)
        assert "teacher_gpu_hours" not in table and "train_gpu_hours" not in table and table["cache_bytes"] > 0


def test_latent_shapes_come_from_the_architecture_or_the_registered_family():
    shape = {name: capacity.latent_shape_of(load_config(REPO / "configs" / f"{name}.yaml"))
             for name in ("sd15", "sd21_768", "sdxl", "sit_xl2", "sd3", "digits")}
    assert shape == {"sd15": (4, 64, 64), "sd21_768": (4, 96, 96), "sdxl": (4, 128, 128), "sit_xl2": (4, 32, 32),
                     "sd3": (16, 128, 128), "digits": (1, 16, 16)}
    with pytest.raises(ValueError, match="models/sd-turbo.*several resolutions.*--latent-shape"):
        capacity.latent_shape_of(load_config(REPO / "configs" / "sd_turbo.yaml"))


def test_command_line(capsys, tmp_path):
    sd21 = str(REPO / "configs" / "sd21.yaml")
    assert capacity.main(["--config", sd21, "--samples", "50000", "--json", "--measured", str(GPU_CHECK)]) == 0
    table = json.loads(capsys.readouterr().out)
    assert table["samples"] == 50000 and table["shards"] == 50 and table["latent_shape"] == [4, 64, 64]
    assert table["teacher_source"].startswith(GPU_CHECK.name) and table["train_gpu_hours"] > 0
    assert capacity.main(["--config", sd21, "--samples", "50000", "--json"]) == 0  # no figures: no times
    untimed = json.loads(capsys.readouterr().out)
    assert "teacher_gpu_hours" not in untimed and untimed["cache_bytes"] == table["cache_bytes"]
    assert capacity.main(["--config", str(REPO / "configs" / "sit_xl2.yaml"), "--measured", str(GPU_CHECK)]) == 0
    assert "not measured for this model family: pass --measured" in capsys.readouterr().out
    broken = tmp_path / "broken.json"
    broken.write_text("{not json")
    with pytest.raises(ValueError, match="broken.json"):
        capacity.main(["--config", sd21, "--measured", str(broken)])
    broken.write_text(json.dumps({"results": []}))
    with pytest.raises(ValueError, match="broken.json: not a GPU check"):
        capacity.main(["--config", sd21, "--measured", str(broken)])
    check = gpu_check("sd21", 2.0, [4, 64, 64], {10: 1.0})
    del check["cases"][0]["figures"]["build"]
    broken.write_text(json.dumps(check))
    with pytest.raises(ValueError, match="broken.json: case 'sd21_generation'.*'build'"):
        capacity.main(["--config", sd21, "--measured", str(broken)])

"""Smoke run of the main command (`make demo`) on a tiny budget: every stage, real Ray and DeepSpeed; then the
multi-scale experiment (``noiserefine.digits.multi_scale --quick``) on the same run directory (its teacher,
classifier and the demo's cache of one of its scales are reused, as a user would run them)."""

import json
import math
import os
import subprocess
import sys

from conftest import REPO
import pytest

from noiserefine.config import load_config
from noiserefine.digits.sweep import pick_adherence_scale

pytestmark = pytest.mark.slow  # subprocesses, Ray, DeepSpeed or teacher training: `make test` only


def test_quick_demo_writes_report(tmp_path):
    run_dir = tmp_path / "run"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    env.pop("RAY_ADDRESS", None)
    result = subprocess.run([sys.executable, "-m", "noiserefine.digits.demo", "--quick", "--run-dir", str(run_dir)],
                            cwd=REPO, env=env, capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    for name in ("report.md", "metrics.json", "config.yaml", "samples.png", "transfer.png", "spectrum.png",
                 "msd_vs_full_gradient.png", "sweep.json", "sweep.png", "comparison.png"):
        assert (run_dir / name).is_file(), name
    metrics = json.loads((run_dir / "metrics.json").read_text())
    main = metrics["main"]
    refined, unguided = main["Refined noise, unguided (ours)"], main["Gaussian noise, unguided"]
    # the sweep ran on the teacher alone, before the cache, and its choice is the teacher's w everywhere after
    sweep = json.loads((run_dir / "sweep.json").read_text())
    assert [row["scale"] for row in sweep["rows"]] == [1.0, 1.5, 3.0]
    chosen = sweep["chosen_scale"]
    assert sweep["metric"] == "adherence"  # the default task is the compositional one: its rule
    assert chosen == pick_adherence_scale({row["scale"]: row for row in sweep["rows"]})
    assert metrics["sweep"]["chosen_scale"] == metrics["sweep"]["teacher_guidance_scale"] == chosen
    assert "guidance_scale: " + str(float(chosen)) in (run_dir / "config.yaml").read_text()
    cache_teacher = (run_dir / "cache").glob("*/teacher.yaml")
    assert all(f"guidance_scale: {float(chosen)}" in path.read_text() for path in cache_teacher)
    for key in ("fid_class", "precision", "recall", "noise_share", "adherence", "acc_position"):
        assert key in refined and key in unguided, key
    assert metrics["task"] == "compose" and metrics["gap_metric"] == "adherence"
    u, r, g = unguided["adherence"], refined["adherence"], main["Gaussian noise, guided (CFG)"]["adherence"]
    # a smoke teacher may show no gap at all (u == g): then it is undefined
    assert refined["gap_closed"] == pytest.approx((u - r) / (u - g) if u != g else math.nan, nan_ok=True)
    goals = metrics["goals"]
    assert len(goals) >= 7 and all(isinstance(goal["met"], bool) for goal in goals)
    report = (run_dir / "report.md").read_text()
    for heading in ("## Goals (measured, not tuned)", "## Guidance sweep of the teacher (chooses w)",
                    "class-cond. FID", "![comparison](comparison.png)", "![sweep](sweep.png)",
                    "unguided samples miss prompts", "Per attribute"):
        assert heading in report, heading
    assert metrics["spectrum"]["refinement_rms"] > 0
    assert refined["fid"] != unguided["fid"], "refined noise must change the samples"
    assert refined["nfe"] == unguided["nfe"] + 1  # the default refiner.form, single_call: one network call
    assert "## Main table" in (run_dir / "report.md").read_text()
    # ablations: noise space vs the main refiner; full gradient vs the main run's own step-2 snapshot
    assert metrics["noise_space"]["Refined noise, noise-space loss"]["fid"] != refined["fid"]
    assert set(metrics["training_curves"]) == {"msd", "full_gradient"}
    assert json.loads((run_dir / "ablation-noise_space" / "done.json").read_text())["max_steps"] == 4
    assert json.loads((run_dir / "ablation-full_gradient" / "done.json").read_text())["max_steps"] == 2
    assert not (run_dir / "ablation-msd").exists()
    assert (run_dir / "refiner-msd" / "snapshots" / "step00000002" / "refiner.safetensors").is_file()
    # re-running reuses everything: no new teacher training, no new shards, training already done
    again = subprocess.run([sys.executable, "-m", "noiserefine.digits.demo", "--quick", "--run-dir", str(run_dir)],
                           cwd=REPO, env=env, capture_output=True, text=True, timeout=900)
    assert again.returncode == 0, again.stdout[-3000:]
    assert "0 to generate" in again.stdout
    assert "train digit teacher" not in again.stdout + again.stderr
    assert "sweep: reusing" in again.stdout
    _check_quick_multi_scale(run_dir, env)


def _check_quick_multi_scale(run_dir, env):
    command = [sys.executable, "-m", "noiserefine.digits.multi_scale", "--quick", "--run-dir", str(run_dir)]
    result = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "train digit teacher" not in result.stdout + result.stderr  # the demo's teacher, reused
    for name in ("multi_scale.json", "multi_scale.md", "multi_scale.png", "multi_scale_config.yaml"):
        assert (run_dir / name).is_file(), name
    results = json.loads((run_dir / "multi_scale.json").read_text())
    assert results["scales"] == [1.5, 3.0] and [e["scale"] for e in results["rows"]] == [1.5, 3.0]
    assert results["budget"]["multi_scale_steps"] == results["budget"]["per_scale_steps"] == 4
    for entry in results["rows"]:
        for key in ("teacher", "per_scale", "multi_scale"):
            assert "fid_class" in entry[key] and "accuracy" in entry[key] and "gap_closed" in entry[key], key
        assert entry["teacher"]["nfe"] == 8 and entry["multi_scale"]["nfe"] == entry["per_scale"]["nfe"] == 5
        assert entry["teacher"]["gap_closed"] == pytest.approx(1.0)
    # the multi-w refiner is evaluated at each w: its rows differ across w
    assert results["rows"][0]["multi_scale"]["fid"] != results["rows"][1]["multi_scale"]["fid"]
    assert "w=1.5 multi-w refiner" in (run_dir / "multi_scale.md").read_text()
    # and at a w it was not trained on (between its two), against the teacher there
    assert results["held_out_scales"] == [2.0] and [e["scale"] for e in results["held_out"]] == [2.0]
    held_out = results["held_out"][0]
    assert held_out["teacher"]["nfe"] == 8 and held_out["multi_scale"]["nfe"] == 5
    assert held_out["multi_scale"]["fid"] not in {e["multi_scale"]["fid"] for e in results["rows"]}
    assert "multi-w refiner (not trained on w=2)" in (run_dir / "multi_scale.md").read_text()
    # compose's default multi-w refiner has the correction gain (configs/compose.yaml): named for it
    multi = load_config(run_dir / "multi_scale" / "refiner-multi-w1.5-3-gain" / "refiner" / "config.yaml")
    assert list(multi.data.guidance_scales) == [1.5, 3.0] and multi.refiner.guidance_timestep_slope == 200.0
    assert multi.refiner.guidance_correction_gain is True
    # one cache per scale: the demo's (at its chosen w, one of the two) and one new
    assert len(list((run_dir / "cache").glob("*/teacher.yaml"))) == 2

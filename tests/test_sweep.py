"""The guidance sweep's rule, its resumable record, the metrics table and the side-by-side figure."""

from __future__ import annotations

import json
import math

import pytest
import torch
from diffusers.guiders import ClassifierFreeGuidance
from PIL import Image

from conftest import tiny_digits_backend
from noiserefine.config import load_config
from noiserefine.digits import sweep as sweep_module
from noiserefine.digits.sweep import ensure_sweep, pick_scale, plot_sweep, sweep_guidance
from noiserefine.evaluation.comparison import save_comparison_grid
from noiserefine.evaluation.rows import Row, metrics_markdown
from noiserefine.guidance import network_calls


def test_pick_scale_takes_the_lowest_class_conditional_fid_ties_to_the_smaller_w():
    rows = {1.0: {"fid_class": 50.0}, 1.5: {"fid_class": 40.0}, 2.0: {"fid_class": 40.0}, 3.0: {"fid_class": 90.0}}
    assert pick_scale(rows) == 1.5
    assert pick_scale(rows, metric="fid_class") == 1.5
    with pytest.raises(ValueError, match="finite"):
        pick_scale({1.0: {"fid_class": 30.0}, 2.0: {"fid_class": math.nan}})


def test_pick_scale_chooses_a_guidance_scale_even_where_unguided_is_best():
    # w = 1 is the unguided baseline, not a guidance scale: a teacher whose guided samples never beat its
    # unguided ones still gets the best w > 1 (and the report's goals say guidance does not help there)
    rows = {1.0: {"fid_class": 30.0}, 1.1: {"fid_class": 31.0}, 1.25: {"fid_class": 35.0}}
    assert pick_scale(rows) == 1.1
    with pytest.raises(ValueError, match="w > 1"):
        pick_scale({1.0: {"fid_class": 30.0}})


def test_sweep_guidance_w1_is_the_unguided_sampler():
    cfg = load_config()
    assert sweep_guidance(cfg, 1.0) is None
    guided = sweep_guidance(cfg, 2.5)
    assert cfg.teacher.guidance == "cfg" and type(guided) is ClassifierFreeGuidance
    assert guided.guidance_scale == 2.5 and network_calls(guided, 4) == 8


def test_ensure_sweep_reuses_its_record_only_for_the_same_identity(tmp_path, monkeypatch):
    cfg = load_config(overrides=["eval.num_samples=6", "eval.batch_size=6", "student.num_steps=2",
                                 "eval.prompts=[a handwritten one, a handwritten two]"])
    backend = tiny_digits_backend()
    calls = []

    def metric_fn(images, prompts):
        calls.append(len(images))
        return {"fid": float(images.mean()), "fid_class": float(len(calls)), "accuracy": 0.5}

    record = ensure_sweep(cfg, backend, metric_fn, [1.0, 2.0, 3.0], tmp_path, {"weights": "a"})
    # fid_class 1, 2, 3; w = 1 is never chosen; then the APG row at the chosen w (not used to choose)
    assert calls == [6, 6, 6, 6] and record["chosen_scale"] == 2.0
    assert [row["scale"] for row in record["rows"]] == [1.0, 2.0, 3.0]
    (apg,) = record["guider_rows"]
    assert apg["guider"] == "APG" and apg["class"] == "AdaptiveProjectedGuidance" and apg["scale"] == 2.0
    assert apg["fid_class"] == 4.0 and apg["nfe"] == 2 * 2  # 2 steps x [uncond, cond]
    assert json.loads((tmp_path / "sweep.json").read_text())["chosen_scale"] == 2.0
    again = ensure_sweep(cfg, backend, metric_fn, [1.0, 2.0, 3.0], tmp_path, {"weights": "a"})
    assert calls == [6, 6, 6, 6] and again == record  # reused, nothing sampled
    ensure_sweep(cfg, backend, metric_fn, [1.0, 2.0, 3.0], tmp_path, {"weights": "retrained"})
    assert len(calls) == 8  # another teacher: recomputed
    (tmp_path / "sweep.json").write_text("{not json")
    ensure_sweep(cfg, backend, metric_fn, [1.0, 2.0], tmp_path, {"weights": "a"})
    assert len(calls) == 11  # a damaged record is recomputed (2 scales + APG)
    with pytest.raises(ValueError):
        ensure_sweep(cfg, backend, metric_fn, [], tmp_path, {"weights": "a"})


@pytest.mark.slow  # >= 1 s on an idle 2-core machine: `make test` only, not the fast lane
def test_plot_sweep_writes_a_png(tmp_path):
    record = {"chosen_scale": 1.5, "rows": [{"scale": w, "fid": 10 * w, "fid_class": 30 / w, "accuracy": 0.9,
                                             "precision": 0.8, "recall": 0.9 / w, "nfe": 20} for w in (1, 1.5, 3)]}
    plot_sweep(record, {"refined": {"fid": 12, "fid_class": 20, "accuracy": 0.95, "nfe": 12}}, tmp_path / "s.png")
    with Image.open(tmp_path / "s.png") as image:
        assert image.size[0] > 1000


def test_metrics_markdown_formats_and_marks_missing_values():
    table = metrics_markdown([("a", {"fid": 1.234, "nfe": 12, "share": 0.005}), ("b", {"fid": math.nan})],
                             [("nfe", "NFE", "d"), ("fid", "FID", ".2f"), ("share", "noise", ".1%")])
    lines = table.splitlines()
    assert lines[0] == "| row | NFE | FID | noise |" and lines[1] == "|---|---|---|---|"
    assert lines[2] == "| a | 12 | 1.23 | 0.5% |" and lines[3] == "| b | - | - | - |"


def test_comparison_grid_has_a_title_band_and_one_line_per_row(tmp_path):
    backend = tiny_digits_backend()
    latents = torch.randn(12, *backend.latent_shape)
    rows = [Row(name, 10, latents, 0.0) for name in ("unguided", "guided", "refined")]
    prompts = [f"a handwritten {d}" for d in range(12)]
    save_comparison_grid(rows, backend, prompts, tmp_path / "c.png", num_columns=10, scale=6, pad=3)
    with Image.open(tmp_path / "c.png") as image:
        width, height = image.size
        gray = image.convert("L")
        title_band = [gray.getpixel((x, y)) for x in range(width) for y in range(0, 10)]
    assert height > 3 * (16 * 6 + 3) + 10  # three image rows and a title band
    assert width > 10 * (16 * 6 + 3)  # ten columns (capped from twelve samples) and the labels' margin
    assert min(title_band) < 128  # some title text was drawn
    with pytest.raises(ValueError):
        save_comparison_grid(rows, backend, prompts, tmp_path / "bad.png", row_labels=["only one"])


def test_the_reports_teacher_rows_are_the_sweeps_own_samples_while_its_identity_holds(tmp_path, monkeypatch):
    from noiserefine.digits import report
    from noiserefine.digits.sweep import SAMPLES_FILE, sweep_identity, sweep_row
    from noiserefine.evaluation.rows import eval_set, sample_row

    cfg = load_config(overrides=["eval.num_samples=6", "eval.batch_size=4", "student.num_steps=2",
                                 "eval.prompts=[a handwritten one, a handwritten two]", "teacher.guidance_scale=3"])
    backend = tiny_digits_backend()
    monkeypatch.setattr(report, "model_identity", lambda model_cfg: {"weights": "a"})
    metric_fn = lambda images, prompts: {"fid": float(images.mean()), "fid_class": 1.0, "accuracy": 0.5}
    record = ensure_sweep(cfg, backend, metric_fn, [1.0, 3.0], tmp_path, {"weights": "a"})
    evals = eval_set(cfg)
    fresh = [sample_row("u", backend, evals, 2, batch_size=4),
             sample_row("g", backend, evals, 2, guidance=sweep_guidance(cfg, 3.0), batch_size=4)]

    def no_sampling(*args, **kwargs):
        raise AssertionError("sampled again although the sweep holds these rows")

    monkeypatch.setattr(report, "sample_row", no_sampling)
    unguided, guided = report.teacher_rows(cfg, backend, evals, record, tmp_path)
    assert torch.equal(unguided.latents, fresh[0].latents) and torch.equal(guided.latents, fresh[1].latents)
    assert (unguided.nfe, guided.nfe) == (2, 4) and guided.seconds_per_sample == record["rows"][1]["seconds_per_sample"]

    # never handed over: another teacher, a scale the sweep lacks, a replaced samples file
    identity = sweep_identity(cfg, {"weights": "a"}, [1.0, 3.0])
    assert sweep_row(record, tmp_path, 3.0, identity, "g") is not None
    assert sweep_row(record, tmp_path, 3.0, {**identity, "model": {"weights": "b"}}, "g") is None
    assert sweep_row(record, tmp_path, 2.0, identity, "g") is None
    (tmp_path / SAMPLES_FILE).write_bytes((tmp_path / SAMPLES_FILE).read_bytes()[:-4] + b"\0\0\0\0")
    assert sweep_row(record, tmp_path, 3.0, identity, "g") is None
    with pytest.raises(AssertionError, match="sampled again"):  # so the report samples them itself
        report.teacher_rows(cfg, backend, evals, record, tmp_path)

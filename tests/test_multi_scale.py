"""One refiner for a range of guidance scales: the refiner told w, its config rules, the multi-cache stream."""

from __future__ import annotations

import itertools
import json
import os
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

from conftest import REFINER_PROMPTS as PROMPTS, randomise_lora, refiner_inputs, tiny_digits_backend
from helpers_cache import REPO, build_cache, tiny_cache, tiny_config, tiny_overrides, tiny_root, tiny_teacher  # noqa: F401
from noiserefine.backends import load_backend
from noiserefine.config import load_config
from noiserefine.config_schema import RefinerConfig
from noiserefine.noise import noise_from_seeds
from noiserefine.refiner import Refiner, adapters_enabled, load_refiner, lora_enabled
from noiserefine.digits.multi_scale import held_out_scales
from noiserefine.train.multi_scale import MultiScaleStream, at_guidance_scale, open_scale_caches
from noiserefine.train.stream import DataPosition, TeacherStream

SLOPE = 200.0
SCALES = (1.5, 3.0)  # 3.0: the tiny session cache (configs/digits.yaml's teacher.guidance_scale)
MULTI = ["data.guidance_scales=[1.5,3.0]", f"refiner.guidance_timestep_slope={SLOPE}"]


# --- the refiner ---------------------------------------------------------------------------------------

def test_slope_zero_is_the_fixed_timestep_refiner_bit_for_bit(tiny_backend):
    """k = 0 (the default): x_T + (eps_LoRA(x_T, timestep) - eps(x_T, timestep)), exactly as before (the
    difference form spells the formula out; the single_call form is told w through the same time input)."""
    refiner = Refiner(tiny_backend, RefinerConfig(form="difference"))
    assert not refiner.guidance_conditioned
    randomise_lora(refiner)
    noise, cond = refiner_inputs(tiny_backend)
    t = torch.tensor(999.0)
    with torch.no_grad():
        base = tiny_backend.denoise(noise, t, cond)
        with lora_enabled(tiny_backend.denoiser):
            adapted = tiny_backend.denoise(noise, t, cond)
        refined = refiner(noise, cond)
    assert (adapted - base).abs().max() > 1e-3  # the LoRA acts: the check below can fail
    assert torch.equal(refined, noise + (adapted - base))
    assert torch.equal(refiner.refine(noise, PROMPTS), refined)
    # told w at w = 1, a refiner with k > 0 computes the same (its time is refiner.timestep there)
    conditioned = Refiner(tiny_digits_backend(), RefinerConfig(form="difference", guidance_timestep_slope=SLOPE))
    randomise_lora(conditioned)
    with torch.no_grad():
        torch.testing.assert_close(conditioned(noise, cond, guidance_scale=1.0), refined, rtol=0, atol=1e-6)


def test_told_w_zero_at_init_for_every_w_and_differs_across_w_after_a_step(tiny_backend):
    refiner = Refiner(tiny_backend, RefinerConfig(guidance_timestep_slope=SLOPE))
    assert refiner.guidance_conditioned
    noise, cond = refiner_inputs(tiny_backend)
    for w in (1.0, 1.25, 2.0, 4.0, torch.tensor([1.25, 1.5, 2.0, 3.0])):
        assert torch.equal(refiner(noise, cond, guidance_scale=w), noise)
        assert torch.equal(refiner.refine(noise, PROMPTS, guidance_scale=w), noise)
    assert torch.equal(refiner.refiner_time(torch.tensor([1.25, 2.0]), 2), torch.tensor([949.0, 799.0]))
    # one gradient step on a batch of mixed scales (LoRA B moves off zero)
    optimizer = torch.optim.SGD(refiner.trainable_parameters(), lr=0.5)
    target = torch.ones_like(noise)
    refined = refiner(noise, cond, guidance_scale=torch.tensor([1.25, 2.0, 1.25, 2.0]))
    (refined - target).square().mean().backward()
    optimizer.step()
    assert not adapters_enabled(tiny_backend.denoiser)
    with torch.no_grad():
        low, high = (refiner(noise, cond, guidance_scale=w) for w in (1.25, 2.0))
    assert (low - noise).abs().max() > 1e-4 and (high - noise).abs().max() > 1e-4
    assert (low - high).abs().max() > 1e-5, "the correction must depend on w"
    with torch.no_grad():  # per-sample scales: each sample as if refined alone at its own w
        mixed = refiner(noise, cond, guidance_scale=torch.tensor([1.25, 2.0, 2.0, 1.25]))
    torch.testing.assert_close(mixed[[0, 3]], low[[0, 3]], rtol=0, atol=1e-6)
    torch.testing.assert_close(mixed[[1, 2]], high[[1, 2]], rtol=0, atol=1e-6)


def test_w_missing_or_not_expected_is_an_error(tiny_backend):
    noise, cond = refiner_inputs(tiny_backend)
    plain = Refiner(tiny_backend, RefinerConfig())
    with pytest.raises(ValueError, match="trained for one guidance scale"):
        plain(noise, cond, guidance_scale=2.0)
    told = Refiner(tiny_digits_backend(), RefinerConfig(guidance_timestep_slope=SLOPE))
    with pytest.raises(ValueError, match="give the guidance scale w"):
        told.refine(noise, PROMPTS)
    with pytest.raises(ValueError, match="expected a number or one per sample"):
        told(noise, cond, guidance_scale=torch.tensor([1.5, 2.0]))
    with pytest.raises(ValueError, match="must be finite and >= 0"):
        told(noise, cond, guidance_scale=7.0)  # 999 - 200 * 6 < 0
    assert not adapters_enabled(told.denoiser)


def test_the_correction_gain_multiplies_the_correction_by_w_minus_1(tiny_backend):
    """refiner.guidance_correction_gain: the same LoRA's correction times (w - 1), per sample; zero at w = 1."""
    gained = Refiner(tiny_backend, RefinerConfig(guidance_timestep_slope=SLOPE, guidance_correction_gain=True))
    noise, cond = refiner_inputs(tiny_backend)
    assert torch.equal(gained(noise, cond, guidance_scale=2.0), noise)  # zero at init
    randomise_lora(gained)
    plain = Refiner(tiny_digits_backend(), RefinerConfig(guidance_timestep_slope=SLOPE))
    randomise_lora(plain)  # the same weights (same seed, same shapes)
    scales = torch.tensor([1.0, 1.25, 2.0, 3.0])
    with torch.no_grad():
        expected = (plain(noise, cond, guidance_scale=scales) - noise) * (scales - 1).view(-1, 1, 1, 1)
        got = gained(noise, cond, guidance_scale=scales) - noise
    assert expected.abs().max() > 1e-3
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6)
    assert torch.equal(got[0], torch.zeros_like(got[0]))
    with pytest.raises(ValueError, match="guidance_correction_gain needs a refiner told w"):
        Refiner(tiny_digits_backend(), RefinerConfig(guidance_correction_gain=True))


def test_config_rules_for_several_scales():
    with pytest.raises(ValueError, match="refiner.guidance_timestep_slope is 0"):
        load_config(overrides=["data.guidance_scales=[1.5,2.0]"])
    with pytest.raises(ValueError, match="data.guidance_scales is empty"):
        load_config(overrides=["refiner.guidance_timestep_slope=100"])
    with pytest.raises(ValueError, match="repeats a scale"):
        load_config(overrides=["data.guidance_scales=[1.5,1.5]", "refiner.guidance_timestep_slope=100"])
    with pytest.raises(ValueError, match="is negative"):
        load_config(overrides=["data.guidance_scales=[1.5,20]", "refiner.guidance_timestep_slope=100"])
    with pytest.raises(ValueError, match=r"data.guidance_scales.1' must be finite"):
        load_config(overrides=["data.guidance_scales=[1.5,.nan]", "refiner.guidance_timestep_slope=100"])
    # a saved config whose demo scales include today's default held-out scale still loads (a refiner saved before
    # demo.multi_scale_held_out_scales existed); the experiment itself refuses the overlap
    cfg = load_config(overrides=["demo.multi_scale_guidance_scales=[1.25,2]", "demo.multi_scale_held_out_scales=[2]"])
    with pytest.raises(ValueError, match="demo.multi_scale_held_out_scales"):
        held_out_scales(cfg)
    cfg = load_config(overrides=["data.guidance_scales=[1.25,2]", "refiner.guidance_timestep_slope=100"])
    assert list(cfg.data.guidance_scales) == [1.25, 2.0]
    assert load_config().refiner.guidance_timestep_slope == 0.0  # today's refiner by default


def test_periodic_evaluation_refines_at_the_teachers_scale(tiny_backend, tmp_path, monkeypatch):
    from noiserefine.evaluation.evaluator import Evaluator

    cfg = load_config(overrides=["eval.num_samples=4", "eval.batch_size=4", "student.num_steps=2",
                                 "teacher.guidance_scale=2.0", *MULTI])
    refiner = Refiner(tiny_backend, cfg.refiner)
    seen = []
    original = refiner.refine
    monkeypatch.setattr(refiner, "refine", lambda noise, prompts, guidance_scale=None: (
        seen.append(guidance_scale), original(noise, prompts, guidance_scale))[1])
    Evaluator(cfg, tiny_backend, tmp_path)(refiner, step=1)
    assert seen == [2.0] and (tmp_path / "eval_step1.png").is_file()


# --- the multi-cache stream ------------------------------------------------------------------------------



@pytest.fixture(scope="module")
def multi_cfg(tiny_root, tiny_teacher, tiny_cache):
    build_cache(tiny_config(tiny_root, tiny_teacher, ["teacher.guidance_scale=1.5"]))  # once per session
    return tiny_config(tiny_root, tiny_teacher, MULTI)


def _multi(cfg, rank=0, world=1) -> MultiScaleStream:
    return MultiScaleStream.from_config(cfg, rank, world, open_scale_caches(cfg))


def _single(cfg, scale) -> TeacherStream:
    return TeacherStream.from_config(at_guidance_scale(cfg, scale))


def test_each_batch_comes_from_its_scale_cache_in_cyclic_order(multi_cfg):
    batches = list(itertools.islice(iter(_multi(multi_cfg)), 10))
    singles = {w: list(itertools.islice(iter(_single(multi_cfg, w)), 5)) for w in SCALES}
    assert [b["index"] for b in batches] == list(range(10))
    for b, batch in enumerate(batches):
        w = SCALES[b % 2]
        assert batch["guidance_scale"].dtype == torch.float32
        assert batch["guidance_scale"].tolist() == [w] * 8
        expected = singles[w][b // 2]
        assert batch["sample_id"] == expected["sample_id"]
        assert torch.equal(batch["target"], expected["target"]) and torch.equal(batch["noise"], expected["noise"])
    # the two caches hold different targets for the same samples (other guidance scale): the check above can fail
    assert batches[0]["sample_id"] == batches[1]["sample_id"]
    assert not torch.equal(batches[0]["target"], batches[1]["target"])


def test_multi_stream_is_deterministic_rank_independent_and_resumes_exactly(multi_cfg):
    full = list(itertools.islice(iter(_multi(multi_cfg)), 12))
    again = list(itertools.islice(iter(_multi(multi_cfg)), 12))
    for a, b in zip(full, again):
        assert a["sample_id"] == b["sample_id"] and torch.equal(a["target"], b["target"])
    ranks = [list(itertools.islice(iter(_multi(multi_cfg, r, 2)), 12)) for r in range(2)]
    assert [r0["sample_id"] + r1["sample_id"] for r0, r1 in zip(*ranks)] == [b["sample_id"] for b in full]
    assert all(torch.equal(torch.cat([r0["guidance_scale"], r1["guidance_scale"]]), b["guidance_scale"])
               for r0, r1, b in zip(*ranks, full))
    for consumed in (1, 4, 7):  # after either scale's batch
        first = _multi(multi_cfg)
        list(itertools.islice(iter(first), consumed))
        state = json.loads(json.dumps(first.state_dict()))  # as stored in a checkpoint
        assert {k: state[k] for k in ("batches", "corrupt_skipped")} == {"batches": consumed, "corrupt_skipped": 0}
        assert sorted(state["shard_rows"]) == ["1.5", "3.0"]  # each scale's rows, by scale_label
        resumed = _multi(multi_cfg)
        tail = list(itertools.islice(resumed.batches(resumed.load_state_dict(state)), 12 - consumed))
        assert [(b["index"], b["sample_id"], b["guidance_scale"].tolist()) for b in tail] == \
            [(b["index"], b["sample_id"], b["guidance_scale"].tolist()) for b in full[consumed:]]
        assert all(torch.equal(a["target"], b["target"]) for a, b in zip(tail, full[consumed:]))
    rows = _multi(multi_cfg).shard_rows()
    assert sorted(rows) == list(SCALES) and all(len(r) == 4 for r in rows.values())
    assert {r.sha256 for r in rows[1.5]}.isdisjoint({r.sha256 for r in rows[3.0]})
    assert _multi(multi_cfg).batches(DataPosition(3)).__next__()["index"] == 3


def test_a_missing_scale_cache_names_the_scale_and_the_command(multi_cfg, tiny_root, tiny_teacher):
    cfg = tiny_config(tiny_root, tiny_teacher, ["data.guidance_scales=[1.5,2.5]",
                                                f"refiner.guidance_timestep_slope={SLOPE}"])
    with pytest.raises(FileNotFoundError, match=r"guidance scale 2.5 .*teacher.guidance_scale=2.5"):
        open_scale_caches(cfg)


def test_the_main_jobs_refiner_is_reused_only_for_its_own_config(tmp_path):
    from omegaconf import OmegaConf

    from noiserefine.digits.multi_scale import reusable_main_refiner

    cfg = load_config(overrides=["teacher.guidance_scale=1.5"])
    main = tmp_path / "refiner-msd"
    (main / "refiner").mkdir(parents=True)
    (main / "refiner" / "refiner.safetensors").write_bytes(b"")
    stored = OmegaConf.to_container(load_config(overrides=["teacher.guidance_scale=1.5", "train.checkpoint_every=50",
                                                           "train.output_dir=elsewhere"]), resolve=True)
    (main / "done.json").write_text(json.dumps({"max_steps": cfg.train.max_steps, "config": stored}))
    assert reusable_main_refiner(tmp_path, cfg) == main  # differs only in keys that do not change training
    assert reusable_main_refiner(tmp_path, load_config(overrides=["teacher.guidance_scale=2.0"])) is None
    assert reusable_main_refiner(tmp_path, load_config(overrides=["teacher.guidance_scale=1.5",
                                                                  "train.max_steps=10"])) is None
    assert reusable_main_refiner(tmp_path / "nothing", cfg) is None


# --- the trainer and the command (subprocesses: `make test` only) ------------------------------------------

def _train(cfg_extra: list[str], root, teacher, output_dir, log):
    command = [sys.executable, "trainer/train.py", "--config", "configs/digits.yaml",
               *tiny_overrides(root, teacher), *MULTI, *cfg_extra, f"train.output_dir={output_dir}"]
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR",
                                                            "MASTER_PORT", "LOCAL_SIZE")}
    result = subprocess.run(command, cwd=REPO, env={**env, "OMP_NUM_THREADS": "1", "DS_ACCELERATOR": "cpu"},
                            capture_output=True, text=True, timeout=600)
    log.write_text(result.stdout + result.stderr)
    assert result.returncode == 0, (result.stdout + result.stderr)[-4000:]
    return result.stdout + result.stderr


@pytest.mark.slow
def test_multi_scale_training_resumes_exactly_from_its_checkpoint(multi_cfg, tiny_root, tiny_teacher, tmp_path):
    """A multi-scale run stopped at step 4 (checkpoint: each scale's shard rows) and continued to 6 ends with the
    weights and per-step samples of an uninterrupted 6-step run; each step's samples carry the cyclic scale."""
    settings = ["train.checkpoint_every=2", "train.eval_every=0", "train.learning_rate=0.01", "train.log_every=1"]
    full, resumed = tmp_path / "full", tmp_path / "resumed"
    _train(settings + ["train.max_steps=6"], tiny_root, tiny_teacher, full, tmp_path / "full.log")
    _train(settings + ["train.max_steps=4"], tiny_root, tiny_teacher, resumed, tmp_path / "first.log")
    text = _train(settings + ["train.max_steps=6"], tiny_root, tiny_teacher, resumed, tmp_path / "second.log")
    assert "resuming from" in text and "step00000004" in text
    samples = [json.loads(line) for line in (full / "samples_rank0.jsonl").read_text().splitlines()]
    assert [s["guidance_scales"] for s in samples] == [[1.5], [3.0]] * 3
    assert (resumed / "samples_rank0.jsonl").read_text() == (full / "samples_rank0.jsonl").read_text()
    a = load_file(str(full / "refiner" / "refiner.safetensors"))
    b = load_file(str(resumed / "refiner" / "refiner.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert any(v.abs().sum() > 0 for k, v in a.items() if "lora_B" in k)  # it did train
    saved = load_config(full / "refiner" / "config.yaml")
    assert list(saved.data.guidance_scales) == list(SCALES) and saved.refiner.guidance_timestep_slope == SLOPE
    refiner = load_refiner(full / "refiner", load_backend(saved.model))
    assert refiner.guidance_conditioned
    with pytest.raises(ValueError, match="give the guidance scale w"):
        refiner.refine(noise_from_seeds([0], refiner.backend.latent_shape), ["a handwritten one"])


def test_goal_lines_compare_with_per_w_at_trained_and_the_teacher_at_held_out_scales():
    from noiserefine.digits.multi_scale import goal_lines

    def m(fid, fid_class, accuracy):
        return {"fid": fid, "fid_class": fid_class, "accuracy": accuracy}

    results = {"rows": [{"scale": 1.1, "per_scale": m(10.0, 40.0, 1.0), "multi_scale": m(10.4, 41.0, 0.99),
                         "teacher": m(1.0, 1.0, 1.0)}],
               "held_out": [{"scale": 1.25, "teacher": m(10.0, 40.0, 1.0), "multi_scale": m(10.0, 40.0, 1.0)}]}
    lines = goal_lines(results)
    assert "Goal (every metric within 5%): met; largest difference 4.0%" in lines
    assert "- w = 1.1 vs per-w: fid 4.0% worse, fid_class 2.5% worse, accuracy 1.0% worse" in lines
    results["held_out"][0]["multi_scale"]["fid_class"] = 43.0  # 7.5% from the teacher at the held-out w
    assert "Goal (every metric within 5%): NOT met; largest difference 7.5%" in goal_lines(results)
    assert "No metric more than 5% worse: NOT met; largest difference for the worse 7.5%" in goal_lines(results)
    # 7.5% BETTER than the teacher there (refiners beat guided FID): outside "within", nothing lost
    results["held_out"][0]["multi_scale"]["fid_class"] = 37.0
    lines = goal_lines(results)
    assert "Goal (every metric within 5%): NOT met; largest difference 7.5%" in lines
    assert "No metric more than 5% worse: met; largest difference for the worse 4.0%" in lines
    assert "- w = 1.25 (held out) vs teacher: fid 0.0% equal, fid_class 7.5% better, accuracy 0.0% equal" in lines


def test_each_multi_w_setting_trains_its_own_refiner_and_the_default_keeps_its_name(tmp_path):
    from noiserefine.digits.multi_scale import multi_dir, multi_overrides

    base = ["demo.multi_scale_guidance_scales=[1.1,2]"]
    default = load_config(overrides=base)
    assert multi_dir(tmp_path, default).name == "refiner-multi-w1.1-2"  # as before the knobs
    assert "train.max_steps=300" in multi_overrides(default)  # 0: the run's train.max_steps (the schema's 300)
    both = load_config(overrides=[*base, "demo.multi_scale_max_steps=600", "demo.multi_scale_correction_gain=true"])
    assert multi_dir(tmp_path, both).name == "refiner-multi-w1.1-2-600steps-gain"
    assert {"train.max_steps=600", "refiner.guidance_correction_gain=True"} <= set(multi_overrides(both))


def test_on_the_compose_task_the_goal_and_table_judge_prompt_adherence(tmp_path):
    """Compose rows carry ``adherence`` (every attribute right), what guidance buys there; ``accuracy`` is the
    digit head's alone. A multi-w refiner that draws the right digit at the wrong place must miss the goal."""
    from noiserefine.digits.multi_scale import goal_lines, write_table

    def m(adherence):
        return {"fid": 100.0, "fid_class": 300.0, "accuracy": 0.95, "adherence": adherence, "nfe": 11}

    results = {"rows": [{"scale": 2.0, "per_scale": m(0.90), "multi_scale": m(0.80), "teacher": m(0.91)}],
               "held_out": [], "unguided": m(0.6), "scales": [2.0], "refiner_timestep": 999, "timestep_slope": 200,
               "budget": {"per_scale_steps": 100, "per_scale_total_steps": 100, "multi_scale_steps": 100,
                          "global_batch_size": 64}, "num_eval_samples": 500, "num_steps": 10}
    lines = goal_lines(results)
    assert "- w = 2 vs per-w: fid 0.0% equal, fid_class 0.0% equal, adherence 11.1% worse" in lines
    assert "Goal (every metric within 5%): NOT met; largest difference 11.1%" in lines
    # an untrained model (the --quick smoke run) can have no prompt right: a reference of 0 is no division by 0
    results["held_out"] = [{"scale": 3.0, "teacher": m(0.0), "multi_scale": m(0.0)}]
    assert "- w = 3 (held out) vs teacher: fid 0.0% equal, fid_class 0.0% equal, adherence 0.0% equal" in goal_lines(
        results)
    results["held_out"][0]["multi_scale"] = m(0.1)
    assert "Goal (every metric within 5%): NOT met; largest difference inf%" in goal_lines(results)
    write_table(results, tmp_path / "table.md")
    header = next(line for line in (tmp_path / "table.md").read_text().splitlines() if line.startswith("| row"))
    assert "adherence" in header

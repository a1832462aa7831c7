"""The compositional task wired through the digits backend, its teacher, prompts, sweep rule, goals and demo."""

from __future__ import annotations

import argparse
import math

import pytest
import torch

from conftest import REPO, tiny_digits_backend
from noiserefine.backends.digits import SCHEDULER_CONFIG, DigitsBackend, build_unet
from noiserefine.config import load_config
from noiserefine.backends.digits import ATTRIBUTES, all_prompts, parse_attributes
from noiserefine.digits.demo import run_setup
from noiserefine.digits.goals import FINE_TUNED, GUIDED, NOISE_SPACE, REFINED, UNGUIDED, ZERO_SHOT, judge_goals
from noiserefine.digits.sweep import pick_adherence_scale, sweep_rule
from noiserefine.digits.teacher import train_digits_teacher
from noiserefine.targets.prompts import load_prompt_source

DIM = 8


def tiny_compose_backend(seed: int = 0) -> DigitsBackend:
    torch.manual_seed(seed)
    tables = {name: torch.randn(len(values) + 1, 1, DIM) for name, values in ATTRIBUTES.items()}
    digit = tables.pop("digit")
    return DigitsBackend(build_unet([8, 16], DIM, sample_size=24), digit, SCHEDULER_CONFIG, attributes=tables)


def test_compose_backend_gives_one_token_per_attribute_and_null_where_unnamed():
    backend = tiny_compose_backend()
    assert backend.task == "compose" and backend.latent_shape == (1, 24, 24)
    tokens = backend.encode_prompts(["a small thick seven in the top left", "a large seven"])["encoder_hidden_states"]
    assert tokens.shape == (2, 4, DIM)
    tables = backend.tables
    assert torch.equal(tokens[0, 0], tables["digit"][7, 0]) and torch.equal(tokens[0, 1], tables["position"][0, 0])
    assert torch.equal(tokens[0, 2], tables["size"][0, 0]) and torch.equal(tokens[0, 3], tables["thickness"][1, 0])
    # "a large seven" names no position or thickness: their null (last) rows
    assert torch.equal(tokens[1, 1], tables["position"][-1, 0]) and torch.equal(tokens[1, 2], tables["size"][1, 0])
    assert torch.equal(tokens[1, 3], tables["thickness"][-1, 0])
    null = backend.null_conditioning(3)["encoder_hidden_states"]
    assert null.shape == (3, 4, DIM)
    assert all(torch.equal(null[1, i], table[-1, 0]) for i, table in enumerate(tables.values()))


def test_plain_backend_keeps_its_single_digit_token():
    backend = tiny_digits_backend()
    assert backend.task == "digits" and backend.latent_shape == (1, 16, 16)
    tokens = backend.encode_prompts(["a handwritten seven", "a cat"])["encoder_hidden_states"]
    assert tokens.shape == (2, 1, 16)
    assert torch.equal(tokens[0, 0], backend.embedding[7, 0]) and torch.equal(tokens[1, 0], backend.embedding[10, 0])


def test_compose_backend_round_trips_through_its_directory(tmp_path):
    backend = tiny_compose_backend()
    backend.save_pretrained(tmp_path / "teacher")
    loaded = DigitsBackend.from_pretrained(tmp_path / "teacher")
    assert loaded.task == "compose" and loaded.latent_shape == (1, 24, 24)
    prompts = ["a large thin two in the bottom right"]
    assert torch.equal(loaded.encode_prompts(prompts)["encoder_hidden_states"],
                       backend.encode_prompts(prompts)["encoder_hidden_states"])


def test_a_partial_set_of_attribute_tables_is_refused():
    with pytest.raises(ValueError, match="position"):
        DigitsBackend(build_unet([8, 16], DIM, 24), torch.randn(11, 1, DIM), SCHEDULER_CONFIG,
                      attributes={"size": torch.randn(3, 1, DIM)})


def test_composed_digits_prompt_source_is_every_combination_once():
    prompts, _ = load_prompt_source("composed_digits", None)
    assert prompts == all_prompts() and len(set(prompts)) == 160
    parsed = [parse_attributes(p) for p in prompts]
    assert {tuple(p.values()) for p in parsed} == {(d, q, s, t) for d in range(10) for q in range(4)
                                                  for s in range(2) for t in range(2)}


def _compose_settings(**changes) -> dict:
    cfg = load_config([REPO / "configs" / "digits.yaml", REPO / "configs" / "compose.yaml"],
                      ["model.digits.train_steps=2", "model.digits.batch_size=4", "model.digits.block_out_channels=[8,16]",
                       "model.digits.cross_attention_dim=8"])
    return {**cfg.model.digits, **changes}


def test_compose_teacher_trains_and_loads_as_the_compose_task(tmp_path):
    train_digits_teacher(_compose_settings(), tmp_path / "teacher", progress=False)
    backend = DigitsBackend.from_pretrained(tmp_path / "teacher")
    assert backend.task == "compose" and backend.latent_shape == (1, 24, 24)
    assert backend.encode_prompts(["a small thin one in the top right"])["encoder_hidden_states"].shape == (1, 4, 8)
    # a fine-tune must keep the task of the teacher it starts from
    with pytest.raises(ValueError, match="task 'compose'"):
        train_digits_teacher(_compose_settings(task="digits", init_from=str(tmp_path / "teacher")),
                             tmp_path / "plain", progress=False)


def test_adherence_rule_takes_the_most_adherent_w_that_keeps_fid():
    rows = {1.0: {"fid": 10.0, "adherence": 0.6}, 1.5: {"fid": 9.0, "adherence": 0.85},
            2.0: {"fid": 9.5, "adherence": 0.93}, 3.0: {"fid": 9.9, "adherence": 0.935},
            4.0: {"fid": 12.0, "adherence": 0.97}}
    assert pick_adherence_scale(rows) == 2.0  # 3.0 is within the 0.01 tie of 2.0; 4.0 makes FID worse
    rows[3.0]["adherence"] = 0.95
    assert pick_adherence_scale(rows) == 3.0
    worse = {1.0: {"fid": 5.0, "adherence": 0.6}, 2.0: {"fid": 7.0, "adherence": 0.9}, 3.0: {"fid": 6.0, "adherence": 0.95}}
    assert pick_adherence_scale(worse) == 3.0  # nothing keeps FID: the lowest FID
    with pytest.raises(ValueError, match="w = 1"):
        pick_adherence_scale({2.0: {"fid": 5.0, "adherence": 0.9}})


def test_sweep_rule_follows_the_task():
    plain = load_config(REPO / "configs" / "digits.yaml")
    compose = load_config([REPO / "configs" / "digits.yaml", REPO / "configs" / "compose.yaml"])
    assert sweep_rule(plain)[1] == "fid_class" and sweep_rule(compose)[1] == "adherence"
    assert "0.01" in sweep_rule(compose)[0]


def _row(adherence, fid, fid_class, nfe, gap, noise=0.0):
    return {"adherence": adherence, "fid": fid, "fid_class": fid_class, "accuracy": 0.9, "nfe": nfe,
            "noise_share": noise, "gap_closed": gap}


def _compose_results(unguided_adherence=0.6, guided_adherence=0.95, refined_adherence=0.945, refined_fid_class=52.0):
    gap = (refined_adherence - unguided_adherence) / (guided_adherence - unguided_adherence)
    return {"task": "compose", "gap_metric": "adherence",
            "main": {UNGUIDED: _row(unguided_adherence, 20.0, 80.0, 10, 0.0),
                     GUIDED: _row(guided_adherence, 18.0, 50.0, 20, 1.0),
                     REFINED: _row(refined_adherence, 17.0, refined_fid_class, 12, gap)},
            "noise_space": {NOISE_SPACE: _row(0.7, 19.0, 70.0, 12, 0.3)},
            "transfer": {UNGUIDED + FINE_TUNED: _row(0.5, 0, 0, 10, 0.0), GUIDED + FINE_TUNED: _row(0.8, 0, 0, 20, 1.0),
                         ZERO_SHOT: _row(0.62, 0, 0, 12, 0.4)},
            "sweep": {"teacher_guidance_scale": 2.0}}


def _met(goals, words):
    [goal] = [g for g in goals if words in g["goal"]]
    return goal["met"]


def test_compose_goals_judge_the_adherence_regime_and_the_match():
    goals = judge_goals(_compose_results())
    assert all(g["met"] for g in goals), goals
    assert not _met(judge_goals(_compose_results(unguided_adherence=0.71)), "unguided samples miss prompts")
    assert not _met(judge_goals(_compose_results(guided_adherence=0.89, refined_adherence=0.89)),
                    "guided samples (CFG w=2) follow them")
    assert not _met(judge_goals(_compose_results(refined_adherence=0.939)), "refined matches or beats guided on adh")
    assert not _met(judge_goals(_compose_results(refined_fid_class=52.6)), "class-conditional FID (<= 1.05")
    assert not _met(judge_goals(_compose_results(refined_adherence=math.nan)), "refined matches or beats guided on adh")


def test_demo_task_selects_its_configs_and_quick_artifacts(tmp_path):
    def args(task, quick):
        return argparse.Namespace(run_dir=str(tmp_path / task), task=task, quick=quick, config=[], overrides=[])

    _, files, _ = run_setup(args("compose", False))
    assert [p.split("/")[-1] for p in files] == ["digits.yaml", "compose.yaml"]
    _, files, overrides = run_setup(args("digits", True))
    assert [p.split("/")[-1] for p in files] == ["digits.yaml"]
    assert f"model.path={tmp_path / 'digits' / 'artifacts' / 'digits-teacher'}" in overrides


def test_transfer_is_not_met_when_the_fine_tuned_teacher_shows_no_guidance_gap():
    # the thick teacher's guided and unguided rows barely differ (0.166 vs 0.186 adherence, as a broken
    # fine-tune gave): "gap closed" 3.1 is then noise, not transfer
    results = _compose_results()
    results["transfer"] = {UNGUIDED + FINE_TUNED: _row(0.166, 0, 0, 10, 0.0), GUIDED + FINE_TUNED: _row(0.186, 0, 0, 20, 1.0),
                           ZERO_SHOT: _row(0.228, 0, 0, 12, 3.1)}
    assert not _met(judge_goals(results), "zero-shot transfer")
    results["transfer"][GUIDED + FINE_TUNED] = _row(0.9, 0, 0, 20, 1.0)  # a real gap (0.73 of the base's 0.35)
    results["transfer"][ZERO_SHOT] = _row(0.5, 0, 0, 12, 0.45)
    assert _met(judge_goals(results), "zero-shot transfer")


def test_the_compose_transfer_style_keeps_the_attributes_the_prompt_names():
    # The compose demo fine-tuned its transfer teacher on strokes dilated by one pixel: a thin digit dilated
    # IS the "thick" attribute, so that teacher drew "thin" prompts thick and lost the prompt adherence the
    # transfer goal is measured on (guided 0.186 vs unguided 0.166). The style must change how each prompt
    # looks while keeping what the prompt names: here, that a thin stroke stays thin and a thick one thick.
    from noiserefine.digits.demo import transfer_teacher_settings
    from noiserefine.digits.teacher import TrainingImages

    cfg = load_config([REPO / "configs" / "digits.yaml", REPO / "configs" / "compose.yaml"])
    plain = TrainingImages(dict(cfg.model.digits))
    styled = TrainingImages({**cfg.model.digits, **transfer_teacher_settings(cfg)})
    index = torch.arange(40)
    for thickness in (0, 1):
        attributes = {"digit": plain.labels[index], "position": index % 4, "size": (index // 4) % 2,
                      "thickness": torch.full_like(index, thickness)}
        before, after = plain.render_batch(index, attributes), styled.render_batch(index, attributes)
        changed = (before != after).flatten(1).any(1)
        assert bool(changed.all()), "the style must be visible on every image"
        ink_before, ink_after = (before > 0).flatten(1).sum(1).float(), (after > 0).flatten(1).sum(1).float()
        ratio = (ink_after / ink_before).mean().item()
        assert 0.8 < ratio < 1.25, f"thickness {thickness}: the style changes the inked area by {ratio:.2f}x"

"""Config values that used to be accepted and failed later (or never): each is a ValueError naming the key
and where it came from (the file or "command line")."""

from __future__ import annotations

from pathlib import Path

import pytest

from noiserefine.config import load_config

DIGITS = Path(__file__).resolve().parents[2] / "configs" / "digits.yaml"


@pytest.mark.parametrize("override, key", [
    ("teacher.guidance_scale=nan", "teacher.guidance_scale"),
    ("teacher.guidance_scale=inf", "teacher.guidance_scale"),
    ("teacher.guidance_scale=-inf", "teacher.guidance_scale"),
    ("teacher.guidance_scale=1e6", "teacher.guidance_scale"),
    ("teacher.guidance_scale=-1", "teacher.guidance_scale"),
    ("teacher.pag_scale=nan", "teacher.pag_scale"),
    ("teacher.pag_scale=inf", "teacher.pag_scale"),
    ("refiner.lora_rank=0", "refiner.lora_rank"),
    ("refiner.lora_rank=-4", "refiner.lora_rank"),
    ("refiner.lora_alpha=nan", "refiner.lora_alpha"),
    ("train.learning_rate=-0.001", "train.learning_rate"),
    ("train.learning_rate=nan", "train.learning_rate"),
    ("train.gradient_clipping=-1", "train.gradient_clipping"),
    ("train.weight_decay=inf", "train.weight_decay"),
    ("pipeline.cpus_per_worker=-1", "pipeline.cpus_per_worker"),
    ("pipeline.gpus_per_worker=nan", "pipeline.gpus_per_worker"),
    ("pipeline.max_retries=-1", "pipeline.max_retries"),
    ("data.max_prompt_chars=0", "data.max_prompt_chars"),
    ("data.sources=[]", "data.sources"),
    ("data.sources=[{kind: digits, weight: .inf}]", "data.sources.0.weight"),
    ("data.sources=[{kind: digits, weight: .nan}]", "data.sources.0.weight"),
    ("eval.seed_offset=0", "eval.seed_offset"),
    ("eval.seed_offset=2999", "eval.seed_offset"),  # held-out id 2999 is the plan's last sample
    ("eval.seed_offset=-5", "eval.seed_offset"),
    ("model.digits.slant=0.25", "model.digits.slant"),  # the compose task's style, on the plain task
    ("demo.transfer_slant=0.25", "demo.transfer_slant"),
    ("demo.transfer_thicken=0", "demo.transfer_thicken"),  # a transfer fine-tune with no style
    ("demo.transfer_thicken=-1", "demo.transfer_thicken"),
])
def test_bad_value_on_the_command_line_names_key_and_origin(override, key):
    with pytest.raises(ValueError) as caught:
        load_config(DIGITS, [override])
    message = str(caught.value)
    assert message.startswith("command line: ") and f"'{key}'" in message, message


def test_bad_value_in_a_file_names_the_file(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("teacher:\n  guidance_scale: .nan\ndata:\n  sources:\n    - kind: digits\n      weight: .inf\n")
    with pytest.raises(ValueError, match=r"^.*bad\.yaml: .*'teacher\.guidance_scale'"):
        load_config([DIGITS, bad])
    bad.write_text("data:\n  sources:\n    - kind: digits\n      weight: .inf\n")
    with pytest.raises(ValueError, match=r"^.*bad\.yaml: .*'data\.sources\.0\.weight'"):
        load_config([DIGITS, bad])


def test_list_item_override_on_the_command_line():
    """``data.sources.0.weight=2.0`` was a bare TypeError ("Cannot merge incompatible container types")."""
    cfg = load_config(DIGITS, ["data.sources.0.weight=2.0"])
    assert cfg.data.sources[0].weight == 2.0 and cfg.data.sources[0].kind == "digits"
    with pytest.raises(ValueError, match=r"^command line: .*'data\.sources\.0\.weight'"):
        load_config(DIGITS, ["data.sources.0.weight=inf"])
    with pytest.raises(ValueError, match=r"^command line: .*data\.sources\.3"):
        load_config(DIGITS, ["data.sources.3.weight=2.0"])
    with pytest.raises(ValueError, match=r"^command line: .*data\.sources\[0\]\.nonsense"):
        load_config(DIGITS, ["data.sources.0.nonsense=1"])


def test_sane_values_still_load():
    cfg = load_config(DIGITS, ["teacher.guidance_scale=0", "teacher.pag_scale=0", "train.gradient_clipping=0",
                               "pipeline.max_retries=0", "pipeline.cpus_per_worker=0.5", "eval.seed_offset=3000",
                               "teacher.guidance_scale=30"])
    assert cfg.eval.seed_offset == 3000 and cfg.teacher.guidance_scale == 30

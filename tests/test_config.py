from pathlib import Path

import pytest
from omegaconf import OmegaConf

from noiserefine.config import load_config, save_config

REPO = Path(__file__).resolve().parents[1]
DIGITS = REPO / "configs" / "digits.yaml"


def test_default_config_loads():
    cfg = load_config(DIGITS)
    assert cfg.model.backend == "digits"
    assert cfg.data.sources[0].kind == "digits"


def test_unknown_key_names_key_and_file(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("teacher:\n  guidance_scael: 2.0\n")
    with pytest.raises(ValueError, match=r"bad\.yaml.*teacher\.guidance_scael"):
        load_config([DIGITS, bad])


def test_wrong_type_names_key_and_file(tmp_path):
    bad = tmp_path / "typo.yaml"
    bad.write_text("train:\n  max_steps: lots\n")
    with pytest.raises(ValueError, match=r"typo\.yaml.*train\.max_steps"):
        load_config(bad)
    with pytest.raises(ValueError, match=r"command line.*teacher\.num_steps"):
        load_config(DIGITS, ["teacher.num_steps=ten"])
    with pytest.raises(ValueError, match=r"command line.*data\.nonsense"):
        load_config(DIGITS, ["data.nonsense=1"])


def test_bad_choice_and_malformed_override():
    with pytest.raises(ValueError, match=r"train\.loss"):
        load_config(DIGITS, ["train.loss=l1"])
    with pytest.raises(ValueError, match="key=value"):
        load_config(DIGITS, ["teacher.num_steps"])
    with pytest.raises(ValueError, match="not found"):
        load_config("no/such/file.yaml")


def test_overrides_apply_in_order(tmp_path):
    later = tmp_path / "later.yaml"
    later.write_text("teacher:\n  guidance_scale: 5.0\n  num_steps: 20\n")
    cfg = load_config([DIGITS, later], ["teacher.num_steps=30"])
    assert cfg.teacher.guidance_scale == 5.0
    assert cfg.teacher.num_steps == 30
    assert cfg.student.num_steps == 10


def test_resolved_config_round_trips(tmp_path):
    cfg = load_config(DIGITS, ["train.max_steps=7", "data.sources=[{kind: text, path: p.txt, weight: 2}]"])
    path = save_config(cfg, tmp_path / "out" / "config.yaml")
    again = load_config(path)
    assert OmegaConf.to_container(again) == OmegaConf.to_container(cfg)
    assert again.data.sources[0].path == "p.txt"

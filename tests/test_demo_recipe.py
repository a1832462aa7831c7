"""The demo report's recipe table: which of the paper's choices a digits run follows, read from its config."""

from pathlib import Path

from noiserefine.config import load_config
from noiserefine.digits.recipe import recipe_rows, recipe_table

REPO = Path(__file__).resolve().parents[1]


def _follows(cfg) -> dict:
    return {row["key"]: row["follows"] for row in recipe_rows(cfg)}


def test_the_digits_default_follows_the_shape_and_says_why_not_elsewhere():
    cfg = load_config(REPO / "configs" / "digits.yaml")
    follows = _follows(cfg)
    assert {key for key, yes in follows.items() if yes} == {"refiner.timestep", "student.num_steps", "train.loss",
                                                            "teacher.guidance"}
    assert all(row["why"] for row in recipe_rows(cfg) if not row["follows"])
    table = recipe_table(cfg)
    assert table.count("\n") == len(recipe_rows(cfg)) + 1 and "| `refiner.lora_rank` | 128 " in table


def test_a_run_that_takes_the_papers_values_is_reported_as_following_them():
    cfg = load_config(REPO / "configs" / "digits.yaml", ["refiner.lora_rank=128", "teacher.num_steps=20",
                                                         "teacher.guidance_scale=7.5", "data.min_score=6.0"])
    follows = _follows(cfg)
    assert follows["refiner.lora_rank"] and follows["teacher.num_steps"] and follows["data.min_score"]
    assert follows["teacher.guidance_scale"] and not follows["data.mixture"]

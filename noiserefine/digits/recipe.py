"""Which of the paper's recipe choices a digits run follows: a table for the demo's report, from its config.

The paper's values are SD 2.1's (arXiv 2412.03895v1, Supplement D.1/D.2; README "The paper's recipe").
A row "follows" when the run's config holds the paper's value; the reason column says why the demo
cannot or does not where it does not (16x16 or 24x24 images, 2 CPU cores).
"""

from __future__ import annotations

from omegaconf import OmegaConf

# (config key, paper value, where in the paper, why the demo differs when it does)
PAPER_RECIPE = [
    ("refiner.timestep", 999.0, "D.1: input timestep T = 999", ""),
    ("student.num_steps", 10, "D.1: unguided student, N = 10", ""),
    ("train.loss", "msd", "Sec. 3.2, D.1: MSD, MSE in latent space", ""),
    ("refiner.lora_rank", 128, "D.1: LoRA rank 128",
     "the UNet's widest layer has 64 channels: rank 64 is already a full-rank update"),
    ("teacher.num_steps", 20, "D.1: N' = 20 guided steps", "kept at 10: changing it changes every demo number"),
    ("teacher.guidance", "cfg", "D.2: COCO component at CFG 7.5", ""),
    ("teacher.guidance_scale", 7.5, "D.2: COCO component at CFG 7.5",
     "w is chosen by the guidance sweep on the digits teacher (CFG 7.5 wrecks its samples)"),
    ("data.mixture", "COCO + Pick-a-Pic", "D.2: 20K COCO at CFG 7.5 + 30K Pick-a-Pic at CFG 3 + PAG 2",
     "one prompt source (the task's own prompts): nothing to mix"),
    ("data.min_score", 6.0, "D.2: LAION aesthetic score > 6",
     "an aesthetic score means nothing on digits; the classifier-confidence filter made no measurable difference "
     "(bench/results/2026-12-07-score-filter.md)"),
    ("train.max_steps", 39000, "D.2: 39K steps of batch 4 on 8 A100s", "the demo's refiner converges by step 100"),
]


def _value(cfg, key: str):
    value = OmegaConf.select(cfg, key)
    if key == "data.mixture":
        return ", ".join(str(entry.name) for entry in value) if value else "none"
    return OmegaConf.to_container(value) if OmegaConf.is_config(value) else value


def recipe_rows(cfg) -> list[dict]:
    """One row per recipe choice: key, the paper's value and source, this run's value, follows (bool), why not."""
    rows = []
    for key, paper, where, why in PAPER_RECIPE:
        ours = _value(cfg, key)
        follows = ours == paper if not isinstance(paper, float) else ours is not None and float(ours) == paper
        rows.append({"key": key, "paper": paper, "where": where, "ours": ours, "follows": follows,
                     "why": "" if follows else why})
    return rows


def recipe_table(cfg) -> str:
    """The rows as a Markdown table."""
    lines = ["| choice | paper (arXiv v1) | this run | follows | why not |", "|---|---|---|---|---|"]
    for row in recipe_rows(cfg):
        lines.append(f"| `{row['key']}` | {row['paper']} ({row['where']}) | {row['ours']} | "
                     f"{'yes' if row['follows'] else 'no'} | {row['why']} |")
    return "\n".join(lines)

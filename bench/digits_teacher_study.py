"""How clean is the digit teacher, and does guidance still help? (the choice behind model.digits defaults)

    python bench/digits_teacher_study.py [--out runs/teacher-study] [--config configs/compose.yaml] [NAME=OVERRIDES ...]

Without NAME=OVERRIDES: the teachers of bench/results/digits_teacher_study.md (about 10 minutes).

Each NAME=OVERRIDES trains a teacher (configs/digits.yaml, the --config files, then the overrides) under --out/NAME
(reused if already trained with the same settings) and samples the 500 held-out seeds at the
student's step count, unguided (w = 1) and with CFG at every --scales value. It prints one line
per (teacher, w): FID, class-conditional FID, accuracy, the noise-like share and, on the compose task, prompt
adherence, in the task classifier's feature space (the demo's metrics), and the teacher's training seconds. Not a
timed benchmark: the training seconds are only comparable on an idle machine.
"""

from __future__ import annotations

import argparse
import json
import shlex
from pathlib import Path

from noiserefine.backends import load_backend
from noiserefine.config import load_config
from noiserefine.digits.classifier import digit_metrics
from noiserefine.digits.sweep import sweep_guidance
from noiserefine.digits.teacher import ensure_digits_teacher
from noiserefine.evaluation.rows import eval_set, sample_row, score_rows

REPO = Path(__file__).resolve().parents[1]
KEYS = ("fid", "fid_class", "accuracy", "noise_share", "adherence")  # adherence: compose task only
DEFAULT_TEACHERS = ["400-steps-dropout-0.15=model.digits.train_steps=400 model.digits.cond_dropout=0.15",
                    "800-steps-dropout-0.15=model.digits.cond_dropout=0.15",
                    "800-steps-dropout-0.3=",  # the default
                    "1200-steps-dropout-0.15=model.digits.train_steps=1200 model.digits.cond_dropout=0.15"]


def study(name: str, overrides: list[str], out: Path, scales: list[float], configs: list[str] = ()) -> list[dict]:
    cfg = load_config([str(REPO / "configs" / "digits.yaml"), *configs],
                      overrides + [f"model.path={out / name}", f"eval.classifier_dir={out / 'classifier'}"])
    ensure_digits_teacher(cfg.model.digits, cfg.model.path)
    seconds = json.loads((out / name / "training.json").read_text())["seconds"]
    backend, metric_fn, evals = load_backend(cfg.model), digit_metrics(cfg), eval_set(cfg)
    lines = []
    for w in scales:
        row = sample_row(f"w={w:g}", backend, evals, cfg.student.num_steps, guidance=sweep_guidance(cfg, w),
                         batch_size=cfg.eval.batch_size)
        score_rows([row], backend, evals, metric_fn)
        line = {"teacher": name, "overrides": overrides, "train_seconds": seconds, "w": w,
                **{k: round(row.metrics[k], 4) for k in KEYS if k in row.metrics}}
        print(json.dumps(line), flush=True)
        lines.append(line)
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=REPO / "runs" / "teacher-study")
    parser.add_argument("--scales", default="1,1.1,1.25,1.5")
    parser.add_argument("--config", action="append", default=[], help="YAML on top of configs/digits.yaml")
    parser.add_argument("teachers", nargs="*", default=DEFAULT_TEACHERS,
                        help="NAME=OVERRIDES (space-separated key=value; may be empty)")
    args = parser.parse_args()
    scales = [float(w) for w in args.scales.split(",")]
    for spec in args.teachers:
        name, _, overrides = spec.partition("=")
        study(name, shlex.split(overrides), args.out, scales, [str(Path(c).resolve()) for c in args.config])


if __name__ == "__main__":
    main()

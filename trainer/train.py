"""Stage 2: train the noise refiner on the teacher-target cache (DeepSpeed).

    DS_ACCELERATOR=cpu OMP_NUM_THREADS=1 deepspeed --num_gpus 2 trainer/train.py --config configs/digits.yaml
    python trainer/train.py --config configs/digits.yaml [key=value ...]     # one rank, no launcher

On CPU ``--num_gpus`` is the number of ranks. Re-running resumes from the newest
checkpoint. Exit status 0 on success, 1 on any error (which stops the launcher).
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from noiserefine.config import parse_cli  # noqa: E402


def metric_factory(cfg):
    """What builds the periodic evaluation's scores (``eval.metrics``); None draws grids only."""
    if cfg.eval.metrics == "digit_classifier":
        from noiserefine.digits.classifier import digit_metrics

        return lambda: digit_metrics(cfg)
    if cfg.eval.metrics == "text_image":  # CLIPScore / PickScore from eval.clip_path / eval.pickscore_path
        from noiserefine.evaluation.features import text_image_metrics

        return lambda: text_image_metrics(cfg)
    return None


def main(argv: list[str] | None = None) -> int:
    cfg, _ = parse_cli(argv, description="Train the NoiseRefine refiner (DeepSpeed).")
    from noiserefine.train.loop import train

    train(cfg, metric_factory(cfg))
    return 0


if __name__ == "__main__":
    sys.exit(main())

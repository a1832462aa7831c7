"""Stage 2: train the noise refiner on the teacher-target cache (DeepSpeed).

Several ranks on one CPU-only machine (checked with DeepSpeed 0.19.8; gloo)::

    DS_ACCELERATOR=cpu OMP_NUM_THREADS=1 deepspeed --num_gpus 2 [--master_port 29517] \\
        trainer/train.py --config configs/digits.yaml train.output_dir=runs/refiner [key=value ...]

On CPU ``--num_gpus N`` is simply the number of ranks: the launcher overrides its
own device count with it (without the flag the CPU accelerator counts NUMA nodes,
usually 1 rank; ``--include localhost:0,1`` fails for the same reason).
``DS_ACCELERATOR=cpu`` only silences DeepSpeed's auto-detection warning (the
ranks set it themselves, see ``noiserefine.distributed``); ``OMP_NUM_THREADS=1``
keeps the ranks from oversubscribing the cores. ``deepspeed`` is
``python -m deepspeed.launcher.runner`` (what ``noiserefine.demo`` calls). A rank
that fails makes the launcher stop the others and exit non-zero. On a GPU node
drop ``DS_ACCELERATOR`` and use ``--num_gpus <gpus per node>`` (nccl).

One process, no launcher (rank 0 of 1, free local port)::

    OMP_NUM_THREADS=1 python trainer/train.py --config configs/digits.yaml [key=value ...]

Re-running the same command resumes from the newest checkpoint in
``train.output_dir/checkpoints`` (or exits at once if the run is finished).
The teacher cache must exist: ``python pipeline/generate_targets.py --config ...``.
Exit status 0 on success, 1 on any error.
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from noiserefine.config import parse_cli  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    cfg, _ = parse_cli(argv, description="Train the NoiseRefine refiner (DeepSpeed).")
    from noiserefine import training

    training.main(cfg)
    return 0


if __name__ == "__main__":
    sys.exit(main())  # an uncaught error prints its traceback and exits 1, which stops the launcher

"""Experiment trackers of the trainer (``train.report_to``): TensorBoard and Weights & Biases, on rank 0.

The CSV logs (``logs.py``) are always written; a tracker is an optional second copy of
the same numbers, through the tracker's own library (``pip install 'noiserefine[track]'``):

- training scalars at every log row: ``train/loss``, ``train/learning_rate``, ``train/grad_norm``,
  ``train/samples_per_s``, ``train/step_seconds`` (mean over the row's steps), ``train/peak_rss_mb``
  (rank 0's process) and, on CUDA, ``train/peak_gpu_memory_mb``;
- the periodic evaluation's metrics ``eval/<row>/<metric>`` and its grid ``eval/grid``;
- the resolved config (TensorBoard: the text ``config`` at step 0; W&B: the run's config).

A resumed run continues the same run. TensorBoard writes into ``<output_dir>/tensorboard`` with
``purge_step`` = the checkpoint's step + 1, so readers (TensorBoard, its ``EventAccumulator``) drop
what the killed attempt logged after the checkpoint; a new run (step 0) starts the folder afresh.
W&B keeps the run id in ``<output_dir>/wandb_run_id`` and resumes it (``resume="allow"``); the
W&B server keeps the first value logged at a step and drops a re-logged earlier step (the
steps a killed attempt logged after its checkpoint: equal values, the resume is exact). What wandb's
service had not written when the process was killed (offline: flushed every 15 s) is lost there.
"""

from __future__ import annotations

import importlib.util
import os
import resource
import shutil
from pathlib import Path
from typing import Protocol

import torch
from omegaconf import OmegaConf

from ..config import to_yaml
from ..config_checks import report_to_list
from ..files import write_text_atomic

EXTRA_HINT = "pip install 'noiserefine[track]'"
TENSORBOARD_DIR = "tensorboard"
RUN_ID_FILE = "wandb_run_id"
_MODULES = {"tensorboard": "tensorboard", "wandb": "wandb"}  # tracker -> the module it needs


class Tracker(Protocol):
    def log(self, step: int, scalars: dict[str, float], images: dict[str, Path]) -> None: ...

    def close(self) -> None: ...


def require_installed(report_to) -> list[str]:
    """The trackers of ``train.report_to``; ``ModuleNotFoundError`` naming the extra if one is not installed."""
    names = report_to_list(report_to)
    for name in names:
        if importlib.util.find_spec(_MODULES[name]) is None:
            raise ModuleNotFoundError(f"train.report_to={name} needs the {_MODULES[name]} package, which is not "
                                      f"installed: {EXTRA_HINT} (or set train.report_to=none)")
    return names


def _rgb(path: Path):
    import numpy as np
    from PIL import Image

    with Image.open(path) as image:
        return np.asarray(image.convert("RGB"))


class TensorBoardTracker:
    """``torch.utils.tensorboard.SummaryWriter`` in ``<output_dir>/tensorboard``."""

    def __init__(self, output_dir: Path, start_step: int, cfg):
        from torch.utils.tensorboard import SummaryWriter

        log_dir = Path(output_dir) / TENSORBOARD_DIR
        if start_step == 0:  # a new run (or one killed before its first checkpoint): nothing to continue
            shutil.rmtree(log_dir, ignore_errors=True)
        self.writer = SummaryWriter(log_dir=str(log_dir), purge_step=start_step + 1 if start_step else None)
        if start_step == 0:
            self.writer.add_text("config", f"```yaml\n{to_yaml(cfg)}```", 0)
            self.writer.flush()

    def log(self, step: int, scalars: dict[str, float], images: dict[str, Path]) -> None:
        for tag, value in scalars.items():
            self.writer.add_scalar(tag, value, step)
        for tag, path in images.items():
            self.writer.add_image(tag, _rgb(path), step, dataformats="HWC")
        self.writer.flush()  # on disk before the next checkpoint: a kill loses nothing the resume keeps

    def close(self) -> None:
        self.writer.close()


def wandb_run_id(output_dir: Path) -> str:
    """The W&B run id of this training run: read from ``wandb_run_id``, or made and stored there."""
    from wandb.sdk.lib.runid import generate_id

    path = Path(output_dir) / RUN_ID_FILE
    run_id = path.read_text().strip() if path.is_file() else ""
    if not run_id:
        run_id = generate_id()
        write_text_atomic(path, run_id + "\n")
    return run_id


class WandbTracker:
    """A ``wandb`` run (files under ``<output_dir>/wandb``), resumed by the id in ``wandb_run_id``.

    Project and entity: ``WANDB_PROJECT`` (default ``noiserefine``) and ``WANDB_ENTITY``; ``WANDB_MODE=offline``
    logs locally (``wandb sync <output_dir>/wandb`` uploads later).
    """

    def __init__(self, output_dir: Path, start_step: int, cfg):
        import wandb

        self.wandb = wandb
        run_id = wandb_run_id(output_dir)
        try:
            self.run = wandb.init(id=run_id, resume="allow", dir=str(output_dir), name=Path(output_dir).name,
                                  project=os.environ.get("WANDB_PROJECT") or "noiserefine",
                                  config=OmegaConf.to_container(cfg, resolve=True))
        except Exception as error:  # no API key, no network, a bad entity: say what to do
            raise RuntimeError(f"train.report_to=wandb: wandb.init of run {run_id} failed ({error}); log in "
                               "(`wandb login` or WANDB_API_KEY) or log offline with WANDB_MODE=offline") from error

    def log(self, step: int, scalars: dict[str, float], images: dict[str, Path]) -> None:
        images = {tag: self.wandb.Image(str(path)) for tag, path in images.items()}
        self.run.log({**scalars, **images}, step=step)

    def close(self) -> None:
        self.run.finish()


_TRACKERS = {"tensorboard": TensorBoardTracker, "wandb": WandbTracker}


class Trackers:
    """Every configured tracker (none on ranks other than 0)."""

    def __init__(self, trackers: list[Tracker]):
        self.trackers = trackers

    def log_train(self, step: int, scalars: dict[str, float]) -> None:
        for tracker in self.trackers:
            tracker.log(step, {f"train/{k}": float(v) for k, v in scalars.items()}, {})

    def log_eval(self, step: int, rows: dict[str, dict], grid: Path | None) -> None:
        """The evaluation's numeric metrics per row (``eval/<row>/<metric>``) and its grid PNG."""
        scalars = {f"eval/{row.replace(' ', '_')}/{name}": float(value) for row, metrics in rows.items()
                   for name, value in (metrics or {}).items() if isinstance(value, (int, float))}
        images = {"eval/grid": grid} if grid is not None and Path(grid).is_file() else {}
        for tracker in self.trackers:
            tracker.log(step, scalars, images)

    def close(self) -> None:
        for tracker in self.trackers:
            tracker.close()


def open_trackers(cfg, output_dir: Path, start_step: int, is_main: bool) -> Trackers:
    """The trackers of ``cfg.train.report_to`` on rank 0, continuing from ``start_step`` (0: a new run)."""
    if not is_main:
        return Trackers([])
    return Trackers([_TRACKERS[name](Path(output_dir), start_step, cfg)
                     for name in require_installed(cfg.train.report_to)])


def peak_memory_mb() -> dict[str, float]:
    """This process's peak resident memory and, on CUDA, the peak allocated GPU memory (MiB)."""
    peaks = {"peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        peaks["peak_gpu_memory_mb"] = torch.cuda.max_memory_allocated() / 2**20
    return peaks

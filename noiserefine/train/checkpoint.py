"""Checkpoints of a training run: cadence, refiner snapshots, retention, and the resume checks.

``train.output_dir/checkpoints/stepNNNNNNNN/`` are DeepSpeed checkpoints (the newest
``keep`` are kept) whose client state holds the step, every rank's data position and
log window, the resolved config and the shard list; ``snapshots/stepNNNNNNNN/`` is the
refiner exported as safetensors at every checkpoint (all kept), so intermediate
refiners can be evaluated without DeepSpeed.
"""

from __future__ import annotations

import json
import re
import shutil
from dataclasses import dataclass
from pathlib import Path

from omegaconf import OmegaConf

from ..refiner import Refiner, save_refiner
from . import distributed

CHECKPOINT_PREFIX = "step"
# Keys that may change between a run and its resumption without changing what is trained.
RESUMABLE_KEYS = ("train.max_steps", "train.log_every", "train.eval_every", "train.checkpoint_every",
                  "train.output_dir", "model.device", "data.cache_root", "data.cache_dir", "data.num_samples",
                  "data.allow_partial_cache")  # a resumed run trains on the shard rows its checkpoint recorded
COMPARED_SECTIONS = ("model", "teacher", "student", "refiner", "data", "train")


def checkpoint_tag(step: int) -> str:
    return f"{CHECKPOINT_PREFIX}{step:08d}"


def _flatten(container: dict, prefix: str = "") -> dict:
    out = {}
    for key, value in container.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            out.update(_flatten(value, f"{name}."))
        else:
            out[name] = value
    return out


def resume_mismatch(stored: dict, current: dict) -> list[str]:
    """Config keys that differ between a checkpoint and this run and would change the training."""
    old = _flatten({k: stored.get(k, {}) for k in COMPARED_SECTIONS})
    new = _flatten({k: current.get(k, {}) for k in COMPARED_SECTIONS})
    return sorted(k for k in set(old) | set(new) if k not in RESUMABLE_KEYS and old.get(k) != new.get(k))


def finished_run(cfg) -> dict | None:
    """``done.json`` of a run of this config already trained to ``train.max_steps``, else None."""
    output_dir = Path(cfg.train.output_dir)
    try:
        done = json.loads((output_dir / "done.json").read_text())
    except (OSError, json.JSONDecodeError):
        return None
    if done.get("max_steps") != cfg.train.max_steps or not (output_dir / "refiner" / "refiner.safetensors").is_file():
        return None
    saved = output_dir / "config.yaml"
    differing = resume_mismatch(OmegaConf.to_container(OmegaConf.load(saved), resolve=True),
                                OmegaConf.to_container(cfg, resolve=True)) if saved.is_file() else []
    if differing:
        raise ValueError(f"{output_dir} holds a finished run of another config (differs in: "
                         f"{', '.join(differing)}); use a new train.output_dir")
    return done


def latest_tag(ckpt_dir: Path) -> str | None:
    """The tag ``ckpt_dir/latest`` names; it must be one of ours, inside ``ckpt_dir`` (DeepSpeed would join
    whatever it says to the directory)."""
    latest = Path(ckpt_dir) / "latest"
    if not latest.is_file():
        return None
    tag = latest.read_text().strip()
    if not re.fullmatch(rf"{CHECKPOINT_PREFIX}\d{{8}}", tag) or not (Path(ckpt_dir) / tag).is_dir():
        raise ValueError(f"{latest} names {tag!r}, not a checkpoint directory of this trainer "
                         f"({CHECKPOINT_PREFIX}NNNNNNNN inside {ckpt_dir})")
    return tag


@dataclass(frozen=True)
class Resume:
    """Where a resumed run starts: its step, elapsed seconds, shard list and this rank's data state."""

    path: Path
    step: int
    seconds: float
    shards: list[str]
    data_state: dict


class Checkpointer:
    """Saves every ``train.checkpoint_every`` steps and at the last step; resumes from ``latest``."""

    def __init__(self, cfg, engine, refiner: Refiner, keep: int = 2):
        self.cfg, self.engine, self.refiner, self.keep = cfg, engine, refiner, keep
        self.output_dir = Path(cfg.train.output_dir)
        self.ckpt_dir = self.output_dir / "checkpoints"
        self.trainable_names = sorted(n for n, p in refiner.named_parameters() if p.requires_grad)

    def due(self, step: int) -> bool:
        return step % self.cfg.train.checkpoint_every == 0 or step == self.cfg.train.max_steps

    def save(self, step: int, data_state: dict, seconds: float, shards: list[str]) -> None:
        """Every rank: gather the ranks' data states (rank 0 writes them), then DeepSpeed saves.

        Rank 0 first exports the refiner of this step to ``snapshots/``. A crash between the
        two only means the snapshot is written again, identically, after a resume.
        """
        tag = checkpoint_tag(step)
        if distributed.rank() == 0:
            save_refiner(self.refiner, self.output_dir / "snapshots" / tag, self.cfg)
        positions = distributed.all_gather_object(data_state)
        client_state = {"step": step, "data_position": positions, "seconds": seconds, "shards": list(shards),
                        "config": OmegaConf.to_container(self.cfg, resolve=True), "world_size": len(positions),
                        "trainable_names": self.trainable_names}
        distributed.save_checkpoint(self.engine, self.ckpt_dir, tag, client_state)
        if distributed.rank() == 0:
            tags = sorted(p for p in self.ckpt_dir.glob(f"{CHECKPOINT_PREFIX}*") if p.is_dir())
            for old in tags[:-self.keep]:
                if old.name != tag:
                    shutil.rmtree(old, ignore_errors=True)
        distributed.barrier()

    def check(self, state: dict, where: Path, world_size: int) -> None:
        """Refuse a checkpoint of another config, another LoRA layout or another rank count."""
        differing = resume_mismatch(state.get("config", {}), OmegaConf.to_container(self.cfg, resolve=True))
        if differing:
            raise ValueError(f"{where}: the checkpoint was trained with another config (differs in: "
                             f"{', '.join(differing)}); use a new train.output_dir")
        if state.get("trainable_names") != self.trainable_names:
            raise ValueError(f"{where}: checkpoint LoRA parameters do not match the refiner built from the config")
        if state.get("world_size") != world_size:
            raise ValueError(f"{where}: written by {state.get('world_size')} ranks, this run has {world_size}; "
                             "exact resume needs the same number of ranks")
        if int(state["step"]) > self.cfg.train.max_steps:
            raise ValueError(f"{where}: already at step {state['step']}, beyond "
                             f"train.max_steps={self.cfg.train.max_steps}")

    def resume(self, rank: int, world_size: int) -> Resume | None:
        """Load the newest checkpoint into the engine after checking it; None for a fresh run."""
        tag = latest_tag(self.ckpt_dir)
        if tag is None:
            return None
        where = self.ckpt_dir / tag
        self.check(distributed.read_client_state(self.ckpt_dir, tag), where, world_size)
        state = distributed.load_checkpoint(self.engine, self.ckpt_dir, tag)
        return Resume(where, int(state["step"]), float(state["seconds"]), list(state["shards"]),
                      dict(state["data_position"][rank]))

"""Checkpoints of a training run: cadence, refiner snapshots, retention, and the resume checks.

``train.output_dir/checkpoints/stepNNNNNNNN/`` are DeepSpeed checkpoints (the newest
``keep`` are kept) whose client state holds the step, the resolved config and every rank's
``state_dict()`` of each stateful object the loop gives (by name: the data stream, which
records its position and the shard rows it trains on, and the log window; as edm2's and
torchtitan's checkpointers do, this module knows nothing else about them);
``snapshots/stepNNNNNNNN/`` is the refiner exported as safetensors at every checkpoint
(all kept), so intermediate refiners can be evaluated without DeepSpeed.

Beside DeepSpeed's files each checkpoint holds ``elastic.safetensors``: every LoRA weight (fp32)
and its AdamW moments, gathered from the ZeRO partitions, and the optimizer step in its
metadata: a form that does not depend on the number of ranks. A run resumed on the same
number of ranks loads DeepSpeed's own checkpoint; on another number (elastic resume, the
same ``train.global_batch_size``, any rank count dividing it) it loads ``elastic.safetensors``
instead, and each stateful object's ``elastic_state(states, rank)`` makes this rank's state
from those of all ranks of the run that wrote it.

Which checkpoint is intact, and the choice among them: ``checkpoint_files.py``. That choice,
the config comparison and the restore of the stateful objects run before any model, engine
or process group exists.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from omegaconf import OmegaConf

from ..files import write_text_atomic
from ..refiner import Refiner, save_refiner
from . import distributed
from .checkpoint_files import (CHECKPOINT_FORMAT, CHECKPOINT_PREFIX, OLDEST_FORMAT, TAG, checkpoint_tag,
                               recorded_files, select_checkpoint, write_record)
from .elastic import ELASTIC_FILE, load_elastic, save_elastic, trainable_names, trainable_parameters
from .order import allowed_world_sizes

# Keys that may change between a run and its resumption without changing what is trained.
RESUMABLE_KEYS = ("train.max_steps", "train.log_every", "train.eval_every", "train.checkpoint_every",
                  "train.output_dir", "model.device", "data.cache_root", "data.cache_dir", "data.num_samples",
                  "data.allow_partial_cache",  # a resumed run trains on the shard rows its checkpoint recorded
                  "data.io_retries", "data.io_backoff_s", "data.io_chunk_bytes",  # object-store I/O only
                  "train.report_to")  # where the logs go (a run from before the key has none)
COMPARED_SECTIONS = ("model", "teacher", "student", "refiner", "data", "train")


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
    """Config keys that differ between a checkpoint and this run and would change the training. A key one side
    lacks (a checkpoint's config written before the key existed) counts as its default: what that trainer did
    (e.g. no ``data.mixture``)."""
    from ..config_schema import Config  # the schema's defaults (config imports no stage)

    defaults = _flatten({k: v for k, v in OmegaConf.to_container(OmegaConf.structured(Config)).items()
                         if k in COMPARED_SECTIONS})
    old = {**defaults, **_flatten({k: stored.get(k, {}) for k in COMPARED_SECTIONS})}
    new = {**defaults, **_flatten({k: current.get(k, {}) for k in COMPARED_SECTIONS})}
    return sorted(k for k in set(old) | set(new) if k not in RESUMABLE_KEYS and old.get(k) != new.get(k))


def finished_run(cfg) -> dict | None:
    """``done.json`` of a run of this config already trained to ``train.max_steps``, else None.

    The finished run's config is the one stored in ``done.json`` (``config.yaml`` for runs
    finished before it was stored there); one of another config is refused.
    """
    output_dir = Path(cfg.train.output_dir)
    try:
        done = json.loads((output_dir / "done.json").read_text())
    except (OSError, json.JSONDecodeError):
        return None
    if done.get("max_steps") != cfg.train.max_steps or not (output_dir / "refiner" / "refiner.safetensors").is_file():
        return None
    stored = done.pop("config", None)
    saved = output_dir / "config.yaml"
    if stored is None and saved.is_file():
        stored = OmegaConf.to_container(OmegaConf.load(saved), resolve=True)
    if stored is None:  # nothing to compare with: the resume path compares with the checkpoint
        return None
    differing = resume_mismatch(stored, OmegaConf.to_container(cfg, resolve=True))
    if differing:
        raise ValueError(f"{output_dir} holds a finished run of another config (differs in: "
                         f"{', '.join(differing)}); use a new train.output_dir")
    return done


class Stateful(Protocol):
    """What the checkpointer saves and restores, by name, knowing nothing else about it.

    ``state_dict()``: this rank's state (JSON-able: dicts, lists, strings, numbers);
    ``load_state_dict(state)``: continue from it (it may refuse: ``ValueError`` saying why);
    ``elastic_state(states, rank)`` (optional): this rank's state from the states of all ranks of a run
    on another number of ranks; an object without it cannot be resumed on another number of ranks.
    """

    def state_dict(self) -> dict: ...

    def load_state_dict(self, state: dict) -> object: ...


@dataclass(frozen=True)
class Resume:
    """Where a resumed run starts: its checkpoint, step, elapsed seconds and every rank's states by name."""

    path: Path
    tag: str
    step: int
    seconds: float
    states: dict[str, list[dict]]  # name -> one state per rank of the run that wrote it
    trainable_names: list[str] | None
    world_size: int = 1  # of the run that wrote it


class Checkpointer:
    """Saves every ``train.checkpoint_every`` steps and at the last step; resumes from the newest intact one."""

    def __init__(self, cfg, keep: int = 2):
        self.cfg, self.keep = cfg, keep
        self.output_dir = Path(cfg.train.output_dir)
        self.ckpt_dir = self.output_dir / "checkpoints"

    def due(self, step: int) -> bool:
        return step % self.cfg.train.checkpoint_every == 0 or step == self.cfg.train.max_steps

    def save(self, engine, refiner: Refiner, step: int, seconds: float, states: dict[str, Stateful]) -> None:
        """Every rank: gather the ranks' ``state_dict()`` of each of ``states`` (rank 0 writes them), then
        DeepSpeed saves, then rank 0 records the files written and prunes old checkpoints.

        Rank 0 first exports the refiner of this step to ``snapshots/``. A crash between the
        two only means the snapshot is written again, identically, after a resume.
        """
        tag = checkpoint_tag(step)
        main = distributed.rank() == 0
        if main:
            save_refiner(refiner, self.output_dir / "snapshots" / tag, self.cfg)
            shutil.rmtree(self.ckpt_dir / tag, ignore_errors=True)  # leftover of a save that was killed
        # one dict per rank (also: nobody writes before the removal)
        gathered = distributed.all_gather_object({name: obj.state_dict() for name, obj in states.items()})
        client_state = {"step": step, "seconds": seconds,
                        "states": {name: [g[name] for g in gathered] for name in states},
                        "global_batch_size": int(self.cfg.train.global_batch_size),
                        "config": OmegaConf.to_container(self.cfg, resolve=True), "world_size": len(gathered),
                        "trainable_names": trainable_names(refiner), "checkpoint_format": CHECKPOINT_FORMAT}
        distributed.save_checkpoint(engine, self.ckpt_dir, tag, client_state)
        tensors, optimizer_step = distributed.full_training_state(engine, trainable_parameters(refiner))
        if main:
            save_elastic(self.ckpt_dir / tag / ELASTIC_FILE, tensors, {
                "step": step, "optimizer_step": optimizer_step, "world_size": len(gathered),
                "global_batch_size": int(self.cfg.train.global_batch_size)})
            write_record(self.ckpt_dir / tag)
            write_text_atomic(self.ckpt_dir / "latest", tag)  # only now: a complete, recorded checkpoint
            older = sorted((p for p in self.ckpt_dir.glob(f"{CHECKPOINT_PREFIX}*")
                            if p.is_dir() and TAG.fullmatch(p.name) and p.name < tag), reverse=True)
            for old in older[self.keep - 1:]:
                shutil.rmtree(old, ignore_errors=True)
        distributed.barrier()

    def check(self, state: dict, where: Path, world_size: int) -> None:
        """Refuse a checkpoint of another config, of an older data order, beyond ``train.max_steps``, or one
        that this number of ranks cannot continue (the global batch must split evenly over them)."""
        if int(state.get("checkpoint_format", 1)) < OLDEST_FORMAT:
            raise ValueError(f"{where}: written by an older trainer (per-rank data order, no global batch); "
                             "finish that run with the version that wrote it, or train in a new train.output_dir")
        differing = resume_mismatch(state.get("config", {}), OmegaConf.to_container(self.cfg, resolve=True))
        if differing:
            hint = ""
            if "train.global_batch_size" in differing:
                stored = int(state["global_batch_size"])
                hint = (f". The global batch size fixes the sequence of samples: resume with "
                        f"train.global_batch_size={stored} on any number of ranks in {allowed_world_sizes(stored)}")
            raise ValueError(f"{where}: the checkpoint was trained with another config (differs in: "
                             f"{', '.join(differing)}); use a new train.output_dir{hint}")
        global_batch = int(state["global_batch_size"])
        if global_batch % world_size:
            raise ValueError(f"{where}: train.global_batch_size={global_batch} cannot be split evenly over "
                             f"{world_size} ranks; resume on one of {allowed_world_sizes(global_batch)} ranks")
        if state.get("world_size") != world_size and ELASTIC_FILE not in recorded_files(where):
            raise ValueError(f"{where}: written by {state.get('world_size')} ranks without {ELASTIC_FILE}; "
                             f"resume it on {state.get('world_size')} ranks")
        if int(state["step"]) > self.cfg.train.max_steps:
            raise ValueError(f"{where}: already at step {state['step']}, beyond "
                             f"train.max_steps={self.cfg.train.max_steps}")

    def find(self, rank: int, world_size: int) -> Resume | None:
        """The checkpoint to resume from, checked against this run; None for a fresh run. Runs before any
        model, engine or process group exists (every rank reads the same files and decides the same)."""
        chosen = select_checkpoint(self.ckpt_dir, verbose=rank == 0)
        if chosen is None:
            return None
        tag, state = chosen
        where = self.ckpt_dir / tag
        self.check(state, where, world_size)
        states = _states_of(state)
        return Resume(where, tag, int(state["step"]), float(state["seconds"]), states, state.get("trainable_names"),
                      int(state.get("world_size", len(next(iter(states.values()), [])))))

    def restore(self, resume: Resume, objects: dict[str, Stateful], rank: int, world_size: int) -> None:
        """``load_state_dict`` of each of ``objects`` with this rank's state: its own on the same number of
        ranks, else the object's ``elastic_state`` of every rank's. Runs before any model or engine exists."""
        for name, obj in objects.items():
            states = resume.states.get(name)
            if states is None:
                raise ValueError(f"{resume.path}: the checkpoint holds no state of {name!r} (it has "
                                 f"{sorted(resume.states)}); train in a new train.output_dir")
            if len(states) == world_size:
                obj.load_state_dict(states[rank])
            elif hasattr(obj, "elastic_state"):
                obj.load_state_dict(obj.elastic_state(states, rank))
            else:
                raise ValueError(f"{resume.path}: the state of {name!r} was written by {len(states)} rank(s) and "
                                 f"cannot be split over {world_size}; resume it on {len(states)} rank(s)")

    def load(self, engine, refiner: Refiner, resume: Resume) -> None:
        """Load the chosen checkpoint into ``engine`` once its LoRA layout matches the refiner's: DeepSpeed's own
        files on the same number of ranks, ``elastic.safetensors`` on another (every rank calls this)."""
        if resume.trainable_names != trainable_names(refiner):
            raise ValueError(f"{resume.path}: checkpoint LoRA parameters do not match the refiner built from the "
                             "config")
        if resume.world_size == distributed.world_size():
            distributed.load_checkpoint(engine, self.ckpt_dir, resume.tag)
            return
        tensors, meta = load_elastic(resume.path / ELASTIC_FILE)
        expected = {f"param/{name}" for name in resume.trainable_names or []}
        if not expected <= set(tensors):
            raise ValueError(f"{resume.path / ELASTIC_FILE}: lacks {sorted(expected - set(tensors))[:3]}")
        if distributed.rank() == 0:
            print(f"elastic resume: {resume.path.name} was written by {resume.world_size} rank(s), this run has "
                  f"{distributed.world_size()}; loading {ELASTIC_FILE} (LoRA weights and AdamW state)", flush=True)
        distributed.load_full_training_state(engine, trainable_parameters(refiner), tensors,
                                             int(meta["optimizer_step"]))


def _states_of(state: dict) -> dict[str, list[dict]]:
    """The checkpoint's states by name, one per rank. Format 3 (before the checkpointer was handed its
    objects) stored the data stream's position per rank in ``data_position`` with the log window inside it,
    and the stream's shard rows once: read as the states the stream ("data") and window ("log_window") load."""
    if "states" in state:
        return state["states"]
    positions = state["data_position"]
    return {"data": [{**{k: v for k, v in p.items() if k != "log_window"}, "shard_rows": state["shard_rows"]}
                     for p in positions],
            "log_window": [p.get("log_window", {}) for p in positions]}

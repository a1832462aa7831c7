"""Checkpoints of a training run: cadence, refiner snapshots, retention, and the resume checks.

``train.output_dir/checkpoints/stepNNNNNNNN/`` are DeepSpeed checkpoints (the newest
``keep`` are kept) whose client state holds the step, every rank's data position and
log window, the resolved config and the manifest rows of the shards the run trains on;
``snapshots/stepNNNNNNNN/`` is the refiner exported as safetensors at every checkpoint
(all kept), so intermediate refiners can be evaluated without DeepSpeed.

Once DeepSpeed has written a checkpoint, rank 0 records its files' sizes and sha256 in
``checkpoint.json`` inside it, then points ``latest`` at it (atomically; DeepSpeed's own
``latest`` is written in place). A resume takes the checkpoint ``latest`` names if it is
intact (every recorded file present and unchanged, every file loads with
``torch.load(weights_only=True)``), else the newest older intact one, saying so; a
checkpoint that holds a foreign pickle is refused, never skipped. All of this, and the
config comparison, runs before any model, engine or process group exists.
"""

from __future__ import annotations

import dataclasses
import json
import re
import shutil
import sys
from dataclasses import dataclass
from pathlib import Path

from omegaconf import OmegaConf

from ..hashing import file_sha256
from ..files import write_text_atomic
from ..refiner import Refiner, save_refiner
from ..shards import ShardInfo, read_manifest
from ..targets.cache import cache_dir_for
from . import distributed
from .distributed import CheckpointDamaged

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


_TAG = re.compile(rf"{CHECKPOINT_PREFIX}\d{{8}}")
_TAG_PREFIX = re.compile(r"(s(t(e(p\d{0,7})?)?)?)?")  # what DeepSpeed's in-place write of `latest` may leave
RECORD_FILE = "checkpoint.json"
CHECKPOINT_FORMAT = 2  # client states of format 2 have a RECORD_FILE once their save completed


def _read_latest(ckpt_dir: Path) -> tuple[str | None, str | None]:
    """``(tag, problem)`` of ``ckpt_dir/latest``: (None, None) if there is none; a problem (damage) if it is
    empty or cut short or names a directory that is missing. A tag outside the pattern is refused: DeepSpeed
    would join whatever it says to the directory."""
    latest = Path(ckpt_dir) / "latest"
    if not latest.is_file():
        return None, None
    tag = latest.read_text().strip()
    if _TAG_PREFIX.fullmatch(tag):
        return None, (f"{latest} names {tag!r}, not a checkpoint directory of this trainer: it is empty or cut "
                      "short (its write was interrupted)")
    if not _TAG.fullmatch(tag):
        raise ValueError(f"{latest} names {tag!r}, not a checkpoint directory of this trainer "
                         f"({CHECKPOINT_PREFIX}NNNNNNNN inside {ckpt_dir})")
    if not (Path(ckpt_dir) / tag).is_dir():
        return tag, f"{latest} names {tag!r}, not a checkpoint directory of this trainer (it does not exist)"
    return tag, None


def latest_tag(ckpt_dir: Path) -> str | None:
    """The tag ``ckpt_dir/latest`` names, None without one; ``ValueError`` for one that is not ours,
    :class:`CheckpointDamaged` for one that is empty, cut short or names a missing directory."""
    tag, problem = _read_latest(ckpt_dir)
    if problem:
        raise CheckpointDamaged(problem)
    return tag


def write_record(directory: Path) -> None:
    """``checkpoint.json``: size and sha256 of every file DeepSpeed wrote into ``directory``."""
    files = {p.name: {"num_bytes": p.stat().st_size, "sha256": file_sha256(p)}
             for p in sorted(Path(directory).iterdir()) if p.is_file() and p.name != RECORD_FILE}
    write_text_atomic(Path(directory) / RECORD_FILE,
                      json.dumps({"format": CHECKPOINT_FORMAT, "files": files}, indent=1, sort_keys=True) + "\n")


def read_checkpoint(ckpt_dir: Path, tag: str) -> dict:
    """The client state of checkpoint ``tag`` if it is intact; :class:`CheckpointDamaged` saying why not;
    ``ValueError`` for a file that holds objects other than tensors (refused, see ``read_client_state``)."""
    directory = Path(ckpt_dir) / tag
    if not directory.is_dir():
        raise CheckpointDamaged("the directory is missing")
    record, problems = None, []
    if (directory / RECORD_FILE).exists():
        try:
            record = json.loads((directory / RECORD_FILE).read_text())
            files = dict(record["files"])
        except (OSError, ValueError, KeyError, TypeError) as error:
            raise CheckpointDamaged(f"{RECORD_FILE} is unreadable ({error})") from None
        for name, expected in sorted(files.items()):
            path = directory / name
            if not path.is_file():
                problems.append(f"{name} is missing")
            elif path.stat().st_size != expected["num_bytes"]:
                problems.append(f"{name} has {path.stat().st_size} bytes, {expected['num_bytes']} were written")
            elif file_sha256(path) != expected["sha256"]:
                problems.append(f"{name} differs from what was written (sha256)")
    state = distributed.read_client_state(ckpt_dir, tag)  # refuses foreign pickles even in damaged files
    if problems:
        raise CheckpointDamaged("; ".join(problems))
    if record is None and int(state.get("checkpoint_format", 1)) >= CHECKPOINT_FORMAT:
        raise CheckpointDamaged(f"no {RECORD_FILE}: its save did not complete")
    return state


def select_checkpoint(ckpt_dir: Path, *, verbose: bool = True) -> tuple[str, dict] | None:
    """``(tag, client state)`` of the newest intact checkpoint not newer than ``latest``; None for a fresh run.

    Damaged checkpoints (and a damaged or missing ``latest``) are passed over, saying so on stderr.
    Without ``latest`` and without an intact checkpoint no save ever completed: the leftovers of a
    killed first save are ignored (step 0). With a ``latest`` but no intact checkpoint:
    ``ValueError`` naming the directory.
    """
    ckpt_dir = Path(ckpt_dir)
    latest, latest_problem = _read_latest(ckpt_dir)
    tags = sorted((p.name for p in ckpt_dir.glob(f"{CHECKPOINT_PREFIX}*") if p.is_dir() and _TAG.fullmatch(p.name)),
                  reverse=True)
    if latest is not None:  # newer directories are leftovers of a save that did not complete
        tags = [latest] + [t for t in tags if t < latest]
    passed = [latest_problem] if latest_problem and latest is None else []
    for tag in tags:
        try:
            state = read_checkpoint(ckpt_dir, tag)
        except CheckpointDamaged as damage:
            passed.append(f"checkpoint {tag} is unreadable ({damage})")
            continue
        if latest is None and latest_problem is None:
            passed.append(f"{ckpt_dir / 'latest'} is missing")
        if passed and verbose:
            print(f"warning: {'; '.join(passed)}; resuming from {tag}", file=sys.stderr, flush=True)
        return tag, state
    if latest is None and latest_problem is None:
        if tags and verbose:
            print(f"warning: {ckpt_dir} has no `latest` (no checkpoint save completed); ignoring the incomplete "
                  f"{', '.join(tags)} and starting from step 0", file=sys.stderr, flush=True)
        return None
    raise ValueError(f"{ckpt_dir}: no intact checkpoint to resume from ({'; '.join(passed)}); move the directory "
                     "away to train from step 0, or use a new train.output_dir")


@dataclass(frozen=True)
class Resume:
    """Where a resumed run starts: its checkpoint, step, elapsed seconds, shard rows and this rank's data state."""

    path: Path
    tag: str
    step: int
    seconds: float
    shard_rows: list[ShardInfo]
    data_state: dict
    trainable_names: list[str] | None


class Checkpointer:
    """Saves every ``train.checkpoint_every`` steps and at the last step; resumes from the newest intact one."""

    def __init__(self, cfg, keep: int = 2):
        self.cfg, self.keep = cfg, keep
        self.output_dir = Path(cfg.train.output_dir)
        self.ckpt_dir = self.output_dir / "checkpoints"

    def due(self, step: int) -> bool:
        return step % self.cfg.train.checkpoint_every == 0 or step == self.cfg.train.max_steps

    def save(self, engine, refiner: Refiner, step: int, data_state: dict, seconds: float,
             shard_rows: list[ShardInfo]) -> None:
        """Every rank: gather the ranks' data states (rank 0 writes them), then DeepSpeed saves, then rank 0
        records the files written and prunes old checkpoints.

        Rank 0 first exports the refiner of this step to ``snapshots/``. A crash between the
        two only means the snapshot is written again, identically, after a resume.
        """
        tag = checkpoint_tag(step)
        main = distributed.rank() == 0
        if main:
            save_refiner(refiner, self.output_dir / "snapshots" / tag, self.cfg)
            shutil.rmtree(self.ckpt_dir / tag, ignore_errors=True)  # leftover of a save that was killed
        positions = distributed.all_gather_object(data_state)  # also: nobody writes before the removal
        client_state = {"step": step, "data_position": positions, "seconds": seconds,
                        "shards": [row.name for row in shard_rows],
                        "shard_rows": [dataclasses.asdict(row) for row in shard_rows],
                        "config": OmegaConf.to_container(self.cfg, resolve=True), "world_size": len(positions),
                        "trainable_names": trainable_names(refiner), "checkpoint_format": CHECKPOINT_FORMAT}
        distributed.save_checkpoint(engine, self.ckpt_dir, tag, client_state)
        if main:
            write_record(self.ckpt_dir / tag)
            write_text_atomic(self.ckpt_dir / "latest", tag)  # only now: a complete, recorded checkpoint
            older = sorted((p for p in self.ckpt_dir.glob(f"{CHECKPOINT_PREFIX}*")
                            if p.is_dir() and _TAG.fullmatch(p.name) and p.name < tag), reverse=True)
            for old in older[self.keep - 1:]:
                shutil.rmtree(old, ignore_errors=True)
        distributed.barrier()

    def check(self, state: dict, where: Path, world_size: int) -> None:
        """Refuse a checkpoint of another config, another rank count or beyond ``train.max_steps``."""
        differing = resume_mismatch(state.get("config", {}), OmegaConf.to_container(self.cfg, resolve=True))
        if differing:
            raise ValueError(f"{where}: the checkpoint was trained with another config (differs in: "
                             f"{', '.join(differing)}); use a new train.output_dir")
        if state.get("world_size") != world_size:
            raise ValueError(f"{where}: written by {state.get('world_size')} ranks, this run has {world_size}; "
                             "exact resume needs the same number of ranks")
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
        if "shard_rows" in state:
            rows = [ShardInfo(**row) for row in state["shard_rows"]]
        else:  # written before the rows were stored: its shard names, today's manifest rows
            manifest = read_manifest(cache_dir_for(self.cfg))
            unknown = [name for name in state["shards"] if name not in manifest]
            if unknown:
                raise ValueError(f"{where}: shards {unknown} are not in the manifest of {cache_dir_for(self.cfg)}")
            rows = [manifest[name] for name in state["shards"]]
        return Resume(where, tag, int(state["step"]), float(state["seconds"]), rows,
                      dict(state["data_position"][rank]), state.get("trainable_names"))

    def load(self, engine, refiner: Refiner, resume: Resume) -> None:
        """Load the chosen checkpoint into ``engine`` once its LoRA layout matches the refiner's."""
        if resume.trainable_names != trainable_names(refiner):
            raise ValueError(f"{resume.path}: checkpoint LoRA parameters do not match the refiner built from the "
                             "config")
        distributed.load_checkpoint(engine, self.ckpt_dir, resume.tag)


def trainable_names(refiner: Refiner) -> list[str]:
    return sorted(n for n, p in refiner.named_parameters() if p.requires_grad)

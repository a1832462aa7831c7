"""Checkpoints of a training run: cadence, refiner snapshots, retention, and the resume checks.

``train.output_dir/checkpoints/stepNNNNNNNN/`` are DeepSpeed checkpoints (the newest
``keep`` are kept) whose client state holds the step, every rank's data position and
log window, the resolved config and the manifest rows of the shards the run trains on;
``snapshots/stepNNNNNNNN/`` is the refiner exported as safetensors at every checkpoint
(all kept), so intermediate refiners can be evaluated without DeepSpeed.

Beside DeepSpeed's files each checkpoint holds ``elastic.safetensors``: every LoRA weight (fp32)
and its AdamW moments, gathered from the ZeRO partitions, and the optimizer step in its
metadata: a form that does not depend on the number of ranks. A run resumed on the same
number of ranks loads DeepSpeed's own checkpoint; on another number (elastic resume, the
same ``train.global_batch_size``, any rank count dividing it) it loads ``elastic.safetensors``
instead, and the data position (global batches consumed) is the same on every rank.

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

from ..files import write_text_atomic
from ..hashing import file_sha256
from ..refiner import Refiner, save_refiner
from ..shards import ShardInfo, read_manifest
from ..targets.cache import cache_dir_for
from . import distributed
from .distributed import CheckpointDamaged
from .elastic import ELASTIC_FILE, load_elastic, save_elastic, trainable_names, trainable_parameters
from .multi_scale import scale_label
from .order import allowed_world_sizes

CHECKPOINT_PREFIX = "step"
# Keys that may change between a run and its resumption without changing what is trained.
RESUMABLE_KEYS = ("train.max_steps", "train.log_every", "train.eval_every", "train.checkpoint_every",
                  "train.output_dir", "model.device", "data.cache_root", "data.cache_dir", "data.num_samples",
                  "data.allow_partial_cache",  # a resumed run trains on the shard rows its checkpoint recorded
                  "data.io_retries", "data.io_backoff_s", "data.io_chunk_bytes")  # object-store I/O only
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
# format 2: a RECORD_FILE once the save completed; format 3: the global sample order (a position in global
# batches, train.global_batch_size) and ELASTIC_FILE
CHECKPOINT_FORMAT = 3


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
    shard_rows: list[ShardInfo] | dict[float, list[ShardInfo]]  # per guidance scale for data.guidance_scales
    data_state: dict
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

    def save(self, engine, refiner: Refiner, step: int, data_state: dict, seconds: float,
             shard_rows: list[ShardInfo] | dict[float, list[ShardInfo]]) -> None:
        """Every rank: gather the ranks' data states (rank 0 writes them), then DeepSpeed saves, then rank 0
        records the files written and prunes old checkpoints.

        ``shard_rows``: the stream's (``stream.shard_rows()``): a list, or one list per guidance scale
        (``data.guidance_scales``), stored under the scale's ``scale_label``.

        Rank 0 first exports the refiner of this step to ``snapshots/``. A crash between the
        two only means the snapshot is written again, identically, after a resume.
        """
        tag = checkpoint_tag(step)
        main = distributed.rank() == 0
        if main:
            save_refiner(refiner, self.output_dir / "snapshots" / tag, self.cfg)
            shutil.rmtree(self.ckpt_dir / tag, ignore_errors=True)  # leftover of a save that was killed
        positions = distributed.all_gather_object(data_state)  # also: nobody writes before the removal
        if isinstance(shard_rows, dict):
            shards = {scale_label(w): [row.name for row in rows] for w, rows in shard_rows.items()}
            rows_state = {scale_label(w): [dataclasses.asdict(row) for row in rows] for w, rows in shard_rows.items()}
        else:
            shards, rows_state = [row.name for row in shard_rows], [dataclasses.asdict(row) for row in shard_rows]
        client_state = {"step": step, "data_position": positions, "seconds": seconds,
                        "global_batch_size": int(self.cfg.train.global_batch_size),
                        "shards": shards, "shard_rows": rows_state,
                        "config": OmegaConf.to_container(self.cfg, resolve=True), "world_size": len(positions),
                        "trainable_names": trainable_names(refiner), "checkpoint_format": CHECKPOINT_FORMAT}
        distributed.save_checkpoint(engine, self.ckpt_dir, tag, client_state)
        tensors, optimizer_step = distributed.full_training_state(engine, trainable_parameters(refiner))
        if main:
            save_elastic(self.ckpt_dir / tag / ELASTIC_FILE, tensors, {
                "step": step, "optimizer_step": optimizer_step, "world_size": len(positions),
                "global_batch_size": int(self.cfg.train.global_batch_size)})
            write_record(self.ckpt_dir / tag)
            write_text_atomic(self.ckpt_dir / "latest", tag)  # only now: a complete, recorded checkpoint
            older = sorted((p for p in self.ckpt_dir.glob(f"{CHECKPOINT_PREFIX}*")
                            if p.is_dir() and _TAG.fullmatch(p.name) and p.name < tag), reverse=True)
            for old in older[self.keep - 1:]:
                shutil.rmtree(old, ignore_errors=True)
        distributed.barrier()

    def check(self, state: dict, where: Path, world_size: int) -> None:
        """Refuse a checkpoint of another config, of an older data order, beyond ``train.max_steps``, or one
        that this number of ranks cannot continue (the global batch must split evenly over them)."""
        if int(state.get("checkpoint_format", 1)) < CHECKPOINT_FORMAT:
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
        if state.get("world_size") != world_size and ELASTIC_FILE not in _recorded_files(where):
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
        if isinstance(state.get("shard_rows"), dict):  # data.guidance_scales: one list per scale
            rows = {float(w): [ShardInfo(**row) for row in scale_rows] for w, scale_rows in state["shard_rows"].items()}
        elif "shard_rows" in state:
            rows = [ShardInfo(**row) for row in state["shard_rows"]]
        else:  # written before the rows were stored: its shard names, today's manifest rows
            manifest = read_manifest(cache_dir_for(self.cfg))
            unknown = [name for name in state["shards"] if name not in manifest]
            if unknown:
                raise ValueError(f"{where}: shards {unknown} are not in the manifest of {cache_dir_for(self.cfg)}")
            rows = [manifest[name] for name in state["shards"]]
        positions = state["data_position"]
        if len(positions) == world_size:
            data_state = dict(positions[rank])
        else:  # elastic: the position is global; counters and the log window go to rank 0
            data_state = {"batches": positions[0]["batches"]}
            if rank == 0:
                data_state["corrupt_skipped"] = sum(int(p.get("corrupt_skipped", 0)) for p in positions)
                data_state["log_window"] = merge_windows([p.get("log_window", {}) for p in positions])
        return Resume(where, tag, int(state["step"]), float(state["seconds"]), rows, data_state,
                      state.get("trainable_names"), int(state.get("world_size", len(positions))))

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


def merge_windows(windows: list[dict]) -> dict:
    """The log windows of several ranks as one (sums; the longest elapsed time)."""
    return {"loss": sum(float(w.get("loss", 0.0)) for w in windows),
            "steps": sum(int(w.get("steps", 0)) for w in windows),
            "samples": sum(int(w.get("samples", 0)) for w in windows),
            "seconds": max([float(w.get("seconds", 0.0)) for w in windows] or [0.0])}


def _recorded_files(directory: Path) -> set[str]:
    try:
        return set(json.loads((Path(directory) / RECORD_FILE).read_text())["files"])
    except (OSError, ValueError, KeyError, TypeError):
        return set()

"""Which checkpoint on disk is intact: tags, ``latest``, the ``checkpoint.json`` record, the selection.

Once DeepSpeed has written a checkpoint, rank 0 records its files' sizes and sha256 in
``checkpoint.json`` inside it, then points ``latest`` at it (atomically; DeepSpeed's own
``latest`` is written in place). A resume takes the checkpoint ``latest`` names if it is
intact (every recorded file present and unchanged, every file loads with
``torch.load(weights_only=True)``), else the newest older intact one, saying so; a
checkpoint that holds a foreign pickle is refused, never skipped. ``checkpoint.py`` saves
them and checks what a chosen one holds.
"""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path

from ..files import write_text_atomic
from ..hashing import file_sha256
from . import distributed
from .distributed import CheckpointDamaged

CHECKPOINT_PREFIX = "step"


def checkpoint_tag(step: int) -> str:
    return f"{CHECKPOINT_PREFIX}{step:08d}"


TAG = re.compile(rf"{CHECKPOINT_PREFIX}\d{{8}}")
_TAG_PREFIX = re.compile(r"(s(t(e(p\d{0,7})?)?)?)?")  # what DeepSpeed's in-place write of `latest` may leave
RECORD_FILE = "checkpoint.json"
# format 2: a RECORD_FILE once the save completed; format 3: the global sample order (a position in global
# batches, train.global_batch_size) and ELASTIC_FILE; format 4: the stateful objects' states by name ("states":
# format 3's layout is read as that: checkpoint._states_of)
CHECKPOINT_FORMAT = 4
OLDEST_FORMAT = 3  # older ones (a per-rank data order) are refused


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
    if not TAG.fullmatch(tag):
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
            if Path(name).name != name or name in ("", ".", ".."):  # never read outside the checkpoint
                raise CheckpointDamaged(f"{RECORD_FILE} lists {name!r}: not a file name of the checkpoint directory")
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
    if record is None and int(state.get("checkpoint_format", 1)) >= OLDEST_FORMAT:
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
    tags = sorted((p.name for p in ckpt_dir.glob(f"{CHECKPOINT_PREFIX}*") if p.is_dir() and TAG.fullmatch(p.name)),
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


def recorded_files(directory: Path) -> set[str]:
    try:
        return set(json.loads((Path(directory) / RECORD_FILE).read_text())["files"])
    except (OSError, ValueError, KeyError, TypeError):
        return set()

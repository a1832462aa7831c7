"""Text prompts for teacher-target generation, read from real dataset formats.

Sources (see :func:`load_prompt_source`):

* ``coco``     -- MS-COCO captions JSON (``captions_train2017.json`` layout).
* ``pickapic`` -- Pick-a-Pic parquet shards; only the ``caption`` column is read.
* ``text``     -- UTF-8 text file, one prompt per line.
* ``digits``   -- fixed prompts for the embedded handwritten-digit model.
* ``composed_digits`` -- every prompt of its compositional task ("a small thick seven in the top left").

Every source goes through :func:`normalize_prompts`.
"""

from __future__ import annotations

import glob
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable

import pyarrow as pa
import pyarrow.parquet as pq

from ..backends.digits import DIGIT_WORDS, all_prompts

PROMPT_KINDS = ("coco", "pickapic", "text", "digits", "composed_digits")


@dataclass
class PromptStats:
    """Counts from :func:`normalize_prompts`; ``num_read = num_empty + num_duplicates + num_kept``."""

    num_read: int = 0
    num_empty: int = 0
    num_truncated: int = 0
    num_duplicates: int = 0
    num_kept: int = 0

    def summary(self) -> str:
        """One-line human-readable summary."""
        return (f"read {self.num_read} prompts: kept {self.num_kept}, empty {self.num_empty}, "
                f"duplicates {self.num_duplicates}, truncated {self.num_truncated}")

    def __str__(self) -> str:
        return self.summary()


def normalize_prompts(raw: Iterable[str | None], *, dedup: bool = True,
                      max_chars: int = 300) -> tuple[list[str], PromptStats]:
    """Collapse whitespace, drop empties, cap length, optionally de-duplicate (first wins).

    Truncation is counted before de-duplication; duplicates are detected on the
    normalised, capped text.
    """
    if isinstance(max_chars, bool) or not isinstance(max_chars, int) or max_chars < 1:
        raise ValueError(f"max_chars must be a positive integer, got {max_chars!r}")
    stats = PromptStats()
    kept: list[str] = []
    seen: set[str] = set()
    for item in raw:
        stats.num_read += 1
        text = " ".join(item.split()) if item is not None else ""
        if not text:
            stats.num_empty += 1
            continue
        if len(text) > max_chars:
            text = text[:max_chars].rstrip()
            stats.num_truncated += 1
        if dedup:
            if text in seen:
                stats.num_duplicates += 1
                continue
            seen.add(text)
        kept.append(text)
    stats.num_kept = len(kept)
    return kept, stats


def _existing_file(path: str | os.PathLike) -> Path:
    """Expand ``~`` and require an existing regular file."""
    p = Path(path).expanduser()
    if not p.is_file():
        raise FileNotFoundError(f"prompt file not found: {str(p)!r}")
    return p


def read_coco_captions(path: str | os.PathLike) -> list[str]:
    """Raw captions of a COCO captions JSON, in file order of ``annotations``."""
    p = _existing_file(path)
    try:
        data = json.loads(p.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ValueError(f"{str(p)!r} is not valid COCO captions JSON: {exc}") from exc
    if not isinstance(data, dict) or "annotations" not in data:
        raise ValueError(f"{str(p)!r} has no top-level 'annotations' key")
    annotations = data["annotations"]
    if not isinstance(annotations, list):
        raise ValueError(f"{str(p)!r}: 'annotations' must be a list, "
                         f"got {type(annotations).__name__}")
    captions: list[str] = []
    for i, ann in enumerate(annotations):
        caption = ann.get("caption") if isinstance(ann, dict) else None
        if not isinstance(caption, str):
            raise ValueError(f"{str(p)!r}: annotations[{i}] has no string 'caption' "
                             f"(got {type(caption).__name__}: {caption!r})")
        captions.append(caption)
    return captions


def _parquet_files(path: str | os.PathLike) -> list[Path]:
    """Resolve a parquet file, a directory (``*.parquet``, non-recursive) or a glob."""
    spec = os.path.expanduser(os.fspath(path))
    if any(ch in spec for ch in "*?["):
        files = sorted(Path(m) for m in glob.glob(spec) if os.path.isfile(m))
    elif os.path.isdir(spec):
        files = sorted(p for p in Path(spec).glob("*.parquet") if p.is_file())
    elif os.path.isfile(spec):
        files = [Path(spec)]
    else:
        raise FileNotFoundError(f"Pick-a-Pic path not found: {spec!r}")
    if not files:
        raise ValueError(f"no parquet files match {spec!r}")
    return files


def read_pickapic_captions(path: str | os.PathLike) -> list[str | None]:
    """Raw ``caption`` values of Pick-a-Pic parquet shard(s); nulls stay ``None``.

    Only the ``caption`` column is read, the image byte columns never are.
    """
    captions: list[str | None] = []
    for f in _parquet_files(path):
        try:
            schema = pq.read_schema(f)
        except (pa.ArrowException, OSError) as exc:
            raise ValueError(f"{str(f)!r} is not a readable parquet file: {exc}") from exc
        if "caption" not in schema.names:
            raise ValueError(f"{str(f)!r} has no 'caption' column (columns: {schema.names})")
        ctype = schema.field("caption").type
        # dictionary<string> (pandas categoricals) holds strings too: decoded on read
        value_type = ctype.value_type if pa.types.is_dictionary(ctype) else ctype
        if not (pa.types.is_string(value_type) or pa.types.is_large_string(value_type)):
            raise ValueError(f"{str(f)!r}: 'caption' column must be string, got {ctype}")
        try:
            column = pq.read_table(f, columns=["caption"]).column("caption")
        except (pa.ArrowException, OSError) as exc:  # e.g. "Corrupt snappy compressed data." (no file named)
            raise ValueError(f"{str(f)!r}: cannot read the 'caption' column: {exc}") from exc
        if pa.types.is_dictionary(column.type):
            column = column.cast(value_type)
        captions.extend(column.to_pylist())
    return captions


def read_text_prompts(path: str | os.PathLike) -> list[str]:
    """Raw lines of a UTF-8 text file (one prompt per line, BOM tolerated)."""
    p = _existing_file(path)
    try:
        text = p.read_bytes().decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        raise ValueError(f"{str(p)!r} is not valid UTF-8: {exc}") from exc
    lines = text.replace("\r\n", "\n").replace("\r", "\n").split("\n")
    if lines and lines[-1] == "":
        lines.pop()  # trailing newline does not start another prompt
    return lines


def digit_prompts() -> list[str]:
    """The 20 fixed prompts of the embedded digit model, two per digit 0..9."""
    prompts: list[str] = []
    for d, word in enumerate(DIGIT_WORDS):
        prompts += [f"a handwritten {word}", f"a handwritten digit {d}"]
    return prompts


def load_prompt_source(kind: str, path: str | os.PathLike | None, *, dedup: bool = True,
                       max_chars: int = 300) -> tuple[list[str], PromptStats]:
    """Read and normalise prompts of ``kind`` (one of :data:`PROMPT_KINDS`).

    ``path`` is ignored for ``digits`` and ``composed_digits`` and required otherwise.
    """
    if kind not in PROMPT_KINDS:
        raise ValueError(f"unknown prompt source kind {kind!r}; valid kinds: {', '.join(PROMPT_KINDS)}")
    if kind == "digits":
        raw: list[str | None] = list(digit_prompts())
    elif kind == "composed_digits":
        raw = all_prompts()
    else:
        if path is None:
            raise ValueError(f"prompt source kind {kind!r} needs a path")
        readers = {"coco": read_coco_captions, "pickapic": read_pickapic_captions,
                   "text": read_text_prompts}
        raw = list(readers[kind](path))
    return normalize_prompts(raw, dedup=dedup, max_chars=max_chars)

"""On-disk shard contract of the teacher-target cache.

One sample = one WebDataset key (``000000012``) with exactly one ``.json`` member
(metadata, ``json.dumps(meta, sort_keys=True)``) and one or more ``<name>.npy``
members (``000000012.target.npy`` -> ``arrays["target"]``).  No pickle anywhere:
readers refuse every other member and load npy with ``allow_pickle=False``.
Shards are written atomically (temp file + fsync + ``os.replace``; on an object store a
local temp file and one PUT: ``storage/``) and byte-deterministically;
``manifest.parquet`` records name/count/size/sha256.

A scored cache (``noiserefine/scoring``) stores each sample's quality score as the float ``score`` of
its ``.json``; its manifest row then also holds the shard's scores in sample order (column ``scores``)
and their min/mean/max (``score_min``, ``score_mean``, ``score_max``: for reading, recomputed on write).
An unscored cache has none of these columns, exactly as before scores existed.
"""

from __future__ import annotations

import hashlib
import io
import json
import math
import os
import re
import tarfile
import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Iterator

import numpy as np

from .hashing import file_sha256
from .storage import Location, location, store_for

MANIFEST_NAME = "manifest.parquet"
MANIFEST_COLUMNS = ("name", "num_samples", "num_bytes", "sha256")
SCORE_COLUMNS = ("scores", "score_min", "score_mean", "score_max")  # only in the manifest of a scored cache
_KEY_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_-]*$")
# webdataset lower-cases extensions and TarWriter drops names starting with "_".
_ARRAY_RE = re.compile(r"^[a-z0-9][a-z0-9_-]*$")
_RAW_META = {"__key__", "__url__", "__local_path__"}
_TAR_KW = dict(user="noiserefine", group="noiserefine", mode=0o444, mtime=0, compress=False, encoder=False)


_SHARD_NAME_RE = re.compile(r"^shard-(\d{6,})(?:-n(\d+))?\.tar$")


def shard_name(index: int, num_samples: int | None = None) -> str:
    """``shard-000003.tar``, or ``shard-000003-n8.tar`` for a shard named by its sample count.

    A partial (last) shard carries its count, so a shard grown by a larger
    ``data.num_samples`` gets a new name and a recorded file is never rewritten.
    """
    if index < 0:
        raise ValueError(f"shard index must be >= 0, got {index}")
    if num_samples is None:
        return f"shard-{index:06d}.tar"
    if num_samples < 1:
        raise ValueError(f"a shard holds at least one sample, got {num_samples}")
    return f"shard-{index:06d}-n{num_samples}.tar"


def planned_shard_name(index: int, num_samples: int, shard_size: int) -> str:
    """The file name of shard ``index`` holding ``num_samples`` of ``shard_size``: the count only if partial."""
    return shard_name(index, None if num_samples == shard_size else num_samples)


def parse_shard_name(name: str) -> tuple[int, int | None] | None:
    """``(index, count or None)`` of a name made by :func:`shard_name`; None for any other name."""
    match = _SHARD_NAME_RE.match(name)
    if match is None:
        return None
    return int(match.group(1)), None if match.group(2) is None else int(match.group(2))


def sample_key(sample_id: int) -> str:
    if sample_id < 0:
        raise ValueError(f"sample_id must be >= 0, got {sample_id}")
    return f"{sample_id:09d}"


@dataclass(frozen=True, eq=False)  # eq=False: dicts of arrays have no truth-valued ==
class ShardSample:
    key: str
    meta: dict
    arrays: dict[str, np.ndarray]


@dataclass(frozen=True)
class ShardInfo:
    """A manifest row; ``scores``: each sample's quality score in shard order (a scored cache), else None."""

    name: str
    num_samples: int
    num_bytes: int
    sha256: str
    scores: tuple[float, ...] | None = None

    def __post_init__(self):
        if self.scores is not None:  # a list from JSON (a checkpoint's rows) or parquet: a hashable tuple
            object.__setattr__(self, "scores", tuple(float(s) for s in self.scores))

    def to_dict(self) -> dict:
        """JSON-able; without ``scores`` when unscored (so such rows are recorded exactly as before scores)."""
        row = dataclasses.asdict(self)
        return {k: row[k] for k in MANIFEST_COLUMNS} if self.scores is None else {**row, "scores": list(self.scores)}


def sample_scores(metas: list[dict], where) -> tuple[float, ...] | None:
    """The ``score`` of every sample's metadata, in order; None if no sample has one. ``ValueError`` naming
    ``where`` if only some have one, or one is not a finite number."""
    have = ["score" in meta for meta in metas]
    if not any(have):
        return None
    if not all(have):
        raise ValueError(f"{where}: {have.count(False)} of {len(metas)} samples have no score (a shard is scored "
                         "whole or not at all)")
    for meta in metas:
        score = meta["score"]
        if isinstance(score, bool) or not isinstance(score, (int, float)) or not math.isfinite(score):
            raise ValueError(f"{where}: sample {meta.get('sample_id')!r} has score {score!r}, not a finite number")
    return tuple(float(meta["score"]) for meta in metas)


def _check_key(key: object) -> str:
    if not isinstance(key, str) or "." in key or not _KEY_RE.match(key):
        raise ValueError(f"invalid sample key {key!r}: must be [A-Za-z0-9_-]+ without dots")
    return key


def _check_plain_name(name: object) -> str:
    """A manifest/shard name must be a plain file name that cannot leave its directory."""
    if (not isinstance(name, str) or not name or ".." in name or any(c in name for c in "/\\\0")
            or os.path.isabs(name) or os.path.basename(name) != name or name == "."):
        raise ValueError(f"invalid shard name {name!r}: must be a plain file name")
    return name


def _encode_sample(s: ShardSample) -> dict:
    if not isinstance(s, ShardSample):
        raise TypeError(f"expected ShardSample, got {type(s).__name__}")
    _check_key(s.key)
    if not isinstance(s.meta, dict):
        raise ValueError(f"{s.key}: meta must be a dict")
    if not s.arrays:
        raise ValueError(f"{s.key}: a sample needs at least one array")
    out = {"__key__": s.key, "json": json.dumps(s.meta, sort_keys=True).encode("utf-8")}
    for name, arr in s.arrays.items():
        if not isinstance(name, str) or "." in name or not _ARRAY_RE.match(name):
            raise ValueError(f"{s.key}: invalid array name {name!r}: must be [a-z0-9_-]+ without dots")
        if not isinstance(arr, np.ndarray):
            raise ValueError(f"{s.key}.{name}: expected np.ndarray, got {type(arr).__name__}")
        buf = io.BytesIO()
        np.save(buf, arr, allow_pickle=False)  # refuses object arrays
        out[f"{name}.npy"] = buf.getvalue()
    return out  # TarWriter writes members in sorted-extension order: fixed


def write_shard(path: str | Path | Location, samples: Iterable[ShardSample]) -> ShardInfo:
    """Atomically write ``samples`` (in the given order) to the tar ``path`` (a local path or ``s3://``);
    deterministic bytes. The shard appears only once complete."""
    import webdataset as wds

    path = location(path)
    seen: set[str] = set()
    metas: list[dict] = []
    # exclusive: a recorded shard is never rewritten, not even with its own bytes by a job that lost its lease
    with store_for(path.parent).publish(path.name, exclusive=True) as tmp:
        with open(tmp, "wb") as f:
            writer = wds.TarWriter(f, **_TAR_KW)
            try:
                for s in samples:
                    record = _encode_sample(s)
                    if s.key in seen:
                        raise ValueError(f"duplicate sample key {s.key!r} in {path}")
                    seen.add(s.key)
                    metas.append(s.meta)
                    writer.write(record)
            finally:
                writer.close()  # on error too, so tarfile never writes to a closed file later
        info = ShardInfo(path.name, len(seen), tmp.stat().st_size, file_sha256(tmp), sample_scores(metas, path))
    return info


def decode_sample(sample: dict, *, source: str = "") -> dict:
    """Decode a raw webdataset sample dict into ``{"key", "meta", "arrays"}``; pickle-free."""
    where = source or sample.get("__url__") or sample.get("__local_path__") or "<unknown shard>"
    key = sample.get("__key__")
    meta, arrays = None, {}
    for ext, data in sample.items():
        if ext in _RAW_META:
            continue
        member = f"{key}.{ext}"
        if ext != "json" and not (ext.endswith(".npy") and _ARRAY_RE.match(ext[:-4])):
            raise ValueError(f"{where}: refusing member {member!r}: only .json and <name>.npy are allowed")
        try:
            if ext == "json":
                meta = json.loads(bytes(data).decode("utf-8"))
                if not isinstance(meta, dict):
                    raise ValueError("metadata is not a JSON object")
            else:
                arrays[ext[:-4]] = np.load(io.BytesIO(bytes(data)), allow_pickle=False)
        except Exception as e:
            raise ValueError(f"{where}: cannot decode member {member!r}: {e}") from e
    if meta is None or not arrays:
        raise ValueError(f"{where}: sample {key!r} needs one .json and at least one .npy member")
    return {"key": key, "meta": meta, "arrays": arrays}


class ShardFormatError(ValueError):
    """The bytes are not a complete plain tar (truncated, corrupt header): damage, not content."""


_COMPRESSED = {b"\x1f\x8b": "gzip", b"BZh": "bzip2", b"\xfd7zXZ\x00": "xz", b"\x28\xb5\x2f\xfd": "zstd",
               b"\x04\x22\x4d\x18": "lz4"}
_PLAIN_TYPES = (tarfile.REGTYPE, tarfile.AREGTYPE)  # not CONTTYPE/GNUTYPE_SPARSE: "regular" to tarfile only


def _check_member_name(name: str, source: str) -> tuple[str, str]:
    """``<key>.json`` or ``<key>.<array>.npy`` (extension case-insensitive, as webdataset): key and extension."""
    key, dot, ext = name.partition(".")
    if not dot or not ext or not _KEY_RE.match(key):
        raise ValueError(f"{source}: refusing member {name!r}: expected <key>.<ext> with a plain key")
    ext = ext.lower()
    if ext != "json" and not (ext.endswith(".npy") and _ARRAY_RE.match(ext[:-4])):
        raise ValueError(f"{source}: refusing member {name!r}: only .json and <name>.npy are allowed")
    return key, ext


def _iter_raw(data: bytes, source: str) -> Iterator[dict]:
    """The one tar parser: group the members of one shard (held in memory) into raw sample dicts.

    Refuses what the writer never writes: compressed tars, members that are not plain
    regular files (links, devices, directories, FIFOs, contiguous or sparse files),
    names that are not ``<key>.json`` / ``<key>.<array>.npy`` with a valid key (no ``/``,
    no leading ``_`` or ``.``, no ``__key__``-like extension), a key that appears again
    after another key, a repeated member, members whose declared size runs past the end,
    and anything but zeros after the end-of-archive marker. Damage (truncation, corrupt
    headers) raises :class:`ShardFormatError`; refused content raises plain ``ValueError``.
    """
    for magic, kind in _COMPRESSED.items():
        if data.startswith(magic):
            raise ValueError(f"{source}: refusing a compressed ({kind}) tar: shards are plain tars")
    seen, current = set(), None
    try:
        with tarfile.open(fileobj=io.BytesIO(data), mode="r:") as tar:
            for member in tar:
                if member.type not in _PLAIN_TYPES or member.sparse is not None:
                    raise ValueError(f"{source}: refusing non-regular member {member.name!r} "
                                     f"(tar type {member.type!r}{', sparse' if member.sparse is not None else ''})")
                key, ext = _check_member_name(member.name, source)
                if member.offset_data + member.size > len(data):
                    raise ShardFormatError(f"{source}: member {member.name!r} declares {member.size} bytes, "
                                           "past the end of the shard (truncated or corrupt)")
                if current is None or current["__key__"] != key:
                    if current is not None:
                        yield current
                    if key in seen:
                        raise ValueError(f"{source}: key {key!r} appears twice")
                    seen.add(key)
                    current = {"__key__": key, "__url__": source}
                if ext in current:
                    raise ValueError(f"{source}: duplicate member {member.name!r}")
                current[ext] = tar.extractfile(member).read()
            end = tar.offset
    except (tarfile.TarError, EOFError) as error:
        raise ShardFormatError(f"{source}: corrupt or truncated shard: {error}") from None
    # tarfile silently stops at a missing header: demand the 1024-byte zero end marker.
    if data[end:end + 1024] != bytes(1024):
        raise ShardFormatError(f"{source}: truncated shard (missing end-of-archive marker)")
    # the writer pads with zeros only; anything else (an appended archive) is invisible to tarfile
    if data[end + 1024:].strip(b"\0"):
        raise ValueError(f"{source}: refusing {len(data) - end - 1024} bytes after the end-of-archive marker "
                         "that are not zero padding")
    if current is not None:
        yield current


def iter_samples(data: bytes, source: str) -> Iterator[ShardSample]:
    """The decoded samples of one shard's bytes (pickle-free; see :func:`decode_sample`)."""
    for raw in _iter_raw(data, source):
        decoded = decode_sample(raw, source=source)
        yield ShardSample(decoded["key"], decoded["meta"], decoded["arrays"])


def read_shard(path) -> Iterator[ShardSample]:
    """Iterate the samples of the shard ``path`` (a local path or ``s3://``)."""
    path = location(path)
    return iter_samples(store_for(path.parent).read_bytes(path.name), str(path))


def shard_info(path) -> ShardInfo:
    """Count (distinct keys), size and sha256 of an existing shard (parsed and decoded whole)."""
    path = location(path)
    data = store_for(path.parent).read_bytes(path.name)
    metas = [sample.meta for sample in iter_samples(data, str(path))]
    return ShardInfo(path.name, len(metas), len(data), hashlib.sha256(data).hexdigest(), sample_scores(metas, path))


def verify_shard(cache_dir, info: ShardInfo) -> bool:
    store = store_for(cache_dir)
    name = _check_plain_name(info.name)
    if store.size(name) != info.num_bytes:
        return False
    return hashlib.sha256(store.read_bytes(name)).hexdigest() == info.sha256


def manifest_bytes(infos: list[ShardInfo]) -> bytes:
    """``manifest.parquet``'s bytes for ``infos`` (rows sorted by name)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    rows = sorted(infos, key=lambda i: _check_plain_name(i.name))
    names = [i.name for i in rows]
    if len(set(names)) != len(names):
        raise ValueError("duplicate shard names in manifest")
    fields = [("name", pa.string()), ("num_samples", pa.int64()), ("num_bytes", pa.int64()), ("sha256", pa.string())]
    records = [{k: v for k, v in dataclasses.asdict(i).items() if k != "scores"} for i in rows]
    if any(i.scores is not None for i in rows):  # a scored cache; an unscored one keeps the four columns
        fields += [("scores", pa.list_(pa.float64()))] + [(c, pa.float64()) for c in SCORE_COLUMNS[1:]]
        for record, info in zip(records, rows):
            scores = list(info.scores) if info.scores is not None else None
            record.update(scores=scores, score_min=min(scores) if scores else None,
                          score_mean=math.fsum(scores) / len(scores) if scores else None,
                          score_max=max(scores) if scores else None)
    table = pa.Table.from_pylist(records, schema=pa.schema(fields))
    sink = pa.BufferOutputStream()
    pq.write_table(table, sink)
    return sink.getvalue().to_pybytes()


def write_manifest(cache_dir, infos: list[ShardInfo]) -> Location:
    """Atomically write ``manifest.parquet`` (rows sorted by name)."""
    data = manifest_bytes(infos)
    store_for(cache_dir).write_bytes(MANIFEST_NAME, data)
    return location(cache_dir) / MANIFEST_NAME


def parse_manifest(data: bytes | None, where) -> dict[str, ShardInfo]:
    """{name: ShardInfo} of a manifest's bytes; {} for None (no manifest)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    if data is None:
        return {}
    try:
        table = pq.read_table(pa.BufferReader(data))
    except (pa.ArrowException, OSError) as e:
        raise ValueError(f"{where}: unreadable manifest: {e}") from e
    missing = [c for c in MANIFEST_COLUMNS if c not in table.column_names]
    if missing:
        raise ValueError(f"{where}: manifest is missing columns {missing}")
    columns = list(MANIFEST_COLUMNS) + (["scores"] if "scores" in table.column_names else [])
    out: dict[str, ShardInfo] = {}
    for r in table.select(columns).to_pylist():
        name = _check_plain_name(r["name"])
        if name in out:
            raise ValueError(f"{where}: duplicate shard name {name!r}")
        scores = r.get("scores")
        if scores is not None and (len(scores) != int(r["num_samples"]) or not all(
                s is not None and math.isfinite(s) for s in scores)):
            raise ValueError(f"{where}: row {name!r} has {len(scores)} scores for {r['num_samples']} samples, or "
                             "a missing or non-finite one")
        out[name] = ShardInfo(name, int(r["num_samples"]), int(r["num_bytes"]), str(r["sha256"]), scores)
    return out


def read_manifest(cache_dir) -> dict[str, ShardInfo]:
    """Read ``manifest.parquet`` into {name: ShardInfo}; {} if it does not exist."""
    store = store_for(cache_dir)
    # one read of the whole file: pq.read_table(path) may open the file more than once, and a manifest
    # replaced by rename in between gives a torn read ("Page was smaller than expected")
    try:
        data = store.read_bytes(MANIFEST_NAME)
    except FileNotFoundError:
        data = None
    return parse_manifest(data, store.path(MANIFEST_NAME))

"""The teacher cache as an infinite, deterministic, resumable batch stream per rank, in one GLOBAL order.

Order: one global sequence of sample positions, independent of the number of ranks
(``order.py``); rank ``r`` of ``W`` takes its contiguous slice of every global batch.

State: the stream owns where it stands and what it trains on: its ``state_dict()`` holds the
position (global batches consumed), this rank's corrupt-sample counter and the manifest rows of
its shards; ``load_state_dict()`` continues exactly there, on exactly those rows, refusing (by
name) any shard that is gone or changed. The stream then starts at that batch's first shard
(earlier shards are not read again). :class:`BatchStream` is the interface the loop and the
checkpointer rely on.

I/O: a rank reads (whole) every shard holding at least one position of its slices, and no
other; DataLoader worker ``w`` of ``n`` reads shards ``w, w+n, ...`` of that list and the
batches are assembled in order in the rank's process. With slices shorter than a shard each
rank reads every shard (``W`` x the bytes of a per-rank split; see docs/scale.md). What is
checked while reading, and what damage does: ``reader.py``.

Filter: with ``min_score`` (``data.min_score``) only the samples whose score (the manifest row's
``scores``, written by the teacher job's scorer) is at least ``min_score`` are trained on; the order
is that of the kept samples alone (``order.py``), so the threshold changes without regenerating
anything and resume stays exact and elastic. The threshold is part of the stream's state.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import Protocol

import torch

from ..shards import ShardInfo
from ..storage import Location, location
from ..targets.cache import open_cache
from ..targets.identity import teacher_key
from .order import GlobalOrder, per_rank_batch
from .reader import ReadItem, ShardPart, ShardParts, ShardReader, SkipEvent, collate, empty_batch


@dataclass(frozen=True)
class DataPosition:
    """Where the global stream stands: ``batches`` global batches consumed (the same on every rank)."""

    batches: int = 0

    def to_dict(self) -> dict:
        return {"batches": self.batches}

    @classmethod
    def from_dict(cls, state: dict) -> "DataPosition":
        if "epoch" in state:
            raise ValueError(f"data position {state} is of the per-rank stream of older trainers (epoch, batches "
                             "per rank), not a position in the global order; finish that run with the version "
                             "that wrote it, or train in a new train.output_dir")
        batches = int(state["batches"])
        if batches < 0:
            raise ValueError(f"invalid data position {state}")
        return cls(batches)


class BatchStream(Protocol):
    """One rank's infinite, deterministic batch stream: what the loop reads and the checkpointer saves.

    ``TeacherStream`` (one cache) and ``MixtureStream`` (several caches in declared shares, composed of
    ``TeacherStream``s; ``MultiScaleStream``, one cache per guidance scale, is its special case) implement
    it: global batch ``b`` comes from a component chosen by a rule of ``b`` alone (so every sub-stream's
    position follows from ``b``: exact and elastic resume), ``shard_rows`` keyed by component.

    - ``batches(start)``: this rank's batches from global batch ``start.batches`` on; each a dict of
      ``sample_id``, ``seed``, ``prompt`` (lists), ``noise``, ``target`` (tensors), ``epoch``,
      ``index`` (the global batch); a mixture's also ``component`` and ``teacher_key`` (lists) and, where
      samples are conditioned on it, ``guidance_scale``.
    - ``position`` (a :class:`DataPosition`), ``batch_size`` (per rank), ``samples_per_epoch``,
      ``corrupt_skipped`` (this rank's), ``latent_shape`` (settable: the backend's, every target
      must have it), ``describe()`` (one line for the log).
    - ``state_dict()``: JSON-able; ``batches`` (the same on every rank), ``corrupt_skipped`` (this
      rank's) and ``shard_rows`` (what it trains on).
    - ``load_state_dict(state)``: continue at ``state``, on exactly its ``shard_rows`` (``ValueError``
      naming any shard that is gone or changed); returns the position.
    - ``elastic_state(states, rank)``: this rank's state from the states of all ranks of a run on
      another number of ranks (see :func:`elastic_state`).
    """

    position: DataPosition
    batch_size: int
    latent_shape: tuple[int, ...] | None

    @property
    def samples_per_epoch(self) -> int: ...

    @property
    def corrupt_skipped(self) -> int: ...

    def batches(self, start: DataPosition | None = None) -> Iterator[dict]: ...

    def describe(self) -> str: ...

    def state_dict(self) -> dict: ...

    def load_state_dict(self, state: dict) -> DataPosition: ...

    def elastic_state(self, states: list[dict], rank: int) -> dict: ...


def elastic_state(states: list[dict], rank: int) -> dict:
    """A stream's state for ``rank`` from those of every rank of a run on another number of ranks: the
    position and the shard rows are the same on all of them; the corrupt-sample counters go to rank 0
    (only their sum is logged)."""
    state = {key: value for key, value in states[0].items() if key != "corrupt_skipped"}
    if rank == 0:
        state["corrupt_skipped"] = sum(int(s.get("corrupt_skipped", 0)) for s in states)
    return state


# ``opener(None)``: a cache and the rows a fresh run trains on; ``opener(rows)``: the same cache on exactly
# ``rows``, each checked to be still there, unchanged (``targets.cache.open_cache`` with a config bound)
CacheOpener = Callable[[list[ShardInfo] | None], tuple[Location, dict[str, ShardInfo]]]


@dataclass(frozen=True)
class _Rows:
    """The shards a stream trains on: the cache, their manifest rows (in training order) and their order."""

    cache_dir: Location
    manifest: dict[str, ShardInfo]
    order: GlobalOrder


class TeacherStream:
    """The infinite, deterministic batch stream of one rank over one cache (see the module docstring)."""

    def __init__(self, cache_dir: str | Location | None, manifest: dict[str, ShardInfo] | None, *,
                 teacher_key: str, seed: int, rank: int, world_size: int, global_batch_size: int,
                 num_workers: int = 0, skip_corrupt: bool = False, shards: list[str] | None = None,
                 latent_shape: tuple[int, ...] | None = None, opener: CacheOpener | None = None,
                 min_score: float | None = None):
        """``latent_shape``: the backend's (every target must have it; None: the first target's).
        ``min_score``: train only on samples scored at least this (None: on all).

        ``manifest`` None: the cache is opened when first needed, by ``opener(None)``, unless
        :meth:`load_state_dict` opens it first on the rows a checkpoint recorded (``opener(rows)``).
        Without ``opener`` recorded rows are checked against ``manifest``.
        """
        if num_workers < 0:
            raise ValueError(f"num_workers must be >= 0, got {num_workers}")
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} outside world size {world_size}")
        if manifest is None and opener is None:
            raise ValueError("a TeacherStream needs a manifest or an opener of its cache")
        self.teacher_key = teacher_key
        self.seed, self.rank, self.world_size = int(seed), int(rank), int(world_size)
        self.global_batch_size = int(global_batch_size)
        self.batch_size = per_rank_batch(self.global_batch_size, self.world_size)
        self.num_workers = int(num_workers)
        self.skip_corrupt = bool(skip_corrupt)
        self.latent_shape = tuple(latent_shape) if latent_shape is not None else None
        self.position = DataPosition()
        self.corrupt_skipped = 0
        self.skip_events: list[SkipEvent] = []
        self._opener = opener
        self.min_score = None if min_score is None else float(min_score)
        self._rows: _Rows | None = None
        if manifest is not None:
            self._use(cache_dir, manifest, shards)

    @classmethod
    def from_config(cls, cfg, rank: int = 0, world_size: int = 1, *, shards: list[str] | None = None,
                    cache: tuple[Location, dict[str, ShardInfo]] | None = None,
                    latent_shape: tuple[int, ...] | None = None, opener: CacheOpener | None = None
                    ) -> "TeacherStream":
        """The stream of ``cfg``'s cache, opened by ``opener`` (default: ``open_cache(cfg, rows)``): now with
        ``cache`` or ``shards`` (a subset of the cache's rows), else when first needed."""
        opener = opener or (lambda rows: open_cache(cfg, rows=rows))
        if cache is None and shards is not None:
            cache = opener(None)
        cache_dir, manifest = cache if cache is not None else (None, None)
        return cls(cache_dir, manifest, teacher_key=teacher_key(cfg), seed=cfg.train.seed, rank=rank,
                   world_size=world_size, global_batch_size=cfg.train.global_batch_size,
                   num_workers=cfg.train.num_loader_workers, skip_corrupt=cfg.train.skip_corrupt_shards,
                   shards=shards, latent_shape=latent_shape, opener=opener, min_score=cfg.data.min_score)

    def _use(self, cache_dir, manifest: dict[str, ShardInfo], shards: list[str] | None) -> None:
        cache_dir = location(cache_dir)
        names = sorted(manifest) if shards is None else list(shards)
        unknown = [name for name in names if name not in manifest]
        if unknown:
            raise ValueError(f"shards {unknown} are not in the manifest of {cache_dir}")
        rows = {name: manifest[name] for name in names}
        order = GlobalOrder(names, {n: row.num_samples for n, row in rows.items()}, self.seed, self.global_batch_size,
                            kept=self._kept(cache_dir, rows))
        self._rows = _Rows(cache_dir, rows, order)

    def _kept(self, cache_dir, rows: dict[str, ShardInfo]) -> dict[str, tuple[int, ...]] | None:
        """Each shard's rows scored at least ``min_score`` (None without a threshold)."""
        if self.min_score is None:
            return None
        unscored = [name for name, row in rows.items() if row.scores is None]
        if unscored:
            raise ValueError(f"data.min_score={self.min_score:g} but teacher cache {cache_dir} is not scored "
                             f"({len(unscored)} of its {len(rows)} shards have no scores, e.g. {unscored[0]}): "
                             "generate it with a scorer (scorer.kind, scorer.path) or unset data.min_score")
        kept = {name: tuple(i for i, score in enumerate(row.scores) if score >= self.min_score)
                for name, row in rows.items()}
        if not any(kept.values()):
            scores = [score for row in rows.values() for score in row.scores]
            raise ValueError(f"data.min_score={self.min_score:g} keeps none of the {len(scores)} samples of teacher "
                             f"cache {cache_dir} (its highest score is {max(scores, default=math.nan):g}); lower "
                             "data.min_score")
        return kept

    def _opened(self) -> _Rows:
        if self._rows is None:  # a fresh run: the cache's rows now (a resumed run's come from load_state_dict)
            self._use(*self._opener(None), None)
        return self._rows

    cache_dir = property(lambda self: self._opened().cache_dir)
    manifest = property(lambda self: self._opened().manifest, doc="The rows it trains on, by name, in its order.")
    order = property(lambda self: self._opened().order)
    shard_names = property(lambda self: list(self._opened().manifest))

    @property
    def samples_per_epoch(self) -> int:
        """Samples of all ranks in one epoch (from the manifest)."""
        return self.order.samples_per_epoch

    def shard_rows(self) -> list[ShardInfo]:
        """The manifest rows this stream trains on, in its order (recorded in checkpoints)."""
        return list(self.manifest.values())

    def describe(self) -> str:
        kept = "" if self.min_score is None else (f" (scored >= {self.min_score:g}: of "
                                                  f"{sum(r.num_samples for r in self.manifest.values())})")
        return (f"teacher cache {self.cache_dir}: {len(self.manifest)} shards, {self.samples_per_epoch} samples/epoch"
                + kept)

    def epoch_shards(self, epoch: int) -> list[str]:
        """The shards this rank reads in ``epoch`` (those holding a position of its slices), in order."""
        return [span.name for span in self.order.epoch_spans(epoch)
                if self.order.wanted(span, self.rank, self.world_size, span.start)]

    def _reader(self) -> ShardReader:
        return ShardReader(self.cache_dir, self.manifest, self.teacher_key, self.skip_corrupt, self.latent_shape)

    def _parts(self, items: list[ReadItem]) -> Iterable[ShardPart]:
        dataset = ShardParts(self._reader(), items)
        if self.num_workers == 0 or not items:
            return dataset
        return torch.utils.data.DataLoader(dataset, batch_size=None, num_workers=min(self.num_workers, len(items)),
                                           persistent_workers=False)

    def batches(self, start: DataPosition | None = None) -> Iterator[dict]:
        """The infinite stream of this rank's batches from global batch ``start.batches`` on.

        Each batch has ``index`` (the global batch), ``epoch`` (of its first position) and the
        collated samples (see :func:`collate`).
        """
        start = start or DataPosition()
        self.position = start
        order, batch = self.order, start.batches
        lo, hi = order.rank_slice(batch, self.rank, self.world_size)
        first = batch * order.global_batch_size
        epoch = order.epoch_of(first)
        pending: list[dict] = []
        while True:
            spans = [span for span in order.epoch_spans(epoch) if span.start + span.count > first]
            wanted = [order.wanted(span, self.rank, self.world_size, first) for span in spans]
            parts = iter(self._parts([ReadItem(span.name, span.start, tuple(indices), order.rows(span.name, indices))
                                      for span, indices in zip(spans, wanted) if indices]))
            for span, indices in zip(spans, wanted):
                if indices:
                    part = next(parts)
                    if part.skip is not None:
                        self.skip_events.append(part.skip)
                        self.corrupt_skipped += part.skip.num_samples
                    for position, sample in part.samples:
                        while position >= hi:  # a later slice: the current one is complete (or lost)
                            yield self._emit(pending, batch, lo)
                            pending = []
                            batch += 1
                            lo, hi = order.rank_slice(batch, self.rank, self.world_size)
                        pending.append(sample)
                while span.start + span.count >= hi:  # every position of the slice has been passed
                    yield self._emit(pending, batch, lo)
                    pending = []
                    batch += 1
                    lo, hi = order.rank_slice(batch, self.rank, self.world_size)
            epoch += 1
            first = epoch * order.samples_per_epoch

    def _emit(self, pending: list[dict], batch: int, lo: int) -> dict:
        # a slice lost entirely to damaged shards (train.skip_corrupt_shards) is an empty batch: the rank still
        # takes part in the step (a zero-gradient contribution), so no collective waits for it
        out = collate(pending) if pending else empty_batch(self.latent_shape)
        out["epoch"], out["index"] = self.order.epoch_of(lo), batch
        self.position = DataPosition(batch + 1)
        return out

    def epoch_batches(self, epoch: int) -> Iterator[dict]:
        """This rank's batches whose first position lies in ``epoch`` (a finite slice of :meth:`batches`)."""
        size, n = self.order.global_batch_size, self.order.samples_per_epoch
        first, stop = -(-epoch * n // size), -(-(epoch + 1) * n // size)
        stream = self.batches(DataPosition(first))
        for _ in range(first, stop):
            yield next(stream)

    def __iter__(self) -> Iterator[dict]:
        return self.batches()

    def state_dict(self) -> dict:
        """Position, this rank's corrupt-sample counter and the shard rows it trains on (JSON-able)."""
        threshold = {} if self.min_score is None else {"min_score": self.min_score}  # unfiltered: as before
        return {**self.position.to_dict(), "corrupt_skipped": self.corrupt_skipped, **threshold,
                "shard_rows": [row.to_dict() for row in self.shard_rows()]}

    def load_state_dict(self, state: dict) -> DataPosition:
        """Continue at ``state``: on exactly its shard rows (each still there, unchanged, else ``ValueError``
        naming it), at its position, with its counter."""
        position = DataPosition.from_dict(state)
        if not isinstance(state.get("shard_rows"), list):
            raise ValueError(f"data state with keys {sorted(state)} records no list of shard_rows (what the run "
                             "trained on); train in a new train.output_dir")
        if state.get("min_score") != self.min_score:
            raise ValueError(f"data state trained with data.min_score={state.get('min_score')}, this run has "
                             f"{self.min_score}: the order of the kept samples would differ; resume with the "
                             "recorded threshold, or train in a new train.output_dir")
        rows = [ShardInfo(**row) for row in state["shard_rows"]]
        if self._opener is not None:
            cache_dir, manifest = self._opener(rows)
        else:
            cache_dir, manifest = self.cache_dir, self.manifest
            changed = [f"{row.name} ({'changed' if row.name in manifest else 'gone'})"
                       for row in rows if manifest.get(row.name) != row]
            if changed:
                raise ValueError(f"shards this run trains on are gone or changed in {cache_dir}: "
                                 f"{', '.join(changed)}; train in a new train.output_dir")
        self._use(cache_dir, manifest, [row.name for row in rows])
        self.corrupt_skipped = int(state.get("corrupt_skipped", 0))
        self.position = position
        return position

    elastic_state = staticmethod(elastic_state)

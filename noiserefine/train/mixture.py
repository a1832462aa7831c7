"""Training on a data mixture: several teacher caches in one deterministic global order, in declared shares.

The components (``noiserefine/mixture.py``: ``data.mixture``, or one per ``data.guidance_scales`` w) each have
their cache, read by their own :class:`~noiserefine.train.stream.TeacherStream` (the run's seed and global
batch size: each component has its own global order of its samples).

Mixing rule (:class:`Schedule`): every global batch comes whole from one component. With integer shares
``s_c`` (total ``T``), global batch ``b`` goes to the component with the largest ``(b + 1) s_c - T taken_c(b)``,
ties to the first listed, where ``taken_c(b)`` counts c's batches among ``0 .. b-1`` (nginx's smooth weighted
round robin). So every window of ``T`` consecutive batches starting at a multiple of ``T`` holds exactly
``s_c`` of component c, every prefix is within one batch of its share, and equal shares give ``b % S`` (the
multi-scale rule). Global batch ``b`` is batch ``taken_c(b)`` of component c's stream: a function of ``b``
alone, so the position in global batches (a :class:`~noiserefine.train.stream.DataPosition`) fixes every
component's position, exactly on resume and for every number of ranks (each rank takes its slice of the
one component batch).

Every sample of a batch carries its component (``component``) and the teacher key its shard recorded
(``teacher_key``, checked by the reader against the component's), and, for a refiner told w
(``refiner.guidance_timestep_slope > 0``), ``guidance_scale`` = its component's ``teacher.guidance_scale``.
The state: the position, the corrupt-sample counter and each component's shard rows, by name (the
multi-scale components are named ``scale_label(w)``: the layout of checkpoint format 4's multi-scale runs).
"""

from __future__ import annotations

import functools
from collections.abc import Iterator

import torch

from ..mixture import Component, components
from ..shards import ShardInfo
from ..storage import Location
from ..targets.cache import cache_dir_for, open_cache
from .stream import DataPosition, TeacherStream, elastic_state


class Schedule:
    """Which component each global batch comes from (see the module docstring), from integer shares."""

    def __init__(self, shares: list[int]):
        if not shares or any(int(s) < 1 for s in shares):
            raise ValueError(f"a mixture schedule needs integer shares >= 1, got {shares}")
        self.shares = [int(s) for s in shares]
        self.period = sum(self.shares)

    def _pick(self, batch: int, taken: list[int]) -> int:
        return max(range(len(self.shares)),
                   key=lambda c: ((batch + 1) * self.shares[c] - self.period * taken[c], -c))

    def taken(self, batch: int) -> list[int]:
        """Each component's batches among global batches ``0 .. batch-1`` (the schedule repeats every period)."""
        periods, rest = divmod(int(batch), self.period)
        within = [0] * len(self.shares)
        for b in range(rest):
            within[self._pick(b, within)] += 1
        return [periods * share + count for share, count in zip(self.shares, within)]

    def components_from(self, start: int) -> Iterator[int]:
        """The component of global batch ``start``, ``start + 1``, ... (infinite)."""
        taken, batch = self.taken(start), int(start)
        while True:
            c = self._pick(batch, taken)
            yield c
            taken[c] += 1
            batch += 1


def open_component_cache(component: Component, rows: list[ShardInfo] | None = None
                         ) -> tuple[Location, dict[str, ShardInfo]]:
    """``open_cache`` of the component's config; errors name the component and the command that makes its cache."""
    try:
        return open_cache(component.cfg, rows=rows)
    except (FileNotFoundError, ValueError) as error:
        kind = FileNotFoundError if isinstance(error, FileNotFoundError) else ValueError
        raise kind(f"component {component.name!r} of data.mixture (`python pipeline/generate_targets.py --config "
                   f"<same config> --component {component.name}` makes or completes its cache): {error}") from None


class MixtureStream:
    """The batch stream of one rank over several component caches (see the module docstring).

    A :class:`~noiserefine.train.stream.BatchStream`, used by the loop exactly as a :class:`TeacherStream`.
    """

    def __init__(self, streams: dict[str, TeacherStream], shares: list[int], scales: list[float] | None = None):
        """``streams``: each component's, by name, in the listed order; ``scales``: each component's w, given to
        every sample as ``guidance_scale`` (None: a refiner not told w)."""
        if not streams:
            raise ValueError("a data mixture needs at least one component")
        if len(shares) != len(streams) or (scales is not None and len(scales) != len(streams)):
            raise ValueError(f"{len(streams)} components, {len(shares)} shares, scales {scales}")
        self.names = list(streams)
        self.streams = list(streams.values())
        self.schedule = Schedule(shares)
        self.scales = None if scales is None else [float(w) for w in scales]
        self.batch_size = self.streams[0].batch_size
        self.position = DataPosition()
        self._skipped_before = 0  # corrupt samples counted before a resume

    @classmethod
    def from_config(cls, cfg, rank: int = 0, world_size: int = 1, *,
                    latent_shape: tuple[int, ...] | None = None) -> "MixtureStream":
        """One stream per component of ``cfg``, each opened when first needed (or by :meth:`load_state_dict` on
        the rows a checkpoint recorded). Two components with one cache are refused."""
        found = components(cfg)
        seen: dict[str, str] = {}
        for component in found:
            where = str(cache_dir_for(component.cfg))
            if where in seen:
                raise ValueError(f"components {seen[where]!r} and {component.name!r} of data.mixture have the same "
                                 f"cache {where} (the same prompts and teacher): list it once, with their weights "
                                 "added")
            seen[where] = component.name
        streams = {c.name: TeacherStream.from_config(c.cfg, rank, world_size, latent_shape=latent_shape,
                                                     opener=functools.partial(open_component_cache, c))
                   for c in found}
        told = float(cfg.refiner.guidance_timestep_slope) > 0
        return cls(streams, [c.share for c in found], [c.scale for c in found] if told else None)

    @property
    def samples_per_epoch(self) -> int:
        return sum(s.samples_per_epoch for s in self.streams)  # over all components

    @property
    def corrupt_skipped(self) -> int:
        return self._skipped_before + sum(s.corrupt_skipped for s in self.streams)

    @property
    def latent_shape(self) -> tuple[int, ...] | None:
        return self.streams[0].latent_shape

    @latent_shape.setter
    def latent_shape(self, shape: tuple[int, ...] | None) -> None:
        for stream in self.streams:
            stream.latent_shape = tuple(shape) if shape is not None else None

    def component_rows(self) -> dict[str, list[ShardInfo]]:
        """Each component's shard rows by name, in its stream's order (recorded in checkpoints)."""
        return {name: s.shard_rows() for name, s in zip(self.names, self.streams)}

    def shard_rows(self) -> dict:
        return self.component_rows()

    def describe(self) -> str:
        parts = "; ".join(f"{name} (share {share}): {s.cache_dir}, {len(s.shard_names)} shards"
                          for name, share, s in zip(self.names, self.schedule.shares, self.streams))
        return f"data mixture of {len(self.streams)} teacher caches: {parts}; {self.samples_per_epoch} samples/epoch"

    def batches(self, start: DataPosition | None = None) -> Iterator[dict]:
        """The infinite stream of this rank's batches from global batch ``start.batches`` on."""
        start = start or DataPosition()
        self.position = start
        taken = self.schedule.taken(start.batches)
        subs = [stream.batches(DataPosition(t)) for stream, t in zip(self.streams, taken)]
        batch = start.batches
        for c in self.schedule.components_from(start.batches):
            out = next(subs[c])
            if out["index"] != taken[c]:  # the rule above, checked
                raise RuntimeError(f"component {self.names[c]!r} at its batch {out['index']}, expected {taken[c]}")
            taken[c] += 1
            count = len(out["sample_id"])
            out["index"] = batch
            out["component"] = [self.names[c]] * count
            out["teacher_key"] = [self.streams[c].teacher_key] * count  # each sample's, checked by the reader
            if self.scales is not None:
                out["guidance_scale"] = torch.full((count,), self.scales[c], dtype=torch.float32)
            self.position = DataPosition(batch + 1)
            yield out
            batch += 1

    def __iter__(self) -> Iterator[dict]:
        return self.batches()

    def state_dict(self) -> dict:
        """The position (global batches: every component's position follows from it), the corrupt-sample counter
        and each component's shard rows by name."""
        return {**self.position.to_dict(), "corrupt_skipped": self.corrupt_skipped,
                "shard_rows": {name: s.state_dict()["shard_rows"] for name, s in zip(self.names, self.streams)}}

    def load_state_dict(self, state: dict) -> DataPosition:
        """Continue at ``state``; each component's stream checks the rows recorded for it (``ValueError`` naming
        the component, or a shard that is gone or changed)."""
        position = DataPosition.from_dict(state)
        rows = state.get("shard_rows")
        if not isinstance(rows, dict):
            raise ValueError(f"data state with keys {sorted(state)} records no shard rows per component of the "
                             "data mixture; train in a new train.output_dir")
        for name, stream, taken in zip(self.names, self.streams, self.schedule.taken(position.batches)):
            if name not in rows:
                raise ValueError(f"the checkpoint records no shards for {self._what(name)} (it has {sorted(rows)}); "
                                 "train in a new train.output_dir")
            stream.load_state_dict({"batches": taken, "shard_rows": rows[name]})
        self._skipped_before = int(state.get("corrupt_skipped", 0))
        self.position = position
        return position

    def _what(self, name: str) -> str:
        return f"component {name!r}"

    elastic_state = staticmethod(elastic_state)

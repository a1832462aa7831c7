"""Training one refiner on several teacher caches, one per guidance scale (``data.guidance_scales``).

Each scale w has its own cache: the cache of the config with ``teacher.guidance_scale = w``
(its own teacher key), generated beforehand by the usual job
(``pipeline/generate_targets.py ... teacher.guidance_scale=w``). Each is read by its own
:class:`~noiserefine.train.stream.TeacherStream` (same seed, same global order of its samples).

Mixing rule: global batch ``b`` is batch ``b // S`` of the stream of scale ``s = b % S``
(``S`` scales, in the listed order), and every sample of it carries ``guidance_scale = w_s``.
So the position in global batches fixes every sub-stream's position (scale ``s`` has
consumed ``ceil((b - s) / S)`` of its batches): :class:`MultiScaleStream`'s position is the
same :class:`~noiserefine.train.stream.DataPosition` as one cache's, exact on resume and the
same for every number of ranks (each rank takes its slice of the one sub-stream batch).
Consecutive global batches ``S k .. S k + S - 1`` hold the same samples (seeds, prompts) at
each scale. Every sub-stream runs its own loader (``train.num_loader_workers`` workers each).
"""

from __future__ import annotations

import functools
from collections.abc import Iterator

import torch
from omegaconf import OmegaConf

from ..shards import ShardInfo
from ..storage import Location
from ..targets.cache import open_cache
from .stream import DataPosition, TeacherStream, elastic_state


def at_guidance_scale(cfg, scale: float):
    """``cfg`` with ``teacher.guidance_scale = scale``: the config whose teacher cache holds that scale's targets."""
    return OmegaConf.merge(cfg, {"teacher": {"guidance_scale": float(scale)}})


def scale_label(scale: float) -> str:
    """The key of scale ``scale`` in a checkpoint (JSON keys are strings)."""
    return repr(float(scale))


def open_scale_cache(cfg, scale: float, rows: list[ShardInfo] | None = None
                     ) -> tuple[Location, dict[str, ShardInfo]]:
    """``open_cache`` of scale ``scale``'s config (``rows``: those a checkpoint recorded for it). Errors name
    the scale's cache and the command that generates it."""
    w = float(scale)
    try:
        return open_cache(at_guidance_scale(cfg, w), rows=rows)
    except (FileNotFoundError, ValueError) as error:
        kind = FileNotFoundError if isinstance(error, FileNotFoundError) else ValueError
        raise kind(f"guidance scale {w:g} of data.guidance_scales (its cache is the one of teacher."
                   f"guidance_scale={w:g}: `python pipeline/generate_targets.py --config <same config> "
                   f"teacher.guidance_scale={w:g}` makes or completes it): {error}") from None


def open_scale_caches(cfg) -> dict[float, tuple[Location, dict[str, ShardInfo]]]:
    """``{w: open_scale_cache(cfg, w)}`` for every ``data.guidance_scales`` w (a fresh run's rows)."""
    return {float(w): open_scale_cache(cfg, w) for w in cfg.data.guidance_scales}


class MultiScaleStream:
    """The batch stream of one rank over several scale caches (see the module docstring).

    A :class:`~noiserefine.train.stream.BatchStream`: used by the loop exactly as a :class:`TeacherStream`;
    each batch has a float32 ``guidance_scale`` tensor (one value per sample) and ``index`` is the global
    batch. Its state: the position, the corrupt-sample counter and each scale's shard rows (by
    ``scale_label``), each scale's checked by its own stream.
    """

    def __init__(self, streams: dict[float, TeacherStream]):
        if not streams:
            raise ValueError("MultiScaleStream needs at least one guidance scale")
        self.scales = [float(w) for w in streams]
        self.streams = list(streams.values())
        self.batch_size = self.streams[0].batch_size
        self.position = DataPosition()
        self._skipped_before = 0  # corrupt samples counted before a resume

    @classmethod
    def from_config(cls, cfg, rank: int = 0, world_size: int = 1,
                    caches: dict[float, tuple[Location, dict]] | None = None, *,
                    latent_shape: tuple[int, ...] | None = None) -> "MultiScaleStream":
        """One stream per ``data.guidance_scales`` w: on ``caches[w]`` if given, else opened when first needed
        (or by :meth:`load_state_dict` on the rows a checkpoint recorded)."""
        scales = list(caches) if caches is not None else [float(w) for w in cfg.data.guidance_scales]
        return cls({w: TeacherStream.from_config(
            at_guidance_scale(cfg, w), rank, world_size, cache=caches[w] if caches is not None else None,
            shards=list(caches[w][1]) if caches is not None else None, latent_shape=latent_shape,
            opener=functools.partial(open_scale_cache, cfg, w)) for w in scales})

    @property
    def samples_per_epoch(self) -> int:
        return sum(s.samples_per_epoch for s in self.streams)  # over all scales

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

    def shard_rows(self) -> dict[float, list[ShardInfo]]:
        """Each scale's shard rows, in its stream's order (recorded in checkpoints)."""
        return {w: s.shard_rows() for w, s in zip(self.scales, self.streams)}

    def describe(self) -> str:
        caches = ", ".join(f"w={w:g}: {s.cache_dir}" for w, s in zip(self.scales, self.streams))
        return (f"teacher cache {caches}: {len(self.streams[0].shard_names)} shards per guidance scale, "
                f"{self.samples_per_epoch} samples/epoch")

    def batches(self, start: DataPosition | None = None) -> Iterator[dict]:
        """The infinite stream of this rank's batches from global batch ``start.batches`` on."""
        start = start or DataPosition()
        self.position = start
        count = len(self.streams)
        subs = [stream.batches(DataPosition(-(-(start.batches - s) // count)))
                for s, stream in enumerate(self.streams)]
        batch = start.batches
        while True:
            s = batch % count
            out = next(subs[s])
            if out["index"] != batch // count:  # the rule above, checked
                raise RuntimeError(f"scale {self.scales[s]:g} stream at batch {out['index']}, expected {batch // count}")
            out["index"] = batch
            out["guidance_scale"] = torch.full((len(out["sample_id"]),), self.scales[s], dtype=torch.float32)
            self.position = DataPosition(batch + 1)
            yield out
            batch += 1

    def __iter__(self) -> Iterator[dict]:
        return self.batches()

    def state_dict(self) -> dict:
        """The position (global batches: every scale's position follows from it), the corrupt-sample counter
        and each scale's shard rows."""
        return {**self.position.to_dict(), "corrupt_skipped": self.corrupt_skipped,
                "shard_rows": {scale_label(w): s.state_dict()["shard_rows"] for w, s in zip(self.scales, self.streams)}}

    def load_state_dict(self, state: dict) -> DataPosition:
        """Continue at ``state``; each scale's stream checks the rows recorded for it (``ValueError`` naming
        the scale, or a shard that is gone or changed)."""
        position = DataPosition.from_dict(state)
        rows = state.get("shard_rows")
        if not isinstance(rows, dict):
            raise ValueError(f"data state with keys {sorted(state)} records no shard rows per guidance scale; "
                             "train in a new train.output_dir")
        count = len(self.streams)
        for s, (w, stream) in enumerate(zip(self.scales, self.streams)):
            if scale_label(w) not in rows:
                raise ValueError(f"the checkpoint records no shards for guidance scale {w:g} (it has "
                                 f"{sorted(float(label) for label in rows)}); train in a new train.output_dir")
            stream.load_state_dict({"batches": -(-(position.batches - s) // count), "shard_rows": rows[scale_label(w)]})
        self._skipped_before = int(state.get("corrupt_skipped", 0))
        self.position = position
        return position

    elastic_state = staticmethod(elastic_state)

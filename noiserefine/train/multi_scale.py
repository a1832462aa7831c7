"""Training one refiner on several teacher caches, one per guidance scale (``data.guidance_scales``).

Each scale w has its own cache: the cache of the config with ``teacher.guidance_scale = w``
(its own teacher key), generated beforehand by the usual job
(``pipeline/generate_targets.py ... teacher.guidance_scale=w``). Each is read by its own
:class:`~noiserefine.train.stream.TeacherStream` (same seed, same global order of its samples).

Mixing rule: global batch ``b`` is batch ``b // S`` of the stream of scale ``s = b % S``
(``S`` scales, in the listed order), and every sample of it carries ``guidance_scale = w_s``.
So the position in global batches fixes every sub-stream's position (scale ``s`` has
consumed ``ceil((b - s) / S)`` of its batches): :class:`MultiScaleStream`'s state is the
same :class:`~noiserefine.train.stream.DataPosition` as one cache's, exact on resume and the
same for every number of ranks (each rank takes its slice of the one sub-stream batch).
Consecutive global batches ``S k .. S k + S - 1`` hold the same samples (seeds, prompts) at
each scale. Every sub-stream runs its own loader (``train.num_loader_workers`` workers each).
"""

from __future__ import annotations

from collections.abc import Iterator

import torch
from omegaconf import OmegaConf

from ..shards import ShardInfo
from ..storage import Location
from ..targets.cache import open_cache
from .stream import DataPosition, TeacherStream


def at_guidance_scale(cfg, scale: float):
    """``cfg`` with ``teacher.guidance_scale = scale``: the config whose teacher cache holds that scale's targets."""
    return OmegaConf.merge(cfg, {"teacher": {"guidance_scale": float(scale)}})


def scale_label(scale: float) -> str:
    """The key of scale ``scale`` in a checkpoint (JSON keys are strings)."""
    return repr(float(scale))


def open_scale_caches(cfg, rows: dict[float, list[ShardInfo]] | None = None
                      ) -> dict[float, tuple[Location, dict[str, ShardInfo]]]:
    """``{w: open_cache(...)}`` for every ``data.guidance_scales`` w (a resumed run: the rows its checkpoint
    recorded for each scale). Errors name the scale's cache and the command that generates it."""
    caches = {}
    for w in cfg.data.guidance_scales:
        w = float(w)
        if rows is not None and w not in rows:
            raise ValueError(f"the checkpoint records no shards for guidance scale {w:g} (it has "
                             f"{sorted(rows)}); train in a new train.output_dir")
        try:
            caches[w] = open_cache(at_guidance_scale(cfg, w), rows=None if rows is None else rows[w])
        except (FileNotFoundError, ValueError) as error:
            kind = FileNotFoundError if isinstance(error, FileNotFoundError) else ValueError
            raise kind(f"guidance scale {w:g} of data.guidance_scales (its cache is the one of teacher."
                       f"guidance_scale={w:g}: `python pipeline/generate_targets.py --config <same config> "
                       f"teacher.guidance_scale={w:g}` makes or completes it): {error}") from None
    return caches


class MultiScaleStream:
    """The batch stream of one rank over several scale caches (see the module docstring).

    Used by the loop exactly as a :class:`TeacherStream`; each batch has a float32 ``guidance_scale``
    tensor (one value per sample) and ``index`` is the global batch.
    """

    def __init__(self, streams: dict[float, TeacherStream]):
        if not streams:
            raise ValueError("MultiScaleStream needs at least one guidance scale")
        self.scales = [float(w) for w in streams]
        self.streams = list(streams.values())
        first = self.streams[0]
        self.batch_size, self.shard_names = first.batch_size, first.shard_names
        self.samples_per_epoch = sum(s.samples_per_epoch for s in self.streams)  # over all scales
        self.position = DataPosition()
        self._skipped_before = 0  # corrupt samples counted before a resume

    @classmethod
    def from_config(cls, cfg, rank: int, world_size: int, caches: dict[float, tuple[Location, dict]], *,
                    latent_shape: tuple[int, ...] | None = None) -> "MultiScaleStream":
        return cls({w: TeacherStream.from_config(at_guidance_scale(cfg, w), rank, world_size, cache=cache,
                                                 shards=list(cache[1]), latent_shape=latent_shape)
                    for w, cache in caches.items()})

    @property
    def corrupt_skipped(self) -> int:
        return self._skipped_before + sum(s.corrupt_skipped for s in self.streams)

    def shard_rows(self) -> dict[float, list[ShardInfo]]:
        """Each scale's shard rows, in its stream's order (recorded in checkpoints)."""
        return {w: [s.manifest[n] for n in s.shard_names] for w, s in zip(self.scales, self.streams)}

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
        """The position (global batches: every scale's position follows from it) and the corrupt-sample counter."""
        return {**self.position.to_dict(), "corrupt_skipped": self.corrupt_skipped}

    def load_state_dict(self, state: dict) -> DataPosition:
        for stream in self.streams:
            stream.corrupt_skipped = 0
        self._skipped_before = int(state.get("corrupt_skipped", 0))
        self.position = DataPosition.from_dict(state)
        return self.position

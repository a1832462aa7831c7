"""Training one refiner on several teacher caches, one per guidance scale (``data.guidance_scales``).

A special case of the data mixture (``train/mixture.py``), not a second mechanism: the mixture of one
component per scale w, named ``scale_label(w)``, whose config is the run's at ``teacher.guidance_scale = w``
(its own teacher key), all of equal weight. Each cache is generated beforehand by the usual job
(``pipeline/generate_targets.py ... teacher.guidance_scale=w``, or ``--component <scale_label(w)>``).

Mixing rule (the mixture's with equal shares): global batch ``b`` is batch ``b // S`` of the stream of scale
``s = b % S`` (``S`` scales, in the listed order), and every sample of it carries ``guidance_scale = w_s``.
Consecutive global batches ``S k .. S k + S - 1`` hold the same samples (seeds, prompts) at each scale (every
scale's stream has the same seed and the same plan). Checkpoints key each scale's shard rows by
``scale_label(w)``, as the multi-scale runs of checkpoint format 4 did: those resume unchanged.
"""

from __future__ import annotations

import functools

from ..mixture import at_guidance_scale, scale_label
from ..shards import ShardInfo
from ..storage import Location
from ..targets.cache import open_cache
from .mixture import MixtureStream
from .stream import TeacherStream

__all__ = ["MultiScaleStream", "at_guidance_scale", "open_scale_cache", "open_scale_caches", "scale_label"]


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


class MultiScaleStream(MixtureStream):
    """The mixture stream of one rank over the scale caches: each batch has a float32 ``guidance_scale`` tensor
    (one value per sample); :meth:`shard_rows` is keyed by the scale itself."""

    @classmethod
    def from_config(cls, cfg, rank: int = 0, world_size: int = 1,
                    caches: dict[float, tuple[Location, dict]] | None = None, *,
                    latent_shape: tuple[int, ...] | None = None) -> "MultiScaleStream":
        """One stream per ``data.guidance_scales`` w: on ``caches[w]`` if given, else opened when first needed
        (or by :meth:`load_state_dict` on the rows a checkpoint recorded)."""
        scales = list(caches) if caches is not None else [float(w) for w in cfg.data.guidance_scales]
        if not scales:
            raise ValueError("MultiScaleStream needs at least one guidance scale")
        streams = {scale_label(w): TeacherStream.from_config(
            at_guidance_scale(cfg, w), rank, world_size, cache=caches[w] if caches is not None else None,
            shards=list(caches[w][1]) if caches is not None else None, latent_shape=latent_shape,
            opener=functools.partial(open_scale_cache, cfg, w)) for w in scales}
        return cls(streams, [1] * len(scales), [float(w) for w in scales])

    def shard_rows(self) -> dict[float, list[ShardInfo]]:
        """Each scale's shard rows, in its stream's order (recorded in checkpoints, by ``scale_label``)."""
        return {w: rows for w, rows in zip(self.scales, self.component_rows().values())}

    def describe(self) -> str:
        caches = ", ".join(f"w={w:g}: {s.cache_dir}" for w, s in zip(self.scales, self.streams))
        return (f"teacher cache {caches}: {len(self.streams[0].shard_names)} shards per guidance scale, "
                f"{self.samples_per_epoch} samples/epoch")

    def _what(self, name: str) -> str:
        return f"guidance scale {float(name):g}"

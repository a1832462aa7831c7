"""Which data stream a training run reads: one cache, or a data mixture (``data.mixture``, or one cache per
``data.guidance_scales`` w: the mixture of one component per scale).

Every stream has the :class:`~noiserefine.train.stream.BatchStream` interface; this is the one place that picks
one from the config (kept apart from ``stream.py`` so that a composed stream may import it without a cycle).
"""

from __future__ import annotations

from .mixture import MixtureStream
from .multi_scale import MultiScaleStream
from .stream import BatchStream, TeacherStream


def open_stream(cfg, rank: int, world_size: int) -> BatchStream:
    """The data stream of ``cfg`` for this rank. Its caches are opened when first needed, or by
    ``load_state_dict`` on the rows a checkpoint recorded."""
    if cfg.data.mixture:
        return MixtureStream.from_config(cfg, rank, world_size)
    if cfg.data.guidance_scales:
        return MultiScaleStream.from_config(cfg, rank, world_size)
    return TeacherStream.from_config(cfg, rank, world_size)

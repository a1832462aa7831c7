"""Which data stream a training run reads (one cache, or one per ``data.guidance_scales`` w).

Every stream has the :class:`~noiserefine.train.stream.BatchStream` interface; this is the one place that picks
one from the config (kept apart from ``stream.py`` so that a composed stream may import it without a cycle).
"""

from __future__ import annotations

from .multi_scale import MultiScaleStream
from .stream import BatchStream, TeacherStream


def open_stream(cfg, rank: int, world_size: int) -> BatchStream:
    """The data stream of ``cfg`` for this rank. Its caches are opened when first needed, or by
    ``load_state_dict`` on the rows a checkpoint recorded."""
    if cfg.data.guidance_scales:
        return MultiScaleStream.from_config(cfg, rank, world_size)
    return TeacherStream.from_config(cfg, rank, world_size)

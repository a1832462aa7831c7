"""Generate one shard of guided teacher targets (the Ray workers call this).

For each batch of the shard: encode prompts, build ``x_T`` from each sample's
seed, run the guided teacher rollout, and append ``(meta, target)`` samples; the
tar is written to a temp name and renamed once complete. With a scorer (``scorer.kind``) each target,
decoded as stored (after the cast to the cache's dtype), gets its score in its ``.json``. A shard always holds
the same samples in the same batches, so its bytes do not depend on which
worker made it or how many workers there are.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from pathlib import Path

import numpy as np
import torch
from diffusers.guiders import BaseGuidance
from tqdm.auto import tqdm

from ..backends.base import Backend
from ..guidance import make_guider
from ..noise import fingerprint, noise_from_seeds
from ..sampling import rollout
from ..scoring import Scorer, load_scorer
from ..shards import ShardInfo, ShardSample, planned_shard_name, sample_key, write_shard
from ..storage import location
from .plan import PlannedSample


def shard_samples(backend: Backend, samples: Sequence[PlannedSample], *, guidance: BaseGuidance | None,
                  num_steps: int, teacher_key: str, batch_size: int, target_dtype: str,
                  progress: bool = False, where: str = "shard", scorer: Scorer | None = None
                  ) -> Iterator[ShardSample]:
    """Yield the shard's samples batch by batch (guided rollout of each batch); with ``scorer``, each meta's
    ``score`` is the scorer's on the decoded target as stored (``ValueError`` if it is not finite).

    Targets must be finite in the cache's dtype: after the whole shard, ``ValueError`` names
    ``where`` and the sample ids of every NaN/inf target (as the teacher made it, or by
    float16 overflow when cast); those samples are not yielded, so the shard is never complete.
    """
    dtype = np.dtype(target_dtype)
    bar = tqdm(total=len(samples), desc="targets", unit="sample", disable=not progress, leave=False)
    non_finite, overflow = [], []
    for start in range(0, len(samples), batch_size):
        batch = samples[start:start + batch_size]
        noise_cpu = noise_from_seeds([s.seed for s in batch], backend.latent_shape)
        cond = backend.encode_prompts([s.prompt for s in batch])
        with torch.no_grad():
            noise = noise_cpu.to(device=backend.device, dtype=backend.dtype)
            x0 = rollout(backend, noise, cond, num_steps, guidance).float().cpu().numpy()
        with np.errstate(over="ignore"):
            targets = x0.astype(dtype)
        scores = _scores(backend, scorer, targets, batch, where) if scorer is not None else None
        for i, sample in enumerate(batch):
            target = targets[i]
            if not np.isfinite(x0[i]).all():
                non_finite.append(sample.sample_id)
                continue
            if not np.isfinite(target).all():
                overflow.append(sample.sample_id)
                continue
            meta = {"sample_id": sample.sample_id, "seed": sample.seed, "prompt": sample.prompt,
                    "source": sample.source, "teacher_key": teacher_key,
                    "noise_fingerprint": fingerprint(noise_cpu[i])}
            if scores is not None:
                meta["score"] = scores[i]
            yield ShardSample(sample_key(sample.sample_id), meta, {"target": target})
        bar.update(len(batch))
    bar.close()
    if non_finite or overflow:
        problems = []
        if non_finite:
            problems.append(f"sample ids {non_finite} have NaN/inf targets as the teacher made them (check "
                            "teacher.guidance_scale and the model)")
        if overflow:
            problems.append(f"sample ids {overflow} overflow {dtype} (|x| > {np.finfo(dtype).max:g}: lower "
                            "teacher.guidance_scale or use data.target_dtype=float32)")
        raise ValueError(f"{where}: refusing non-finite targets in {len(non_finite) + len(overflow)} of "
                         f"{len(samples)} samples: {'; '.join(problems)}. Nothing was written or recorded")


def _scores(backend: Backend, scorer: Scorer, targets: np.ndarray, batch: Sequence[PlannedSample],
            where: str) -> list[float | None]:
    """The scores of the finite ``targets`` decoded (None for the others: they are refused anyway)."""
    finite = [i for i in range(len(batch)) if np.isfinite(targets[i]).all()]
    out: list[float | None] = [None] * len(batch)
    if not finite:
        return out
    with torch.no_grad():
        latents = torch.from_numpy(targets[finite].astype(np.float32)).to(device=backend.device, dtype=backend.dtype)
        images = backend.decode(latents).float()
    for i, score in zip(finite, scorer.score(images, [batch[i].prompt for i in finite])):
        if not np.isfinite(score):
            raise ValueError(f"{where}: the scorer gave sample {batch[i].sample_id} the score {score} (not finite)")
        out[i] = float(score)
    return out


def generate_shard(backend: Backend, cfg, samples: Sequence[PlannedSample], shard_index: int,
                   cache_dir: str | Path, teacher_key: str, *, name: str | None = None,
                   progress: bool = False, scorer: Scorer | None = None) -> ShardInfo:
    """Write shard ``shard_index`` of the cache atomically (as ``name``, by default the plan's name
    for it: ``Plan.shard_name``) and return its manifest row. ``cache_dir`` may be ``s3://...``: the shard
    is written to a local temp file and uploaded in one PUT once complete. ``scorer``: the loaded
    ``cfg.scorer`` (default: loaded here, once per shard; a worker passes the one it holds)."""
    if scorer is None and cfg.scorer.kind:
        scorer = load_scorer(cfg.scorer, backend.device)
    name = name or planned_shard_name(shard_index, len(samples), cfg.data.shard_size)
    stream = shard_samples(backend, samples, guidance=make_guider(cfg.teacher),
                           num_steps=cfg.teacher.num_steps, teacher_key=teacher_key,
                           batch_size=cfg.pipeline.batch_size, target_dtype=cfg.data.target_dtype,
                           progress=progress, where=str(location(cache_dir) / name), scorer=scorer)
    return write_shard(location(cache_dir) / name, stream)

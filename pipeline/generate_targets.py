"""Stage 1: generate the teacher-target cache with Ray.

    python pipeline/generate_targets.py --config configs/digits.yaml [key=value ...]
    ray submit infra/cluster.yaml pipeline/generate_targets.py -- --config '~/noiserefine/configs/x.yaml' \
        pipeline.address=auto ...

Why an actor pool and not one task per shard: a worker loads the model once
(gigabytes for SD/SDXL) and then serves many shards; tasks would reload it per
shard. Actors are restarted on death (``max_restarts=-1``) and their calls
retried (``max_task_retries``), and shards are written by temp name + atomic
rename with deterministic content, so a retried shard is byte-identical and
nothing is lost or duplicated. Re-running the command skips complete shards.
The last line printed is the cache directory.
"""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path

import ray
import torch
from omegaconf import OmegaConf
from ray.util import ActorPool
from tqdm.auto import tqdm

from noiserefine.backends import load_backend
from noiserefine.cache import prepare_cache_dir, record_shards, scan_cache
from noiserefine.config import config_from_container, parse_cli, save_config, teacher_key
from noiserefine.generate import generate_shard
from noiserefine.plan import Plan


class TargetWorker:
    """Holds one loaded teacher; generates whole shards."""

    def __init__(self, cfg_container: dict, cache_dir: str, num_threads: int):
        torch.set_num_threads(num_threads)  # same count everywhere: results do not depend on the worker
        self.cfg = config_from_container(cfg_container)
        self.cache_dir = cache_dir
        self.key = teacher_key(self.cfg)
        self.backend = load_backend(self.cfg.model)

    def generate(self, shard_index: int, samples: list) -> object:
        return generate_shard(self.backend, self.cfg, samples, shard_index, self.cache_dir, self.key)


def _start_ray(cfg) -> None:
    if cfg.pipeline.address:
        ray.init(address=cfg.pipeline.address)
    else:  # local: enough logical CPUs for the requested workers even on a small machine
        need = cfg.pipeline.num_workers * cfg.pipeline.cpus_per_worker
        # address="local": never attach to a cluster named by RAY_ADDRESS or a running `ray start`
        ray.init(address="local", num_cpus=max(os.cpu_count() or 1, int(need + 0.999)),
                 include_dashboard=False, log_to_driver=True)


def main(argv: list[str] | None = None) -> int:
    cfg, _ = parse_cli(argv, description="Generate the teacher-target cache (Ray).")
    if cfg.model.backend == "digits" and not Path(cfg.model.path).expanduser().is_dir():
        # fail before starting Ray (a worker would only find out after a minute)
        raise FileNotFoundError(f"model.path {cfg.model.path} is not a directory (train the digit teacher "
                                "with `python -m noiserefine.train_teacher --config ...`)")
    cache_dir = prepare_cache_dir(cfg)
    save_config(cfg, cache_dir / "generate_config.yaml")
    plan = Plan.from_config(cfg.data)
    for source in plan.sources:
        print(f"prompts[{source.kind}]: {source.stats}", flush=True)
    state = scan_cache(cache_dir, plan, verify=cfg.pipeline.verify)
    print(f"cache {cache_dir}: {len(state.complete)}/{plan.num_shards} shards complete, "
          f"{len(state.missing)} to generate" + (f", rejected {state.rejected}" if state.rejected else "")
          + (f", removed {len(state.stale_temps)} stale temp files" if state.stale_temps else ""),
          flush=True)
    started = time.perf_counter()
    num_samples = 0
    if state.missing:
        _start_ray(cfg)
        try:
            actor = ray.remote(TargetWorker).options(
                num_cpus=cfg.pipeline.cpus_per_worker, num_gpus=cfg.pipeline.gpus_per_worker,
                max_restarts=-1, max_task_retries=cfg.pipeline.max_retries)
            container = OmegaConf.to_container(cfg, resolve=True)
            threads = max(1, int(cfg.pipeline.cpus_per_worker))
            workers = [actor.remote(container, str(cache_dir), threads)
                       for _ in range(min(cfg.pipeline.num_workers, len(state.missing)))]
            pool = ActorPool(workers)
            results = pool.map_unordered(lambda w, k: w.generate.remote(k, plan.shard(k)), state.missing)
            for info in tqdm(results, total=len(state.missing), desc="shards", unit="shard"):
                record_shards(cache_dir, [info])  # per shard: a crashed driver loses nothing
                num_samples += info.num_samples
        finally:
            ray.shutdown()
    seconds = time.perf_counter() - started
    rate = num_samples / seconds if num_samples else 0.0
    print(f"generated {num_samples} samples in {len(state.missing)} shards in {seconds:.1f} s "
          f"({rate:.1f} samples/s); cache holds {plan.num_samples} samples in {plan.num_shards} shards",
          flush=True)
    print(cache_dir)
    return 0


if __name__ == "__main__":
    sys.exit(main())

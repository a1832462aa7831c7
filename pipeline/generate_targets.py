"""Stage 1: generate the teacher-target cache with Ray (or in this process with ``pipeline.num_workers=0``).

    python pipeline/generate_targets.py --config configs/digits.yaml [key=value ...]
    python pipeline/generate_targets.py --config mixture.yaml --component coco   # one cache of a data mixture
    ray submit infra/cluster.yaml pipeline/generate_targets.py -- --config '~/noiserefine/configs/x.yaml' \
        pipeline.address=auto ...

An actor pool, not a task per shard: a worker loads the model once (gigabytes for
SD/SDXL) and serves many shards. A dead worker (process killed, node lost) is replaced and
its shard handed to another worker; shards are written by temp name + rename (one PUT on
S3) with deterministic content, so a retried shard is byte-identical. Re-running skips
complete shards. The last line printed is the cache directory.

A config with a data mixture (``data.mixture``) names several caches: ``--component NAME`` generates
that component's (its config: the run's with the component's overlays, ``noiserefine/mixture.py``), one
call per component (they may run at once: each cache has its own lock). Without ``--component`` such a
config is refused, naming its components. ``data.guidance_scales`` (one component per scale, named
``repr(w)``) takes ``--component`` too; without it the cache of ``teacher.guidance_scale`` is made, as before.
"""

from __future__ import annotations

import contextlib
import os
import sys
import time
from collections import Counter, deque
from pathlib import Path

import torch
from omegaconf import OmegaConf
from tqdm.auto import tqdm

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from noiserefine import storage  # noqa: E402
from noiserefine.backends import load_backend  # noqa: E402
from noiserefine.config import config_from_container, parse_cli, to_yaml  # noqa: E402
from noiserefine.mixture import component_named, components  # noqa: E402
from noiserefine.performance import apply_levers  # noqa: E402
from noiserefine.scoring import load_scorer  # noqa: E402
from noiserefine.shards import read_manifest  # noqa: E402
from noiserefine.storage.locks import check_lease  # noqa: E402
from noiserefine.targets.cache import hold_cache, record_shards  # noqa: E402
from noiserefine.targets.generate import generate_shard  # noqa: E402
from noiserefine.targets.identity import teacher_key  # noqa: E402
from noiserefine.targets.plan import Plan  # noqa: E402
from noiserefine.targets.scan import scan_cache  # noqa: E402


class TargetWorker:
    """Holds one loaded teacher; generates whole shards."""

    def __init__(self, cfg_container: dict, cache_dir: str, key: str, num_threads: int):
        torch.set_num_threads(num_threads)  # same count everywhere: results do not depend on the worker
        self.cfg = config_from_container(cfg_container)
        storage.configure(self.cfg.data)
        self.cache_dir, self.key = cache_dir, key
        self.backend = load_backend(self.cfg.model)
        apply_levers(self.backend, self.cfg.performance)
        self.scorer = load_scorer(self.cfg.scorer, self.backend.device)  # None without scorer.kind

    def ready(self) -> bool:
        """Returns once the teacher is loaded (the driver hands out shards only to workers that are up)."""
        return True

    def generate(self, shard_index: int, samples: list, name: str):
        return generate_shard(self.backend, self.cfg, samples, shard_index, self.cache_dir, self.key, name=name,
                              scorer=self.scorer)


def generate_with_ray(cfg, cache_dir, key: str, plan: Plan, missing: dict[int, str]):
    """Yield the manifest rows of the ``missing`` shards ({index: file name}) as Ray workers finish them.

    A pool of actors, each loading the teacher once. A shard goes only to an actor that is up
    (its ``ready`` call returned). If an actor dies (its process killed, its node removed), the
    shard it was writing goes back to the queue for another actor and a replacement actor is
    started, used once Ray could place it (on a new node if the cluster has none free; the
    surviving actors go on meanwhile). A shard is tried at most ``pipeline.max_retries + 1``
    times. Work is at-least-once; shards are deterministic and written atomically, so a shard
    written twice is written with the same bytes.
    """
    import ray
    from ray.exceptions import RayActorError

    if cfg.pipeline.address:
        ray.init(address=cfg.pipeline.address)
    else:  # "local": never attach to a cluster named by RAY_ADDRESS; enough CPUs for the workers
        need = cfg.pipeline.num_workers * cfg.pipeline.cpus_per_worker
        ray.init(address="local", num_cpus=max(os.cpu_count() or 1, int(need + 0.999)),
                 include_dashboard=False, log_to_driver=True)
    try:
        actor = ray.remote(TargetWorker).options(num_cpus=cfg.pipeline.cpus_per_worker,
                                                 num_gpus=cfg.pipeline.gpus_per_worker,
                                                 max_restarts=0, max_task_retries=0)
        container = OmegaConf.to_container(cfg, resolve=True)
        threads = max(1, int(cfg.pipeline.cpus_per_worker))
        starting: dict = {}  # ready() future -> actor that is starting
        running: dict = {}  # generate() future -> (actor, shard index)
        idle: list = []
        queue = deque(missing)
        attempts: Counter = Counter()
        deaths = 0

        def start_actor() -> None:
            worker = actor.remote(container, str(cache_dir), key, threads)
            starting[worker.ready.remote()] = worker

        for _ in range(min(cfg.pipeline.num_workers, len(missing))):
            start_actor()
        while queue or running:
            while queue and idle:
                check_lease(cache_dir)  # a job that lost its lease (stalled past it) hands out no more shards
                worker, index = idle.pop(), queue.popleft()
                attempts[index] += 1
                running[worker.generate.remote(index, plan.shard(index), missing[index])] = (worker, index)
            (done,), _ = ray.wait(list(running) + list(starting), num_returns=1)
            if done in starting:
                worker = starting.pop(done)
                try:
                    ray.get(done)
                except RayActorError as error:  # died while loading the teacher
                    deaths += 1
                    if deaths > cfg.pipeline.max_retries + cfg.pipeline.num_workers:
                        raise RuntimeError(f"{deaths} teacher workers died while starting; last: {error}") from error
                    print(f"warning: a teacher worker died while starting ({type(error).__name__}); starting "
                          "another", file=sys.stderr, flush=True)
                    start_actor()
                    continue
                idle.append(worker)
                continue
            worker, index = running.pop(done)
            try:
                info = ray.get(done)
            except RayActorError as error:  # the worker process or its node died mid-shard
                if attempts[index] > cfg.pipeline.max_retries:
                    raise RuntimeError(f"shard {missing[index]} failed {attempts[index]} times (pipeline.max_retries="
                                       f"{cfg.pipeline.max_retries}); last: {error}") from error
                print(f"warning: the worker writing {missing[index]} died ({type(error).__name__}: "
                      f"{str(error).splitlines()[0][:200]}); the shard goes to another worker (attempt "
                      f"{attempts[index] + 1}) and a replacement worker is started", file=sys.stderr, flush=True)
                queue.appendleft(index)
                with contextlib.suppress(Exception):
                    ray.kill(worker, no_restart=True)
                start_actor()
                continue
            idle.append(worker)
            yield info
    finally:
        ray.shutdown()


def generate_in_process(cfg, cache_dir, key: str, plan: Plan, missing: dict[int, str]):
    """The same shards without Ray (debugging, tiny jobs, machines without Ray): byte-identical."""
    worker = TargetWorker(OmegaConf.to_container(cfg, resolve=True), str(cache_dir), key,
                          max(1, int(cfg.pipeline.cpus_per_worker)))
    for index, name in missing.items():
        yield worker.generate(index, plan.shard(index), name)


def _component_option(parser) -> None:
    parser.add_argument("--component", default=None, metavar="NAME",
                        help="generate the cache of this component of the config's data mixture (data.mixture, "
                             "or a data.guidance_scales w as repr(w), e.g. 1.5)")


def target_config(cfg, component: str | None):
    """The config whose cache this call generates: ``cfg``'s, or its mixture component ``component``'s."""
    if component is not None:
        found = component_named(cfg, component)
        print(f"component {found.name} (share {found.share} of {sum(c.share for c in components(cfg))} "
              "global batches)", flush=True)
        return found.cfg
    if cfg.data.mixture:
        names = ", ".join(c.name for c in components(cfg))
        raise ValueError(f"this config has a data mixture (data.mixture: {names}); each component has its own "
                         "cache: generate each with --component NAME (one call per component)")
    return cfg


def main(argv: list[str] | None = None) -> int:
    cfg, args = parse_cli(argv, description="Generate the teacher-target cache.", add_arguments=_component_option)
    cfg = target_config(cfg, args.component)
    storage.configure(cfg.data)
    if cfg.model.backend == "digits" and not Path(cfg.model.path).expanduser().is_dir():
        raise FileNotFoundError(f"model.path {cfg.model.path} is not a directory (train the digit teacher "
                                "with `python -m noiserefine.digits.train_teacher --config ...`)")
    plan = Plan.from_config(cfg.data)
    for source in plan.sources:
        print(f"prompts[{source.kind}]: {source.stats}", flush=True)
    with hold_cache(cfg) as cache_dir:  # the job lock, held until every shard is recorded
        storage.store_for(cache_dir).write_bytes("generate_config.yaml", to_yaml(cfg).encode("utf-8"))
        state = scan_cache(cache_dir, plan, verify=cfg.pipeline.verify)
        print(f"cache {cache_dir}: {len(state.complete)}/{plan.num_shards} shards complete, "
              f"{len(state.missing)} to generate" + (f", rejected {state.rejected}" if state.rejected else "")
              + (f", removed {len(state.stale_temps)} stale temp files" if state.stale_temps else ""), flush=True)
        if state.growing:
            print(f"  growing {state.growing}: kept as they are (a running trainer may read them); the longer "
                  f"shards get new names and replace their manifest rows", flush=True)
        for name in state.rejected:
            print(f"  rejected {name}: {state.reasons[name]}; moved aside as {state.moved[name]} (not deleted)",
                  flush=True)
        if state.adopted:
            print(f"  adopted {state.adopted}: complete and matching the plan but unrecorded; recorded now", flush=True)
        started, num_samples = time.perf_counter(), 0
        if state.missing:
            generate = generate_with_ray if cfg.pipeline.num_workers > 0 else generate_in_process
            names = {index: state.names[index] for index in state.missing}
            results = generate(cfg, cache_dir, teacher_key(cfg), plan, names)
            for info in tqdm(results, total=len(state.missing), desc="shards", unit="shard"):
                record_shards(cache_dir, [info])  # per shard: a crashed driver loses nothing
                num_samples += info.num_samples
        seconds = time.perf_counter() - started
    print(f"generated {num_samples} samples in {len(state.missing)} shards in {seconds:.1f} s "
          f"({num_samples / seconds if num_samples else 0.0:.1f} samples/s); cache holds {plan.num_samples} "
          f"samples in {plan.num_shards} shards", flush=True)
    if cfg.scorer.kind:
        print(score_summary(read_manifest(cache_dir).values()), flush=True)
    print(cache_dir)
    return 0


def score_summary(rows) -> str:
    """One line on the scores of a scored cache: quantiles, to choose data.min_score by."""
    scores = sorted(s for row in rows for s in (row.scores or ()))
    if not scores:
        return "scores: none recorded"
    quantiles = ", ".join(f"q{int(q * 100)} {scores[min(int(q * len(scores)), len(scores) - 1)]:.6g}"
                          for q in (0.0, 0.1, 0.2, 0.5, 0.8, 0.9, 1.0))
    return f"scores of {len(scores)} samples: {quantiles} (data.min_score keeps those >= it)"


if __name__ == "__main__":
    sys.exit(main())

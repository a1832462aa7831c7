"""Ray scaling of the teacher job on this machine: the same shards with 1 and with 2 Ray workers.

    .venv/bin/python bench/bench_ray_scaling.py [--shards 8] [--shard-size 48] [--num-steps 10] [--repeats 2]

One local Ray (2 CPUs); the pipeline's own ``TargetWorker`` actors (one teacher load each, 1 torch
thread each, as ``pipeline.cpus_per_worker=1``) write every shard of a plan into a fresh cache
directory, handed out as the job does (a shard to each idle worker). Timed: from the first shard
handed out to the last one written, with the actors already up (Ray start and model load are
one-off costs, printed apart). Compared with pure compute: ``shard_samples`` (noise, prompts,
guided rollouts, float16 targets; no tar, no file, no Ray) on the same shards in this process with
1 thread.

Printed: speed-up of 2 workers over 1 (goal >= 1.7 on 2 cores: it cannot exceed the cores the
machine has free, so the load average before and after is printed too) and the per-shard overhead
of the Ray path over pure compute (write + dispatch), absolute and relative. No assertion.

Uses ``artifacts/digits-teacher`` if it exists, else trains a 50-step teacher in a temp directory.
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
DEFAULT_TEACHER = REPO / "artifacts" / "digits-teacher"


def load_job_module():
    spec = importlib.util.spec_from_file_location("generate_targets", REPO / "pipeline" / "generate_targets.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shards", type=int, default=8)
    parser.add_argument("--shard-size", type=int, default=48)
    parser.add_argument("--num-steps", type=int, default=10)
    parser.add_argument("--repeats", type=int, default=2)
    args = parser.parse_args(argv)
    os.environ.setdefault("OMP_NUM_THREADS", "1")

    import ray
    import torch
    from omegaconf import OmegaConf

    from noiserefine.backends import load_backend
    from noiserefine.config import load_config
    from noiserefine.digits.teacher import ensure_digits_teacher
    from noiserefine.guidance import make_guider
    from noiserefine.targets.generate import shard_samples
    from noiserefine.targets.identity import teacher_key
    from noiserefine.targets.plan import Plan

    work = Path(tempfile.mkdtemp(prefix="bench-ray-"))
    teacher = DEFAULT_TEACHER if DEFAULT_TEACHER.is_dir() else ensure_digits_teacher(
        load_config(REPO / "configs" / "digits.yaml", ["model.digits.train_steps=50"]).model.digits,
        work / "teacher", progress=False)
    cfg = load_config(REPO / "configs" / "digits.yaml", [
        f"model.path={teacher}", f"data.num_samples={args.shards * args.shard_size}",
        f"data.shard_size={args.shard_size}", f"pipeline.batch_size={args.shard_size}",
        f"teacher.num_steps={args.num_steps}", "pipeline.cpus_per_worker=1"])
    plan = Plan.from_config(cfg.data)
    key = teacher_key(cfg)
    shards = {k: plan.shard(k) for k in range(plan.num_shards)}
    load_before = os.getloadavg()

    # pure compute: this process, 1 thread, no IO
    torch.set_num_threads(1)
    backend = load_backend(cfg.model)
    guidance = make_guider(cfg.teacher)
    compute = []
    for _ in range(args.repeats):
        started = time.perf_counter()
        for samples in shards.values():
            for _ in shard_samples(backend, samples, guidance=guidance, num_steps=cfg.teacher.num_steps,
                                   teacher_key=key, batch_size=cfg.pipeline.batch_size,
                                   target_dtype=cfg.data.target_dtype):
                pass
        compute.append(time.perf_counter() - started)
    compute_per_shard = statistics.median(compute) / plan.num_shards

    job = load_job_module()
    started = time.perf_counter()
    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)
    ray_start = time.perf_counter() - started
    actor = ray.remote(job.TargetWorker).options(num_cpus=1)
    container = OmegaConf.to_container(cfg, resolve=True)
    timings: dict[int, list[float]] = {1: [], 2: []}
    load_s = {}
    try:
        for workers in (1, 2):
            started = time.perf_counter()
            cache = work / f"cache-{workers}"
            cache.mkdir()
            pool = [actor.remote(container, str(cache), key, 1) for _ in range(workers)]
            ray.get([w.ready.remote() for w in pool])
            load_s[workers] = time.perf_counter() - started
            for _ in range(args.repeats):
                for old in cache.glob("shard-*.tar"):
                    old.unlink()
                queue, running, idle = list(shards), {}, list(pool)
                started = time.perf_counter()
                while queue or running:  # as the job hands out shards: one to each idle worker
                    while queue and idle:
                        w, k = idle.pop(), queue.pop(0)
                        running[w.generate.remote(k, shards[k], plan.shard_name(k))] = w
                    (done,), _ = ray.wait(list(running), num_returns=1)
                    ray.get(done)
                    idle.append(running.pop(done))
                timings[workers].append(time.perf_counter() - started)
            for w in pool:
                ray.kill(w)
    finally:
        ray.shutdown()
    load_after = os.getloadavg()
    one, two = statistics.median(timings[1]), statistics.median(timings[2])
    overhead = one / plan.num_shards - compute_per_shard
    print(f"plan: {plan.num_shards} shards x {args.shard_size} samples, {args.num_steps} CFG steps, digits teacher; "
          f"{os.cpu_count()} CPUs")
    print(f"load average before {load_before[0]:.2f}, after {load_after[0]:.2f} (1 min)")
    print(f"one-off: Ray start {ray_start:.1f} s; actor start + teacher load {load_s[1]:.1f} s (1 worker), "
          f"{load_s[2]:.1f} s (2 workers)")
    print(f"pure compute (in process, 1 thread): {compute_per_shard:.3f} s/shard "
          f"(runs {[round(t, 2) for t in compute]})")
    print(f"Ray, 1 worker: {one:.2f} s ({one / plan.num_shards:.3f} s/shard; runs {[round(t, 2) for t in timings[1]]})")
    print(f"Ray, 2 workers: {two:.2f} s ({two / plan.num_shards:.3f} s/shard; "
          f"runs {[round(t, 2) for t in timings[2]]})")
    print(f"speed-up 2 workers / 1 worker: {one / two:.2f}x (goal >= 1.7 on 2 cores)")
    print(f"per-shard overhead of the Ray path over pure compute: {overhead * 1000:.0f} ms "
          f"({overhead / compute_per_shard:+.1%} of {compute_per_shard * 1000:.0f} ms)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

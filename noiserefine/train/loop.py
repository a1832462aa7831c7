"""Refiner training: stream the teacher cache, refine ``x_T``, roll out the unguided student, match ``x0_guide``.

One short loop around a named :func:`train_step` (torchtitan / nanoGPT style)::

    x̂_T = g_phi(x_T, c)                         refiner forward (the only autograd graph)
    loss = || rollout_N(x̂_T) - x0_guide ||^2     MSD straight-through (or an ablation loss)
    engine.backward(loss); engine.step()          DeepSpeed: gradient all-reduce, clipping, AdamW

Outputs in ``train.output_dir``: ``config.yaml``, ``train_log.csv`` (loss = mean over
ranks and the steps since the previous row), ``samples_rank{r}.jsonl`` (the sample ids
of every step of rank r), ``eval_log.csv`` + ``eval_step{N}.png`` (rank 0, every
``train.eval_every`` steps), ``checkpoints/`` and ``snapshots/`` (``checkpoint.py``),
``refiner/`` (the final exported refiner) and ``done.json``. Re-running the same
command resumes from the newest checkpoint, or exits at once if the run is finished.
"""

from __future__ import annotations

import contextlib
import json
import os
import resource
import signal
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
from omegaconf import OmegaConf
from tqdm.auto import tqdm

from .. import storage
from ..backends import load_backend
from ..config import save_config
from ..evaluation.evaluator import EVAL_LOG, Evaluator
from ..evaluation.rows import MetricFn
from ..files import write_text_atomic
from ..losses import LossFn, build_loss
from ..performance import apply_levers, refine_in_micro_batches
from ..refiner import Refiner, save_refiner
from . import distributed, tracking
from .checkpoint import Checkpointer, finished_run
from ..files import append_csv, refuse_foreign_directory
from .logs import LOG_FIELDS, LogWindow, trim_csv, trim_jsonl
from .order import per_rank_batch
from .stream import BatchStream
from .streams import open_stream


def train_step(engine, refiner: Refiner, loss_fn: LossFn, backend, batch: dict, micro_batch: int = 0) -> dict:
    """One optimisation step on ``batch``; returns ``{"loss", "grad_norm"}`` (this rank).

    ``micro_batch`` (``performance.refiner_micro_batch``): the refiner's forward/backward in checkpointed chunks
    of that many samples (``performance.refine_in_micro_batches``); the loss's rollout takes the whole batch.

    An empty batch (this rank's slice was lost to damaged shards, ``train.skip_corrupt_shards``) still
    takes part in the step with a zero gradient, so the other ranks' collectives do not wait for it.
    """
    if not batch["sample_id"]:
        loss = sum(p.sum() for p in refiner.trainable_parameters()) * 0.0
        engine.backward(loss)
        engine.step()
        engine_norm = engine.get_global_grad_norm()
        return {"loss": 0.0, "grad_norm": float(engine_norm) if engine_norm is not None else 0.0}
    noise = batch["noise"].to(backend.device)
    target = batch["target"].to(backend.device)
    cond = backend.encode_prompts(batch["prompt"])
    # the refiner's forward through the engine; a batch of a refiner told w tells it each sample's guidance scale
    refined = refine_in_micro_batches(engine, noise, cond, batch.get("guidance_scale"), micro_batch)
    loss, _ = loss_fn(refined, cond, target)
    if not torch.isfinite(loss):
        raise FloatingPointError(f"non-finite loss {loss.item()} on samples {batch['sample_id']}")
    engine.backward(loss)
    grads = [p.grad for p in refiner.trainable_parameters() if p.grad is not None]
    local_norm = torch.linalg.vector_norm(torch.stack([g.detach().float().norm() for g in grads])).item() \
        if grads else float("nan")  # ZeRO 1/2 keep partitioned gradients elsewhere: the engine knows
    engine.step()
    engine_norm = engine.get_global_grad_norm()
    return {"loss": float(loss.detach()), "grad_norm": float(engine_norm) if engine_norm is not None else local_norm}


def _set_threads(world: int) -> None:
    """Several ranks on one machine: split the cores (oversubscribed OpenMP is many times slower)."""
    local = int(os.environ.get("LOCAL_SIZE", world))
    if local > 1:
        torch.set_num_threads(max(1, min(torch.get_num_threads(), (os.cpu_count() or 1) // local)))


def train(cfg, metric_factory: Callable[[], MetricFn] | None = None) -> dict:
    """Train (or resume, or recognise as finished) the refiner of ``cfg``; returns the final stats.

    ``metric_factory()`` builds, on rank 0 only, what scores the periodic evaluation's
    samples (grids only without it).
    """
    done = finished_run(cfg)
    if done is not None:
        if int(os.environ.get("RANK", "0")) == 0:
            print(f"{cfg.train.output_dir}: already trained to step {done['max_steps']} (done.json); "
                  "nothing to do", flush=True)
        return done
    run = _start(cfg)
    loss_fn = build_loss(cfg, run.backend)
    evaluator = None
    if run.is_main and cfg.train.eval_every > 0:
        evaluator = Evaluator(cfg, run.backend, run.output_dir, metric_factory() if metric_factory else None)
    batches = run.stream.batches(run.stream.position)
    started = time.perf_counter() - run.elapsed
    last_row: dict = {}
    bar = tqdm(total=cfg.train.max_steps, initial=run.start, desc="train refiner", unit="step",
               disable=not run.is_main, dynamic_ncols=True)
    step = run.start
    with stop_on_sigterm(run.rank, lambda: step), lost_rank_error(run.rank, run.world, lambda: step), \
            open(run.output_dir / f"samples_rank{run.rank}.jsonl", "a") as samples_log:
        for step in range(run.start + 1, cfg.train.max_steps + 1):
            batch = next(batches)
            stats = train_step(run.engine, run.refiner, loss_fn, run.backend, batch,
                               cfg.performance.refiner_micro_batch)
            record = {"step": step, "epoch": batch["epoch"], "index": batch["index"], "sample_ids": batch["sample_id"]}
            if "guidance_scale" in batch:  # a refiner told w: the batch's scale(s)
                record["guidance_scales"] = sorted(set(batch["guidance_scale"].tolist()))
            if batch.get("component"):  # a data mixture: the batch's component(s)
                record["components"] = sorted(set(batch["component"]))
            samples_log.write(json.dumps(record) + "\n")
            samples_log.flush()
            run.window.add(stats["loss"], len(batch["sample_id"]))
            if (cfg.train.log_every > 0 and step % cfg.train.log_every == 0) or step == cfg.train.max_steps:
                last_row = _log_row(step, stats, run, started)
            if evaluator is not None and step % cfg.train.eval_every == 0:
                result = evaluator(run.refiner, step)
                tqdm.write(result["text"])
                run.trackers.log_eval(step, result["rows"], run.output_dir / f"eval_step{step}.png")
            if run.checkpointer.due(step):
                run.checkpointer.save(run.engine, run.refiner, step, time.perf_counter() - started,
                                      checkpointed(run.stream, run.window))
            bar.update(1)
    bar.close()
    return _finish(cfg, run, last_row, started)


@dataclass
class _Run:
    """What the loop works with, built (or restored from a checkpoint) by :func:`_start`."""
    rank: int
    world: int
    is_main: bool
    output_dir: Path
    backend: object
    refiner: Refiner
    engine: object
    stream: BatchStream
    window: LogWindow
    checkpointer: Checkpointer
    start: int  # the step this run continues from (0: a new run)
    elapsed: float  # training seconds before this run (a resumed run's clock goes on)
    # train.report_to's trackers on rank 0 (opened by _start)
    trackers: tracking.Trackers = field(default_factory=lambda: tracking.Trackers([]))


def checkpointed(stream: BatchStream, window: LogWindow) -> dict:
    """What a checkpoint saves and a resume restores besides the engine and the step, by name."""
    return {"data": stream, "log_window": window}


class CheckpointedWindow(LogWindow):
    """The log window; resumed on another number of ranks, rank 0 takes the ranks' windows merged."""

    @staticmethod
    def elastic_state(states: list[dict], rank: int) -> dict:
        return merge_windows(states) if rank == 0 else {}


def merge_windows(windows: list[dict]) -> dict:
    """The log windows of several ranks as one (sums; the longest elapsed time)."""
    return {"loss": sum(float(w.get("loss", 0.0)) for w in windows),
            "steps": sum(int(w.get("steps", 0)) for w in windows),
            "samples": sum(int(w.get("samples", 0)) for w in windows),
            "seconds": max([float(w.get("seconds", 0.0)) for w in windows] or [0.0])}


def _start(cfg) -> _Run:
    """Checks, process group, model, engine and data, restored from the newest checkpoint if there is one.

    Fails fast, before any model, engine or process group exists: the checkpoint to resume from (its
    config compared with this one) and the shards to train on (a resumed run: exactly its recorded rows).
    """
    # a user's non-empty folder is refused before anything is written (config.yaml is a run's first file;
    # a run killed before it left checkpoints/ or samples logs)
    refuse_foreign_directory(cfg.train.output_dir, "config.yaml", "the output folder of a training run "
                             "(train.output_dir)", also_ours=("checkpoints", "done.json", "samples_rank0.jsonl"))
    tracking.require_installed(cfg.train.report_to)  # a tracker's package missing: say so before any work
    storage.configure(cfg.data)  # object-store retries and read chunks (inherited by forked loader workers)
    launch_rank, launch_world = distributed.launch_rank_world()
    per_rank_batch(cfg.train.global_batch_size, launch_world)  # the global batch must split over the ranks
    checkpointer = Checkpointer(cfg)
    resume = checkpointer.find(launch_rank, launch_world)
    stream, window = open_stream(cfg, launch_rank, launch_world), CheckpointedWindow()
    if resume:  # the stream continues on exactly the shard rows it recorded (refusing any gone or changed)
        checkpointer.restore(resume, checkpointed(stream, window), launch_rank, launch_world)
    described = stream.describe()  # a new run's stream opens its cache here (an incomplete one is refused)
    info = distributed.init()
    if (info.rank, info.world_size) != (launch_rank, launch_world):
        raise RuntimeError(f"the process group has rank {info.rank} of {info.world_size}, the launcher said "
                           f"{launch_rank} of {launch_world}")
    _set_threads(info.world_size)
    backend = load_backend(OmegaConf.merge(cfg.model, {"device": distributed.device_for(cfg.model.device)}))
    stream.latent_shape = backend.latent_shape  # every target must have the backend's
    torch.manual_seed(cfg.train.seed)  # LoRA A is random: the same on every rank and in every resumed run
    refiner = Refiner(backend, cfg.refiner)
    apply_levers(backend, cfg.performance)  # after the LoRA is attached: a compiled denoiser includes it
    engine = distributed.build_engine(refiner, cfg)
    if resume:
        checkpointer.load(engine, refiner, resume)
    run = _Run(info.rank, info.world_size, info.is_main, Path(cfg.train.output_dir), backend, refiner, engine,
               stream, window, checkpointer, resume.step if resume else 0, resume.seconds if resume else 0.0)
    _prepare_outputs(cfg, run, resume, described)
    run.trackers = tracking.open_trackers(cfg, run.output_dir, run.start, run.is_main)
    distributed.barrier()
    return run


def _prepare_outputs(cfg, run: _Run, resume, described: str) -> None:
    """Cut the logs back to the step this run continues from; rank 0 saves the config and says what runs."""
    run.output_dir.mkdir(parents=True, exist_ok=True)
    trim_jsonl(run.output_dir / f"samples_rank{run.rank}.jsonl", run.start)
    if not run.is_main:
        return
    if resume:
        for gone in range(run.world, resume.world_size):  # ranks that no longer exist: cut their logs back too
            trim_jsonl(run.output_dir / f"samples_rank{gone}.jsonl", run.start)
        print(f"resuming from {resume.path} at step {run.start}", flush=True)
    (run.output_dir / "done.json").unlink(missing_ok=True)
    save_config(cfg, run.output_dir / "config.yaml")
    trim_csv(run.output_dir / "train_log.csv", run.start)
    trim_csv(run.output_dir / EVAL_LOG, run.start)
    print(f"{described}; {run.world} rank(s) x batch {run.stream.batch_size} (global batch "
          f"{cfg.train.global_batch_size}), loss {cfg.train.loss}, "
          f"steps {run.start}->{cfg.train.max_steps}", flush=True)


@contextlib.contextmanager
def stop_on_sigterm(rank: int, current_step: Callable[[], int]):
    """SIGTERM (the deepspeed launcher stops every rank when one fails) ends this rank with a line saying so."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    pid = os.getpid()

    def handler(signum, frame):
        if os.getpid() == pid:  # not in a forked DataLoader worker
            print(f"rank {rank} stopped by SIGTERM at step {current_step()} (under the deepspeed launcher: "
                  "another rank failed, see its error and exit status); re-run the same command to resume from "
                  "the newest checkpoint", file=sys.stderr, flush=True)
        sys.exit(128 + signum)

    previous = signal.signal(signal.SIGTERM, handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


@contextlib.contextmanager
def lost_rank_error(rank: int, world: int, current_step: Callable[[], int]):
    """A collective that fails because a peer is gone (gloo: connection closed or reset) says so."""
    try:
        yield
    except RuntimeError as error:
        if world > 1 and any(s in str(error) for s in ("Connection closed by peer", "Connection reset by peer")):
            raise RuntimeError(f"rank {rank} lost contact with another rank at step {current_step()} (it probably "
                               "died: see its log); re-run the same command to resume from the newest "
                               "checkpoint") from error
        raise


def _log_row(step: int, stats: dict, run: _Run, started: float) -> dict:
    """All ranks: reduce the log window; rank 0 appends the row and prints it."""
    window = run.window
    loss_sum, steps, samples, skipped = distributed.all_reduce_sum(
        [window.loss, window.steps, window.samples, run.stream.corrupt_skipped])
    seconds = window.seconds()
    row = {"step": step, "loss": loss_sum / steps, "grad_norm": stats["grad_norm"],
           "samples_per_s": samples / max(seconds, 1e-9),
           "seconds": round(time.perf_counter() - started, 3), "corrupt_skipped": int(skipped)}
    window.reset()
    if run.is_main:
        append_csv(run.output_dir / "train_log.csv", LOG_FIELDS, row)
        run.trackers.log_train(step, {"loss": row["loss"], "learning_rate": run.engine.get_lr()[0],
                                      "grad_norm": row["grad_norm"], "samples_per_s": row["samples_per_s"],
                                      "step_seconds": seconds / max(steps / run.world, 1),
                                      **tracking.peak_memory_mb()})
        tqdm.write(f"step {step} loss {row['loss']:.6f} grad_norm {row['grad_norm']:.4f} "
                   f"{row['samples_per_s']:.1f} samples/s {row['seconds']:.1f}s corrupt_skipped {row['corrupt_skipped']}")
    return row


def _finish(cfg, run: _Run, last_row: dict, started: float) -> dict:
    """Export the refiner and write ``done.json`` (rank 0); every rank leaves the process group."""
    total_skipped = int(distributed.all_reduce_sum([run.stream.corrupt_skipped])[0])
    peak_mb = max(distributed.all_gather_object(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0))
    output_dir = Path(cfg.train.output_dir)
    stats = {"max_steps": cfg.train.max_steps, "world_size": distributed.world_size(),
             "global_batch_size": cfg.train.global_batch_size, "batch_size": run.stream.batch_size,
             "loss": cfg.train.loss, "final_loss": last_row.get("loss"),
             "seconds": round(time.perf_counter() - started, 1), "peak_rss_mb": round(peak_mb, 1),
             "corrupt_skipped": total_skipped, "refiner_dir": str(output_dir / "refiner")}
    if run.is_main:
        save_refiner(run.refiner, output_dir / "refiner", cfg)
        record = {**stats, "config": OmegaConf.to_container(cfg, resolve=True)}  # finished_run compares it
        write_text_atomic(output_dir / "done.json", json.dumps(record, indent=2) + "\n")
        print(f"done: {cfg.train.max_steps} steps, final loss {stats['final_loss']}, refiner in "
              f"{stats['refiner_dir']}", flush=True)
        run.trackers.close()
    distributed.shutdown()
    return stats

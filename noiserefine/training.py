"""Refiner training: stream the teacher cache, refine ``x_T``, roll out the unguided student, match ``x0_guide``.

One short loop around a named :func:`train_step` (torchtitan / nanoGPT style)::

    x̂_T = g_phi(x_T, c)                         refiner forward (the only autograd graph)
    loss = || rollout_N(x̂_T) - x0_guide ||^2     MSD straight-through (or an ablation loss)
    engine.backward(loss); engine.step()          DeepSpeed: gradient all-reduce, clipping, AdamW

Outputs in ``train.output_dir``: ``config.yaml`` (resolved config), ``train_log.csv``
(step, loss, grad_norm, samples_per_s, seconds, corrupt_skipped; loss is the mean over
ranks and the steps since the previous row), ``samples_rank{r}.jsonl`` (the sample ids
of every step of rank r), ``eval_log.csv`` + ``eval_step{N}.png`` (rank 0, every
``train.eval_every`` steps), ``checkpoints/`` (DeepSpeed, every ``train.checkpoint_every``
steps and at the end, with the resolved config and every rank's data position; the
newest two are kept), ``snapshots/step{N:08d}/`` (the refiner exported as safetensors
at every checkpoint, all kept: intermediate refiners can be evaluated without
DeepSpeed), ``refiner/`` (the final exported refiner) and ``done.json``.

Re-running the same command resumes from the newest checkpoint; the logs are cut
back to that step first, so they end up equal to an uninterrupted run's. If
``done.json`` says the run already reached ``train.max_steps`` it exits at once.
"""

from __future__ import annotations

import csv
import json
import os
import resource
import sys
import time
from pathlib import Path

import torch
from omegaconf import DictConfig, OmegaConf

from . import distributed
from .backends import load_backend
from .config import save_config, teacher_key
from .data import TeacherStream, open_cache
from .files import atomic_path, write_text_atomic
from .losses import compute_loss
from .refiner import Refiner, save_refiner
from .sampling import rollout_gain

EXIT_AFTER_STEP_ENV = "NOISEREFINE_TRAIN_EXIT_AFTER_STEP"  # test hook: os._exit(17) after that step
LOG_FIELDS = ("step", "loss", "grad_norm", "samples_per_s", "seconds", "corrupt_skipped")
EVAL_FIELDS = ("step", "row", "fid", "inception_score", "accuracy", "num_samples")
# Keys that may change between a run and its resumption without changing what is trained.
RESUMABLE_KEYS = ("train.max_steps", "train.log_every", "train.eval_every", "train.checkpoint_every",
                  "train.output_dir", "model.device", "data.cache_root", "data.cache_dir", "data.num_samples")
COMPARED_SECTIONS = ("model", "teacher", "student", "refiner", "data", "train")


def train_step(engine, refiner: Refiner, backend, batch: dict, cfg, gain: float | None) -> dict:
    """One optimisation step on ``batch``; returns ``{"loss", "grad_norm"}`` (this rank)."""
    noise = batch["noise"].to(backend.device)
    target = batch["target"].to(backend.device)
    cond = backend.encode_prompts(batch["prompt"])
    refined = engine(noise, cond)  # the refiner's forward through the DeepSpeed engine
    options = {}
    if cfg.train.loss == "msd":
        options["gain"] = gain
    elif cfg.train.loss == "full_gradient":
        options["checkpoint_steps"] = bool(cfg.train.gradient_checkpointing)
    loss, _ = compute_loss(cfg.train.loss, backend, refined, cond, target, cfg.student.num_steps, **options)
    if not torch.isfinite(loss):
        raise FloatingPointError(f"non-finite loss {loss.item()} on samples {batch['sample_id']}")
    engine.backward(loss)
    grads = [p.grad for p in refiner.trainable_parameters() if p.grad is not None]
    local_norm = torch.linalg.vector_norm(torch.stack([g.detach().float().norm() for g in grads])).item() \
        if grads else None  # ZeRO 1/2 keep partitioned gradients elsewhere: ask the engine below
    engine.step()
    engine_norm = engine.get_global_grad_norm()
    grad_norm = float(engine_norm) if engine_norm is not None else (local_norm if local_norm is not None
                                                                    else float("nan"))
    return {"loss": float(loss.detach()), "grad_norm": grad_norm}


# --- files -------------------------------------------------------------------------------------------

def _trim_jsonl(path: Path, last_step: int) -> None:
    """Keep the lines of steps <= ``last_step`` (a torn last line is dropped)."""
    if not path.exists():
        return
    kept = []
    for line in path.read_text().splitlines():
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            continue
        if int(record["step"]) <= last_step:
            kept.append(line)
    write_text_atomic(path, "".join(f"{line}\n" for line in kept))


def _trim_csv(path: Path, last_step: int, fields: tuple[str, ...]) -> None:
    """Rewrite ``path`` with the header and the rows of steps <= ``last_step``."""
    rows = []
    if path.exists():
        with open(path, newline="") as handle:
            for row in csv.DictReader(handle):
                try:
                    if int(row["step"]) <= last_step and all(row.get(f) is not None for f in fields):
                        rows.append(row)
                except (TypeError, ValueError):
                    continue
    with atomic_path(path) as tmp, open(tmp, "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(fields))
        writer.writeheader()
        writer.writerows({f: row[f] for f in fields} for row in rows)


def _append_csv(path: Path, fields: tuple[str, ...], row: dict) -> None:
    with open(path, "a", newline="") as handle:
        csv.DictWriter(handle, fieldnames=list(fields)).writerow({f: row[f] for f in fields})


def _flatten(container: dict, prefix: str = "") -> dict:
    out = {}
    for key, value in container.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            out.update(_flatten(value, f"{name}."))
        else:
            out[name] = value
    return out


def resume_mismatch(stored: dict, current: dict) -> list[str]:
    """Config keys that differ between a checkpoint and this run and would change the training."""
    old = _flatten({k: stored.get(k, {}) for k in COMPARED_SECTIONS})
    new = _flatten({k: current.get(k, {}) for k in COMPARED_SECTIONS})
    return sorted(k for k in set(old) | set(new)
                  if k not in RESUMABLE_KEYS and old.get(k) != new.get(k))


def _peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def _read_done(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return None


# --- evaluation --------------------------------------------------------------------------------------

class Evaluator:
    """Unguided Gaussian vs refined noise on the fixed held-out seeds (rank 0).

    The guided-teacher and unguided rows do not depend on the refiner: sampled and
    scored once, then reused. Digits: accuracy / FID / IS from the in-domain
    classifier (cached under ``data.cache_root/classifier``).
    """

    def __init__(self, cfg, backend, output_dir: Path):
        from .eval import eval_set

        self.cfg, self.backend, self.output_dir = cfg, backend, output_dir
        self.evals = eval_set(cfg)
        self.fixed = None
        self.metrics = None
        if backend.name == "digits":
            from .metrics import DigitMetrics, load_or_train_classifier

            self.metrics = DigitMetrics(load_or_train_classifier(Path(cfg.data.cache_root) / "classifier"))

    def __call__(self, refiner: Refiner, step: int) -> dict:
        from .eval import sample_row, save_rows_grid, score_rows
        from .sampling import Guidance

        cfg, backend = self.cfg, self.backend
        steps, batch = cfg.student.num_steps, cfg.eval.batch_size
        if self.fixed is None:
            self.fixed = [sample_row("guided teacher", backend, self.evals, steps,
                                     guidance=Guidance.from_teacher(cfg.teacher), batch_size=batch),
                          sample_row("unguided", backend, self.evals, steps, batch_size=batch)]
            if self.metrics is not None:
                score_rows(self.fixed, backend, self.evals, self.metrics)
        refined = sample_row("refined", backend, self.evals, steps, batch_size=batch,
                             prepare_noise=refiner.refine)
        if self.metrics is not None:
            score_rows([refined], backend, self.evals, self.metrics)
        rows = [*self.fixed, refined]
        save_rows_grid(rows, backend, cfg.eval.grid_columns, self.output_dir / f"eval_step{step}.png")
        results = {}
        for row in rows:
            m = row.metrics
            results[row.name] = m
            if m:
                _append_csv(self.output_dir / "eval_log.csv", EVAL_FIELDS,
                            {"step": step, "row": row.name, "fid": m["fid"],
                             "inception_score": m["inception_score"], "accuracy": m["accuracy"],
                             "num_samples": m["num_samples"]})
        if self.metrics is not None:
            text = ", ".join(f"{name}: acc {m['accuracy']:.3f} FID {m['fid']:.2f}" for name, m in results.items())
        else:
            text = "grid only (no metrics for this backend)"
        return {"text": f"eval step {step}: {text}", "rows": results}


# --- the loop ----------------------------------------------------------------------------------------

def _set_threads(world: int) -> None:
    """Several ranks on one machine: split the cores (oversubscribed OpenMP is many times slower)."""
    local = int(os.environ.get("LOCAL_SIZE", world))
    if local > 1:
        torch.set_num_threads(max(1, min(torch.get_num_threads(), (os.cpu_count() or 1) // local)))


def main(cfg: DictConfig) -> dict:
    """Train (or resume, or recognise as finished) the refiner described by ``cfg``; returns final stats."""
    output_dir = Path(cfg.train.output_dir)
    done_path = output_dir / "done.json"
    refiner_dir = output_dir / "refiner"
    done = _read_done(done_path)
    if done and done.get("max_steps") == cfg.train.max_steps and (refiner_dir / "refiner.safetensors").is_file():
        saved = output_dir / "config.yaml"
        differing = resume_mismatch(OmegaConf.to_container(OmegaConf.load(saved), resolve=True),
                                    OmegaConf.to_container(cfg, resolve=True)) if saved.is_file() else []
        if differing:
            raise ValueError(f"{output_dir} holds a finished run of another config (differs in: "
                             f"{', '.join(differing)}); use a new train.output_dir")
        if int(os.environ.get("RANK", "0")) == 0:
            print(f"{output_dir}: already trained to step {done['max_steps']} (done.json); nothing to do",
                  flush=True)
        return done

    cache_dir, manifest = open_cache(cfg)  # fail fast, before any process group exists
    info = distributed.init()
    rank, world, is_main = info.rank, info.world_size, info.is_main
    _set_threads(world)
    output_dir.mkdir(parents=True, exist_ok=True)
    ckpt_dir = output_dir / "checkpoints"
    container = OmegaConf.to_container(cfg, resolve=True)

    # model + refiner (same seed on every rank and in every resumed run: LoRA A is random)
    model_cfg = OmegaConf.merge(cfg.model, {"device": distributed.device_for(cfg.model.device)})
    backend = load_backend(model_cfg)
    torch.manual_seed(cfg.train.seed)
    refiner = Refiner(backend, cfg.refiner)
    engine = distributed.build_engine(refiner, cfg)
    trainable_names = sorted(n for n, p in refiner.named_parameters() if p.requires_grad)

    # resume
    path, state = distributed.load_checkpoint(engine, ckpt_dir)
    start, elapsed, shards, position_state = 0, 0.0, None, None
    if path is not None:
        differing = resume_mismatch(state["config"], container)
        if differing:
            raise ValueError(f"{ckpt_dir}: the checkpoint was trained with another config (differs in: "
                             f"{', '.join(differing)}); use a new train.output_dir")
        if state["trainable_names"] != trainable_names:
            raise ValueError(f"{path}: checkpoint LoRA parameters do not match the refiner built from the config")
        if state["world_size"] != world:
            raise ValueError(f"{path}: written by {state['world_size']} ranks, this run has {world}; exact "
                             "resume needs the same number of ranks")
        start, elapsed, shards = int(state["step"]), float(state["seconds"]), list(state["shards"])
        position_state = state["data_position"][rank]
        if start > cfg.train.max_steps:
            raise ValueError(f"{path}: already at step {start}, beyond train.max_steps={cfg.train.max_steps}")
        if is_main:
            print(f"resuming from {path} at step {start}", flush=True)
    stream = TeacherStream.from_config(cfg, rank, world, shards=shards, cache=(cache_dir, manifest))
    # loss sums and wall-clock of the steps since the last log row (carried over a resume)
    window = {"loss": 0.0, "steps": 0, "samples": 0, "seconds": 0.0}
    if position_state is not None:
        stream.load_state_dict(position_state)
        window = dict(position_state.get("log_window", window))
    if is_main:
        done_path.unlink(missing_ok=True)
        save_config(cfg, output_dir / "config.yaml")
        _trim_csv(output_dir / "train_log.csv", start, LOG_FIELDS)
        _trim_csv(output_dir / "eval_log.csv", start, EVAL_FIELDS)
        print(f"teacher cache {cache_dir} ({teacher_key(cfg)}): {len(stream.shard_names)} shards, "
              f"{stream.samples_per_epoch} samples/epoch; {world} rank(s) x batch {cfg.train.batch_size}, "
              f"loss {cfg.train.loss}, steps {start}->{cfg.train.max_steps}", flush=True)
    samples_path = output_dir / f"samples_rank{rank}.jsonl"
    if start:
        _trim_jsonl(samples_path, start)
    else:
        samples_path.unlink(missing_ok=True)
    distributed.barrier()

    gain = rollout_gain(backend, cfg.student.num_steps) if cfg.train.loss == "msd" else None
    evaluator = None
    exit_after = int(os.environ.get(EXIT_AFTER_STEP_ENV, "0") or 0)
    batches = stream.batches(stream.position)
    window_started = time.perf_counter() - window.pop("seconds", 0.0)
    started = time.perf_counter() - elapsed
    last = {"loss": float("nan"), "grad_norm": float("nan")}

    from tqdm.auto import tqdm

    bar = tqdm(total=cfg.train.max_steps, initial=start, desc="train refiner", unit="step",
               disable=not is_main, dynamic_ncols=True)
    with open(samples_path, "a") as samples_log:
        for step in range(start + 1, cfg.train.max_steps + 1):
            batch = next(batches)
            stats = train_step(engine, refiner, backend, batch, cfg, gain)
            samples_log.write(json.dumps({"step": step, "epoch": batch["epoch"], "index": batch["index"],
                                          "sample_ids": batch["sample_id"]}) + "\n")
            samples_log.flush()
            window["loss"] += stats["loss"]
            window["steps"] += 1
            window["samples"] += len(batch["sample_id"])
            last_step = step == cfg.train.max_steps
            if (cfg.train.log_every > 0 and step % cfg.train.log_every == 0) or last_step:
                loss_sum, steps_sum, samples_sum, skipped = distributed.all_reduce_sum(
                    [window["loss"], window["steps"], window["samples"], stream.corrupt_skipped])
                now = time.perf_counter()
                row = {"step": step, "loss": loss_sum / steps_sum, "grad_norm": stats["grad_norm"],
                       "samples_per_s": samples_sum / max(now - window_started, 1e-9),
                       "seconds": round(now - started, 3), "corrupt_skipped": int(skipped)}
                last = row
                if is_main:
                    _append_csv(output_dir / "train_log.csv", LOG_FIELDS, row)
                    tqdm.write(f"step {step}/{cfg.train.max_steps} loss {row['loss']:.6f} grad_norm "
                               f"{row['grad_norm']:.4f} {row['samples_per_s']:.1f} samples/s "
                               f"{row['seconds']:.1f}s corrupt_skipped {row['corrupt_skipped']}")
                window = {"loss": 0.0, "steps": 0, "samples": 0}
                window_started = now
            if is_main and cfg.train.eval_every > 0 and step % cfg.train.eval_every == 0:
                if evaluator is None:
                    evaluator = Evaluator(cfg, backend, output_dir)
                tqdm.write(evaluator(refiner, step)["text"])
            if step % cfg.train.checkpoint_every == 0 or last_step:
                now = time.perf_counter()
                _checkpoint(engine, refiner, cfg, step, stream, {**window, "seconds": now - window_started},
                            trainable_names, now - started)
            bar.update(1)
            if exit_after and step == exit_after:
                bar.close()
                sys.stdout.flush()
                sys.stderr.flush()
                os._exit(17)
    bar.close()

    total_skipped = int(distributed.all_reduce_sum([stream.corrupt_skipped])[0])
    peak = max(distributed.all_gather_object(_peak_rss_mb()))
    stats = {"max_steps": cfg.train.max_steps, "world_size": world, "batch_size": cfg.train.batch_size,
             "loss": cfg.train.loss, "final_loss": last.get("loss"), "seconds": round(time.perf_counter() - started, 1),
             "peak_rss_mb": round(peak, 1), "corrupt_skipped": total_skipped,
             "refiner_dir": str(refiner_dir), "teacher_key": teacher_key(cfg)}
    if is_main:
        save_refiner(refiner, refiner_dir, cfg)
        write_text_atomic(done_path, json.dumps(stats, indent=2) + "\n")
        print(f"done: {cfg.train.max_steps} steps, final loss {stats['final_loss']}, refiner in {refiner_dir}",
              flush=True)
    distributed.shutdown()
    return stats


def _checkpoint(engine, refiner: Refiner, cfg, step: int, stream: TeacherStream, window: dict,
                trainable_names: list[str], seconds: float) -> None:
    """Every rank: gather the data positions and unlogged loss sums (rank 0 writes client_state), then save.

    Rank 0 first exports the refiner of this step to ``snapshots/`` (no optimizer state:
    what evaluation needs). A crash between the two only means the snapshot is written
    again, identically, when the run resumes from the previous checkpoint.
    """
    output_dir = Path(cfg.train.output_dir)
    if distributed.rank() == 0:
        save_refiner(refiner, output_dir / "snapshots" / distributed.checkpoint_tag(step), cfg)
    positions = distributed.all_gather_object({**stream.state_dict(), "log_window": dict(window)})
    client_state = {"step": step, "data_position": positions, "config": OmegaConf.to_container(cfg, resolve=True),
                    "shards": list(stream.shard_names), "world_size": len(positions),
                    "trainable_names": trainable_names, "seconds": seconds}
    distributed.save_checkpoint(engine, output_dir / "checkpoints", step, client_state)

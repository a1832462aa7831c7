"""The ``digits_deepspeed`` case: the embedded default end to end through the entry points.

A tiny digit teacher (CPU, in process), a cache generated in process (``pipeline/generate_targets.py ...
pipeline.num_workers=0``, bf16 on CUDA), then 1-rank DeepSpeed training (launcher, NCCL, bf16) with
checkpoints: an uninterrupted run (through ``bench/gpu/train_probe.py``) side by side with a run killed after
step K (``tests/hooks``), which is then re-run and resumes; the two final refiners are compared.
"""

from __future__ import annotations

import csv
import dataclasses
import json
import os
import re
import statistics
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from bench.gpu.cases import Case
from bench.gpu.runner import REPO, Proc, Stop, free_port


@dataclass
class Sizes:
    """The digits case's budget; ``batch`` and ``max_steps`` come from the declared case."""

    teacher_steps: int
    teacher_batch: int
    num_samples: int
    shard_size: int
    gen_batch: int
    teacher_num_steps: int
    student_num_steps: int
    checkpoint_every: int
    kill_after: int
    batch: int = 0
    max_steps: int = 0
    extra: list[str] = field(default_factory=list)


GPU_SIZES = Sizes(teacher_steps=30, teacher_batch=32, num_samples=256, shard_size=64, gen_batch=64,
                  teacher_num_steps=10, student_num_steps=10, checkpoint_every=8, kill_after=12)
TINY_SIZES = Sizes(teacher_steps=8, teacher_batch=16, num_samples=64, shard_size=32, gen_batch=32,
                   teacher_num_steps=3, student_num_steps=3, checkpoint_every=2, kill_after=3,
                   extra=["refiner.lora_rank=4", "refiner.lora_alpha=4.0", "train.num_loader_workers=0"])


def run_digits(check, case: Case, figures: dict) -> None:
    """Fill ``figures``; raises ``Stop`` with the reason when a step fails."""
    from noiserefine.config import load_config
    from noiserefine.digits.teacher import train_digits_teacher

    sizes = dataclasses.replace(TINY_SIZES if check.tiny else GPU_SIZES, batch=case.batch, max_steps=case.steps[0])
    cap_end = time.time() + check.cap(case)  # leave the real-size cases their share

    def limit() -> float:
        return min(cap_end, check.deadline) - time.time()

    work = check.work / "digits"
    work.mkdir(parents=True, exist_ok=True)
    device, dtype = ("cuda", "bfloat16") if check.cuda else ("cpu", "bfloat16")
    teacher_settings = [f"model.digits.train_steps={sizes.teacher_steps}",
                        f"model.digits.batch_size={sizes.teacher_batch}"]

    # 1. teacher (CPU, in this process; one thread in the CPU mode, where the machine may be busy)
    import torch

    started = time.perf_counter()
    teacher_dir = work / "teacher"
    threads = torch.get_num_threads()
    if not check.cuda:
        torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1") or 1))
    try:
        train_digits_teacher(load_config(REPO / "configs" / "digits.yaml", teacher_settings).model.digits,
                             teacher_dir, progress=False)
    finally:
        torch.set_num_threads(threads)
    figures["teacher"] = {"steps": sizes.teacher_steps, "batch": sizes.teacher_batch, "device": "cpu",
                          "seconds": round(time.perf_counter() - started, 2)}
    check.say(f"digits teacher trained in {figures['teacher']['seconds']} s")

    common = ["--config", "configs/digits.yaml", *teacher_settings, f"model.path={teacher_dir}",
              f"model.device={device}", f"model.dtype={dtype}", f"data.cache_root={work / 'cache'}",
              f"data.num_samples={sizes.num_samples}", f"data.shard_size={sizes.shard_size}",
              f"pipeline.batch_size={sizes.gen_batch}", f"teacher.num_steps={sizes.teacher_num_steps}",
              f"student.num_steps={sizes.student_num_steps}", *sizes.extra]

    # 2. the teacher-target cache, in process (no Ray)
    proc = check.run("digits_generate", [sys.executable, "pipeline/generate_targets.py", *common,
                                         "pipeline.num_workers=0"], limit())
    reported = re.search(r"generated (\d+) samples in (\d+) shards in ([\d.]+) s \(([\d.]+) samples/s\)", proc.output)
    figures["generation"] = {"device": device, "dtype": dtype, "samples": sizes.num_samples,
                             "shard_size": sizes.shard_size, "batch": sizes.gen_batch,
                             "teacher_steps": sizes.teacher_num_steps, "guidance": "cfg (configs/digits.yaml)",
                             "wall_s": round(proc.seconds, 2)}
    if reported:
        figures["generation"].update(generated=int(reported.group(1)), shards=int(reported.group(2)),
                                     seconds=float(reported.group(3)), samples_per_s=float(reported.group(4)))
    if proc.returncode != 0 or not reported:
        figures["generation"]["output_tail"] = proc.tail()
        raise Stop("target generation " + ("killed at the time limit" if proc.timed_out
                                           else f"failed (exit {proc.returncode})"))

    # 3. training: uninterrupted (through the probe wrapper) | killed after step K, then re-run (resumes)
    train = [*common, f"train.global_batch_size={sizes.batch}", f"train.max_steps={sizes.max_steps}",
             f"train.checkpoint_every={sizes.checkpoint_every}", "train.eval_every=0", "train.log_every=1"]
    full_dir, killed_dir = work / "run_full", work / "run_killed"

    def launcher(script: str, output_dir: Path) -> list[str]:
        return [sys.executable, "-m", "deepspeed.launcher.runner", "--num_gpus", "1", "--master_port",
                str(free_port()), script, *train, f"train.output_dir={output_dir}"]

    figures["training"] = {"ranks": 1, "process_group": "nccl" if check.cuda else "gloo", "device": device,
                           "dtype": dtype, "batch": sizes.batch, "max_steps": sizes.max_steps,
                           "checkpoint_every": sizes.checkpoint_every, "killed_after_step": sizes.kill_after,
                           "student_steps": sizes.student_num_steps}
    # The uninterrupted run and the run to be killed run side by side (saves one start-up); the
    # throughput is taken from the resumed run, which runs alone.
    probe = work / "probe_full"
    running_full = check.start("digits_train_full", launcher("bench/gpu/train_probe.py", full_dir),
                               NOISEREFINE_GPU_PROBE=str(probe))
    running_killed = check.start("digits_train_killed", launcher("trainer/train.py", killed_dir),
                                 NOISEREFINE_TRAIN_EXIT_AFTER_STEP=str(sizes.kill_after))
    full = check.wait(running_full, limit())
    killed = check.wait(running_killed, limit())
    figures["full_run"] = run_figures(full, full_dir, concurrent=True)
    probe_file = Path(f"{probe}.rank0.json")
    if probe_file.is_file():
        figures["full_run"]["engine"] = json.loads(probe_file.read_text())
    if full.returncode != 0:
        figures["full_run"]["output_tail"] = full.tail()
        raise Stop("uninterrupted training " + ("killed at the time limit" if full.timed_out
                                                else f"failed (exit {full.returncode})"))

    logged = read_csv(killed_dir / "train_log.csv")
    checkpoints = sorted(p.name for p in (killed_dir / "checkpoints").glob("step*") if p.is_dir())
    figures["killed_run"] = {"exit": killed.returncode, "wall_s": round(killed.seconds, 2),
                             "steps_logged": len(logged), "checkpoints": checkpoints,
                             "refiner_written": (killed_dir / "refiner").exists()}
    if killed.timed_out or killed.returncode == 0 or len(logged) != sizes.kill_after:
        figures["killed_run"]["output_tail"] = killed.tail()
        raise Stop(f"the killed run did not stop after step {sizes.kill_after} (exit {killed.returncode}, "
                   f"{len(logged)} steps logged)")

    resumed = check.run("digits_train_resumed", launcher("trainer/train.py", killed_dir), limit())
    match = re.search(r"resuming from (\S+) at step (\d+)", resumed.output)
    start = int(match.group(2)) if match else 0
    figures["resumed_run"] = {"resumed_from_step": int(match.group(2)) if match else None,
                              **run_figures(resumed, killed_dir, first_step=start)}
    if resumed.returncode != 0 or not match:
        figures["resumed_run"]["output_tail"] = resumed.tail()
        raise Stop("the resumed run " + ("did not resume" if resumed.returncode == 0 else
                                         "killed at the time limit" if resumed.timed_out else
                                         f"failed (exit {resumed.returncode})"))
    figures["comparison"] = compare(full_dir, killed_dir)


def read_csv(path: Path) -> list[dict]:
    if not path.is_file():
        return []
    with open(path) as handle:
        return list(csv.DictReader(handle))


def run_figures(proc: Proc, run_dir: Path, first_step: int = 0, concurrent: bool = False) -> dict:
    """Exit, wall time, the loss curve and the throughput of one training run (rows after ``first_step``)."""
    figures: dict = {"exit": proc.returncode, "wall_s": round(proc.seconds, 2)}
    rows = read_csv(run_dir / "train_log.csv")
    if rows:
        losses = [float(r["loss"]) for r in rows]
        quarter = max(1, len(losses) // 4)
        figures.update(loss_first=losses[0], loss_last=losses[-1], losses=[round(x, 6) for x in losses],
                       loss_mean_first_quarter=statistics.mean(losses[:quarter]),
                       loss_mean_last_quarter=statistics.mean(losses[-quarter:]),
                       grad_norm_last=float(rows[-1]["grad_norm"]))
        # the first row of a (re)started run includes the warm-up; one row per step (train.log_every=1)
        rates = [float(r["samples_per_s"]) for r in rows if int(r["step"]) > first_step + 1]
        if rates:
            key = "samples_per_s_median_concurrent" if concurrent else "samples_per_s_median"
            figures[key] = round(statistics.median(rates), 2)
    done = run_dir / "done.json"
    if done.is_file():
        stats = json.loads(done.read_text())
        figures.update(final_loss=stats.get("final_loss"), peak_rss_mb=stats.get("peak_rss_mb"))
    return figures


def compare(full_dir: Path, killed_dir: Path) -> dict:
    import torch
    from safetensors.torch import load_file

    a = load_file(str(full_dir / "refiner" / "refiner.safetensors"))
    b = load_file(str(killed_dir / "refiner" / "refiner.safetensors"))
    if a.keys() != b.keys():
        raise Stop(f"the two refiners hold different tensors ({len(a)} vs {len(b)} keys)")
    diff = max(float((a[k].float() - b[k].float()).abs().max()) for k in a)
    finite = all(bool(torch.isfinite(v.float()).all()) for v in a.values())
    trained = any(float(v.float().abs().sum()) > 0 for k, v in a.items() if "lora_B" in k)
    losses = [[r["step"], r["loss"]] for r in read_csv(full_dir / "train_log.csv")]
    losses_b = [[r["step"], r["loss"]] for r in read_csv(killed_dir / "train_log.csv")]
    samples = (full_dir / "samples_rank0.jsonl").read_text() == (killed_dir / "samples_rank0.jsonl").read_text()
    if not finite:
        raise Stop("the uninterrupted run's refiner holds non-finite weights")
    return {"tensors": len(a), "dtypes": sorted({str(v.dtype).removeprefix("torch.") for v in a.values()}),
            "max_abs_diff": diff, "bit_equal": all(torch.equal(a[k], b[k]) for k in a),
            "train_log_losses_equal": losses == losses_b, "sample_order_equal": samples,
            "lora_B_trained": trained}

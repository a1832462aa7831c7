#!/usr/bin/env python3
"""Proof on a GPU: one command that runs the project's GPU paths and writes a report.

    python3 bench/gpu_check.py --out gpu-report                    # on the GPU machine (~4.5 min at most)
    .venv/bin/python bench/gpu_check.py --device cpu --tiny --out /tmp/gpu-check   # CPU smoke run (1-2 min)

Without CUDA it always runs the tiny CPU mode (``--out`` defaults to runs/gpu-check).

Writes ``gpu_report.json``, ``gpu_report.md`` and ``cases.log`` (every
subprocess's output) into ``--out``, and prints the Markdown report at the end.
Scratch files (teacher, cache, runs) go to ``--work`` (default: a temp dir,
removed at the end). Exit status 1 if any case failed.

Cases, by importance (each guarded: an exception, CUDA OOM included, is recorded
with its type and message and the next case runs; once ``--budget-s`` has
elapsed the remaining ones are recorded as "skipped: time budget"):

1. ``gpu_tests``: ``pytest -m gpu tests/test_gpu.py`` in a subprocess. Without
   CUDA it only collects them and is "skipped: no CUDA".
2. ``digits_deepspeed``: the embedded default end to end through the entry
   points: a tiny digit teacher (CPU), a 256-sample cache generated in process
   (``pipeline/generate_targets.py ... pipeline.num_workers=0``, bf16 on CUDA),
   then 1-rank DeepSpeed training (launcher, NCCL, bf16) for 24 steps with a
   checkpoint every 8: an uninterrupted run, and a run killed after step 12
   (``tests/hooks``) then resumed by re-running it; the two final refiners are
   compared.
3. Real size with random weights (``model.init=random``), bf16, one process per
   model (``bench/gpu/realsize.py``): SD 2.1 (64x64 latents) then SDXL (128x128):
   ``*_generation`` (bare forwards vs CFG+PAG target generation),
   ``*_losses`` (MSD vs full gradient, with and without activation
   checkpointing, time and peak memory vs N) and ``*_sampling`` (refined
   unguided vs CFG sampling at N = 25).

With ``--tiny`` every case runs on tiny models of the same classes (CPU).
Nothing here imports Ray.
"""

from __future__ import annotations

import time

STARTED = time.time()  # the time budget counts from here, before the heavy imports

import argparse  # noqa: E402
import csv  # noqa: E402
import datetime  # noqa: E402
import importlib.metadata  # noqa: E402
import importlib.util  # noqa: E402
import json  # noqa: E402
import os  # noqa: E402
import platform  # noqa: E402
import re  # noqa: E402
import shutil  # noqa: E402
import signal  # noqa: E402
import socket  # noqa: E402
import statistics  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
import traceback  # noqa: E402
from dataclasses import dataclass, field  # noqa: E402
from pathlib import Path  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from noiserefine.files import refuse_foreign_directory  # noqa: E402  (torch-free)

SCHEMA = "noiserefine.gpu_check/1"
CASES = {  # name -> title, in the order they run (by importance)
    "gpu_tests": "pytest -m gpu tests/test_gpu.py",
    "digits_deepspeed": "digits default end to end: teacher, cache, 1-rank DeepSpeed (bf16 on CUDA), kill + resume",
    "sd21_generation": "SD 2.1 random init: bare forwards vs CFG+PAG target generation",
    "sd21_losses": "SD 2.1 random init: MSD vs full-gradient training step vs N (time, peak memory)",
    "sd21_sampling": "SD 2.1 random init: refined unguided vs CFG sampling, N=25",
    "sdxl_generation": "SDXL random init: bare forwards vs CFG+PAG target generation",
    "sdxl_losses": "SDXL random init: MSD vs full-gradient training step vs N (time, peak memory)",
    "sdxl_sampling": "SDXL random init: refined unguided vs CFG sampling, N=25",
}
MODELS = ("sd21", "sdxl")
PACKAGES = ("torch", "diffusers", "peft", "deepspeed", "transformers", "accelerate", "webdataset", "omegaconf",
            "pydantic", "safetensors", "numpy", "pyarrow", "huggingface-hub", "pytest")
TAIL = 3000  # characters of a failing subprocess's output kept in the JSON


@dataclass
class Sizes:
    """The digits case's budget (GPU run, or --tiny)."""

    teacher_steps: int
    teacher_batch: int
    num_samples: int
    shard_size: int
    gen_batch: int
    teacher_num_steps: int
    student_num_steps: int
    batch: int
    max_steps: int
    checkpoint_every: int
    kill_after: int
    extra: list[str] = field(default_factory=list)


GPU_SIZES = Sizes(teacher_steps=30, teacher_batch=32, num_samples=256, shard_size=64, gen_batch=64,
                  teacher_num_steps=10, student_num_steps=10, batch=32, max_steps=24, checkpoint_every=8, kill_after=12)
TINY_SIZES = Sizes(teacher_steps=8, teacher_batch=16, num_samples=64, shard_size=32, gen_batch=32,
                   teacher_num_steps=3, student_num_steps=3, batch=8, max_steps=6, checkpoint_every=2, kill_after=3,
                   extra=["refiner.lora_rank=4", "refiner.lora_alpha=4.0", "train.num_loader_workers=0"])


# --- small helpers ---------------------------------------------------------------------------------------------

def now_iso() -> str:
    return datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def error_record(error: BaseException) -> dict:
    message = str(error).strip()
    oom = "out of memory" in message.lower() or type(error).__name__ == "OutOfMemoryError"
    return {"type": type(error).__name__, "message": message.splitlines()[0][:500] if message else "", "oom": oom,
            "traceback": traceback.format_exc(limit=8)[-2000:]}


def version(name: str) -> str | None:
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return None


def command_output(command: list[str], timeout: float = 20) -> str | None:
    try:
        done = subprocess.run(command, capture_output=True, text=True, timeout=timeout)
    except (OSError, subprocess.SubprocessError):
        return None
    return done.stdout.strip() if done.returncode == 0 else None


@dataclass
class Proc:
    returncode: int | None  # None: killed at its time limit
    output: str
    seconds: float

    @property
    def timed_out(self) -> bool:
        return self.returncode is None

    def tail(self, size: int = TAIL) -> str:
        return self.output[-size:]


class Stop(Exception):
    """A step of a case could not complete (its message is the case's failure reason)."""


# --- the check -------------------------------------------------------------------------------------------------

class Check:
    def __init__(self, args):
        self.args = args
        self.out: Path = args.out.resolve()
        refuse_foreign_directory(self.out, "cases.log", "an output folder of bench/gpu_check.py (--out)",
                                 also_ours=("gpu_report.json",))  # a user's folder: nothing replaced
        self.out.mkdir(parents=True, exist_ok=True)
        self.work: Path = (args.work or Path(tempfile.mkdtemp(prefix="noiserefine-gpu-check-"))).resolve()
        self.work.mkdir(parents=True, exist_ok=True)
        self.deadline = STARTED + args.budget_s
        self.cuda = args.device == "cuda"
        self.selected = args.cases
        self.results: dict[str, dict] = {}
        self.log_path = self.out / "cases.log"
        self.log_path.write_text(f"gpu_check {now_iso()} device {args.device} tiny {args.tiny}\n")
        self.started_iso = now_iso()
        self._environment: dict = {}

    # budget and logging
    def remaining(self) -> float:
        return self.deadline - time.time()

    def say(self, text: str) -> None:
        line = f"[gpu_check {time.time() - STARTED:6.1f}s] {text}"
        print(line, flush=True)
        with open(self.log_path, "a") as handle:
            handle.write(line + "\n")

    def record(self, name: str, status: str, seconds: float = 0.0, figures: dict | None = None, reason: str = "",
               error: dict | None = None) -> None:
        summary = status + (f": {reason}" if reason else "")
        self.results[name] = {"name": name, "title": CASES[name], "status": status, "reason": reason,
                              "summary": summary, "seconds": round(seconds, 2), "figures": figures or {},
                              "error": error}
        self.say(f"{name}: {summary} ({seconds:.1f} s)" + (f" [{error['type']}: {error['message']}]" if error else ""))
        self.write_report(final=False)

    def child_env(self, **extra: str) -> dict:
        drop = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_SIZE", "MASTER_ADDR", "MASTER_PORT",
                "NOISEREFINE_TRAIN_EXIT_AFTER_STEP", "NOISEREFINE_FAULT_EXIT_ONCE", "NOISEREFINE_GPU_PROBE")
        env = {k: v for k, v in os.environ.items() if k not in drop}
        paths = [str(REPO)] + ([env["PYTHONPATH"]] if env.get("PYTHONPATH") else [])
        if "NOISEREFINE_TRAIN_EXIT_AFTER_STEP" in extra:  # test-only fault injection, from outside the library
            paths.insert(0, str(REPO / "tests" / "hooks"))
        # No network on the GPU machine: nothing may wait on the Hugging Face hub (random init, local teacher).
        env.update(PYTHONPATH=os.pathsep.join(paths), PYTHONUNBUFFERED="1", HF_HUB_OFFLINE="1")
        if not self.cuda:
            env.update(DS_ACCELERATOR="cpu", OMP_NUM_THREADS=env.get("OMP_NUM_THREADS", "1"))
        env.update(extra)
        return env

    def start(self, label: str, command: list[str], **env: str) -> tuple:
        """Start ``command`` in the repo root (own process group), its output to a file (see :meth:`wait`)."""
        self.say(f"{label}: {' '.join(command)}")
        log = self.work / f"{label}.log"
        handle = open(log, "w")
        proc = subprocess.Popen(command, cwd=REPO, env=self.child_env(**env), stdout=handle,
                                stderr=subprocess.STDOUT, text=True, start_new_session=True)
        return label, command, proc, handle, log, time.perf_counter()

    def wait(self, running: tuple, timeout: float) -> Proc:
        """Wait for a started command; its whole process group is killed after ``timeout`` seconds."""
        label, command, proc, handle, log, started = running
        try:
            code: int | None = proc.wait(timeout=max(1.0, timeout))
        except subprocess.TimeoutExpired:
            code = None
            try:
                os.killpg(proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            proc.wait()
        handle.close()
        seconds = time.perf_counter() - started
        output = log.read_text(errors="replace")
        with open(self.log_path, "a") as out:
            out.write(f"\n===== {label} (exit {code if code is not None else 'KILLED at its time limit'}, "
                      f"{seconds:.1f} s): {' '.join(command)}\n{output}\n===== end {label}\n")
        self.say(f"{label}: exit {code if code is not None else 'killed (time limit)'} after {seconds:.1f} s")
        return Proc(code, output, seconds)

    def run(self, label: str, command: list[str], timeout: float, **env: str) -> Proc:
        return self.wait(self.start(label, command, **env), timeout)

    # --- case 1 -----------------------------------------------------------------------------------------------
    def case_gpu_tests(self) -> None:
        name = "gpu_tests"
        base = [sys.executable, "-m", "pytest", "-m", "gpu", "tests/test_gpu.py", "-p", "no:cacheprovider"]
        cap = 60 if self.args.tiny else 120
        if not self.cuda:
            proc = self.run(name, base + ["--collect-only", "-q"], min(cap, self.remaining()))
            collected = re.findall(r"^tests/test_gpu\.py::(\S+)$", proc.output, flags=re.M)
            figures = {"collected": len(collected), "tests": collected, "seconds_collect": round(proc.seconds, 2)}
            if proc.returncode == 0 and collected:
                self.record(name, "skipped", proc.seconds, figures, reason="no CUDA")
            else:
                self.record(name, "failed", proc.seconds, {**figures, "output_tail": proc.tail()},
                            reason=f"collecting the gpu tests failed (exit {proc.returncode})")
            return
        proc = self.run(name, base + ["-q", "-rA"], min(cap, self.remaining()))
        counts = {key: int(n) for n, key in re.findall(r"(\d+) (passed|failed|errors?|skipped)", proc.output)}
        figures = {"passed": counts.get("passed", 0), "failed": counts.get("failed", 0),
                   "errors": counts.get("error", 0) + counts.get("errors", 0), "skipped": counts.get("skipped", 0),
                   "passed_tests": re.findall(r"^PASSED (\S+)", proc.output, flags=re.M),
                   "failed_tests": re.findall(r"^(?:FAILED|ERROR) (\S+)", proc.output, flags=re.M)}
        if proc.returncode == 0 and figures["passed"] > 0:
            self.record(name, "ok", proc.seconds, figures)
        else:
            reason = "killed at its time limit" if proc.timed_out else f"pytest exit {proc.returncode}"
            self.record(name, "failed", proc.seconds, {**figures, "output_tail": proc.tail()}, reason=reason)

    # --- case 2 -----------------------------------------------------------------------------------------------
    def case_digits(self) -> None:
        name = "digits_deepspeed"
        sizes = TINY_SIZES if self.args.tiny else GPU_SIZES
        cap_end = time.time() + (150 if self.args.tiny else 130)  # leave the real-size cases their share

        def limit() -> float:
            return min(cap_end, self.deadline) - time.time()

        started = time.perf_counter()
        figures: dict = {}
        try:
            self._digits(sizes, figures, limit)
        except Stop as stop:
            self.record(name, "failed", time.perf_counter() - started, figures, reason=str(stop))
            return
        except Exception as error:  # noqa: BLE001
            self.record(name, "failed", time.perf_counter() - started, figures, reason="exception",
                        error=error_record(error))
            return
        self.record(name, "ok", time.perf_counter() - started, figures)

    def _digits(self, sizes: Sizes, figures: dict, limit) -> None:
        from noiserefine.config import load_config
        from noiserefine.digits.teacher import train_digits_teacher

        work = self.work / "digits"
        work.mkdir(parents=True, exist_ok=True)
        device, dtype = ("cuda", "bfloat16") if self.cuda else ("cpu", "bfloat16")
        digits_yaml = REPO / "configs" / "digits.yaml"
        teacher_settings = [f"model.digits.train_steps={sizes.teacher_steps}",
                            f"model.digits.batch_size={sizes.teacher_batch}"]

        # 1. teacher (CPU, in this process; one thread in the CPU mode, where the machine may be busy)
        import torch

        started = time.perf_counter()
        teacher_dir = work / "teacher"
        threads = torch.get_num_threads()
        if not self.cuda:
            torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1") or 1))
        try:
            train_digits_teacher(load_config(digits_yaml, teacher_settings).model.digits, teacher_dir, progress=False)
        finally:
            torch.set_num_threads(threads)
        figures["teacher"] = {"steps": sizes.teacher_steps, "batch": sizes.teacher_batch, "device": "cpu",
                              "seconds": round(time.perf_counter() - started, 2)}
        self.say(f"digits teacher trained in {figures['teacher']['seconds']} s")

        common = ["--config", "configs/digits.yaml", *teacher_settings, f"model.path={teacher_dir}",
                  f"model.device={device}", f"model.dtype={dtype}", f"data.cache_root={work / 'cache'}",
                  f"data.num_samples={sizes.num_samples}", f"data.shard_size={sizes.shard_size}",
                  f"pipeline.batch_size={sizes.gen_batch}", f"teacher.num_steps={sizes.teacher_num_steps}",
                  f"student.num_steps={sizes.student_num_steps}", *sizes.extra]

        # 2. the teacher-target cache, in process (no Ray)
        proc = self.run("digits_generate", [sys.executable, "pipeline/generate_targets.py", *common,
                                            "pipeline.num_workers=0"], limit())
        reported = re.search(r"generated (\d+) samples in (\d+) shards in ([\d.]+) s \(([\d.]+) samples/s\)",
                             proc.output)
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

        figures["training"] = {"ranks": 1, "process_group": "nccl" if self.cuda else "gloo", "device": device,
                               "dtype": dtype, "batch": sizes.batch, "max_steps": sizes.max_steps,
                               "checkpoint_every": sizes.checkpoint_every, "killed_after_step": sizes.kill_after,
                               "student_steps": sizes.student_num_steps}
        # The uninterrupted run and the run to be killed run side by side (saves one start-up); the
        # throughput is taken from the resumed run, which runs alone.
        probe = work / "probe_full"
        running_full = self.start("digits_train_full", launcher("bench/gpu/train_probe.py", full_dir),
                                  NOISEREFINE_GPU_PROBE=str(probe))
        running_killed = self.start("digits_train_killed", launcher("trainer/train.py", killed_dir),
                                    NOISEREFINE_TRAIN_EXIT_AFTER_STEP=str(sizes.kill_after))
        full = self.wait(running_full, limit())
        killed = self.wait(running_killed, limit())
        figures["full_run"] = self._run_figures(full, full_dir, sizes, concurrent=True)
        probe_file = Path(f"{probe}.rank0.json")
        if probe_file.is_file():
            figures["full_run"]["engine"] = json.loads(probe_file.read_text())
        if full.returncode != 0:
            figures["full_run"]["output_tail"] = full.tail()
            raise Stop("uninterrupted training " + ("killed at the time limit" if full.timed_out
                                                    else f"failed (exit {full.returncode})"))

        logged = self._read_csv(killed_dir / "train_log.csv")
        checkpoints = sorted(p.name for p in (killed_dir / "checkpoints").glob("step*") if p.is_dir())
        figures["killed_run"] = {"exit": killed.returncode, "wall_s": round(killed.seconds, 2),
                                 "steps_logged": len(logged), "checkpoints": checkpoints,
                                 "refiner_written": (killed_dir / "refiner").exists()}
        if killed.timed_out or killed.returncode == 0 or len(logged) != sizes.kill_after:
            figures["killed_run"]["output_tail"] = killed.tail()
            raise Stop(f"the killed run did not stop after step {sizes.kill_after} (exit {killed.returncode}, "
                       f"{len(logged)} steps logged)")

        resumed = self.run("digits_train_resumed", launcher("trainer/train.py", killed_dir), limit())
        match = re.search(r"resuming from (\S+) at step (\d+)", resumed.output)
        start = int(match.group(2)) if match else 0
        figures["resumed_run"] = {"resumed_from_step": int(match.group(2)) if match else None,
                                  **self._run_figures(resumed, killed_dir, sizes, first_step=start)}
        if resumed.returncode != 0 or not match:
            figures["resumed_run"]["output_tail"] = resumed.tail()
            raise Stop("the resumed run " + ("did not resume" if resumed.returncode == 0 else
                                             "killed at the time limit" if resumed.timed_out else
                                             f"failed (exit {resumed.returncode})"))
        figures["comparison"] = self._compare(full_dir, killed_dir)

    @staticmethod
    def _read_csv(path: Path) -> list[dict]:
        if not path.is_file():
            return []
        with open(path) as handle:
            return list(csv.DictReader(handle))

    def _run_figures(self, proc: Proc, run_dir: Path, sizes: Sizes, first_step: int = 0,
                     concurrent: bool = False) -> dict:
        """Exit, wall time, the loss curve and the throughput of one training run (rows after ``first_step``)."""
        figures: dict = {"exit": proc.returncode, "wall_s": round(proc.seconds, 2)}
        rows = self._read_csv(run_dir / "train_log.csv")
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

    @staticmethod
    def _compare(full_dir: Path, killed_dir: Path) -> dict:
        import torch
        from safetensors.torch import load_file

        a = load_file(str(full_dir / "refiner" / "refiner.safetensors"))
        b = load_file(str(killed_dir / "refiner" / "refiner.safetensors"))
        if a.keys() != b.keys():
            raise Stop(f"the two refiners hold different tensors ({len(a)} vs {len(b)} keys)")
        diff = max(float((a[k].float() - b[k].float()).abs().max()) for k in a)
        finite = all(bool(torch.isfinite(v.float()).all()) for v in a.values())
        trained = any(float(v.float().abs().sum()) > 0 for k, v in a.items() if "lora_B" in k)
        losses = [[r["step"], r["loss"]] for r in Check._read_csv(full_dir / "train_log.csv")]
        losses_b = [[r["step"], r["loss"]] for r in Check._read_csv(killed_dir / "train_log.csv")]
        samples = (full_dir / "samples_rank0.jsonl").read_text() == (killed_dir / "samples_rank0.jsonl").read_text()
        if not finite:
            raise Stop("the uninterrupted run's refiner holds non-finite weights")
        return {"tensors": len(a), "dtypes": sorted({str(v.dtype).removeprefix("torch.") for v in a.values()}),
                "max_abs_diff": diff, "bit_equal": all(torch.equal(a[k], b[k]) for k in a),
                "train_log_losses_equal": losses == losses_b, "sample_order_equal": samples,
                "lora_B_trained": trained}

    # --- case 3 -----------------------------------------------------------------------------------------------
    def case_model(self, model: str, reserve_after: float) -> None:
        names = [f"{model}_{case}" for case in ("generation", "losses", "sampling")]
        wanted = [n for n in names if n in self.selected]
        least = 5 if self.args.tiny else 25  # start-up and model build: not worth starting with less left
        if self.remaining() <= least:
            for n in wanted:
                self.record(n, "skipped", reason="time budget")
            return
        # Leave the later models their reserve if that still leaves this one a fair share; else (being
        # more important) this one takes all that is left.
        deadline = self.deadline - reserve_after
        if deadline - time.time() < (15 if self.args.tiny else 45):
            deadline = self.deadline
        results = self.work / f"{model}.jsonl"
        results.unlink(missing_ok=True)
        command = [sys.executable, "bench/gpu/realsize.py", "--model", model, "--device",
                   "cuda" if self.cuda else "cpu", "--deadline", f"{deadline:.1f}", "--results", str(results),
                   "--cases", ",".join(n.split("_", 1)[1] for n in wanted)] + (["--tiny"] if self.args.tiny else [])
        # killed a little after its own deadline (a measurement in flight), never past the budget
        proc = self.run(f"realsize_{model}", command, min(deadline + 15, self.deadline + 5) - time.time())
        started, partial, done = set(), {}, {}
        if results.is_file():
            for line in results.read_text().splitlines():
                entry = json.loads(line)
                if entry.get("event") == "start":
                    started.add(entry["case"])
                elif entry.get("event") == "partial":
                    partial[entry["case"]] = entry["figures"]
                else:
                    done[entry["case"]] = entry
        for n in wanted:
            if n in done:
                entry = done[n]
                figures = entry["figures"]
                if entry["status"] == "failed" and proc.returncode not in (0, None):
                    figures = {**figures, "output_tail": proc.tail()}
                self.record(n, entry["status"], entry["seconds"], figures, entry.get("reason", ""), entry.get("error"))
            elif proc.timed_out:
                if n in started:
                    self.record(n, "failed", 0.0, {**partial.get(n, {}), "output_tail": proc.tail(1500)},
                                reason="killed at the time budget while running"
                                       + (" (the measurements it finished are kept)" if n in partial else ""))
                else:
                    self.record(n, "skipped", reason="time budget")
            else:
                self.record(n, "failed", proc.seconds, {"output_tail": proc.tail()},
                            reason=f"the measuring process ended (exit {proc.returncode}) before this case")

    # --- driver -----------------------------------------------------------------------------------------------
    def guarded(self, name: str, fn, *args) -> None:
        if self.remaining() <= 0:
            self.record(name, "skipped", reason="time budget")
            return
        started = time.perf_counter()
        try:
            fn(*args)
        except Exception as error:  # noqa: BLE001 - a crash of the check itself is a failed case
            self.record(name, "failed", time.perf_counter() - started, reason="exception", error=error_record(error))
        finally:
            if self.cuda:
                try:
                    import torch

                    torch.cuda.empty_cache()
                except Exception:  # noqa: BLE001
                    pass

    def run_all(self) -> None:
        if "gpu_tests" in self.selected:
            self.guarded("gpu_tests", self.case_gpu_tests)
        if "digits_deepspeed" in self.selected:
            self.guarded("digits_deepspeed", self.case_digits)
        models = [m for m in MODELS if any(n.startswith(m + "_") for n in self.selected)]
        for index, model in enumerate(models):
            later = models[index + 1:]
            reserve = sum((20 if self.args.tiny else 75) for _ in later)
            try:
                self.case_model(model, reserve)
            except Exception as error:  # noqa: BLE001
                for n in CASES:
                    if n.startswith(model + "_") and n in self.selected and n not in self.results:
                        self.record(n, "failed", reason="exception", error=error_record(error))

    # --- report -----------------------------------------------------------------------------------------------
    def environment(self) -> dict:
        env: dict = {"date": self.started_iso, "python": platform.python_version(), "platform": platform.platform(),
                     "hostname": socket.gethostname(), "cpu_count": os.cpu_count(), "executable": sys.executable,
                     "packages": {name: version(name) for name in PACKAGES},
                     "ray_installed": importlib.util.find_spec("ray") is not None,
                     "ray_imported": "ray" in sys.modules}
        commit = command_output(["git", "-C", str(REPO), "rev-parse", "HEAD"], timeout=5)
        env["git_commit"] = commit
        try:
            import torch

            env["torch"] = torch.__version__
            env["torch_cuda"] = torch.version.cuda
            env["cuda_available"] = torch.cuda.is_available()
            if self.cuda and torch.cuda.is_available():
                props = torch.cuda.get_device_properties(0)
                env.update(device=torch.cuda.get_device_name(0), device_count=torch.cuda.device_count(),
                           capability=f"{props.major}.{props.minor}", memory_gb=round(props.total_memory / 2**30, 2),
                           cudnn=torch.backends.cudnn.version())
                try:
                    nccl = torch.cuda.nccl.version()
                    env["nccl"] = ".".join(map(str, nccl)) if isinstance(nccl, tuple) else str(nccl)
                except Exception as error:  # noqa: BLE001
                    env["nccl"] = f"unknown ({type(error).__name__})"
            else:
                env["device"] = f"cpu ({platform.processor() or platform.machine()})"
        except Exception as error:  # noqa: BLE001
            env["torch_error"] = f"{type(error).__name__}: {error}"
        smi = command_output(["nvidia-smi", "--query-gpu=name,driver_version,memory.total",
                              "--format=csv,noheader"]) if shutil.which("nvidia-smi") else None
        env["nvidia_smi"] = smi
        if smi:
            parts = [p.strip() for p in smi.splitlines()[0].split(",")]
            if len(parts) >= 2:
                env["driver"] = parts[1]
            cuda_line = command_output(["nvidia-smi"])
            found = re.search(r"CUDA Version:\s*([\d.]+)", cuda_line or "")
            env["driver_cuda"] = found.group(1) if found else None
        return env

    def goals(self) -> list[dict]:
        rows = []

        def add(name, value, target, met):
            rows.append({"goal": name, "value": value, "target": target, "met": met})

        gpu = self.results.get("gpu_tests")
        if gpu:
            f = gpu["figures"]
            add("gpu tests pass", f"{f.get('passed', 0)} passed, {f.get('failed', 0)} failed" if gpu["status"] != "skipped"
                else gpu["summary"], "all pass", gpu["status"] == "ok" if gpu["status"] != "skipped" else None)
        digits = self.results.get("digits_deepspeed")
        if digits and "comparison" in digits["figures"]:
            c = digits["figures"]["comparison"]
            add("kill + resume = uninterrupted (refiner)", f"max |diff| {c['max_abs_diff']:.3g}, bit-equal {c['bit_equal']}",
                "bit-equal (reported; GPU kernels may differ)", c["bit_equal"])
            full = digits["figures"].get("full_run", {})
            engine = full.get("engine", {})
            if engine and self.cuda:  # ds_config turns bf16 on only on CUDA with a bf16 model
                add("DeepSpeed bf16 on (digits run)", f"{engine.get('optimizer')}, bf16={engine.get('bf16')}, "
                    f"LoRA {','.join(engine.get('lora_dtypes', []))}", "bf16 on", bool(engine.get("bf16")))
            if "loss_mean_first_quarter" in full:
                add("digits loss drops", f"{full['loss_mean_first_quarter']:.4g} -> {full['loss_mean_last_quarter']:.4g}",
                    "last quarter < first quarter", full["loss_mean_last_quarter"] < full["loss_mean_first_quarter"])
        for model in MODELS:
            gen = self.results.get(f"{model}_generation", {}).get("figures", {})
            if "ratio_bare_over_generation" in gen:
                add(f"{model}: generation / bare forwards", gen["ratio_bare_over_generation"], ">= 0.9", gen["goal_met"])
            losses = self.results.get(f"{model}_losses", {}).get("figures", {})
            for key, value in losses.items():
                if key.startswith("msd_step_peak_ratio"):
                    add(f"{model}: MSD step peak memory {key.removeprefix('msd_step_peak_ratio_')}", value, "<= 1.1",
                        losses.get("msd_memory_goal_met"))
            for key, value in losses.items():
                if key.startswith("msd_over_full_gradient"):
                    add(f"{model}: {key.replace('_', ' ')}", value, "<= 0.5", value <= 0.5)
            if losses.get("rows"):
                add(f"{model}: full gradient (no checkpointing) out of memory at N", losses.get("full_gradient_oom_at_N"),
                    "recorded", None)
            sampling = self.results.get(f"{model}_sampling", {}).get("figures", {})
            if "ratio_refined_over_cfg" in sampling:
                add(f"{model}: refined / CFG sampling time", sampling["ratio_refined_over_cfg"], "<= 0.55",
                    sampling["goal_met"])
        return rows

    def report(self, final: bool) -> dict:
        cases = [self.results.get(name) or {"name": name, "title": CASES[name], "status": "skipped",
                                            "reason": "not run yet" if not final else "not selected",
                                            "summary": "skipped: " + ("not run yet" if not final else "not selected"),
                                            "seconds": 0.0, "figures": {}, "error": None}
                 for name in CASES]
        return {"schema": SCHEMA, "started": self.started_iso, "finished": now_iso() if final else None,
                "wall_s": round(time.time() - STARTED, 1), "budget_s": self.args.budget_s,
                "mode": {"device": self.args.device, "tiny": self.args.tiny, "cases": sorted(self.selected)},
                "environment": self._environment if final else {}, "cases": cases, "goals": self.goals(),
                "complete": final}

    def write_report(self, final: bool) -> dict:
        if final:
            self._environment = self.environment()
        data = self.report(final)
        tmp = self.out / ".gpu_report.json.tmp"
        tmp.write_text(json.dumps(data, indent=2, default=str) + "\n")
        tmp.replace(self.out / "gpu_report.json")
        (self.out / "gpu_report.md").write_text(markdown(data))
        return data


# --- markdown ----------------------------------------------------------------------------------------------------

def fmt(value) -> str:
    """A table cell."""
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, float):
        return f"{value:.4g}"
    return "" if value is None else str(value).replace("|", "\\|")


def key_figures(case: dict) -> str:
    f, name = case["figures"], case["name"]
    parts: list[str] = []
    if name == "gpu_tests":
        if "collected" in f:
            parts.append(f"{f['collected']} collected")
        else:
            parts.append(f"{f.get('passed', 0)} passed, {f.get('failed', 0)} failed, {f.get('errors', 0)} errors")
            if f.get("failed_tests"):
                parts.append("failed: " + ", ".join(f["failed_tests"]))
    elif name == "digits_deepspeed":
        gen, full, cmp = f.get("generation", {}), f.get("full_run", {}), f.get("comparison", {})
        engine = full.get("engine", {})
        if "samples_per_s" in gen:
            parts.append(f"cache {gen['generated']} samples at {gen['samples_per_s']:.4g}/s")
        if "loss_first" in full:
            parts.append(f"loss {full['loss_first']:.4g} -> {full['loss_last']:.4g}")
        resumed = f.get("resumed_run", {})
        if "samples_per_s_median" in resumed:
            parts.append(f"train {resumed['samples_per_s_median']:.4g} samples/s")
        if engine:
            parts.append(f"{engine.get('optimizer')} bf16={engine.get('bf16')}")
            if engine.get("cuda_max_memory_allocated_gb") is not None:
                parts.append(f"peak {engine['cuda_max_memory_allocated_gb']:.3g} GB")
        if cmp:
            parts.append(f"resume max|diff| {cmp['max_abs_diff']:.3g} (bit-equal {fmt(cmp['bit_equal'])})")
    elif name.endswith("_generation") and "ratio_bare_over_generation" in f:
        parts.append(f"bare/gen {f['ratio_bare_over_generation']:.3g} (goal >= 0.9); "
                     f"{f['generation_samples_per_s']:.3g} vs {f['bare_samples_per_s']:.3g} samples/s, "
                     f"batch {f['batch']} x3, N'={f['teacher_steps']}")
    elif name.endswith("_sampling") and "ratio_refined_over_cfg" in f:
        parts.append(f"refined/CFG {f['ratio_refined_over_cfg']:.3g} (goal <= 0.55), batch {f['batch']}, "
                     f"N={f['steps']}")
    elif name.endswith("_losses") and "rows" in f:
        parts.append(f"batch {f['batch']}, LoRA rank {f['lora_rank']}")
        for key, value in f.items():
            if key.startswith(("msd_step_peak_ratio", "msd_over_")):
                parts.append(f"{key} {fmt(value)}")
        parts.append(f"FG OOM at N={fmt(f.get('full_gradient_oom_at_N')) or 'none'}")
    if case.get("error"):
        parts.append(f"{case['error']['type']}: {case['error']['message'][:160]}")
    return "; ".join(parts).replace("|", "\\|")


def loss_table(case: dict) -> list[str]:
    rows = case["figures"].get("rows") or []
    if not rows:
        return []
    lines = [f"\n### {case['name']} (batch {case['figures'].get('batch')})\n",
             "| loss | checkpointing | N | status | s/step | peak GB | step peak GB |",
             "|---|---|---|---|---|---|---|"]
    for r in rows:
        status = r["status"] + (f" ({r['reason']})" if r.get("reason") else "")
        if r.get("error") and r["status"] != "oom":
            status += f" {r['error']['type']}: {r['error']['message'][:80]}"
        lines.append(f"| {r['loss']} | {fmt(r['checkpointing'])} | {r['steps']} | {status.replace('|', '/')} | "
                     f"{fmt(r.get('seconds'))} | {fmt(r.get('peak_gb'))} | {fmt(r.get('step_peak_gb'))} |")
    return lines


def markdown(data: dict) -> str:
    env = data["environment"]
    packages = env.get("packages", {})
    lines = ["# NoiseRefine GPU check", "",
             f"- date: {data['started']}; wall {data['wall_s']} s (budget {data['budget_s']} s); "
             f"mode: device {data['mode']['device']}{', tiny models' if data['mode']['tiny'] else ''}"
             + ("" if data["complete"] else " (INCOMPLETE: written while running)")]
    if env:
        lines += [f"- device: {env.get('device')} ({env.get('memory_gb', '?')} GB, capability {env.get('capability', '?')})"
                  f"; driver {env.get('driver')} (CUDA {env.get('driver_cuda')})",
                  f"- torch {env.get('torch')} (CUDA {env.get('torch_cuda')}, cuDNN {env.get('cudnn')}, NCCL "
                  f"{env.get('nccl')}); python {env.get('python')}; " + ", ".join(
                      f"{k} {v}" for k, v in packages.items() if k not in ("torch",) and v),
                  f"- ray installed: {fmt(env.get('ray_installed'))}, imported by the check: "
                  f"{fmt(env.get('ray_imported'))}; git {env.get('git_commit') or 'n/a'}"]
    lines += ["", "| # | case | status | seconds | figures |", "|---|---|---|---|---|"]
    for index, case in enumerate(data["cases"], start=1):
        lines.append(f"| {index} | {case['name']} | {case['summary'].replace('|', '/')} | {case['seconds']:.1f} | "
                     f"{key_figures(case)} |")
    if data["goals"]:
        lines += ["", "| goal | value | target | met |", "|---|---|---|---|"]
        for goal in data["goals"]:
            lines.append(f"| {goal['goal']} | {fmt(goal['value'])} | {goal['target']} | "
                         f"{'n/a' if goal['met'] is None else fmt(goal['met'])} |")
    for case in data["cases"]:
        lines += loss_table(case)
    return "\n".join(lines) + "\n"


# --- command line ------------------------------------------------------------------------------------------------

def select_cases(spec: str) -> set[str]:
    if not spec:
        return set(CASES)
    chosen = set()
    for item in spec.split(","):
        item = item.strip()
        matches = [n for n in CASES if n == item or n.startswith(item + "_") or n.startswith(item)]
        if not matches:
            raise SystemExit(f"--cases: {item!r} matches none of {list(CASES)}")
        chosen.update(matches)
    return chosen


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    parser.add_argument("--out", type=Path, default=Path("runs/gpu-check"),
                        help="where gpu_report.json/.md and cases.log go (default runs/gpu-check)")
    parser.add_argument("--device", choices=["auto", "cuda", "cpu"], default="auto")
    parser.add_argument("--tiny", action="store_true", help="tiny models of the same classes (the CPU smoke run)")
    parser.add_argument("--budget-s", type=float, default=270.0,
                        help="after this many seconds the remaining cases are skipped (default 270)")
    parser.add_argument("--work", type=Path, default=None, help="scratch directory (default: a temp dir, removed)")
    parser.add_argument("--keep-work", action="store_true", help="keep the scratch directory")
    parser.add_argument("--cases", default="", help=f"comma list of cases or prefixes (default all): {list(CASES)}")
    args = parser.parse_args(argv)
    args.cases = select_cases(args.cases)
    if args.device == "auto":
        import torch

        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    if args.device == "cuda":
        import torch

        if not torch.cuda.is_available():
            parser.error("--device cuda but torch sees no CUDA device")
    elif not args.tiny:  # real-size models on the CPU would take hours (and `make bench` runs this without args)
        print("gpu_check: no CUDA device: running the CPU mode on tiny models (--tiny)", flush=True)
        args.tiny = True

    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # the teacher is trained in this process; never wait on the hub
    check = Check(args)
    check.say(f"device {args.device}, tiny {args.tiny}, budget {args.budget_s:.0f} s, work {check.work}, "
              f"out {args.out}")
    interrupted = False
    try:
        check.run_all()
    except KeyboardInterrupt:
        interrupted = True
        check.say("interrupted: writing the report of what finished")
    data = check.write_report(final=True)
    if not args.keep_work and args.work is None:
        shutil.rmtree(check.work, ignore_errors=True)
    print("\n" + markdown(data), flush=True)
    failed = [c["name"] for c in data["cases"] if c["status"] == "failed"]
    print(f"report: {args.out / 'gpu_report.json'}, {args.out / 'gpu_report.md'}; wall {data['wall_s']} s; "
          + (f"FAILED: {', '.join(failed)}" if failed else "no case failed"), flush=True)
    return 1 if failed or interrupted else 0


if __name__ == "__main__":
    sys.exit(main())

"""bench/gpu_check.py, the one-command GPU proof, in its CPU mode (``--device cpu --tiny``).

The whole check runs once per module in a subprocess on tiny models of the same
classes (1-2.5 minutes on 2 busy cores: a dozen Python processes start; marked
``slow``: ``make test``, not ``make check``). The OOM guard is tested in process.
The GPU numbers themselves come from running it on a GPU machine (``bash bench/gpu_run.sh``).
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
CHECK = REPO / "bench" / "gpu_check.py"
# Subprocesses, DeepSpeed and teacher training: `make test` only (not the `make check` lane), like tests/test_trainer.py.
SLOW = pytest.mark.slow
CASES = ["gpu_tests", "digits_deepspeed", "sd21_generation", "sd21_losses", "sd21_sampling", "sdxl_generation",
         "sdxl_losses", "sdxl_sampling"]


def run_check(out: Path, *args: str, timeout: float = 900) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(CHECK), "--device", "cpu", "--tiny", "--out", str(out), *args],
                          cwd=REPO, capture_output=True, text=True, timeout=timeout,
                          env={**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"})


@pytest.fixture(scope="module")
def tiny_check(tmp_path_factory):
    out = tmp_path_factory.mktemp("gpu-check") / "report"
    done = run_check(out, "--budget-s", "900")
    return out, done


@SLOW
def test_cpu_mode_runs_every_case(tiny_check):
    out, done = tiny_check
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-4000:]
    assert {p.name for p in out.iterdir()} == {"gpu_report.json", "gpu_report.md", "cases.log"}
    report = json.loads((out / "gpu_report.json").read_text())
    assert report["schema"] == "noiserefine.gpu_check/1" and report["complete"] is True
    assert report["mode"] == {"device": "cpu", "tiny": True, "cases": sorted(CASES)}
    assert {"started", "finished", "wall_s", "budget_s", "environment", "cases", "goals"} <= report.keys()
    env = report["environment"]
    for key in ("date", "python", "torch", "torch_cuda", "device", "nvidia_smi", "packages"):
        assert key in env, key
    assert {"diffusers", "peft", "deepspeed"} <= {k for k, v in env["packages"].items() if v}
    assert env["ray_imported"] is False

    cases = {case["name"]: case for case in report["cases"]}
    assert [case["name"] for case in report["cases"]] == CASES
    for case in report["cases"]:
        assert {"status", "reason", "summary", "seconds", "figures", "error"} <= case.keys()
    assert cases["gpu_tests"]["summary"] == "skipped: no CUDA"
    assert cases["gpu_tests"]["figures"]["collected"] >= 4  # the gpu tests at least import and collect
    for name in CASES[1:]:
        assert cases[name]["status"] == "ok", (name, cases[name])
        assert cases[name]["error"] is None

    # the printed end of the run is the Markdown report
    assert "| # | case | status | seconds | figures |" in done.stdout.split("# NoiseRefine GPU check")[-1]
    assert (out / "gpu_report.md").read_text().startswith("# NoiseRefine GPU check")


@SLOW
def test_cpu_mode_digits_kill_and_resume(tiny_check):
    out, _ = tiny_check
    figures = next(c for c in json.loads((out / "gpu_report.json").read_text())["cases"]
                   if c["name"] == "digits_deepspeed")["figures"]
    assert figures["generation"]["generated"] == 64 and figures["generation"]["samples_per_s"] > 0
    assert figures["killed_run"]["exit"] not in (0, None) and figures["killed_run"]["steps_logged"] == 3
    assert figures["killed_run"]["checkpoints"] == ["step00000002"] and not figures["killed_run"]["refiner_written"]
    assert figures["resumed_run"]["resumed_from_step"] == 2 and figures["resumed_run"]["exit"] == 0
    full = figures["full_run"]
    assert full["exit"] == 0 and len(full["losses"]) == 6
    assert full["engine"]["optimizer"] == "AdamW" and full["engine"]["bf16"] is False  # DeepSpeed bf16: CUDA only
    assert full["engine"]["lora_dtypes"] == ["torch.bfloat16"]  # the model runs in bf16 on the CPU too
    comparison = figures["comparison"]
    assert comparison["max_abs_diff"] < 1e-3 and comparison["sample_order_equal"] and comparison["lora_B_trained"]


@SLOW
def test_cpu_mode_real_size_figures(tiny_check):
    out, _ = tiny_check
    cases = {c["name"]: c for c in json.loads((out / "gpu_report.json").read_text())["cases"]}
    for model in ("sd21", "sdxl"):
        generation = cases[f"{model}_generation"]["figures"]
        assert generation["ratio_bare_over_generation"] > 0 and generation["targets_finite"]
        assert generation["build"]["architecture"] == f"{model} (tiny)"
        sampling = cases[f"{model}_sampling"]["figures"]
        assert sampling["ratio_refined_over_cfg"] > 0 and sampling["output_finite"]
        losses = cases[f"{model}_losses"]["figures"]
        rows = {(r["loss"], r["checkpointing"], r["steps"]): r for r in losses["rows"]}
        assert all(r["status"] == "ok" and r["seconds"] > 0 for r in rows.values()), rows
        assert ("msd", False, 10) in rows and ("full_gradient", True, 10) in rows
        assert "msd_over_full_gradient_time_N5" in losses and losses["full_gradient_oom_at_N"] is None
    report_md = (out / "gpu_report.md").read_text()
    assert "### sd21_losses (batch 4)" in report_md and "### sdxl_losses (batch 1)" in report_md


@SLOW
def test_time_budget_skips_the_remaining_cases(tmp_path):
    done = run_check(tmp_path / "out", "--budget-s", "0", "--cases", "gpu_tests,digits,sd21", timeout=300)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    cases = {c["name"]: c for c in json.loads((tmp_path / "out" / "gpu_report.json").read_text())["cases"]}
    for name in ("gpu_tests", "digits_deepspeed", "sd21_generation", "sd21_losses", "sd21_sampling"):
        assert cases[name]["summary"] == "skipped: time budget", cases[name]
    assert cases["sdxl_losses"]["summary"] == "skipped: not selected"


# --- the OOM guard of the real-size cases, in process on a tiny model -------------------------------------------

def load_realsize():
    if "gpu_realsize" not in sys.modules:
        spec = importlib.util.spec_from_file_location("gpu_realsize", REPO / "bench" / "gpu" / "realsize.py")
        module = importlib.util.module_from_spec(spec)
        sys.modules[spec.name] = module  # dataclasses look their module up
        spec.loader.exec_module(module)
    return sys.modules["gpu_realsize"]


def test_guard_records_oom_and_other_errors():
    realsize = load_realsize()

    def oom():
        raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB")

    result, error = realsize.guarded(oom)
    assert result is None and error["type"] == "OutOfMemoryError" and error["oom"] and "20.00 GiB" in error["message"]
    result, error = realsize.guarded(lambda: 1 / 0)
    assert result is None and error["type"] == "ZeroDivisionError" and not error["oom"] and "traceback" in error
    assert realsize.guarded(lambda: 7) == (7, None)


def test_losses_case_records_full_gradient_oom_and_goes_on(monkeypatch):
    """Full gradient out of memory from N=5 on (tiny plan: N = 1, 2, 3, 5, 10): recorded as OOM, larger N not
    run, the rest measured, the case ok."""
    import time

    import noiserefine.losses as losses

    realsize = load_realsize()
    original = losses.build_loss

    def build_loss(cfg, backend):
        fn = original(cfg, backend)
        if cfg.train.loss == "full_gradient" and not cfg.train.gradient_checkpointing and cfg.student.num_steps >= 5:
            def out_of_memory(*args):
                raise torch.cuda.OutOfMemoryError("CUDA out of memory (simulated)")
            return out_of_memory
        return fn

    monkeypatch.setattr(losses, "build_loss", build_loss)
    spec = realsize.tiny_spec(realsize.MODELS["sd21"])
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny ops: OpenMP threads on a busy machine only wait for each other
    try:
        backend = realsize.build_backend(spec, "cpu", torch.float32, tiny=True)
        ctx = realsize.Context(spec, backend, torch.device("cpu"), time.time() + 300)
        figures = realsize.case_losses(ctx)
    finally:
        torch.set_num_threads(threads)
    rows = {(r["loss"], r["checkpointing"], r["steps"]): r for r in figures["rows"]}
    assert [rows[("full_gradient", False, n)]["status"] for n in (1, 2, 3)] == ["ok"] * 3
    assert rows[("full_gradient", False, 5)]["status"] == "oom"
    assert rows[("full_gradient", False, 5)]["error"]["type"] == "OutOfMemoryError"
    assert rows[("full_gradient", False, 10)]["status"] == "oom" and "not run" in rows[("full_gradient", False, 10)]["reason"]
    assert all(rows[("full_gradient", True, n)]["status"] == "ok" for n in (3, 5, 10))
    assert figures["full_gradient_oom_at_N"] == 5 and figures["full_gradient_max_N_fitted"] == 3
    assert "msd_over_full_gradient_time_N5" not in figures and "msd_over_full_gradient_ckpt_time_N5" in figures

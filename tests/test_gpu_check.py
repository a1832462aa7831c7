"""bench/gpu_check.py, the one-command GPU proof, in its CPU mode (``--device cpu --tiny``).

The whole check runs once per module in a subprocess on tiny models of the same
classes (1-2.5 minutes on 2 busy cores: a dozen Python processes start; marked
``slow``: ``make test``, not ``make check``). The OOM guard, the case declarations and
the FLOP counting (against hand-derived counts) are tested in process.
The GPU numbers themselves come from running it on a GPU machine (``bash bench/gpu_run.sh``).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from bench.gpu import cases, measure, realsize  # noqa: E402
from noiserefine import flops  # noqa: E402

CHECK = REPO / "bench" / "gpu_check.py"
# Subprocesses, DeepSpeed and teacher training: `make test` only (not the `make check` lane), like tests/test_trainer.py.
SLOW = pytest.mark.slow
CASES = ["gpu_tests", "digits_deepspeed", "sd21_generation", "sd21_losses", "sd21_sampling", "sdxl_generation",
         "sdxl_losses", "sdxl_sampling", "sd21_levers"]


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
        for figures, workloads in ((generation, {"bare", "generation"}), (sampling, {"refined", "cfg"})):
            counted = figures["flops"]
            assert set(counted["utilisation"]) == workloads and counted["peak_source"].startswith("measured")
            for use in counted["utilisation"].values():
                assert use["flops"] > 0 and use["achieved_flop_per_s"] > 0 and 0 < use["mfu"]
        per_branch = generation["flops"]["per_sample"]["denoiser_forward_per_branch"]
        assert sampling["flops"]["per_sample"]["denoiser_forward"] == per_branch  # same network, same shapes
        assert losses["flops"]["per_sample"]["msd_per_step"] == per_branch
        assert sampling["flops"]["per_sample"]["vae_decode"] > 0
        assert losses["flops"]["utilisation"]["msd_N10"]["mfu"] > 0
    report_md = (out / "gpu_report.md").read_text()
    assert "### sd21_losses (batch 4)" in report_md and "### sdxl_losses (batch 1)" in report_md
    assert "| sd21_generation | denoiser_forward_per_branch |" in report_md and "Peak for MFU:" in report_md


@SLOW
def test_time_budget_skips_the_remaining_cases(tmp_path):
    done = run_check(tmp_path / "out", "--budget-s", "0", "--cases", "gpu_tests,digits,sd21", timeout=300)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    cases = {c["name"]: c for c in json.loads((tmp_path / "out" / "gpu_report.json").read_text())["cases"]}
    for name in ("gpu_tests", "digits_deepspeed", "sd21_generation", "sd21_losses", "sd21_sampling"):
        assert cases[name]["summary"] == "skipped: time budget", cases[name]
    assert cases["sdxl_losses"]["summary"] == "skipped: not selected"


@SLOW
def test_cpu_mode_measures_the_speed_levers(tiny_check):
    """Each lever on vs off (tiny SD 2.1, CPU): the same outputs within tolerance; CUDA-only ones not run."""
    out, _ = tiny_check
    case = next(c for c in json.loads((out / "gpu_report.json").read_text())["cases"] if c["name"] == "sd21_levers")
    assert case["status"] == "ok", case
    rows = {row["lever"]: row for row in case["figures"]["rows"]}
    assert set(rows) == {"channels_last", "sdpa_math", "sdpa_flash", "sdpa_efficient", "sdpa_cudnn", "autocast_bf16",
                         "refiner_micro_batch"}
    assert rows["sdpa_efficient"]["status"] == rows["sdpa_cudnn"]["status"] == "not run"
    for name in ("channels_last", "sdpa_math", "sdpa_flash"):
        assert rows[name]["status"] == "ok" and rows[name]["speedup"] > 0 and rows[name]["max_abs_diff"] < 1e-4
    assert rows["autocast_bf16"]["status"] == "ok" and 0 < rows["autocast_bf16"]["max_abs_diff"] < 0.1
    micro = rows["refiner_micro_batch"]
    assert micro["status"] == "ok" and micro["micro_batch"] == 2 and micro["grad_max_rel_diff"] < 1e-3
    assert "### sd21_levers: speed levers on vs off" in (out / "gpu_report.md").read_text()


# --- the OOM guard of the real-size cases, in process on a tiny model -------------------------------------------

def test_guard_records_oom_and_other_errors():
    def oom():
        raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB")

    result, error = realsize.guarded(oom)
    assert result is None and error["type"] == "OutOfMemoryError" and error["oom"] and "20.00 GiB" in error["message"]
    result, error = realsize.guarded(lambda: 1 / 0)
    assert result is None and error["type"] == "ZeroDivisionError" and not error["oom"] and "traceback" in error
    assert realsize.guarded(lambda: 7) == (7, None)


@pytest.mark.slow  # >= 1 s on an idle 2-core machine: `make test` only, not the fast lane
def test_losses_case_records_full_gradient_oom_and_goes_on(monkeypatch):
    """Full gradient out of memory from N=5 on (tiny plan: N = 1, 2, 3, 5, 10): recorded as OOM, larger N not
    run, the rest measured, the case ok; the FLOPs are counted for every measured row."""
    import time

    import noiserefine.losses as losses

    original = losses.build_loss

    def build_loss(cfg, backend):
        fn = original(cfg, backend)
        if cfg.train.loss == "full_gradient" and not cfg.train.gradient_checkpointing and cfg.student.num_steps >= 5:
            def out_of_memory(*args):
                raise torch.cuda.OutOfMemoryError("CUDA out of memory (simulated)")
            return out_of_memory
        return fn

    monkeypatch.setattr(losses, "build_loss", build_loss)
    case = cases.BY_NAME["sd21_losses"].for_tiny()
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny ops: OpenMP threads on a busy machine only wait for each other
    try:
        backend = realsize.build_backend("sd21", "cpu", torch.float32, tiny=True)
        ctx = realsize.Context(backend, torch.device("cpu"), time.time() + 300)
        figures = measure.losses(ctx, case)
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
    counted = figures["flops"]
    assert set(counted["utilisation"]) == {measure.row_key(*key) for key, r in rows.items() if r["status"] == "ok"}
    per_sample = counted["per_sample"]
    # one step of full gradient = a forward and its backward; checkpointing recomputes (about: the parts outside
    # the checkpointed blocks are not recomputed) that forward once more
    assert per_sample["msd_per_step"] < per_sample["full_gradient_per_step"] < per_sample["full_gradient_ckpt_per_step"]
    recomputed = per_sample["full_gradient_ckpt_per_step"] - per_sample["full_gradient_per_step"]
    assert abs(recomputed - per_sample["msd_per_step"]) <= 0.01 * per_sample["msd_per_step"]
    msd10 = counted["utilisation"]["msd_N10"]
    assert msd10["flops"] == case.batch * (per_sample["refiner_forward_backward"] + 10 * per_sample["msd_per_step"])


# --- the declared cases ----------------------------------------------------------------------------------------

def test_cases_are_declared_once_with_known_runners():
    assert [case.name for case in cases.CASES] == CASES
    for case in cases.CASES:
        assert case.runner in ("pytest", "digits", "realsize"), case
        if case.runner == "realsize":
            assert case.measure in measure.MEASURES and case.name == f"{case.family}_{case.measure}"
            assert case.batch > 0 and (case.steps or case.plan)
    from bench.gpu.levers import ALL_LEVERS

    levers = cases.BY_NAME["sd21_levers"]
    assert levers.levers == ALL_LEVERS  # every lever measured on the GPU; --tiny leaves compiling out
    assert levers.for_tiny().levers == tuple(name for name in ALL_LEVERS if not name.startswith("compile"))
    assert [c.name for c in cases.select("sd21,gpu")] == ["gpu_tests", "sd21_generation", "sd21_losses",
                                                           "sd21_sampling", "sd21_levers"]
    with pytest.raises(ValueError, match="'sd3'"):
        cases.select("sd3")
    tiny = cases.BY_NAME["sd21_losses"].for_tiny()
    assert tiny.plan[1] == ("full_gradient", False, (1, 2, 3, 5, 10)) and tiny.batch == 4
    assert cases.BY_NAME["sd21_generation"].for_tiny().steps == (3,)
    assert cases.BY_NAME["digits_deepspeed"].for_tiny().steps == (6,)
    with pytest.raises(ValueError, match="sdxl_nope"):
        cases.resolve(["sdxl_nope"], tiny=True)


def test_case_caps_grow_with_the_budget(tmp_path):
    """At the default budget the declared caps; with more (a loaded machine, the tests' 900 s) proportionally more,
    so the digits case is not killed at 150 s while most of the budget is left (seen on 2 busy cores)."""
    from bench.gpu.runner import Runner

    digits = cases.BY_NAME["digits_deepspeed"].for_tiny()

    def runner(budget):
        return Runner([digits], tmp_path / "out", tmp_path / "work", "cpu", True, budget, started=0.0)

    assert runner(270).cap(digits) == 150 and runner(100).cap(digits) == 150  # the remaining time bounds it there
    assert runner(900).cap(digits) == 500


# --- FLOPs: torch's counter against hand-derived counts ----------------------------------------------------------

def test_flops_of_a_linear_layer_and_a_convolution_match_hand_counts():
    torch.manual_seed(0)
    batch, k, n = 3, 5, 7  # linear: (batch x k) @ (k x n): 2 * M * N * K FLOPs
    linear = torch.nn.Linear(k, n)
    x = torch.randn(batch, k)
    assert flops.count(lambda: linear(x))[0] == 2 * batch * n * k
    # forward + backward (grad of input and of weight: two more matmuls of the same size)
    assert flops.count(lambda: linear(x.requires_grad_()).sum().backward())[0] == 3 * 2 * batch * n * k

    conv = torch.nn.Conv2d(3, 4, kernel_size=3, padding=1)  # per output element: 2 * C_in * kh * kw
    image = torch.randn(2, 3, 8, 8)
    assert flops.count(lambda: conv(image))[0] == 2 * (2 * 4 * 8 * 8) * (3 * 3 * 3)
    strided = torch.nn.Conv2d(3, 6, kernel_size=2, stride=2)  # 4 x 4 outputs
    assert flops.count(lambda: strided(image))[0] == 2 * (2 * 6 * 4 * 4) * (3 * 2 * 2)

    model = torch.nn.Sequential(conv, torch.nn.ReLU(), torch.nn.Flatten(), torch.nn.Linear(4 * 8 * 8, 10))
    assert flops.count(lambda: model(image))[0] == 2 * (2 * 4 * 8 * 8) * 27 + 2 * 2 * 10 * 256


def test_cpu_attention_is_counted_like_the_gpu_kernels():
    """torch's table lacks the CPU's fused attention kernel; without it, attention would count 0 on the CPU."""
    q = torch.randn(2, 4, 16, 8)  # batch, heads, sequence, head dim: QK^T and PV, 2 * b*h * s*s*d each
    assert flops.count(lambda: torch.nn.functional.scaled_dot_product_attention(q, q, q))[0] == 2 * 2 * (2 * 4 * 16 * 16 * 8)


def test_counts_linear_in_steps_and_utilisation():
    linear = torch.nn.Linear(4, 4)
    x = torch.randn(2, 4)

    def rollout(n):  # a fixed projection, then n steps
        y = torch.nn.functional.linear(x, torch.ones(4, 4))
        for _ in range(n):
            y = linear(y)
        return y

    assert flops.count_linear_in_steps(rollout) == {"fixed": 2 * 2 * 4 * 4, "per_step": 2 * 2 * 4 * 4}
    assert flops.at_steps({"fixed": 10, "per_step": 3}, 25) == 85
    assert flops.utilisation(10**12, 2.0, {"peak_flop_per_s": 10**12}) == {
        "flops": 10**12, "achieved_flop_per_s": 5e11, "mfu": 0.5}
    assert flops.utilisation(10, 1.0, {"peak_flop_per_s": None})["mfu"] is None


def test_gpu_peaks_by_device_name():
    assert flops.gpu_peak("NVIDIA H100 80GB HBM3")["peak_flop_per_s"] == 989.5e12  # SXM
    assert flops.gpu_peak("NVIDIA H100 PCIe")["peak_flop_per_s"] == 756.5e12
    h200 = flops.gpu_peak("NVIDIA H200")
    assert h200["peak_flop_per_s"] == 989.5e12 and "datasheet" in h200["peak_source"]
    assert flops.gpu_peak("NVIDIA A10G")["peak_flop_per_s"] is None
    cpu = flops.cpu_matmul_roofline(size=64, repeats=2)
    assert cpu["peak_flop_per_s"] > 0 and cpu["peak_source"].startswith("measured")

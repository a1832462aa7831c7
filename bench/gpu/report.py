"""The GPU check's report: environment, goals, ``gpu_report.json`` (schema ``noiserefine.gpu_check/1``) and
``gpu_report.md`` (the same as tables, printed at the end of a run)."""

from __future__ import annotations

import importlib.metadata
import importlib.util
import json
import os
import platform
import re
import shutil
import socket
import subprocess
import sys
import time

from bench.gpu.cases import CASES

SCHEMA = "noiserefine.gpu_check/1"
PACKAGES = ("torch", "diffusers", "peft", "deepspeed", "transformers", "accelerate", "webdataset", "omegaconf",
            "pydantic", "safetensors", "numpy", "pyarrow", "huggingface-hub", "pytest")
FAMILIES = list(dict.fromkeys(case.family for case in CASES if case.runner == "realsize"))


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


def environment(runner) -> dict:
    from bench.gpu.runner import REPO

    env: dict = {"date": runner.started_iso, "python": platform.python_version(), "platform": platform.platform(),
                 "hostname": socket.gethostname(), "cpu_count": os.cpu_count(), "executable": sys.executable,
                 "packages": {name: version(name) for name in PACKAGES},
                 "ray_installed": importlib.util.find_spec("ray") is not None, "ray_imported": "ray" in sys.modules,
                 "git_commit": command_output(["git", "-C", str(REPO), "rev-parse", "HEAD"], timeout=5)}
    try:
        import torch

        env.update(torch=torch.__version__, torch_cuda=torch.version.cuda, cuda_available=torch.cuda.is_available())
        if runner.cuda and torch.cuda.is_available():
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
        found = re.search(r"CUDA Version:\s*([\d.]+)", command_output(["nvidia-smi"]) or "")
        env["driver_cuda"] = found.group(1) if found else None
    return env


def goals(results: dict, cuda: bool) -> list[dict]:
    rows = []

    def add(name, value, target, met):
        rows.append({"goal": name, "value": value, "target": target, "met": met})

    gpu = results.get("gpu_tests")
    if gpu:
        f = gpu["figures"]
        add("gpu tests pass", f"{f.get('passed', 0)} passed, {f.get('failed', 0)} failed" if gpu["status"] != "skipped"
            else gpu["summary"], "all pass", gpu["status"] == "ok" if gpu["status"] != "skipped" else None)
    digits = results.get("digits_deepspeed")
    if digits and "comparison" in digits["figures"]:
        c = digits["figures"]["comparison"]
        add("kill + resume = uninterrupted (refiner)", f"max |diff| {c['max_abs_diff']:.3g}, bit-equal {c['bit_equal']}",
            "bit-equal (reported; GPU kernels may differ)", c["bit_equal"])
        full = digits["figures"].get("full_run", {})
        engine = full.get("engine", {})
        if engine and cuda:  # ds_config turns bf16 on only on CUDA with a bf16 model
            add("DeepSpeed bf16 on (digits run)", f"{engine.get('optimizer')}, bf16={engine.get('bf16')}, "
                f"LoRA {','.join(engine.get('lora_dtypes', []))}", "bf16 on", bool(engine.get("bf16")))
        if "loss_mean_first_quarter" in full:
            add("digits loss drops", f"{full['loss_mean_first_quarter']:.4g} -> {full['loss_mean_last_quarter']:.4g}",
                "last quarter < first quarter", full["loss_mean_last_quarter"] < full["loss_mean_first_quarter"])
    for model in FAMILIES:
        gen = results.get(f"{model}_generation", {}).get("figures", {})
        if "ratio_bare_over_generation" in gen:
            add(f"{model}: generation / bare forwards", gen["ratio_bare_over_generation"], ">= 0.9", gen["goal_met"])
        losses = results.get(f"{model}_losses", {}).get("figures", {})
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
        sampling = results.get(f"{model}_sampling", {}).get("figures", {})
        if "ratio_refined_over_cfg" in sampling:
            add(f"{model}: refined / CFG sampling time", sampling["ratio_refined_over_cfg"], "<= 0.55",
                sampling["goal_met"])
    return rows


def build(runner, final: bool) -> dict:
    cases = [runner.results.get(case.name) or {"name": case.name, "title": case.measures, "status": "skipped",
                                               "reason": "not run yet" if not final else "not selected",
                                               "summary": "skipped: " + ("not run yet" if not final else "not selected"),
                                               "seconds": 0.0, "figures": {}, "error": None}
             for case in CASES]
    return {"schema": SCHEMA, "started": runner.started_iso,
            "finished": time.strftime("%Y-%m-%dT%H:%M:%S+00:00", time.gmtime()) if final else None,
            "wall_s": round(time.time() - runner.started, 1), "budget_s": runner.budget_s,
            "mode": {"device": runner.device, "tiny": runner.tiny, "cases": sorted(c.name for c in runner.cases)},
            "environment": environment(runner) if final else {}, "cases": cases,
            "goals": goals(runner.results, runner.cuda), "complete": final}


def write(runner, final: bool) -> dict:
    """Rewrite gpu_report.json (atomically) and gpu_report.md in the runner's ``out``; returns the report."""
    from bench.gpu.markdown import markdown

    data = build(runner, final)
    tmp = runner.out / ".gpu_report.json.tmp"
    tmp.write_text(json.dumps(data, indent=2, default=str) + "\n")
    tmp.replace(runner.out / "gpu_report.json")
    (runner.out / "gpu_report.md").write_text(markdown(data))
    return data

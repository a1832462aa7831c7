"""``gpu_report.md``: the GPU check's report as Markdown tables (one row per case, goals, loss rows, FLOPs)."""

from __future__ import annotations


def fmt(value) -> str:
    """A table cell."""
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, float):
        return f"{value:.4g}"
    return "" if value is None else str(value).replace("|", "\\|")


def mfu_text(figures: dict) -> str:
    """``MFU refined 0.12, cfg 0.15`` from a case's ``flops`` figures ('' if none were counted)."""
    use = (figures.get("flops") or {}).get("utilisation") or {}
    parts = [f"{name} {fmt(u['mfu'])}" for name, u in use.items() if u.get("mfu") is not None]
    return "MFU " + ", ".join(parts) if parts else ""


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
    elif name.endswith("_levers") and "rows" in f:
        ok = [r for r in f["rows"] if r["status"] == "ok"]
        parts.append(f"{len(ok)} of {len(f['rows'])} levers measured; speedups " + ", ".join(
            f"{r['lever']} {fmt(r['speedup'])}" for r in ok))
    elif name.endswith("_losses") and "rows" in f:
        parts.append(f"batch {f['batch']}, LoRA rank {f['lora_rank']}")
        for key, value in f.items():
            if key.startswith(("msd_step_peak_ratio", "msd_over_")):
                parts.append(f"{key} {fmt(value)}")
        parts.append(f"FG OOM at N={fmt(f.get('full_gradient_oom_at_N')) or 'none'}")
    if not name.endswith("_losses") and mfu_text(f):  # the losses' MFU is in their own table, per row
        parts.append(mfu_text(f))
    if case.get("error"):
        parts.append(f"{case['error']['type']}: {case['error']['message'][:160]}")
    return "; ".join(parts).replace("|", "\\|")


def loss_table(case: dict) -> list[str]:
    rows = case["figures"].get("rows") or []
    if not rows or not case["name"].endswith("_losses"):
        return []
    use = (case["figures"].get("flops") or {}).get("utilisation") or {}
    lines = [f"\n### {case['name']} (batch {case['figures'].get('batch')})\n",
             "| loss | checkpointing | N | status | s/step | peak GB | step peak GB | TFLOP | MFU |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        status = r["status"] + (f" ({r['reason']})" if r.get("reason") else "")
        if r.get("error") and r["status"] != "oom":
            status += f" {r['error']['type']}: {r['error']['message'][:80]}"
        counted = use.get(f"{r['loss']}{'_ckpt' if r['checkpointing'] else ''}_N{r['steps']}", {})
        tflop = counted["flops"] / 1e12 if "flops" in counted else None
        lines.append(f"| {r['loss']} | {fmt(r['checkpointing'])} | {r['steps']} | {status.replace('|', '/')} | "
                     f"{fmt(r.get('seconds'))} | {fmt(r.get('peak_gb'))} | {fmt(r.get('step_peak_gb'))} | "
                     f"{fmt(tflop)} | {fmt(counted.get('mfu'))} |")
    return lines


def levers_table(case: dict) -> list[str]:
    """A levers case (``bench/gpu/levers.py``): each lever's time vs the baseline's and its output difference."""
    f = case["figures"]
    if not f.get("rows") or not case["name"].endswith("_levers"):
        return []
    lines = [f"\n### {case['name']}: speed levers on vs off (teacher forwards: {f.get('steps')} x batch "
             f"{f.get('forward_batch')}, baseline {fmt(f.get('baseline_s'))} s in {f.get('baseline_dtype')})\n",
             "| lever | values | status | warm-up s | s | speedup | max abs diff |", "|---|---|---|---|---|---|---|"]
    for r in f["rows"]:
        status = r["status"] + (f" ({r['reason']})" if r.get("reason") else "")
        if r.get("error"):
            status += f" {r['error']['type']}: {r['error']['message'][:80]}"
        if "whole" in r:  # the refiner micro-batch: one MSD step, whole vs chunked (time, step peak memory)
            seconds = f"{fmt(r['chunked']['seconds'])} vs {fmt(r['whole']['seconds'])}"
            diff = f"grad rel {fmt(r['grad_max_rel_diff'])}; peak GB {fmt(r['chunked']['step_peak_gb'])} vs " \
                   f"{fmt(r['whole']['step_peak_gb'])}"
        else:
            seconds, diff = fmt(r.get("seconds")), fmt(r.get("max_abs_diff"))
        values = ", ".join(f"{k}={v}" for k, v in (r.get("values") or {}).items())
        lines.append(f"| {r['lever']} | {values} | {status.replace('|', '/')} | {fmt(r.get('warmup_s'))} | "
                     f"{seconds} | {fmt(r.get('speedup'))} | {diff} |")
    return lines


def flops_table(cases: list[dict]) -> list[str]:
    """Per case: FLOPs per sample of each stage, the peak used for MFU and its source."""
    lines = []
    for case in cases:
        counted = case["figures"].get("flops") or {}
        if "per_sample" not in counted:
            continue
        if not lines:
            lines = ["\n### FLOPs per sample (counted with torch FlopCounterMode) and MFU\n",
                     "| case | stage | GFLOP per sample |", "|---|---|---|"]
        for stage, value in counted["per_sample"].items():
            gflop = fmt(value / 1e9) if isinstance(value, int) else f"failed: {value.get('type')}"
            lines.append(f"| {case['name']} | {stage} | {gflop} |")
    peaks = {(c["figures"]["flops"].get("peak_flop_per_s"), c["figures"]["flops"].get("peak_source"))
             for c in cases if "per_sample" in (c["figures"].get("flops") or {})}
    for peak, source in sorted(peaks, key=str):
        lines.append(f"\nPeak for MFU: {fmt(peak / 1e12) if peak else 'n/a'} TFLOP/s ({source})")
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
        lines += loss_table(case) + levers_table(case)
    lines += flops_table(data["cases"])
    return "\n".join(lines) + "\n"

"""Guidance sweep on the teacher alone, and the rule that picks the teacher's guidance scale.

The teacher-target cache is keyed by the teacher's guidance scale, so the scale has to be
chosen before any target is generated, from the teacher alone (never by looking at a
refiner). :func:`ensure_sweep` samples the teacher at every ``demo.sweep_scales`` value on
the held-out evaluation set, scores each with the injected metric function and applies
:data:`RULE`. The result is written to ``sweep.json`` with the identity of what it was
computed from (teacher weights, sampler, seeds, prompts, scales); a re-run with the same
identity reuses it. The samples of each scale go to ``sweep_samples.safetensors`` beside it: the report's
unguided (w = 1) and guided (the chosen w) rows are exactly these samples (same teacher, seeds, prompts,
sampler), so :func:`sweep_row` hands them over instead of sampling them again.
"""

from __future__ import annotations

import hashlib
import json
import math
from pathlib import Path

from diffusers.guiders import BaseGuidance
from omegaconf import OmegaConf
from safetensors.torch import load_file, save_file

from ..evaluation.rows import MetricFn, Row, eval_set, sample_row, score_rows
from ..files import atomic_path, write_text_atomic
from ..guidance import make_guider

SWEEP_FILE = "sweep.json"
SAMPLES_FILE = "sweep_samples.safetensors"  # each scale's samples: {"w=<w>": (n, C, H, W) float32}
RULE_METRIC = "fid_class"
RULE = ("the guidance scale w > 1 whose guided samples from the teacher alone have the lowest class-conditional "
        "FID (w = 1 is the unguided baseline, never chosen; ties go to the smaller w)")


def sweep_guidance(cfg, scale: float) -> BaseGuidance | None:
    """The teacher's guider (``cfg.teacher``) at scale ``scale``; w = 1 is the plain conditional sampler (None)."""
    return None if scale == 1 else make_guider(cfg.teacher, guidance_scale=scale)


# Another guider on the same seeds at the chosen w, for comparison only (never used to choose w):
# APG with the APG paper's settings (eta 0: the update's component parallel to the conditional
# output dropped; momentum -0.5; diffusers' rescale threshold 15).
COMPARED_GUIDERS = {"APG": ("AdaptiveProjectedGuidance", {"eta": 0.0, "adaptive_projected_guidance_momentum": -0.5,
                                                           "adaptive_projected_guidance_rescale": 15.0})}


def compared_guider(name: str, scale: float) -> BaseGuidance:
    guider_class, args = COMPARED_GUIDERS[name]
    teacher = OmegaConf.create({"guidance": guider_class, "guidance_scale": scale, "guider_args": args})
    return make_guider(teacher)


# The compositional task's rule (model.digits.task=compose): what guidance buys there is prompt adherence, and
# it must not be bought with image quality. Fixed before any target or refiner existed (issue 25).
ADHERENCE_RULE = ("among the guidance scales w > 1 whose guided samples from the teacher alone have an FID no "
                  "higher than the unguided samples' (w = 1), the one with the highest prompt adherence (every "
                  "attribute right); scales within {tol:g} of that adherence count as ties and the smaller w wins; "
                  "if no w > 1 keeps FID, the w > 1 with the lowest FID")
ADHERENCE_TIE = 0.01


def pick_adherence_scale(rows: dict[float, dict]) -> float:
    """:data:`ADHERENCE_RULE` on sweep rows (each with ``fid`` and ``adherence``; ``rows[1.0]``: unguided)."""
    if 1.0 not in rows:
        raise ValueError(f"the adherence rule compares with the unguided row: demo.sweep_scales needs w = 1 "
                         f"(got {sorted(rows)})")
    guided = {w: m for w, m in rows.items() if w > 1 and math.isfinite(m.get("fid", math.nan))}
    if not guided:
        raise ValueError(f"no sweep row of a guidance scale w > 1 has a finite FID: {rows}")
    keeps_fid = {w: m for w, m in guided.items() if m["fid"] <= rows[1.0]["fid"]
                 and math.isfinite(m.get("adherence", math.nan))}
    if not keeps_fid:
        return min(sorted(guided), key=lambda w: guided[w]["fid"])
    best = max(m["adherence"] for m in keeps_fid.values())
    return min(w for w, m in keeps_fid.items() if m["adherence"] >= best - ADHERENCE_TIE)


def sweep_rule(cfg) -> tuple[str, str]:
    """``(rule text, the metric it reads first)`` of this config's task."""
    if cfg.model.digits.task == "compose":
        return ADHERENCE_RULE.format(tol=ADHERENCE_TIE), "adherence"
    return RULE, RULE_METRIC


def pick_scale(rows: dict[float, dict], metric: str = RULE_METRIC) -> float:
    """:data:`RULE`: the scale w > 1 with the lowest finite ``metric``; ties go to the smaller scale.

    w = 1 is never chosen: it is the unguided sampler, and a demo "distilling" it would compare
    unguided sampling with itself. Whether guidance helps at the chosen w is for the report to judge.
    """
    finite = {w: m[metric] for w, m in rows.items()
              if w > 1 and m.get(metric) is not None and math.isfinite(m[metric])}
    if not finite:
        raise ValueError(f"no sweep row of a guidance scale w > 1 has a finite {metric} (demo.sweep_scales "
                         f"needs at least one w > 1): {rows}")
    return min(sorted(finite), key=lambda w: finite[w])


def sweep_identity(cfg, model_identity: dict, scales: list[float]) -> dict:
    """What a sweep's numbers depend on (the stored ``sweep.json`` is reused only if it matches)."""
    evals = eval_set(cfg)
    teacher = OmegaConf.to_container(cfg.teacher, resolve=True)
    teacher.pop("guidance_scale")
    teacher.pop("num_steps")  # the sweep samples at the student's step count
    return {"model": model_identity, "teacher": teacher, "num_steps": int(cfg.student.num_steps),
            "scales": [float(w) for w in scales], "seeds": evals.seeds, "prompts": evals.prompts,
            "metrics": cfg.eval.metrics, "classifier_dir": str(cfg.eval.classifier_dir),
            "compared_guiders": {name: list(spec) for name, spec in COMPARED_GUIDERS.items()}}


def _scored_row(cfg, backend, metric_fn: MetricFn, name: str, guider: BaseGuidance | None) -> Row:
    """Sample the held-out seeds and prompts with ``guider`` and score them."""
    evals = eval_set(cfg)
    row = sample_row(name, backend, evals, cfg.student.num_steps, guidance=guider, batch_size=cfg.eval.batch_size)
    score_rows([row], backend, evals, metric_fn)
    print(f"sweep {name}: " + ", ".join(
        f"{k} {row.metrics[k]:.3f}" for k in ("fid", RULE_METRIC, "accuracy", "adherence") if k in row.metrics),
        flush=True)
    return row


def run_sweep(cfg, backend, metric_fn: MetricFn, scales: list[float]) -> dict[float, Row]:
    """Sample and score the teacher at every scale (each row on the same held-out seeds and prompts)."""
    return {float(w): _scored_row(cfg, backend, metric_fn, f"w={w:g}", sweep_guidance(cfg, w)) for w in scales}


def _samples_key(scale: float) -> str:
    return f"w={float(scale):g}"


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def sweep_row(record: dict, run_dir: Path, scale: float, identity: dict, name: str) -> Row | None:
    """The sweep's row at ``scale`` (samples from ``SAMPLES_FILE``, metrics and timing from ``record``) named
    ``name``, or None where it cannot stand in for sampling again: the record was computed from something
    else than ``identity`` (another teacher, sampler, seeds or prompts), has no such scale, or its samples
    file is missing or is not the one it recorded (an older sweep, a damaged or replaced file)."""
    rows = {float(row["scale"]): row for row in record.get("rows", [])}
    path = Path(run_dir) / SAMPLES_FILE
    if record.get("identity") != identity or float(scale) not in rows or not path.is_file():
        return None
    if record.get("samples_sha256") != _sha256(path):
        return None
    latents = load_file(str(path)).get(_samples_key(scale))
    if latents is None:
        return None
    metrics = dict(rows[float(scale)])
    metrics.pop("scale")
    return Row(name, int(metrics["nfe"]), latents, float(metrics["seconds_per_sample"]), metrics)


def ensure_sweep(cfg, backend, metric_fn: MetricFn, scales: list[float], run_dir: Path,
                 model_identity: dict) -> dict:
    """The sweep record (``run_dir/sweep.json``): reused if its identity matches, else computed and written.

    Returns ``{"identity", "rule", "metric", "rows": [{"scale", **metrics}], "chosen_scale",
    "guider_rows": [{"guider", "class", "args", "scale", **metrics}]}`` (the :data:`COMPARED_GUIDERS`
    at the chosen scale).
    """
    if not scales:
        raise ValueError("demo.sweep_scales is empty: the sweep needs at least one guidance scale")
    path = Path(run_dir) / SWEEP_FILE
    identity = sweep_identity(cfg, model_identity, scales)
    if path.is_file():
        try:
            record = json.loads(path.read_text())
            if record.get("identity") == identity:
                print(f"sweep: reusing {path} (chosen w = {record['chosen_scale']:g})", flush=True)
                return record
        except (OSError, ValueError, KeyError):
            pass  # damaged: recompute
    sampled = run_sweep(cfg, backend, metric_fn, scales)
    rows = {w: row.metrics for w, row in sampled.items()}
    rule, metric = sweep_rule(cfg)
    chosen = pick_adherence_scale(rows) if metric == "adherence" else pick_scale(rows)
    # the samples first: a record only ever vouches (by hash) for a samples file already in place
    samples = Path(run_dir) / SAMPLES_FILE
    with atomic_path(samples) as tmp:
        save_file({_samples_key(w): row.latents.contiguous() for w, row in sampled.items()}, str(tmp))
    record = {"identity": identity, "rule": rule, "metric": metric,
              "rows": [{"scale": w, **metrics} for w, metrics in rows.items()], "chosen_scale": chosen,
              "guider_rows": [{"guider": name, "class": COMPARED_GUIDERS[name][0], "args": COMPARED_GUIDERS[name][1],
                               "scale": chosen, **_scored_row(cfg, backend, metric_fn, f"{name} w={chosen:g}",
                                                              compared_guider(name, chosen)).metrics}
                              for name in COMPARED_GUIDERS],
              "samples_sha256": _sha256(samples)}
    write_text_atomic(path, json.dumps(record, indent=2))
    print(f"sweep: chose w = {record['chosen_scale']:g} by the rule: {rule}", flush=True)
    return record


SWEEP_PANELS = (("fid", "FID (classifier features)", "lower is better"),
                ("fid_class", "class-conditional FID", "lower is better"),
                ("accuracy", "accuracy (prompted digit)", "higher is better"),
                ("adherence", "prompt adherence (all attributes)", "higher is better"),
                ("precision", "precision (k-NN, per digit)", "higher is better"),
                ("recall", "recall (k-NN, per digit)", "higher is better"))


def plot_sweep(record: dict, others: dict[str, dict], path: Path) -> None:
    """One panel per metric against the guidance scale: the teacher's guided curve (w = 1: unguided),
    the chosen scale as a dotted line, and every row of ``others`` (name -> metrics, e.g. the refined
    and guidance-distilled samplers) as a horizontal line on the same axes, labelled with its NFE."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    scales = [row["scale"] for row in record["rows"]]
    nfe = {("unguided" if row["scale"] == 1 else "guided"): row.get("nfe", "?") for row in record["rows"]}
    teacher_label = f"teacher, CFG (NFE {nfe.get('guided', '?')})" + (
        f"; w=1 is unguided (NFE {nfe['unguided']})" if "unguided" in nfe else "")
    panels = [panel for panel in SWEEP_PANELS if any(panel[0] in row for row in record["rows"])]  # the task's
    fig, axes = plt.subplots(1, len(panels), figsize=(4.2 * len(panels), 3.6))
    styles = ["tab:red", "tab:green", "tab:purple", "tab:brown", "tab:gray", "tab:olive"]
    for ax, (key, title, hint) in zip(axes, panels):
        ax.plot(scales, [row.get(key, math.nan) for row in record["rows"]], "o-", color="tab:blue",
                label=teacher_label)
        ax.axvline(record["chosen_scale"], color="tab:blue", linestyle=":", label=f"chosen w = {record['chosen_scale']:g}")
        for color, (name, metrics) in zip(styles, others.items()):
            ax.axhline(metrics.get(key, math.nan), color=color, linestyle="--",
                       label=f"{name} (NFE {metrics.get('nfe', '?')})")
        ax.set_xscale("log")
        ax.set_xticks(scales)
        ax.set_xticklabels([f"{w:g}" for w in scales])
        ax.minorticks_off()
        ax.set_xlabel("guidance scale w")
        ax.set_title(f"{title}\n({hint})", fontsize=10)
    handles, labels = axes[0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="lower center", ncol=min(len(labels), 3), fontsize=9, frameon=False)
    fig.tight_layout(rect=(0, 0.16, 1, 1))
    fig.savefig(path, dpi=110)
    plt.close(fig)

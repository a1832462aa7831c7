"""Evaluation of the main job's models and its report (tables, grids, plots).

Every row uses the same held-out seeds and prompts (``eval.eval_set``).
"""

from __future__ import annotations

import csv
import functools
import json
from pathlib import Path

import torch

from ..evaluation.spectrum import low_frequency_fraction, plot_spectra, radial_power_spectrum
from omegaconf import OmegaConf

from ..backends import Backend, load_backend
from ..train.checkpoint import checkpoint_tag
from ..evaluation.comparison import save_comparison_grid
from ..evaluation.grids import save_rows_grid
from ..evaluation.rows import Row, eval_set, metrics_markdown, sample_row, score_rows
from ..evaluation.scores import gap_closed
from .recipe import recipe_table
from ..files import write_text_atomic
from ..noise import noise_from_seeds, sample_seed
from ..refiner import load_refiner
from ..targets.identity import model_identity
from ..guidance import make_guider
from .goals import DISTILLED, FINE_TUNED, GAP_METRICS, GUIDED, NOISE_SPACE, REFINED, UNGUIDED, ZERO_SHOT, judge_goals
from .sweep import SAMPLES_FILE, plot_sweep, sweep_identity, sweep_row

COLUMNS = [("nfe", "NFE", "d"), ("fid", "FID", ".2f"), ("fid_class", "class-cond. FID", ".2f"),
           ("accuracy", "accuracy", ".3f"), ("precision", "precision", ".3f"), ("recall", "recall", ".3f"),
           ("noise_share", "noise-like", ".1%"), ("inception_score", "IS", ".2f")]
TIMED = [("ms_per_sample", "ms/sample", ".2f")]
GAP = [("gap_closed", "gap closed (class-cond. FID)", ".2f")]
ATTRIBUTE_COLUMNS = [("nfe", "NFE", "d"), ("adherence", "adherence (all right)", ".3f"),
                     ("acc_digit", "digit", ".3f"), ("acc_position", "position", ".3f"),
                     ("acc_size", "size", ".3f"), ("acc_thickness", "thickness", ".3f")]


def columns_of(task: str) -> list[tuple[str, str, str]]:
    """The metric columns of a task's tables (compose: adherence after FID), timing and gap closed last."""
    if task == "compose":
        return (COLUMNS[:3] + [("adherence", "adherence", ".3f")] + COLUMNS[3:] + TIMED
                + [("gap_closed", "gap closed (adherence)", ".2f")])
    return COLUMNS + TIMED + GAP


def _backend_at(cfg, path) -> Backend:
    """The configured backend (device, dtype) loaded from another model directory."""
    return load_backend(OmegaConf.merge(cfg.model, {"path": str(path)}))


def refiner_on_fresh_backend(cfg, refiner_dir: Path):
    """Each refiner gets its own copy of the base model (one LoRA adapter per denoiser)."""
    return load_refiner(refiner_dir, _backend_at(cfg, cfg.model.path))


def refined_row(name, sampler_backend, refiner, evals, cfg, guidance_scale: float | None = None) -> Row:
    """Refine with the refiner's own model and conditioning (at ``guidance_scale`` for a refiner told w), then
    sample unguided with ``sampler_backend``."""
    return sample_row(name, sampler_backend, evals, cfg.student.num_steps, batch_size=cfg.eval.batch_size,
                      prepare_noise=functools.partial(refiner.refine, guidance_scale=guidance_scale),
                      extra_nfe=refiner.network_calls)


def _gaussian_rows(backend, evals, cfg, label: str = "") -> list[Row]:
    steps, batch = cfg.student.num_steps, cfg.eval.batch_size
    guidance = make_guider(cfg.teacher)
    return [sample_row(UNGUIDED + label, backend, evals, steps, batch_size=batch),
            sample_row(GUIDED + label, backend, evals, steps, guidance=guidance, batch_size=batch)]


def teacher_rows(cfg, backend, evals, sweep: dict, run_dir: Path) -> list[Row]:
    """The teacher's unguided and guided (``cfg.teacher``) rows: the sweep's own samples at w = 1 and at
    ``teacher.guidance_scale`` where the sweep was computed from this very teacher, sampler, seeds and
    prompts (they are the same rollouts: sampling them again is 30 network calls per held-out seed for
    nothing), else sampled here."""
    identity = sweep_identity(cfg, model_identity(cfg.model), sweep.get("identity", {}).get("scales", []))
    reused = [sweep_row(sweep, run_dir, 1.0, identity, UNGUIDED),
              sweep_row(sweep, run_dir, cfg.teacher.guidance_scale, identity, GUIDED)]
    if all(reused):
        print(f"evaluation: the unguided and guided rows are the sweep's samples ({SAMPLES_FILE})", flush=True)
        return reused
    return _gaussian_rows(backend, evals, cfg)


def _metrics(rows: list[Row]) -> dict:
    for row in rows:
        row.metrics["ms_per_sample"] = row.seconds_per_sample * 1000
    return {row.name: row.metrics for row in rows}


def _with_gap(metrics: dict, unguided: str, guided: str, metric: str) -> dict:
    for name, m in metrics.items():
        m["gap_closed"] = gap_closed(metrics[unguided][metric], m[metric], metrics[guided][metric])
    return metrics


def evaluate(cfg, backend, digit_metrics, run_dir: Path, *, sweep: dict, refiner_dir: Path, distilled_path: Path,
             transfer_path: Path, noise_space_dir: Path, gradient_dirs: dict[str, Path], gradient_steps: int) -> dict:
    """All rows of the report. ``noise_space_dir``: the noise-space run, trained as long as the main
    run. ``gradient_dirs``: a run per loss, each compared at its refiner snapshot of step
    ``gradient_steps`` (the MSD run trained further)."""
    evals = eval_set(cfg)
    columns = cfg.eval.grid_columns * 2
    refiner = refiner_on_fresh_backend(cfg, refiner_dir)
    task = cfg.model.digits.task
    metric = GAP_METRICS[task]

    def with_gap(metrics: dict, unguided: str, guided: str) -> dict:
        return _with_gap(metrics, unguided, guided, metric)

    def table(metrics: dict) -> str:
        return metrics_markdown(list(metrics.items()), columns_of(task))

    # main table
    rows = teacher_rows(cfg, backend, evals, sweep, run_dir)
    rows.append(sample_row(DISTILLED, _backend_at(cfg, distilled_path), evals,
                           cfg.student.num_steps, batch_size=cfg.eval.batch_size))
    rows.append(refined_row(REFINED, backend, refiner, evals, cfg))
    score_rows(rows, backend, evals, digit_metrics)
    save_rows_grid(rows, backend, columns, run_dir / "samples.png")
    # the two-second figure: the first k held-out seeds (a fixed rule), prompts as column titles
    w = cfg.teacher.guidance_scale
    save_comparison_grid([rows[0], rows[1], rows[3]], backend, evals.prompts, run_dir / "comparison.png",
                         num_columns=cfg.eval.grid_columns,
                         row_labels=[f"unguided (NFE {rows[0].nfe})", f"guided, CFG w={w:g} (NFE {rows[1].nfe})",
                                     f"refined, unguided (NFE {rows[3].nfe})"])
    results = {"task": task, "gap_metric": metric, "main": with_gap(_metrics(rows), UNGUIDED, GUIDED)}
    results["main_table"] = table(results["main"])
    if task == "compose":
        results["attribute_table"] = metrics_markdown(list(results["main"].items()), ATTRIBUTE_COLUMNS)

    # the guidance sweep of the teacher alone (which chose w), with the other samplers on its axes
    main = results["main"]
    plot_sweep(sweep, {"unguided": main[UNGUIDED], "refined, unguided (ours)": main[REFINED],
                       "guidance distillation": main[DISTILLED]}, run_dir / "sweep.png")
    results["sweep"] = {"rule": sweep["rule"], "metric": sweep["metric"], "chosen_scale": sweep["chosen_scale"],
                        "teacher_guidance_scale": w, "rows": sweep["rows"],
                        "guider_rows": sweep.get("guider_rows", [])}

    # ablation 1: image-space (MSD, the main refiner) vs noise-space loss, same budget
    noise_space = refiner_on_fresh_backend(cfg, noise_space_dir / "refiner")
    noise_rows = [rows[0], rows[1], rows[3], refined_row(NOISE_SPACE, backend, noise_space, evals, cfg)]
    score_rows(noise_rows[3:], backend, evals, digit_metrics)
    results["noise_space"] = with_gap(_metrics(noise_rows), UNGUIDED, GUIDED)
    results["noise_space_table"] = table(results["noise_space"])

    # ablation 2: MSD vs full gradient, both after gradient_steps
    gradient_rows = [rows[0], rows[1]]
    for loss, directory in gradient_dirs.items():
        snapshot = directory / "snapshots" / checkpoint_tag(gradient_steps)
        gradient_refiner = refiner_on_fresh_backend(cfg, snapshot)
        gradient_rows.append(refined_row(f"Refined, {loss} loss, step {gradient_steps}", backend,
                                          gradient_refiner, evals, cfg))
    score_rows(gradient_rows[2:], backend, evals, digit_metrics)
    results["gradient"] = with_gap(_metrics(gradient_rows), UNGUIDED, GUIDED)
    results["gradient_table"] = table(results["gradient"])
    results["training_curves"] = plot_training_curves(gradient_dirs, gradient_steps,
                                                      run_dir / "msd_vs_full_gradient.png")

    # transfer: the base model's refiner, zero-shot, in front of the fine-tuned (restyled) model
    fine_tuned = _backend_at(cfg, transfer_path)
    transfer_rows = _gaussian_rows(fine_tuned, evals, cfg, FINE_TUNED)
    transfer_rows.append(refined_row(ZERO_SHOT, fine_tuned, refiner, evals, cfg))
    score_rows(transfer_rows, fine_tuned, evals, digit_metrics)
    save_rows_grid(transfer_rows, fine_tuned, columns, run_dir / "transfer.png")
    results["transfer"] = with_gap(_metrics(transfer_rows), UNGUIDED + FINE_TUNED, GUIDED + FINE_TUNED)
    results["transfer_table"] = table(results["transfer"])

    # analysis: spectrum of the refinement vs the difference of two independent noises
    results["spectrum"] = spectrum_analysis(cfg, refiner, evals, run_dir / "spectrum.png")
    return results


def spectrum_analysis(cfg, refiner, evals, path: Path) -> dict:
    backend = refiner.backend
    noise = noise_from_seeds(evals.seeds, backend.latent_shape)
    other = noise_from_seeds([sample_seed(cfg.data.base_seed + 1, cfg.eval.seed_offset + i)
                              for i in range(len(evals.seeds))], backend.latent_shape)
    with torch.no_grad():
        refined = refiner(noise, backend.encode_prompts(evals.prompts))
    correction, independent = refined - noise, other - noise
    plot_spectra({"refined - x_T": radial_power_spectrum(correction),
                  "x_T' - x_T (independent)": radial_power_spectrum(independent)},
                 path, "Power spectrum of the refinement")
    return {"low_band": "radial frequency < 0.25 x Nyquist",
            "refinement_low_fraction": low_frequency_fraction(correction),
            "independent_noise_low_fraction": low_frequency_fraction(independent),
            "refinement_rms": float(correction.pow(2).mean().sqrt())}


def _read_log(directory: Path, up_to_step: int) -> list[dict]:
    path = directory / "train_log.csv"
    if not path.is_file():
        return []
    with open(path) as handle:
        rows = [{k: float(v) for k, v in row.items() if v not in ("", None)} for row in csv.DictReader(handle)]
    return [row for row in rows if row["step"] <= up_to_step]


def plot_training_curves(dirs: dict[str, Path], up_to_step: int, path: Path) -> dict:
    """Loss vs wall-clock of each loss up to ``up_to_step`` (left) and peak memory (right), one PNG.

    Peak RSS is the whole run's (``done.json``): for a run that trained further than
    ``up_to_step`` it is an upper bound of the peak at that step.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    summary = {}
    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 3.8))
    for name, directory in dirs.items():
        log = _read_log(directory, up_to_step)
        done = directory / "done.json"
        stats = json.loads(done.read_text()) if done.is_file() else {}
        if log:
            left.plot([r["seconds"] for r in log], [r["loss"] for r in log], label=name)
        summary[name] = {"final_loss": log[-1]["loss"] if log else None,
                         "seconds": log[-1]["seconds"] if log else None,
                         "peak_rss_mb": stats.get("peak_rss_mb")}
    left.set_xlabel("wall-clock (s)")
    left.set_ylabel("image-space loss")
    left.set_yscale("log")
    left.legend()
    names = [n for n in summary if summary[n]["peak_rss_mb"]]
    right.bar(names, [summary[n]["peak_rss_mb"] for n in names])
    right.set_ylabel("peak RSS (MB)")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return summary


def transfer_style(demo) -> str:
    """The transfer fine-tune's style in words (``demo.transfer_thicken``, ``demo.transfer_slant``)."""
    styles = [f"strokes thickened by {demo.transfer_thicken} px"] if demo.transfer_thicken else []
    styles += [f"digits slanted by {demo.transfer_slant:g}"] if demo.transfer_slant else []
    return ", ".join(styles)


def _sweep_table(results: dict) -> str:
    columns = [c for c in columns_of(results.get("task", "digits")) if c[0] not in ("ms_per_sample", "gap_closed")]
    main, sweep = results["main"], results["sweep"]
    named = [(f"teacher, {'unguided' if row['scale'] == 1 else 'CFG'} w={row['scale']:g}"
              + (" (chosen)" if row["scale"] == sweep["chosen_scale"] else ""), row) for row in sweep["rows"]]
    named += [(f"teacher, {row['guider']} w={row['scale']:g} (not used to choose w)", row)
              for row in sweep.get("guider_rows", [])]
    named += [(f"{REFINED} [trained on w={sweep['teacher_guidance_scale']:g}]", main[REFINED]),
              (f"{DISTILLED} [w={sweep['teacher_guidance_scale']:g}]", main[DISTILLED])]
    return metrics_markdown(named, columns)


def _scores_text(cfg) -> str:
    """The paragraph that says what the tables' scores are, for this config's task."""
    if cfg.model.digits.task == "compose":
        return ("Each prompt names a digit, its position (quadrant), size and stroke thickness on a "
                f"{cfg.model.digits.canvas}x{cfg.model.digits.canvas} canvas (\"a small thick seven in the top "
                "left\"). All scores are computed with an in-domain attribute classifier (one head per attribute): "
                "**adherence** is the share of samples with every attribute right (per attribute below), accuracy "
                "the digit head's agreement with the prompted digit; FID in its feature space against real "
                "composed images; class-conditional FID per prompted digit, averaged; precision and recall with "
                "k-NN manifolds (Kynkäänniemi et al. 2019, k=3), per digit, averaged. **Noise-like** is the share of "
                "samples farther (pixel L2) from every real composed image than held-out real images are from the "
                "training split's. The gap-closed column is (row - unguided) / (guided - unguided) on adherence, "
                "what guidance buys on this task.")
    return ("All scores are computed in the feature "
            "space of an in-domain digit classifier: FID against all 1,797 real digits; class-conditional FID "
            "(FID of the samples prompted with digit d against the real d's, averaged over the ten digits: a "
            "sample of the wrong digit counts against it, which FID ignores); precision and recall with k-NN "
            "manifolds (Kynkäänniemi et al. 2019, k=3), per digit, averaged; accuracy is the classifier's agreement "
            "with the prompted digit. **Noise-like** is the share of samples farther (pixel L2) from every real "
            "digit than the farthest held-out real digit is from the classifier's training split: noise, speckle "
            "or a malformed stroke. The gap-closed column is (unguided - row) / (unguided - guided) on "
            "class-conditional FID, the metric the guidance scale was chosen by.")


def write_report(cfg, results: dict, run_dir: Path) -> None:
    main = results["main"]
    guided, refined, unguided = main[GUIDED], main[REFINED], main[UNGUIDED]
    goals = results["goals"] = judge_goals(results)
    sweep = results["sweep"]
    spectrum = results["spectrum"]
    curves = results["training_curves"]
    load = results.get("load_average", {})
    cpu = results.get("stage_cpu_seconds", {})
    lines = [
        "# NoiseRefine on the embedded digits default"
        + (" (compositional task)" if cfg.model.digits.task == "compose" else ""), "",
        f"Teacher `{cfg.model.path}` ({cfg.model.digits.prediction_type}, {cfg.model.digits.train_steps} steps) with "
        f"{cfg.teacher.guidance} scale {cfg.teacher.guidance_scale:g} (chosen by the guidance sweep below), "
        f"{cfg.teacher.num_steps} teacher steps; students sample {cfg.student.num_steps} DDIM steps. "
        f"{cfg.eval.num_samples} held-out seeds, the same for every row. " + _scores_text(cfg) + " NFE counts "
        "network evaluations per sample (the refiner costs 2 with refiner.form=difference, its LoRA forward and "
        f"the base forward of its correction, and 1 with single_call; this run's: {cfg.refiner.form}).", "",
        "## Main table", "", results["main_table"], "",
        *(["Per attribute (the share of samples with it right):", "", results["attribute_table"], ""]
          if "attribute_table" in results else []),
        "Unguided, guided and refined samples for the first "
        f"{cfg.eval.grid_columns} held-out seeds (a fixed rule; same seed and prompt in every column):", "",
        "![comparison](comparison.png)", "",
        f"All rows, first {cfg.eval.grid_columns * 2} seeds:", "", "![samples](samples.png)", "",
        "## The paper's recipe: what this run follows", "",
        "The paper's SD 2.1 values (README \"The paper's recipe\") against this run's config "
        "(`noiserefine/digits/recipe.py`).", "", recipe_table(cfg), "",
        "## Goals (measured, not tuned)", "",
        "Judged from `metrics.json` by `noiserefine.digits.report.judge_goals`; thresholds fixed before the run.", "",
        "| group | goal | measured | met |", "|---|---|---|---|",
        *[f"| {g['group']} | {g['goal']} | {g['measured']} | {'yes' if g['met'] else '**no**'} |" for g in goals], "",
        "## Guidance sweep of the teacher (chooses w)", "",
        f"Guided sampling of the teacher alone at every w of `demo.sweep_scales` ({cfg.student.num_steps} DDIM steps, "
        f"the held-out seeds). Rule: {sweep['rule']}. It chose **w = {sweep['chosen_scale']:g}** before any target "
        "was generated (the cache is keyed by it); the refined and guidance-distilled rows below are trained "
        "on that w and drawn as horizontal lines on the same axes.", "",
        _sweep_table(results), "", "![sweep](sweep.png)", "",
        f"## Ablation: image-space (MSD) vs noise-space loss ({cfg.train.max_steps} steps each)", "",
        "The main run's config with `train.loss=noise_space` (regress x̂_T onto the DDIM inversion of the "
        "guided target); the MSD row is the main refiner.", "", results["noise_space_table"], "",
        f"## Ablation: MSD vs full gradient (first {cfg.demo.full_gradient_steps} steps)", "",
        "The main run's config with `train.loss=full_gradient`, stopped at step "
        f"{cfg.demo.full_gradient_steps}; the MSD row is the main run's snapshot at that step, its "
        "curve the main run's log up to it (its peak RSS is over the whole run).", "",
        results["gradient_table"], "",
        "| loss | final loss | wall-clock (s) | peak RSS (MB) |", "|---|---|---|---|",
        *[f"| {n} | {s['final_loss']} | {s['seconds']} | {s['peak_rss_mb']} |" for n, s in curves.items()], "",
        "![MSD vs full gradient](msd_vs_full_gradient.png)", "",
        f"## Transfer to a fine-tuned teacher ({transfer_style(cfg.demo)}), refiner applied zero-shot", "",
        results["transfer_table"], "", "![transfer](transfer.png)", "",
        "## Spectrum of the refinement (paper Fig. 3)", "",
        f"Energy share below 0.25 x Nyquist: refinement {spectrum['refinement_low_fraction']:.3f}, "
        f"difference of two independent noises {spectrum['independent_noise_low_fraction']:.3f} "
        f"(RMS of the refinement {spectrum['refinement_rms']:.3f}).", "", "![spectrum](spectrum.png)", "",
        "## Stage times", "",
        f"Load average (1, 5, 15 min) at the start {load.get('start')}, at the end {load.get('end')} on "
        f"{load.get('cpus')} CPUs. CPU seconds are user+sys of the demo and its waited-for children "
        "(Ray's worker processes are not its children: the cache stage's CPU time is undercounted).", "",
        "| stage | wall (s) | CPU (s) |", "|---|---|---|",
        *[f"| {k} | {v} | {cpu.get(k, '-')} |" for k, v in results["stage_seconds"].items()],
        f"| total | {results['total_seconds']} | {round(sum(cpu.values()), 1) if cpu else '-'} |", "",
        f"Unguided accuracy {unguided['accuracy']:.3f}, guided {guided['accuracy']:.3f}, "
        f"refined {refined['accuracy']:.3f}.", ""]
    write_text_atomic(run_dir / "report.md", "\n".join(lines))

"""Refiner experiments at equal data on the embedded default: one table of variants of the main run's refiner.

    python bench/refiner_experiments.py --out runs/experiments --config configs/compose.yaml \\
        --variant base --variant single_call refiner.form=single_call \\
        --variant steps300 train.max_steps=300 [--ranks 2] [--set key=value ...]

Every variant is ``configs/digits.yaml`` + ``--config`` files + ``--set`` overrides + its own overrides,
trained by the DeepSpeed job (``trainer/train.py``, ``--ranks`` ranks, as ``make demo`` does) into
``OUT/NAME`` (re-running resumes or skips a finished one). The teacher, classifier and teacher-target
cache are the config's own (those ``make demo`` built; missing ones are made, the cache by the Ray job,
once per teacher config). Scores on the held-out seeds, in the task's classifier feature space:
unguided and guided (the cache's teacher) once, then each variant's refined unguided sampling with its
own student steps. Per variant: its calls per sample, training seconds and s/step (``train_log.csv``),
and its refiner forward alone (best of ``--repeats``, all variants interleaved). Prints a Markdown table
and writes ``OUT/results.json``. Times are only comparable within one run.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from noiserefine.backends import load_backend  # noqa: E402
from noiserefine.config import load_config  # noqa: E402
from noiserefine.digits.classifier import digit_metrics  # noqa: E402
from noiserefine.digits.demo import generate_cache, train_refiner  # noqa: E402
from noiserefine.digits.report import refined_row, refiner_on_fresh_backend  # noqa: E402
from noiserefine.digits.sweep import sweep_guidance  # noqa: E402
from noiserefine.digits.teacher import ensure_digits_teacher  # noqa: E402
from noiserefine.evaluation.rows import eval_set, sample_row, score_rows  # noqa: E402
from noiserefine.evaluation.scores import gap_closed  # noqa: E402
from noiserefine.files import write_text_atomic  # noqa: E402
from noiserefine.noise import noise_from_seeds  # noqa: E402

KEYS = ("nfe", "fid", "fid_class", "accuracy", "adherence", "precision", "recall", "noise_share")


def training_seconds(refiner_run: Path) -> tuple[float, float]:
    """(seconds of the last logged step, seconds per step past the first logged one) from ``train_log.csv``."""
    rows = list(csv.DictReader((refiner_run / "train_log.csv").read_text().splitlines()))
    first, last = rows[0], rows[-1]
    steps = int(last["step"]) - int(first["step"])
    per_step = (float(last["seconds"]) - float(first["seconds"])) / steps if steps else float("nan")
    return float(last["seconds"]), per_step


def time_refiners(refiners: dict, evals, repeats: int) -> dict[str, float]:
    """Best seconds per sample of each refiner's forward over all eval seeds, the variants interleaved."""
    backend = next(iter(refiners.values())).backend
    noise = noise_from_seeds(evals.seeds, backend.latent_shape, backend.device, backend.dtype)
    best = {name: float("inf") for name in refiners}
    with torch.no_grad():
        for _ in range(repeats):
            for name, refiner in refiners.items():
                started = time.perf_counter()
                refiner.refine(noise, evals.prompts)
                best[name] = min(best[name], (time.perf_counter() - started) / len(evals.seeds))
    return best


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=REPO / "runs" / "experiments")
    parser.add_argument("--config", action="append", default=[], help="YAML on top of configs/digits.yaml")
    parser.add_argument("--set", action="append", default=[], dest="common", help="key=value for every variant")
    parser.add_argument("--variant", action="append", nargs="+", required=True, metavar="NAME [key=value]",
                        help="a variant: its name, then its overrides")
    parser.add_argument("--ranks", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args(argv)
    names = [v[0] for v in args.variant]
    if len(set(names)) != len(names) or any("=" in n or "/" in n for n in names):
        parser.error(f"--variant names must be unique and hold no '=' or '/': {names}")
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    out = args.out.resolve()
    config_files = [str(REPO / "configs" / "digits.yaml"), *[str(Path(c).resolve()) for c in args.config]]
    common = ["train.eval_every=1000000", *args.common]
    variants = {v[0]: common + v[1:] for v in args.variant}
    base = load_config(config_files, common)
    load = {"start": os.getloadavg()}
    seconds: dict[str, float] = {}
    started = time.perf_counter()
    ensure_digits_teacher(base.model.digits, base.model.path)
    seconds["teacher"] = time.perf_counter() - started
    for name, overrides in variants.items():
        started = time.perf_counter()
        generate_cache(config_files, overrides, out)  # a finished cache is skipped at once
        train_refiner(config_files, overrides, out / name, args.ranks, out)
        seconds[f"cache + train {name}"] = time.perf_counter() - started
    load["after training"] = os.getloadavg()

    started = time.perf_counter()
    backend, metric_fn, evals = load_backend(base.model), digit_metrics(base), eval_set(base)
    w = float(base.teacher.guidance_scale)
    rows = [sample_row("unguided", backend, evals, base.student.num_steps, batch_size=base.eval.batch_size),
            sample_row(f"guided, w={w:g}", backend, evals, base.teacher.num_steps,
                       guidance=sweep_guidance(base, w), batch_size=base.eval.batch_size)]
    refiners = {}
    for name, overrides in variants.items():
        cfg = load_config(config_files, overrides)
        refiners[name] = refiner_on_fresh_backend(cfg, out / name / "refiner")
        rows.append(refined_row(name, backend, refiners[name], evals, cfg))
    score_rows(rows, backend, evals, metric_fn)
    forward = time_refiners(refiners, evals, args.repeats)
    seconds["evaluation"] = time.perf_counter() - started
    load["end"] = os.getloadavg()

    gap_metric = "adherence" if "adherence" in rows[0].metrics else "accuracy"
    unguided, guided = rows[0].metrics[gap_metric], rows[1].metrics[gap_metric]
    table = {}
    for row in rows:
        record = {k: row.metrics[k] for k in KEYS if k in row.metrics}
        record["gap_closed"] = gap_closed(unguided, row.metrics[gap_metric], guided)
        if row.name in variants:
            record["overrides"] = variants[row.name][len(common):]
            record["train_seconds"], record["seconds_per_step"] = training_seconds(out / row.name)
            record["refiner_ms_per_sample"] = forward[row.name] * 1000
        table[row.name] = record
    result = {"config_files": config_files, "common_overrides": common, "ranks": args.ranks,
              "seconds": {k: round(v, 1) for k, v in seconds.items()}, "cpus": os.cpu_count(),
              "load_average": {k: [round(x, 2) for x in v] for k, v in load.items()},
              "torch": torch.__version__, "rows": table}
    write_text_atomic(out / "results.json", json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))
    print(f"\n| row | overrides | calls | {gap_metric} | gap closed | FID | class-cond. FID | precision | recall "
          "| noise-like | train s (s/step) | refiner ms/sample |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|")
    for name, r in table.items():
        train = (f"{r['train_seconds']:.0f} ({r['seconds_per_step']:.2f})" if "train_seconds" in r else "")
        forward_ms = f"{r['refiner_ms_per_sample']:.2f}" if "refiner_ms_per_sample" in r else ""
        print(f"| {name} | {' '.join(r.get('overrides', [])) or '-'} | {r['nfe']} | {r[gap_metric]:.3f} | "
              f"{r['gap_closed']:.2f} | {r['fid']:.2f} | {r['fid_class']:.2f} | {r['precision']:.3f} | "
              f"{r['recall']:.3f} | {r['noise_share']:.1%} | {train} | {forward_ms} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""The refiner's two forms at equal budget on the digits default: ``difference`` (2 calls) vs ``single_call`` (1).

    python bench/bench_one_call.py --out runs/one-call [--config configs/compose.yaml] [key=value ...]

Trains (or reuses, under --out) the digit teacher, the teacher-target cache (Ray) and one refiner per form
(``trainer/train.py``, one rank, the same cache, seeds, steps, batch and learning rate), with
``configs/digits.yaml`` plus the overrides given. Then scores on the held-out seeds, in the digit
classifier's feature space: unguided, guided (the cache's teacher) and each refiner's refined unguided
sampling (FID, class-conditional FID, accuracy = adherence to the prompted digit, calls per sample), and
times the refiners' forward alone (best of --repeats, the forms interleaved; the rows' seconds include the
sampler). Prints one JSON record and a Markdown table. Times are only comparable within one run.
"""

from __future__ import annotations

import argparse
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
from noiserefine.noise import noise_from_seeds  # noqa: E402

FORMS = ("difference", "single_call")
KEYS = ("nfe", "fid", "fid_class", "accuracy", "adherence", "precision", "recall", "noise_share",
        "seconds_per_sample")  # adherence: the compositional task's only


def time_refiners(refiners: dict, evals, repeats: int) -> dict[str, float]:
    """Best seconds per sample of each refiner's forward over all eval seeds, the forms interleaved."""
    backend = next(iter(refiners.values())).backend
    noise = noise_from_seeds(evals.seeds, backend.latent_shape, backend.device, backend.dtype)
    best = {form: float("inf") for form in refiners}
    with torch.no_grad():
        for _ in range(repeats):
            for form, refiner in refiners.items():
                started = time.perf_counter()
                refiner.refine(noise, evals.prompts)
                best[form] = min(best[form], (time.perf_counter() - started) / len(evals.seeds))
    return best


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=REPO / "runs" / "one-call")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--config", action="append", default=[], help="YAML on top of configs/digits.yaml "
                        "(configs/compose.yaml: the compositional default)")
    parser.add_argument("overrides", nargs="*")
    args = parser.parse_args()
    out = args.out.resolve()
    config_files = [str(REPO / "configs" / "digits.yaml"), *[str(Path(c).resolve()) for c in args.config]]
    overrides = [f"model.path={out / 'teacher'}", f"eval.classifier_dir={out / 'classifier'}",
                 f"data.cache_root={out / 'cache'}", "train.eval_every=1000000", *args.overrides]
    cfg = load_config(config_files, overrides)
    seconds, load = {}, {"start": os.getloadavg()}
    started = time.perf_counter()
    ensure_digits_teacher(cfg.model.digits, cfg.model.path)
    seconds["teacher"] = time.perf_counter() - started
    started = time.perf_counter()
    generate_cache(config_files, overrides, out)
    seconds["cache"] = time.perf_counter() - started
    for form in FORMS:
        started = time.perf_counter()
        train_refiner(config_files, overrides + [f"refiner.form={form}"], out / f"refiner-{form}", 1, out)
        seconds[f"train {form}"] = time.perf_counter() - started
    load["after training"] = os.getloadavg()

    started = time.perf_counter()
    backend, metric_fn, evals = load_backend(cfg.model), digit_metrics(cfg), eval_set(cfg)
    steps, batch, w = cfg.student.num_steps, cfg.eval.batch_size, float(cfg.teacher.guidance_scale)
    refiners = {form: refiner_on_fresh_backend(cfg, out / f"refiner-{form}" / "refiner") for form in FORMS}
    rows = [sample_row("unguided", backend, evals, steps, batch_size=batch),
            sample_row(f"guided, CFG w={w:g}", backend, evals, steps, guidance=sweep_guidance(cfg, w),
                       batch_size=batch)]
    rows += [refined_row(f"refined, {form}", backend, refiner, evals, cfg) for form, refiner in refiners.items()]
    score_rows(rows, backend, evals, metric_fn)
    refiner_seconds = time_refiners(refiners, evals, args.repeats)
    seconds["evaluation"] = time.perf_counter() - started
    load["end"] = os.getloadavg()
    record = {"overrides": overrides, "seconds": {k: round(v, 1) for k, v in seconds.items()},
              "load_average": {k: [round(x, 2) for x in v] for k, v in load.items()}, "cpus": os.cpu_count(),
              "refiner_forward_ms_per_sample": {k: round(v * 1000, 4) for k, v in refiner_seconds.items()},
              "rows": {row.name: {k: row.metrics[k] for k in KEYS if k in row.metrics} for row in rows}}
    print(json.dumps(record, indent=2))
    print("\n| row | calls | FID | class-cond. FID | accuracy | adherence | precision | recall | noise-like | ms/sample |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for row in rows:
        m = row.metrics
        print(f"| {row.name} | {m['nfe']} | {m['fid']:.2f} | {m['fid_class']:.2f} | {m['accuracy']:.3f} | "
              f"{m.get('adherence', float('nan')):.3f} | "
              f"{m['precision']:.3f} | {m['recall']:.3f} | {m['noise_share']:.1%} | "
              f"{m['seconds_per_sample'] * 1000:.2f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""The paper's table: FID / IS / CLIPScore / PickScore of four settings on the same seeds and prompts.

    python -m noiserefine.evaluate --config configs/sd21.yaml --refiner runs/sd21/refiner \
        [--num-samples 30000] [--out DIR] [--store DIR] [--distilled PATH] [--guidance-scale W] [key=value ...]

Settings (rows), all with ``benchmark.num_steps`` (default ``student.num_steps``) sampler steps:

1. ``Gaussian, unguided``: ``x_T`` from each sample's seed, no guidance;
2. ``Gaussian, guided``: the same ``x_T`` with the teacher's guidance (``teacher.*``: CFG or CFG+PAG);
3. ``guidance-distilled``: a guidance-distilled model of the same family (``--distilled`` or
   ``benchmark.distilled_path``), unguided; left out when none is given;
4. ``refined, unguided``: ``x̂_T = refiner(x_T)``, no guidance (the refiner's forwards counted in NFE: 2, or 1 for refiner.form=single_call).
   A refiner trained for a range of guidance scales refines for the guided row's w, ``teacher.guidance_scale``.

``--guidance-scale W`` is ``teacher.guidance_scale=W``: the guided row's scale and, for a refiner told w, the
refiner's; a refiner of one scale takes only its own (``noiserefine.refiner_scales``: the rules and errors).

The protocol (COCO captions, ImageNet classes or a prompts file; seeds; the FID reference and image
rule) is ``noiserefine.evaluation.protocols``; the networks are ``evaluation.features`` (torch-fidelity's
InceptionV3 from ``benchmark.inception_path``, CLIP from ``eval.clip_path``, PickScore from
``eval.pickscore_path``; an unset path leaves its metric out, a missing file is an error naming it).
The rows are ``evaluation.settings``, the run ``evaluation.benchmark``, the keys ``evaluation.run_identity``,
the FID reference's statistics ``evaluation.fid_reference`` and the written files ``evaluation.paper_report``.

Resumable: each row's per-sample results (Inception pool features and logits, CLIP/Pick scores, timings)
go to ``<store>/<row>-<key>/shard-*.npz`` as they are produced (atomic files). The key hashes what
determines them (model files, dtype, sampler, steps, guidance, refiner weights, protocol, seeds, image
rule, feature networks), never ``num_samples``, the batch size or the device, so re-running resumes a
killed run and samples only missing shards, a longer run extends a shorter one, and another
configuration gets other directories. ``--out`` (default ``benchmark.output_dir/<backend>-<run key>``)
belongs to one run key and refuses another, and a user's non-empty folder (no ``evaluation.json``);
``--store`` (default ``<out>/store``) may be shared between runs, e.g. to reuse the Gaussian rows when
evaluating several refiners (a folder holding anything but store directories is refused). Every stored
shard is checked when a run starts (ids, seeds, each array's length): a bad one is named, set aside and
sampled again. A ``benchmark.reference`` statistics file is checked before the first sample. Several GPUs: one process each,
``--worker I/K`` (same ``--out``), samples every K-th shard from the I-th; the last to finish writes the
report (a process that finds shards still missing says so and exits 0).

Written to ``--out``: ``metrics.json``, ``table.md``, ``grid.png`` (rows = settings, columns = the first
``benchmark.grid_columns`` samples), ``protocol.json`` (captions file + sha256, selection, seeds, image
rule, reference, weights' sha256, steps, guidance), ``samples.csv`` (sample, seed, prompt),
``config.yaml`` (resolved) and ``evaluation.json`` (run key, stores).
"""

from __future__ import annotations

import argparse
import sys

from .config import refiner_run_config
from .evaluation.benchmark import Evaluation
from .evaluation.paper_report import markdown_table
from .refiner_scales import refiner_guidance_scale, saved_refiner_config


def evaluate(cfg, refiner_dir, **kwargs) -> dict:
    """Run (or resume) the evaluation; returns the report written to ``metrics.json``."""
    return Evaluation(cfg, refiner_dir, **kwargs).run()


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m noiserefine.evaluate", description=__doc__.splitlines()[0])
    p.add_argument("--refiner", required=True, help="refiner directory (refiner.safetensors, config.yaml, sampler.json) "
                   "or Hub repo id OWNER/NAME (noiserefine/hub_refs.py: ./OWNER/NAME is a directory)")
    p.add_argument("--config", action="append", default=[], help="YAML config (repeatable); default: the refiner's")
    p.add_argument("--num-samples", type=int, default=None, help="default: benchmark.num_samples")
    p.add_argument("--out", default=None, help="output directory (default: benchmark.output_dir/<backend>-<run key>)")
    p.add_argument("--store", default=None, help="per-sample results (default: <out>/store); shareable between runs")
    p.add_argument("--distilled", default=None, help="a guidance-distilled model directory (default: "
                                                      "benchmark.distilled_path)")
    p.add_argument("--worker", default="0/1", help="I/K: sample every K-th shard from the I-th (one process per "
                                                   "GPU, same --out); the last to finish writes the report")
    p.add_argument("--guidance-scale", type=float, default=None,
                   help="w of the guided row and of a refiner trained for a range of scales (teacher.guidance_scale"
                        "=W); a refiner of one scale takes only its own")
    p.add_argument("--no-progress", action="store_true")
    p.add_argument("overrides", nargs="*", help="key=value config overrides, applied last")
    return p


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    at_w = [] if args.guidance_scale is None else [f"teacher.guidance_scale={args.guidance_scale!r}"]
    refiner_dir, cfg = refiner_run_config(args.refiner, args.config, args.overrides + at_w)
    if args.guidance_scale is not None:  # a refiner of one scale: refused unless W is its own (before any sampling)
        refiner_guidance_scale(saved_refiner_config(refiner_dir), args.guidance_scale,
                               f"--refiner {refiner_dir} --guidance-scale")
    try:
        worker = tuple(int(part) for part in args.worker.split("/"))
        assert len(worker) == 2
    except (ValueError, AssertionError):
        raise ValueError(f"--worker {args.worker!r} is not I/K") from None
    report = evaluate(cfg, refiner_dir, out=args.out, store=args.store, num_samples=args.num_samples,
                      distilled_path=args.distilled, progress=not args.no_progress, worker=worker)
    if not report["complete"]:
        print(f"worker {args.worker} done; still missing (other workers): {report['missing']}; the last worker to "
              f"finish, or this command again, writes the report to {report['out']}", flush=True)
        return 0
    print(markdown_table(report))
    print(f"written to {report['out']}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())

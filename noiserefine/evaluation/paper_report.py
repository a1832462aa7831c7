"""The evaluation's written outputs (see ``noiserefine.evaluate``): ``config.yaml``, ``protocol.json`` and
``samples.csv`` before sampling; once every row is complete, ``metrics.json``, ``table.md``
(:func:`markdown_table`), ``grid.png`` and the finished ``evaluation.json``.
"""

from __future__ import annotations

import csv
import io
import json
import math
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch

from ..config import save_config
from ..files import atomic_path, write_text_atomic
from .metrics import fid_from_features, inception_score_splits
from .run_identity import write_finished
from .scores import gap_closed
from .settings import GUIDED_ROW, UNGUIDED_ROW, guidance_record

if TYPE_CHECKING:
    from .benchmark import Evaluation


def write_protocol(evaluation: Evaluation) -> None:
    """``config.yaml`` (resolved), ``protocol.json`` (protocol, rows, stores, networks, run key) and
    ``samples.csv`` (sample, seed, prompt)."""
    out, protocol = evaluation.out, evaluation.protocol
    save_config(evaluation.cfg, out / "config.yaml")
    record = {**protocol.record, "resolution": evaluation.resolution, "num_steps": evaluation.steps,
              "rows": {row.slug: {"label": row.label, "nfe": row.nfe, "guidance": guidance_record(row.guidance),
                                  "model_path": str(row.model_cfg.path),
                                  "store": str(evaluation.stores[row.slug].directory)}
                       for row in evaluation.rows},
              "refiner": str(evaluation.refiner_dir.resolve()),
              "inception": evaluation.inception.record if evaluation.inception else None,
              "text_image": evaluation.text_image.record if evaluation.text_image else None,
              "run_key": evaluation.run_key}
    write_text_atomic(out / "protocol.json", json.dumps(record, indent=2, ensure_ascii=False) + "\n")
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(["sample", "seed", "prompt"])
    writer.writerows((i, seed, prompt) for i, (seed, prompt) in enumerate(zip(protocol.seeds, protocol.prompts)))
    write_text_atomic(out / "samples.csv", buffer.getvalue())


def row_metrics(evaluation: Evaluation, reference) -> dict[str, dict]:
    """Each row's metrics from its complete store (FID against ``reference``'s (mu, sigma) when given), with
    the gap closed of the non-Gaussian rows; a metric left out adds a note to ``evaluation.notes``."""
    n, results = evaluation.protocol.num_samples, {}
    for row in evaluation.rows:
        arrays = evaluation.stores[row.slug].read_all(evaluation.windows, evaluation.protocol.seeds)
        metrics: dict = {"label": row.label, "num_samples": n, "nfe": row.nfe,
                         "seconds_per_image": float(arrays["sample_seconds"].sum() / n),
                         "decode_seconds_per_image": float(arrays["decode_seconds"].sum() / n),
                         "feature_seconds_per_image": float(arrays["feature_seconds"].sum() / n)}
        if reference is not None and "inception_pool" in arrays:
            metrics["fid"] = fid_from_features(arrays["inception_pool"], *reference)
        if "inception_logits" in arrays:
            if n >= 10:
                metrics["inception_score"], metrics["inception_score_std"] = \
                    inception_score_splits(arrays["inception_logits"])
            else:
                evaluation.notes.append(f"IS not computed: {n} samples, fewer than its 10 splits")
        for name in ("clip_score", "pick_score"):
            if name in arrays:
                metrics[name] = float(arrays[name].mean())
        results[row.slug] = metrics
    unguided, guided = results[UNGUIDED_ROW].get("fid"), results[GUIDED_ROW].get("fid")
    for slug, metrics in results.items():
        if slug not in (UNGUIDED_ROW, GUIDED_ROW) and unguided is not None and "fid" in metrics:
            metrics["gap_closed"] = gap_closed(unguided, metrics["fid"], guided)
    return results


def write_report(evaluation: Evaluation, reference) -> dict:
    """Write ``metrics.json``, ``table.md``, ``grid.png`` and the finished ``evaluation.json``; returns the
    report (``metrics.json``'s content)."""
    results = row_metrics(evaluation, reference)
    notes = list(dict.fromkeys(evaluation.notes))
    device = evaluation.device
    device_name = torch.cuda.get_device_name(device) if device.type == "cuda" else str(device)
    report = {"complete": True, "run_key": evaluation.run_key, "protocol": evaluation.protocol.record,
              "resolution": evaluation.resolution, "num_steps": evaluation.steps, "device": device_name,
              "dtype": evaluation.cfg.model.dtype, "rows": results, "notes": notes, "out": str(evaluation.out)}
    write_text_atomic(evaluation.out / "metrics.json", json.dumps(report, indent=2, ensure_ascii=False) + "\n")
    write_text_atomic(evaluation.out / "table.md", markdown_table(report) + "\n")
    _save_grid(evaluation)
    write_finished(evaluation.out, evaluation.run_key, evaluation.run_record, evaluation.stores)
    return report


def _save_grid(evaluation: Evaluation) -> None:
    """``grid.png``: rows = settings, columns = the first ``benchmark.grid_columns`` samples."""
    from PIL import Image

    from .grids import save_image_grid

    columns = min(evaluation.bench.grid_columns, evaluation.protocol.num_samples)
    images = []
    for row in evaluation.rows:
        for index in range(columns):
            with Image.open(evaluation.stores[row.slug].images / f"{index:08d}.png") as image:
                images.append(torch.from_numpy(np.asarray(image.convert("RGB")).copy()).permute(2, 0, 1))
    batch = torch.stack(images).float() / 255
    scale = max(1, 64 // batch.shape[-1])
    with atomic_path(evaluation.out / "grid.png") as tmp:
        save_image_grid(batch, tmp, nrow=columns, row_labels=[row.label for row in evaluation.rows], scale=scale)


def _format(value, digits: int) -> str:
    return "n/a" if value is None or (isinstance(value, float) and math.isnan(value)) else f"{value:.{digits}f}"


def markdown_table(report: dict) -> str:
    """The paper-style table of a report (``metrics.json``)."""
    lines = ["| setting | NFE | FID ↓ | IS ↑ | CLIPScore ↑ | PickScore ↑ | s/image | gap closed |",
             "|---|---|---|---|---|---|---|---|"]
    for slug, m in report["rows"].items():
        gap = "—" if slug in (UNGUIDED_ROW, GUIDED_ROW) else _format(m.get("gap_closed"), 2)
        lines.append(f"| {m['label']} | {m['nfe']} | {_format(m.get('fid'), 2)} | {_format(m.get('inception_score'), 2)}"
                     f" | {_format(m.get('clip_score'), 2)} | {_format(m.get('pick_score'), 2)}"
                     f" | {m['seconds_per_image']:.3f} | {gap} |")
    protocol = report["protocol"]
    source = {"coco": lambda: f"MS-COCO captions {Path(protocol['captions_file']).name} "
                              f"(sha256 {protocol['captions_sha256'][:12]})",
              "imagenet": lambda: f"ImageNet, {protocol['num_classes']} classes (class of sample i = i % "
                                  f"{protocol['num_classes']})",
              "prompts": lambda: f"prompts file {Path(protocol['prompts_file']).name}"}[protocol["kind"]]()
    reference = protocol.get("reference")
    with_fid = reference and any("fid" in m for m in report["rows"].values())
    lines += ["", f"{protocol['num_samples']} samples, {source}; {report['num_steps']} sampler steps; images at "
                  f"{report['resolution']} px for FID; FID reference: "
                  f"{reference['kind'] + ' ' + reference['path'] if with_fid else 'none'}; "
                  f"{report['device']}, {report['dtype']}.",
              "NFE: network evaluations per image (refined: the sampler's steps + the refiner's 2 forwards). "
              "s/image: prompt encoding + refiner + sampler steps (no VAE decode, no metric networks). "
              "gap closed = (FID_unguided - FID) / (FID_unguided - FID_guided)."]
    lines += [f"Note: {note}." for note in report["notes"]]
    return "\n".join(lines)

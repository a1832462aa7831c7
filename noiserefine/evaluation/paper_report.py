"""The evaluation's written outputs (see ``noiserefine.evaluate``): ``config.yaml``, ``protocol.json`` and
``samples.csv`` before sampling; once every row is complete, the metrics (:func:`row_metrics`, from the rows'
stores), ``metrics.json``, ``table.md`` (:func:`markdown_table`) and ``grid.png``. It gets the data it writes,
never the run (``evaluation.benchmark``), which marks ``evaluation.json`` finished afterwards.
"""

from __future__ import annotations

import csv
import io
import json
import math
from pathlib import Path

import numpy as np
import torch

from ..config import save_config
from ..files import atomic_path, write_text_atomic
from .metrics import fid_from_features, inception_score_splits
from .protocols import Protocol
from .scores import gap_closed
from .settings import GUIDED_ROW, UNGUIDED_ROW, Setting
from .store import ShardStore


def write_protocol(out: Path, cfg, protocol: Protocol, record: dict) -> None:
    """``config.yaml`` (resolved ``cfg``), ``protocol.json`` (the protocol's record plus ``record``: rows, stores,
    networks, run key) and ``samples.csv`` (sample, seed, prompt)."""
    save_config(cfg, out / "config.yaml")
    write_text_atomic(out / "protocol.json", json.dumps({**protocol.record, **record}, indent=2,
                                                        ensure_ascii=False) + "\n")
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(["sample", "seed", "prompt"])
    writer.writerows((i, seed, prompt) for i, (seed, prompt) in enumerate(zip(protocol.seeds, protocol.prompts)))
    write_text_atomic(out / "samples.csv", buffer.getvalue())


def row_metrics(rows: list[Setting], stores: dict[str, ShardStore], windows: list[tuple[int, int]],
                protocol: Protocol, reference) -> tuple[dict[str, dict], list[str]]:
    """Each row's metrics from its complete store (FID against ``reference``'s (mu, sigma) when given), with
    the gap closed of the non-Gaussian rows; and the notes on metrics left out."""
    n, results, notes = protocol.num_samples, {}, []
    for row in rows:
        arrays = stores[row.slug].read_all(windows, protocol.seeds)
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
                notes.append(f"IS not computed: {n} samples, fewer than its 10 splits")
        for name in ("clip_score", "pick_score"):
            if name in arrays:
                metrics[name] = float(arrays[name].mean())
        results[row.slug] = metrics
    unguided, guided = results[UNGUIDED_ROW].get("fid"), results[GUIDED_ROW].get("fid")
    for slug, metrics in results.items():
        if slug not in (UNGUIDED_ROW, GUIDED_ROW) and unguided is not None and "fid" in metrics:
            metrics["gap_closed"] = gap_closed(unguided, metrics["fid"], guided)
    return results, notes


def write_report(out: Path, report: dict, grid_rows: list[tuple[str, Path]], grid_columns: int) -> None:
    """Write ``report`` as ``metrics.json`` and ``table.md``, and ``grid.png`` from ``grid_rows`` (label, folder
    of ``<index:08d>.png``), the first ``grid_columns`` images of each."""
    write_text_atomic(out / "metrics.json", json.dumps(report, indent=2, ensure_ascii=False) + "\n")
    write_text_atomic(out / "table.md", markdown_table(report) + "\n")
    _save_grid(out / "grid.png", grid_rows, grid_columns)


def _save_grid(path: Path, grid_rows: list[tuple[str, Path]], columns: int) -> None:
    """Rows = settings, columns = the first ``columns`` samples."""
    from PIL import Image

    from .grids import save_image_grid

    images = []
    for _, folder in grid_rows:
        for index in range(columns):
            with Image.open(folder / f"{index:08d}.png") as image:
                images.append(torch.from_numpy(np.asarray(image.convert("RGB")).copy()).permute(2, 0, 1))
    batch = torch.stack(images).float() / 255
    scale = max(1, 64 // batch.shape[-1])
    with atomic_path(path) as tmp:
        save_image_grid(batch, tmp, nrow=columns, row_labels=[label for label, _ in grid_rows], scale=scale)


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
              "NFE: network evaluations per image (refined: the sampler's steps + the refiner's forwards, 2 or 1 by its refiner.form). "
              "s/image: prompt encoding + refiner + sampler steps (no VAE decode, no metric networks). "
              "gap closed = (FID_unguided - FID) / (FID_unguided - FID_guided)."]
    lines += [f"Note: {note}." for note in report["notes"]]
    return "\n".join(lines)

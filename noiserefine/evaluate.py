"""The paper's table: FID / IS / CLIPScore / PickScore of four settings on the same seeds and prompts.

    python -m noiserefine.evaluate --config configs/sd21.yaml --refiner runs/sd21/refiner \
        [--num-samples 30000] [--out DIR] [--store DIR] [--distilled PATH] [key=value ...]

Settings (rows), all with ``benchmark.num_steps`` (default ``student.num_steps``) sampler steps:

1. ``Gaussian, unguided``: ``x_T`` from each sample's seed, no guidance;
2. ``Gaussian, guided``: the same ``x_T`` with the teacher's guidance (``teacher.*``: CFG or CFG+PAG);
3. ``guidance-distilled``: a guidance-distilled model of the same family (``--distilled`` or
   ``benchmark.distilled_path``), unguided; left out when none is given;
4. ``refined, unguided``: ``x̂_T = refiner(x_T)``, no guidance (the refiner's two forwards counted in NFE).

The protocol (COCO captions, ImageNet classes or a prompts file; seeds; the FID reference and image
rule) is ``noiserefine.evaluation.protocols``; the networks are ``evaluation.features`` (torch-fidelity's
InceptionV3 from ``benchmark.inception_path``, CLIP from ``eval.clip_path``, PickScore from
``eval.pickscore_path``; an unset path leaves its metric out, a missing file is an error naming it).

Resumable: each row's per-sample results (Inception pool features and logits, CLIP/Pick scores, timings)
go to ``<store>/<row>-<key>/shard-*.npz`` as they are produced (atomic files). The key hashes what
determines them (model files, dtype, sampler, steps, guidance, refiner weights, protocol, seeds, image
rule, feature networks), never ``num_samples``, the batch size or the device, so re-running resumes a
killed run and samples only missing shards, a longer run extends a shorter one, and another
configuration gets other directories. ``--out`` (default ``benchmark.output_dir/<backend>-<run key>``)
belongs to one run key and refuses another; ``--store`` (default ``<out>/store``) may be shared between
runs, e.g. to reuse the Gaussian rows when evaluating several refiners. Several GPUs: one process each,
``--worker I/K`` (same ``--out``), samples every K-th shard from the I-th; the last to finish writes the
report (a process that finds shards still missing says so and exits 0).

Written to ``--out``: ``metrics.json``, ``table.md``, ``grid.png`` (rows = settings, columns = the first
``benchmark.grid_columns`` samples), ``protocol.json`` (captions file + sha256, selection, seeds, image
rule, reference, weights' sha256, steps, guidance), ``samples.csv`` (sample, seed, prompt),
``config.yaml`` (resolved) and ``evaluation.json`` (run key, stores).
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import gc
import io
import json
import math
import sys
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from omegaconf import OmegaConf

from .config import load_config, save_config
from .evaluation.features import InceptionFeatures, TextImageScores, load_inception
from .evaluation.metrics import fid_from_features, inception_score_splits
from .evaluation.protocols import (FID_IMAGE_RULE, Protocol, build_protocol, fid_image_rule,
                                   load_reference_image, load_statistics, to_uint8)
from .evaluation.scores import feature_statistics, gap_closed
from .evaluation.store import ShardStore, record_key, shard_windows
from .files import atomic_path, write_text_atomic
from .noise import noise_from_seeds
from .sampling import UNGUIDED, Guidance, rollout

FORMAT_VERSION = 1
EVALUATION_FILE = "evaluation.json"
UNGUIDED_ROW, GUIDED_ROW, DISTILLED_ROW, REFINED_ROW = "gaussian-unguided", "gaussian-guided", "distilled", "refined"


@dataclass
class Setting:
    """One row: how its samples are made (``backend()`` loads the model when the row runs)."""

    slug: str
    label: str
    nfe: int
    guidance: Guidance
    backend: Callable[[], object]
    model_cfg: object
    refine: bool = False
    identity: dict = field(default_factory=dict)


# ----------------------------------------------------------------------------------------------- helpers
def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _guidance_label(guidance: Guidance) -> str:
    if guidance.kind == "cfg":
        return f"CFG {guidance.scale:g}"
    if guidance.kind == "cfg_pag":
        return f"CFG {guidance.scale:g} + PAG {guidance.pag_scale:g}"
    return "none"


def _guidance_record(guidance: Guidance) -> dict:
    return {"kind": guidance.kind, "scale": guidance.scale, "pag_scale": guidance.pag_scale,
            "pag_layers": list(guidance.pag_layers)} if guidance.kind != "none" else {"kind": "none"}


def _save_png_atomic(image_uint8: torch.Tensor, path: Path) -> None:
    from PIL import Image

    with atomic_path(path) as tmp:
        Image.fromarray(image_uint8.permute(1, 2, 0).numpy()).save(tmp, format="PNG")


def _model_cfg_with_path(model_cfg, path: str):
    container = OmegaConf.to_container(model_cfg, resolve=True)
    container.update(path=str(path), init="pretrained")
    return OmegaConf.create(container)


def _without_paths(record: dict | None) -> dict | None:
    """A weights record minus where the files are (moving them keeps the results)."""
    if record is None:
        return None
    return {k: (_without_paths(v) if isinstance(v, dict) else v) for k, v in record.items()
            if not k.endswith("path")}


def _native_resolution(backend) -> int:
    """Side of the decoded images (one zero latent decoded)."""
    with torch.no_grad():
        image = backend.decode(torch.zeros((1, *backend.latent_shape), device=backend.device, dtype=backend.dtype))
    height, width = image.shape[-2:]
    if height != width:
        raise ValueError(f"the model decodes {height}x{width} images; set benchmark.resolution for a square FID crop")
    return int(height)


# ----------------------------------------------------------------------------------------------- rows
class Evaluation:
    """Everything one run needs: protocol, rows, stores, networks (see the module docstring)."""

    def __init__(self, cfg, refiner_dir: str | Path, *, out: str | Path | None = None, store: str | Path | None = None,
                 num_samples: int | None = None, distilled_path: str | None = None, progress: bool = True,
                 worker: tuple[int, int] = (0, 1),
                 inception: InceptionFeatures | None = None, text_image: TextImageScores | None = None):
        from .backends import load_backend
        from .sampler_record import check_architecture, check_same_sampler, read_sampler_record, scheduler_record
        from .hashing import file_sha256
        from .targets.identity import model_identity

        self.cfg, self.bench, self.progress = cfg, cfg.benchmark, progress
        self.worker, self.num_workers = int(worker[0]), int(worker[1])
        if not 0 <= self.worker < self.num_workers:
            raise ValueError(f"worker {self.worker}/{self.num_workers}: need 0 <= I < K")
        self.refiner_dir = Path(refiner_dir).expanduser()
        if not (self.refiner_dir / "refiner.safetensors").is_file():
            raise FileNotFoundError(f"--refiner {str(self.refiner_dir)!r} holds no refiner.safetensors")
        self.notes: list[str] = []
        self.protocol: Protocol = build_protocol(self.bench, num_samples)
        self.steps = int(self.bench.num_steps or cfg.student.num_steps)
        self.windows = shard_windows(self.protocol.num_samples, self.bench.shard_size)

        # the main model (the Gaussian rows run on it before the refiner is attached)
        self.backend = load_backend(cfg.model)
        self.device = torch.device(self.backend.device)
        record = read_sampler_record(self.refiner_dir)
        if record is not None:  # fail before hours of sampling, not at the refined row
            check_architecture(record, self.backend, self.refiner_dir)
            check_same_sampler(record, self.backend, self.refiner_dir)
            if int(record["num_steps"]) != self.steps:
                warnings.warn(f"the refiner was trained against {record['num_steps']} student steps; every row "
                              f"samples with {self.steps} (benchmark.num_steps)", stacklevel=2)
        self.resolution = int(self.bench.resolution or _native_resolution(self.backend))

        # the networks behind the metrics
        if inception is None and self.bench.inception_path:
            inception = load_inception(self.bench.inception_path, cfg.model.device, self.bench.feature_batch_size)
        self.inception = inception
        if self.inception is None:
            self.notes.append("FID and IS not computed: benchmark.inception_path is not set")
        if text_image is None and (cfg.eval.clip_path or cfg.eval.pickscore_path):
            text_image = TextImageScores.from_config(cfg, batch_size=self.bench.feature_batch_size)
        if text_image is not None and self.protocol.kind == "imagenet":
            self.notes.append("CLIPScore/PickScore not computed for the class-conditional ImageNet protocol")
            text_image = None
        self.text_image = text_image
        if self.text_image is None and self.protocol.kind != "imagenet":
            self.notes.append("CLIPScore/PickScore not computed: eval.clip_path and eval.pickscore_path are not set")
        if self.inception is not None and not self.protocol.reference_path:
            self.notes.append("FID not computed: benchmark.reference is not set")

        features = {"inception": _without_paths(self.inception.record) if self.inception else None,
                    "text_image": _without_paths(self.text_image.record) if self.text_image else None}
        common = {"format": FORMAT_VERSION, "protocol": self.protocol.identity, "num_steps": self.steps,
                  "image_rule": {"rule": FID_IMAGE_RULE, "resolution": self.resolution}, "features": features}
        sampler = scheduler_record(self.backend.scheduler_class, self.backend.scheduler_config)
        main_model = model_identity(cfg.model)
        teacher = Guidance.from_teacher(cfg.teacher)
        rows = [
            Setting(UNGUIDED_ROW, "Gaussian, unguided", self.steps, UNGUIDED, lambda: self.backend, cfg.model),
            Setting(GUIDED_ROW, f"Gaussian, guided ({_guidance_label(teacher)})", teacher.num_branches * self.steps,
                    teacher, lambda: self.backend, cfg.model),
        ]
        distilled = distilled_path or self.bench.distilled_path
        if distilled:
            distilled_cfg = _model_cfg_with_path(cfg.model, distilled)
            rows.append(Setting(DISTILLED_ROW, "guidance-distilled, unguided", self.steps, UNGUIDED,
                                lambda: load_backend(distilled_cfg), distilled_cfg,
                                identity={"model": model_identity(distilled_cfg)}))
        rows.append(Setting(REFINED_ROW, "refined, unguided", self.steps + 2, UNGUIDED, lambda: self.backend,
                            cfg.model, refine=True,
                            identity={"refiner": {"weights_sha256": file_sha256(self.refiner_dir / "refiner.safetensors"),
                                                  "config": OmegaConf.to_container(load_config(
                                                      self.refiner_dir / "config.yaml").refiner, resolve=True)}}))
        self.rows = rows
        store_root = None if store is None else Path(store).expanduser()
        self.stores: dict[str, ShardStore] = {}
        row_keys = {}
        for row in rows:
            identity = {**common, "row": row.slug, "model": main_model, "sampler": sampler,
                        "guidance": _guidance_record(row.guidance), **row.identity}
            row.identity = identity
            row_keys[row.slug] = record_key(identity)
        self.reference_identity = self._reference_identity()
        self.run_record = {"format": FORMAT_VERSION, "num_samples": self.protocol.num_samples, "rows": row_keys,
                           "reference": record_key(self.reference_identity) if self.reference_identity else None}
        self.run_key = record_key(self.run_record)
        self.out = Path(out).expanduser() if out else \
            Path(self.bench.output_dir).expanduser() / f"{cfg.model.backend}-{self.run_key[:12]}"
        self._claim_output()
        self.store_root = store_root or self.out / "store"
        for row in rows:
            self.stores[row.slug] = ShardStore(self.store_root, row.slug, row.identity)

    # ------------------------------------------------------------------------------------------ identity
    def _reference_identity(self) -> dict | None:
        protocol = self.protocol
        if not protocol.reference_path or self.inception is None:
            return None
        if protocol.reference_files is None:
            return {"kind": "statistics file", "sha256": protocol.record["reference"]["sha256"]}
        root = Path(protocol.reference_path).expanduser()
        listing = [(str(p.relative_to(root)), p.stat().st_size) for p in protocol.reference_files]
        return {"format": FORMAT_VERSION, "kind": "folder", "files_sha256": record_key({"files": listing}),
                "num_images": len(listing), "image_rule": {"rule": FID_IMAGE_RULE, "resolution": self.resolution},
                "inception": _without_paths(self.inception.record)}

    def _claim_output(self) -> None:
        path = self.out / EVALUATION_FILE
        if path.is_file():
            try:
                existing = json.loads(path.read_text())
            except (OSError, ValueError) as error:
                raise ValueError(f"{path}: unreadable ({error}); use another --out") from None
            if existing.get("run_key") != self.run_key:
                old, new = existing.get("run", {}), self.run_record
                differing = [k for k in sorted(set(old) | set(new)) if old.get(k) != new.get(k)]
                if isinstance(old.get("rows"), dict):
                    differing += [f"rows.{k}" for k in sorted(set(old["rows"]) | set(new["rows"]))
                                  if old["rows"].get(k) != new["rows"].get(k)]
                raise ValueError(f"{self.out} holds an evaluation of another configuration (differs in: "
                                 f"{', '.join(differing) or 'run key'}); use another --out (a shared --store keeps "
                                 "the rows both have in common)")
        self.out.mkdir(parents=True, exist_ok=True)
        write_text_atomic(path, json.dumps({"run_key": self.run_key, "run": self.run_record, "finished": False},
                                           indent=2, sort_keys=True) + "\n")

    # ------------------------------------------------------------------------------------------ sampling
    def _remaining(self, store: ShardStore, windows) -> int:
        return sum(b - a for a, b in windows if not store.has(a, b))

    def _mine(self, windows: list[tuple[int, int]]) -> list[tuple[int, int]]:
        """The windows this worker samples: every K-th (``--worker I/K``; all of them for one worker)."""
        return [window for k, window in enumerate(windows) if k % self.num_workers == self.worker]

    def _features(self, images_uint8: torch.Tensor, prompts: list[str] | None) -> dict[str, np.ndarray]:
        out: dict[str, np.ndarray] = {}
        if self.inception is not None:
            features = self.inception(fid_image_rule(images_uint8, self.resolution))
            out["inception_pool"], out["inception_logits"] = features["pool"], features["logits"]
        if self.text_image is not None and prompts is not None:
            out.update({k: v.astype(np.float64) for k, v in self.text_image.per_image(images_uint8, prompts).items()})
        return out

    def _sample_window(self, row: Setting, backend, refiner, start: int, stop: int) -> dict[str, np.ndarray]:
        protocol, batch = self.protocol, self.bench.batch_size
        parts: list[dict[str, np.ndarray]] = []
        for begin in range(start, stop, batch):
            end = min(begin + batch, stop)
            seeds, prompts = protocol.seeds[begin:end], protocol.prompts[begin:end]
            _sync(self.device)
            t0 = time.perf_counter()
            with torch.no_grad():
                noise = noise_from_seeds(seeds, backend.latent_shape, backend.device, backend.dtype)
                cond = backend.encode_prompts(prompts)
                if refiner is not None:
                    noise = refiner(noise, cond).to(device=backend.device, dtype=backend.dtype)
                latents = rollout(backend, noise, cond, self.steps, row.guidance)
                _sync(self.device)
                t1 = time.perf_counter()
                images = to_uint8(backend.decode(latents))
            _sync(self.device)
            t2 = time.perf_counter()
            for offset, index in enumerate(range(begin, end)):
                if index < self.bench.grid_columns or self.bench.save_images:
                    _save_png_atomic(images[offset], self.stores[row.slug].images / f"{index:08d}.png")
            features = self._features(images, prompts)
            t3 = time.perf_counter()
            count = end - begin
            parts.append({"sample_ids": np.arange(begin, end, dtype=np.int64),
                          "seeds": np.asarray(seeds, dtype=np.int64),
                          "sample_seconds": np.full(count, (t1 - t0) / count),
                          "decode_seconds": np.full(count, (t2 - t1) / count),
                          "feature_seconds": np.full(count, (t3 - t2) / count), **features})
        return {name: np.concatenate([part[name] for part in parts]) for name in parts[0]}

    def _run_row(self, row: Setting, bar) -> None:
        store, windows = self.stores[row.slug], self._mine(self.windows)
        if not self._remaining(store, windows):
            return
        bar.set_description(row.slug)
        backend = row.backend()
        refiner = None
        if row.refine:
            from .refiner import load_refiner

            refiner = load_refiner(self.refiner_dir, backend)
        try:
            for start, stop in windows:
                if store.has(start, stop):
                    continue
                store.write(start, stop, self._sample_window(row, backend, refiner, start, stop))
                bar.update(stop - start)
        finally:
            if refiner is not None:
                from .refiner import detach_refiner

                detach_refiner(backend.denoiser)
            if backend is not self.backend:
                del backend
                gc.collect()
                if self.device.type == "cuda":
                    torch.cuda.empty_cache()

    def _reference_statistics(self, bar) -> tuple[np.ndarray, np.ndarray] | None:
        """(mu, sigma) of the reference, None without one; ``self.reference_pending`` while other workers'
        reference shards are missing."""
        protocol = self.protocol
        if self.reference_identity is None:
            return None
        if protocol.reference_files is None:
            return load_statistics(protocol.reference_path)
        store = ShardStore(self.store_root, "reference", self.reference_identity)
        stats_path = store.directory / "stats.npz"
        if stats_path.is_file():
            return load_statistics(stats_path)
        files = protocol.reference_files
        windows = shard_windows(len(files), self.bench.shard_size)
        bar.set_description("reference")
        with _thread_pool() as pool:
            for start, stop in self._mine(windows):
                if store.has(start, stop):
                    continue
                pools = []
                for begin in range(start, stop, self.bench.feature_batch_size):
                    chunk = files[begin:min(begin + self.bench.feature_batch_size, stop)]
                    images = torch.stack(list(pool.map(lambda p: load_reference_image(p, self.resolution), chunk)))
                    pools.append(self.inception(images)["pool"])
                ids = np.arange(start, stop, dtype=np.int64)
                store.write(start, stop, {"sample_ids": ids, "seeds": ids, "inception_pool": np.concatenate(pools)})
                bar.update(stop - start)
        if self._remaining(store, windows):
            self.reference_pending = True
            return None
        pool_features = store.read_all(windows, None)["inception_pool"]
        mu, sigma = feature_statistics(pool_features)
        with atomic_path(stats_path, durable=True) as tmp:
            with open(tmp, "wb") as handle:
                np.savez(handle, mu=mu, sigma=sigma, num_images=np.int64(len(files)))
        return mu, sigma

    # ------------------------------------------------------------------------------------------ run
    def run(self) -> dict:
        """Sample and score what is missing (this worker's windows), then write the report once every row
        and the reference are complete; otherwise return ``{"complete": False, "missing": ...}``."""
        from tqdm.auto import tqdm

        self._write_protocol()
        self.reference_pending = False
        stores = [(self.stores[row.slug], self.windows) for row in self.rows]
        if self.reference_identity is not None and self.protocol.reference_files is not None:
            ref_store = ShardStore(self.store_root, "reference", self.reference_identity)
            if not (ref_store.directory / "stats.npz").is_file():
                stores.append((ref_store, shard_windows(len(self.protocol.reference_files), self.bench.shard_size)))
        total = sum(b - a for _, windows in stores for a, b in self._mine(windows))
        remaining = sum(self._remaining(store, self._mine(windows)) for store, windows in stores)
        bar = tqdm(total=total, initial=total - remaining, unit="image", disable=not self.progress,
                   dynamic_ncols=True, desc="evaluate")
        try:
            reference = self._reference_statistics(bar)
            for row in self.rows:
                self._run_row(row, bar)
        finally:
            bar.close()
        missing = {row.slug: self._remaining(self.stores[row.slug], self.windows) for row in self.rows}
        if self.reference_pending:  # the other workers may have finished meanwhile
            self.reference_pending = False
            reference = self._reference_statistics(bar)
        if any(missing.values()) or self.reference_pending:
            return {"complete": False, "out": str(self.out), "run_key": self.run_key,
                    "missing": {**{k: v for k, v in missing.items() if v},
                                **({"reference": True} if self.reference_pending else {})}}
        return self._report(reference)

    def _write_protocol(self) -> None:
        out, protocol = self.out, self.protocol
        save_config(self.cfg, out / "config.yaml")
        record = {**protocol.record, "resolution": self.resolution, "num_steps": self.steps,
                  "rows": {row.slug: {"label": row.label, "nfe": row.nfe, "guidance": _guidance_record(row.guidance),
                                      "model_path": str(row.model_cfg.path), "store": str(self.stores[row.slug].directory)}
                           for row in self.rows},
                  "refiner": str(self.refiner_dir.resolve()),
                  "inception": self.inception.record if self.inception else None,
                  "text_image": self.text_image.record if self.text_image else None,
                  "run_key": self.run_key}
        write_text_atomic(out / "protocol.json", json.dumps(record, indent=2, ensure_ascii=False) + "\n")
        buffer = io.StringIO()
        writer = csv.writer(buffer, lineterminator="\n")
        writer.writerow(["sample", "seed", "prompt"])
        writer.writerows((i, seed, prompt) for i, (seed, prompt) in enumerate(zip(protocol.seeds, protocol.prompts)))
        write_text_atomic(out / "samples.csv", buffer.getvalue())

    def _report(self, reference) -> dict:
        n, results = self.protocol.num_samples, {}
        for row in self.rows:
            arrays = self.stores[row.slug].read_all(self.windows, self.protocol.seeds)
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
                    self.notes.append(f"IS not computed: {n} samples, fewer than its 10 splits")
            for name in ("clip_score", "pick_score"):
                if name in arrays:
                    metrics[name] = float(arrays[name].mean())
            results[row.slug] = metrics
        unguided, guided = results[UNGUIDED_ROW].get("fid"), results[GUIDED_ROW].get("fid")
        for slug, metrics in results.items():
            if slug not in (UNGUIDED_ROW, GUIDED_ROW) and unguided is not None and "fid" in metrics:
                metrics["gap_closed"] = gap_closed(unguided, metrics["fid"], guided)
        notes = list(dict.fromkeys(self.notes))
        device = torch.cuda.get_device_name(self.device) if self.device.type == "cuda" else str(self.device)
        report = {"complete": True, "run_key": self.run_key, "protocol": self.protocol.record, "resolution": self.resolution,
                  "num_steps": self.steps, "device": device, "dtype": self.cfg.model.dtype, "rows": results,
                  "notes": notes, "out": str(self.out)}
        write_text_atomic(self.out / "metrics.json", json.dumps(report, indent=2, ensure_ascii=False) + "\n")
        write_text_atomic(self.out / "table.md", markdown_table(report) + "\n")
        self._grid()
        write_text_atomic(self.out / EVALUATION_FILE, json.dumps(
            {"run_key": self.run_key, "run": self.run_record, "finished": True,
             "stores": {slug: str(store.directory) for slug, store in self.stores.items()}},
            indent=2, sort_keys=True) + "\n")
        return report

    def _grid(self) -> None:
        from PIL import Image

        from .evaluation.grids import save_image_grid

        columns = min(self.bench.grid_columns, self.protocol.num_samples)
        images = []
        for row in self.rows:
            for index in range(columns):
                with Image.open(self.stores[row.slug].images / f"{index:08d}.png") as image:
                    images.append(torch.from_numpy(np.asarray(image.convert("RGB")).copy()).permute(2, 0, 1))
        batch = torch.stack(images).float() / 255
        scale = max(1, 64 // batch.shape[-1])
        with atomic_path(self.out / "grid.png") as tmp:
            save_image_grid(batch, tmp, nrow=columns, row_labels=[row.label for row in self.rows], scale=scale)


@contextlib.contextmanager
def _thread_pool():
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(max_workers=4) as pool:  # PIL decodes with the GIL released
        yield pool


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


def evaluate(cfg, refiner_dir, **kwargs) -> dict:
    """Run (or resume) the evaluation; returns the report written to ``metrics.json``."""
    return Evaluation(cfg, refiner_dir, **kwargs).run()


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m noiserefine.evaluate", description=__doc__.splitlines()[0])
    p.add_argument("--refiner", required=True, help="refiner directory (refiner.safetensors, config.yaml, sampler.json)")
    p.add_argument("--config", action="append", default=[], help="YAML config (repeatable); default: the refiner's")
    p.add_argument("--num-samples", type=int, default=None, help="default: benchmark.num_samples")
    p.add_argument("--out", default=None, help="output directory (default: benchmark.output_dir/<backend>-<run key>)")
    p.add_argument("--store", default=None, help="per-sample results (default: <out>/store); shareable between runs")
    p.add_argument("--distilled", default=None, help="a guidance-distilled model directory (default: "
                                                      "benchmark.distilled_path)")
    p.add_argument("--worker", default="0/1", help="I/K: sample every K-th shard from the I-th (one process per "
                                                   "GPU, same --out); the last to finish writes the report")
    p.add_argument("--no-progress", action="store_true")
    p.add_argument("overrides", nargs="*", help="key=value config overrides, applied last")
    return p


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    refiner_dir = Path(args.refiner).expanduser()
    if not refiner_dir.is_dir():
        raise FileNotFoundError(f"--refiner {str(refiner_dir)!r} is not a directory")
    cfg = load_config(args.config or [refiner_dir / "config.yaml"], args.overrides)
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

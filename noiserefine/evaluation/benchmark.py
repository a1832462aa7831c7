"""The paper-table evaluation run (``noiserefine.evaluate``): loads the model, the protocol and the metric
networks, samples and scores each row's missing shards (this worker's), and writes the report once every
row and the FID reference are complete.
"""

from __future__ import annotations

import gc
import time
import warnings
from pathlib import Path

import numpy as np
import torch

from ..files import atomic_path
from ..noise import noise_from_seeds
from ..sampling import rollout
from .features import InceptionFeatures, TextImageScores, load_inception
from .fid_reference import needs_reference_features, reference_statistics, reference_store, reference_windows
from .paper_report import row_metrics, write_protocol, write_report
from .protocols import Protocol, build_protocol, fid_image_rule, load_statistics, to_uint8
from .run_identity import FORMAT_VERSION, assign_row_identities, claim_output, reference_identity, write_finished
from .settings import Setting, build_settings, guidance_record
from .store import ShardStore, check_store_root, record_key, shard_windows
from .worker_shards import missing_samples, set_aside_bad_shards, worker_windows


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _save_png_atomic(image_uint8: torch.Tensor, path: Path) -> None:
    from PIL import Image

    with atomic_path(path) as tmp:
        Image.fromarray(image_uint8.permute(1, 2, 0).numpy()).save(tmp, format="PNG")


def _native_resolution(backend) -> int:
    """Side of the decoded images (one zero latent decoded)."""
    with torch.no_grad():
        image = backend.decode(torch.zeros((1, *backend.latent_shape), device=backend.device, dtype=backend.dtype))
    height, width = image.shape[-2:]
    if height != width:
        raise ValueError(f"the model decodes {height}x{width} images; set benchmark.resolution for a square FID crop")
    return int(height)


class Evaluation:
    """Everything one run needs: protocol, rows, stores, networks (see ``noiserefine.evaluate``)."""

    def __init__(self, cfg, refiner_dir: str | Path, *, out: str | Path | None = None, store: str | Path | None = None,
                 num_samples: int | None = None, distilled_path: str | None = None, progress: bool = True,
                 worker: tuple[int, int] = (0, 1),
                 inception: InceptionFeatures | None = None, text_image: TextImageScores | None = None):
        from ..backends import load_backend
        from ..sampler_record import check_architecture, check_same_sampler, read_sampler_record, scheduler_record
        from ..targets.identity import model_identity

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
        if self.inception is not None and self.protocol.reference_path and self.protocol.reference_files is None:
            # a statistics file: checked now, not after hours of sampling
            load_statistics(self.protocol.reference_path, self.inception.num_features)

        # the rows, their stores' keys and the run key
        sampler = scheduler_record(self.backend.scheduler_class, self.backend.scheduler_config)
        main_model = model_identity(cfg.model)
        self.rows: list[Setting] = build_settings(cfg, self.backend, self.steps, self.refiner_dir,
                                                  distilled_path or self.bench.distilled_path)
        row_keys = assign_row_identities(self.rows, protocol=self.protocol, steps=self.steps,
                                         resolution=self.resolution, inception=self.inception,
                                         text_image=self.text_image, main_model=main_model, sampler=sampler)
        self.reference_identity = reference_identity(self.protocol, self.inception, self.resolution)
        self.run_record = {"format": FORMAT_VERSION, "num_samples": self.protocol.num_samples, "rows": row_keys,
                           "reference": record_key(self.reference_identity) if self.reference_identity else None}
        self.run_key = record_key(self.run_record)
        self.out = Path(out).expanduser() if out else \
            Path(self.bench.output_dir).expanduser() / f"{cfg.model.backend}-{self.run_key[:12]}"
        self.store_root = Path(store).expanduser() if store is not None else self.out / "store"
        check_store_root(self.store_root)  # before --out is claimed: a refused run writes nothing
        claim_output(self.out, self.run_key, self.run_record)
        self.stores: dict[str, ShardStore] = {row.slug: ShardStore(self.store_root, row.slug, row.identity)
                                              for row in self.rows}

    # ------------------------------------------------------------------------------------------ sampling
    def _mine(self, windows: list[tuple[int, int]]) -> list[tuple[int, int]]:
        """The windows this worker samples (``--worker I/K``)."""
        return worker_windows(windows, self.worker, self.num_workers)

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
                    noise = refiner(noise, cond, row.refiner_scale).to(device=backend.device, dtype=backend.dtype)
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
        if not missing_samples(store, windows):
            return
        bar.set_description(row.slug)
        backend = row.backend()
        refiner = None
        if row.refine:
            from ..refiner import load_refiner

            refiner = load_refiner(self.refiner_dir, backend)
        try:
            for start, stop in windows:
                if store.has(start, stop):
                    continue
                store.write(start, stop, self._sample_window(row, backend, refiner, start, stop))
                bar.update(stop - start)
        finally:
            if refiner is not None:
                from ..refiner import detach_refiner

                detach_refiner(backend.denoiser)
            if backend is not self.backend:
                del backend
                gc.collect()
                if self.device.type == "cuda":
                    torch.cuda.empty_cache()

    def _reference_statistics(self, bar) -> tuple[tuple[np.ndarray, np.ndarray] | None, bool]:
        return reference_statistics(self.protocol, self.reference_identity, self.store_root,
                                    inception=self.inception, resolution=self.resolution,
                                    shard_size=self.bench.shard_size, batch_size=self.bench.feature_batch_size,
                                    worker=(self.worker, self.num_workers), bar=bar)

    # ------------------------------------------------------------------------------------------ run
    def run(self) -> dict:
        """Sample and score what is missing (this worker's windows), then write the report once every row
        and the reference are complete; otherwise return ``{"complete": False, "missing": ...}``."""
        from tqdm.auto import tqdm

        write_protocol(self.out, self.cfg, self.protocol, self._protocol_record())
        stores = [(self.stores[row.slug], self.windows, self.protocol.seeds) for row in self.rows]
        if needs_reference_features(self.protocol, self.reference_identity, self.store_root):
            stores.append((reference_store(self.store_root, self.reference_identity),
                           reference_windows(self.protocol, self.bench.shard_size), None))
        for store, windows, seeds in stores:  # a shard with a short array is sampled again, never averaged
            set_aside_bad_shards(store, windows, seeds)
        stores = [(store, windows) for store, windows, _ in stores]
        total = sum(b - a for _, windows in stores for a, b in self._mine(windows))
        remaining = sum(missing_samples(store, self._mine(windows)) for store, windows in stores)
        bar = tqdm(total=total, initial=total - remaining, unit="image", disable=not self.progress,
                   dynamic_ncols=True, desc="evaluate")
        try:
            reference, reference_pending = self._reference_statistics(bar)
            for row in self.rows:
                self._run_row(row, bar)
        finally:
            bar.close()
        missing = {row.slug: missing_samples(self.stores[row.slug], self.windows) for row in self.rows}
        if reference_pending:  # the other workers may have finished meanwhile
            reference, reference_pending = self._reference_statistics(bar)
        if any(missing.values()) or reference_pending:
            return {"complete": False, "out": str(self.out), "run_key": self.run_key,
                    "missing": {**{k: v for k, v in missing.items() if v},
                                **({"reference": True} if reference_pending else {})}}
        return self._report(reference)

    # ------------------------------------------------------------------------------------------ outputs
    def _protocol_record(self) -> dict:
        """What ``protocol.json`` adds to the protocol's record: this run's rows, stores, networks and key."""
        return {"resolution": self.resolution, "num_steps": self.steps,
                "rows": {row.slug: {"label": row.label, "nfe": row.nfe, "guidance": guidance_record(row.guidance),
                                    "model_path": str(row.model_cfg.path),
                                    "store": str(self.stores[row.slug].directory)} for row in self.rows},
                "refiner": str(self.refiner_dir.resolve()),
                "inception": self.inception.record if self.inception else None,
                "text_image": self.text_image.record if self.text_image else None, "run_key": self.run_key}

    def _report(self, reference) -> dict:
        """Write the report of the complete rows (``paper_report``), then mark ``--out`` finished."""
        results, notes = row_metrics(self.rows, self.stores, self.windows, self.protocol, reference)
        device = torch.cuda.get_device_name(self.device) if self.device.type == "cuda" else str(self.device)
        report = {"complete": True, "run_key": self.run_key, "protocol": self.protocol.record,
                  "resolution": self.resolution, "num_steps": self.steps, "device": device,
                  "dtype": self.cfg.model.dtype, "rows": results, "notes": list(dict.fromkeys(self.notes + notes)),
                  "out": str(self.out)}
        write_report(self.out, report, [(row.label, self.stores[row.slug].images) for row in self.rows],
                     min(self.bench.grid_columns, self.protocol.num_samples))
        write_finished(self.out, self.run_key, self.run_record, self.stores)
        return report

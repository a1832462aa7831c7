"""The networks behind the metrics, loaded from local files only: Inception (FID/IS), CLIP, PickScore.

* Inception: torch-fidelity's ``FeatureExtractorInceptionV3`` (the TF 2015-12-05 FID network ported to
  PyTorch, bit-compatible with the TF reference implementations) built with
  ``feature_extractor_weights_path``, so it never downloads. It takes uint8 (B, 3, H, W) images and
  resizes them to 299 itself; we ask for the 2048-d pool features (FID) and ``logits_unbiased`` (IS, as
  torch-fidelity does). The weights file is first opened with ``torch.load(weights_only=True)``: a file
  that is not a plain tensor state dict is refused before torch-fidelity unpickles it.
* CLIP / PickScore: transformers ``CLIPModel`` + ``CLIPProcessor`` from local directories
  (``local_files_only``), run in float32; prompts are truncated to the text tower's 77 positions.

Every network runs in batches on the given device and returns float32 CPU arrays; the formulas are in
``metrics.py``. :class:`TextImageScores` is both the evaluation command's per-image scorer and the
trainer's periodic metric (``eval.metrics=text_image``).
"""

from __future__ import annotations

import functools
import importlib
import importlib.util
import sys
import types
import warnings
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch

from ..hashing import file_sha256, tree_sha256
from .metrics import clip_scores, pick_scores
from .protocols import to_uint8

INCEPTION_FEATURES = ("2048", "logits_unbiased")
# torch-fidelity's release file weights-inception-2015-12-05-6726825d.pth: torch.hub names a file after the
# first 8 hex digits of its sha256, so the standard FID weights' sha256 starts with these.
STANDARD_INCEPTION_SHA256_PREFIX = "6726825d"
INCEPTION_FILE_HINT = ("the FID Inception weights 'weights-inception-2015-12-05-6726825d.pth' that torch-fidelity "
                       "publishes with its v0.2.0 release (torch_fidelity.feature_extractor_inceptionv3.URL_INCEPTION_V3)")


# ------------------------------------------------------------------------------------------------ Inception
def _load_module_without_package_init(package: str, module: str):
    """Import ``package.module`` without running ``package/__init__.py``.

    torch-fidelity's ``__init__`` imports its CLIP, VGG and DINOv2 extractors, which import torchvision;
    where no torchvision matches the installed torch (a CPU-only torch: PyPI's torchvision wheels are CUDA
    builds) the package cannot be imported, although its InceptionV3 module needs only torch. A bare
    package object pointing at the installed folder lets Python import that module on its own; it is
    taken out of ``sys.modules`` again afterwards.
    """
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise ImportError(f"{package} is not installed")
    saved = sys.modules.get(package)
    bare = types.ModuleType(package)
    bare.__path__ = list(spec.submodule_search_locations)
    sys.modules[package] = bare
    try:
        return importlib.import_module(f"{package}.{module}")
    finally:
        if saved is None:
            sys.modules.pop(package, None)
        else:
            sys.modules[package] = saved


def inception_class():
    """torch-fidelity's ``FeatureExtractorInceptionV3`` (see :func:`_load_module_without_package_init`)."""
    if importlib.util.find_spec("torch_fidelity") is None:
        raise ImportError("FID/IS need torch-fidelity (pip install torch-fidelity==0.4.0; it lists torchvision, "
                          "which a CPU-only torch may install with --no-deps: only its InceptionV3 is used)")
    try:
        from torch_fidelity.feature_extractor_inceptionv3 import FeatureExtractorInceptionV3
    except (ImportError, RuntimeError, OSError) as error:  # torchvision missing, or built for another torch
        warnings.warn(f"torch_fidelity cannot be imported as a package ({type(error).__name__}: {error}); "
                      "its InceptionV3 module is loaded on its own", stacklevel=2)
        module = _load_module_without_package_init("torch_fidelity", "feature_extractor_inceptionv3")
        FeatureExtractorInceptionV3 = module.FeatureExtractorInceptionV3
    return FeatureExtractorInceptionV3


class InceptionFeatures:
    """uint8 (B, 3, H, W) images -> {"pool": (B, F) float32, "logits": (B, K) float32}, in batches.

    ``network`` follows torch-fidelity's feature-extractor contract: ``network(uint8 batch)`` returns the
    tuple of its requested features, here (pool features, unbiased logits).
    """

    def __init__(self, network: torch.nn.Module, device: str | torch.device = "cpu", batch_size: int = 64,
                 record: dict | None = None):
        self.network = network.to(device).eval().requires_grad_(False)
        self.device, self.batch_size = torch.device(device), int(batch_size)
        self.record = dict(record or {"network": type(network).__name__})

    @torch.no_grad()
    def __call__(self, images_uint8: torch.Tensor) -> dict[str, np.ndarray]:
        if images_uint8.dtype != torch.uint8 or images_uint8.ndim != 4 or images_uint8.shape[1] != 3:
            raise ValueError(f"expected uint8 (B, 3, H, W) images, got {images_uint8.dtype} {tuple(images_uint8.shape)}")
        pools, logits = [], []
        for chunk in torch.split(images_uint8, self.batch_size):
            pool, logit = self.network(chunk.to(self.device))[:2]
            pools.append(pool.float().cpu())
            logits.append(logit.float().cpu())
        return {"pool": torch.cat(pools).numpy(), "logits": torch.cat(logits).numpy()}

    @functools.cached_property
    def num_features(self) -> int:
        """Width of the pool features (2048 for the FID Inception), from one black image: what a reference's
        statistics must match."""
        return int(self(torch.zeros((1, 3, 32, 32), dtype=torch.uint8))["pool"].shape[1])


def load_inception(path: str, device: str | torch.device = "cpu", batch_size: int = 64,
                   key: str = "benchmark.inception_path") -> InceptionFeatures:
    """torch-fidelity's InceptionV3 from a local weights file (never downloads); errors name the file."""
    if not path:
        raise ValueError(f"{key} is not set: FID and IS need {INCEPTION_FILE_HINT}")
    weights = Path(path).expanduser()
    if not weights.is_file():
        raise FileNotFoundError(f"{key}: {str(weights)!r} not found; expected {INCEPTION_FILE_HINT}")
    try:
        state = torch.load(weights, map_location="cpu", weights_only=True)
    except Exception as error:
        raise ValueError(f"{key}: {str(weights)!r} is not a plain tensor state dict (weights_only load: "
                         f"{type(error).__name__}: {str(error).splitlines()[0] if str(error) else ''})") from None
    if not isinstance(state, dict):
        raise ValueError(f"{key}: {str(weights)!r} holds a {type(state).__name__}, not a state dict")
    del state
    cls = inception_class()
    try:
        network = cls("inception-v3-compat", list(INCEPTION_FEATURES), feature_extractor_weights_path=str(weights))
    except RuntimeError as error:  # load_state_dict: missing/unexpected keys, wrong shapes
        raise ValueError(f"{key}: {str(weights)!r} does not fit torch-fidelity's InceptionV3: "
                         f"{str(error).splitlines()[0]}") from None
    sha256 = file_sha256(weights)
    standard = sha256.startswith(STANDARD_INCEPTION_SHA256_PREFIX)
    if not standard:
        warnings.warn(f"{key}: {str(weights)!r} is not the standard FID Inception file (sha256 {sha256[:8]}..., "
                      f"expected {STANDARD_INCEPTION_SHA256_PREFIX}...): FID/IS are not comparable with papers",
                      stacklevel=2)
    record = {"network": "torch_fidelity FeatureExtractorInceptionV3", "features": list(INCEPTION_FEATURES),
              "path": str(weights.resolve()), "sha256": sha256, "standard_weights": standard}
    return InceptionFeatures(network, device, batch_size, record)


# ------------------------------------------------------------------------------------------------ CLIP
def _local_dir(path: str, key: str, what: str) -> Path:
    if not path:
        raise ValueError(f"{key} is not set ({what})")
    directory = Path(path).expanduser()
    if not directory.is_dir():
        raise FileNotFoundError(f"{key}: {str(directory)!r} is not a local directory ({what}); nothing is downloaded")
    if not any((directory / name).is_file() for name in ("config.json", "preprocessor_config.json",
                                                          "processor_config.json")):
        raise FileNotFoundError(f"{key}: {str(directory)!r} holds no config.json or (pre)processor_config.json "
                                f"({what}, as save_pretrained writes it)")
    return directory


class ClipEmbedder:
    """A transformers CLIPModel + CLIPProcessor from local directories, float32, batched on ``device``."""

    def __init__(self, model_path: str, processor_path: str = "", device: str | torch.device = "cpu",
                 batch_size: int = 64, key: str = "eval.clip_path",
                 what: str = "a transformers CLIPModel + CLIPProcessor directory"):
        from transformers import CLIPModel, CLIPProcessor

        model_dir = _local_dir(model_path, key, what)
        processor_dir = _local_dir(processor_path, key.replace("_path", "_processor_path"),
                                   "its CLIPProcessor") if processor_path else model_dir
        try:
            self.model = CLIPModel.from_pretrained(model_dir, local_files_only=True, dtype=torch.float32)
        except OSError as error:
            raise FileNotFoundError(f"{key}: cannot load a CLIPModel from {str(model_dir)!r}: "
                                    f"{str(error).splitlines()[0]}") from None
        try:
            self.processor = CLIPProcessor.from_pretrained(processor_dir, local_files_only=True)
        except (OSError, ValueError, TypeError) as error:
            raise FileNotFoundError(f"{key}: cannot load a CLIPProcessor (tokenizer + image processor) from "
                                    f"{str(processor_dir)!r}: {str(error).splitlines()[0]}") from None
        self.device, self.batch_size = torch.device(device), int(batch_size)
        self.model = self.model.to(self.device).eval().requires_grad_(False)
        self.max_length = int(getattr(self.model.config.text_config, "max_position_embeddings", 77))
        self.record = {"model_path": str(model_dir.resolve()), "processor_path": str(processor_dir.resolve()),
                       "model_sha256": tree_sha256(model_dir),
                       "processor_sha256": tree_sha256(processor_dir) if processor_dir != model_dir else None}

    @staticmethod
    def _features(output) -> torch.Tensor:
        # transformers >= 5 returns a model output whose pooler_output is the projected embedding
        return output if torch.is_tensor(output) else output.pooler_output

    @torch.no_grad()
    def image_embeddings(self, images_uint8: torch.Tensor) -> torch.Tensor:
        out = []
        for chunk in torch.split(images_uint8, self.batch_size):
            arrays = [image.permute(1, 2, 0).numpy() for image in chunk.cpu()]
            pixels = self.processor(images=arrays, return_tensors="pt")["pixel_values"]
            out.append(self._features(self.model.get_image_features(pixel_values=pixels.to(self.device))).float().cpu())
        return torch.cat(out)

    @torch.no_grad()
    def text_embeddings(self, prompts: Sequence[str]) -> torch.Tensor:
        out = []
        for start in range(0, len(prompts), self.batch_size):
            tokens = self.processor(text=list(prompts[start:start + self.batch_size]), padding=True, truncation=True,
                                    max_length=self.max_length, return_tensors="pt")
            out.append(self._features(self.model.get_text_features(
                input_ids=tokens["input_ids"].to(self.device),
                attention_mask=tokens["attention_mask"].to(self.device))).float().cpu())
        return torch.cat(out)

    @property
    def logit_scale(self) -> torch.Tensor:
        return self.model.logit_scale.detach().float().cpu()


class TextImageScores:
    """Per-image CLIPScore and/or PickScore; as a metric function (the trainer's), their means.

    Built from ``eval.clip_path`` / ``eval.pickscore_path`` (+ ``eval.pickscore_processor_path``); an unset
    path leaves that score out, a set one that is missing is an error naming it.
    """

    def __init__(self, clip: ClipEmbedder | None = None, pick: ClipEmbedder | None = None):
        if clip is None and pick is None:
            raise ValueError("no text-image scorer: set eval.clip_path and/or eval.pickscore_path")
        self.clip, self.pick = clip, pick

    @classmethod
    def from_config(cls, cfg, device: str | torch.device | None = None, batch_size: int = 64) -> "TextImageScores":
        ev, device = cfg.eval, device or cfg.model.device
        clip = ClipEmbedder(ev.clip_path, "", device, batch_size, "eval.clip_path",
                            "a CLIP directory: transformers CLIPModel + CLIPProcessor") if ev.clip_path else None
        pick = ClipEmbedder(ev.pickscore_path, ev.pickscore_processor_path, device, batch_size,
                            "eval.pickscore_path", "the PickScore_v1 CLIPModel directory") \
            if ev.pickscore_path else None
        return cls(clip, pick)

    @property
    def names(self) -> list[str]:
        return [name for name, model in (("clip_score", self.clip), ("pick_score", self.pick)) if model is not None]

    @property
    def record(self) -> dict:
        return {"clip_score": self.clip.record if self.clip else None,
                "pick_score": self.pick.record if self.pick else None}

    def per_image(self, images_uint8: torch.Tensor, prompts: Sequence[str]) -> dict[str, np.ndarray]:
        if len(prompts) != images_uint8.shape[0]:
            raise ValueError(f"{images_uint8.shape[0]} images but {len(prompts)} prompts")
        out = {}
        if self.clip is not None:
            out["clip_score"] = clip_scores(self.clip.image_embeddings(images_uint8),
                                            self.clip.text_embeddings(prompts))
        if self.pick is not None:
            out["pick_score"] = pick_scores(self.pick.image_embeddings(images_uint8),
                                            self.pick.text_embeddings(prompts), self.pick.logit_scale)
        return out

    def __call__(self, images01: torch.Tensor, prompts: Sequence[str]) -> dict:
        """``evaluation.rows.MetricFn``: mean scores of decoded images in [0, 1]."""
        scores = self.per_image(to_uint8(images01), list(prompts))
        return {**{name: float(np.mean(values)) for name, values in scores.items()},
                "num_samples": int(images01.shape[0])}


def text_image_metrics(cfg) -> TextImageScores:
    """The trainer's ``eval.metrics=text_image`` scorer."""
    return TextImageScores.from_config(cfg)

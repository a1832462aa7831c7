"""What the two digit classifiers share (the plain task's :mod:`~noiserefine.digits.classifier` and the
compositional task's :mod:`~noiserefine.digits.attribute_classifier`): the fixed train/held-out split of
scikit-learn's digits, the pinned training thread count, the weights cache, and the scores both tasks compute
alike from classifier features and digit logits. Its own module so that ``classifier.digit_metrics`` can
dispatch to the compositional metrics without an import cycle."""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn

from ..evaluation.scores import (class_conditional_fid, conditional_accuracy, feature_statistics, frechet_distance,
                                 inception_score, precision_recall)
from ..evaluation.rows import torch_threads
from ..files import atomic_path, write_text_atomic
from .data import load_digit_images

# The trained weights depend on the intra-op thread count (it splits the reductions), and the
# classifier is shared: pinned, so the demo (2 threads) and a DeepSpeed rank (1) train the same one.
TRAIN_THREADS = 2
TRAIN_FRACTION = 0.85
SPLIT_SEED = 20240601  # the train/held-out split is fixed, independent of the training seed


def digit_split() -> tuple[torch.Tensor, torch.Tensor]:
    """The fixed (train, held-out) index split of the 1,797 digits (85% / 15%)."""
    n = load_digit_images()[1].shape[0]
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(SPLIT_SEED))
    n_train = int(round(TRAIN_FRACTION * n))
    return perm[:n_train], perm[n_train:]


def training_threads():
    """Torch's intra-op threads pinned to :data:`TRAIN_THREADS` while a classifier trains (then restored)."""
    return torch_threads(TRAIN_THREADS)


def load_or_train_cached(cache_dir: Path, name: str, settings: dict, build: Callable[[], nn.Module],
                         train: Callable[[], tuple[nn.Module, object]]) -> nn.Module:
    """The classifiers' cache: ``<name>.safetensors`` + ``<name>.json`` in ``cache_dir``.

    Loads ``build()`` with the cached weights if the json records ``settings`` and the pinned
    :data:`TRAIN_THREADS`; otherwise (missing, stale or corrupt cache) ``train()`` -> ``(model,
    held-out accuracy)`` and writes both files atomically (weights first: a json never vouches for
    weights that are not there yet). Returns the eval-mode model."""
    from safetensors.torch import load_file, save_file

    cache_dir = Path(cache_dir)
    weights, meta_path = cache_dir / f"{name}.safetensors", cache_dir / f"{name}.json"
    wanted = {**settings, "train_threads": TRAIN_THREADS}
    try:
        meta = json.loads(meta_path.read_text())
        if all(meta.get(k) == v for k, v in wanted.items()):
            model = build()
            model.load_state_dict(load_file(str(weights)))
            return model.eval()
    except Exception:  # missing, stale or corrupt (e.g. SafetensorError) cache: retrain
        pass
    model, accuracy = train()
    cache_dir.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    with atomic_path(weights) as tmp:
        save_file(state, str(tmp))
    write_text_atomic(meta_path, json.dumps({**wanted, "heldout_accuracy": accuracy}, indent=2) + "\n")
    return model.eval()


def digit_scores(features: np.ndarray, digit_logits: torch.Tensor, digits: np.ndarray, ref_features: np.ndarray,
                 ref_labels: np.ndarray, ref_statistics: tuple[np.ndarray, np.ndarray], k: int) -> dict:
    """The scores both digit tasks compute alike from classifier features and digit logits.

    ``digits``: the digit each sample's prompt names, -1 where it names none (left out of
    ``accuracy``, ``fid_class``, ``precision``, ``recall``; NaN if no prompt names one). ``fid``,
    ``precision_all``/``recall_all`` and ``inception_score`` use every sample; per digit precision and
    recall only digits with more than ``k`` samples. ``noise_share`` is the caller's (pixel space)."""
    fid = frechet_distance(*feature_statistics(features), *ref_statistics)
    named = np.flatnonzero(np.asarray(digits) >= 0)
    wanted = np.asarray(digits, dtype=np.int64)[named]
    probs = torch.softmax(digit_logits.double(), dim=1)
    scores = {"fid": fid, "inception_score": inception_score(probs), "accuracy": math.nan,
              "fid_class": math.nan, "precision": math.nan, "recall": math.nan}
    if named.size:
        scores["accuracy"] = conditional_accuracy(digit_logits[named], torch.from_numpy(wanted))
        scores["fid_class"] = class_conditional_fid(features[named], wanted, ref_features, ref_labels)["mean"]
        per_class = [precision_recall(ref_features[ref_labels == d], features[named][wanted == d], k)
                     for d in sorted(set(wanted.tolist())) if (wanted == d).sum() > k]
        if per_class:
            scores["precision"] = float(np.mean([pr["precision"] for pr in per_class]))
            scores["recall"] = float(np.mean([pr["recall"] for pr in per_class]))
    overall = precision_recall(ref_features, features, k)
    scores.update(precision_all=overall["precision"], recall_all=overall["recall"], noise_share=math.nan,
                  low_confidence_share=float((probs.max(dim=1).values < 0.9).double().mean()),
                  num_samples=int(features.shape[0]))
    return scores

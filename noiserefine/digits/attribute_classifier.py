"""The in-domain classifier of the compositional task: one CNN, one head per attribute.

Trained like the digit classifier (:mod:`noiserefine.digits.classifier`): on the fixed 85% split of
scikit-learn's digits, here drawn with fresh random attributes every step (so every digit is seen at
every position, size and thickness), with the same pinned thread count so that every process trains
the same weights. Its penultimate activations are the feature space of the task's FID; its heads
give per-attribute predictions for prompt adherence
(:func:`noiserefine.evaluation.scores.attribute_adherence`).
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

from .classifier_common import digit_split, load_or_train_cached, training_threads
from ..backends.digits import ATTRIBUTES
from .compose import random_attributes, render, sklearn_digits

FORMAT_VERSION = 1  # bump when the architecture, the training or the rendering changes (invalidates caches)
DEFAULT_NUM_STEPS = 3000  # held-out digit accuracy 0.993 (0.970 at 1500, 0.941 at 500); position, size, thickness 1.0
CACHE_NAME = "attribute_classifier"  # next to the digit classifier's files in eval.classifier_dir


class AttributeClassifier(nn.Module):
    """Small CNN on ``(B, 1, canvas, canvas)`` images in [0, 1]: 2 conv+pool blocks -> 128-d features -> a head
    per attribute of :data:`~noiserefine.digits.compose.ATTRIBUTES`."""

    feature_dim = 128

    def __init__(self, canvas: int) -> None:
        super().__init__()
        if canvas % 4:
            raise ValueError(f"canvas must be a multiple of 4 (two 2x poolings), got {canvas}")
        self.canvas = canvas
        self.conv1 = nn.Conv2d(1, 32, 3, padding=1)
        self.conv2 = nn.Conv2d(32, 64, 3, padding=1)
        self.fc1 = nn.Linear(64 * (canvas // 4) ** 2, self.feature_dim)
        self.heads = nn.ModuleDict({name: nn.Linear(self.feature_dim, len(values))
                                    for name, values in ATTRIBUTES.items()})

    def features(self, images01: torch.Tensor) -> torch.Tensor:
        """Penultimate (post-ReLU) activations, shape (B, 128): the task's FID feature space."""
        x = images01 * 2 - 1
        x = F.max_pool2d(F.relu(self.conv1(x)), 2)
        x = F.max_pool2d(F.relu(self.conv2(x)), 2)
        return F.relu(self.fc1(x.flatten(1)))

    def forward(self, images01: torch.Tensor) -> dict[str, torch.Tensor]:
        """The logits of each attribute, ``{name: (B, len(values))}``."""
        features = self.features(images01)
        return {name: head(features) for name, head in self.heads.items()}


def _batch(indices: torch.Tensor, canvas: int, generator: torch.Generator
           ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Images in [0, 1] of the digits at ``indices``, each drawn with attributes fresh from ``generator``."""
    digits, labels = sklearn_digits()
    attributes = random_attributes(labels[indices], generator)
    images = torch.stack([render(digits[i], {k: int(v[n]) for k, v in attributes.items()}, canvas)
                          for n, i in enumerate(indices.tolist())])
    return (images + 1) / 2, attributes


def train_attribute_classifier(canvas: int, *, seed: int = 0, num_steps: int = DEFAULT_NUM_STEPS, batch_size: int = 64
                               ) -> tuple[AttributeClassifier, dict[str, float]]:
    """Train on the fixed 85% split; return the eval-mode model and its held-out accuracy per attribute
    (on the held-out 15%, each digit drawn once with attributes from ``seed``)."""
    with training_threads():
        return _train(canvas, seed, num_steps, batch_size)


def load_or_train_attribute_classifier(cache_dir: Path, canvas: int, *, seed: int = 0,
                                       num_steps: int = DEFAULT_NUM_STEPS) -> AttributeClassifier:
    """The classifier of ``canvas`` cached in ``cache_dir`` (``attribute_classifier.safetensors`` + ``.json``):
    loaded if the json records these settings (format version, canvas, seed, num_steps, thread pin), else
    trained and cached atomically, as :func:`~noiserefine.digits.classifier.load_or_train_classifier`."""
    settings = {"format_version": FORMAT_VERSION, "canvas": int(canvas), "seed": seed, "num_steps": num_steps}
    return load_or_train_cached(cache_dir, CACHE_NAME, settings, lambda: AttributeClassifier(canvas),
                                lambda: train_attribute_classifier(canvas, seed=seed, num_steps=num_steps))


def _train(canvas: int, seed: int, num_steps: int, batch_size: int) -> tuple[AttributeClassifier, dict[str, float]]:
    train_idx, test_idx = digit_split()
    generator = torch.Generator().manual_seed(seed)
    with torch.random.fork_rng(devices=[]):  # deterministic init without clobbering the caller's RNG
        torch.manual_seed(seed)
        model = AttributeClassifier(canvas)
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=1e-4)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=3e-3, total_steps=max(num_steps, 1))
    model.train()
    for _ in range(num_steps):
        pick = train_idx[torch.randint(0, train_idx.shape[0], (batch_size,), generator=generator)]
        images01, wanted = _batch(pick, canvas, generator)
        logits = model(images01)
        loss = sum(F.cross_entropy(logits[name], wanted[name]) for name in ATTRIBUTES)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        schedule.step()
    model.eval()
    images01, wanted = _batch(test_idx, canvas, torch.Generator().manual_seed(seed))
    with torch.no_grad():
        logits = model(images01)
    accuracy = {name: float((logits[name].argmax(1) == wanted[name]).double().mean()) for name in ATTRIBUTES}
    return model, accuracy

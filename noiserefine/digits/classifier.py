"""Quality metrics for generated digit images (the embedded default's stand-in for FID/IS/CLIP).

The paper scores samples with FID and Inception Score computed from an ImageNet Inception
network. On 16x16 digits we use a small CNN trained on the real digits instead: its
penultimate activations play the role of Inception's pool features ("FID (classifier
features)"), its softmax the role of Inception's class posterior, and its argmax gives the
class-conditional accuracy of label-conditioned samples.

Generated images are float tensors in [0, 1] of shape (B, 1, 16, 16); real digits from
:func:`noiserefine.digits.data.load_digit_images` are in [-1, 1] and are mapped with (x+1)/2.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from ..backends.digits import parse_digit
from ..evaluation.scores import conditional_accuracy, feature_statistics
from .classifier_common import digit_scores, digit_split, load_or_train_cached, training_threads
from .data import IMAGE_SIZE, load_digit_images

FORMAT_VERSION = 1
DEFAULT_NUM_STEPS = 500
CACHE_NAME = "classifier"  # the cache files: <name>.safetensors and <name>.json (load_or_train_cached)
WEIGHTS_FILENAME = f"{CACHE_NAME}.safetensors"
META_FILENAME = f"{CACHE_NAME}.json"


class DigitClassifier(nn.Module):
    """Small CNN on [0, 1] images: 2 conv+pool blocks -> 128-d features -> 10 logits."""

    feature_dim = 128

    def __init__(self, num_classes: int = 10, image_size: int = IMAGE_SIZE) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(1, 32, 3, padding=1)
        self.conv2 = nn.Conv2d(32, 64, 3, padding=1)
        self.fc1 = nn.Linear(64 * (image_size // 4) ** 2, self.feature_dim)
        self.fc2 = nn.Linear(self.feature_dim, num_classes)

    def features(self, images01: torch.Tensor) -> torch.Tensor:
        """Penultimate (post-ReLU) activations, shape (B, 128): the FID feature space."""
        x = images01 * 2 - 1
        x = F.max_pool2d(F.relu(self.conv1(x)), 2)
        x = F.max_pool2d(F.relu(self.conv2(x)), 2)
        return F.relu(self.fc1(x.flatten(1)))

    def forward(self, images01: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.features(images01))


def _augment(x: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """Random +-1 px shifts (zero = background fill) and intensity scaling in [0.75, 1.15]."""
    b, _, h, w = x.shape
    padded = F.pad(x, (1, 1, 1, 1))
    dy = torch.randint(0, 3, (b,), generator=gen)
    dx = torch.randint(0, 3, (b,), generator=gen)
    rows = (dy[:, None] + torch.arange(h))[:, :, None]
    cols = (dx[:, None] + torch.arange(w))[:, None, :]
    shifted = padded[torch.arange(b)[:, None, None], 0, rows, cols].unsqueeze(1)
    scale = 0.75 + 0.4 * torch.rand(b, 1, 1, 1, generator=gen)
    return (shifted * scale).clamp(0, 1)


@torch.no_grad()
def _accuracy(model: nn.Module, images01: torch.Tensor, labels: torch.Tensor) -> float:
    return conditional_accuracy(model(images01), labels)


def train_digit_classifier(
    *, seed: int = 0, num_steps: int = DEFAULT_NUM_STEPS, batch_size: int = 64, device="cpu"
) -> tuple[DigitClassifier, float]:
    """Train on the fixed 85% split (with augmentation); return (eval-mode model, held-out acc)."""
    with training_threads():
        return _train_digit_classifier(seed, num_steps, batch_size, device)


def _train_digit_classifier(seed: int, num_steps: int, batch_size: int, device) -> tuple[DigitClassifier, float]:
    images, labels = load_digit_images()
    images01 = (images + 1) / 2
    train_idx, test_idx = digit_split()
    x_train, y_train = images01[train_idx].to(device), labels[train_idx].to(device)
    gen = torch.Generator().manual_seed(seed)
    with torch.random.fork_rng(devices=[]):  # deterministic init without clobbering caller RNG
        torch.manual_seed(seed)
        model = DigitClassifier().to(device)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=1e-4)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=3e-3, total_steps=max(num_steps, 1))
    model.train()
    for _ in range(num_steps):
        idx = torch.randint(0, x_train.shape[0], (batch_size,), generator=gen)
        xb = _augment(x_train[idx].cpu(), gen).to(device)
        loss = F.cross_entropy(model(xb), y_train[idx])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
    model.eval()
    acc = _accuracy(model, images01[test_idx].to(device), labels[test_idx].to(device))
    return model, acc


def load_or_train_classifier(
    cache_dir: Path, *, seed: int = 0, num_steps: int = DEFAULT_NUM_STEPS
) -> DigitClassifier:
    """Load ``classifier.safetensors`` from cache_dir if its ``classifier.json`` matches the
    settings (format version, seed, num_steps); otherwise train and cache atomically."""
    settings = {"format_version": FORMAT_VERSION, "seed": seed, "num_steps": num_steps}
    return load_or_train_cached(cache_dir, CACHE_NAME, settings, DigitClassifier,
                                lambda: train_digit_classifier(seed=seed, num_steps=num_steps))


class DigitMetrics:
    """Scores of generated digits in the classifier's feature space, against all 1,797 real digits.

    ``fid``, ``inception_score`` and ``accuracy`` (agreement with the prompted digit) as before;
    class-aware: ``fid_class`` (class-conditional FID: samples prompted with digit d against the
    real d's, averaged over d), ``precision``/``recall`` (k-NN manifolds, k=``k``, per digit the
    same way, averaged) and ``precision_all``/``recall_all`` (all samples against all real
    digits); ``noise_share``: the share of samples farther (pixel L2) from every real digit than
    any held-out real digit is from the training split (see :meth:`nearest_real_distance`).
    """

    def __init__(self, classifier: DigitClassifier, *, batch_size: int = 512, k: int = 3) -> None:
        self.classifier = classifier.eval()
        self.batch_size = batch_size
        self.k = k
        real, labels = load_digit_images()
        self.real01 = ((real + 1) / 2).flatten(1).double()
        self.real_labels = labels.numpy()
        self.ref_features, _ = self._run((real + 1) / 2)
        self.ref_mu, self.ref_sigma = feature_statistics(self.ref_features)
        train_idx, test_idx = digit_split()
        held_out = torch.cdist(self.real01[test_idx], self.real01[train_idx]).min(dim=1).values
        self.noise_threshold = float(held_out.max())

    @torch.no_grad()
    def _run(self, images01: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
        device = next(self.classifier.parameters()).device
        feats, logits = [], []
        for chunk in torch.split(images01, self.batch_size):
            f = self.classifier.features(chunk.to(device, torch.float32))
            feats.append(f.cpu())
            logits.append(self.classifier.fc2(f).cpu())
        return torch.cat(feats).double().numpy(), torch.cat(logits)

    def nearest_real_distance(self, images01: torch.Tensor) -> torch.Tensor:
        """Pixel-space L2 distance of each image to its nearest real digit (all 1,797)."""
        return torch.cdist(images01.detach().flatten(1).double().cpu(), self.real01).min(dim=1).values

    def __call__(self, images01: torch.Tensor, prompts: Sequence[str] | None = None) -> dict:
        """Scores of ``images01``; accuracy and the class-aware scores use the digit each prompt names
        (samples whose prompt names none are left out of them; NaN if no prompt names one)."""
        if images01.ndim != 4 or images01.shape[1] != 1:
            raise ValueError(f"expected (B, 1, H, W) images in [0, 1], got {tuple(images01.shape)}")
        feats, logits = self._run(images01.detach())
        digits = [parse_digit(p) for p in prompts] if prompts is not None else [None] * len(feats)
        scores = digit_scores(feats, logits, np.array([-1 if d is None else d for d in digits], dtype=np.int64),
                              self.ref_features, self.real_labels, (self.ref_mu, self.ref_sigma), self.k)
        scores["noise_share"] = float((self.nearest_real_distance(images01) > self.noise_threshold).double().mean())
        return scores


def digit_metrics(cfg):
    """The scores of ``eval.metrics=digit_classifier``: the classifier cached in ``eval.classifier_dir``;
    :class:`DigitMetrics` on the plain task, :class:`~noiserefine.digits.attribute_metrics.AttributeMetrics`
    on the compositional one (``model.digits.task=compose``)."""
    if not cfg.eval.classifier_dir:
        raise ValueError("eval.metrics=digit_classifier needs eval.classifier_dir (where the classifier is cached)")
    cache_dir = Path(cfg.eval.classifier_dir).expanduser()
    steps = {"num_steps": cfg.eval.classifier_steps} if cfg.eval.classifier_steps else {}  # 0: the default
    if cfg.model.digits.task == "compose":
        from .attribute_classifier import load_or_train_attribute_classifier
        from .attribute_metrics import AttributeMetrics  # imported here: they import this module

        canvas = int(cfg.model.digits.canvas)
        return AttributeMetrics(load_or_train_attribute_classifier(cache_dir, canvas, **steps), canvas)
    return DigitMetrics(load_or_train_classifier(cache_dir, **steps))

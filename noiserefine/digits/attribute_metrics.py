"""Scores of the compositional digits task (``model.digits.task=compose``), behind the same entry point
(:func:`noiserefine.digits.classifier.digit_metrics`) and with the same key names as
:class:`~noiserefine.digits.classifier.DigitMetrics` where they mean the same.

Feature space: the task's :class:`~noiserefine.digits.attribute_classifier.AttributeClassifier` (its
penultimate activations for FID and precision/recall, its digit head for the inception score and
``accuracy``, every head for prompt adherence). The real references:

- FID, ``fid_class``, precision/recall: every sklearn digit drawn :data:`REFERENCE_DRAWS` times with
  position, size and thickness drawn from :data:`REFERENCE_SEED` (the task's data distribution, as
  :func:`~noiserefine.digits.compose.composed_images` draws it); see :data:`REFERENCE_DRAWS`.
- ``noise_share``: the real composed images are every sklearn digit in all 16 position/size/thickness
  combinations (no seed); a sample is noise-like if it is farther (pixel L2, in [0, 1]) from all of them
  than any held-out digit of the FID reference is from the train split's digits in all 16 combinations
  (the split of :func:`~noiserefine.digits.classifier_common.digit_split`, the classifier's too).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

from ..evaluation.scores import attribute_adherence, feature_statistics
from .attribute_classifier import AttributeClassifier
from .classifier_common import digit_scores, digit_split
from ..backends.digits import ATTRIBUTES, parse_attributes
from .compose import random_attributes, render, sklearn_digits

REFERENCE_SEED = 20261207  # the FID reference's attribute draws: fixed, independent of every training seed
# Draws per digit: 3,594 reference images. Measured with a 1000-step attribute classifier (canvas 24): the reference's
# FID to the statistics of every digit in all 16 combinations is 3.3 / 1.7 / 0.8 / 0.4 for 1 / 2 / 4 / 8 draws
# (two seeds' references 6.6 / 3.4 / 1.7 / 0.8 apart): at 2 it is small against what a sample set's own size
# costs (512 real renders score 21, 1024 score 9.8 against it), while every call's precision_all computes the
# reference's k-NN radii (N^2 distances: 4 draws would cost 4x per call). The seed fixes it across runs.
REFERENCE_DRAWS = 2


def every_rendering(digits01: torch.Tensor, canvas: int) -> torch.Tensor:
    """``digits01`` (N, 1, 8, 8 in [0, 1]) in every combination of position, size and thickness:
    ``(N, 4 positions, 2 sizes, 2 thicknesses, 1, canvas, canvas)`` in [0, 1], indexed by the attribute indices
    of :data:`~noiserefine.digits.compose.ATTRIBUTES`."""
    quadrant = canvas // 2
    out = torch.empty(digits01.shape[0], 4, 2, 2, 1, canvas, canvas)
    for size in range(2):
        for thickness in range(2):
            top_left = torch.stack([render(d, dict(digit=0, position=0, size=size, thickness=thickness), canvas)
                                    for d in digits01])
            for position in range(4):
                # render centres the glyph in its quadrant, so the other positions are whole-quadrant shifts of
                # the top-left one (4x fewer renders; the tests check them against render)
                row, col = divmod(position, 2)
                out[:, position, size, thickness] = torch.roll(top_left, (row * quadrant, col * quadrant), (-2, -1))
    return (out + 1) / 2


def fid_reference(every: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The FID reference: each digit of ``every`` (:func:`every_rendering`) drawn :data:`REFERENCE_DRAWS` times,
    with attributes from :data:`REFERENCE_SEED`. Returns ``(images01, labels)``, one draw of all digits after
    the other (draw ``r`` of digit ``i`` is row ``r * N + i``)."""
    generator = torch.Generator().manual_seed(REFERENCE_SEED)
    index = torch.arange(labels.shape[0])
    draws = [random_attributes(labels, generator) for _ in range(REFERENCE_DRAWS)]
    images = torch.cat([every[index, a["position"], a["size"], a["thickness"]] for a in draws])
    return images, labels.repeat(REFERENCE_DRAWS)


def nearest_distance(queries: torch.Tensor, reference: torch.Tensor, chunk: int = 256) -> torch.Tensor:
    """Pixel L2 distance of each of ``queries`` (Q, P) to its nearest row of ``reference`` (R, P), in chunks."""
    return torch.cat([torch.cdist(q, reference).min(dim=1).values for q in torch.split(queries, chunk)])


def wanted_attributes(prompts: Sequence[str] | None, n: int) -> dict[str, np.ndarray]:
    """The attribute indices each prompt names, ``{name: (n,) int64}``, -1 where it names none (all -1 without prompts)."""
    if prompts is None:
        return {name: np.full(n, -1, dtype=np.int64) for name in ATTRIBUTES}
    if len(prompts) != n:
        raise ValueError(f"{len(prompts)} prompts for {n} images")
    parsed = [parse_attributes(p) for p in prompts]
    return {name: np.array([-1 if p[name] is None else p[name] for p in parsed], dtype=np.int64).reshape(n)
            for name in ATTRIBUTES}


class AttributeMetrics:
    """The MetricFn of the compositional task: ``(images01 (B, 1, canvas, canvas) in [0, 1], prompts) -> dict``.

    Keys as :class:`~noiserefine.digits.classifier.DigitMetrics` (``fid``, ``fid_class``, ``precision``,
    ``recall``, ``precision_all``, ``recall_all``, ``inception_score``, ``accuracy``: the digit head's agreement
    with the prompted digit, ``noise_share``, ``low_confidence_share``, ``num_samples``) plus prompt adherence:
    ``acc_digit``, ``acc_position``, ``acc_size``, ``acc_thickness`` (share of the samples whose prompt names the
    attribute that show it) and ``adherence`` (share with every named attribute right). Samples whose prompt
    names none of an attribute are left out of its scores (NaN if none names it)."""

    def __init__(self, classifier: AttributeClassifier, canvas: int, *, batch_size: int = 512, k: int = 3) -> None:
        if classifier.canvas != canvas:
            raise ValueError(f"the attribute classifier was built for canvas {classifier.canvas}, not {canvas}")
        self.classifier = classifier.eval()
        self.canvas, self.batch_size, self.k = canvas, batch_size, k
        digits01, labels = sklearn_digits()
        every = every_rendering(digits01, canvas)
        reference, ref_labels = fid_reference(every, labels)
        self.ref_labels = ref_labels.numpy()
        self.ref_features, _ = self._run(reference)
        self.ref_mu, self.ref_sigma = feature_statistics(self.ref_features)
        real = every.flatten(1, 3).flatten(2)  # (N digits, 16 combinations, pixels)
        train_idx, test_idx = digit_split()
        held_out = torch.cat([test_idx + draw * labels.shape[0] for draw in range(REFERENCE_DRAWS)])
        self.noise_threshold = float(nearest_distance(reference.flatten(1)[held_out],
                                                      real[train_idx].flatten(0, 1)).max())
        self.real01 = real.flatten(0, 1)  # every real composed image, (16 N, pixels)

    @torch.no_grad()
    def _run(self, images01: torch.Tensor) -> tuple[np.ndarray, dict[str, torch.Tensor]]:
        device = next(self.classifier.parameters()).device
        feats, logits = [], {name: [] for name in ATTRIBUTES}
        for chunk in torch.split(images01, self.batch_size):
            f = self.classifier.features(chunk.to(device, torch.float32))
            feats.append(f.cpu())
            for name, head in self.classifier.heads.items():
                logits[name].append(head(f).cpu())
        return torch.cat(feats).double().numpy(), {name: torch.cat(v) for name, v in logits.items()}

    def nearest_real_distance(self, images01: torch.Tensor) -> torch.Tensor:
        """Pixel L2 distance of each image to its nearest real composed image (every digit, every combination)."""
        return nearest_distance(images01.detach().flatten(1).float().cpu(), self.real01)

    def __call__(self, images01: torch.Tensor, prompts: Sequence[str] | None = None) -> dict:
        if images01.ndim != 4 or tuple(images01.shape[1:]) != (1, self.canvas, self.canvas):
            raise ValueError(f"expected (B, 1, {self.canvas}, {self.canvas}) images in [0, 1], "
                             f"got {tuple(images01.shape)}")
        feats, logits = self._run(images01.detach())
        wanted = wanted_attributes(prompts, images01.shape[0])
        scores = digit_scores(feats, logits["digit"], wanted["digit"], self.ref_features, self.ref_labels,
                              (self.ref_mu, self.ref_sigma), self.k)
        adherence = attribute_adherence({name: v.argmax(dim=1).numpy() for name, v in logits.items()}, wanted)
        scores.update({f"acc_{name}": adherence[name] for name in ATTRIBUTES}, adherence=adherence["all_correct"])
        scores["noise_share"] = float((self.nearest_real_distance(images01) > self.noise_threshold).double().mean())
        return scores

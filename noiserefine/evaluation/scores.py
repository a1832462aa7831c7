"""Metric formulas on features and class posteriors: generic, model-agnostic.

Feature extractors are the caller's (the digit classifier of the embedded default,
Inception or CLIP for real models); these functions only see arrays.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Mapping

import numpy as np
import scipy.linalg
import torch


def frechet_distance(mu1, sigma1, mu2, sigma2, eps: float = 1e-6) -> float:
    """Frechet distance between N(mu1, S1) and N(mu2, S2) (Heusel et al. 2017, Eq. for FID):

        d^2 = ||mu1 - mu2||^2 + Tr(S1 + S2 - 2 (S1 S2)^{1/2}).

    If the product is singular (sqrtm result not finite or inaccurate), eps*I is added to both
    covariances; a negligible imaginary part of the square root is dropped, a large one raises.
    """
    mu1, mu2 = np.atleast_1d(np.asarray(mu1, np.float64)), np.atleast_1d(np.asarray(mu2, np.float64))
    s1, s2 = np.atleast_2d(np.asarray(sigma1, np.float64)), np.atleast_2d(np.asarray(sigma2, np.float64))
    if mu1.shape != mu2.shape or s1.shape != s2.shape or s1.shape != (mu1.size, mu1.size):
        raise ValueError(f"shape mismatch: {mu1.shape}, {mu2.shape}, {s1.shape}, {s2.shape}")
    diff = mu1 - mu2

    def sqrt_prod(a, b):
        prod = a @ b
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            root = scipy.linalg.sqrtm(prod)
        ok = np.isfinite(root).all()
        if ok:
            scale = max(np.linalg.norm(prod), 1e-12)
            ok = np.linalg.norm(root @ root - prod) / scale < 1e-3
        return root, ok

    covmean, ok = sqrt_prod(s1, s2)
    if not ok:
        offset = np.eye(s1.shape[0]) * eps
        covmean, _ = sqrt_prod(s1 + offset, s2 + offset)
    if np.iscomplexobj(covmean):
        if not np.allclose(np.diagonal(covmean).imag, 0, atol=1e-3):
            raise ValueError(f"imaginary component {np.max(np.abs(covmean.imag))} in sqrtm")
        covmean = covmean.real
    return float(diff @ diff + np.trace(s1) + np.trace(s2) - 2 * np.trace(covmean))


def feature_statistics(features) -> tuple[np.ndarray, np.ndarray]:
    """(mean, covariance) of (N, F) features in float64; covariance is np.cov(rowvar=False)."""
    feats = np.asarray(features.detach().cpu() if torch.is_tensor(features) else features, np.float64)
    if feats.ndim != 2 or feats.shape[0] < 2:
        raise ValueError(f"need (N>=2, F) features, got shape {feats.shape}")
    return feats.mean(axis=0), np.cov(feats, rowvar=False)


def inception_score(probs, eps: float = 1e-12) -> float:
    """IS = exp( mean_i KL(p(y|x_i) || p(y)) ) with p(y) = mean_i p(y|x_i) (Salimans et al. 2016).

    Single split: the paper-standard mean over 10 splits is not used because samples are few.
    """
    p = np.asarray(probs.detach().cpu() if torch.is_tensor(probs) else probs, np.float64)
    if p.ndim != 2 or (p < 0).any():
        raise ValueError("probs must be a non-negative (N, K) array")
    p = p / p.sum(axis=1, keepdims=True)
    py = p.mean(axis=0, keepdims=True)
    kl = (p * (np.log(p + eps) - np.log(py + eps))).sum(axis=1)
    return float(np.exp(kl.mean()))


def conditional_accuracy(logits_or_probs, labels) -> float:
    """Fraction of samples whose argmax class equals the conditioning label."""
    scores = torch.as_tensor(np.asarray(logits_or_probs) if not torch.is_tensor(logits_or_probs) else logits_or_probs)
    labels = torch.as_tensor(np.asarray(labels) if not torch.is_tensor(labels) else labels)
    if scores.shape[0] != labels.shape[0] or scores.shape[0] == 0:
        raise ValueError(f"need matching non-empty batches, got {scores.shape} and {labels.shape}")
    return float((scores.argmax(dim=1).cpu() == labels.cpu().long()).double().mean())


def gap_closed(fid_unguided: float, fid_method: float, fid_guided: float) -> float:
    """(FID_unguided - FID_method) / (FID_unguided - FID_guided): 1 = matches guided, >1 = beats it."""
    denominator = fid_unguided - fid_guided
    return float("nan") if denominator == 0 else (fid_unguided - fid_method) / denominator


def class_conditional_fid(features, labels, ref_features, ref_labels) -> dict:
    """Class-conditional FID: the mean over classes ``d`` of ``FID(features[labels == d], ref[ref_labels == d])``.

    ``features`` (N, F) are samples conditioned on ``labels`` (N,); ``ref_features`` (M, F) real
    samples of class ``ref_labels`` (M,). Classes with fewer than two samples on either side are
    skipped (no covariance). Returns ``{"mean": ..., "per_class": {d: FID_d}}``; mean is NaN if no
    class qualifies. Unlike FID over all samples, a sample of the wrong class is penalised: this
    is the score guidance should improve.
    """
    feats, labels = _as_array(features), _as_array(labels).astype(np.int64).reshape(-1)
    ref, ref_labels = _as_array(ref_features), _as_array(ref_labels).astype(np.int64).reshape(-1)
    if feats.shape[0] != labels.shape[0] or ref.shape[0] != ref_labels.shape[0]:
        raise ValueError(f"features/labels lengths differ: {feats.shape[0]} vs {labels.shape[0]}, "
                         f"{ref.shape[0]} vs {ref_labels.shape[0]}")
    per_class = {}
    for d in sorted(set(labels.tolist()) & set(ref_labels.tolist())):
        mine, theirs = feats[labels == d], ref[ref_labels == d]
        if len(mine) < 2 or len(theirs) < 2:
            continue
        per_class[int(d)] = frechet_distance(*feature_statistics(mine), *feature_statistics(theirs))
    mean = float(np.mean(list(per_class.values()))) if per_class else float("nan")
    return {"mean": mean, "per_class": per_class}


def _as_array(x) -> np.ndarray:
    return np.asarray(x.detach().cpu() if torch.is_tensor(x) else x, np.float64)


def _kth_neighbour_radii(points: np.ndarray, k: int) -> np.ndarray:
    """Squared distance of every point to its k-th nearest *other* point of the same set."""
    distances = _squared_distances(points, points)
    np.fill_diagonal(distances, np.inf)
    return np.sort(distances, axis=1)[:, k - 1]


def _squared_distances(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return np.maximum((a * a).sum(1)[:, None] + (b * b).sum(1)[None, :] - 2 * a @ b.T, 0)


def precision_recall(real_features, fake_features, k: int = 3) -> dict:
    """Improved precision and recall (Kynkäänniemi et al. 2019, Eq. 1-2) with k-NN manifolds.

    ``manifold(Phi) = union over phi in Phi of the ball B(phi, ||phi - NN_k(phi, Phi)||)``;
    precision = share of fake features inside manifold(real), recall = share of real features
    inside manifold(fake) (a point on a ball's boundary counts as inside). Needs more than ``k``
    points in each set.
    """
    real, fake = _as_array(real_features), _as_array(fake_features)
    if real.ndim != 2 or fake.ndim != 2 or real.shape[1] != fake.shape[1]:
        raise ValueError(f"need (N, F) feature arrays of the same F, got {real.shape} and {fake.shape}")
    if k < 1 or min(len(real), len(fake)) <= k:
        raise ValueError(f"k={k} needs more than k points per set, got {len(real)} real and {len(fake)} fake")
    real_radii, fake_radii = _kth_neighbour_radii(real, k), _kth_neighbour_radii(fake, k)
    cross = _squared_distances(fake, real)  # (fake, real), squared like the radii
    # round-off of the expanded squared distance; points on a boundary count as inside
    slack = 1e-9 * max(float((real * real).sum(1).max()), float((fake * fake).sum(1).max()), 1.0)
    precision = (cross <= real_radii[None, :] + slack).any(axis=1).mean()
    recall = (cross <= fake_radii[:, None] + slack).any(axis=0).mean()
    return {"precision": float(precision), "recall": float(recall)}


def attribute_adherence(predicted: Mapping[str, object], wanted: Mapping[str, object]) -> dict:
    """Prompt adherence of a compositional task: per attribute, the share of samples whose predicted value
    (an ``(N,)`` index array) equals the wanted one (``-1``: the prompt does not name it, not counted), and
    ``all_correct``: the share of samples with every named attribute right (samples naming none are left out).
    NaN where nothing is counted."""
    if set(predicted) != set(wanted):
        raise ValueError(f"predicted attributes {sorted(predicted)} differ from wanted {sorted(wanted)}")
    pred = {name: np.asarray(values).astype(np.int64).ravel() for name, values in predicted.items()}
    want = {name: np.asarray(values).astype(np.int64).ravel() for name, values in wanted.items()}
    sizes = {values.shape[0] for values in [*pred.values(), *want.values()]}
    if len(sizes) > 1:
        raise ValueError(f"attribute arrays have different lengths {sorted(sizes)}")
    scores, named_any, all_right = {}, None, None
    for name in sorted(pred):
        named = want[name] >= 0
        right = pred[name] == want[name]
        scores[name] = float(right[named].mean()) if named.any() else math.nan
        named_any = named if named_any is None else named_any | named
        all_right = (right | ~named) if all_right is None else all_right & (right | ~named)
    counted = named_any if named_any is not None else np.zeros(0, bool)
    scores["all_correct"] = float(all_right[counted].mean()) if counted.any() else math.nan
    return scores

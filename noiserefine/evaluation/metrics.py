"""The paper's metrics on stored features: FID, Inception Score (10 splits), CLIPScore, PickScore.

Pure functions on arrays (the networks are in ``features.py``), so each is checked by hand in the tests.

* FID: ``||mu_g - mu_r||^2 + Tr(S_g + S_r - 2 (S_g S_r)^{1/2})`` on Inception pool features (2048-d),
  statistics in float64 (:func:`scores.feature_statistics`, :func:`scores.frechet_distance`).
* IS: torch-fidelity's ``isc_features_to_metric``: the samples shuffled with
  ``np.random.RandomState(2020)``, cut into 10 equal splits, per split
  ``exp(mean_i KL(p(y|x_i) || mean_j p(y|x_j)))`` with ``p = softmax(logits_unbiased)`` in float64;
  reported as the mean (and std) over the splits (Salimans et al. 2016).
* CLIPScore: ``max(100 cos(E_image, E_text), 0)`` per image (Hessel et al. 2021 with w = 100, torchmetrics'
  scale), averaged over the images. torchmetrics clips the *mean* instead of each score: the two agree
  whenever no cosine is negative (always, in practice, for a real CLIP and a caption).
* PickScore: ``exp(logit_scale) cos(E_image, E_text)`` (Kirstain et al. 2023's reference code: the CLIP
  logit of the pair; ``CLIPModel.logit_scale`` holds the log of the scale, ~100 for PickScore_v1).
"""

from __future__ import annotations

import math

import numpy as np
import torch

from .scores import feature_statistics, frechet_distance

IS_SPLITS = 10
IS_SHUFFLE_SEED = 2020  # torch-fidelity's default rng_seed


def fid_from_features(features, reference_mu, reference_sigma) -> float:
    """FID of (N, F) features against reference statistics (float64 throughout)."""
    mu, sigma = feature_statistics(features)
    return frechet_distance(mu, sigma, reference_mu, reference_sigma)


def inception_score_splits(logits, splits: int = IS_SPLITS, shuffle: bool = True,
                           seed: int = IS_SHUFFLE_SEED) -> tuple[float, float]:
    """(mean, std) of the Inception Score over ``splits`` splits, as torch-fidelity computes it (module docstring)."""
    x = torch.as_tensor(np.asarray(logits) if not torch.is_tensor(logits) else logits).detach().cpu()
    if x.ndim != 2 or x.shape[0] < splits:
        raise ValueError(f"need (N >= {splits}, K) logits for {splits} splits, got {tuple(x.shape)}")
    n = x.shape[0]
    if shuffle:
        x = x[torch.from_numpy(np.random.RandomState(seed).permutation(n))]
    x = x.double()
    p, log_p = x.softmax(dim=1), x.log_softmax(dim=1)
    scores = []
    for i in range(splits):
        chunk, log_chunk = p[i * n // splits:(i + 1) * n // splits], log_p[i * n // splits:(i + 1) * n // splits]
        marginal = chunk.mean(dim=0, keepdim=True)
        scores.append((chunk * (log_chunk - marginal.log())).sum(dim=1).mean().exp().item())
    return float(np.mean(scores)), float(np.std(scores))


def _cosine(image_embeddings, text_embeddings) -> torch.Tensor:
    a = torch.as_tensor(image_embeddings).detach().double().cpu()
    b = torch.as_tensor(text_embeddings).detach().double().cpu()
    if a.ndim != 2 or a.shape != b.shape:
        raise ValueError(f"need two (N, D) embeddings of one shape, got {tuple(a.shape)} and {tuple(b.shape)}")
    return (a / a.norm(dim=1, keepdim=True) * (b / b.norm(dim=1, keepdim=True))).sum(dim=1)


def clip_scores(image_embeddings, text_embeddings) -> np.ndarray:
    """Per-pair CLIPScore ``max(100 cos, 0)`` (float64)."""
    return (100 * _cosine(image_embeddings, text_embeddings)).clamp(min=0).numpy()


def pick_scores(image_embeddings, text_embeddings, logit_scale) -> np.ndarray:
    """Per-pair PickScore ``exp(logit_scale) cos`` (float64); ``logit_scale`` is the model's log-scale parameter."""
    scale = math.exp(float(logit_scale.detach().cpu()) if torch.is_tensor(logit_scale) else float(logit_scale))
    return (scale * _cosine(image_embeddings, text_embeddings)).numpy()

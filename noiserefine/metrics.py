"""Quality metrics for generated digit images (the embedded default's stand-in for FID/IS/CLIP).

The paper scores samples with FID and Inception Score computed from an ImageNet Inception
network. On 16x16 digits we use a small CNN trained on the real digits instead: its
penultimate activations play the role of Inception's pool features ("FID (classifier
features)"), its softmax the role of Inception's class posterior, and its argmax gives the
class-conditional accuracy of label-conditioned samples.

Generated images are float tensors in [0, 1] of shape (B, 1, 16, 16); real digits from
:func:`noiserefine.digits_data.load_digit_images` are in [-1, 1] and are mapped with (x+1)/2.
"""

from __future__ import annotations

import json
import math
import warnings
from pathlib import Path

import numpy as np
import scipy.linalg
import torch
import torch.nn as nn
import torch.nn.functional as F

from noiserefine.digits_data import IMAGE_SIZE, load_digit_images
from noiserefine.files import atomic_path, write_text_atomic

FORMAT_VERSION = 1
DEFAULT_NUM_STEPS = 500
WEIGHTS_FILENAME = "classifier.safetensors"
META_FILENAME = "classifier.json"
TRAIN_FRACTION = 0.85
SPLIT_SEED = 20240601  # the train/held-out split is fixed, independent of the training seed


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


def digit_split() -> tuple[torch.Tensor, torch.Tensor]:
    """The fixed (train, held-out) index split of the 1,797 digits (85% / 15%)."""
    n = load_digit_images()[1].shape[0]
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(SPLIT_SEED))
    n_train = int(round(TRAIN_FRACTION * n))
    return perm[:n_train], perm[n_train:]


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
    from safetensors.torch import load_file, save_file

    cache_dir = Path(cache_dir)
    weights, meta_path = cache_dir / WEIGHTS_FILENAME, cache_dir / META_FILENAME
    wanted = {"format_version": FORMAT_VERSION, "seed": seed, "num_steps": num_steps}
    try:
        meta = json.loads(meta_path.read_text())
        if all(meta.get(k) == v for k, v in wanted.items()):
            model = DigitClassifier()
            model.load_state_dict(load_file(str(weights)))
            return model.eval()
    except Exception:  # missing, stale or corrupt (e.g. SafetensorError) cache: retrain
        pass
    model, acc = train_digit_classifier(seed=seed, num_steps=num_steps)
    cache_dir.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    with atomic_path(weights) as tmp:
        save_file(state, str(tmp))
    meta = {**wanted, "heldout_accuracy": acc}
    write_text_atomic(meta_path, json.dumps(meta, indent=2) + "\n")
    return model


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


class DigitMetrics:
    """FID (classifier features) against all real digits, Inception Score, conditional accuracy."""

    def __init__(self, classifier: DigitClassifier, *, batch_size: int = 512) -> None:
        self.classifier = classifier.eval()
        self.batch_size = batch_size
        real, _ = load_digit_images()
        feats, _ = self._run((real + 1) / 2)
        self.ref_mu, self.ref_sigma = feature_statistics(feats)

    @torch.no_grad()
    def _run(self, images01: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
        device = next(self.classifier.parameters()).device
        feats, logits = [], []
        for chunk in torch.split(images01, self.batch_size):
            f = self.classifier.features(chunk.to(device, torch.float32))
            feats.append(f.cpu())
            logits.append(self.classifier.fc2(f).cpu())
        return torch.cat(feats).double().numpy(), torch.cat(logits)

    def __call__(self, images01: torch.Tensor, labels: torch.Tensor | None = None) -> dict:
        if images01.ndim != 4 or images01.shape[1] != 1:
            raise ValueError(f"expected (B, 1, H, W) images in [0, 1], got {tuple(images01.shape)}")
        feats, logits = self._run(images01.detach())
        fid = frechet_distance(*feature_statistics(feats), self.ref_mu, self.ref_sigma)
        acc = conditional_accuracy(logits, labels) if labels is not None else math.nan
        return {
            "fid": fid,
            "inception_score": inception_score(torch.softmax(logits.double(), dim=1)),
            "accuracy": acc,
            "num_samples": int(images01.shape[0]),
        }


def save_image_grid(
    images01: torch.Tensor, path: Path, *, nrow: int, row_labels: list[str] | None = None,
    scale: int = 4, pad: int = 2,
) -> None:
    """Write a PNG grid: ``nrow`` images per row, nearest-neighbour upscaled by ``scale``,
    ``pad``-px white separators; optional ``row_labels`` drawn left of each row.

    Size: width = label_w + pad + ncol*(W*scale + pad), height = pad + rows*(H*scale + pad),
    where label_w is 0 without labels, else the widest label's width + 2*pad.
    """
    from PIL import Image, ImageDraw, ImageFont

    x = images01.detach().cpu().float()
    if x.ndim != 4 or x.shape[1] not in (1, 3) or nrow < 1:
        raise ValueError(f"expected (B, 1|3, H, W) images and nrow >= 1, got {tuple(x.shape)}")
    b, c, h, w = x.shape
    rows, ncol = math.ceil(b / nrow), min(nrow, b)
    if row_labels is not None and len(row_labels) != rows:
        raise ValueError(f"{len(row_labels)} row labels for {rows} rows")
    arr = (x.clamp(0, 1) * 255).round().to(torch.uint8).permute(0, 2, 3, 1).numpy()
    arr = arr.repeat(scale, axis=1).repeat(scale, axis=2)
    if c == 1:
        arr = arr.repeat(3, axis=3)
    font = ImageFont.load_default()
    label_w = 0
    if row_labels:
        probe = ImageDraw.Draw(Image.new("RGB", (1, 1)))
        label_w = max(probe.textbbox((0, 0), s, font=font)[2] for s in row_labels) + 2 * pad
    cell_h, cell_w = h * scale + pad, w * scale + pad
    canvas = Image.new("RGB", (label_w + pad + ncol * cell_w, pad + rows * cell_h), (255, 255, 255))
    for i in range(b):
        r, col = divmod(i, nrow)
        canvas.paste(Image.fromarray(arr[i]), (label_w + pad + col * cell_w, pad + r * cell_h))
    if row_labels:
        draw = ImageDraw.Draw(canvas)
        for r, text in enumerate(row_labels):
            top = draw.textbbox((0, 0), text, font=font)
            y = pad + r * cell_h + (h * scale - (top[3] - top[1])) // 2 - top[1]
            draw.text((pad, y), text, fill=(0, 0, 0), font=font)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    canvas.save(path, format="PNG")

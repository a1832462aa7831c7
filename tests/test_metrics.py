"""FID / IS formulas (evaluation.scores), the digit classifier and its cache (digits.classifier), image grids."""

from __future__ import annotations

import json
import math
import os
import time

import numpy as np
import pytest
import torch
from PIL import Image

from noiserefine.digits import classifier as metrics
from noiserefine.digits.classifier import DigitMetrics, digit_split, load_or_train_classifier
from noiserefine.digits.data import load_digit_images
from noiserefine.evaluation.grids import save_image_grid
from noiserefine.evaluation.scores import (class_conditional_fid, conditional_accuracy, feature_statistics,
                                          frechet_distance, inception_score, precision_recall)

TEST_STEPS = 300  # small training budget for the test classifier


@pytest.fixture(scope="module")
def cached(tmp_path_factory):
    cache_dir = tmp_path_factory.mktemp("classifier_cache")
    start = time.perf_counter()
    model = load_or_train_classifier(cache_dir, seed=0, num_steps=TEST_STEPS)
    elapsed = time.perf_counter() - start
    meta = json.loads((cache_dir / metrics.META_FILENAME).read_text())
    print(f"\n[metrics] classifier: {TEST_STEPS} steps in {elapsed:.1f}s, "
          f"held-out accuracy {meta['heldout_accuracy']:.4f}")
    return cache_dir, model, meta


@pytest.fixture(scope="module")
def digit_metrics(cached):
    return DigitMetrics(cached[1])


@pytest.fixture(scope="module")
def heldout():
    """Held-out real digits in [0, 1] and prompts naming their digits."""
    images, labels = load_digit_images()
    _, test_idx = digit_split()
    return (images[test_idx] + 1) / 2, [f"a handwritten digit {int(d)}" for d in labels[test_idx]]


# --------------------------------------------------------------------------- Frechet distance
def test_frechet_1d_by_hand():
    # (m1-m2)^2 + s1 + s2 - 2 sqrt(s1 s2) = 4 + 4 + 9 - 2*6 = 5
    assert frechet_distance(1.0, 4.0, 3.0, 9.0) == pytest.approx(5.0, abs=1e-9)
    assert frechet_distance([0.5], [[1.0]], [0.5], [[0.25]]) == pytest.approx(0.25, abs=1e-9)


def test_frechet_diagonal_3d_by_hand():
    mu1, s1 = np.array([0.0, 1.0, 2.0]), np.diag([1.0, 4.0, 9.0])
    mu2, s2 = np.array([1.0, 1.0, 0.0]), np.diag([4.0, 1.0, 1.0])
    # ||diff||^2 = 1 + 0 + 4; traces 14 + 6; 2 * (sqrt(4) + sqrt(4) + sqrt(9)) = 14
    assert frechet_distance(mu1, s1, mu2, s2) == pytest.approx(5 + 20 - 14, abs=1e-9)


def test_frechet_identical_and_symmetric():
    rng = np.random.default_rng(0)
    a = rng.normal(size=(200, 6))
    b = rng.normal(size=(200, 6)) @ rng.normal(size=(6, 6)) + 1.5
    mu_a, s_a = feature_statistics(a)
    mu_b, s_b = feature_statistics(b)
    assert abs(frechet_distance(mu_a, s_a, mu_a, s_a)) < 1e-6
    d_ab, d_ba = frechet_distance(mu_a, s_a, mu_b, s_b), frechet_distance(mu_b, s_b, mu_a, s_a)
    assert d_ab > 1.0 and d_ab == pytest.approx(d_ba, rel=1e-6)


def test_frechet_singular_covariance_is_finite():
    rng = np.random.default_rng(1)
    few = rng.normal(size=(3, 10))  # rank-2 covariance in 10-D
    mu1, s1 = feature_statistics(few)
    mu2, s2 = np.zeros(10), np.zeros((10, 10))  # all-identical samples
    d = frechet_distance(mu1, s1, mu2, s2)
    assert np.isfinite(d) and d == pytest.approx(mu1 @ mu1 + np.trace(s1), rel=1e-3)


def test_frechet_rejects_large_imaginary_part():
    with pytest.raises(ValueError, match="imaginary"):
        frechet_distance(np.zeros(2), np.diag([-1.0, 1.0]), np.zeros(2), np.eye(2))
    with pytest.raises(ValueError):
        frechet_distance(np.zeros(2), np.eye(2), np.zeros(3), np.eye(3))


def test_feature_statistics_matches_numpy():
    x = np.arange(12, dtype=np.float32).reshape(4, 3) ** 1.5
    mu, sigma = feature_statistics(torch.from_numpy(x))
    assert mu.dtype == np.float64 and sigma.shape == (3, 3)
    np.testing.assert_allclose(mu, x.mean(0), rtol=1e-6)
    np.testing.assert_allclose(sigma, np.cov(x.astype(np.float64), rowvar=False), rtol=1e-6)


# --------------------------------------------------------------------------- class-conditional FID
def test_class_conditional_fid_by_hand():
    # class 0: fake {-1, 1} (mean 0, var 2) vs real {1, 5} (mean 3, var 8): 9 + 2 + 8 - 2*sqrt(16) = 11
    # class 1: fake {0, 2} vs real {0, 2}: 0; class 2 only in the real set, class 3 has one fake: skipped
    fake, fake_labels = np.array([[-1.0], [1.0], [0.0], [2.0], [7.0]]), np.array([0, 0, 1, 1, 3])
    real, real_labels = np.array([[1.0], [5.0], [0.0], [2.0], [9.0], [8.0], [3.0], [4.0]]), [0, 0, 1, 1, 2, 2, 3, 3]
    result = class_conditional_fid(fake, fake_labels, real, real_labels)
    assert result["per_class"] == {0: pytest.approx(11.0, abs=1e-9), 1: pytest.approx(0.0, abs=1e-9)}
    assert result["mean"] == pytest.approx(5.5, abs=1e-9)
    # the same samples with the class labels swapped: a wrong-class sample is penalised, plain FID is not
    swapped = class_conditional_fid(fake, [1, 1, 0, 0, 3], real, real_labels)["per_class"]
    assert swapped[0] == pytest.approx(4 + 2 + 8 - 2 * 4, abs=1e-9)  # fake {0, 2}: mean 1, var 2 vs mean 3, var 8
    assert swapped[1] == pytest.approx(1 + 2 + 2 - 2 * 2, abs=1e-9)  # fake {-1, 1} vs real {0, 2}


def test_class_conditional_fid_of_gaussian_sets():
    # class d: N(mu_d, I) samples vs N(0, I) reals; FID_d -> ||mu_d||^2, mean over d -> (1 + 4) / 2
    rng = np.random.default_rng(0)
    n, dim = 20000, 2
    fake = np.concatenate([rng.normal(size=(n, dim)) + [1.0, 0.0], rng.normal(size=(n, dim)) + [0.0, 2.0]])
    real = rng.normal(size=(2 * n, dim))
    labels = np.repeat([0, 1], n)
    result = class_conditional_fid(torch.from_numpy(fake), torch.from_numpy(labels), real, labels)
    assert result["per_class"][0] == pytest.approx(1.0, abs=0.05)
    assert result["per_class"][1] == pytest.approx(4.0, abs=0.1)
    assert result["mean"] == pytest.approx(2.5, abs=0.1)


def test_class_conditional_fid_rejects_mismatched_lengths():
    with pytest.raises(ValueError):
        class_conditional_fid(np.zeros((3, 2)), [0, 1], np.zeros((2, 2)), [0, 1])


# --------------------------------------------------------------------------- precision / recall
def test_precision_recall_mode_collapse_by_hand():
    real = np.arange(5.0)[:, None]  # 0..4: k=1 radii all 1
    fake = np.array([[0.0], [0.1], [0.2], [0.3]])  # k=1 radii all 0.1
    # every fake lies within 1 of the real 0 -> precision 1; only the real 0 lies within 0.1 of a fake
    assert precision_recall(real, fake, k=1) == {"precision": 1.0, "recall": pytest.approx(0.2)}


def test_precision_recall_k2_by_hand():
    real = np.arange(5.0)[:, None]  # k=2 radii: 2, 1, 1, 1, 2
    fake = np.array([[-1.5], [2.5], [7.0]])  # -1.5 within 2 of 0; 2.5 within 1 of 2; 7 is 3 from 4 > 2
    # fake k=2 radii: -1.5 -> 8.5, 2.5 -> 4.5, 7 -> 8.5: every real is covered
    assert precision_recall(real, fake, k=2) == {"precision": pytest.approx(2 / 3), "recall": 1.0}
    # boundary counts as inside: a fake exactly 2 from the real 4 (its k=2 radius)
    assert precision_recall(real, np.array([[6.0], [20.0], [30.0]]), k=2)["precision"] == pytest.approx(1 / 3)


def test_precision_recall_2d_and_default_k():
    # 2-D: reals on the unit square's corners and centre; default k=3
    real = np.array([[0, 0], [1, 0], [0, 1], [1, 1], [0.5, 0.5]])
    # k=3 radii: corner -> 1 (its neighbours: centre 0.707, two corners 1), centre -> 0.707
    fake = np.array([[0.5, -0.9], [0.5, 1.2], [3.0, 3.0], [-1.0, -1.0]])
    # (0.5,-0.9): 1.03 from (0,0)/(1,0), 1.4 from centre -> out; (0.5,1.2): dist to (0,1) sqrt(.29)=.54 -> in;
    # (3,3): out; (-1,-1): 1.41 from (0,0) -> out
    assert precision_recall(real, fake)["precision"] == pytest.approx(1 / 4)
    with pytest.raises(ValueError):
        precision_recall(real, fake[:3])  # 3 points, k=3: no 3rd neighbour
    with pytest.raises(ValueError):
        precision_recall(real, np.zeros((6, 3)))


# --------------------------------------------------------------------------- Inception score
def test_inception_score_uniform_is_one():
    assert inception_score(np.full((7, 10), 0.1)) == pytest.approx(1.0, abs=1e-9)


def test_inception_score_balanced_one_hot_is_k():
    k = 4
    probs = np.eye(k)[np.arange(3 * k) % k]
    assert inception_score(probs) == pytest.approx(k, rel=1e-6)


def test_inception_score_2x2_by_hand():
    probs = np.array([[1.0, 0.0], [0.5, 0.5]])  # p(y) = (0.75, 0.25)
    kl1 = math.log(1 / 0.75)
    kl2 = 0.5 * math.log(0.5 / 0.75) + 0.5 * math.log(0.5 / 0.25)
    assert inception_score(probs) == pytest.approx(math.exp((kl1 + kl2) / 2), rel=1e-6)


def test_conditional_accuracy():
    logits = torch.tensor([[2.0, 1.0], [0.0, 3.0], [5.0, -1.0]])
    assert conditional_accuracy(logits, torch.tensor([0, 1, 1])) == pytest.approx(2 / 3)
    assert conditional_accuracy(np.array([[0.1, 0.9]]), np.array([1])) == 1.0


# --------------------------------------------------------------------------- classifier + metrics
@pytest.mark.slow  # >= 1 s on an idle 2-core machine: `make test` only, not the fast lane
def test_training_is_deterministic_given_seed():
    a, _ = metrics.train_digit_classifier(seed=3, num_steps=5)
    b, _ = metrics.train_digit_classifier(seed=3, num_steps=5)
    c, _ = metrics.train_digit_classifier(seed=4, num_steps=5)
    sa, sb, sc = a.state_dict(), b.state_dict(), c.state_dict()
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    assert not all(torch.equal(sa[k], sc[k]) for k in sa)


@pytest.mark.slow  # >= 1 s on an idle 2-core machine: `make test` only, not the fast lane
def test_classifier_heldout_accuracy(cached):
    _, model, meta = cached
    assert not model.training
    assert meta["heldout_accuracy"] >= 0.95
    assert meta["seed"] == 0 and meta["num_steps"] == TEST_STEPS and "format_version" in meta
    feats = model.features(torch.rand(5, 1, 16, 16))
    assert feats.shape == (5, model.feature_dim)


@pytest.mark.slow  # >= 1 s on an idle 2-core machine: `make test` only, not the fast lane
def test_digit_metrics_real_vs_noise_vs_black(digit_metrics, heldout):
    images, labels = heldout
    real = digit_metrics(images, labels)
    assert real["num_samples"] == len(labels)
    assert real["accuracy"] >= 0.95
    assert real["inception_score"] > 7.0
    g = torch.Generator().manual_seed(0)
    noise = digit_metrics(torch.rand(images.shape, generator=g), labels)
    black = digit_metrics(torch.zeros_like(images), labels)
    assert noise["fid"] > 10 * real["fid"] and black["fid"] > 10 * real["fid"]
    assert noise["accuracy"] < 0.5 and black["accuracy"] < 0.5
    assert black["inception_score"] == pytest.approx(1.0, abs=1e-6)
    # class-aware scores: real digits lie on the real manifold and are no noise; uniform noise is all noise
    assert real["precision"] >= 0.9 and real["recall"] >= 0.8 and real["precision_all"] >= 0.9
    assert noise["precision"] < 0.1 and noise["recall"] < 0.1
    assert real["noise_share"] == 0.0 and noise["noise_share"] == 1.0
    assert noise["fid_class"] > 10 * real["fid_class"]


@pytest.mark.slow  # >= 1 s on an idle 2-core machine: `make test` only, not the fast lane
def test_class_conditional_fid_sees_wrong_prompts_that_fid_ignores(digit_metrics, heldout):
    images, prompts = heldout
    shifted = prompts[1:] + prompts[:1]  # same images, (mostly) the wrong digit named
    right, wrong = digit_metrics(images, prompts), digit_metrics(images, shifted)
    assert wrong["fid"] == pytest.approx(right["fid"])
    assert wrong["fid_class"] > 3 * right["fid_class"]
    assert wrong["accuracy"] < 0.3 and wrong["precision"] < right["precision"]


@pytest.mark.slow  # >= 1 s on an idle 2-core machine: `make test` only, not the fast lane
def test_accuracy_counts_only_prompts_that_name_a_digit(digit_metrics, heldout):
    images, prompts = heldout
    some = digit_metrics(images[:50], prompts[:50])
    mixed = digit_metrics(images[:50], prompts[:25] + ["a cat"] * 25)
    first = digit_metrics(images[:25], prompts[:25])
    assert mixed["accuracy"] == first["accuracy"] and some["num_samples"] == mixed["num_samples"] == 50
    assert math.isnan(digit_metrics(images[:10], ["a cat"] * 10)["accuracy"])


@pytest.mark.slow  # >= 1 s on an idle 2-core machine: `make test` only, not the fast lane
def test_digit_metrics_batching_does_not_change_results(cached, digit_metrics, heldout):
    images, labels = heldout
    small = DigitMetrics(cached[1], batch_size=37)
    np.testing.assert_allclose(small.ref_mu, digit_metrics.ref_mu, rtol=1e-5, atol=1e-6)
    a, b = small(images[:100], labels[:100]), digit_metrics(images[:100], labels[:100])
    assert a["accuracy"] == b["accuracy"]
    assert a["fid"] == pytest.approx(b["fid"], rel=1e-4)


@pytest.mark.slow  # >= 1 s on an idle 2-core machine: `make test` only, not the fast lane
def test_cache_round_trip_does_not_retrain(cached, monkeypatch, heldout):
    cache_dir, model, _ = cached
    weights = cache_dir / metrics.WEIGHTS_FILENAME
    mtime = weights.stat().st_mtime_ns

    def boom(**kwargs):
        raise AssertionError("retrained although the cache was valid")

    monkeypatch.setattr(metrics, "train_digit_classifier", boom)
    loaded = load_or_train_classifier(cache_dir, seed=0, num_steps=TEST_STEPS)
    assert weights.stat().st_mtime_ns == mtime
    images = heldout[0][:64]
    with torch.no_grad():
        torch.testing.assert_close(loaded(images), model(images), rtol=0, atol=0)
    # different settings in the request -> json mismatch -> retrains
    with pytest.raises(AssertionError, match="retrained"):
        load_or_train_classifier(cache_dir, seed=1, num_steps=TEST_STEPS)
    assert not [p for p in os.listdir(cache_dir) if p.endswith(".tmp")]


@pytest.mark.slow  # >= 1 s on an idle 2-core machine: `make test` only, not the fast lane
def test_cache_retrains_on_corrupt_weights(cached, tmp_path, monkeypatch):
    _, model, meta = cached
    (tmp_path / metrics.META_FILENAME).write_text(json.dumps(meta))
    (tmp_path / metrics.WEIGHTS_FILENAME).write_bytes(b"not a safetensors file")
    calls = []

    def fake_train(**kwargs):
        calls.append(kwargs)
        return model, 0.99

    monkeypatch.setattr(metrics, "train_digit_classifier", fake_train)
    load_or_train_classifier(tmp_path, seed=0, num_steps=TEST_STEPS)
    assert calls == [{"seed": 0, "num_steps": TEST_STEPS}]
    from safetensors.torch import load_file

    assert set(load_file(str(tmp_path / metrics.WEIGHTS_FILENAME))) == set(model.state_dict())


# --------------------------------------------------------------------------- image grid
def test_save_image_grid_size_and_pixels(tmp_path):
    images = torch.rand(6, 1, 16, 16, generator=torch.Generator().manual_seed(0))
    path = tmp_path / "nested" / "grid.png"
    save_image_grid(images, path, nrow=3, scale=4, pad=2)
    with Image.open(path) as im:
        assert im.format == "PNG"
        assert im.size == (2 + 3 * (64 + 2), 2 + 2 * (64 + 2))
        arr = np.asarray(im.convert("L"))
    # second image of the second row (index 4), nearest-neighbour upscaled
    y0, x0 = 2 + 66, 2 + 66
    expected = (images[4, 0].clamp(0, 1) * 255).round().numpy().astype(np.uint8)
    np.testing.assert_array_equal(arr[y0:y0 + 64:4, x0:x0 + 64:4], expected)
    np.testing.assert_array_equal(arr[y0 + 3, x0 + 3], expected[0, 0])


def test_save_image_grid_with_row_labels_and_rgb(tmp_path):
    images = torch.rand(4, 3, 16, 16)
    plain, labelled = tmp_path / "plain.png", tmp_path / "labelled.png"
    save_image_grid(images, plain, nrow=2)
    save_image_grid(images, labelled, nrow=2, row_labels=["baseline", "NoiseRefine"])
    with Image.open(plain) as a, Image.open(labelled) as b:
        assert b.size[1] == a.size[1] and b.size[0] > a.size[0] + 20
        margin = np.asarray(b.convert("L"))[:, : b.size[0] - a.size[0]]
    assert (margin < 128).any()  # some label text was drawn
    with pytest.raises(ValueError):
        save_image_grid(images, tmp_path / "bad.png", nrow=2, row_labels=["only one"])


def test_rows_grid_has_one_line_per_row_even_with_fewer_samples_than_columns(tmp_path):
    from conftest import tiny_digits_backend
    from noiserefine.evaluation.grids import save_rows_grid
    from noiserefine.evaluation.rows import Row

    backend = tiny_digits_backend()
    rows = [Row(name, 10, torch.randn(3, *backend.latent_shape), 0.0) for name in ("unguided", "refined")]
    save_rows_grid(rows, backend, num_columns=8, path=tmp_path / "few.png")  # 3 samples, 8 columns asked
    save_image_grid(backend.decode(rows[0].latents), tmp_path / "one.png", nrow=3, row_labels=["unguided"])
    with Image.open(tmp_path / "few.png") as grid, Image.open(tmp_path / "one.png") as one:
        assert grid.size[0] == one.size[0]  # 3 columns, the labels' margin
        assert grid.size[1] > 1.9 * one.size[1]  # 2 image rows


@pytest.mark.slow  # >= 1 s on an idle 2-core machine: `make test` only, not the fast lane
def test_classifier_weights_do_not_depend_on_the_callers_thread_count():
    """The classifier is shared (eval.classifier_dir): whichever process trains it first (the demo with 2
    threads, a DeepSpeed rank with 1) must produce the same weights, or every score moves with it."""
    threads = torch.get_num_threads()
    trained = {}
    try:
        for count in (1, 2):
            torch.set_num_threads(count)
            model, _ = metrics.train_digit_classifier(num_steps=8)
            trained[count] = model.state_dict()
            assert torch.get_num_threads() == count  # the caller's setting is left as it was
    finally:
        torch.set_num_threads(threads)
    assert all(torch.equal(trained[1][k], trained[2][k]) for k in trained[1])

"""The paper-table metrics against hand-computed values, the protocols, the shard store and the networks' loaders.

FID on two Gaussian feature sets whose sample moments are exact (so the answer is known in closed form),
IS on hand-made posteriors, CLIPScore and PickScore on hand-made embeddings; then the wiring: a tiny
random CLIP saved with save_pretrained, torch-fidelity's real InceptionV3 class loaded from a random
weights file, COCO caption selection, the image rule and the store's refusals.
"""

from __future__ import annotations

import importlib.util
import json
import math

import numpy as np
import pytest
import torch

from noiserefine.evaluation.metrics import clip_scores, fid_from_features, inception_score_splits, pick_scores
from noiserefine.evaluation.protocols import (fid_image_rule, load_statistics, read_coco_selection,
                                              to_uint8)
from noiserefine.evaluation.scores import feature_statistics, inception_score
from noiserefine.evaluation.store import ShardStore



pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


def exact_moments(n: int, mean, cov, seed: int) -> np.ndarray:
    """n points whose sample mean and np.cov (ddof 1) are exactly ``mean`` and ``cov`` (up to rounding)."""
    z = np.random.default_rng(seed).standard_normal((n, len(mean)))
    z -= z.mean(axis=0)
    z = z @ np.linalg.inv(np.linalg.cholesky(np.cov(z, rowvar=False))).T  # sample covariance I
    return z @ np.linalg.cholesky(np.asarray(cov, float)).T + np.asarray(mean, float)


# --------------------------------------------------------------------------------------------- FID
def test_fid_of_two_gaussian_sets_diagonal():
    # ||mu1 - mu2||^2 = 1 + 0 + 4 = 5; sum (sqrt(a) - sqrt(b))^2 = (1-2)^2 + (2-1)^2 + (3-1)^2 = 6 -> 11
    x = exact_moments(400, [0.0, 1.0, 2.0], np.diag([1.0, 4.0, 9.0]), seed=0)
    y = exact_moments(300, [1.0, 1.0, 0.0], np.diag([4.0, 1.0, 1.0]), seed=1)
    assert fid_from_features(x, *feature_statistics(y)) == pytest.approx(11.0, abs=1e-8)
    assert fid_from_features(y, *feature_statistics(x)) == pytest.approx(11.0, abs=1e-8)
    assert fid_from_features(x, *feature_statistics(x)) == pytest.approx(0.0, abs=1e-8)


def test_fid_of_two_gaussian_sets_rotated():
    # Covariances Q diag(a) Q^T and Q diag(b) Q^T commute: Tr(S1 + S2 - 2 (S1 S2)^1/2) = sum (sqrt a - sqrt b)^2
    angle = 0.7
    q = np.array([[math.cos(angle), -math.sin(angle), 0], [math.sin(angle), math.cos(angle), 0], [0, 0, 1.0]])
    a, b = np.array([4.0, 0.25, 1.0]), np.array([1.0, 1.0, 9.0])
    x = exact_moments(500, [3.0, 0.0, 0.0], q @ np.diag(a) @ q.T, seed=2)
    y = exact_moments(500, [0.0, 4.0, 0.0], q @ np.diag(b) @ q.T, seed=3)
    expected = 25.0 + (2 - 1) ** 2 + (0.5 - 1) ** 2 + (1 - 3) ** 2  # = 30.25
    assert fid_from_features(x, *feature_statistics(y)) == pytest.approx(expected, abs=1e-7)


def test_fid_reference_from_npz_file(tmp_path):
    y = exact_moments(300, [1.0, 1.0, 0.0], np.diag([4.0, 1.0, 1.0]), seed=1)
    mu, sigma = feature_statistics(y)
    np.savez(tmp_path / "ref.npz", mu=mu, sigma=sigma)
    x = exact_moments(400, [0.0, 1.0, 2.0], np.diag([1.0, 4.0, 9.0]), seed=0)
    assert fid_from_features(x, *load_statistics(tmp_path / "ref.npz")) == pytest.approx(11.0, abs=1e-8)
    np.savez(tmp_path / "bad.npz", mean=mu)
    with pytest.raises(ValueError, match=r"bad\.npz.*not mu and sigma"):
        load_statistics(tmp_path / "bad.npz")
    np.savez(tmp_path / "shape.npz", mu=mu, sigma=sigma[:2])
    with pytest.raises(ValueError, match="shape.npz"):
        load_statistics(tmp_path / "shape.npz")
    np.save(tmp_path / "objects.npy", np.array([{"mu": 1}], dtype=object))
    with pytest.raises(ValueError, match="objects.npy"):  # a pickle is never loaded
        load_statistics(tmp_path / "objects.npy")


# --------------------------------------------------------------------------------------------- IS
def test_inception_score_by_hand():
    # p = (0.8, 0.2), (0.2, 0.8): marginal (0.5, 0.5), KL = 0.8 ln 1.6 + 0.2 ln 0.4 for both -> IS = exp(KL)
    logits = np.log(np.array([[0.8, 0.2], [0.2, 0.8]]))
    expected = math.exp(0.8 * math.log(1.6) + 0.2 * math.log(0.4))
    mean, std = inception_score_splits(logits, splits=1, shuffle=False)
    assert mean == pytest.approx(expected, rel=1e-12) and std == 0.0
    # K confident, balanced classes -> IS = K; identical posteriors -> IS = 1
    confident = 50.0 * np.eye(4)[np.arange(40) % 4]
    assert inception_score_splits(confident, splits=1)[0] == pytest.approx(4.0, rel=1e-9)
    assert inception_score_splits(np.tile([1.0, 2.0, 3.0], (30, 1)))[0] == pytest.approx(1.0, abs=1e-12)


def test_inception_score_splits_match_single_split_formula():
    """10 shuffled splits = the mean of the single-split IS (scores.inception_score) over the same chunks."""
    logits = np.random.default_rng(0).normal(size=(103, 7)) * 2
    mean, std = inception_score_splits(logits)
    permuted = logits[np.random.RandomState(2020).permutation(103)]
    probs = torch.softmax(torch.from_numpy(permuted).double(), dim=1).numpy()
    per_split = [inception_score(probs[i * 103 // 10:(i + 1) * 103 // 10]) for i in range(10)]
    assert mean == pytest.approx(np.mean(per_split), rel=1e-9)
    assert std == pytest.approx(np.std(per_split), rel=1e-6)
    with pytest.raises(ValueError, match="10 splits"):
        inception_score_splits(logits[:9])


# --------------------------------------------------------------------------------------------- CLIP / Pick
def test_clip_score_by_hand():
    image = np.array([[1.0, 0.0], [0.0, 1.0], [2.0, 2.0], [3.0, 4.0]])
    text = np.array([[1.0, 1.0], [0.0, -2.0], [5.0, 5.0], [4.0, 3.0]])
    # 100 cos: 100/sqrt(2); cos -1 clipped to 0; parallel -> 100; (12 + 12) / 25 -> 96
    assert clip_scores(image, text) == pytest.approx([100 / math.sqrt(2), 0.0, 100.0, 96.0], abs=1e-9)


def test_pick_score_by_hand():
    image = np.array([[1.0, 0.0], [2.0, 0.0], [0.0, 3.0]])
    text = np.array([[0.6, 0.8], [-3.0, 4.0], [0.0, 1.0]])
    # exp(logit_scale) = 50: 50 * 0.6, 50 * (-0.6) (not clipped), 50 * 1
    assert pick_scores(image, text, math.log(50.0)) == pytest.approx([30.0, -30.0, 50.0], abs=1e-9)
    with pytest.raises(ValueError, match="one shape"):
        pick_scores(image, text[:2], 0.0)


def test_text_image_scores_on_a_tiny_clip(tmp_path):
    """The scorer's wiring (processor, projections, batching) equals the formulas on the model's own embeddings."""
    from tiny_eval import build_tiny_clip
    from transformers import CLIPModel, CLIPProcessor

    from noiserefine.evaluation.features import ClipEmbedder, TextImageScores

    clip_dir = build_tiny_clip(tmp_path / "clip", seed=0)
    pick_dir = build_tiny_clip(tmp_path / "pick", seed=1, logit_scale=50.0)
    images = (torch.rand(5, 3, 20, 24, generator=torch.Generator().manual_seed(0)) * 255).to(torch.uint8)
    prompts = ["a cat", "the dog and a cat", "x", "a red bus in the rain", "of the"]
    scorer = TextImageScores(ClipEmbedder(str(clip_dir), batch_size=2),
                             ClipEmbedder(str(pick_dir), str(pick_dir), batch_size=3, key="eval.pickscore_path"))
    scores = scorer.per_image(images, prompts)

    for name, directory, formula in (("clip_score", clip_dir, lambda i, t, m: clip_scores(i, t)),
                                     ("pick_score", pick_dir, lambda i, t, m: pick_scores(i, t, m.logit_scale))):
        model, processor = CLIPModel.from_pretrained(directory), CLIPProcessor.from_pretrained(directory)
        with torch.no_grad():
            pixels = processor(images=[im.permute(1, 2, 0).numpy() for im in images], return_tensors="pt")
            tokens = processor(text=prompts, padding=True, return_tensors="pt")
            image_emb = model.get_image_features(pixel_values=pixels["pixel_values"]).pooler_output
            text_emb = model.get_text_features(**tokens).pooler_output
        assert scores[name] == pytest.approx(formula(image_emb, text_emb, model), abs=1e-4)
    assert float(torch.tensor(math.log(50.0)).exp()) == pytest.approx(50.0)
    means = scorer(images.float() / 255, prompts)
    assert set(means) == {"clip_score", "pick_score", "num_samples"}
    assert means["pick_score"] == pytest.approx(float(np.mean(scores["pick_score"])), abs=1e-3)

    with pytest.raises(FileNotFoundError, match="eval.clip_path.*nowhere"):
        ClipEmbedder(str(tmp_path / "nowhere"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="empty.*config.json"):
        ClipEmbedder(str(tmp_path / "empty"))


# --------------------------------------------------------------------------------------------- Inception
class _NotWeights:
    pass


@pytest.mark.skipif(importlib.util.find_spec("torch_fidelity") is None,
                    reason="torch-fidelity not installed (the Makefile installs it: pip install --no-deps torch-fidelity)")
@pytest.mark.slow  # >= 1 s on an idle 2-core machine: `make test` only, not the fast lane
def test_torch_fidelity_inception_from_a_local_file(tmp_path, monkeypatch):
    """The real FeatureExtractorInceptionV3, random weights written here; never a download."""
    import sys

    from noiserefine.evaluation import features

    cls = features.inception_class()
    module = sys.modules[cls.__module__]
    with monkeypatch.context() as patch:  # build it once without any weights to get its state-dict layout
        patch.setattr(module.torch, "load", lambda *args, **kwargs: {})
        patch.setattr(cls, "load_state_dict", lambda self, state, *args, **kwargs: None)
        patch.setattr(module, "load_state_dict_from_url", lambda *a, **k: pytest.fail("download attempted"))
        torch.manual_seed(0)
        network = cls("inception-v3-compat", ["2048", "logits_unbiased"], feature_extractor_weights_path="unused")
    weights = tmp_path / "weights-inception-random.pth"
    torch.save(network.state_dict(), weights)
    monkeypatch.setattr(module, "load_state_dict_from_url", lambda *a, **k: pytest.fail("download attempted"))

    with pytest.warns(UserWarning, match="not the standard FID Inception file"):
        inception = features.load_inception(str(weights), "cpu", batch_size=1)
    images = (torch.rand(2, 3, 20, 24, generator=torch.Generator().manual_seed(1)) * 255).to(torch.uint8)
    out = inception(images)  # two batches of one (the network costs seconds per image on a CPU)
    assert out["pool"].shape == (2, 2048) and out["logits"].shape == (2, 1008)
    assert out["pool"].dtype == np.float32 and np.isfinite(out["pool"]).all()
    assert not np.allclose(out["pool"][0], out["pool"][1])
    assert inception.record["sha256"] and inception.record["standard_weights"] is False

    with pytest.raises(FileNotFoundError, match=r"benchmark\.inception_path.*missing\.pth.*weights-inception-2015"):
        features.load_inception(str(tmp_path / "missing.pth"))
    with pytest.raises(ValueError, match="inception_path is not set"):
        features.load_inception("")
    torch.save({"a": _NotWeights()}, tmp_path / "pickled.pth")
    with pytest.raises(ValueError, match="pickled.pth.*not a plain tensor state dict"):
        features.load_inception(str(tmp_path / "pickled.pth"))
    torch.save({"fc.weight": torch.zeros(2, 2)}, tmp_path / "other.pth")
    with pytest.raises(ValueError, match="other.pth.*does not fit"):
        features.load_inception(str(tmp_path / "other.pth"))


# --------------------------------------------------------------------------------------------- protocol
def test_coco_selection_and_image_rule(tmp_path):
    from tiny_eval import write_coco_fixture

    from noiserefine.config import load_config
    from noiserefine.evaluation.protocols import build_protocol

    captions, folder = write_coco_fixture(tmp_path, num_images=6)
    selection = read_coco_selection(captions)
    assert [item["image_id"] for item in selection] == list(range(100, 106))  # sorted by image id
    assert selection[0]["caption"] == "a photo of thing 100 version 1."  # lowest annotation id, whitespace collapsed
    cfg = load_config(None, [f"benchmark.captions={captions}", f"benchmark.reference={folder}",
                             "benchmark.num_samples=4"])
    protocol = build_protocol(cfg.benchmark)
    longer = build_protocol(cfg.benchmark, num_samples=6)
    assert longer.prompts[:4] == protocol.prompts and longer.seeds[:4] == protocol.seeds  # prefix-stable
    assert protocol.identity == longer.identity
    assert [p.name for p in protocol.reference_files] == [item["file_name"] for item in selection[:4]]
    record = json.loads(json.dumps(protocol.record))
    assert record["captions_sha256"] and record["num_captioned_images"] == 6 and record["num_samples"] == 4
    with pytest.raises(ValueError, match="num_samples=7 but .* 6 captioned images"):
        build_protocol(cfg.benchmark, num_samples=7)
    (folder / selection[1]["file_name"]).unlink()
    with pytest.raises(FileNotFoundError, match="lacks 1 of the 4"):
        build_protocol(cfg.benchmark)

    imagenet = load_config(None, ["benchmark.protocol=imagenet", "benchmark.num_classes=3"])
    assert build_protocol(imagenet.benchmark, num_samples=7).prompts == ["0", "1", "2", "0", "1", "2", "0"]

    images = torch.zeros(2, 3, 20, 24, dtype=torch.uint8)
    images[:, :, :, :2] = 255  # columns cut by the center crop (24 -> 20: 2 px each side)
    cropped = fid_image_rule(images, 20)
    assert cropped.shape == (2, 3, 20, 20) and int(cropped.max()) == 0
    assert fid_image_rule(cropped, 20) is cropped and fid_image_rule(cropped, 10).shape == (2, 3, 10, 10)
    assert to_uint8(torch.tensor([0.0, 0.5, 1.0, 1.2]).view(1, 1, 2, 2)).tolist() == [[[[0, 128], [255, 255]]] * 3]


def test_store_refuses_mixing_and_ignores_a_stray_temp_file(tmp_path):
    store = ShardStore(tmp_path, "row", {"model": "a"})
    arrays = {"sample_ids": np.arange(0, 3), "seeds": np.array([7, 8, 9]), "x": np.ones(3)}
    store.write(0, 3, arrays)
    (store.directory / ".shard-00000003-00000006.npz.123-abc.tmp").write_bytes(b"half")  # a killed writer
    assert store.has(0, 3) and not store.has(3, 6)
    assert store.read_all([(0, 3)], [7, 8, 9])["x"].tolist() == [1, 1, 1]
    with pytest.raises(ValueError, match="seeds are not the protocol's"):
        store.read(0, 3, [7, 8, 10])
    with pytest.raises(FileNotFoundError, match="missing shards"):
        store.read_all([(0, 3), (3, 6)], None)
    with pytest.raises(ValueError, match="object arrays"):
        store.write(3, 6, {"sample_ids": np.arange(3, 6), "seeds": np.arange(3), "x": np.array([{}, {}, {}])})
    other = ShardStore(tmp_path, "row", {"model": "b"})
    assert other.directory != store.directory
    (other.directory / "store.json").write_text(json.dumps({"key": store.key}))
    with pytest.raises(ValueError, match="another configuration"):
        ShardStore(tmp_path, "row", {"model": "b"})

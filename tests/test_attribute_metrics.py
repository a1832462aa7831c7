"""The compositional task's metrics (digits.attribute_metrics), the attribute classifier's cache and the dispatch
of digit_metrics on model.digits.task, on hand-made cases whose expected values are computed independently."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch

from noiserefine.config import load_config
from noiserefine.digits import attribute_classifier, classifier, classifier_common
from noiserefine.digits.attribute_classifier import AttributeClassifier, load_or_train_attribute_classifier
from noiserefine.digits.attribute_metrics import (AttributeMetrics, every_rendering, fid_reference, nearest_distance,
                                                 wanted_attributes)
from noiserefine.digits.classifier import digit_split
from noiserefine.backends.digits import ATTRIBUTES, attribute_prompt
from noiserefine.digits.compose import composed_images, render, sklearn_digits

REPO = Path(__file__).resolve().parents[1]
CANVAS = 24
TEST_STEPS = 150  # a few steps: the expected values below are computed from the same classifier


# --------------------------------------------------------------------------- fast: helpers by hand
def test_every_rendering_is_render_in_every_combination():
    digits01 = torch.rand(3, 1, 8, 8, generator=torch.Generator().manual_seed(0))  # any glyphs will do
    every = every_rendering(digits01, CANVAS)
    assert every.shape == (3, 4, 2, 2, 1, CANVAS, CANVAS)
    for i in range(3):
        for position in range(4):
            for size in range(2):
                for thickness in range(2):
                    wanted = render(digits01[i], dict(digit=0, position=position, size=size, thickness=thickness),
                                    CANVAS)
                    torch.testing.assert_close(every[i, position, size, thickness], (wanted + 1) / 2, rtol=0, atol=0)


def test_nearest_distance_by_hand():
    reference = torch.tensor([[0.0, 0.0], [3.0, 4.0], [10.0, 0.0]])
    queries = torch.tensor([[0.0, 1.0], [3.0, 4.0], [7.0, 0.0]])
    torch.testing.assert_close(nearest_distance(queries, reference, chunk=2), torch.tensor([1.0, 0.0, 3.0]))


def test_wanted_attributes_marks_unnamed_ones_minus_one():
    wanted = wanted_attributes(["a small thick seven in the top left", "a seven", "a picture"], 3)
    assert {name: v.tolist() for name, v in wanted.items()} == {
        "digit": [7, 7, -1], "position": [0, -1, -1], "size": [0, -1, -1], "thickness": [1, -1, -1]}
    assert all((v == -1).all() for v in wanted_attributes(None, 2).values())
    with pytest.raises(ValueError, match="2 prompts for 3 images"):
        wanted_attributes(["a seven", "a two"], 3)


# --------------------------------------------------------------------------- fast: the cache (a fake trainer)
@pytest.fixture
def fake_trainer(monkeypatch):
    """Replaces the training by an untrained classifier, recording each call's (canvas, seed, num_steps)."""
    calls = []

    def fake(canvas, *, seed, num_steps):
        calls.append((canvas, seed, num_steps))
        return AttributeClassifier(canvas).eval(), {name: 0.5 for name in ATTRIBUTES}

    monkeypatch.setattr(attribute_classifier, "train_attribute_classifier", fake)
    return calls


def test_cache_loads_the_second_time_and_retrains_on_another_canvas(tmp_path, fake_trainer):
    first = load_or_train_attribute_classifier(tmp_path, CANVAS, num_steps=7)
    meta = json.loads((tmp_path / "attribute_classifier.json").read_text())
    assert fake_trainer == [(CANVAS, 0, 7)]
    assert meta["canvas"] == CANVAS and meta["num_steps"] == 7 and meta["heldout_accuracy"]["digit"] == 0.5
    assert meta["format_version"] == attribute_classifier.FORMAT_VERSION
    assert meta["train_threads"] == classifier_common.TRAIN_THREADS
    again = load_or_train_attribute_classifier(tmp_path, CANVAS, num_steps=7)
    assert fake_trainer == [(CANVAS, 0, 7)]  # loaded, not retrained
    assert all(torch.equal(a, b) for a, b in zip(first.state_dict().values(), again.state_dict().values()))
    assert not again.training
    larger = load_or_train_attribute_classifier(tmp_path, 28, num_steps=7)
    assert fake_trainer[-1] == (28, 0, 7) and larger.canvas == 28
    load_or_train_attribute_classifier(tmp_path, 28, num_steps=8)
    assert fake_trainer[-1] == (28, 0, 8) and len(fake_trainer) == 3
    assert sorted(p.name for p in tmp_path.iterdir()) == ["attribute_classifier.json",
                                                          "attribute_classifier.safetensors"]  # no temp files left


@pytest.mark.parametrize("corrupt", ["attribute_classifier.safetensors", "attribute_classifier.json"])
def test_cache_retrains_on_a_corrupt_file(tmp_path, fake_trainer, corrupt):
    load_or_train_attribute_classifier(tmp_path, CANVAS, num_steps=7)
    (tmp_path / corrupt).write_bytes(b"\x00 not what it should be")
    model = load_or_train_attribute_classifier(tmp_path, CANVAS, num_steps=7)
    assert len(fake_trainer) == 2 and isinstance(model, AttributeClassifier)
    assert json.loads((tmp_path / "attribute_classifier.json").read_text())["canvas"] == CANVAS


def test_the_two_classifiers_share_a_cache_directory(tmp_path, fake_trainer, monkeypatch):
    from noiserefine.digits.classifier import DigitClassifier, load_or_train_classifier

    monkeypatch.setattr(classifier, "train_digit_classifier", lambda **kwargs: (DigitClassifier().eval(), 0.5))
    load_or_train_classifier(tmp_path, num_steps=3)
    load_or_train_attribute_classifier(tmp_path, CANVAS, num_steps=3)
    load_or_train_attribute_classifier(tmp_path, CANVAS, num_steps=3)
    assert len(fake_trainer) == 1
    assert json.loads((tmp_path / classifier.META_FILENAME).read_text())["heldout_accuracy"] == 0.5


# --------------------------------------------------------------------------- slow: a trained classifier
@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    return load_or_train_attribute_classifier(tmp_path_factory.mktemp("attribute_classifier"), CANVAS,
                                              num_steps=TEST_STEPS)


@pytest.fixture(scope="module")
def metrics(trained):
    return AttributeMetrics(trained, CANVAS)


@pytest.fixture(scope="module")
def heldout():
    """Held-out digits rendered with known attributes (another seed than the reference's): images in [0, 1],
    the attributes and prompts naming all of them."""
    _, test_idx = digit_split()
    images, attributes = composed_images(CANVAS, seed=5, indices=test_idx.tolist())
    prompts = [attribute_prompt({k: int(v[i]) for k, v in attributes.items()}) for i in range(len(test_idx))]
    return (images + 1) / 2, {k: v.numpy() for k, v in attributes.items()}, prompts


def _predicted(model, images01):
    with torch.no_grad():
        return {name: v.argmax(dim=1).numpy() for name, v in model(images01).items()}


@pytest.mark.slow  # trains a classifier and renders the references (seconds)
def test_accuracies_and_adherence_on_known_attributes(trained, metrics, heldout):
    images, truth, prompts = heldout
    predicted = _predicted(trained, images)
    scores = metrics(images, prompts)
    for name in ATTRIBUTES:
        assert scores[f"acc_{name}"] == pytest.approx(np.mean(predicted[name] == truth[name]), abs=1e-12), name
    all_right = np.all([predicted[name] == truth[name] for name in ATTRIBUTES], axis=0)
    assert scores["adherence"] == pytest.approx(all_right.mean(), abs=1e-12)
    assert scores["accuracy"] == scores["acc_digit"]
    assert scores["acc_position"] > 0.9 and scores["num_samples"] == len(prompts)
    # prompts asking for the opposite quadrant: the same images now miss it wherever the classifier sees the truth
    moved = {**truth, "position": 3 - truth["position"]}
    moved_prompts = [attribute_prompt({k: int(v[i]) for k, v in moved.items()}) for i in range(len(prompts))]
    moved_scores = metrics(images, moved_prompts)
    assert moved_scores["acc_position"] == pytest.approx(np.mean(predicted["position"] == moved["position"]))
    assert moved_scores["acc_position"] < 0.1 and moved_scores["adherence"] <= moved_scores["acc_position"]
    assert moved_scores["acc_size"] == scores["acc_size"] and moved_scores["fid"] == scores["fid"]


@pytest.mark.slow
def test_prompts_naming_no_attribute_are_left_out(metrics, heldout):
    images, _, prompts = heldout
    named, unnamed = images[:40], images[40:80]
    alone = metrics(named, prompts[:40])
    mixed = metrics(torch.cat([named, unnamed]), prompts[:40] + ["a picture"] * 40)
    for key in ("accuracy", "adherence", *(f"acc_{name}" for name in ATTRIBUTES)):
        assert mixed[key] == alone[key], key
    digit_only = metrics(named, [p.split(" in the ")[0].split()[-1] for p in prompts[:40]])  # e.g. "seven"
    assert digit_only["acc_digit"] == alone["acc_digit"] and math.isnan(digit_only["acc_position"])
    nothing = metrics(named, ["a picture"] * 40)
    for key in ("accuracy", "fid_class", "precision", "recall", "adherence", *(f"acc_{n}" for n in ATTRIBUTES)):
        assert math.isnan(nothing[key]), key
    assert math.isfinite(nothing["fid"]) and nothing["num_samples"] == 40


@pytest.mark.slow
def test_fid_of_the_reference_against_itself_is_zero_and_of_noise_large(metrics, monkeypatch):
    digits01, labels = sklearn_digits()
    reference, ref_labels = fid_reference(every_rendering(digits01, CANVAS), labels)
    prompts = [f"a {ATTRIBUTES['digit'][int(d)]}" for d in ref_labels]
    # the pixel nearest-neighbour search over every real image is what costs here; it is tested below on few images
    monkeypatch.setattr(metrics, "nearest_real_distance", lambda images: torch.zeros(images.shape[0]))
    itself = metrics(reference, prompts)
    assert abs(itself["fid"]) < 1e-3 and abs(itself["fid_class"]) < 1e-3
    assert itself["precision_all"] == 1.0 and itself["recall_all"] == 1.0 and itself["precision"] == 1.0
    noise = metrics(torch.rand(500, 1, CANVAS, CANVAS, generator=torch.Generator().manual_seed(0)), prompts[:500])
    assert noise["fid"] > 100 * max(itself["fid"], 1e-3) and noise["fid"] > 10
    assert noise["precision_all"] < 0.05


@pytest.mark.slow
def test_fid_class_sees_wrong_digits_that_fid_ignores(metrics, heldout):
    images, truth, _ = heldout
    right = [f"a {ATTRIBUTES['digit'][d]}" for d in truth["digit"]]
    wrong = [f"a {ATTRIBUTES['digit'][(d + 1) % 10]}" for d in truth["digit"]]
    ok, shifted = metrics(images, right), metrics(images, wrong)
    assert ok["fid"] == shifted["fid"]
    assert shifted["fid_class"] > 2 * ok["fid_class"]
    assert shifted["accuracy"] < ok["accuracy"]


@pytest.mark.slow
def test_noise_share_of_real_renders_noise_and_a_mix(metrics, heldout):
    images = heldout[0][:60]
    noise = torch.rand(20, 1, CANVAS, CANVAS, generator=torch.Generator().manual_seed(1))
    assert metrics(images)["noise_share"] == 0.0
    assert metrics(noise)["noise_share"] == 1.0
    assert metrics(torch.cat([images, noise]))["noise_share"] == 0.25
    assert 0 < metrics.noise_threshold < float(metrics.nearest_real_distance(noise).min())


@pytest.mark.slow
def test_digit_metrics_dispatches_on_the_task(tmp_path, fake_trainer, monkeypatch):
    from noiserefine.digits.classifier import DigitClassifier, DigitMetrics, digit_metrics

    overrides = [f"eval.classifier_dir={tmp_path}", "eval.metrics=digit_classifier"]
    compose = load_config(REPO / "configs" / "digits.yaml", [*overrides, "model.digits.task=compose"])
    scores = digit_metrics(compose)
    assert isinstance(scores, AttributeMetrics) and scores.canvas == compose.model.digits.canvas
    assert fake_trainer == [(compose.model.digits.canvas, 0, attribute_classifier.DEFAULT_NUM_STEPS)]
    monkeypatch.setattr(classifier, "train_digit_classifier", lambda **kwargs: (DigitClassifier().eval(), 0.5))
    plain = load_config(REPO / "configs" / "digits.yaml", [*overrides, "model.digits.task=digits"])
    assert isinstance(digit_metrics(plain), DigitMetrics)
    # eval.classifier_steps > 0 replaces the classifier's default
    fake_trainer.clear()
    digit_metrics(load_config(REPO / "configs" / "digits.yaml", [f"eval.classifier_dir={tmp_path / 'other'}",
                                                                 "model.digits.task=compose", "eval.classifier_steps=9"]))
    assert fake_trainer == [(compose.model.digits.canvas, 0, 9)]

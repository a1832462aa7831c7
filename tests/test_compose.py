"""The compositional digits task: prompts, parsing, rendering, and the adherence formula on hand-made cases."""

import math

import numpy as np
import pytest
import torch

from noiserefine.backends.digits import ATTRIBUTES, attribute_prompt, parse_attributes
from noiserefine.digits.compose import composed_images, render
from noiserefine.evaluation.scores import attribute_adherence


def test_prompt_names_every_attribute_and_parses_back():
    for digit in range(10):
        for position in range(4):
            for size in range(2):
                for thickness in range(2):
                    wanted = dict(digit=digit, position=position, size=size, thickness=thickness)
                    assert parse_attributes(attribute_prompt(wanted)) == wanted
    assert attribute_prompt(dict(digit=7, position=0, size=0, thickness=1)) == "a small thick seven in the top left"


def test_a_prompt_that_names_some_attributes_leaves_the_others_none():
    assert parse_attributes("a handwritten seven") == dict(digit=7, position=None, size=None, thickness=None)
    assert parse_attributes("something LARGE at the Bottom Right") == dict(digit=None, position=3, size=1,
                                                                           thickness=None)


def test_bad_attributes_are_refused_naming_them():
    with pytest.raises(ValueError, match="position=4"):
        attribute_prompt(dict(digit=1, position=4, size=0, thickness=0))
    with pytest.raises(ValueError, match="lack 'size'"):
        attribute_prompt(dict(digit=1, position=0, thickness=0))
    with pytest.raises(ValueError, match="canvas"):
        render(torch.ones(1, 8, 8), dict(digit=0, position=0, size=0, thickness=0), canvas=16)  # large == small


def test_render_places_the_digit_in_its_quadrant_at_its_size():
    square = torch.ones(1, 8, 8)  # a full square shows exactly where the glyph lands
    canvas = 24
    small = render(square, dict(digit=0, position=3, size=0, thickness=0), canvas)
    lit = (small[0] > 0).nonzero()
    assert small.shape == (1, 24, 24) and small.min() == -1
    assert lit[:, 0].min() == 14 and lit[:, 0].max() == 21  # bottom quadrant rows 12..23, centred 8 rows
    assert lit[:, 1].min() == 14 and lit[:, 1].max() == 21
    large = render(square, dict(digit=0, position=0, size=1, thickness=0), canvas)
    lit = (large[0] > 0).nonzero()
    assert lit[:, 0].max() == 11 and lit[:, 1].max() == 11 and len(lit) == 144


def test_thick_strokes_cover_the_thin_ones_and_more():
    dot = torch.zeros(1, 8, 8)
    dot[0, 4, 4] = 1.0
    thin = render(dot, dict(digit=0, position=0, size=0, thickness=0), 24)
    thick = render(dot, dict(digit=0, position=0, size=0, thickness=1), 24)
    assert int((thin > 0).sum()) == 1 and int((thick > 0).sum()) == 9
    assert bool(((thin > 0) <= (thick > 0)).all())


def test_composed_dataset_is_deterministic_and_covers_the_attributes():
    images, attributes = composed_images(24, seed=3, indices=range(200))
    again, same = composed_images(24, seed=3, indices=range(200))
    assert torch.equal(images, again) and all(torch.equal(attributes[k], same[k]) for k in attributes)
    other, _ = composed_images(24, seed=4, indices=range(200))
    assert not torch.equal(images, other)
    assert images.shape == (200, 1, 24, 24) and images.min() >= -1 and images.max() <= 1
    for name, values in ATTRIBUTES.items():
        assert set(attributes[name].tolist()) == set(range(len(values))), name


def test_adherence_by_hand():
    wanted = dict(digit=[1, 2, 3, 4], position=[0, 1, -1, 2])
    predicted = dict(digit=[1, 2, 0, 4], position=[0, 3, 3, 2])
    scores = attribute_adherence(predicted, wanted)
    assert scores["digit"] == 0.75
    assert scores["position"] == pytest.approx(2 / 3)  # the third prompt names no position
    assert scores["all_correct"] == 0.5  # samples 0 and 3; sample 2's digit is wrong, sample 1's position


def test_adherence_counts_nothing_as_nan_and_refuses_mismatches():
    scores = attribute_adherence(dict(digit=np.array([1])), dict(digit=np.array([-1])))
    assert math.isnan(scores["digit"]) and math.isnan(scores["all_correct"])
    with pytest.raises(ValueError, match="differ"):
        attribute_adherence(dict(digit=[1]), dict(size=[1]))
    with pytest.raises(ValueError, match="lengths"):
        attribute_adherence(dict(digit=[1, 2]), dict(digit=[1]))


def test_attribute_classifier_shapes_and_canvas_check():
    from noiserefine.digits.attribute_classifier import AttributeClassifier

    model = AttributeClassifier(24)
    logits = model(torch.rand(3, 1, 24, 24))
    assert {name: tuple(v.shape) for name, v in logits.items()} == {
        name: (3, len(values)) for name, values in ATTRIBUTES.items()}
    assert model.features(torch.rand(3, 1, 24, 24)).shape == (3, AttributeClassifier.feature_dim)
    with pytest.raises(ValueError, match="multiple of 4"):
        AttributeClassifier(18)


@pytest.mark.slow  # trains a classifier (~seconds)
def test_attribute_classifier_learns_every_attribute_and_is_deterministic():
    from noiserefine.digits.attribute_classifier import train_attribute_classifier

    _, accuracy = train_attribute_classifier(24, seed=0, num_steps=150)
    chance = {name: 1 / len(values) for name, values in ATTRIBUTES.items()}
    assert all(accuracy[name] > chance[name] + 0.3 for name in ATTRIBUTES), accuracy
    first, _ = train_attribute_classifier(24, seed=0, num_steps=5)
    again, _ = train_attribute_classifier(24, seed=0, num_steps=5)
    assert all(torch.equal(a, b) for a, b in zip(first.state_dict().values(), again.state_dict().values()))

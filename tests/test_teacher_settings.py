"""Which saved teacher counts as trained with the settings asked for, and the attention-heads setting."""

import json

import pytest

from noiserefine.backends.digits import build_unet
from noiserefine.config import load_config
from noiserefine.digits import teacher
from noiserefine.digits.teacher import SETTINGS_ADDED_LATER, TRAINING_FILE, ensure_digits_teacher, training_settings


@pytest.mark.parametrize("heads", [1, 4])
def test_build_unet_gives_every_attention_layer_the_heads_asked_for(heads):
    unet = build_unet([8, 16, 16], 16, 24, attention_heads=heads)
    attentions = [m for name, m in unet.named_modules() if name.endswith(("attn1", "attn2"))]
    assert attentions and all(m.heads == heads for m in attentions)


def _saved_teacher(path, settings: dict):
    path.mkdir(parents=True)
    (path / TRAINING_FILE).write_text(json.dumps({"settings": settings}))
    return path


@pytest.fixture
def trainings(monkeypatch):
    """The teachers ensure_digits_teacher would train (none is trained for real)."""
    calls = []
    monkeypatch.setattr(teacher, "train_digits_teacher", lambda settings, path, progress=True: calls.append(path))
    return calls


def test_a_teacher_saved_before_a_setting_existed_counts_as_trained_with_its_default(tmp_path, trainings):
    settings = training_settings(load_config(overrides=["model.digits.attention_heads=4"]).model.digits)
    older = {k: v for k, v in settings.items() if k not in SETTINGS_ADDED_LATER}
    assert len(older) < len(settings)  # the saved record really lacks the later keys
    path = _saved_teacher(tmp_path / "teacher", older)
    ensure_digits_teacher(settings, path, progress=False)
    assert trainings == []


def test_a_teacher_with_other_attention_heads_is_trained_again(tmp_path, trainings):
    four = training_settings(load_config(overrides=["model.digits.attention_heads=4"]).model.digits)
    older = {k: v for k, v in four.items() if k not in SETTINGS_ADDED_LATER}
    path = _saved_teacher(tmp_path / "teacher", older)
    ensure_digits_teacher({**four, "attention_heads": 1}, path, progress=False)
    assert trainings == [path]

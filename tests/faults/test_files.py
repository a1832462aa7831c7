"""Fault tests of output files' permissions (item 17): every output gets the default mode of the umask.

safetensors >= 0.8 writes through a ``tempfile`` NamedTempFile (mode 0600, whatever the
umask) and renames it into place, and ``tempfile.mkdtemp`` makes 0700 directories: a
shared cache or model directory would be unreadable to the other users of a group.
"""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from conftest import tiny_digits_backend
from noiserefine.config import load_config
from noiserefine.files import atomic_path

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(params=[0o022, 0o007], ids=["umask022", "umask007"])
def umask(request):
    previous = os.umask(request.param)
    yield request.param
    os.umask(previous)


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def assert_default_modes(root: Path, umask: int) -> None:
    """``root`` and everything under it: files ``0o666 & ~umask``, directories ``0o777 & ~umask``."""
    wrong = {str(p.relative_to(root.parent)): oct(mode(p)) for p in [root, *root.rglob("*")]
             if mode(p) != (0o777 if p.is_dir() else 0o666) & ~umask}
    assert not wrong, f"not the umask's default modes ({oct(umask)}): {wrong}"


def test_safetensors_written_through_atomic_path(tmp_path, umask):
    path = tmp_path / "weights.safetensors"
    with atomic_path(path) as tmp:
        save_file({"a": torch.zeros(2)}, str(tmp))
    assert mode(path) == 0o666 & ~umask


def test_refiner_files(tmp_path, umask):
    from noiserefine.refiner import Refiner, save_refiner

    cfg = load_config(REPO / "configs" / "digits.yaml", ["refiner.lora_rank=2", "refiner.lora_alpha=2.0"])
    refiner = Refiner(tiny_digits_backend(), cfg.refiner)
    directory = save_refiner(refiner, tmp_path / "refiner", cfg)
    assert_default_modes(directory, umask)


@pytest.mark.parametrize("umask", [0o007], indirect=True, ids=["umask007"])  # one: it trains a step
def test_digit_teacher_directory(tmp_path, umask):
    from noiserefine.digits.teacher import train_digits_teacher

    # one step of a small teacher: the modes of the files it writes do not depend on its size
    settings = load_config(REPO / "configs" / "digits.yaml", ["model.digits.train_steps=1", "model.digits.batch_size=4",
                                                              "model.digits.block_out_channels=[8,16,16]"]).model.digits
    out = train_digits_teacher(settings, tmp_path / "teacher", progress=False)
    assert any(out.rglob("*.safetensors"))
    assert_default_modes(out, umask)


def test_digit_classifier(tmp_path, umask):
    from noiserefine.digits.classifier import load_or_train_classifier

    load_or_train_classifier(tmp_path / "classifier", num_steps=1)
    assert_default_modes(tmp_path / "classifier", umask)

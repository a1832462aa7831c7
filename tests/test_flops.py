"""FLOPs per sample-forward of each model family (``noiserefine/flops.py``) against hand-derived counts, and the
times ``python -m noiserefine.capacity`` derives from FLOPs at a stated utilisation.

The hand count of a denoiser forward: every ``nn.Linear`` (2 x in_features per output element), every
``nn.Conv2d`` (2 x in_channels/groups x kh x kw per output element) and every attention call (QK^T and PV:
2 x 2 x batch x heads x queries x keys x head dim), read off the shapes of one forward by hooks. The linear
layer's and the convolution's formulas alone are tested in tests/test_gpu_check.py.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from conftest import tiny_digits_backend
from noiserefine import capacity, flops
from noiserefine.config import load_config
from tiny_models import build_tiny_dit, build_tiny_sd, build_tiny_sdxl

REPO = Path(__file__).resolve().parents[1]


def hand_count(backend) -> int:
    """FLOPs of one sample-forward from the shapes its Linear/Conv2d layers and attention calls see."""
    total = 0

    def layer(module, inputs, output):
        nonlocal total
        if isinstance(module, torch.nn.Linear):
            total += 2 * module.in_features * output.numel()
        else:
            kh, kw = module.kernel_size
            total += 2 * (module.in_channels // module.groups) * kh * kw * output.numel()

    def attention(query, key, value, *args, **kwargs):
        nonlocal total
        *batch, queries, dim = query.shape
        total += 2 * 2 * int(torch.tensor(batch).prod()) * queries * key.shape[-2] * dim
        return real(query, key, value, *args, **kwargs)

    hooks = [m.register_forward_hook(layer) for m in backend.denoiser.modules()
             if isinstance(m, (torch.nn.Linear, torch.nn.Conv2d))]
    real = F.scaled_dot_product_attention
    F.scaled_dot_product_attention = attention
    try:
        x = torch.zeros(1, *backend.latent_shape, dtype=backend.dtype)
        with torch.no_grad():
            backend.denoise(x, torch.tensor(500.0), backend.null_conditioning(1))
    finally:
        F.scaled_dot_product_attention = real
        for hook in hooks:
            hook.remove()
    return total


@pytest.mark.slow  # FlopCounterMode dispatches every op in Python: seconds on a busy 2-core machine
def test_digits_forward_flops_match_the_hand_count():
    backend = tiny_digits_backend()
    counted = flops.sample_forward_flops(backend)
    assert counted == hand_count(backend) > 0


@pytest.fixture(scope="module")
def tiny_families(tmp_path_factory):
    from noiserefine.backends import load_backend

    root = tmp_path_factory.mktemp("models")
    paths = {"stable_diffusion": build_tiny_sd(root / "sd"), "sdxl": build_tiny_sdxl(root / "sdxl"),
             "sit": build_tiny_dit(root / "dit")}
    return {name: load_backend(load_config(overrides=[f"model.backend={name}", f"model.path={path}"]).model)
            for name, path in paths.items()}


@pytest.mark.slow  # builds three tiny pipelines
@pytest.mark.parametrize("family", ["stable_diffusion", "sdxl", "sit"])
def test_each_family_forward_flops_match_the_hand_count(tiny_families, family):
    backend = tiny_families[family]
    assert flops.sample_forward_flops(backend) == hand_count(backend) > 0


@pytest.mark.slow  # builds SD 2.1's full-size UNet and text encoder on the meta device (~10-40 s)
def test_a_shipped_architecture_is_counted_on_the_meta_device():
    assert flops.architecture_forward_flops("sd21") == 804_257_464_320  # ~0.8 TFLOP a forward at 64x64


def test_time_implied_by_flops_at_a_utilisation():
    cfg = load_config(REPO / "configs" / "sdxl.yaml", ["teacher.guidance=cfg", "teacher.num_steps=20"])
    calls = 2 * 20  # CFG: two forwards a step
    forward, peak = 10**12, {"peak_flop_per_s": 1e15, "peak_source": "test"}
    table = capacity.plan(cfg, 1000, flops_per_forward=forward, mfu=0.5, peak=peak)
    teacher, train = calls * forward, (3 + cfg.student.num_steps) * forward
    assert table["teacher_flops_per_sample"] == teacher and table["train_flops_per_sample"] == train
    assert table["implied_teacher_seconds_per_sample"] == pytest.approx(teacher / 5e14)
    assert table["implied_teacher_gpu_hours"] == pytest.approx(1000 * teacher / 5e14 / 3600)
    assert table["implied_train_samples_per_s_per_gpu"] == pytest.approx(5e14 / train)
    trained = cfg.train.max_steps * cfg.train.global_batch_size
    assert table["implied_train_gpu_hours"] == pytest.approx(trained * train / 5e14 / 3600)
    counted_only = capacity.plan(cfg, 1000, flops_per_forward=forward)
    assert counted_only["teacher_flops_per_sample"] == teacher and "implied_teacher_gpu_hours" not in counted_only


def test_command_line_flops_and_utilisation(capsys, monkeypatch):
    sdxl = str(REPO / "configs" / "sdxl.yaml")
    counted = []
    monkeypatch.setattr(flops, "architecture_forward_flops", lambda arch: counted.append(arch) or 2 * 10**12)
    assert capacity.main(["--config", sdxl, "--samples", "1000", "--mfu", "0.4", "--device-name", "H100",
                          "--json"]) == 0
    table = json.loads(capsys.readouterr().out)
    assert counted == ["sdxl"] and table["flops_per_forward"] == 2 * 10**12
    assert table["peak_flop_per_s"] == 989.5e12 and "datasheet" in table["peak_source"]
    assert table["implied_teacher_seconds_per_sample"] == pytest.approx(
        table["teacher_flops_per_sample"] / (0.4 * 989.5e12))
    assert capacity.main(["--config", sdxl, "--mfu", "0.4", "--peak-tflops", "100"]) == 0
    text = capsys.readouterr().out
    assert "at MFU 0.4 of 100 TFLOP/s" in text and "2000 GFLOP (counted: the sdxl denoiser" in text
    for args, message in ((["--mfu", "0.4"], "--mfu needs the device's peak"),
                          (["--mfu", "1.5", "--peak-tflops", "100"], r"--mfu 1.5: a utilisation in \(0, 1\]"),
                          (["--mfu", "0.4", "--device-name", "A10G"], "'A10G' is not in the peaks table"),
                          (["--flops", "--latent-shape", "4,8,8"], "shipped architecture")):
        with pytest.raises(ValueError, match=message):
            capacity.main(["--config", sdxl, *args])

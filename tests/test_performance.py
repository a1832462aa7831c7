"""The speed levers (``performance.*``, noiserefine/performance.py): each leaves outputs (and the refiner's
gradients) unchanged within float tolerance on a tiny digits denoiser, each demonstrably takes effect, and a value
that cannot run is refused naming its key."""

import os
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf

from conftest import REFINER_PROMPTS, refiner_inputs, tiny_digits_backend
from noiserefine.backends.digits import DigitsBackend
from noiserefine.config import load_config
from noiserefine.config_schema import RefinerConfig
from noiserefine.performance import PerformanceConfig
from noiserefine.losses import MSDLoss
from noiserefine.performance import LeverError, apply_levers, refine_in_micro_batches
from noiserefine.refiner import Refiner
from helpers_cache import tiny_cache, tiny_root, tiny_teacher  # noqa: F401  (session fixtures)

pytestmark = pytest.mark.usefixtures("one_thread")


def _levers(**values):
    return OmegaConf.structured(PerformanceConfig(**values))


def _denoise(backend, seed=0):
    """One denoiser call at a mid time on seeded inputs (the call every stage makes)."""
    noise, cond = refiner_inputs(backend)
    with torch.no_grad():
        return backend.denoise(noise, torch.tensor(500.0), cond)


@pytest.fixture(scope="module")
def reference():
    return _denoise(tiny_digits_backend())


def _ops(fn) -> set[str]:
    """The aten ops ``fn`` runs (torch's profiler)."""
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as profile:
        fn()
    return {event.name for event in profile.events()}


def test_levers_off_by_default_change_nothing(reference):
    backend = tiny_digits_backend()
    assert apply_levers(backend, load_config().performance) == {
        "compile": "", "channels_last": False, "sdpa_backend": "", "autocast": "", "refiner_micro_batch": 0}
    assert "forward" not in vars(backend.denoiser)  # no wrapper
    torch.testing.assert_close(_denoise(backend), reference, rtol=0, atol=0)


def test_channels_last_same_outputs(reference):
    backend = tiny_digits_backend()
    weight = backend.denoiser.conv_out.weight  # 8 input channels: the two formats differ
    assert not weight.is_contiguous(memory_format=torch.channels_last)
    apply_levers(backend, _levers(channels_last=True))
    assert backend.denoiser.conv_out.weight.is_contiguous(memory_format=torch.channels_last)
    torch.testing.assert_close(_denoise(backend), reference, rtol=1e-5, atol=1e-5)


def test_sdpa_backend_choice_same_outputs_and_picks_the_kernel(reference):
    math_backend, flash_backend = tiny_digits_backend(), tiny_digits_backend()
    apply_levers(math_backend, _levers(sdpa_backend="math"))
    apply_levers(flash_backend, _levers(sdpa_backend="flash"))
    fused = "aten::_scaled_dot_product_flash_attention_for_cpu"  # torch's CPU flash kernel
    assert fused in _ops(lambda: _denoise(flash_backend)) and fused not in _ops(lambda: _denoise(math_backend))
    torch.testing.assert_close(_denoise(math_backend), reference, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(_denoise(flash_backend), reference, rtol=1e-5, atol=1e-5)


def test_bf16_autocast_close_to_float32_and_to_bf16_weights(reference):
    autocast = tiny_digits_backend()
    apply_levers(autocast, _levers(autocast="bfloat16"))
    out = _denoise(autocast)
    assert out.dtype == torch.float32 and not torch.equal(out, reference)  # it ran in bf16, came back float32
    torch.testing.assert_close(out, reference, rtol=0.05, atol=0.05)
    same = tiny_digits_backend()  # the alternative: bf16 weights (model.dtype=bfloat16)
    weights = DigitsBackend(same.denoiser, same.embedding, same.scheduler_config, dtype=torch.bfloat16)
    torch.testing.assert_close(_denoise(weights), reference, rtol=0.05, atol=0.05)


@pytest.mark.slow  # inductor compiles C++ with gcc: tens of seconds even for this tiny UNet
def test_compile_same_outputs(reference):
    backend = tiny_digits_backend()
    apply_levers(backend, _levers(compile="default"))
    assert backend.denoiser._compiled_call_impl is not None  # nn.Module.compile, in place
    torch.testing.assert_close(_denoise(backend), reference, rtol=1e-4, atol=1e-4)


@pytest.mark.slow  # builds a LoRA refiner and runs it twice with gradients (~2 s here)
def test_refiner_micro_batches_same_loss_and_gradients_less_saved():
    """The refiner in checkpointed chunks of 1 of 4: the MSD loss and the LoRA gradients equal one whole-batch
    forward; the forward keeps only the chunks' inputs for backward."""
    backend = tiny_digits_backend()
    torch.manual_seed(0)
    refiner = Refiner(backend, RefinerConfig(target_modules=["to_v", "conv1"]))
    with torch.no_grad():  # LoRA B is zero at init: give the refiner an output to differentiate
        for p in refiner.trainable_parameters():
            p.normal_(0, 0.05)
    noise, cond = refiner_inputs(backend)
    target = torch.randn(noise.shape, generator=torch.Generator().manual_seed(5))
    loss_fn, results = MSDLoss(backend, 1), {}
    for size in (0, 1):
        saved = []
        with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t.numel()) or t, lambda t: t):
            refined = refine_in_micro_batches(refiner, noise, cond, None, size)
        loss, _ = loss_fn(refined, cond, target)
        grads = torch.autograd.grad(loss, refiner.trainable_parameters())
        results[size] = (loss.detach(), grads, sum(saved))
    torch.testing.assert_close(results[1][0], results[0][0], rtol=1e-6, atol=1e-7)
    chunked, whole = (torch.cat([g.flatten() for g in results[size][1]]) for size in (1, 0))
    assert whole.abs().max() > 1e-3  # sums over the samples in another order: equal up to rounding
    torch.testing.assert_close(chunked, whole, rtol=0, atol=1e-4 * float(whole.abs().max()))
    assert results[1][2] < results[0][2] / 10, (results[1][2], results[0][2])
    assert len(REFINER_PROMPTS) == noise.shape[0] == 4


def test_micro_batches_split_per_sample_guidance_scales():
    calls = []

    def refine(noise, cond, guidance_scale=None):
        calls.append((noise.shape[0], cond["c"].tolist(), guidance_scale.tolist()))
        return noise * guidance_scale[:, None]

    out = refine_in_micro_batches(refine, torch.ones(5, 2), {"c": torch.arange(5)}, torch.arange(5.0), 2)
    assert calls == [(2, [0, 1], [0.0, 1.0]), (2, [2, 3], [2.0, 3.0]), (1, [4], [4.0])]
    torch.testing.assert_close(out, torch.arange(5.0)[:, None].expand(5, 2))


@pytest.mark.parametrize("override, key", [
    ("performance.compile=fastest", "performance.compile"),
    ("performance.compile=reduce-overhead", "performance.compile"),  # CUDA graphs on the CPU
    ("performance.compile=max-autotune", "performance.compile"),
    ("performance.sdpa_backend=efficient", "performance.sdpa_backend"),
    ("performance.sdpa_backend=cudnn", "performance.sdpa_backend"),
    ("performance.sdpa_backend=xformers", "performance.sdpa_backend"),
    ("performance.autocast=float16", "performance.autocast"),
    ("performance.refiner_micro_batch=-2", "performance.refiner_micro_batch"),
])
def test_a_lever_that_cannot_run_is_refused_naming_its_key(override, key):
    with pytest.raises(ValueError, match=f"command line: config key '{key}'"):
        load_config(overrides=[override])


def test_cuda_only_levers_load_for_a_cuda_model_and_autocast_needs_float32_weights():
    cfg = load_config(overrides=["model.device=cuda", "performance.compile=reduce-overhead",
                                 "performance.sdpa_backend=cudnn", "performance.autocast=bfloat16"])
    assert cfg.performance.compile == "reduce-overhead"
    with pytest.raises(ValueError, match="'performance.autocast' is 'bfloat16' but model.dtype is bfloat16"):
        load_config(overrides=["model.dtype=bfloat16", "performance.autocast=bfloat16"])


def test_apply_refuses_cuda_graphs_on_a_cpu_model_and_a_second_application():
    backend = tiny_digits_backend()
    with pytest.raises(LeverError, match="'performance.compile' is 'reduce-overhead'.*runs on cpu") as caught:
        apply_levers(backend, _levers(compile="reduce-overhead"))  # a config validated for a CUDA device
    assert caught.value.key == "performance.compile"
    apply_levers(backend, _levers(channels_last=True))
    with pytest.raises(RuntimeError, match="already applied"):
        apply_levers(backend, _levers(channels_last=True))


@pytest.mark.slow  # trains the tiny teacher, builds the tiny cache, starts two single-rank DeepSpeed trainers
def test_trainer_with_refiner_micro_batches_trains_the_same(tiny_root, tiny_teacher, tiny_cache, tmp_path):
    """trainer/train.py (DeepSpeed, one CPU rank) with performance.refiner_micro_batch=2 of a batch of 8: the same
    per-step losses and gradient norms as without (the engine's forward runs under checkpointing per chunk). The
    final weights are not compared: AdamW turns a rounding-size difference of a near-zero gradient into an lr-size
    step of either sign (seen: one of 1152 weights 3 % apart)."""
    import subprocess
    import sys

    from helpers_cache import REPO, tiny_overrides

    def train(name, *extra):
        out = tmp_path / name
        command = [sys.executable, "trainer/train.py", "--config", "configs/digits.yaml",
                   *tiny_overrides(tiny_root, tiny_teacher), f"train.output_dir={out}", "train.max_steps=4",
                   "train.log_every=1", "train.eval_every=0", "train.checkpoint_every=100", "train.learning_rate=0.01",
                   *extra]
        env = {**os.environ, "OMP_NUM_THREADS": "1", "DS_ACCELERATOR": "cpu", "PYTHONUNBUFFERED": "1"}
        for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT", "LOCAL_SIZE"):
            env.pop(key, None)
        done = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
        assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
        rows = [line.split(",") for line in (out / "train_log.csv").read_text().splitlines()[1:]]
        assert load_config(out / "config.yaml").performance.refiner_micro_batch == (2 if extra else 0)
        return torch.tensor([[float(row[1]), float(row[2])] for row in rows])  # loss, grad_norm per step

    whole = train("whole")
    chunked = train("chunked", "performance.refiner_micro_batch=2")
    assert whole.shape == (4, 2) and bool((whole > 0).all())
    torch.testing.assert_close(chunked, whole, rtol=1e-3, atol=1e-7)


def test_teacher_levers_are_pinned_per_cache_like_the_batch_size(tmp_path):
    """Levers round differently, so a cache's shards must all come from one setting (a retried shard is
    byte-identical): a cache made without levers refuses a run with one, and the reverse. The refiner's
    micro-batch does not touch the teacher, and a cache made before levers existed keeps working."""
    from noiserefine.targets.cache import generation_settings, prepare_cache_dir

    teacher = tmp_path / "teacher"
    teacher.mkdir()
    (teacher / "weights.bin").write_bytes(b"w")
    base = [f"model.path={teacher}", f"data.cache_root={tmp_path / 'cache'}", "pipeline.batch_size=4"]
    digits = Path(__file__).resolve().parents[1] / "configs" / "digits.yaml"
    assert generation_settings(load_config(digits, base)) == {"batch_size": 4}  # what older caches pinned
    cache_dir = prepare_cache_dir(load_config(digits, base))
    assert prepare_cache_dir(load_config(digits, [*base, "performance.refiner_micro_batch=2"])) == cache_dir
    with pytest.raises(ValueError, match=r"generated with \{'batch_size': 4\}.*'channels_last': True"):
        prepare_cache_dir(load_config(digits, [*base, "performance.channels_last=true"]))
    other = [*base[:1], f"data.cache_root={tmp_path / 'other'}", *base[2:], "performance.sdpa_backend=math"]
    prepare_cache_dir(load_config(digits, other))
    with pytest.raises(ValueError, match=r"'performance': \{'sdpa_backend': 'math'\}"):
        prepare_cache_dir(load_config(digits, other[:-1]))

"""GPU code paths, for users who have one (`pytest -m gpu`); excluded from the default run."""

import numpy as np
import pytest
import torch
from diffusers.guiders import ClassifierFreeGuidance

from conftest import tiny_digits_backend
from noiserefine.backends.digits import DigitsBackend
from noiserefine.noise import fingerprint, noise_from_seeds
from noiserefine.sampling import rollout

pytestmark = pytest.mark.gpu


@pytest.fixture
def cuda():
    if not torch.cuda.is_available():
        pytest.fail("the gpu marker was selected but no CUDA device is visible")
    return torch.device("cuda")


def test_noise_on_cuda_equals_cpu_noise(cuda):
    seeds = [3, 5, 7]
    on_gpu = noise_from_seeds(seeds, (4, 8, 8), device=cuda)
    on_cpu = noise_from_seeds(seeds, (4, 8, 8))
    assert torch.equal(on_gpu.cpu(), on_cpu)
    assert fingerprint(on_gpu[0]) == fingerprint(on_cpu[0])


def test_bf16_guided_rollout_close_to_fp32(cuda):
    base = tiny_digits_backend()
    fp32 = DigitsBackend(base.denoiser, base.embedding, base.scheduler_config, device=cuda)
    bf16 = DigitsBackend(tiny_digits_backend().denoiser, base.embedding, base.scheduler_config, device=cuda,
                         dtype=torch.bfloat16)
    noise = noise_from_seeds(range(4), fp32.latent_shape)
    prompts = ["seven", "three", "a cat", "one"]
    with torch.no_grad():
        a = rollout(fp32, noise.to(cuda), fp32.encode_prompts(prompts), 5, ClassifierFreeGuidance(guidance_scale=3.0))
        b = rollout(bf16, noise.to(cuda, torch.bfloat16), bf16.encode_prompts(prompts), 5, ClassifierFreeGuidance(guidance_scale=3.0))
    # relative: the tiny random model's outputs are large (mean |x0| ~14); bf16 carries ~3 significant
    # digits per op, compounded over 5 CFG steps (measured on CPU: 2.1-2.3%, on an H200: mean abs 0.33)
    assert (a - b.float()).norm() / a.norm() < 0.05


def cuda_bf16_digits() -> DigitsBackend:
    base = tiny_digits_backend()
    return DigitsBackend(base.denoiser, base.embedding, base.scheduler_config, device="cuda", dtype=torch.bfloat16)


def test_refiner_identity_at_init_and_msd_step_on_cuda_bf16(cuda):
    """x̂_T == x_T bit for bit at init on CUDA in bf16, and one MSD step reaches the LoRA only (float32 noise in)."""
    from noiserefine.config import load_config
    from noiserefine.config_schema import RefinerConfig
    from noiserefine.losses import build_loss
    from noiserefine.refiner import Refiner

    backend = cuda_bf16_digits()
    refiner = Refiner(backend, RefinerConfig(lora_rank=4, lora_alpha=4.0))
    prompts = ["seven", "three", "a cat", "one"]
    noise = noise_from_seeds(range(4), backend.latent_shape, device=cuda)  # float32, as the trainer feeds it
    cond = backend.encode_prompts(prompts)
    refined = refiner(noise, cond)
    assert refined.dtype == torch.float32 and torch.equal(refined.detach(), noise)
    target = torch.randn(noise.shape, generator=torch.Generator().manual_seed(1)).to(cuda, torch.float16)
    loss, x0 = build_loss(load_config(overrides=["student.num_steps=3"]), backend)(refined, cond, target)
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(x0).all()
    lora = refiner.trainable_parameters()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in lora)
    assert any(p.grad.abs().sum() > 0 for p in lora)
    assert all(p.grad is None for p in backend.denoiser.parameters() if not p.requires_grad)


def test_cfg_pag_shard_samples_deterministic_on_cuda(cuda):
    """Stage 1 on CUDA: a re-generated shard has the same bytes; fingerprints are the CPU noise's; PAG is undone."""
    from noiserefine.noise import noise_from_seeds as cpu_noise
    from noiserefine.guidance import PipelinePAG
    from noiserefine.targets.generate import shard_samples
    from noiserefine.targets.plan import PlannedSample

    backend = cuda_bf16_digits()
    processors = {name: type(m.processor) for name, m in backend.pag_attention_modules(["mid"]).items()}
    samples = [PlannedSample(i, 100 + i, p, "test") for i, p in enumerate(["seven", "two", "a dog", "nine", "0"])]

    def generate():
        pag = PipelinePAG(guidance_scale=3.0, perturbed_guidance_scale=3.0, pag_layers=["mid"])
        return list(shard_samples(backend, samples, guidance=pag, num_steps=4,
                                  teacher_key="k", batch_size=2, target_dtype="float16"))

    one, two = generate(), generate()
    for a, b, sample in zip(one, two, samples):
        assert a.arrays["target"].tobytes() == b.arrays["target"].tobytes()
        assert a.meta["noise_fingerprint"] == fingerprint(cpu_noise([sample.seed], backend.latent_shape)[0])
        assert np.isfinite(a.arrays["target"]).all()
    assert {name: type(m.processor) for name, m in backend.pag_attention_modules(["mid"]).items()} == processors

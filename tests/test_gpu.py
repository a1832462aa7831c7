"""GPU code paths, for users who have one (`pytest -m gpu`); excluded from the default run."""

import pytest
import torch

from conftest import tiny_digits_backend
from noiserefine.backends.digits import DigitsBackend
from noiserefine.noise import fingerprint, noise_from_seeds
from noiserefine.sampling import Guidance, rollout

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
        a = rollout(fp32, noise.to(cuda), fp32.encode_prompts(prompts), 5, Guidance("cfg", 3.0))
        b = rollout(bf16, noise.to(cuda, torch.bfloat16), bf16.encode_prompts(prompts), 5, Guidance("cfg", 3.0))
    assert (a - b.float()).abs().mean() < 0.1

import subprocess
import sys

import pytest
import torch

from noiserefine.noise import fingerprint, noise_from_seed, noise_from_seeds, sample_seed

SHAPE = (4, 8, 8)


def test_same_seed_same_noise_whatever_the_batch():
    seeds = [sample_seed(0, i) for i in range(7)]
    whole = noise_from_seeds(seeds, SHAPE)
    for i, seed in enumerate(seeds):
        assert torch.equal(whole[i], noise_from_seeds([seed], SHAPE)[0])
    shuffled = noise_from_seeds(seeds[::-1], SHAPE)
    assert torch.equal(shuffled.flip(0), whole)
    # global RNG state must not matter
    torch.manual_seed(123)
    assert torch.equal(noise_from_seeds(seeds[2:4], SHAPE), whole[2:4])


@pytest.mark.slow  # >= 1 s on an idle 2-core machine: `make test` only, not the fast lane
def test_same_noise_in_a_fresh_process():
    seed = sample_seed(5, 42)
    code = ("from noiserefine.noise import noise_from_seed, fingerprint; "
            f"print(fingerprint(noise_from_seed({seed}, {SHAPE})))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == fingerprint(noise_from_seed(seed, SHAPE))


def test_cast_happens_after_drawing():
    seed = sample_seed(0, 1)
    half = noise_from_seeds([seed], SHAPE, dtype=torch.bfloat16)[0]
    assert half.dtype == torch.bfloat16
    assert torch.equal(half, noise_from_seed(seed, SHAPE).to(torch.bfloat16))


def test_fingerprint_changes_when_one_value_changes():
    noise = noise_from_seed(7, SHAPE)
    changed = noise.clone()
    changed[1, 2, 3] = torch.nextafter(changed[1, 2, 3], torch.tensor(10.0))
    assert fingerprint(noise) != fingerprint(changed)
    assert fingerprint(noise) == fingerprint(noise.clone())
    assert len(fingerprint(noise)) == 16


def test_seeds_differ_by_sample_and_base():
    seeds = {sample_seed(0, i) for i in range(1000)} | {sample_seed(1, i) for i in range(1000)}
    assert len(seeds) == 2000
    assert sample_seed(3, 9) == sample_seed(3, 9)
    with pytest.raises(ValueError, match="-1"):
        sample_seed(0, -1)
    with pytest.raises(ValueError, match="seed"):
        noise_from_seed(-5, SHAPE)

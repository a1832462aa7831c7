import pytest
import torch

from conftest import tiny_digits_backend
from noiserefine.config_schema import RefinerConfig
from noiserefine.inversion import ddim_invert, inverse_scheduler
from noiserefine.config import load_config
from noiserefine.losses import FullGradientLoss, MSDLoss, NoiseSpaceLoss, build_loss
from noiserefine.noise import noise_from_seeds
from noiserefine.refiner import Refiner
from noiserefine.sampling import make_scheduler, rollout, rollout_gain

PROMPTS = ["a handwritten seven", "digit 3", "a cat", "nine"]


def _inputs(backend, seed=0):
    noise = noise_from_seeds(range(seed, seed + len(PROMPTS)), backend.latent_shape)
    target = torch.randn(noise.shape, generator=torch.Generator().manual_seed(seed + 100))
    return noise, backend.encode_prompts(PROMPTS), target


def _input_independent(backend):
    """A denoiser output depending on t and cond only: every sampler step is exactly affine in x."""
    fixed = torch.randn((len(PROMPTS), *backend.latent_shape), generator=torch.Generator().manual_seed(7))

    def denoise(x, t, cond):
        return fixed * (1 + t / 1000) + cond["encoder_hidden_states"].mean(dim=(1, 2))[:, None, None, None]

    return denoise


def _grad(loss_class, backend, noise, cond, target, num_steps, **options):
    refined = noise.clone().requires_grad_(True)
    loss, x0 = loss_class(backend, num_steps, **options)(refined, cond, target)
    loss.backward()
    return refined.grad, loss, x0


def test_msd_gradient_is_gain_times_output_gradient(tiny_backend):
    noise, cond, target = _inputs(tiny_backend)
    num_steps = 5
    gain = rollout_gain(tiny_backend, num_steps)
    assert abs(gain - 1) > 0.5  # a gain of 1 would make the check below weak
    grad, loss, x0 = _grad(MSDLoss, tiny_backend, noise, cond, target.half(), num_steps)
    assert MSDLoss(tiny_backend, num_steps).gain == gain
    assert loss.dtype == torch.float32
    with torch.no_grad():
        torch.testing.assert_close(x0, rollout(tiny_backend, noise, cond, num_steps), rtol=1e-5, atol=1e-5)
    expected = gain * 2 * (x0.detach() - target.half().float()) / x0.numel()
    torch.testing.assert_close(grad, expected, rtol=1e-5, atol=1e-9)


def test_msd_equals_full_gradient_for_input_independent_denoiser(tiny_backend, monkeypatch):
    noise, cond, target = _inputs(tiny_backend)
    real_msd, _, _ = _grad(MSDLoss, tiny_backend, noise, cond, target, 6)
    real_full, _, _ = _grad(FullGradientLoss, tiny_backend, noise, cond, target, 6)
    # for the real network the Jacobian of the rollout is not K * I, so the two differ
    assert (real_msd - real_full).abs().max() > 1e-2 * real_full.abs().max()

    monkeypatch.setattr(tiny_backend, "denoise", _input_independent(tiny_backend))
    msd, _, _ = _grad(MSDLoss, tiny_backend, noise, cond, target, 6)
    full, _, _ = _grad(FullGradientLoss, tiny_backend, noise, cond, target, 6)
    torch.testing.assert_close(msd, full, rtol=1e-4, atol=1e-9)


def _saved_bytes(fn) -> int:
    total = 0

    def pack(tensor):
        nonlocal total
        total += tensor.numel() * tensor.element_size()
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        fn()
    return total


def _train_step_bytes(loss_name, num_steps):
    backend = tiny_digits_backend()
    refiner = Refiner(backend, RefinerConfig())
    noise, cond, target = _inputs(backend)
    loss_fn = build_loss(load_config(overrides=[f"train.loss={loss_name}", f"student.num_steps={num_steps}"]), backend)

    def step():
        refined = refiner(noise, cond)
        loss, _ = loss_fn(refined, cond, target)
        loss.backward()

    return _saved_bytes(step)


@pytest.mark.slow  # >= 1 s on an idle 2-core machine: `make test` only, not the fast lane
def test_msd_memory_does_not_grow_with_steps():
    msd = {n: _train_step_bytes("msd", n) for n in (2, 20)}
    full = {n: _train_step_bytes("full_gradient", n) for n in (2, 20)}
    print(f"saved-tensor bytes: msd {msd}, full_gradient {full}")
    assert msd[2] > 0
    assert msd[20] / msd[2] < 1.2
    assert full[20] / full[2] > 3


def test_checkpointed_full_gradient_matches(tiny_backend):
    noise, cond, target = _inputs(tiny_backend)
    plain, loss_plain, _ = _grad(FullGradientLoss, tiny_backend, noise, cond, target, 4)
    checkpointed, loss_checkpointed, _ = _grad(FullGradientLoss, tiny_backend, noise, cond, target, 4,
                                               checkpoint_steps=True)
    assert plain.abs().max() > 0
    torch.testing.assert_close(loss_checkpointed, loss_plain)
    torch.testing.assert_close(checkpointed, plain, rtol=1e-5, atol=1e-9)


def test_noise_space_loss_is_zero_at_the_inverted_target(tiny_backend):
    noise, cond, target = _inputs(tiny_backend)
    inverted = ddim_invert(tiny_backend, target, cond, 5)
    loss, x0 = NoiseSpaceLoss(tiny_backend, 5)(inverted.clone().requires_grad_(True), cond, target.half())
    assert x0 is None and loss.item() < 1e-6
    grad, loss_noise, _ = _grad(NoiseSpaceLoss, tiny_backend, noise, cond, target, 5)
    assert loss_noise.item() > 0.1
    torch.testing.assert_close(grad, 2 * (noise - inverted) / noise.numel())


@pytest.mark.parametrize("overrides", [{}, {"timestep_spacing": "leading", "steps_offset": 1,
                                            "set_alpha_to_one": False}])
@pytest.mark.parametrize("num_steps", [1, 3, 10])
def test_ddim_invert_is_exact_for_input_independent_denoiser(monkeypatch, overrides, num_steps):
    backend = tiny_digits_backend(scheduler_overrides=overrides)
    forward = make_scheduler(backend, num_steps).timesteps
    assert torch.equal(inverse_scheduler(backend, num_steps).timesteps, forward.flip(0))
    noise, cond, _ = _inputs(backend)
    monkeypatch.setattr(backend, "denoise", _input_independent(backend))
    x0 = rollout(backend, noise, cond, num_steps)
    assert (x0 - noise).abs().max() > 1e-2  # the rollout moved: inverting it is not trivial
    torch.testing.assert_close(ddim_invert(backend, x0, cond, num_steps), noise, rtol=1e-4, atol=1e-4)


def test_ddim_invert_is_approximate_for_smooth_denoiser(tiny_backend, monkeypatch):
    noise, cond, _ = _inputs(tiny_backend)
    offset = _input_independent(tiny_backend)
    monkeypatch.setattr(tiny_backend, "denoise", lambda x, t, c: 0.1 * x + offset(x, t, c))

    def error(num_steps):
        x0 = rollout(tiny_backend, noise, cond, num_steps)
        return (ddim_invert(tiny_backend, x0, cond, num_steps) - noise).abs().max().item()

    coarse, fine = error(5), error(50)
    assert coarse > 0.1  # the approximation is visible: the check is not vacuous
    assert fine < coarse / 5  # first order in the step size (measured: 1.7 -> 0.15)


def test_inversion_refuses_linspace_spacing():
    backend = tiny_digits_backend(scheduler_overrides={"timestep_spacing": "linspace"})
    with pytest.raises(ValueError, match="linspace"):
        inverse_scheduler(backend, 5)


@pytest.mark.parametrize("name, loss_class", [("msd", MSDLoss), ("full_gradient", FullGradientLoss),
                                              ("noise_space", NoiseSpaceLoss)])
def test_build_loss_holds_the_configured_options(tiny_backend, name, loss_class):
    cfg = load_config(overrides=[f"train.loss={name}", "student.num_steps=3", "train.gradient_checkpointing=true"])
    loss_fn = build_loss(cfg, tiny_backend)
    assert type(loss_fn) is loss_class and loss_fn.num_steps == 3
    if name == "full_gradient":
        assert loss_fn.checkpoint_steps is True
    noise, cond, target = _inputs(tiny_backend)
    with torch.no_grad():
        built, _ = loss_fn(noise, cond, target)
        direct, _ = loss_class(tiny_backend, 3)(noise, cond, target)
    assert torch.equal(built, direct)


def test_noise_space_loss_inverts_each_sample_once(tiny_backend):
    noise, cond, target = _inputs(tiny_backend)
    calls = []
    denoise = tiny_backend.denoise
    tiny_backend.denoise = lambda x, t, c: calls.append(x.shape[0]) or denoise(x, t, c)
    loss_fn = NoiseSpaceLoss(tiny_backend, 5)
    first, _ = loss_fn(noise, cond, target)
    assert calls == [noise.shape[0]] * 5
    again, _ = loss_fn(noise, cond, target)  # the next epoch: nothing inverted again, the same loss
    assert len(calls) == 5 and torch.equal(again, first)
    torch.testing.assert_close(first, torch.nn.functional.mse_loss(noise, ddim_invert(tiny_backend, target, cond, 5)))
    del calls[5:]
    # one new sample (another prompt for the same target is another sample): only it is inverted
    other = {k: v.flip(0) for k, v in cond.items()}
    mixed = {k: torch.cat([cond[k][:1], other[k][:1]]) for k in cond}
    loss_fn(noise[:2], mixed, target[[0, 0]])
    assert calls[5:] == [1] * 5
    # a full memo keeps what it holds and inverts the rest each time
    small = NoiseSpaceLoss(tiny_backend, 5, memo_bytes=target[0].float().nbytes)
    small(noise, cond, target)
    small(noise, cond, target)
    assert len(small.memo) == 1 and calls[-5:] == [noise.shape[0] - 1] * 5

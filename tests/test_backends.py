"""Real model families (SD 1.x/2.x, SDXL, DiT/SiT) on tiny random models saved in the diffusers layout.

Every model is written with ``save_pretrained`` into a temporary directory and
loaded back through ``load_backend(load_config(...).model)``, with the network
blocked: any socket connection or DNS lookup fails the test that caused it.
"""

from __future__ import annotations

import socket

import pytest
import torch
from diffusers import DDIMScheduler, FlowMatchEulerDiscreteScheduler
from diffusers.guiders import ClassifierFreeGuidance
from diffusers.models.attention_processor import Attention

from noiserefine.backends import load_backend
from noiserefine.backends.sdxl import SDXLBackend
from noiserefine.backends.sit import SiTBackend, prompt_label
from noiserefine.backends.stable_diffusion import StableDiffusionBackend
from noiserefine.config import load_config
from noiserefine.guidance import PipelinePAG
from noiserefine.sampling import guided_output, make_scheduler, rollout
from tiny_models import IMAGE_SIZE, LATENT_SIZE, build_tiny_dit, build_tiny_sd, build_tiny_sdxl

CFG = ClassifierFreeGuidance(guidance_scale=3.0)
PAG = PipelinePAG(guidance_scale=3.0, perturbed_guidance_scale=3.0, pag_layers=["mid"])
NUM_STEPS = 3
_network_attempts: list[str] = []


def _blocked(*args, **kwargs):
    _network_attempts.append(repr(args[:2]))
    raise OSError("network access attempted in an offline test")


@pytest.fixture(scope="module", autouse=True)
def offline():
    """HF offline mode plus a socket guard that records every connection or DNS lookup attempt."""
    import huggingface_hub.constants

    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("HF_HUB_OFFLINE", "1")
        patch.setenv("TRANSFORMERS_OFFLINE", "1")
        patch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
        for name in ("connect", "connect_ex"):
            patch.setattr(socket.socket, name, _blocked)
        patch.setattr(socket, "create_connection", _blocked)
        patch.setattr(socket, "getaddrinfo", _blocked)
        yield


@pytest.fixture(autouse=True)
def no_network_attempts(offline):
    _network_attempts.clear()
    yield
    assert not _network_attempts, f"tried the network: {_network_attempts}"


@pytest.fixture(scope="module")
def dirs(tmp_path_factory, offline):
    root = tmp_path_factory.mktemp("models")
    return {
        "sd": build_tiny_sd(root / "sd"),
        "sd_v": build_tiny_sd(root / "sd_v", prediction_type="v_prediction", scheduler="ddim"),
        "sdxl": build_tiny_sdxl(root / "sdxl"),
        "dit": build_tiny_dit(root / "dit", id2label={"0": "tench, Tinca tinca", "1": "goldfish"}),
        "sit": build_tiny_dit(root / "sit", flow=True),
    }


def load(backend: str, path, *overrides: str):
    cfg = load_config(overrides=[f"model.backend={backend}", f"model.path={path}", *overrides])
    return load_backend(cfg.model)


@pytest.fixture(scope="module")
def sd(dirs):
    return load("stable_diffusion", dirs["sd"])


@pytest.fixture(scope="module")
def sdxl(dirs):
    return load("sdxl", dirs["sdxl"])


@pytest.fixture(scope="module")
def dit(dirs):
    return load("sit", dirs["dit"])


@pytest.fixture(scope="module")
def sit(dirs):
    return load("sit", dirs["sit"])


def noise(backend, batch=2, seed=0):
    return torch.randn(batch, *backend.latent_shape, generator=torch.Generator().manual_seed(seed))


def check_rollouts_and_decode(backend, prompts):
    cond = backend.encode_prompts(prompts)
    x_t = noise(backend, len(prompts))
    guided = rollout(backend, x_t, cond, NUM_STEPS, CFG)
    unguided = rollout(backend, x_t, cond, NUM_STEPS)
    assert torch.isfinite(guided).all() and guided.shape == x_t.shape
    assert (guided - unguided).abs().max() > 1e-3
    images = backend.decode(guided)
    assert images.shape == (len(prompts), 3, IMAGE_SIZE, IMAGE_SIZE) and images.dtype == torch.float32
    assert images.min() >= 0 and images.max() <= 1 and images.std() > 0
    return guided


def attention_processors(backend):
    return {name: m.processor for name, m in backend.denoiser.named_modules() if isinstance(m, Attention)}


def check_pag(backend, prompts):
    before = attention_processors(backend)
    modules = backend.pag_attention_modules(("mid",))
    assert modules and all(name.startswith("mid_block.") for name in modules)
    cond = backend.encode_prompts(prompts)
    x_t = noise(backend, len(prompts))
    with_pag = rollout(backend, x_t, cond, NUM_STEPS, PAG)
    after = attention_processors(backend)
    assert after.keys() == before.keys() and all(after[k] is before[k] for k in before)
    assert (with_pag - rollout(backend, x_t, cond, NUM_STEPS, CFG)).abs().max() > 1e-3


# --- Stable Diffusion 1.x / 2.x -------------------------------------------------------------------------

def test_sd_loads_components_and_ddim_config(sd):
    assert isinstance(sd, StableDiffusionBackend) and sd.name == "stable_diffusion"
    assert sd.latent_shape == (4, LATENT_SIZE, LATENT_SIZE)
    assert sd.scheduler_class is DDIMScheduler
    config = sd.scheduler_config  # from the model's PNDM config (SD 1.5 style)
    assert config["prediction_type"] == "epsilon" and config["clip_sample"] is False
    assert config["steps_offset"] == 1 and config["timestep_spacing"] == "leading"
    assert config["set_alpha_to_one"] is False and config["beta_schedule"] == "scaled_linear"
    assert make_scheduler(sd, 4).timesteps.tolist() == [751, 501, 251, 1]
    assert not any(p.requires_grad for m in (sd.denoiser, sd.vae, sd.text_encoder) for p in m.parameters())


def test_sd_prompt_and_null_conditioning(sd):
    cond = sd.encode_prompts(["a red cat", "the blue dog", "a red cat"])
    hidden = cond["encoder_hidden_states"]
    assert set(cond) == {"encoder_hidden_states"} and hidden.shape == (3, 77, 32)
    assert (hidden[0] - hidden[1]).abs().max() > 1e-3
    torch.testing.assert_close(hidden[0], hidden[2])
    null = sd.null_conditioning(2)["encoder_hidden_states"]
    assert null.shape == (2, 77, 32)
    torch.testing.assert_close(null, sd.encode_prompts(["", ""])["encoder_hidden_states"])
    assert (null[0] - hidden[0]).abs().max() > 1e-3
    with pytest.raises(ValueError, match="non-empty"):
        sd.encode_prompts([])


def test_sd_cfg_rollout_differs_and_decodes(sd):
    check_rollouts_and_decode(sd, ["a red cat", "the blue dog"])


def test_sd_pag_rollout_restores_processors(sd):
    check_pag(sd, ["a red cat", "the blue dog"])


def test_sd_v_prediction_config(dirs, sd):
    sd_v = load("stable_diffusion", dirs["sd_v"])
    config = sd_v.scheduler_config  # the file says clip_sample: true; the backend must switch it off
    assert config["prediction_type"] == "v_prediction" and config["clip_sample"] is False
    assert make_scheduler(sd_v, 2).config.prediction_type == "v_prediction"
    prompts = ["a red cat", "the blue dog"]
    guided = check_rollouts_and_decode(sd_v, prompts)
    # Same weights (same seed) read as epsilon give another sample: the prediction type is honoured.
    assert (guided - rollout(sd, noise(sd), sd.encode_prompts(prompts), NUM_STEPS, CFG)).abs().max() > 1e-3


def test_sd_keeps_trailing_timestep_spacing(tmp_path):
    directory = build_tiny_sd(tmp_path / "turbo", scheduler="euler")  # SD-Turbo style Euler + trailing
    backend = load("stable_diffusion", directory)
    assert backend.scheduler_config["timestep_spacing"] == "trailing"
    assert make_scheduler(backend, 1).timesteps.tolist() == [999]


# --- SDXL -------------------------------------------------------------------------------------------------

def test_sdxl_conditioning_and_time_ids(sdxl):
    assert isinstance(sdxl, SDXLBackend) and sdxl.latent_shape == (4, LATENT_SIZE, LATENT_SIZE)
    cond = sdxl.encode_prompts(["a red cat", "the blue dog"])
    assert set(cond) == {"encoder_hidden_states", "text_embeds", "time_ids"}
    assert cond["encoder_hidden_states"].shape == (2, 77, 64)  # 32 + 32 penultimate features
    assert cond["text_embeds"].shape == (2, 32)
    expected_ids = torch.tensor([IMAGE_SIZE, IMAGE_SIZE, 0, 0, IMAGE_SIZE, IMAGE_SIZE], dtype=torch.float32)
    torch.testing.assert_close(cond["time_ids"], expected_ids.expand(2, 6))
    for key in ("encoder_hidden_states", "text_embeds"):
        assert (cond[key][0] - cond[key][1]).abs().max() > 1e-3
    # The second half of the features is encoder 2's penultimate layer.
    tokens = sdxl.tokenize(sdxl.tokenizer_2, ["a red cat"])
    penultimate = sdxl.text_encoder_2(tokens.input_ids, output_hidden_states=True).hidden_states[-2]
    torch.testing.assert_close(cond["encoder_hidden_states"][:1, :, 32:], penultimate)
    null = sdxl.null_conditioning(3)  # force_zeros_for_empty_prompt (the pipeline default)
    assert null["encoder_hidden_states"].shape == (3, 77, 64) and not null["encoder_hidden_states"].any()
    assert null["text_embeds"].shape == (3, 32) and not null["text_embeds"].any()
    torch.testing.assert_close(null["time_ids"], expected_ids.expand(3, 6))
    assert sdxl.vae.dtype == torch.float32


def test_sdxl_null_is_empty_prompt_without_force_zeros(tmp_path):
    backend = load("sdxl", build_tiny_sdxl(tmp_path / "sdxl", force_zeros_for_empty_prompt=False))
    null = backend.null_conditioning(1)
    assert null["text_embeds"].abs().max() > 1e-3
    torch.testing.assert_close(null["encoder_hidden_states"], backend.encode_prompts([""])["encoder_hidden_states"])


def test_sdxl_rollouts_pag_and_decode(sdxl):
    check_rollouts_and_decode(sdxl, ["a red cat", "the blue dog"])
    check_pag(sdxl, ["a red cat", "the blue dog"])


def test_sdxl_bfloat16_upcasts_vae(dirs):
    backend = load("sdxl", dirs["sdxl"], "model.dtype=bfloat16")
    assert backend.denoiser.dtype == torch.bfloat16 and backend.vae.dtype == torch.float32
    cond = backend.encode_prompts(["a red cat"])
    assert cond["encoder_hidden_states"].dtype == torch.bfloat16
    latents = rollout(backend, noise(backend, 1), cond, 1)
    images = backend.decode(latents.to(torch.bfloat16))
    assert images.dtype == torch.float32 and images.shape == (1, 3, IMAGE_SIZE, IMAGE_SIZE)


# --- DiT / SiT ----------------------------------------------------------------------------------------------

def test_prompt_label_rule():
    names = {"goldfish": 1, "tench": 0}
    assert prompt_label("207", 1000) == 207
    assert prompt_label(" 3 ", 10) == 3
    assert prompt_label("a photo of class 207", 1000) == 207
    assert prompt_label("Label: 5", 10) == 5
    assert prompt_label("Goldfish", 10, names) == 1
    assert prompt_label("a goldfish in a bowl", 10, names) == 10  # names must match exactly
    assert prompt_label("12", 10) == 10  # out of range -> null class
    assert prompt_label("a photo of 3 dogs", 10) == 10  # a bare number inside text is not a label


def test_dit_labels_shapes_and_rollouts(dit):
    assert isinstance(dit, SiTBackend) and not dit.flow
    assert dit.scheduler_class is DDIMScheduler and dit.guided_channels is None
    assert dit.latent_shape == (4, LATENT_SIZE, LATENT_SIZE) and dit.num_classes == 10
    labels = dit.encode_prompts(["3", "class 7", "goldfish", "tench", "a cat", "12"])["class_labels"]
    assert labels.tolist() == [3, 7, 1, 0, 10, 10]
    assert dit.null_conditioning(2)["class_labels"].tolist() == [10, 10]
    out = dit.denoise(noise(dit), torch.tensor(500), dit.encode_prompts(["3", "7"]))
    assert out.shape == (2, *dit.latent_shape)  # learned sigma (8 channels) cut to 4
    check_rollouts_and_decode(dit, ["3", "7"])


def fake_transformer(backend, monkeypatch, velocity):
    """Replace the transformer's forward by ``velocity(x, timestep)`` (2C channels), recording timesteps."""
    seen = []

    def forward(hidden_states, timestep=None, class_labels=None, return_dict=True, **kwargs):
        seen.append(timestep.clone())
        out = velocity(hidden_states, timestep)
        return (torch.cat([out, torch.full_like(out, 123.0)], dim=1),)

    monkeypatch.setattr(backend.denoiser, "forward", forward)
    return seen


def test_sit_time_and_velocity_conversion(sit, monkeypatch):
    assert sit.flow and sit.scheduler_class is FlowMatchEulerDiscreteScheduler and sit.guided_channels == 3
    known = torch.randn(2, *sit.latent_shape, generator=torch.Generator().manual_seed(1))
    seen = fake_transformer(sit, monkeypatch, lambda x, t: known)
    cond = sit.encode_prompts(["3", "7"])
    out = sit.denoise(noise(sit), torch.tensor(250.0), cond)  # diffusers sigma 0.25 -> SiT t 0.75
    torch.testing.assert_close(seen[-1], torch.full((2,), 0.75))
    torch.testing.assert_close(out, -known)
    # SiT's exact velocity toward a fixed x1 on its linear path x_t = t x1 + (1 - t) x0 is (x1 - x_t) / (1 - t):
    # a diffusers Euler rollout through the conversion must land on x1 for any number of steps.
    target = torch.randn(2, *sit.latent_shape, generator=torch.Generator().manual_seed(2))
    seen = fake_transformer(sit, monkeypatch, lambda x, t: (target - x) / (1 - t).view(-1, 1, 1, 1))
    torch.testing.assert_close(rollout(sit, noise(sit), cond, 4), target, rtol=1e-4, atol=1e-4)
    assert seen[0].tolist() == [0.0, 0.0] and all(0 <= float(t[0]) < 1 for t in seen)
    assert [float(t[0]) for t in seen] == sorted(float(t[0]) for t in seen)  # SiT time runs noise -> data


def test_dit_passes_timesteps_and_keeps_sign(dit, monkeypatch):
    known = torch.randn(2, *dit.latent_shape, generator=torch.Generator().manual_seed(1))
    seen = fake_transformer(dit, monkeypatch, lambda x, t: known)
    out = dit.denoise(noise(dit), torch.tensor(981), dit.encode_prompts(["3", "7"]))
    assert seen[-1].tolist() == [981, 981]
    torch.testing.assert_close(out, known)


def test_sit_guides_first_three_channels(sit):
    cond, null = sit.encode_prompts(["3", "7"]), sit.null_conditioning(2)
    x_t, t = noise(sit), torch.tensor(600.0)
    CFG.set_state(step=0, num_inference_steps=1, timestep=t)
    guided = guided_output(sit, CFG, x_t, t, cond, null)
    conditional, unconditional = sit.denoise(x_t, t, cond), sit.denoise(x_t, t, null)
    torch.testing.assert_close(guided[:, 3:], conditional[:, 3:])
    torch.testing.assert_close(guided[:, :3], unconditional[:, :3] + 3.0 * (conditional - unconditional)[:, :3])
    assert (guided[:, :3] - conditional[:, :3]).abs().max() > 1e-3
    check_rollouts_and_decode(sit, ["3", "7"])


@pytest.mark.parametrize("backend,key,prompts", [("stable_diffusion", "sd", ["a red cat", "the blue dog"]),
                                                  ("sdxl", "sdxl", ["a red cat", "the blue dog"]),
                                                  ("sit", "dit", ["3", "7"]), ("sit", "sit", ["3", "7"])])
def test_refiner_lora_attaches_to_every_denoiser(dirs, backend, key, prompts):
    """The refiner's LoRA (PEFT ``add_adapter``) fits each denoiser: zero correction at init, gradients reach it."""
    from noiserefine.refiner import Refiner

    model = load(backend, dirs[key])  # a fresh backend: the refiner adds an adapter to its denoiser
    refiner = Refiner(model, load_config().refiner)
    x_t, cond = noise(model), model.encode_prompts(prompts)
    torch.testing.assert_close(refiner(x_t, cond), x_t, rtol=0, atol=0)
    with torch.no_grad():
        for parameter in refiner.trainable_parameters():
            parameter.add_(0.05 * torch.randn_like(parameter))
    refined = refiner(x_t, cond)
    refined.pow(2).sum().backward()
    assert (refined - x_t).abs().max() > 1e-4
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in refiner.trainable_parameters())


# --- loading errors and offline behaviour ------------------------------------------------------------------

@pytest.mark.parametrize("backend", ["stable_diffusion", "sdxl", "sit"])
def test_missing_or_incomplete_directory_is_named(backend, tmp_path):
    missing = tmp_path / "no-such-model"
    with pytest.raises(FileNotFoundError, match="no-such-model"):
        load(backend, missing)
    with pytest.raises(FileNotFoundError, match="not a complete diffusers pipeline.*(unet|transformer)"):
        load(backend, tmp_path)
    with pytest.raises(FileNotFoundError, match="some-org/uncached-model"):  # a model id not in the cache
        load(backend, "some-org/uncached-model")


def test_sd_directory_is_not_sdxl(dirs):
    with pytest.raises(FileNotFoundError, match="text_encoder_2"):
        load("sdxl", dirs["sd"])


def test_float16_on_cpu_is_refused(dirs):
    with pytest.raises(ValueError, match="float16"):
        load("stable_diffusion", dirs["sd"], "model.dtype=float16")


def test_network_guard_is_active():
    with pytest.raises(OSError, match="network access"):
        socket.create_connection(("huggingface.co", 443), timeout=1)
    assert _network_attempts
    _network_attempts.clear()

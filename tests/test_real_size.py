"""Real-size architectures with random weights (``model.init=random``): sizes, the built-in tokenizer, loading.

Parameter counts are taken on the ``meta`` device (structure only, no memory),
so every published size is checked in the default suite in seconds. The one
real-size build on the CPU (SD 2.1, ~5 GB in float32: a denoise, a teacher step and
an MSD step) is marked ``slow``.
"""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from diffusers.guiders import ClassifierFreeGuidance
from transformers import CLIPTextConfig

from noiserefine.backends import load_backend
from noiserefine.backends.registry import family_names
from noiserefine.backends.random_init import (ARCHITECTURES_DIR, RANDOM_WEIGHTS, RandomWeightsWarning,
                                              architecture_names, build_components, build_model,
                                              builtin_clip_tokenizer, check_tokenizer_fits, count_parameters,
                                              read_architecture)
from noiserefine.config import load_config
from noiserefine.config_checks import _CHOICES
from noiserefine.sampling import guided_output

ARCH_CONFIGS = Path(__file__).resolve().parents[1] / "configs"

# Published parameter counts (diffusers/transformers checkpoints of each model).
PUBLISHED = {
    ("sd15", "unet"): 859_520_964,
    ("sd21", "unet"): 865_910_724,
    ("sd21_768", "unet"): 865_910_724,
    ("sdxl", "unet"): 2_567_463_684,
    ("sd15", "text_encoder"): 123_060_480,  # CLIP ViT-L/14 text tower
    ("sdxl", "text_encoder"): 123_060_480,
    ("sd21", "text_encoder"): 340_387_840,  # OpenCLIP ViT-H text tower, 23 of its 24 layers
    ("sdxl", "text_encoder_2"): 694_659_840,  # OpenCLIP ViT-bigG text tower with projection
    ("sd15", "vae"): 83_653_863,
    ("sdxl", "vae"): 83_653_863,
    ("dit_xl2", "vae"): 83_653_863,
}
DIT_XL2_PAPER = 675_129_632  # DiT-XL/2 as counted by the original implementation (facebookresearch/DiT)
DIT_XL2_DIFFUSERS = 749_826_464  # the same network in diffusers' layout (see test_dit_count_matches_the_paper)


def meta_model(arch_name: str, component: str, dtype: torch.dtype = torch.float32) -> torch.nn.Module:
    arch = read_architecture(arch_name)
    library, class_name = arch.components[component]
    return build_model(library, class_name, arch.configs[component], device="meta", dtype=dtype)


def model_cfg(**overrides) -> SimpleNamespace:
    fields = dict(backend="stable_diffusion", path="", revision="", dtype="float32", device="cpu",
                  init="random", architecture="sd21")
    return SimpleNamespace(**{**fields, **overrides})


# --- the shipped files ----------------------------------------------------------------------------------------

def test_config_choices_list_exactly_the_shipped_architectures():
    assert architecture_names() == ["dit_xl2", "sd15", "sd21", "sd21_768", "sdxl", "sit_xl2"]
    assert sorted(_CHOICES["model.architecture"]) == ["", *architecture_names()]
    assert _CHOICES["model.init"] == ("pretrained", "random")
    cfg = load_config(overrides=["model.backend=sdxl", "model.init=random", "model.architecture=sdxl"]).model
    assert (cfg.init, cfg.architecture) == ("random", "sdxl")
    assert load_config().model.init == "pretrained"
    with pytest.raises(ValueError, match="model.architecture"):
        load_config(overrides=["model.init=random", "model.architecture=sd3"])
    with pytest.raises(ValueError, match="model.init"):
        load_config(overrides=["model.init=zeros"])


@pytest.mark.parametrize("name", ["dit_xl2", "sd15", "sd21", "sd21_768", "sdxl", "sit_xl2"])
def test_architecture_files_are_complete(name):
    arch = read_architecture(name)
    assert arch.backend in family_names()
    files = {path.stem for path in (ARCHITECTURES_DIR / name).glob("*.json")}
    assert files == {"pipeline", *arch.components}, "one JSON per component plus pipeline.json, nothing else"
    for path in (ARCHITECTURES_DIR / name).glob("*.json"):
        json.loads(path.read_text())
    assert arch.configs["scheduler"]["_class_name"] == arch.components["scheduler"][1]


def test_architecture_facts():
    """The values the families differ in (prediction type, sizes, SDXL's pipeline options)."""
    sd21, sd21_768, sdxl = (read_architecture(n) for n in ("sd21", "sd21_768", "sdxl"))
    assert sd21.configs["scheduler"]["prediction_type"] == "epsilon" and sd21.configs["unet"]["sample_size"] == 64
    assert sd21_768.configs["scheduler"]["prediction_type"] == "v_prediction"
    assert sd21_768.configs["unet"]["sample_size"] == 96
    assert sdxl.pipeline["force_zeros_for_empty_prompt"] is True
    assert sdxl.configs["vae"]["scaling_factor"] == 0.13025
    assert read_architecture("sit_xl2").configs["scheduler"] == {
        "_class_name": "FlowMatchEulerDiscreteScheduler", "num_train_timesteps": 1000, "shift": 1.0,
        "use_dynamic_shifting": False}
    assert read_architecture("dit_xl2").configs["scheduler"]["beta_schedule"] == "linear"
    with pytest.raises(ValueError, match="set model.backend=sdxl"):
        read_architecture("sdxl", backend="stable_diffusion")
    with pytest.raises(ValueError, match="not shipped"):
        read_architecture("sd3")


# --- parameter counts on the meta device ----------------------------------------------------------------------

@pytest.mark.parametrize("arch_name,component", sorted(PUBLISHED))
def test_published_parameter_counts(arch_name, component):
    model = meta_model(arch_name, component)
    assert all(p.device.type == "meta" for p in model.parameters())
    count = count_parameters(model)
    print(f"{arch_name} {component}: {count:,} parameters (published {PUBLISHED[arch_name, component]:,})")
    assert count == pytest.approx(PUBLISHED[arch_name, component], rel=0.005)


def test_dit_count_matches_the_paper():
    """diffusers' DiT holds 749.8M parameters where the paper's DiT-XL/2 has 675.1M, for two layout reasons.

    Each of the 28 blocks has its own copy of the timestep + class embedding
    (``norm1.emb``; diffusers' DiT conversion copies the one shared embedding into
    every block), and the fixed sin-cos position embedding is a buffer in diffusers
    but an (untrained) ``nn.Parameter`` in the original code. Undoing both gives
    the published count exactly.
    """
    for name in ("dit_xl2", "sit_xl2"):
        model = meta_model(name, "transformer")
        count = count_parameters(model)
        assert count == DIT_XL2_DIFFUSERS
        blocks = model.transformer_blocks
        per_block_embedding = count_parameters(blocks[0].norm1.emb)
        assert per_block_embedding == 1001 * 1152 + (256 * 1152 + 1152) + (1152 * 1152 + 1152)
        position_embedding = model.pos_embed.pos_embed.numel()
        paper = count - (len(blocks) - 1) * per_block_embedding + position_embedding
        assert paper == DIT_XL2_PAPER
        assert count_parameters(model) == pytest.approx(DIT_XL2_PAPER, rel=0.12)  # the 11% is all duplication


def test_meta_build_honours_dtype():
    model = meta_model("sd21", "unet", dtype=torch.bfloat16)
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
    assert torch.get_default_dtype() == torch.float32  # restored


# --- seeded construction --------------------------------------------------------------------------------------

TINY_UNET = dict(block_out_channels=[8, 16], layers_per_block=1, sample_size=8, in_channels=4, out_channels=4,
                 down_block_types=["DownBlock2D", "CrossAttnDownBlock2D"],
                 up_block_types=["CrossAttnUpBlock2D", "UpBlock2D"], cross_attention_dim=16, norm_num_groups=4,
                 attention_head_dim=4)


def test_build_is_seeded_and_leaves_the_global_rng_alone():
    state = torch.get_rng_state()
    one = build_model("diffusers", "UNet2DConditionModel", TINY_UNET)
    two = build_model("diffusers", "UNet2DConditionModel", TINY_UNET)
    other = build_model("diffusers", "UNet2DConditionModel", TINY_UNET, seed=1)
    assert torch.equal(torch.get_rng_state(), state)
    for (name, a), b, c in zip(one.state_dict().items(), two.state_dict().values(), other.state_dict().values()):
        assert torch.equal(a, b), name
    assert any(not torch.equal(a, c) for a, c in zip(one.parameters(), other.parameters()))
    assert not any(p.requires_grad for p in one.parameters()) and not one.training
    half = build_model("diffusers", "UNet2DConditionModel", TINY_UNET, dtype=torch.bfloat16)
    assert {p.dtype for p in half.parameters()} == {torch.bfloat16}
    torch.testing.assert_close(half.conv_in.weight.float(), one.conv_in.weight, rtol=1e-2, atol=1e-2)


# --- the built-in tokenizer -----------------------------------------------------------------------------------

PROMPTS = ["a red cat", "The blue dog and the thing!", "", "ünïcode ✓ 123", "x" * 300]


@pytest.mark.parametrize("pad_token,pad_id", [("<|endoftext|>", 49407), ("!", 0)])
def test_builtin_tokenizer_is_deterministic_and_fits_clip(pad_token, pad_id):
    assert "NOT the real CLIP tokenizer" in builtin_clip_tokenizer.__doc__
    one, two = builtin_clip_tokenizer(pad_token=pad_token), builtin_clip_tokenizer(pad_token=pad_token)
    assert len(one) == 49408 and one.model_max_length == 77
    assert (one.bos_token_id, one.eos_token_id, one.pad_token_id) == (49406, 49407, pad_id)
    ids = one(PROMPTS, padding="max_length", max_length=77, truncation=True, return_tensors="pt").input_ids
    assert torch.equal(ids, two(PROMPTS, padding="max_length", max_length=77, truncation=True,
                                return_tensors="pt").input_ids)
    assert ids.shape == (len(PROMPTS), 77) and int(ids.min()) >= 0 and int(ids.max()) < 49408
    assert (ids[:, 0] == 49406).all()
    assert ids[2, :2].tolist() == [49406, 49407] and ids[4, -1] == 49407  # empty prompt; truncated prompt
    first_eos = (ids == 49407).int().argmax(dim=1)
    assert torch.equal(first_eos, ids.argmax(dim=1))  # CLIP's legacy pooling (argmax of the ids) finds the eos
    assert not torch.equal(ids[0], ids[1])
    for name in ("sd15", "sd21"):  # consistent with the shipped text encoder configs
        check_tokenizer_fits(one, CLIPTextConfig(**read_architecture(name).configs["text_encoder"]))


def test_tokenizer_mismatch_is_refused():
    tokenizer = builtin_clip_tokenizer(vocab_size=1000)
    assert (tokenizer.bos_token_id, tokenizer.eos_token_id) == (998, 999)
    with pytest.raises(ValueError, match="embeds only 512"):
        check_tokenizer_fits(tokenizer, CLIPTextConfig(vocab_size=512, eos_token_id=2))
    with pytest.raises(ValueError, match="pools at eos id 7"):
        check_tokenizer_fits(tokenizer, CLIPTextConfig(vocab_size=1000, eos_token_id=7))


def test_sdxl_tokenizers_follow_the_published_pad_tokens():
    built = build_components(read_architecture("sdxl"), device="meta")
    assert built["tokenizer"].pad_token == "<|endoftext|>" and built["tokenizer_2"].pad_token == "!"
    assert built["scheduler"]["_class_name"] == "EulerDiscreteScheduler"


# --- load_backend with model.init=random, at full size on the meta device ---------------------------------------

@pytest.mark.parametrize("backend,architecture,prompts,hidden", [
    ("stable_diffusion", "sd15", ["a red cat", "the blue dog"], {"encoder_hidden_states": (77, 768)}),
    ("stable_diffusion", "sd21", ["a red cat", "the blue dog"], {"encoder_hidden_states": (77, 1024)}),
    ("stable_diffusion", "sd21_768", ["a red cat", "the blue dog"], {"encoder_hidden_states": (77, 1024)}),
    ("sdxl", "sdxl", ["a red cat", "the blue dog"],
     {"encoder_hidden_states": (77, 2048), "text_embeds": (1280,), "time_ids": (6,)}),
    ("sit", "dit_xl2", ["207", "class 3"], {"class_labels": ()}),
    ("sit", "sit_xl2", ["207", "class 3"], {"class_labels": ()}),
])
@pytest.mark.slow  # >= 1 s on an idle 2-core machine: `make test` only, not the fast lane
def test_load_backend_random_at_full_size_on_meta(backend, architecture, prompts, hidden):
    """The whole random path (configs, tokenizers, constructor checks, a guided step) at the real shapes."""
    with pytest.warns(RandomWeightsWarning, match="samples are noise"):
        model = load_backend(model_cfg(backend=backend, architecture=architecture, device="meta",
                                       dtype="bfloat16"))
    assert model.init == "random" and model.architecture == architecture and RANDOM_WEIGHTS in model.weights
    assert model.name == backend and model.denoiser.dtype == torch.bfloat16
    arch = read_architecture(architecture)
    denoiser = arch.configs.get("unet", arch.configs.get("transformer"))
    size = denoiser["sample_size"]
    assert model.latent_shape == (4, size, size)
    cond, null = model.encode_prompts(prompts), model.null_conditioning(len(prompts))
    assert {key: tuple(value.shape[1:]) for key, value in cond.items()} == hidden
    assert {key: value.shape for key, value in null.items()} == {key: value.shape for key, value in cond.items()}
    x_t = torch.zeros(len(prompts), *model.latent_shape, device="meta")
    t = torch.tensor(500, device="meta")
    guider = ClassifierFreeGuidance(guidance_scale=7.5)
    guider.set_state(step=0, num_inference_steps=1, timestep=t)
    out = guided_output(model, guider, x_t, t, cond, null)
    assert out.shape == x_t.shape
    if architecture == "sdxl":
        assert model.vae.dtype == torch.float32 and model.force_zeros_for_empty_prompt
    if backend == "sit":
        assert model.flow == (architecture == "sit_xl2") and model.num_classes == 1000
        assert model.encode_prompts(prompts)["class_labels"].shape == (2,)
    else:
        expected_type = arch.configs["scheduler"]["prediction_type"]
        assert model.scheduler_config["prediction_type"] == expected_type
        assert model.scheduler_config["clip_sample"] is False


def test_random_init_errors_name_the_fix():
    with pytest.raises(ValueError, match="needs model.architecture"):
        load_backend(model_cfg(architecture=""))
    with pytest.raises(ValueError, match="set model.backend=sdxl"):
        load_backend(model_cfg(architecture="sdxl", device="meta"))
    with pytest.raises(ValueError, match="digits backend"):
        load_backend(model_cfg(backend="digits"))
    with pytest.raises(ValueError, match="float16"):
        load_backend(model_cfg(dtype="float16"))


# --- pretrained errors name the path and the expected model type ----------------------------------------------

@pytest.fixture(scope="module")
def tiny_dirs(tmp_path_factory):
    from tiny_models import build_tiny_dit, build_tiny_sdxl

    root = tmp_path_factory.mktemp("models")
    return {"sdxl": build_tiny_sdxl(root / "sdxl"), "dit": build_tiny_dit(root / "dit")}


def load_pretrained(backend, path):
    return load_backend(load_config(overrides=[f"model.backend={backend}", f"model.path={path}"]).model)


def test_pretrained_errors_name_path_and_expected_model(tmp_path, tiny_dirs):
    missing = tmp_path / "no-such-model"
    with pytest.raises(FileNotFoundError, match=r"no-such-model.*expected a Stable Diffusion 1.x/2.x pipeline"):
        load_pretrained("stable_diffusion", missing)
    with pytest.raises(FileNotFoundError, match=r"'.*dit'.*of an SDXL pipeline.*missing.*holds a DiTPipeline"):
        load_pretrained("sdxl", tiny_dirs["dit"])
    with pytest.raises(FileNotFoundError, match=r"'.*sdxl'.*DiT/SiT pipeline.*holds a StableDiffusionXLPipeline"):
        load_pretrained("sit", tiny_dirs["sdxl"])
    # An SDXL directory has every SD 1.x/2.x subfolder: refused on its UNet's config, before loading weights.
    with pytest.raises(ValueError, match=r"'.*sdxl' holds an SDXL UNet.*use model.backend=sdxl"):
        load_pretrained("stable_diffusion", tiny_dirs["sdxl"])


# --- bench/bench_real_size.py: the GPU check's build and training step, with FLOPs ------------------------------

def test_bench_real_size_tiny_times_a_step_and_counts_its_flops(capsys):
    """``--tiny``: the same classes at tiny widths, built and trained through bench/gpu (the GPU check's code)."""
    import re
    import sys

    repo = str(Path(__file__).resolve().parents[1])
    if repo not in sys.path:
        sys.path.insert(0, repo)
    from bench import bench_real_size

    threads = torch.get_num_threads()
    try:
        bench_real_size.main(["--arch", "sd21", "--tiny", "--msd", "--msd-steps", "2", "--repeats", "1"])
    finally:
        torch.set_num_threads(threads)
    out = capsys.readouterr().out
    assert "arch sd21 (tiny)" in out and "sd21-tiny, random weights" in out
    step = re.search(r"teacher CFG step: ([\d.e+-]+) GFLOP per sample; achieved ([\d.e+-]+) TFLOP/s, MFU ([\d.]+)", out)
    msd = re.search(r"MSD step: ([\d.e+-]+) GFLOP per sample; achieved [\d.e+-]+ TFLOP/s, MFU ([\d.]+)", out)
    assert step and msd, out
    assert float(step.group(1)) > 0 and float(step.group(3)) > 0 and "peak: measured" in out
    # the MSD step runs the refiner (two forwards and a backward) and a 2-step rollout: more than one CFG step
    assert float(msd.group(1)) > float(step.group(1))
    assert re.search(r"one MSD step .*: [\d.]+ s, loss [\d.]+", out)

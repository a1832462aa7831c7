"""Tiny random-initialised models of the real classes, saved in the standard diffusers pipeline layout.

Sizes follow diffusers' own fast tests (CLIPTextConfig(hidden_size=32, ...), two-block
UNets with ``norm_num_groups`` 2, a two-block VAE). The CLIP tokenizer is a minimal
BPE written here (characters, their end-of-word forms and a few merges) in the
files a real SD ``tokenizer/`` folder holds: vocab.json, merges.txt,
tokenizer_config.json. Everything is built by the pipeline classes'
``save_pretrained`` so the layout (model_index.json included) is the real one.
"""

from __future__ import annotations

import json
import shutil
import string
import tempfile
from pathlib import Path

import torch
from diffusers import (AutoencoderKL, DDIMScheduler, DiTPipeline, DiTTransformer2DModel,
                       EulerDiscreteScheduler, FlowMatchEulerDiscreteScheduler, PNDMScheduler,
                       StableDiffusionPipeline, StableDiffusionXLPipeline, UNet2DConditionModel)
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

LATENT_SIZE = 8  # latents 4x8x8 -> images 3x16x16 (VAE scale 2)
IMAGE_SIZE = 16
SD_BETAS = dict(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear")


def patch_json(path: Path, **updates) -> None:
    path.write_text(json.dumps({**json.loads(path.read_text()), **updates}, indent=2))


def write_clip_tokenizer(directory: Path) -> CLIPTokenizer:
    """A byte-level CLIP BPE over lower-case letters, digits and some punctuation."""
    directory.mkdir(parents=True, exist_ok=True)
    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1}
    for char in string.ascii_lowercase + string.digits + ".,!?'-":
        vocab[char] = len(vocab)
        vocab[char + "</w>"] = len(vocab)
    merges = ["t h", "th e</w>", "a n", "an d</w>", "o f</w>"]
    for merge in merges:
        vocab["".join(merge.split())] = len(vocab)
    (directory / "vocab.json").write_text(json.dumps(vocab))
    (directory / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n")
    (directory / "tokenizer_config.json").write_text(json.dumps({"model_max_length": 77}))
    return CLIPTokenizer.from_pretrained(directory)


def _tokenizer() -> CLIPTokenizer:
    with tempfile.TemporaryDirectory() as tmp:
        return write_clip_tokenizer(Path(tmp))


def tiny_text_encoder(tokenizer: CLIPTokenizer, projection: bool = False, hidden_size: int = 32):
    config = CLIPTextConfig(bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                            pad_token_id=tokenizer.pad_token_id, vocab_size=len(tokenizer),
                            hidden_size=hidden_size, intermediate_size=37, num_attention_heads=4,
                            num_hidden_layers=3, layer_norm_eps=1e-5, projection_dim=32)
    return (CLIPTextModelWithProjection if projection else CLIPTextModel)(config).eval()


def tiny_vae() -> AutoencoderKL:
    return AutoencoderKL(block_out_channels=(4, 8), in_channels=3, out_channels=3, latent_channels=4,
                         down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
                         norm_num_groups=2, sample_size=IMAGE_SIZE)


def _sharpen(layer: torch.nn.Module) -> None:
    """Random init leaves the output projection small; scale it up so outputs visibly depend on inputs."""
    with torch.no_grad():
        for parameter in layer.parameters():
            parameter.normal_(0, 0.3)


def build_tiny_sd(directory: Path, prediction_type: str = "epsilon", scheduler: str = "pndm",
                  seed: int = 0) -> Path:
    """SD 1.5-like (PNDM, steps_offset 1) or SD 2.1-768-like (DDIM, v_prediction, clip_sample on)."""
    torch.manual_seed(seed)
    unet = UNet2DConditionModel(block_out_channels=(4, 8), layers_per_block=1, sample_size=LATENT_SIZE,
                                in_channels=4, out_channels=4,
                                down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
                                up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"), cross_attention_dim=32,
                                norm_num_groups=2, attention_head_dim=2)
    _sharpen(unet.conv_out)
    tokenizer = _tokenizer()
    common = dict(SD_BETAS, prediction_type=prediction_type, steps_offset=1)
    if scheduler == "pndm":
        sched = PNDMScheduler(**common, set_alpha_to_one=False, skip_prk_steps=True)
    elif scheduler == "ddim":
        sched = DDIMScheduler(**common, set_alpha_to_one=False, clip_sample=False)
    else:
        sched = EulerDiscreteScheduler(**common, timestep_spacing="trailing")
    pipe = StableDiffusionPipeline(vae=tiny_vae(), text_encoder=tiny_text_encoder(tokenizer), tokenizer=tokenizer,
                                   unet=unet, scheduler=sched, safety_checker=None, feature_extractor=None,
                                   requires_safety_checker=False)
    pipe.save_pretrained(directory)
    if scheduler == "ddim":  # real configs may have clip_sample on (the pipeline warns); the backend turns it off
        patch_json(directory / "scheduler" / "scheduler_config.json", clip_sample=True)
    # The real SD 1.x/2.x tokenizer folder holds vocab.json + merges.txt, no tokenizer.json.
    shutil.rmtree(directory / "tokenizer")
    write_clip_tokenizer(directory / "tokenizer")
    return directory


def build_tiny_sdxl(directory: Path, force_zeros_for_empty_prompt: bool = True, seed: int = 0) -> Path:
    """SDXL-like: two encoders (32 + 32 features), pooled projection 32, ``text_time`` embedding."""
    torch.manual_seed(seed)
    unet = UNet2DConditionModel(block_out_channels=(4, 8), layers_per_block=1, sample_size=LATENT_SIZE,
                                in_channels=4, out_channels=4,
                                down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
                                up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"), attention_head_dim=(2, 4),
                                use_linear_projection=True, addition_embed_type="text_time",
                                addition_time_embed_dim=8, transformer_layers_per_block=(1, 2),
                                projection_class_embeddings_input_dim=6 * 8 + 32, cross_attention_dim=64,
                                norm_num_groups=2)
    _sharpen(unet.conv_out)
    tokenizer = _tokenizer()
    sched = EulerDiscreteScheduler(**SD_BETAS, steps_offset=1, timestep_spacing="leading")
    pipe = StableDiffusionXLPipeline(vae=tiny_vae(), text_encoder=tiny_text_encoder(tokenizer),
                                     text_encoder_2=tiny_text_encoder(tokenizer, projection=True),
                                     tokenizer=tokenizer, tokenizer_2=tokenizer, unet=unet, scheduler=sched,
                                     force_zeros_for_empty_prompt=force_zeros_for_empty_prompt,
                                     add_watermarker=False)
    pipe.save_pretrained(directory)
    return directory


def build_tiny_dit(directory: Path, flow: bool = False, num_classes: int = 10, seed: int = 0,
                   id2label: dict[str, str] | None = None) -> Path:
    """DiT (DDIM, learned sigma: 8 output channels) or SiT (flow-matching scheduler) on 4x8x8 latents."""
    torch.manual_seed(seed)
    transformer = DiTTransformer2DModel(sample_size=LATENT_SIZE, num_layers=2, patch_size=2, attention_head_dim=8,
                                        num_attention_heads=2, in_channels=4, out_channels=8,
                                        activation_fn="gelu-approximate", num_embeds_ada_norm=num_classes,
                                        norm_type="ada_norm_zero", norm_elementwise_affine=False)
    _sharpen(transformer.proj_out_2)
    if flow:
        sched = FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=1.0)
    else:
        sched = DDIMScheduler(num_train_timesteps=1000, beta_schedule="linear", clip_sample=False)
    DiTPipeline(transformer=transformer, vae=tiny_vae(), scheduler=sched).save_pretrained(directory)
    if id2label is not None:  # as in facebook/DiT-XL-2-256's model_index.json
        patch_json(directory / "model_index.json", id2label=id2label)
    return directory


def write_t5_tokenizer(directory: Path):
    """A minimal T5 (Unigram, metaspace) tokenizer over lower-case letters, digits and some punctuation."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors
    from transformers import T5TokenizerFast

    vocab = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0)]
    vocab += [("\u2581" + c, -1.0) for c in string.ascii_lowercase]
    vocab += [(c, -2.0) for c in string.ascii_lowercase + string.digits + ".,!?'-"]
    backend = Tokenizer(models.Unigram(vocab, unk_id=2))
    backend.pre_tokenizer = pre_tokenizers.Metaspace()
    backend.decoder = decoders.Metaspace()
    backend.post_processor = processors.TemplateProcessing(single="$A </s>", special_tokens=[("</s>", 1)])
    tokenizer = T5TokenizerFast(tokenizer_object=backend, eos_token="</s>", unk_token="<unk>", pad_token="<pad>",
                                extra_ids=0)
    tokenizer.save_pretrained(directory)
    return tokenizer


def build_tiny_sd3(directory: Path, with_t5: bool = True, seed: int = 0) -> Path:
    """SD3-like: an MMDiT on 4x8x8 latents, two CLIP encoders with projections (pooled 32 + 32), optionally a T5
    encoder (d_model 32 = joint_attention_dim), a VAE with SD3's scaling and shift factors, flow matching shift 3."""
    from diffusers import SD3Transformer2DModel, StableDiffusion3Pipeline
    from transformers import T5Config, T5EncoderModel

    torch.manual_seed(seed)
    transformer = SD3Transformer2DModel(sample_size=LATENT_SIZE, patch_size=2, in_channels=4, num_layers=2,
                                        attention_head_dim=8, num_attention_heads=2, caption_projection_dim=16,
                                        joint_attention_dim=32, pooled_projection_dim=64, out_channels=4)
    _sharpen(transformer.proj_out)
    tokenizer = _tokenizer()
    vae = AutoencoderKL(block_out_channels=(4, 8), in_channels=3, out_channels=3, latent_channels=4,
                        down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
                        norm_num_groups=2, sample_size=IMAGE_SIZE, scaling_factor=1.5035, shift_factor=0.0609)
    t5 = tokenizer_3 = None
    if with_t5:
        tokenizer_3 = write_t5_tokenizer(directory / "tokenizer_3")
        t5 = T5EncoderModel(T5Config(vocab_size=len(tokenizer_3), d_model=32, d_kv=8, d_ff=37, num_layers=2,
                                     num_heads=4)).eval()
    pipe = StableDiffusion3Pipeline(transformer=transformer, vae=vae, scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0),
                                    text_encoder=tiny_text_encoder(tokenizer, projection=True), tokenizer=tokenizer,
                                    text_encoder_2=tiny_text_encoder(tokenizer, projection=True), tokenizer_2=tokenizer,
                                    text_encoder_3=t5, tokenizer_3=tokenizer_3)
    pipe.save_pretrained(directory)
    return directory

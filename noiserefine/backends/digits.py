"""The embedded default: a tiny text-conditioned diffusion model on scikit-learn's digits.

The denoiser is diffusers' ``UNet2DConditionModel`` (self- and cross-attention
transformer blocks, like Stable Diffusion) so LoRA, PAG and the samplers hit
the same code as on real models. "Text" conditioning is a learned embedding
per digit plus one null embedding: a prompt that names a digit ("a handwritten
seven", "digit 7") gets that digit's embedding, any other prompt the null one.
The teacher is trained by the project (condition dropout so CFG works), saved
in diffusers format and loaded from that directory like any real model.
"""

from __future__ import annotations

import json
import math
import re
import shutil
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

import torch
import torch.nn.functional as F
from diffusers import DDIMScheduler, DDPMScheduler, UNet2DConditionModel
from safetensors.torch import load_file, save_file
from tqdm.auto import tqdm

from ..digits_data import IMAGE_SIZE, load_digit_images, thicken_strokes
from ..prompts import DIGIT_WORDS
from .base import Backend, Conditioning

NULL_INDEX = 10
EMBEDDING_FILE = "prompt_embedding.safetensors"
TRAINING_FILE = "training.json"
_DIGIT_PATTERN = re.compile(r"\b(" + "|".join(DIGIT_WORDS) + r"|[0-9])\b", re.IGNORECASE)

# The scheduler the teacher is trained and sampled with (Stable Diffusion's betas;
# "trailing" spacing so the first of few steps starts at t=999, i.e. from pure noise).
SCHEDULER_CONFIG = dict(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012,
                        beta_schedule="scaled_linear", prediction_type="epsilon",
                        clip_sample=False, set_alpha_to_one=True, timestep_spacing="trailing")


def parse_digit(prompt: str) -> int | None:
    """The digit a prompt names (first match of a numeral or number word), else None."""
    match = _DIGIT_PATTERN.search(prompt)
    if match is None:
        return None
    token = match.group(1).lower()
    return int(token) if token.isdigit() else DIGIT_WORDS.index(token)


def build_unet(block_out_channels: Sequence[int], cross_attention_dim: int) -> UNet2DConditionModel:
    """A ~1M-parameter SD-style UNet for 1x16x16 images (cross-attention in the inner blocks)."""
    channels = tuple(int(c) for c in block_out_channels)
    depth = len(channels)
    return UNet2DConditionModel(
        sample_size=IMAGE_SIZE, in_channels=1, out_channels=1,
        down_block_types=("DownBlock2D",) + ("CrossAttnDownBlock2D",) * (depth - 1),
        up_block_types=("CrossAttnUpBlock2D",) * (depth - 1) + ("UpBlock2D",),
        block_out_channels=channels, layers_per_block=1, norm_num_groups=8,
        cross_attention_dim=cross_attention_dim, attention_head_dim=4,
    )


class DigitsBackend(Backend):
    name = "digits"
    latent_shape = (1, IMAGE_SIZE, IMAGE_SIZE)
    scheduler_class = DDIMScheduler

    def __init__(self, unet: UNet2DConditionModel, embedding: torch.Tensor, scheduler_config: dict,
                 device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32):
        self.device = torch.device(device)
        self.dtype = dtype
        unet = unet.to(self.device)
        if dtype != torch.float32:  # passing dtype at all makes diffusers warn, so only when casting
            unet = unet.to(dtype=dtype)
        self.denoiser = unet.eval().requires_grad_(False)
        self.embedding = embedding.to(self.device, dtype)  # (11, 1, D): digits 0..9, then null
        self.scheduler_config = dict(scheduler_config)

    @classmethod
    def from_pretrained(cls, path: str | Path, device: str = "cpu",
                        dtype: torch.dtype = torch.float32) -> "DigitsBackend":
        path = Path(path)
        if not (path / "unet").is_dir() or not (path / EMBEDDING_FILE).is_file():
            raise FileNotFoundError(f"no digit teacher at {path} (expected unet/, scheduler/ and "
                                    f"{EMBEDDING_FILE}); train one with `python -m noiserefine.train_teacher`")
        unet = UNet2DConditionModel.from_pretrained(path / "unet")
        scheduler = DDIMScheduler.from_pretrained(path / "scheduler")
        embedding = load_file(str(path / EMBEDDING_FILE))["embedding"]
        return cls(unet, embedding, dict(scheduler.config), device, dtype)

    def labels_for(self, prompts: Sequence[str]) -> torch.Tensor:
        digits = [parse_digit(p) for p in prompts]
        return torch.tensor([NULL_INDEX if d is None else d for d in digits], dtype=torch.long)

    def encode_prompts(self, prompts: Sequence[str]) -> Conditioning:
        labels = self.labels_for(prompts).to(self.device)
        return {"encoder_hidden_states": self.embedding[labels]}

    def null_conditioning(self, batch_size: int) -> Conditioning:
        labels = torch.full((batch_size,), NULL_INDEX, dtype=torch.long, device=self.device)
        return {"encoder_hidden_states": self.embedding[labels]}

    def denoise(self, x_t: torch.Tensor, t: torch.Tensor, cond: Conditioning) -> torch.Tensor:
        return self.denoiser(x_t, t, encoder_hidden_states=cond["encoder_hidden_states"],
                             return_dict=False)[0]

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        return ((latents.float() + 1) / 2).clamp(0, 1)


def _save_teacher(out_dir: Path, unet: UNet2DConditionModel, embedding: torch.Tensor,
                  training: dict) -> None:
    """Write the teacher to a temp dir, then rename: a crash never leaves a half model."""
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=out_dir.parent, prefix=f".{out_dir.name}.tmp"))
    try:
        unet.save_pretrained(tmp / "unet")
        DDIMScheduler(**SCHEDULER_CONFIG).save_pretrained(tmp / "scheduler")
        save_file({"embedding": embedding.detach().cpu().contiguous()}, str(tmp / EMBEDDING_FILE))
        (tmp / TRAINING_FILE).write_text(json.dumps(training, indent=2, sort_keys=True))
        if out_dir.exists():
            shutil.rmtree(out_dir)
        tmp.rename(out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def training_settings(settings) -> dict:
    """The settings that define a trained teacher (compared to decide whether to retrain)."""
    return {k: (list(v) if isinstance(v, Sequence) and not isinstance(v, str) else v)
            for k, v in dict(settings).items()}


def train_digits_teacher(settings, out_dir: str | Path, *, progress: bool = True) -> Path:
    """Train (or fine-tune, if ``settings.init_from``) the digit teacher; save it in diffusers format.

    Objective: epsilon-prediction MSE, ``E ||eps - eps_theta(sqrt(ab_t) x0 + sqrt(1-ab_t) eps, t, c)||^2``,
    with the condition replaced by the null embedding for a ``cond_dropout`` share (CFG training).
    With ``distill_guidance_scale = w > 0`` (and ``init_from``) the regression target is instead the
    ``init_from`` model's CFG output ``eps_u + w (eps_c - eps_u)``: the guidance-distillation
    baseline (Meng et al., stage one), a denoiser that needs one forward per step.
    Weights are an exponential moving average (decay 0.995) of the trained ones.
    """
    settings = training_settings(settings)
    out_dir = Path(out_dir)
    generator = torch.Generator().manual_seed(int(settings["seed"]))
    torch.manual_seed(int(settings["seed"]))
    images, labels = load_digit_images()
    images = thicken_strokes(images, int(settings["thicken"]))

    guidance_teacher = None
    if float(settings["distill_guidance_scale"]) > 0:
        if not settings["init_from"]:
            raise ValueError("model.digits.distill_guidance_scale needs model.digits.init_from (the teacher)")
        guidance_teacher = DigitsBackend.from_pretrained(settings["init_from"])
    if settings["init_from"]:
        base = DigitsBackend.from_pretrained(settings["init_from"])
        unet, embedding = base.denoiser.requires_grad_(True).train(), base.embedding.clone()
    else:
        unet = build_unet(settings["block_out_channels"], int(settings["cross_attention_dim"]))
        embedding = torch.randn(NULL_INDEX + 1, 1, int(settings["cross_attention_dim"]),
                                generator=generator) * 0.5
    embedding = torch.nn.Parameter(embedding)
    unet.train()
    ema = {k: v.detach().clone() for k, v in unet.state_dict().items()}
    ema_embedding = embedding.detach().clone()
    noise_scheduler = DDPMScheduler(**{k: v for k, v in SCHEDULER_CONFIG.items()
                                       if k not in ("set_alpha_to_one", "timestep_spacing")})
    steps, batch_size = int(settings["train_steps"]), int(settings["batch_size"])
    optimizer = torch.optim.AdamW(list(unet.parameters()) + [embedding],
                                  lr=float(settings["learning_rate"]), weight_decay=0.0)
    warmup = min(50, steps // 10)

    def lr_factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        return 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, steps - warmup)))

    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_factor)
    started = time.perf_counter()
    bar = tqdm(range(steps), desc="train digit teacher", disable=not progress)
    for step in bar:
        index = torch.randint(0, len(images), (batch_size,), generator=generator)
        x0, y = images[index], labels[index].clone()
        y[torch.rand(batch_size, generator=generator) < float(settings["cond_dropout"])] = NULL_INDEX
        noise = torch.randn(x0.shape, generator=generator)
        t = torch.randint(0, noise_scheduler.config.num_train_timesteps, (batch_size,), generator=generator)
        x_t = noise_scheduler.add_noise(x0, noise, t)
        prediction = unet(x_t, t, encoder_hidden_states=embedding[y], return_dict=False)[0]
        target = noise
        if guidance_teacher is not None:
            with torch.no_grad():
                w = float(settings["distill_guidance_scale"])
                cond = guidance_teacher.embedding[y]
                uncond = guidance_teacher.embedding[torch.full_like(y, NULL_INDEX)]
                both = guidance_teacher.denoise(torch.cat([x_t, x_t]), torch.cat([t, t]),
                                                {"encoder_hidden_states": torch.cat([uncond, cond])})
                eps_u, eps_c = both.chunk(2)
                target = eps_u + w * (eps_c - eps_u)
        loss = F.mse_loss(prediction, target)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(unet.parameters(), 1.0)
        optimizer.step()
        schedule.step()
        with torch.no_grad():
            decay = min(0.995, (1 + step) / (10 + step))  # not bar.n: tqdm updates it only when it redraws
            for key, value in unet.state_dict().items():
                ema[key].lerp_(value, 1 - decay) if value.is_floating_point() else ema[key].copy_(value)
            ema_embedding.lerp_(embedding.detach(), 1 - decay)
        bar.set_postfix(loss=f"{loss.item():.4f}", refresh=False)
    unet.load_state_dict(ema)
    training = {"settings": settings, "seconds": round(time.perf_counter() - started, 1),
                "num_parameters": sum(p.numel() for p in unet.parameters()),
                "final_loss": round(loss.item(), 5)}
    _save_teacher(out_dir, unet.eval(), ema_embedding, training)
    return out_dir


def ensure_digits_teacher(settings, path: str | Path, *, progress: bool = True) -> Path:
    """Train the teacher at ``path`` unless one trained with the same settings is already there."""
    path = Path(path)
    record = path / TRAINING_FILE
    if record.is_file() and json.loads(record.read_text()).get("settings") == training_settings(settings):
        return path
    return train_digits_teacher(settings, path, progress=progress)

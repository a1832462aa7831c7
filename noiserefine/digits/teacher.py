"""Training the embedded default's teacher (and its fine-tuned variants) on the digits.

Objective: v-prediction (or epsilon-prediction) MSE with condition dropout so CFG
works; weights are an EMA of the trained ones. The result is saved in the layout
:class:`noiserefine.backends.digits.DigitsBackend` loads.
"""

from __future__ import annotations

import json
import math
import os
import secrets
import shutil
import time
from collections.abc import Sequence
from pathlib import Path

import torch
import torch.nn.functional as F
from diffusers import DDPMScheduler, UNet2DConditionModel
from tqdm.auto import tqdm

from ..backends.digits import NULL_INDEX, SCHEDULER_CONFIG, DigitsBackend, build_unet
from ..files import apply_default_modes, refuse_foreign_directory
from .data import load_digit_images, thicken_strokes

TRAINING_FILE = "training.json"


def _save_teacher(out_dir: Path, unet: UNet2DConditionModel, embedding: torch.Tensor,
                  training: dict) -> None:
    """Write the teacher to a temp dir, then rename: a crash never leaves a half model."""
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    # not tempfile.mkdtemp: its 0700 directory would become the teacher, unreadable to other users
    tmp = out_dir.parent / f".{out_dir.name}.{os.getpid()}-{secrets.token_hex(6)}.tmp"
    tmp.mkdir()
    try:
        DigitsBackend(unet, embedding.detach(), teacher_scheduler_config(training["settings"])).save_pretrained(tmp)
        (tmp / TRAINING_FILE).write_text(json.dumps(training, indent=2, sort_keys=True))
        apply_default_modes(tmp)  # safetensors writes its files 0600
        if out_dir.exists():
            shutil.rmtree(out_dir)
        tmp.rename(out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def teacher_scheduler_config(settings) -> dict:
    """The scheduler a teacher with these settings is trained and sampled with."""
    prediction_type = settings.get("prediction_type", "epsilon")
    if prediction_type not in ("epsilon", "v_prediction"):
        raise ValueError(f"model.digits.prediction_type must be epsilon or v_prediction, got {prediction_type!r}")
    return dict(SCHEDULER_CONFIG, prediction_type=prediction_type)


def training_settings(settings) -> dict:
    """The settings that define a trained teacher (compared to decide whether to retrain)."""
    return {k: (list(v) if isinstance(v, Sequence) and not isinstance(v, str) else v)
            for k, v in dict(settings).items()}


def train_digits_teacher(settings, out_dir: str | Path, *, progress: bool = True) -> Path:
    """Train (or fine-tune, if ``settings.init_from``) the digit teacher; save it in diffusers format.

    Objective: ``E ||target - f_theta(x_t, t, c)||^2`` at ``x_t = sqrt(ab_t) x0 + sqrt(1-ab_t) eps`` with
    ``target = v = sqrt(ab_t) eps - sqrt(1-ab_t) x0`` (``prediction_type=v_prediction``, Salimans & Ho
    2022) or ``eps`` (``epsilon``), the condition replaced by the null embedding for a ``cond_dropout`` share (CFG training).
    With ``distill_guidance_scale = w > 0`` (and ``init_from``) the regression target is instead the
    ``init_from`` model's CFG output ``f_u + w (f_c - f_u)`` (in its own prediction type): the guidance-distillation
    baseline (Meng et al., stage one), a denoiser that needs one forward per step.
    Weights are an exponential moving average (decay 0.995) of the trained ones.
    """
    settings = training_settings(settings)
    out_dir = Path(out_dir)
    # a teacher there is replaced (rmtree) when done; a folder that is not a teacher of ours never is
    refuse_foreign_directory(out_dir, TRAINING_FILE, "a digits teacher directory (model.path)")
    generator = torch.Generator().manual_seed(int(settings["seed"]))
    torch.manual_seed(int(settings["seed"]))
    images, labels = load_digit_images()
    images = thicken_strokes(images, int(settings["thicken"]))

    scheduler_config = teacher_scheduler_config(settings)
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
    noise_scheduler = DDPMScheduler(**{k: v for k, v in scheduler_config.items()
                                       if k not in ("set_alpha_to_one", "timestep_spacing")})
    prediction_type = scheduler_config["prediction_type"]
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
        target = noise if prediction_type == "epsilon" else noise_scheduler.get_velocity(x0, noise, t)
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

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
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch
import torch.nn.functional as F
from diffusers import DDPMScheduler, UNet2DConditionModel
from tqdm.auto import tqdm

from ..backends.digits import ATTRIBUTES, SCHEDULER_CONFIG, TASKS, DigitsBackend, attribute_tokens, build_unet
from ..evaluation.rows import torch_threads
from ..files import apply_default_modes, refuse_foreign_directory
from .compose import random_attributes, render, sklearn_digits
from .data import load_digit_images, thicken_strokes

TRAINING_FILE = "training.json"
SETTINGS_ADDED_LATER = {"slant": 0.0, "train_threads": 1, "attention_heads": 4}  # model.digits keys newer than some saved teachers, with their defaults


def _save_teacher(out_dir: Path, unet: UNet2DConditionModel, tables: dict[str, torch.Tensor],
                  training: dict) -> None:
    """Write the teacher to a temp dir, then rename: a crash never leaves a half model."""
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    # not tempfile.mkdtemp: its 0700 directory would become the teacher, unreadable to other users
    tmp = out_dir.parent / f".{out_dir.name}.{os.getpid()}-{secrets.token_hex(6)}.tmp"
    tmp.mkdir()
    try:
        others = {name: table for name, table in tables.items() if name != "digit"}
        DigitsBackend(unet, tables["digit"], teacher_scheduler_config(training["settings"]),
                      attributes=others).save_pretrained(tmp)
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


class TrainingImages:
    """The teacher's training batches: ``(x0 in [-1, 1], {attribute: index})`` for ``settings.task``.

    ``digits``: the 1,797 digits at 16x16 (strokes thickened by ``settings.thicken``, the transfer style).
    ``compose``: each batch draws digits and fresh attributes from the generator and renders them (every digit
    is seen at every position, size and thickness), slanted by ``settings.slant`` (the transfer style there:
    dilating would turn thin strokes into the "thick" attribute).
    """

    def __init__(self, settings: dict):
        self.task = settings.get("task", "digits")
        self.thicken = int(settings["thicken"])
        self.slant = float(settings.get("slant", 0.0))  # compose only (config_checks refuses it on digits)
        if self.task == "digits":
            self.images, self.labels = load_digit_images()
            self.images = thicken_strokes(self.images, self.thicken)
            self.size = self.images.shape[-1]
        else:
            self.digits, self.labels = sklearn_digits()
            self.size = int(settings["canvas"])

    def batch(self, batch_size: int, generator: torch.Generator) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        index = torch.randint(0, len(self.labels), (batch_size,), generator=generator)
        if self.task == "digits":
            return self.images[index], {"digit": self.labels[index].clone()}
        attributes = random_attributes(self.labels[index], generator)
        return self.render_batch(index, attributes), attributes

    def render_batch(self, index: torch.Tensor, attributes: dict[str, torch.Tensor]) -> torch.Tensor:
        """The compose task's images of the digits at ``index``, drawn with ``attributes`` in this style."""
        images = torch.stack([render(self.digits[i], {k: int(v[n]) for k, v in attributes.items()}, self.size,
                                     self.slant) for n, i in enumerate(index.tolist())])
        return thicken_strokes(images, self.thicken)


def train_digits_teacher(settings, out_dir: str | Path, *, progress: bool = True) -> Path:
    """Train (or fine-tune, if ``settings.init_from``) the digit teacher; save it in diffusers format.

    Objective: ``E ||target - f_theta(x_t, t, c)||^2`` at ``x_t = sqrt(ab_t) x0 + sqrt(1-ab_t) eps`` with
    ``target = v = sqrt(ab_t) eps - sqrt(1-ab_t) x0`` (``prediction_type=v_prediction``, Salimans & Ho
    2022) or ``eps`` (``epsilon``), the condition replaced by the null embedding for a ``cond_dropout`` share (CFG training).
    With ``distill_guidance_scale = w > 0`` (and ``init_from``) the regression target is instead the
    ``init_from`` model's CFG output ``f_u + w (f_c - f_u)`` (in its own prediction type): the guidance-distillation
    baseline (Meng et al., stage one), a denoiser that needs one forward per step.
    Weights are an exponential moving average (decay 0.995) of the trained ones.

    ``settings.train_threads > 1``: every batch is split into that many fixed parts, each part's forward and
    backward run by its own Python thread on one intra-op thread (the network releases the GIL), and the
    parts' gradients are summed in a fixed order: the step on the whole batch up to float rounding,
    deterministic, and on 2 cores faster than one backward on 2 intra-op threads
    (bench/bench_teacher_threads.py).
    """
    settings = training_settings(settings)
    out_dir = Path(out_dir)
    # a teacher there is replaced (rmtree) when done; a folder that is not a teacher of ours never is
    refuse_foreign_directory(out_dir, TRAINING_FILE, "a digits teacher directory (model.path)")
    generator = torch.Generator().manual_seed(int(settings["seed"]))
    torch.manual_seed(int(settings["seed"]))
    data = TrainingImages(settings)

    scheduler_config = teacher_scheduler_config(settings)
    guidance_teacher = None
    if float(settings["distill_guidance_scale"]) > 0:
        if not settings["init_from"]:
            raise ValueError("model.digits.distill_guidance_scale needs model.digits.init_from (the teacher)")
        guidance_teacher = DigitsBackend.from_pretrained(settings["init_from"])
    if settings["init_from"]:
        base = DigitsBackend.from_pretrained(settings["init_from"])
        if base.task != data.task:
            raise ValueError(f"model.digits.init_from {settings['init_from']} is a teacher of task {base.task!r}; "
                             f"model.digits.task is {data.task!r}")
        unet, tables = base.denoiser.requires_grad_(True).train(), {k: v.clone() for k, v in base.tables.items()}
    else:
        unet = build_unet(settings["block_out_channels"], int(settings["cross_attention_dim"]), data.size,
                          int(settings["attention_heads"]))
        dim = int(settings["cross_attention_dim"])
        # the digit table first: a plain-task teacher draws exactly what it drew before the compose task existed
        tables = {name: torch.randn(len(ATTRIBUTES[name]) + 1, 1, dim, generator=generator) * 0.5
                  for name in TASKS[data.task]}
    tables = torch.nn.ParameterDict({name: torch.nn.Parameter(table) for name, table in tables.items()})
    unet.train()
    ema = {k: v.detach().clone() for k, v in unet.state_dict().items()}
    ema_tables = {name: table.detach().clone() for name, table in tables.items()}
    noise_scheduler = DDPMScheduler(**{k: v for k, v in scheduler_config.items()
                                       if k not in ("set_alpha_to_one", "timestep_spacing")})
    prediction_type = scheduler_config["prediction_type"]
    steps, batch_size = int(settings["train_steps"]), int(settings["batch_size"])
    parameters = list(unet.parameters()) + list(tables.values())
    optimizer = torch.optim.AdamW(parameters, lr=float(settings["learning_rate"]), weight_decay=0.0)
    warmup = min(50, steps // 10)

    def lr_factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        return 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, steps - warmup)))

    def squared_error(x0, x_t, noise, t, indices, reduction: str) -> torch.Tensor:
        """The squared error of the samples given (a batch or a part of one), reduced by ``reduction``."""
        prediction = unet(x_t, t, encoder_hidden_states=attribute_tokens(tables, indices), return_dict=False)[0]
        target = noise if prediction_type == "epsilon" else noise_scheduler.get_velocity(x0, noise, t)
        if guidance_teacher is not None:
            with torch.no_grad():
                w = float(settings["distill_guidance_scale"])
                cond = attribute_tokens(guidance_teacher.tables, indices)
                uncond = guidance_teacher.null_conditioning(x_t.shape[0])["encoder_hidden_states"]
                both = guidance_teacher.denoise(torch.cat([x_t, x_t]), torch.cat([t, t]),
                                                {"encoder_hidden_states": torch.cat([uncond, cond])})
                eps_u, eps_c = both.chunk(2)
                target = eps_u + w * (eps_c - eps_u)
        return F.mse_loss(prediction, target, reduction=reduction)

    threads = int(settings.get("train_threads", 1))
    parts = [part for part in torch.arange(batch_size).tensor_split(threads) if len(part)]
    pool = ThreadPoolExecutor(len(parts)) if len(parts) > 1 else None

    def backward_in_parts(batch: tuple) -> torch.Tensor:
        """Each part's gradient in its own thread, summed in part order into ``.grad``; returns the mean loss."""
        def part_gradients(part):
            error = squared_error(*(x[part] for x in batch[:4]), {k: v[part] for k, v in batch[4].items()}, "sum")
            return error.detach(), torch.autograd.grad(error, parameters, allow_unused=True)

        with torch_threads(1):
            results = list(pool.map(part_gradients, parts))
        count = batch[0].numel()
        for i, parameter in enumerate(parameters):
            grads = [grads[i] for _, grads in results if grads[i] is not None]
            parameter.grad = torch.stack(grads).sum(0) / count if grads else None
        return torch.stack([error for error, _ in results]).sum() / count

    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_factor)
    started = time.perf_counter()
    bar = tqdm(range(steps), desc="train digit teacher", disable=not progress)
    try:
        for step in bar:
            x0, indices = data.batch(batch_size, generator)
            dropped = torch.rand(batch_size, generator=generator) < float(settings["cond_dropout"])
            indices = {name: torch.where(dropped, -1, index) for name, index in indices.items()}  # -1: null token
            noise = torch.randn(x0.shape, generator=generator)
            t = torch.randint(0, noise_scheduler.config.num_train_timesteps, (batch_size,), generator=generator)
            x_t = noise_scheduler.add_noise(x0, noise, t)
            optimizer.zero_grad(set_to_none=True)
            if pool is None:
                loss = squared_error(x0, x_t, noise, t, indices, "mean")
                loss.backward()
            else:
                loss = backward_in_parts((x0, x_t, noise, t, indices))
            torch.nn.utils.clip_grad_norm_(unet.parameters(), 1.0)
            optimizer.step()
            schedule.step()
            with torch.no_grad():
                decay = min(0.995, (1 + step) / (10 + step))  # not bar.n: tqdm updates it only when it redraws
                for key, value in unet.state_dict().items():
                    ema[key].lerp_(value, 1 - decay) if value.is_floating_point() else ema[key].copy_(value)
                for name, table in tables.items():
                    ema_tables[name].lerp_(table.detach(), 1 - decay)
            bar.set_postfix(loss=f"{loss.item():.4f}", refresh=False)
    finally:
        if pool is not None:
            pool.shutdown()
    unet.load_state_dict(ema)
    training = {"settings": settings, "seconds": round(time.perf_counter() - started, 1),
                "num_parameters": sum(p.numel() for p in unet.parameters()),
                "final_loss": round(loss.item(), 5)}
    _save_teacher(out_dir, unet.eval(), ema_tables, training)
    return out_dir


def ensure_digits_teacher(settings, path: str | Path, *, progress: bool = True) -> Path:
    """Train the teacher at ``path`` unless one trained with the same settings is already there."""
    path = Path(path)
    record = path / TRAINING_FILE
    if record.is_file():
        # a teacher trained before a setting existed was trained as that setting's default
        recorded = {**SETTINGS_ADDED_LATER, **json.loads(record.read_text()).get("settings", {})}
        if recorded == {**SETTINGS_ADDED_LATER, **training_settings(settings)}:
            return path
    return train_digits_teacher(settings, path, progress=progress)

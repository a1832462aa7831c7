"""The embedded default: a tiny text-conditioned diffusion model on scikit-learn's digits.

The denoiser is diffusers' ``UNet2DConditionModel`` (self- and cross-attention
transformer blocks, like Stable Diffusion) so LoRA, PAG and the samplers hit
the same code as on real models. "Text" conditioning is one learned token per
attribute the task's prompts name, each from its own embedding table whose last
row is the null token:

- task ``digits`` (16x16 digits): one token, the digit ("a handwritten seven",
  "digit 7"); a prompt naming none gets the null token;
- task ``compose`` (a digit on a larger canvas, ``noiserefine.digits.compose``):
  four tokens, digit, position, size and thickness ("a small thick seven in the
  top left"); an attribute the prompt does not name gets its null token.

The unconditional input (CFG's) is every attribute's null token. The teacher is
trained by the project (``noiserefine.digits.teacher``), saved in diffusers
format and loaded from that directory like any real model; the task is read
from the tables saved with it.
"""

from __future__ import annotations

import itertools
import re
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
import torch
from diffusers import DDIMScheduler, UNet2DConditionModel
from safetensors.torch import load_file, save_file

from .base import Backend, Conditioning

IMAGE_SIZE = 16  # sklearn's 8x8 digits upsampled; the model's latent space is pixel space
DIGIT_WORDS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
NULL_INDEX = 10
EMBEDDING_FILE = "prompt_embedding.safetensors"
# the attributes each task's prompts name, in token order (the digit table is saved as "embedding", the
# others under their names: a teacher directory of the plain task is unchanged)
TASKS = {"digits": ("digit",), "compose": ("digit", "position", "size", "thickness")}
# The compositional task's vocabulary: each attribute's words, in index order (noiserefine/digits/compose.py
# renders them)
ATTRIBUTES: dict[str, tuple[str, ...]] = {
    "digit": DIGIT_WORDS,
    "position": ("top left", "top right", "bottom left", "bottom right"),
    "size": ("small", "large"),
    "thickness": ("thin", "thick"),
}
_PATTERNS = {name: re.compile(r"\b(" + "|".join(re.escape(v) for v in values) + r")\b", re.IGNORECASE)
             for name, values in ATTRIBUTES.items()}


def attribute_prompt(attributes: Mapping[str, int]) -> str:
    """The prompt naming ``attributes`` (indices into :data:`ATTRIBUTES`), e.g. "a small thick seven in the top left"."""
    words = {name: ATTRIBUTES[name][attribute_index(attributes, name)] for name in ATTRIBUTES}
    return f"a {words['size']} {words['thickness']} {words['digit']} in the {words['position']}"


def all_prompts() -> list[str]:
    """Every prompt of the task, one per combination of attribute values (160), in a fixed order."""
    names = list(ATTRIBUTES)
    return [attribute_prompt(dict(zip(names, values)))
            for values in itertools.product(*(range(len(ATTRIBUTES[name])) for name in names))]


def parse_attributes(prompt: str) -> dict[str, int | None]:
    """The attribute indices a prompt names (first match of each attribute's words), ``None`` where it names none."""
    parsed = {}
    for name, pattern in _PATTERNS.items():
        match = pattern.search(prompt)
        parsed[name] = None if match is None else ATTRIBUTES[name].index(match.group(1).lower())
    return parsed


def attribute_index(attributes: Mapping[str, int], name: str) -> int:
    """``attributes[name]`` checked to be an index into ``ATTRIBUTES[name]`` (ValueError naming it otherwise)."""
    if name not in attributes:
        raise ValueError(f"attributes {dict(attributes)} lack {name!r} (expected {sorted(ATTRIBUTES)})")
    value = attributes[name]
    if not isinstance(value, (int, np.integer)) or not 0 <= int(value) < len(ATTRIBUTES[name]):
        raise ValueError(f"attribute {name}={value!r} is not an index into {ATTRIBUTES[name]}")
    return int(value)


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


def attribute_indices(prompts: Sequence[str], attributes: Sequence[str]) -> dict[str, torch.Tensor]:
    """Per attribute, the index each prompt names (``parse_digit`` for the digit, the compositional task's
    words for the others), ``-1`` where it names none."""
    parsed = [parse_attributes(p) for p in prompts] if len(attributes) > 1 else []
    indices = {}
    for name in attributes:
        values = [parse_digit(p) for p in prompts] if name == "digit" else [q[name] for q in parsed]
        indices[name] = torch.tensor([-1 if v is None else v for v in values], dtype=torch.long)
    return indices


def attribute_tokens(tables: Mapping[str, torch.Tensor], indices: Mapping[str, torch.Tensor]) -> torch.Tensor:
    """``(B, A, D)``: each attribute's row of its ``(n + 1, 1, D)`` table, in table order; its last row (the
    null token) where the index is ``-1``."""
    tokens = []
    for name, table in tables.items():
        index = indices[name].to(table.device)
        tokens.append(table[torch.where(index < 0, table.shape[0] - 1, index)])
    return torch.cat(tokens, dim=1)


def build_unet(block_out_channels: Sequence[int], cross_attention_dim: int,
               sample_size: int = IMAGE_SIZE, attention_heads: int = 4) -> UNet2DConditionModel:
    """A ~1M-parameter SD-style UNet for 1 x sample_size x sample_size images (cross-attention in the inner
    blocks). On the 24x24 canvas, dropping the 12x12 level's attention made training 1.35x faster but left the
    digit the prompt names too weak to follow (adherence at most 0.87 at any w, 0.98 with it at w = 2; both
    teachers 800 steps, condition dropout 0.1: bench/results/2026-12-07-compose-teacher.md)."""
    channels = tuple(int(c) for c in block_out_channels)
    depth = len(channels)
    return UNet2DConditionModel(
        sample_size=sample_size, in_channels=1, out_channels=1,
        down_block_types=("DownBlock2D",) + ("CrossAttnDownBlock2D",) * (depth - 1),
        up_block_types=("CrossAttnUpBlock2D",) * (depth - 1) + ("UpBlock2D",),
        block_out_channels=channels, layers_per_block=1, norm_num_groups=8,
        cross_attention_dim=cross_attention_dim, attention_head_dim=attention_heads,
    )


class DigitsBackend(Backend):
    """``embedding``: the digit table ``(11, 1, D)`` (digits 0..9, then null); ``attributes``: the other
    attributes' tables of the ``compose`` task (:data:`TASKS`), none for the plain one."""

    name = "digits"
    scheduler_class = DDIMScheduler

    def __init__(self, unet: UNet2DConditionModel, embedding: torch.Tensor, scheduler_config: dict,
                 device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32,
                 attributes: Mapping[str, torch.Tensor] | None = None):
        self.device = torch.device(device)
        self.dtype = dtype
        unet = unet.to(self.device)
        if dtype != torch.float32:  # passing dtype at all makes diffusers warn, so only when casting
            unet = unet.to(dtype=dtype)
        self.denoiser = unet.eval().requires_grad_(False)
        self.embedding = embedding.to(self.device, dtype)
        attributes = dict(attributes or {})
        self.task = "compose" if attributes else "digits"
        if sorted(attributes) != sorted(TASKS[self.task][1:]):
            raise ValueError(f"attribute tables {sorted(attributes)}: expected none (task digits) or "
                             f"{list(TASKS['compose'][1:])} (task compose)")
        self.attribute_tables = {name: attributes[name].to(self.device, dtype) for name in TASKS[self.task][1:]}
        size = int(unet.config.sample_size)
        self.latent_shape = (1, size, size)
        self.scheduler_config = dict(scheduler_config)

    @property
    def tables(self) -> dict[str, torch.Tensor]:
        """Every attribute's token table, in token order."""
        return {"digit": self.embedding, **self.attribute_tables}

    @classmethod
    def from_pretrained(cls, path: str | Path, revision: str = "", device: str = "cpu",
                        dtype: torch.dtype = torch.float32) -> "DigitsBackend":
        """The teacher directory ``path`` (``revision`` is unused: the digit teacher is always local)."""
        path = Path(path)
        if not (path / "unet").is_dir() or not (path / EMBEDDING_FILE).is_file():
            raise FileNotFoundError(f"no digit teacher at {path} (expected unet/, scheduler/ and "
                                    f"{EMBEDDING_FILE}); train one with `python -m noiserefine.digits.train_teacher`")
        unet = UNet2DConditionModel.from_pretrained(path / "unet")
        scheduler = DDIMScheduler.from_pretrained(path / "scheduler")
        tables = load_file(str(path / EMBEDDING_FILE))
        embedding = tables.pop("embedding")
        return cls(unet, embedding, dict(scheduler.config), device, dtype, attributes=tables)

    def encode_prompts(self, prompts: Sequence[str]) -> Conditioning:
        indices = attribute_indices(prompts, TASKS[self.task])
        return {"encoder_hidden_states": attribute_tokens(self.tables, indices)}

    def null_conditioning(self, batch_size: int) -> Conditioning:
        none = torch.full((batch_size,), -1, dtype=torch.long)
        return {"encoder_hidden_states": attribute_tokens(self.tables, {name: none for name in self.tables})}

    def denoise(self, x_t: torch.Tensor, t: torch.Tensor, cond: Conditioning) -> torch.Tensor:
        # In the model's dtype, out in the caller's (the MSD student rollout runs in float32), as the SD backends do.
        out = self.denoiser(x_t.to(self.dtype), t, encoder_hidden_states=cond["encoder_hidden_states"],
                            return_dict=False)[0]
        return out.to(x_t.dtype)

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        return ((latents.float() + 1) / 2).clamp(0, 1)

    def save_pretrained(self, directory: str | Path) -> None:
        """The layout :meth:`from_pretrained` reads: ``unet/``, ``scheduler/`` and the prompt embedding."""
        directory = Path(directory)
        self.denoiser.save_pretrained(directory / "unet")
        DDIMScheduler.from_config(self.scheduler_config).save_pretrained(directory / "scheduler")
        tables = {"embedding": self.embedding, **self.attribute_tables}
        save_file({name: table.detach().cpu().contiguous() for name, table in tables.items()},
                  str(directory / EMBEDDING_FILE))

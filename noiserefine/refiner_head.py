"""The output head of the one-call refiner (``refiner.form: single_call``).

``x̂_T = x_T + head(h_LoRA(x_T, t_ref, c))``: ``h_LoRA`` is the input of the denoiser's final
projection (UNets' ``conv_out``, DiT's ``proj_out_2``, SD3's and SiT's ``proj_out``) in ONE
forward with the refiner's LoRA on, and ``head`` is a new layer of that projection's shape whose
weight and bias start at zero. Inside the refiner forward a forward hook makes the denoiser
return ``head(h)`` instead of ``projection(h)`` (and anything after the projection, such as a
transformer's unpatchify, still runs on it), so the one call yields the correction itself.

Why this form:

- **Exact identity at initialisation.** A convolution or linear map with all-zero weights and
  bias gives exactly ±0 for every finite input (each product is ±0, every sum of zeros is 0, in
  any summation order or algorithm), and ``x + ±0 == x`` in IEEE arithmetic, so ``x̂_T == x_T``
  bit for bit on every device.
- **No base prediction in the correction.** The simpler gate ``x_T + g * eps_LoRA(x_T)`` is the
  special case ``head = g * projection``: its correction carries the base prediction
  ``g * eps(x_T)`` (of the size of the noise itself), which the low-rank LoRA would have to
  cancel. A head of its own reads the final features the way it needs to.
- **It trains from the first step.** At zero the head's gradient is ``features x dL/dx̂``, which
  is not zero, so step 1 moves the head; from then on the LoRA receives gradient through it
  (ControlNet's zero convolutions start the same way).
"""

from __future__ import annotations

import contextlib
import copy
from collections.abc import Iterator

import torch
from peft.tuners.tuners_utils import BaseTunerLayer

# The final projection of each supported denoiser family, tried in this order.
OUTPUT_LAYERS = ("conv_out", "proj_out_2", "proj_out")  # UNet2D(Condition)Model; DiT; SD3 and SiT transformers


def output_layer(denoiser: torch.nn.Module) -> torch.nn.Module:
    """The denoiser's final projection (``ValueError`` naming the class when it has none of ``OUTPUT_LAYERS``)."""
    for name in OUTPUT_LAYERS:
        layer = getattr(denoiser, name, None)
        if isinstance(layer, (torch.nn.Conv2d, torch.nn.Linear, BaseTunerLayer)):
            return layer
    raise ValueError(f"refiner.form single_call needs the denoiser's final projection (one of {OUTPUT_LAYERS}); "
                     f"{type(denoiser).__name__} has none; use refiner.form=difference")


def zero_head(denoiser: torch.nn.Module, dtype: torch.dtype) -> torch.nn.Module:
    """A copy of the denoiser's final projection (the base layer under any LoRA on it) with weight and bias
    zero, trainable, in ``dtype`` (the LoRA's: peft keeps adapters of half-precision models in float32)."""
    layer = output_layer(denoiser)
    base = layer.get_base_layer() if isinstance(layer, BaseTunerLayer) else layer
    head = copy.deepcopy(base).to(dtype=dtype)
    for parameter in head.parameters():
        torch.nn.init.zeros_(parameter)
        parameter.requires_grad_(True)
    return head


@contextlib.contextmanager
def head_replaces_output(denoiser: torch.nn.Module, head: torch.nn.Module) -> Iterator[None]:
    """Inside the ``with``, the final projection returns ``head(its input)``; the hook is always removed."""
    dtype = next(head.parameters()).dtype

    def replace(module, args, output):
        return head(args[0].to(dtype)).to(output.dtype)

    handle = output_layer(denoiser).register_forward_hook(replace)
    try:
        yield
    finally:
        handle.remove()

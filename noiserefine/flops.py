"""FLOPs counted exactly with torch's ``FlopCounterMode``, the device's peak, and model FLOPs utilisation.

``count(fn)`` runs ``fn`` once under ``torch.utils.flop_counter.FlopCounterMode`` and returns the FLOPs of its
matrix products, convolutions and attention (forward and, if ``fn`` calls ``backward()``, backward: 2 FLOPs per
multiply-add; elementwise ops, norms and the optimizer are not counted, as is usual for MFU). On the CPU torch
picks a fused attention kernel (``_scaled_dot_product_flash_attention_for_cpu``) that torch's table lacks; it is
counted here with torch's own attention formulas, so the CPU and GPU counts of a model agree.

Achieved FLOP/s = counted FLOPs / measured seconds; MFU = achieved / peak. The peak is the datasheet's dense
bf16 Tensor Core figure of a known GPU (``PEAKS``) or, on the CPU, a measured matmul roofline.

:func:`architecture_forward_flops` counts one sample-forward of a shipped architecture's denoiser built on the
``meta`` device (shapes only: no weights, no memory, no arithmetic), for ``python -m noiserefine.capacity``;
``bench/gpu/`` counts the timed workloads themselves.
"""

from __future__ import annotations

import time

import torch
from torch.utils import flop_counter
from torch.utils.flop_counter import FlopCounterMode

aten = torch.ops.aten

# Dense bf16 Tensor Core peak in FLOP/s, by a substring of torch.cuda.get_device_name() (most specific first).
# NVIDIA's H100 datasheet (nvidia.com/en-us/data-center/h100/, "H100 Tensor Core GPU" datasheet) and H200
# datasheet (nvidia.com/en-us/data-center/h200/) list BFLOAT16 Tensor Core 1,979 TFLOPS (SXM) and 1,513 TFLOPS
# (H100 PCIe) "with sparsity"; their footnote: dense is one half. The H200 is the same GH100 compute as the
# H100 SXM (more and faster memory only). torch names them "NVIDIA H100 80GB HBM3" (SXM), "NVIDIA H100 PCIe",
# "NVIDIA H200".
PEAKS = (
    ("H100 PCIe", 756.5e12, "NVIDIA H100 datasheet: BF16 Tensor Core 1,513 TFLOPS with sparsity (PCIe), dense = 1/2"),
    ("H100", 989.5e12, "NVIDIA H100 datasheet: BF16 Tensor Core 1,979 TFLOPS with sparsity (SXM), dense = 1/2"),
    ("H200", 989.5e12, "NVIDIA H200 datasheet: BF16 Tensor Core 1,979 TFLOPS with sparsity (SXM), dense = 1/2"),
)


def _cpu_attention(query_shape, key_shape, value_shape, *args, out_shape=None, **kwargs) -> int:
    return flop_counter.sdpa_flop_count(query_shape, key_shape, value_shape)


def _cpu_attention_backward(grad_out_shape, query_shape, key_shape, value_shape, *args, out_shape=None,
                            **kwargs) -> int:
    return flop_counter.sdpa_backward_flop_count(grad_out_shape, query_shape, key_shape, value_shape)


_CPU_ATTENTION = {aten._scaled_dot_product_flash_attention_for_cpu: _cpu_attention,
                  aten._scaled_dot_product_flash_attention_for_cpu_backward: _cpu_attention_backward}


def count(fn) -> tuple[int, object]:
    """``(FLOPs, fn())`` of one call of ``fn`` (matmuls, convolutions, attention; forward and backward)."""
    with FlopCounterMode(display=False, custom_mapping=_CPU_ATTENTION) as counter:
        out = fn()
    return int(counter.get_total_flops()), out


def count_linear_in_steps(fn) -> dict:
    """FLOPs of ``fn(n)`` as ``fixed + n * per_step``, counted exactly at n = 1 and n = 2.

    Each step of a rollout runs the same network on the same shapes, so two counts give every N exactly; the
    timed runs need not run under the (slow) counter."""
    one, _ = count(lambda: fn(1))
    two, _ = count(lambda: fn(2))
    return {"fixed": one - (two - one), "per_step": two - one}


def at_steps(linear: dict, steps: int) -> int:
    return linear["fixed"] + steps * linear["per_step"]


def sample_forward_flops(backend) -> int:
    """FLOPs of one denoiser forward of one sample (batch 1, the null conditioning: a prompt's has its shapes),
    counted on the backend's own device (``meta``: shapes only)."""
    x = torch.zeros(1, *backend.latent_shape, device=backend.device, dtype=backend.dtype)
    cond, t = backend.null_conditioning(1), torch.tensor(500.0, device=backend.device)
    with torch.no_grad():
        return count(lambda: backend.denoise(x, t, cond))[0]


def architecture_forward_flops(architecture: str) -> int:
    """:func:`sample_forward_flops` of a shipped architecture (``backends/architectures/``), built on ``meta``."""
    import warnings
    from types import SimpleNamespace

    from .backends import load_backend
    from .backends.random_init import RandomWeightsWarning
    from .backends.registry import family_of_architecture

    spec = SimpleNamespace(backend=family_of_architecture(architecture).name, init="random", architecture=architecture,
                           device="meta", dtype="float32", path="", revision="")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RandomWeightsWarning)  # meta: there are no weights at all
        return sample_forward_flops(load_backend(spec))


def gpu_peak(device_name: str) -> dict:
    """The known peak of the GPU called ``device_name`` (``peak_flop_per_s`` None when it is not in PEAKS)."""
    for key, peak, source in PEAKS:
        if key.lower() in device_name.lower():
            return {"device": device_name, "peak_flop_per_s": peak, "peak_source": source}
    return {"device": device_name, "peak_flop_per_s": None, "peak_source": "unknown device: no MFU"}


def cpu_matmul_roofline(dtype: torch.dtype = torch.float32, size: int = 256, repeats: int = 5) -> dict:
    """Measured peak of this CPU: the best of ``repeats`` timed ``size``-cubed matmuls (2 * size**3 FLOPs each)."""
    a = torch.randn(size, size, dtype=dtype, generator=torch.Generator().manual_seed(0))
    b = torch.randn(size, size, dtype=dtype, generator=torch.Generator().manual_seed(1))
    torch.mm(a, b)  # warm-up
    best = float("inf")
    for _ in range(repeats):
        started = time.perf_counter()
        torch.mm(a, b)
        best = min(best, time.perf_counter() - started)
    return {"device": "cpu", "peak_flop_per_s": 2 * size**3 / best,
            "peak_source": f"measured: best of {repeats} {size}x{size} {str(dtype).removeprefix('torch.')} matmuls, "
                           f"{torch.get_num_threads()} thread(s)"}


def device_peak(device: torch.device, dtype: torch.dtype) -> dict:
    if device.type == "cuda":
        return gpu_peak(torch.cuda.get_device_name(device))
    return cpu_matmul_roofline(dtype)


def utilisation(flops: int, seconds: float, peak: dict) -> dict:
    """Achieved FLOP/s of ``flops`` done in ``seconds`` and its fraction of ``peak`` (``mfu`` None if unknown)."""
    achieved = flops / seconds if seconds > 0 else None
    top = peak.get("peak_flop_per_s")
    return {"flops": flops, "achieved_flop_per_s": achieved,
            "mfu": round(achieved / top, 4) if achieved is not None and top else None}

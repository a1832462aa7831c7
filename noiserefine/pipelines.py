"""Use a trained refiner with a stock diffusers pipeline: refined ``latents`` for ``pipe(..., latents=...)``.

    import torch
    from diffusers import StableDiffusionPipeline
    from noiserefine.pipelines import refined_latents, unguided_call_kwargs

    pipe = StableDiffusionPipeline.from_pretrained("/models/sd21", torch_dtype=torch.float16).to("cuda")
    prompts = ["a photo of an astronaut riding a horse"] * 4
    latents = refined_latents(pipe, "runs/sd21/refiner", prompts, seeds=[0, 1, 2, 3])
    # a refiner trained for a range of guidance scales: refined_latents(..., guidance_scale=5.0)
    images = pipe(prompts, latents=latents, **unguided_call_kwargs(pipe)).images
    # unguided_call_kwargs: num_inference_steps of the refiner's student, guidance_scale=1.0
    # (0.0 works the same: CFG is off for any scale <= 1; SD-Turbo's own examples use 0.0), pag_scale=0.0 on
    # PAG pipelines.

What :func:`refined_latents` does to the pipeline, and why:

- **Scheduler.** A refiner is trained against one sampler (``sampler.json`` in its
  directory: DDIM eta=0 with the model's betas, prediction type, timestep spacing,
  ``steps_offset`` and ``set_alpha_to_one``). The pipeline's scheduler is replaced by
  exactly that one (``pipe.scheduler = DDIMScheduler.from_config(...)``), so the
  pipeline's unguided sampling is bit for bit the rollout the refiner was trained
  through (``tests/test_stock_pipelines.py``). A pipeline whose scheduler says its
  model has another noise schedule or prediction type (``MODEL_SCHEDULE_KEYS``: betas,
  ``num_train_timesteps``, ``prediction_type``, ...) is refused: that is another model.
  Stock SD 1.5 ships PNDM and SD-Turbo/SDXL Euler; after this call they sample with DDIM.
- **Refiner.** The LoRA is attached to the pipeline's OWN denoiser (``pipe.unet`` /
  ``pipe.transformer``; no second copy of the model) as adapter "refiner", active only
  inside the refiner forward: the pipeline's outputs are bit-identical with and without
  it. Adapters already loaded (``pipe.load_lora_weights``: a style LoRA) stay as they
  are and also apply inside the refiner forward, which is the zero-shot transfer of a
  refiner to that variant. The modules' ``requires_grad`` flags are left as they were
  (they select CPU kernels). Attached once per pipeline and refiner (directory and content).
- **Noise.** ``x_T`` of each seed comes from ``noiserefine.noise`` (a CPU generator per
  seed, float32), is refined in the denoiser's dtype on its device, and is returned in
  the denoiser's dtype: the same noise the teacher cache and the trainer use for that seed.

Pass the latents as they are: pipelines multiply them by ``scheduler.init_noise_sigma``
(1 for DDIM). Latents are made at the pipeline's default resolution (the denoiser's
``sample_size``); call after ``pipe.to(device)`` (model CPU offload is not supported).

``StableDiffusion3Pipeline`` works like the SD pipelines (its own flow-matching Euler
scheduler, CFG off at ``guidance_scale`` 1). ``DiTPipeline`` takes no ``latents=``: wrap
its call in :func:`dit_latents`. There is no stock SiT pipeline; use
``python -m noiserefine.sample`` for SiT.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from pathlib import Path

import torch

from .backends.base import Backend
from .backends.registry import family_for_pipeline
from .noise import noise_from_seeds
from .hashing import file_sha256, tree_sha256
from .refiner import CONFIG_FILE, Refiner, detach_refiner, load_refiner
from .refiner_scales import refiner_guidance_scale, saved_refiner_config
from .sampler_record import SAMPLER_FILE, check_model_schedule, read_sampler_record

_ATTACHED = "_noiserefine_refiner"  # pipeline attribute: (refiner directory, Refiner, its files' sha256)


def _record(refiner_dir: Path) -> dict:
    record = read_sampler_record(refiner_dir)
    if record is None:
        raise ValueError(f"{refiner_dir} has no {SAMPLER_FILE}: cannot tell which sampler the refiner was trained "
                         "against (re-export it with this version's save_refiner)")
    return record


def _scheduler(record: dict):
    import diffusers

    return getattr(diffusers, record["scheduler_class"]).from_config(record["scheduler_config"])


def backend_for_pipeline(pipe, record: dict) -> Backend:
    """A backend around the pipeline's own modules (nothing copied, moved or cast), sampling with ``record``'s sampler.

    The family comes from the pipeline's class (``backends/registry.py``). ``ValueError`` for a pipeline of
    no registered class (naming the registered ones), or whose text encoders are in another dtype than its
    denoiser (the backend would cast them, changing the pipeline).
    """
    family = family_for_pipeline(pipe)
    return family.backend_class().from_pipeline(pipe, type(_scheduler(record)), dict(record["scheduler_config"]))


def use_refiner_sampler(pipe, refiner_dir: str | Path) -> None:
    """Set ``pipe.scheduler`` to the sampler ``refiner_dir`` was trained against (refuse another model's schedule)."""
    refiner_dir = Path(refiner_dir)
    record = _record(refiner_dir)
    check_model_schedule(record, pipe.scheduler.config, refiner_dir)
    scheduler = _scheduler(record)
    if type(pipe.scheduler) is not type(scheduler) or dict(pipe.scheduler.config) != dict(scheduler.config):
        pipe.scheduler = scheduler


def attach_refiner(pipe, refiner_dir: str | Path) -> Refiner:
    """The refiner of ``refiner_dir`` on the pipeline's own denoiser (once; another directory, other files in it
    (another refiner saved there), or a ``pipe.to`` to another device or dtype, attaches it again), with the pipeline's scheduler set to the refiner's sampler.
    Pipeline outputs are unchanged by the attachment."""
    refiner_dir = Path(refiner_dir).resolve()
    use_refiner_sampler(pipe, refiner_dir)
    # the cache is keyed by content, not path: another refiner saved into the same directory is loaded
    version = (tree_sha256(refiner_dir), file_sha256(refiner_dir / CONFIG_FILE))  # memoised: no re-reading
    attached = getattr(pipe, _ATTACHED, None)
    if attached is not None and attached[0] == refiner_dir and attached[2] == version:
        denoiser, backend = attached[1].denoiser, attached[1].backend
        if (denoiser.device, denoiser.dtype) == (backend.device, backend.dtype):
            return attached[1]
        # pipe.to(...) since: the backend would run on the old device/dtype; build it again
    if attached is not None:
        detach_refiner(attached[1].denoiser)
        setattr(pipe, _ATTACHED, None)
    # The backend freezes modules (requires_grad False) and the Refiner marks its LoRA trainable. Put every
    # flag back: on the CPU, F.linear on a non-contiguous input (SDXL's proj_in) takes another kernel when its
    # weight requires grad, even under no_grad, so a flipped flag alone changes the pipeline's float32 bits.
    flags = [(p, p.requires_grad) for module in pipe.components.values() if isinstance(module, torch.nn.Module)
             for p in module.parameters()]
    try:
        backend = backend_for_pipeline(pipe, _record(refiner_dir))
        refiner = load_refiner(refiner_dir, backend)
    finally:
        for parameter, flag in flags:
            parameter.requires_grad_(flag)
    for parameter in refiner.trainable_parameters():
        parameter.requires_grad_(False)  # inference only
    setattr(pipe, _ATTACHED, (refiner_dir, refiner, version))
    return refiner


def refined_latents(pipe, refiner_dir: str | Path, prompts: str | Sequence[str | int],
                    seeds: Sequence[int], guidance_scale: float | None = None) -> torch.Tensor:
    """Refined ``x_T`` for ``pipe(prompts, latents=..., **unguided_call_kwargs(pipe))``: one per seed.

    ``prompts``: one prompt for every seed, or one per seed (DiT: class ids or names).
    ``guidance_scale``: the w to refine for, needed by a refiner trained for a range of scales; a refiner of
    one scale takes none or its own (``noiserefine.refiner_scales``: the rules and errors). It is the
    refiner's w: the pipeline call itself stays unguided (``unguided_call_kwargs``).
    Returned on the denoiser's device in its dtype, shape ``(len(seeds), C, H, W)``.
    Sets the pipeline's scheduler and attaches the refiner (see the module docstring).
    """
    seeds = [int(seed) for seed in seeds]
    if not seeds:
        raise ValueError("seeds is empty")
    prompts = [prompts] * len(seeds) if isinstance(prompts, (str, int)) else [str(p) for p in prompts]
    if len(prompts) != len(seeds):
        raise ValueError(f"{len(prompts)} prompts for {len(seeds)} seeds; give one prompt, or one per seed")
    w = refiner_guidance_scale(saved_refiner_config(refiner_dir), guidance_scale, refiner_dir)
    refiner = attach_refiner(pipe, refiner_dir)
    backend = refiner.backend
    noise = noise_from_seeds(seeds, backend.latent_shape).to(backend.device)
    with torch.no_grad():
        latents = refiner.refine(noise, [str(p) for p in prompts], guidance_scale=w)
    return latents.to(backend.dtype)


def unguided_call_kwargs(pipe, refiner_dir: str | Path | None = None) -> dict:
    """``num_inference_steps`` (the refiner's student steps), ``guidance_scale=1.0`` (CFG off) and, on PAG
    pipelines, ``pag_scale=0.0``: the pipeline arguments of the unguided sampling the refiner was trained for."""
    if refiner_dir is None:
        attached = getattr(pipe, _ATTACHED, None)
        if attached is None:
            raise ValueError("no refiner attached to this pipeline; call refined_latents first or pass refiner_dir")
        refiner_dir = attached[0]
    kwargs = {"num_inference_steps": int(_record(Path(refiner_dir))["num_steps"]), "guidance_scale": 1.0}
    if hasattr(pipe, "set_pag_applied_layers"):
        kwargs["pag_scale"] = 0.0
    return kwargs


@contextlib.contextmanager
def dit_latents(pipe, latents: torch.Tensor) -> Iterator[None]:
    """``DiTPipeline.__call__`` draws its own noise (no ``latents=``): inside this block it starts from ``latents``.

        latents = refined_latents(pipe, refiner_dir, ["207"] * 4, seeds=range(4))
        with dit_latents(pipe, latents):
            images = pipe(class_labels=[207] * 4, **unguided_call_kwargs(pipe)).images

    Patches ``randn_tensor`` of diffusers' DiT pipeline module for the block only;
    the requested shape must be the latents' shape.
    """
    from diffusers.pipelines.dit import pipeline_dit

    original = pipeline_dit.randn_tensor

    def given(shape, generator=None, device=None, dtype=None, layout=None):
        if tuple(shape) != tuple(latents.shape):
            raise ValueError(f"DiTPipeline asked for noise of shape {tuple(shape)}; the latents are "
                             f"{tuple(latents.shape)} (one class label per latent)")
        return latents.to(device=device, dtype=dtype)

    pipeline_dit.randn_tensor = given
    try:
        yield
    finally:
        pipeline_dit.randn_tensor = original

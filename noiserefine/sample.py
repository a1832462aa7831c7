"""Sample images with a trained refiner: refined noise -> unguided sampler -> PNG.

    python -m noiserefine.sample --refiner runs/sd21/refiner --prompt "a corgi on a beach" --seeds 0-7 \
        --out samples/corgi [--compare] [--guidance-scale W] [--config configs/sd21.yaml] [key=value ...]

The model and sampler come from ``--config`` (repeatable) or, without it, from the
refiner's own ``config.yaml`` (the resolved training config); ``key=value``
overrides apply last (``model.path=...``, ``model.device=cuda``). The refiner is
loaded with :func:`noiserefine.refiner.load_refiner`, which refuses a model of another
architecture or another sampler. Every prompt is sampled with every seed; ``x_T`` of
a seed is ``noiserefine.noise.noise_from_seed`` (a CPU generator, float32), the noise
the teacher cache and the trainer use.

Written to ``--out``: ``refined/<prompt index>_<seed>.png`` (refined noise, unguided,
``student.num_steps`` or ``--steps`` steps); with ``--compare`` also ``guided/``
(the teacher's guidance from the same ``x_T``, same steps), ``unguided/`` (plain
``x_T``) and ``compare/`` (guided | unguided | refined side by side); ``prompts.json``
(index -> prompt), ``sample.json`` (the arguments, steps and network calls per image)
and ``config.yaml`` (the resolved config). ``--out`` must be new, empty or a folder of this command (it holds
``sample.json``): a user's other folder is refused before anything in it is replaced. ``--seeds`` gives at most
:data:`MAX_IMAGES` seeds (prompts x seeds images), counted before they are listed.

``--guidance-scale W``: the w a refiner trained for a range of scales refines for (required for one; a refiner of
one scale takes none or its own: ``noiserefine.refiner_scales`` has the rules). With ``--compare`` the guided
row uses the same w (``teacher.guidance_scale=W``). Recorded in ``sample.json``.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path

import torch
from tqdm.auto import tqdm

from .config import refiner_run_config, save_config
from .files import refuse_foreign_directory, write_text_atomic

SAMPLE_FILE = "sample.json"


MAX_IMAGES = 1_000_000  # per command: a typo like 0-1000000000000 must fail at once, not fill the memory
MAX_SEED = 2**64 - 1  # torch.Generator.manual_seed's range


def parse_seeds(text: str) -> list[int]:
    """``"0-7"``, ``"3"``, ``"0,4,9"`` or ``"0-3,10-11"`` -> the seeds in order (ranges inclusive); at most
    :data:`MAX_IMAGES` of them, counted before any list is built."""
    ranges: list[tuple[int, int]] = []
    for part in text.split(","):
        part = part.strip()
        match = re.fullmatch(r"(\d+)(?:-(\d+))?", part)
        if match is None:
            raise ValueError(f"--seeds: {part!r} is not N or N-M (in {text!r})")
        start, stop = int(match.group(1)), int(match.group(2) or match.group(1))
        if stop < start:
            raise ValueError(f"--seeds: range {part!r} runs backwards")
        if stop > MAX_SEED:
            raise ValueError(f"--seeds: {part!r} goes past the generator's largest seed 2**64 - 1")
        ranges.append((start, stop))
    count = sum(stop - start + 1 for start, stop in ranges)
    if count > MAX_IMAGES:
        raise ValueError(f"--seeds {text!r} is {count} seeds; at most {MAX_IMAGES} per command")
    return [seed for start, stop in ranges for seed in range(start, stop + 1)]


def read_prompts(prompts: list[str], prompts_file: str | None) -> list[str]:
    """The ``--prompt`` values, then the ``--prompts-file`` lines (UTF-8, blank lines skipped)."""
    from .targets.prompts import read_text_prompts

    out = list(prompts)
    if prompts_file:
        out += [line.strip() for line in read_text_prompts(prompts_file) if line.strip()]
    if not out:
        raise ValueError("give at least one --prompt or a --prompts-file with prompts")
    return out


def save_png(image01: torch.Tensor, path: Path) -> None:
    from PIL import Image

    array = (image01.detach().float().clamp(0, 1) * 255).round().to(torch.uint8).permute(1, 2, 0).cpu().numpy()
    if array.shape[2] == 1:
        array = array[:, :, 0]
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array).save(path, format="PNG")


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m noiserefine.sample", description=__doc__.splitlines()[0])
    p.add_argument("--refiner", required=True, help="refiner directory (refiner.safetensors, config.yaml, sampler.json) "
                   "or Hub repo id OWNER/NAME (noiserefine/hub_refs.py: ./OWNER/NAME is a directory)")
    p.add_argument("--config", action="append", default=[],
                   help="YAML config (repeatable); default: the refiner's config.yaml")
    p.add_argument("--prompt", action="append", default=[], help="a prompt (repeatable); DiT/SiT: a class id or name")
    p.add_argument("--prompts-file", help="one prompt per line")
    p.add_argument("--seeds", default="0-3", help="seeds: N, N-M, or a comma list of those (default 0-3)")
    p.add_argument("--out", required=True, help="output directory")
    p.add_argument("--compare", action="store_true", help="also sample guided and unguided from the same noise")
    p.add_argument("--guidance-scale", type=float, default=None,
                   help="w to refine for: required by a refiner trained for a range of guidance scales; with "
                        "--compare also the guided row's scale")
    p.add_argument("--steps", type=int, default=0, help="sampler steps (default: the refiner's student steps)")
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--no-progress", action="store_true")
    p.add_argument("overrides", nargs="*", help="key=value config overrides, applied last")
    return p


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    seeds, prompts = parse_seeds(args.seeds), read_prompts(args.prompt, args.prompts_file)
    if args.batch_size < 1 or args.steps < 0:
        raise ValueError(f"--batch-size must be >= 1 and --steps >= 0, got {args.batch_size}, {args.steps}")
    if len(prompts) * len(seeds) > MAX_IMAGES:
        raise ValueError(f"{len(prompts)} prompts x {len(seeds)} seeds is {len(prompts) * len(seeds)} images; at "
                         f"most {MAX_IMAGES} per command")
    out = Path(args.out)
    refuse_foreign_directory(out, SAMPLE_FILE, "an output folder of python -m noiserefine.sample (--out)")
    # the guided row of --compare at the refiner's w
    at_w = [] if args.guidance_scale is None else [f"teacher.guidance_scale={args.guidance_scale!r}"]
    refiner_dir, cfg = refiner_run_config(args.refiner, args.config, args.overrides + at_w)
    from .refiner_scales import refiner_guidance_scale, saved_refiner_config

    guidance_scale = refiner_guidance_scale(saved_refiner_config(refiner_dir), args.guidance_scale,
                                            f"--refiner {refiner_dir} --guidance-scale")

    from .backends import load_backend
    from .noise import noise_from_seeds
    from .refiner import load_refiner
    from .guidance import guider_identity, make_guider, network_calls
    from .performance import apply_levers
    from .sampling import rollout

    backend = load_backend(cfg.model)
    refiner = load_refiner(refiner_dir, backend)
    apply_levers(backend, cfg.performance)  # after the refiner's LoRA is attached
    steps = args.steps or int(refiner.sampler["num_steps"])
    guidance = make_guider(cfg.teacher)
    # sample.json first: it marks the folder as this command's (see files.refuse_foreign_directory)
    write_text_atomic(out / SAMPLE_FILE, json.dumps({
        "refiner": str(refiner_dir.resolve()), "seeds": seeds, "steps": steps, "compare": args.compare,
        "refiner_guidance_scale": guidance_scale,
        "nfe_per_image": {"refined": steps + refiner.network_calls, "unguided": steps, "guided": network_calls(guidance, steps)},
        "guidance": guider_identity(guidance)}, indent=2) + "\n")
    save_config(cfg, out / "config.yaml")
    write_text_atomic(out / "prompts.json", json.dumps(dict(enumerate(prompts)), indent=2, ensure_ascii=False) + "\n")

    jobs = [(index, prompt, seed) for index, prompt in enumerate(prompts) for seed in seeds]
    bar = tqdm(total=len(jobs), desc="sample", unit="image", disable=args.no_progress, dynamic_ncols=True)
    for start in range(0, len(jobs), args.batch_size):
        batch = jobs[start:start + args.batch_size]
        batch_prompts = [prompt for _, prompt, _ in batch]
        noise = noise_from_seeds([seed for _, _, seed in batch], backend.latent_shape, backend.device, backend.dtype)
        cond = backend.encode_prompts(batch_prompts)
        rows = {}
        with torch.no_grad():
            refined = refiner.refine(noise, batch_prompts, guidance_scale=guidance_scale).to(backend.dtype)
            rows["refined"] = backend.decode(rollout(backend, refined, cond, steps))
            if args.compare:
                rows["guided"] = backend.decode(rollout(backend, noise, cond, steps, guidance))
                rows["unguided"] = backend.decode(rollout(backend, noise, cond, steps))
        for i, (index, _, seed) in enumerate(batch):
            name = f"{index:04d}_{seed}.png"
            for row, images in rows.items():
                save_png(images[i], out / row / name)
            if args.compare:
                save_png(torch.cat([rows["guided"][i], rows["unguided"][i], rows["refined"][i]], dim=2),
                         out / "compare" / name)
        bar.update(len(batch))
    bar.close()
    print(f"{len(jobs)} images ({len(prompts)} prompt(s) x {len(seeds)} seed(s), {steps} steps) in {out}"
          + (" (compare/: guided | unguided | refined)" if args.compare else ""), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())

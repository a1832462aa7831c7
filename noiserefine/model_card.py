"""The model card (``README.md``) of an exported refiner: the Hub's metadata and what the refiner was trained against.

The YAML header is ``huggingface_hub.ModelCardData``'s own (``base_model``, ``library_name``, ``tags``,
``pipeline_tag``); the body says which model, teacher guidance, sampler and data the refiner was
trained against, the run's latest evaluation numbers (``eval_log.csv`` of ``train.output_dir``, if
any) and how to use it. :func:`noiserefine.refiner.save_refiner` writes it with every export.
"""

from __future__ import annotations

import csv
import json
from pathlib import Path

from omegaconf import OmegaConf

from .files import write_text_atomic
from .hub_refs import CARD_FILE, hub_repo_id

LIBRARY_NAME = "noiserefine"
REPO_PLACEHOLDER = "OWNER/NAME"  # the usage snippet's repo id until ``hub push`` names it
# what a family's prompts are: class-conditional DiT/SiT have no Hub task of their own
_PIPELINE_TAGS = {"digits": "text-to-image", "stable_diffusion": "text-to-image", "sdxl": "text-to-image",
                  "sd3": "text-to-image"}


def hub_model_id(path: str) -> str | None:
    """``path`` if it is a Hub model id (``owner/name``, not a local folder: ``hub.py``'s rule), else None."""
    repo_id = hub_repo_id(path)
    return repo_id if repo_id and "/" in repo_id and not Path(repo_id).exists() else None


def latest_evaluation(run_dir: Path) -> tuple[int, list[dict]] | None:
    """The rows of the newest step of ``run_dir/eval_log.csv``: (step, rows), or None without one."""
    from .evaluation.evaluator import EVAL_LOG

    path = Path(run_dir) / EVAL_LOG
    if not path.is_file():
        return None
    with open(path, newline="") as handle:
        rows = [row for row in csv.DictReader(handle) if row.get("step", "").isdigit()]
    if not rows:
        return None
    step = max(int(row["step"]) for row in rows)
    return step, [row for row in rows if int(row["step"]) == step]


def _evaluation_section(run_dir: Path) -> str:
    latest = latest_evaluation(run_dir)
    if latest is None:
        return "No evaluation was recorded for this run (`train.eval_every`, `eval.metrics`).\n"
    step, rows = latest
    metrics = [key for key in rows[0] if key not in ("step", "row")]
    lines = [f"The training run's periodic evaluation at step {step} (held-out seeds, `eval_log.csv`):", "",
             "| row | " + " | ".join(metrics) + " |", "|---" * (len(metrics) + 1) + "|"]
    lines += ["| " + " | ".join([row["row"], *(row[key] for key in metrics)]) + " |" for row in rows]
    return "\n".join(lines) + "\n"


def card_content(cfg, sampler: dict | None, run_dir: Path, repo_hint: str = REPO_PLACEHOLDER) -> str:
    """The card's text: Hub metadata (``ModelCardData.to_yaml``) then the body."""
    from huggingface_hub import ModelCardData

    model, teacher = cfg.model, cfg.teacher
    base = hub_model_id(str(model.path)) if model.init == "pretrained" else None
    tags = ["noiserefine", "noise-refiner", "guidance-distillation", "lora", str(model.backend)]
    data = ModelCardData(base_model=base, library_name=LIBRARY_NAME, tags=tags,
                         pipeline_tag=_PIPELINE_TAGS.get(str(model.backend)), license=None)
    sampler = sampler or {}
    sources = ", ".join(f"{s.kind}" + (f" ({s.path})" if s.path else "") + f" x{s.weight:g}"
                        for s in cfg.data.sources)
    scales = list(cfg.data.guidance_scales) or [teacher.guidance_scale]
    guidance = f"{teacher.guidance}, scale {', '.join(f'{w:g}' for w in scales)}"
    if teacher.guidance == "cfg_pag":
        guidance += f", PAG scale {teacher.pag_scale:g} on {list(teacher.pag_layers)}"
    if teacher.guider_args:
        guidance += f", arguments {json.dumps(OmegaConf.to_container(teacher.guider_args))}"
    steps = sampler.get("num_steps", cfg.student.num_steps)
    scale_arg = f", guidance_scale={scales[0]:g}" if cfg.refiner.guidance_timestep_slope > 0 else ""
    body = f"""
# NoiseRefine refiner ({model.backend})

A noise refiner ("A Noise is Worth Diffusion Guidance", ICLR 2026): a LoRA on the model's own denoiser
that maps Gaussian noise `x_T` to refined noise from which the **unguided** sampler gives guided-quality
images (no guidance at sampling time).

## Trained against

- model: `{model.path}`{f" (revision `{model.revision}`)" if model.revision else ""}, backend `{model.backend}`, \
denoiser `{sampler.get("denoiser_class", "?")}`, {model.init} weights, {model.dtype}
- teacher guidance: {guidance}, {teacher.num_steps} steps
- sampler (use the same): `{sampler.get("scheduler_class", "?")}`, {steps} steps, unguided
- data: {cfg.data.num_samples} samples from {sources}
- training: {cfg.train.max_steps} steps, global batch {cfg.train.global_batch_size}, loss `{cfg.train.loss}`, \
learning rate {cfg.train.learning_rate:g}, LoRA rank {cfg.refiner.lora_rank}

## Evaluation

{_evaluation_section(run_dir)}
## Usage

With the `noiserefine` package installed (its repository: `pip install -e .`):

```bash
python -m noiserefine.sample --refiner {repo_hint} --prompt "a prompt" --seeds 0-3 --out samples --compare
```

```python
from noiserefine.backends import load_backend
from noiserefine.config import load_config
from noiserefine.hub_refs import resolve_refiner
from noiserefine.refiner import load_refiner

directory = resolve_refiner("{repo_hint}")  # a Hub repo id, or a local directory given as a path
backend = load_backend(load_config(directory / "config.yaml").model)
refiner = load_refiner(directory, backend)  # refuses another architecture or sampler
refined = refiner.refine(noise, prompts{scale_arg})  # pass as `latents` to an unguided pipeline
```

The files: `refiner.safetensors` (the LoRA, safetensors), `config.yaml` (the resolved training config),
`sampler.json` (the denoiser and sampler it was trained against).
"""
    return f"---\n{data.to_yaml()}\n---\n{body}"


def write_model_card(directory: Path, cfg, sampler: dict | None = None,
                     repo_hint: str = REPO_PLACEHOLDER) -> Path:
    """Write ``directory/README.md`` for ``cfg``'s refiner (atomically); the run is ``cfg.train.output_dir``."""
    path = Path(directory) / CARD_FILE
    write_text_atomic(path, card_content(cfg, sampler, Path(str(cfg.train.output_dir)), repo_hint))
    return path

"""The paper table's rows (settings): Gaussian unguided, Gaussian guided, guidance-distilled, refined.

A :class:`Setting` says how a row's samples are made (model, guidance, refiner, NFE); :func:`build_settings`
makes the rows from the config (see ``noiserefine.evaluate``).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from omegaconf import OmegaConf

from ..config import load_config
from diffusers.guiders import BaseGuidance

from ..guidance import guider_identity, guider_label, make_guider, network_calls

UNGUIDED_ROW, GUIDED_ROW, DISTILLED_ROW, REFINED_ROW = "gaussian-unguided", "gaussian-guided", "distilled", "refined"


@dataclass
class Setting:
    """One row: how its samples are made (``backend()`` loads the model when the row runs)."""

    slug: str
    label: str
    nfe: int
    guidance: BaseGuidance | None  # None: unguided
    backend: Callable[[], object]
    model_cfg: object
    refine: bool = False
    identity: dict = field(default_factory=dict)
    refiner_scale: float | None = None  # the w a refiner told w refines for (None: a refiner of one scale)


def guidance_record(guidance: BaseGuidance | None) -> dict:
    return {"kind": "none"} if guidance is None else guider_identity(guidance)


def model_cfg_with_path(model_cfg, path: str):
    """``model_cfg`` pointing at another pretrained model directory (the guidance-distilled one)."""
    container = OmegaConf.to_container(model_cfg, resolve=True)
    container.update(path=str(path), init="pretrained")
    return OmegaConf.create(container)


def build_settings(cfg, backend, steps: int, refiner_dir: Path, distilled_path: str | None) -> list[Setting]:
    """The rows for ``cfg``: all but the distilled one run on ``backend`` (the main model, already loaded);
    the distilled row (only with ``distilled_path``) loads its model when it runs. ``identity`` holds what
    a row adds to the common identity record (the distilled model, the refiner's weights and config)."""
    from ..backends import load_backend
    from ..hashing import file_sha256
    from ..refiner import FORMS, saved_form
    from ..refiner_scales import refiner_guidance_scale, saved_refiner_config
    from ..targets.identity import model_identity

    teacher = make_guider(cfg.teacher)
    rows = [
        Setting(UNGUIDED_ROW, "Gaussian, unguided", steps, None, lambda: backend, cfg.model),
        Setting(GUIDED_ROW, f"Gaussian, guided ({guider_label(teacher)})", network_calls(teacher, steps),
                teacher, lambda: backend, cfg.model),
    ]
    if distilled_path:
        distilled_cfg = model_cfg_with_path(cfg.model, distilled_path)
        rows.append(Setting(DISTILLED_ROW, "guidance-distilled, unguided", steps, None,
                            lambda: load_backend(distilled_cfg), distilled_cfg,
                            identity={"model": model_identity(distilled_cfg)}))
    refiner = {"weights_sha256": file_sha256(refiner_dir / "refiner.safetensors"),
               "config": OmegaConf.to_container(load_config(refiner_dir / "config.yaml").refiner, resolve=True)}
    refiner_calls = FORMS[saved_form(refiner_dir)]  # 2 (difference) or 1 (single_call)
    # a refiner told w refines for the guided row's scale (as the trainer's periodic evaluation does)
    saved = saved_refiner_config(refiner_dir)
    told = float(saved.refiner.guidance_timestep_slope) > 0
    scale = refiner_guidance_scale(saved, float(cfg.teacher.guidance_scale) if told else None, refiner_dir)
    if scale is not None:  # only then: the run keys of refiners of one scale stay as they were
        refiner["guidance_scale"] = scale
    rows.append(Setting(REFINED_ROW, "refined, unguided", steps + refiner_calls, None, lambda: backend, cfg.model,
                        refine=True, identity={"refiner": refiner}, refiner_scale=scale))
    return rows

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
from ..sampling import UNGUIDED, Guidance

UNGUIDED_ROW, GUIDED_ROW, DISTILLED_ROW, REFINED_ROW = "gaussian-unguided", "gaussian-guided", "distilled", "refined"


@dataclass
class Setting:
    """One row: how its samples are made (``backend()`` loads the model when the row runs)."""

    slug: str
    label: str
    nfe: int
    guidance: Guidance
    backend: Callable[[], object]
    model_cfg: object
    refine: bool = False
    identity: dict = field(default_factory=dict)


def guidance_label(guidance: Guidance) -> str:
    if guidance.kind == "cfg":
        return f"CFG {guidance.scale:g}"
    if guidance.kind == "cfg_pag":
        return f"CFG {guidance.scale:g} + PAG {guidance.pag_scale:g}"
    return "none"


def guidance_record(guidance: Guidance) -> dict:
    return {"kind": guidance.kind, "scale": guidance.scale, "pag_scale": guidance.pag_scale,
            "pag_layers": list(guidance.pag_layers)} if guidance.kind != "none" else {"kind": "none"}


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
    from ..targets.identity import model_identity

    teacher = Guidance.from_teacher(cfg.teacher)
    rows = [
        Setting(UNGUIDED_ROW, "Gaussian, unguided", steps, UNGUIDED, lambda: backend, cfg.model),
        Setting(GUIDED_ROW, f"Gaussian, guided ({guidance_label(teacher)})", teacher.num_branches * steps,
                teacher, lambda: backend, cfg.model),
    ]
    if distilled_path:
        distilled_cfg = model_cfg_with_path(cfg.model, distilled_path)
        rows.append(Setting(DISTILLED_ROW, "guidance-distilled, unguided", steps, UNGUIDED,
                            lambda: load_backend(distilled_cfg), distilled_cfg,
                            identity={"model": model_identity(distilled_cfg)}))
    refiner = {"weights_sha256": file_sha256(refiner_dir / "refiner.safetensors"),
               "config": OmegaConf.to_container(load_config(refiner_dir / "config.yaml").refiner, resolve=True)}
    rows.append(Setting(REFINED_ROW, "refined, unguided", steps + 2, UNGUIDED, lambda: backend, cfg.model,
                        refine=True, identity={"refiner": refiner}))
    return rows

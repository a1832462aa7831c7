"""The paper's recipe in the shipped configs, pinned: a change to one of these values fails here.

``RECIPE`` is the spec: per config, the recipe keys and their values. Its sources are in the configs'
comments and in README.md ("The paper's recipe vs our configs"): arXiv:2412.03895v1 Supplement D.1/D.2 for
SD 2.1; the same values carried over to SDXL, SiT-XL/2 and SD-Turbo where the paper gives none. Changing a
recipe value means changing it here, in the config and in the README table together. Fast: YAML only, no model.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from omegaconf import OmegaConf

from noiserefine.config import load_config

REPO = Path(__file__).resolve().parents[1]

# "all attention, convolutional, and feed-forward layers" (arXiv v1 D.1), read for the SD/SDXL UNet and the DiT blocks
UNET_TARGETS = ["to_q", "to_k", "to_v", "to_out.0", "proj_in", "proj_out", "conv1", "conv2", "conv_shortcut", "conv",
                "conv_in", "conv_out", "ff.net.0.proj", "ff.net.2"]
DIT_TARGETS = ["to_q", "to_k", "to_v", "to_out.0", "ff.net.0.proj", "ff.net.2", "pos_embed.proj"]

# The refiner and training values every family shares (arXiv v1 D.1/D.2; alpha and the learning rate: ours).
SHARED = {"refiner.lora_rank": 128, "refiner.lora_alpha": 128.0, "refiner.timestep": 999.0,
          "refiner.guidance_timestep_slope": 0.0, "train.loss": "msd", "train.max_steps": 39000,
          "train.learning_rate": 1e-4}
# The paper's COCO component (arXiv v1 D.2: CFG 7.5 on MS-COCO prompts, 20K kept) and its step counts (D.1).
COCO_COMPONENT = {"teacher.guidance": "cfg", "teacher.guidance_scale": 7.5, "teacher.num_steps": 20,
                  "student.num_steps": 10, "data.num_samples": 20000, "data.sources": [("coco", 1.0)],
                  "benchmark.num_steps": 20}

RECIPE = {
    "sd21": {**SHARED, **COCO_COMPONENT, "refiner.target_modules": UNET_TARGETS, "train.global_batch_size": 32},
    "sdxl": {**SHARED, **COCO_COMPONENT, "refiner.target_modules": UNET_TARGETS,
             "train.global_batch_size": 8},  # ours: 1 per rank at 1024 px (the recipe's 4 per GPU is SD 2.1's)
    "sit_xl2": {**SHARED, "refiner.target_modules": DIT_TARGETS, "train.global_batch_size": 32,
                "teacher.guidance": "cfg", "teacher.guidance_scale": 4.0, "teacher.num_steps": 20,
                "student.num_steps": 10, "data.num_samples": 50000, "data.sources": [("text", 1.0)]},
    "sd_turbo": {**SHARED, "refiner.target_modules": UNET_TARGETS, "train.global_batch_size": 32,
                 "teacher.guidance": "cfg_pag", "teacher.guidance_scale": 2.0, "teacher.pag_scale": 3.0,
                 "teacher.num_steps": 4, "student.num_steps": 4, "data.num_samples": 50000,
                 "data.sources": [("coco", 2.0), ("pickapic", 3.0)]},  # the paper's 20K : 30K prompt proportions
}


def value_of(cfg, key: str):
    value = OmegaConf.select(cfg, key)
    if key == "data.sources":
        return [(source.kind, float(source.weight)) for source in value]
    return OmegaConf.to_container(value) if OmegaConf.is_config(value) else value


@pytest.fixture(scope="module")
def configs():
    return {name: load_config(REPO / "configs" / f"{name}.yaml") for name in RECIPE}


def differences(cfg, recipe: dict) -> dict:
    """``{key: (config value, recipe value)}`` for every recipe key the config does not match."""
    return {key: (value_of(cfg, key), expected) for key, expected in recipe.items() if value_of(cfg, key) != expected}


@pytest.mark.parametrize("name", sorted(RECIPE))
def test_config_holds_the_recipe(configs, name):
    differing = differences(configs[name], RECIPE[name])
    assert not differing, f"configs/{name}.yaml differs from the recipe (config, recipe): {differing}"


def commented_lines(text: str, key: str) -> tuple[str, str]:
    """The YAML line that sets ``section.name`` and the line above it (a top-level section, one level deep)."""
    section, name = key.split(".")
    lines = text.splitlines()
    start = lines.index(f"{section}:") if f"{section}:" in lines else \
        next(i for i, line in enumerate(lines) if line.startswith(f"{section}:"))
    for i in range(start + 1, len(lines)):
        line = lines[i]
        if line and not line[0].isspace() and not line.startswith("#"):
            break  # the next top-level section
        if line.lstrip().startswith(f"{name}:") and line.startswith("  ") and not line.startswith("   "):
            return line, lines[i - 1]
    raise AssertionError(f"no '{key}' line")


@pytest.mark.parametrize("name", sorted(RECIPE))
def test_every_recipe_value_carries_its_source(name):
    """Each pinned key's line has a comment, or the comment line right above it says where the value comes from."""
    text = (REPO / "configs" / f"{name}.yaml").read_text()
    uncommented = []
    for key in RECIPE[name]:
        if key in ("data.sources", "refiner.guidance_timestep_slope"):  # a block with its own comments; the default
            continue
        line, above = commented_lines(text, key)
        if "#" not in line and not above.lstrip().startswith("#"):
            uncommented.append(key)
    assert not uncommented, f"configs/{name}.yaml: recipe values without a source comment: {uncommented}"


# The full data recipe (arXiv v1 D.2), configs/paper_data.yaml layered on sd21/sdxl: two components in the kept
# shares 20K : 30K, each with its teacher, and the aesthetic filter at 6.0.
PAPER_DATA = {
    "coco": {"weight": 2.0, "teacher": {"guidance": "cfg", "guidance_scale": 7.5}, "sources": [("coco", 1.0)]},
    "pickapic": {"weight": 3.0, "teacher": {"guidance": "cfg_pag", "guidance_scale": 3.0, "pag_scale": 2.0},
                 "sources": [("pickapic", 1.0)]},
}


@pytest.mark.parametrize("name", ["sd21", "sdxl"])
def test_the_full_data_recipe_layers_on_the_model_config(name):
    """``--config <model>.yaml --config paper_data.yaml`` is the paper's mixture, filter and scorer, each component's
    merged config carrying its teacher (the checks a training run makes at load time pass)."""
    from noiserefine.mixture import components

    cfg = load_config([REPO / "configs" / f"{name}.yaml", REPO / "configs" / "paper_data.yaml"])
    assert cfg.data.min_score == 6.0 and cfg.scorer.kind == "aesthetic"
    merged = {component.name: component for component in components(cfg)}
    assert sorted(merged) == sorted(PAPER_DATA)
    for component_name, expected in PAPER_DATA.items():
        entry = next(e for e in cfg.data.mixture if e.name == component_name)
        assert float(entry.weight) == expected["weight"]
        component_cfg = merged[component_name].cfg
        for key, value in expected["teacher"].items():
            assert component_cfg.teacher[key] == value, (component_name, key)
        assert value_of(component_cfg, "data.sources") == expected["sources"]
        assert component_cfg.teacher.num_steps == 20 and component_cfg.student.num_steps == 10


def test_every_paper_data_value_carries_its_source():
    text = (REPO / "configs" / "paper_data.yaml").read_text()
    for key in ("weight: 2.0", "weight: 3.0", "guidance_scale: 7.5", "guidance_scale: 3.0, pag_scale: 2.0",
                "min_score: 6.0", "kind: aesthetic", "num_samples: 80000", "num_samples: 120000"):
        line = next(line for line in text.splitlines() if key in line)
        above = text.splitlines()[text.splitlines().index(line) - 1]
        assert "#" in line or above.lstrip().startswith("#"), f"configs/paper_data.yaml: {key!r} without a source"


def test_a_drifted_config_is_caught():
    """What a silent edit (the old rank-8, 50-step defaults) looks like to the comparison."""
    drifted = load_config(REPO / "configs" / "sd21.yaml", ["refiner.lora_rank=8", "student.num_steps=50",
                                                            "refiner.target_modules=[to_q,to_k,to_v,to_out.0]"])
    assert differences(drifted, RECIPE["sd21"]) == {"refiner.lora_rank": (8, 128), "student.num_steps": (50, 10),
                                                    "refiner.target_modules": (UNET_TARGETS[:4], UNET_TARGETS)}

"""The shipped model-family configs, end to end on tiny random models of the same diffusers classes.

Per config: it loads; its placeholder ``model.path`` fails naming the path and the
expected model type; then with ``model.path`` pointed at a tiny model of that family,
tiny prompt files of the configured kinds (COCO JSON, Pick-a-Pic parquet, class ids)
and tiny budgets: the teacher cache (``pipeline/generate_targets.py``'s ``main``,
in-process, ``pipeline.num_workers=0``), two MSD steps (``trainer/train.py``'s
``main``: DeepSpeed, one CPU rank), the exported refiner loaded back, and the
sampling command. One config runs the three entry points as real subprocesses.
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from PIL import Image

from noiserefine.backends import load_backend
from noiserefine.config import load_config
from noiserefine.refiner import load_refiner
from noiserefine.sampler_record import SAMPLER_FILE, read_sampler_record
from tiny_models import IMAGE_SIZE, build_tiny_dit, build_tiny_sd, build_tiny_sd3, build_tiny_sdxl

REPO = Path(__file__).resolve().parents[1]
CONFIGS = ["sd15", "sd21", "sd21_768", "sd_turbo", "sdxl", "dit_xl2", "sit_xl2", "sd3"]
EXPECTED = {  # config -> (backend, teacher guidance, expected-model words in the path error)
    "sd15": ("stable_diffusion", "cfg_pag", "Stable Diffusion 1.x/2.x pipeline"),
    "sd21": ("stable_diffusion", "cfg", "Stable Diffusion 1.x/2.x pipeline"),  # the paper's COCO component
    "sd21_768": ("stable_diffusion", "cfg_pag", "Stable Diffusion 1.x/2.x pipeline"),
    "sd_turbo": ("stable_diffusion", "cfg_pag", "Stable Diffusion 1.x/2.x pipeline"),
    "sdxl": ("sdxl", "cfg", "SDXL pipeline"),  # the paper's COCO component (its SD 2.1 recipe carried over)
    "dit_xl2": ("sit", "cfg", "DiT/SiT pipeline"),
    "sit_xl2": ("sit", "cfg", "DiT/SiT pipeline"),
    "sd3": ("sd3", "cfg", "Stable Diffusion 3 pipeline"),
}
BUILDERS = {
    "sd15": lambda d: build_tiny_sd(d),
    "sd21": lambda d: build_tiny_sd(d),
    "sd21_768": lambda d: build_tiny_sd(d, prediction_type="v_prediction", scheduler="ddim"),
    "sd_turbo": lambda d: build_tiny_sd(d, scheduler="euler"),
    "sdxl": lambda d: build_tiny_sdxl(d),
    "dit_xl2": lambda d: build_tiny_dit(d, num_classes=1000),
    "sit_xl2": lambda d: build_tiny_dit(d, flow=True, num_classes=1000),
    "sd3": lambda d: build_tiny_sd3(d),
}
CAPTIONS = ["a red cat on a mat", "the blue dog", "a bowl of fruit", "a house by the lake", "a red cat on a mat"]


def _module(path: Path, name: str):
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def entry():
    return {"generate": _module(REPO / "pipeline" / "generate_targets.py", "generate_targets_entry").main,
            "train": _module(REPO / "trainer" / "train.py", "train_entry").main}


@pytest.fixture(scope="module")
def prompt_files(tmp_path_factory):
    root = tmp_path_factory.mktemp("prompts")
    coco = root / "captions_train2017.json"
    coco.write_text(json.dumps({"info": {}, "licenses": [], "images": [{"id": 1, "file_name": "1.jpg"}],
                                "annotations": [{"id": i, "image_id": 1, "caption": f"  {c} "}
                                                for i, c in enumerate(CAPTIONS)]}))
    pickapic = root / "pickapic"
    pickapic.mkdir()
    pq.write_table(pa.table({"caption": ["a castle in the clouds", None, "an astronaut riding a horse"],
                             "jpg_0": [b"\xff\xd8", b"", b"\xff\xd8"], "label_0": [1.0, 0.0, 0.5]}),
                   pickapic / "train-00000.parquet")
    classes = root / "classes.txt"
    classes.write_text("207\n3\ngolden retriever\n")
    return {"coco": coco, "pickapic": pickapic, "classes": classes}


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("tiny")
    return {name: build(root / name) for name, build in BUILDERS.items()}


# Set in os.environ by the in-process trainer (noiserefine.train.distributed, once per process: its DeepSpeed
# import reads them, so they are left in place as any in-process run leaves them); a subprocess must not inherit them.
DIST_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT", "LOCAL_SIZE")


@pytest.fixture(scope="module", autouse=True)
def hash_memo(tmp_path_factory):
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("NOISEREFINE_HASH_CACHE", str(tmp_path_factory.mktemp("memo") / "file_hashes.json"))
        yield


def tiny_overrides(name: str, model_dir: Path, files: dict, root: Path) -> list[str]:
    cfg = load_config(REPO / "configs" / f"{name}.yaml")
    sources = []
    for source in cfg.data.sources:
        path = {"coco": files["coco"], "pickapic": files["pickapic"], "text": files["classes"]}[source.kind]
        sources.append(f"{{kind: {source.kind}, path: '{path}', weight: {source.weight}}}")
    return [f"model.path={model_dir}", "model.device=cpu", "model.dtype=float32",
            f"data.sources=[{', '.join(sources)}]", "data.num_samples=4", "data.shard_size=2",
            f"data.cache_root={root / 'cache'}", "teacher.num_steps=2", "student.num_steps=2",
            "pipeline.num_workers=0", "pipeline.batch_size=2", "pipeline.cpus_per_worker=1",
            f"train.output_dir={root / 'run'}", "train.max_steps=2", "train.global_batch_size=2", "train.log_every=1",
            "train.checkpoint_every=100", "train.eval_every=0", "train.num_loader_workers=0"]


# --- the configs themselves -----------------------------------------------------------------------------------

@pytest.mark.parametrize("name", CONFIGS)
def test_config_loads_and_names_the_missing_model(name):
    cfg = load_config(REPO / "configs" / f"{name}.yaml")
    backend, guidance, expected = EXPECTED[name]
    assert cfg.model.backend == backend and cfg.model.init == "pretrained" and cfg.teacher.guidance == guidance
    if guidance == "cfg_pag":  # text-to-image teachers: CFG+PAG, the PAG pipeline defaults
        assert cfg.teacher.pag_scale == 3.0 and list(cfg.teacher.pag_layers) == ["mid"]
    if name in ("sd21", "sdxl"):  # the paper's COCO component; the full mixture is configs/paper_data.yaml (tests/test_recipe.py)
        assert [s.kind for s in cfg.data.sources] == ["coco"]
    elif backend != "sit":
        assert sorted(s.kind for s in cfg.data.sources) == ["coco", "pickapic"]
    else:  # class-conditional: ImageNet class ids
        assert [s.kind for s in cfg.data.sources] == ["text"]
        ids = (REPO / cfg.data.sources[0].path).read_text().split()
        assert ids == [str(i) for i in range(1000)]
    if name == "sd_turbo":
        assert 1 <= cfg.student.num_steps <= 4 and 1 <= cfg.teacher.num_steps <= 4
    text = (REPO / "configs" / f"{name}.yaml").read_text()
    assert "FILL IN" in text and "default" in text  # choices and their sources are written down
    with pytest.raises(FileNotFoundError, match=rf"{cfg.model.path}.*{expected}"):
        load_backend(load_config(REPO / "configs" / f"{name}.yaml", ["model.device=cpu", "model.dtype=float32"]).model)


# --- end to end on tiny models ----------------------------------------------------------------------------------

def check_samples(out: Path, num_prompts: int, seeds: list[int], compare: bool) -> None:
    rows = ["refined", "guided", "unguided", "compare"] if compare else ["refined"]
    for row in rows:
        files = sorted((out / row).glob("*.png"))
        assert len(files) == num_prompts * len(seeds), row
        width = IMAGE_SIZE * (3 if row == "compare" else 1)
        assert Image.open(files[0]).size == (width, IMAGE_SIZE)
    assert load_config(out / "config.yaml").model.device == "cpu"
    assert json.loads((out / "sample.json").read_text())["seeds"] == seeds


@pytest.mark.slow  # >= 1 s on an idle 2-core machine: `make test` only, not the fast lane
@pytest.mark.parametrize("name", CONFIGS)
def test_cache_train_load_and_sample(name, models, prompt_files, entry, tmp_path, capsys):
    from noiserefine.sample import main as sample_main

    overrides = tiny_overrides(name, models[name], prompt_files, tmp_path)
    config = str(REPO / "configs" / f"{name}.yaml")
    assert entry["generate"](["--config", config, *overrides]) == 0
    cache_dir = Path(capsys.readouterr().out.strip().splitlines()[-1])
    assert len(list(cache_dir.glob("*.tar"))) == 2

    assert entry["train"](["--config", config, *overrides]) == 0
    run = tmp_path / "run"
    done = json.loads((run / "done.json").read_text())
    assert done["max_steps"] == 2 and done["final_loss"] is not None and done["loss"] == "msd"
    record = read_sampler_record(run / "refiner")
    cfg = load_config(config, overrides)
    assert record["num_steps"] == 2 and record["backend"] == cfg.model.backend

    backend = load_backend(cfg.model)
    refiner = load_refiner(run / "refiner", backend)
    noise = torch.randn(1, *backend.latent_shape, generator=torch.Generator().manual_seed(0))
    prompt = "207" if backend.name == "sit" else "a red cat"
    assert torch.isfinite(refiner.refine(noise, [prompt])).all()

    out = tmp_path / "samples"
    assert sample_main(["--refiner", str(run / "refiner"), "--prompt", prompt, "--seeds", "0-1", "--out", str(out),
                        "--compare", "--no-progress", "model.device=cpu"]) == 0
    check_samples(out, 1, [0, 1], compare=True)


@pytest.mark.slow  # starts the commands as subprocesses: `make test` only
def test_entry_points_as_commands(models, prompt_files, tmp_path):
    """The three commands a user types, as subprocesses (one config: SD 2.1)."""
    overrides = tiny_overrides("sd21", models["sd21"], prompt_files, tmp_path)
    env = {**{k: v for k, v in os.environ.items() if k not in DIST_VARS}, "OMP_NUM_THREADS": "1", "DS_ACCELERATOR": "cpu", "PYTHONUNBUFFERED": "1",
           "NOISEREFINE_HASH_CACHE": str(tmp_path / "hashes.json"),
           "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))}

    def run(*command):
        done = subprocess.run([sys.executable, *command], cwd=REPO, env=env, capture_output=True, text=True,
                              timeout=600)
        assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
        return done

    run("pipeline/generate_targets.py", "--config", "configs/sd21.yaml", *overrides)
    run("trainer/train.py", "--config", "configs/sd21.yaml", *overrides)
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a red cat\nthe blue dog\n")
    done = run("-m", "noiserefine.sample", "--refiner", str(tmp_path / "run" / "refiner"), "--prompts-file",
               str(prompts), "--seeds", "0-2", "--out", str(tmp_path / "samples"), "model.device=cpu")
    check_samples(tmp_path / "samples", 2, [0, 1, 2], compare=False)
    assert "sample" in done.stderr  # the tqdm bar
    assert (tmp_path / "run" / "refiner" / SAMPLER_FILE).is_file()

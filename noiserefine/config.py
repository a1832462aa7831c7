"""One typed configuration tree for every stage (teacher cache, training, evaluation).

The tree is a set of dataclasses used through ``OmegaConf.structured`` so that
an unknown key or a wrong type is caught when a YAML file or a ``key=value``
override is merged. Those errors are re-raised as ``ValueError`` naming the
key and the file. The resolved config is saved next to every output.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from .files import write_text_atomic


@dataclass
class DigitsTeacherConfig:
    """How the embedded default teacher is trained (only used by the ``digits`` backend)."""

    # 400 x 64 keeps the teacher to ~3 min on 2 cores and leaves it imperfect enough that
    # guidance matters (1500 x 128 gives 0.98 unguided accuracy: little left to distil).
    train_steps: int = 400
    batch_size: int = 64
    learning_rate: float = 2e-3
    cond_dropout: float = 0.15  # share of samples trained with the null condition, so CFG works
    seed: int = 0
    block_out_channels: list[int] = field(default_factory=lambda: [16, 32, 64])
    cross_attention_dim: int = 64
    thicken: int = 0  # >0: train on thickened strokes (the transfer experiment's style)
    init_from: str = ""  # fine-tune from this teacher directory instead of training from scratch
    distill_guidance_scale: float = 0.0  # >0: guidance-distillation baseline of the init_from teacher
    prediction_type: str = "v_prediction"  # epsilon | v_prediction (the report measures noise-like samples)


@dataclass
class ModelConfig:
    """Which denoiser family and where its weights are (a local path or model id)."""

    backend: str = "digits"  # digits | stable_diffusion | sdxl | sit
    path: str = "artifacts/digits-teacher"
    revision: str = ""
    dtype: str = "float32"  # float32 | bfloat16 | float16 (GPU only)
    device: str = "cpu"
    # pretrained: load model.path. random: build model.architecture at its published size with RANDOM
    # WEIGHTS (for speed/memory measurements and smoke tests; samples are noise); model.path is ignored.
    init: str = "pretrained"  # pretrained | random
    architecture: str = ""  # with init=random: sd15 | sd21 | sd21_768 | sdxl | dit_xl2 | sit_xl2
    digits: DigitsTeacherConfig = field(default_factory=DigitsTeacherConfig)


@dataclass
class TeacherConfig:
    """The guided sampler whose outputs are the training targets."""

    guidance: str = "cfg"  # cfg | cfg_pag
    guidance_scale: float = 3.0
    pag_scale: float = 3.0
    pag_layers: list[str] = field(default_factory=lambda: ["mid"])
    num_steps: int = 10


@dataclass
class StudentConfig:
    """The unguided sampler the refined noise is fed to."""

    num_steps: int = 10


@dataclass
class RefinerConfig:
    """``x̂_T = x_T + (denoiser_LoRA(x_T, t, c) - denoiser(x_T, t, c))``, zero at init."""

    timestep: float = 999.0  # the denoiser's time input for the refiner forward
    lora_rank: int = 8
    lora_alpha: float = 8.0
    target_modules: list[str] = field(
        default_factory=lambda: ["to_q", "to_k", "to_v", "to_out.0", "conv1", "conv2"]
    )


@dataclass
class SourceConfig:
    kind: str = "digits"  # coco | pickapic | text | digits
    path: str = ""
    weight: float = 1.0


@dataclass
class DataConfig:
    cache_root: str = "cache"
    cache_dir: str = ""  # explicit teacher-cache directory; empty = derived from cache_root + teacher key
    sources: list[SourceConfig] = field(default_factory=lambda: [SourceConfig()])
    num_samples: int = 3000
    shard_size: int = 250
    base_seed: int = 0
    dedup: bool = True
    max_prompt_chars: int = 300
    target_dtype: str = "float16"  # float16 | float32


@dataclass
class PipelineConfig:
    address: str = ""  # Ray address; empty = start a local Ray
    num_workers: int = 1  # Ray actors; 0 = generate in this process, without Ray
    gpus_per_worker: float = 0.0
    cpus_per_worker: float = 1.0
    batch_size: int = 125
    max_retries: int = 3
    verify: bool = False


@dataclass
class TrainConfig:
    output_dir: str = "runs/refiner"
    max_steps: int = 300
    batch_size: int = 32  # per rank
    learning_rate: float = 1e-3
    weight_decay: float = 0.0
    loss: str = "msd"  # msd | full_gradient | noise_space
    gradient_checkpointing: bool = False  # full_gradient only
    checkpoint_every: int = 100
    log_every: int = 10
    eval_every: int = 200
    num_loader_workers: int = 1
    skip_corrupt_shards: bool = False
    zero_stage: int = 0
    gradient_clipping: float = 1.0  # max global grad norm (DeepSpeed); 0 = off
    seed: int = 0


@dataclass
class EvalConfig:
    num_samples: int = 500
    seed_offset: int = 10_000_000  # held-out seeds never used by the teacher cache
    batch_size: int = 250
    grid_columns: int = 10
    prompts: list[str] = field(default_factory=list)  # cycled; empty = the plan's prompt draw
    metrics: str = "none"  # none | digit_classifier (the embedded default's in-domain classifier)
    classifier_dir: str = ""  # digit_classifier: where the classifier is trained once and cached


@dataclass
class DemoConfig:
    """Budgets of the main job's extra experiments (``make demo``)."""

    num_ranks: int = 2  # DeepSpeed ranks for the refiner training
    full_gradient_steps: int = 50  # MSD vs full-gradient ablation (MSD: the main run's snapshot)
    distill_steps: int = 150  # guidance-distillation baseline fine-tuning
    transfer_steps: int = 150  # fine-tuning the teacher to thick strokes
    transfer_thicken: int = 1
    # guidance sweep of the teacher alone (w = 1: unguided); with pick_guidance the teacher's
    # guidance_scale is set by its rule (noiserefine.digits.sweep.RULE) before targets are generated
    sweep_scales: list[float] = field(default_factory=lambda: [1.0, 1.25, 1.5, 2.0, 3.0, 4.0, 6.0])
    pick_guidance: bool = True


@dataclass
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    teacher: TeacherConfig = field(default_factory=TeacherConfig)
    student: StudentConfig = field(default_factory=StudentConfig)
    refiner: RefinerConfig = field(default_factory=RefinerConfig)
    data: DataConfig = field(default_factory=DataConfig)
    pipeline: PipelineConfig = field(default_factory=PipelineConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    demo: DemoConfig = field(default_factory=DemoConfig)


_CHOICES = {
    "model.backend": ("digits", "stable_diffusion", "sdxl", "sit"),
    "model.dtype": ("float32", "bfloat16", "float16"),
    "model.init": ("pretrained", "random"),
    # "" or a directory of noiserefine/backends/architectures/ (tests/test_real_size.py keeps the two in step)
    "model.architecture": ("", "sd15", "sd21", "sd21_768", "sdxl", "dit_xl2", "sit_xl2"),
    "teacher.guidance": ("cfg", "cfg_pag"),
    "data.target_dtype": ("float16", "float32"),
    "train.loss": ("msd", "full_gradient", "noise_space"),
    "eval.metrics": ("none", "digit_classifier"),
}


def _wrap(error: OmegaConfBaseException, origin: str) -> ValueError:
    key = getattr(error, "full_key", None) or "?"
    reason = str(error).splitlines()[0] if str(error) else type(error).__name__
    return ValueError(f"{origin}: bad config key '{key}': {reason}")


def load_config(paths: list[str | Path] | str | Path | None = None,
                overrides: list[str] | None = None) -> DictConfig:
    """Merge the schema, then each YAML file in order, then ``key=value`` overrides.

    Raises ``ValueError`` naming the file (or "command line") and the key for an
    unknown key, a wrong type or a value outside its allowed choices.
    """
    if paths is None:
        paths = []
    elif isinstance(paths, (str, Path)):
        paths = [paths]
    cfg = OmegaConf.structured(Config)
    for path in paths:
        path = Path(path)
        if not path.is_file():
            raise ValueError(f"config file not found: {path}")
        try:
            loaded = OmegaConf.load(path)
            cfg = OmegaConf.merge(cfg, loaded)
        except OmegaConfBaseException as error:
            raise _wrap(error, str(path)) from None
        except Exception as error:  # YAML syntax errors
            raise ValueError(f"{path}: cannot parse config: {error}") from None
    if overrides:
        for item in overrides:
            if "=" not in item:
                raise ValueError(f"command line: override '{item}' is not of the form key=value")
        try:
            cfg = OmegaConf.merge(cfg, OmegaConf.from_dotlist(list(overrides)))
        except OmegaConfBaseException as error:
            raise _wrap(error, "command line") from None
    validate(cfg)
    OmegaConf.set_readonly(cfg, True)
    return cfg


def validate(cfg: DictConfig) -> None:
    """Checks the schema cannot express: choices and positive counts."""
    for key, choices in _CHOICES.items():
        value = OmegaConf.select(cfg, key)
        if value not in choices:
            raise ValueError(f"config key '{key}' is {value!r}; expected one of {choices}")
    for key in ("teacher.num_steps", "student.num_steps", "data.num_samples", "data.shard_size",
                "pipeline.batch_size", "train.max_steps", "train.batch_size",
                "train.checkpoint_every", "eval.num_samples", "eval.batch_size"):
        value = OmegaConf.select(cfg, key)
        if value < 1:
            raise ValueError(f"config key '{key}' must be >= 1, got {value}")
    if cfg.pipeline.num_workers < 0:
        raise ValueError(f"config key 'pipeline.num_workers' must be >= 0 (0: in-process, no Ray), "
                         f"got {cfg.pipeline.num_workers}")
    for index, source in enumerate(cfg.data.sources):
        if source.weight <= 0:
            raise ValueError(f"config key 'data.sources.{index}.weight' must be > 0, got {source.weight}")


def to_yaml(cfg: DictConfig) -> str:
    return OmegaConf.to_yaml(cfg, resolve=True)


def save_config(cfg: DictConfig, path: str | Path) -> Path:
    """Write the resolved config as YAML atomically (temp file + rename)."""
    path = Path(path)
    write_text_atomic(path, to_yaml(cfg))
    return path


def config_from_container(container: dict[str, Any]) -> DictConfig:
    """Rebuild a typed config from a plain dict (e.g. one stored in a checkpoint)."""
    try:
        cfg = OmegaConf.merge(OmegaConf.structured(Config), container)
    except OmegaConfBaseException as error:
        raise _wrap(error, "stored config") from None
    validate(cfg)
    return cfg


def parse_cli(argv: list[str] | None = None, description: str = "") -> tuple[DictConfig, Any]:
    """``--config FILE`` (repeatable, later wins) then ``key=value`` overrides."""
    import argparse

    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--config", action="append", default=[], help="YAML config (repeatable)")
    parser.add_argument("overrides", nargs="*", help="key=value overrides, applied last")
    args, unknown = parser.parse_known_args(argv)
    # deepspeed's launcher adds --local_rank=N; everything else unknown is a mistake.
    stray = [a for a in unknown if not a.startswith("--local_rank")]
    if stray:
        parser.error(f"unrecognised arguments: {' '.join(stray)}")
    return load_config(args.config, args.overrides), args

"""Checks of a loaded config that the typed schema (``config.py``) cannot express.

Choices, counts (>= 1, >= 0) and finite ranges, a non-empty source list, held-out
evaluation/benchmark seeds that do not meet the teacher cache's, and the data mixture (each
component's merged config checked as a config of its own). ``load_config`` and
``config_from_container`` call :func:`validate`; an error names the key (and ``load_config``
adds the file or the command line that set it).
"""

from __future__ import annotations

import math
import re

from omegaconf import DictConfig, OmegaConf

from .backends.registry import architecture_names, family_names
from .mixture import NAME, component_config
from .performance import LeverError, check_levers
from .scoring import scorer_names

_CHOICES = {
    # the registered model families and their architectures (directories of noiserefine/backends/architectures/)
    "model.backend": family_names(),
    "model.dtype": ("float32", "bfloat16", "float16"),
    "model.init": ("pretrained", "random"),
    "model.architecture": ("", *architecture_names()),
    "data.target_dtype": ("float16", "float32"),
    "train.loss": ("msd", "full_gradient", "noise_space"),
    "refiner.form": ("difference", "single_call"),
    "model.digits.task": ("digits", "compose"),  # noiserefine.backends.digits.TASKS
    "eval.metrics": ("none", "digit_classifier", "text_image"),
    "benchmark.protocol": ("coco", "imagenet", "prompts"),
    "scorer.kind": ("", *scorer_names()),  # "": no scorer (noiserefine/scoring)
    # ZeRO-3 partitions the LoRA weights, which the refiner export does not gather
    "train.zero_stage": (0, 1, 2),
}


class ConfigValueError(ValueError):
    """A value the schema accepts but the code cannot use; ``keys``: the key(s) at fault, first = named."""

    def __init__(self, message: str, *keys: str):
        super().__init__(message)
        self.keys = keys


# Numeric ranges: key -> (low, high, low inclusive); all must also be finite.
_RANGES = {
    "teacher.guidance_scale": (0.0, 100.0, True),  # 0 = unguided (SD-Turbo); CFG is used at 1..~30
    "teacher.pag_scale": (0.0, 100.0, True),
    "model.digits.learning_rate": (0.0, math.inf, False),
    "model.digits.cond_dropout": (0.0, 1.0, True),
    "model.digits.distill_guidance_scale": (0.0, 100.0, True),
    "refiner.timestep": (0.0, math.inf, True),
    "refiner.guidance_timestep_slope": (0.0, math.inf, True),
    "demo.multi_scale_timestep_slope": (0.0, math.inf, False),
    "refiner.lora_alpha": (0.0, math.inf, False),
    "pipeline.gpus_per_worker": (0.0, math.inf, True),
    "pipeline.cpus_per_worker": (0.0, math.inf, True),
    "pipeline.lock_ttl_s": (0.0, math.inf, False),
    "data.io_backoff_s": (0.0, 3600.0, True),
    "train.learning_rate": (0.0, math.inf, False),
    "train.weight_decay": (0.0, math.inf, True),
    "train.gradient_clipping": (0.0, math.inf, True),  # 0 = off
}
_AT_LEAST_ONE = ("teacher.num_steps", "student.num_steps", "refiner.lora_rank", "data.num_samples",
                 "data.shard_size", "data.max_prompt_chars", "pipeline.batch_size", "train.max_steps",
                 "train.global_batch_size", "train.checkpoint_every", "eval.num_samples", "eval.batch_size",
                 "eval.sampling_threads", "eval.grid_columns", "model.digits.train_steps", "model.digits.batch_size",
                 "model.digits.train_threads", "data.io_chunk_bytes",
                 "benchmark.num_classes", "benchmark.num_samples", "benchmark.batch_size",
                 "benchmark.feature_batch_size", "benchmark.shard_size", "benchmark.grid_columns")
_AT_LEAST_ZERO = ("pipeline.num_workers", "pipeline.max_retries", "data.io_retries", "train.log_every",
                  "train.eval_every", "train.num_loader_workers", "eval.classifier_steps", "eval.seed_offset",
                  "benchmark.seed_offset", "benchmark.resolution", "benchmark.num_steps")


def _check_range(key: str, value: float, low: float, high: float, low_inclusive: bool) -> None:
    above = value >= low if low_inclusive else value > low
    if not (math.isfinite(value) and above and value <= high):
        bound = f"{'[' if low_inclusive else '('}{low:g}, {high:g}{']' if math.isfinite(high) else ')'}"
        raise ConfigValueError(f"config key '{key}' must be finite and in {bound}, got {value}", key)


def validate(cfg: DictConfig) -> None:
    """Checks the schema cannot express: choices, counts and finite ranges, sources, held-out seeds, the guidance
    scales and the data mixture (each component's merged config checked as a config of its own).

    Raises :class:`ConfigValueError` (a ``ValueError``) naming the key.
    """
    _check_values(cfg)
    _check_guidance_scales(cfg)
    _check_mixture(cfg)
    _check_report_to(cfg)
    _check_levers(cfg)
    _check_local_directory(cfg, "train.output_dir")


def _check_values(cfg: DictConfig) -> None:
    """What every config, a mixture component's included, must satisfy on its own."""
    for key, choices in _CHOICES.items():
        value = OmegaConf.select(cfg, key)
        if value not in choices:
            raise ConfigValueError(f"config key '{key}' is {value!r}; expected one of {choices}", key)
    for key in _AT_LEAST_ONE:
        value = OmegaConf.select(cfg, key)
        if value < 1:
            raise ConfigValueError(f"config key '{key}' must be >= 1, got {value}", key)
    for key in _AT_LEAST_ZERO:
        value = OmegaConf.select(cfg, key)
        if value < 0:
            raise ConfigValueError(f"config key '{key}' must be >= 0, got {value}", key)
    for key, (low, high, low_inclusive) in _RANGES.items():
        _check_range(key, float(OmegaConf.select(cfg, key)), low, high, low_inclusive)
    _check_guider(cfg)
    canvas = cfg.model.digits.canvas
    if canvas < 24 or canvas % 4:  # compose.MIN_CANVAS: a large digit (a quadrant) must differ from a small one (8)
        raise ConfigValueError(f"config key 'model.digits.canvas' must be a multiple of 4 and >= 24, got {canvas}",
                               "model.digits.canvas")
    for key in ("model.digits.slant", "demo.transfer_slant"):  # compose.slant_glyph: the compose task's style
        if OmegaConf.select(cfg, key) and cfg.model.digits.task != "compose":
            raise ConfigValueError(f"config key '{key}' is a style of model.digits.task=compose; the task is "
                                   f"{cfg.model.digits.task!r}", key)
    if cfg.demo.transfer_thicken < 0 or not (cfg.demo.transfer_thicken or cfg.demo.transfer_slant):
        raise ConfigValueError("config keys 'demo.transfer_thicken' (>= 0) and 'demo.transfer_slant' make the "
                               "transfer experiment's style: at least one must be set, got "
                               f"{cfg.demo.transfer_thicken} and {cfg.demo.transfer_slant}", "demo.transfer_thicken")
    if len(cfg.data.sources) == 0:
        raise ConfigValueError("config key 'data.sources' is empty; list at least one prompt source", "data.sources")
    for index, source in enumerate(cfg.data.sources):
        _check_range(f"data.sources.{index}.weight", float(source.weight), 0.0, math.inf, False)
    # Held-out evaluation ids are seed_offset .. seed_offset+eval.num_samples-1; the cache's plan uses
    # 0 .. data.num_samples-1 (sample seeds are a hash of the id): the two ranges must not meet.
    offset, count, planned = cfg.eval.seed_offset, cfg.eval.num_samples, cfg.data.num_samples
    if offset < planned:
        raise ConfigValueError(
            f"config key 'eval.seed_offset' is {offset}: the held-out sample ids {offset}..{offset + count - 1} "
            f"overlap the teacher cache's training ids 0..{planned - 1} (data.num_samples={planned}); "
            f"use eval.seed_offset >= {planned}", "eval.seed_offset", "data.num_samples")
    bench = cfg.benchmark
    if bench.base_seed == cfg.data.base_seed and bench.seed_offset < planned:
        raise ConfigValueError(
            f"config key 'benchmark.seed_offset' is {bench.seed_offset}: the benchmark's sample ids overlap the "
            f"teacher cache's training ids 0..{planned - 1} (same base seed {bench.base_seed}); "
            f"use benchmark.seed_offset >= {planned}", "benchmark.seed_offset", "data.num_samples")
    _check_scorer(cfg)
    if cfg.eval.metrics == "text_image" and not (cfg.eval.clip_path or cfg.eval.pickscore_path):
        raise ConfigValueError("config key 'eval.metrics' is 'text_image' but neither eval.clip_path nor "
                               "eval.pickscore_path is set (local CLIP / PickScore weight directories)", "eval.metrics")


TRACKERS = ("tensorboard", "wandb")


def report_to_list(value) -> list[str]:
    """``train.report_to`` as a list of tracker names ("none" -> []); ``ConfigValueError`` naming the key."""
    names = [value] if isinstance(value, str) else list(value) if OmegaConf.is_list(value) or \
        isinstance(value, (list, tuple)) else None
    if names is None or not all(isinstance(n, str) for n in names):
        raise ConfigValueError(f"config key 'train.report_to' is {value!r}; expected none, one of {TRACKERS} "
                               "or a list of them", "train.report_to")
    for name in names:
        if name not in ("none", *TRACKERS):
            raise ConfigValueError(f"config key 'train.report_to' names {name!r}; expected none or one of "
                                   f"{TRACKERS}", "train.report_to")
    if "none" in names and len(names) > 1 or len(set(names)) != len(names):
        raise ConfigValueError(f"config key 'train.report_to' is {list(names)}: 'none' goes alone and each "
                               "tracker once", "train.report_to")
    return [n for n in names if n != "none"]


def _check_report_to(cfg: DictConfig) -> None:
    report_to_list(cfg.train.report_to)


def _check_scorer(cfg: DictConfig) -> None:
    """A scorer names its weights; ``data.min_score`` is a finite number (null: no filter)."""
    if cfg.scorer.kind and not cfg.scorer.path:
        raise ConfigValueError(f"config key 'scorer.path' is empty but scorer.kind is {cfg.scorer.kind!r}: name "
                               "the scorer's local weights", "scorer.path", "scorer.kind")
    if cfg.scorer.kind == "aesthetic" and not cfg.scorer.clip_path:
        raise ConfigValueError("config key 'scorer.clip_path' is empty but scorer.kind is 'aesthetic': name the "
                               "local CLIP ViT-L/14 directory", "scorer.clip_path", "scorer.kind")
    if cfg.data.min_score is not None and not math.isfinite(float(cfg.data.min_score)):
        raise ConfigValueError(f"config key 'data.min_score' must be finite or null, got {cfg.data.min_score}",
                               "data.min_score")


def _check_local_directory(cfg: DictConfig, key: str) -> None:
    """A key that names a local (or mounted) directory: a URL would become a local folder ``S3:`` or ``gs:``."""
    value = str(OmegaConf.select(cfg, key))
    if re.match(r"^[A-Za-z][A-Za-z0-9+.-]*:", value) and not re.match(r"^[A-Za-z]:[\\/]", value):  # not C:\
        raise ConfigValueError(f"config key '{key}' is {value!r}: it must be a local or mounted directory, not a "
                               "URL", key)


def _check_guider(cfg: DictConfig) -> None:
    """``teacher.guidance`` (+ ``teacher.guider_args``) must build a diffusers guider (see ``guidance.py``)."""
    from .guidance import make_guider  # imports diffusers: only when a config is validated

    try:
        make_guider(cfg.teacher)
    except (TypeError, ValueError) as error:
        key = "teacher.guidance" if "teacher.guider_args" not in str(error) else "teacher.guider_args"
        raise ConfigValueError(f"config key '{key}': {error}", key) from None


def _check_levers(cfg: DictConfig) -> None:
    """``performance.*``: known values that can run on ``model.device`` with ``model.dtype`` (``performance.py``)."""
    try:
        check_levers(cfg.performance, str(cfg.model.device).split(":")[0], cfg.model.dtype)
    except LeverError as error:
        raise ConfigValueError(str(error), error.key) from None


def _check_guidance_scales(cfg: DictConfig) -> None:
    """``data.guidance_scales`` (several teacher caches) goes with a refiner told w, and only with one:
    ``refiner.guidance_timestep_slope > 0`` exactly when the list is non-empty; each ``t_ref(w) >= 0``."""
    scales, slope = [float(w) for w in cfg.data.guidance_scales], float(cfg.refiner.guidance_timestep_slope)
    for key in ("data.guidance_scales", "demo.multi_scale_guidance_scales", "demo.multi_scale_held_out_scales"):
        values = [float(w) for w in OmegaConf.select(cfg, key)]
        for index, value in enumerate(values):
            _check_range(f"{key}.{index}", value, *_RANGES["teacher.guidance_scale"])
        if len(set(values)) != len(values):
            raise ConfigValueError(f"config key '{key}' repeats a scale: {values}", key)
    if scales and slope == 0:
        raise ConfigValueError(
            f"config key 'data.guidance_scales' is {scales} but refiner.guidance_timestep_slope is 0: a refiner "
            "that is not told w cannot learn several guidance scales; set refiner.guidance_timestep_slope > 0 "
            "(or train on one scale: data.guidance_scales=[] teacher.guidance_scale=w)",
            "data.guidance_scales", "refiner.guidance_timestep_slope")
    if slope > 0 and not scales and not cfg.data.mixture:
        raise ConfigValueError(
            f"config key 'refiner.guidance_timestep_slope' is {slope} but data.guidance_scales is empty: a refiner "
            "told w needs targets at several guidance scales; list them in data.guidance_scales or data.mixture "
            "(or set the slope to 0)", "refiner.guidance_timestep_slope", "data.guidance_scales")
    timestep = float(cfg.refiner.timestep)
    for w in scales:
        if timestep - slope * (w - 1) < 0:
            raise ConfigValueError(
                f"config key 'data.guidance_scales' holds w={w:g}: its refiner time refiner.timestep - "
                f"refiner.guidance_timestep_slope * (w - 1) = {timestep - slope * (w - 1):g} is negative; lower "
                "the slope", "data.guidance_scales", "refiner.guidance_timestep_slope")


def _check_mixture(cfg: DictConfig) -> None:
    """``data.mixture``: named components (unique names), positive weights, overlays of known keys whose merged
    configs are valid configs; not with ``data.guidance_scales`` (itself a mixture) nor one ``data.cache_dir``."""
    mixture = cfg.data.mixture
    if not mixture:
        return
    if cfg.data.guidance_scales:
        raise ConfigValueError(
            "config keys 'data.mixture' and 'data.guidance_scales' are both set: data.guidance_scales is the mixture "
            "of one component per scale; list those scales as components instead (teacher: {guidance_scale: w})",
            "data.mixture", "data.guidance_scales")
    if cfg.data.cache_dir:
        raise ConfigValueError(
            f"config key 'data.cache_dir' is {cfg.data.cache_dir!r} with a data.mixture: every component would read "
            "that one directory; leave it empty (each component's cache is data.cache_root/<its teacher key>) or "
            "give each component its own data.cache_dir in its data overlay", "data.cache_dir", "data.mixture")
    slope, timestep, names = float(cfg.refiner.guidance_timestep_slope), float(cfg.refiner.timestep), set()
    for index, entry in enumerate(mixture):
        key, name = f"data.mixture.{index}", str(entry.name)
        if not NAME.fullmatch(name):
            raise ConfigValueError(f"config key '{key}.name' is {name!r}: each component needs a name of letters, "
                                   "digits, '.', '_' and '-' (1 to 64, starting with a letter or digit)", "data.mixture")
        if name in names:
            raise ConfigValueError(f"config key '{key}.name': {name!r} names two components", "data.mixture")
        names.add(name)
        if entry.weight is not None:
            _check_range(f"{key}.weight", float(entry.weight), 0.0, math.inf, False)
        try:
            merged = component_config(cfg, entry)
            _check_values(merged)
        except ValueError as error:
            raise ConfigValueError(f"config key '{key}' (component {name!r}): {error}", "data.mixture") from None
        w = float(merged.teacher.guidance_scale)
        if slope > 0 and timestep - slope * (w - 1) < 0:
            raise ConfigValueError(
                f"config key '{key}' (component {name!r}) has teacher.guidance_scale={w:g}: its refiner time "
                f"refiner.timestep - refiner.guidance_timestep_slope * (w - 1) = {timestep - slope * (w - 1):g} is "
                "negative; lower the slope", "data.mixture", "refiner.guidance_timestep_slope")

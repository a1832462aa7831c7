"""The configuration schema: one dataclass per section, merged through ``OmegaConf.structured`` by
:func:`noiserefine.config.load_config` (so an unknown key or a wrong type is caught when a file or an override
is merged). Kept apart from the loading code so that each file stays small."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Optional

from .performance import PerformanceConfig


@dataclass
class DigitsTeacherConfig:
    """How the embedded default teacher is trained (only used by the ``digits`` backend)."""

    # 800 x 64, dropout 0.3: ~3 min on 2 cores; the trade-off measured: bench/results/digits_teacher_study.md
    train_steps: int = 800
    batch_size: int = 64
    learning_rate: float = 2e-3
    cond_dropout: float = 0.3  # share of samples trained with the null condition, so CFG works
    seed: int = 0
    # >1: every batch split in that many parts, each part's forward/backward in its own Python thread on one
    # intra-op thread, gradients summed in order: the same teacher up to float rounding, faster on few CPU
    # cores (bench/bench_teacher_threads.py). 1: one backward on torch's threads.
    train_threads: int = 1
    block_out_channels: list[int] = field(default_factory=lambda: [16, 32, 64])
    cross_attention_dim: int = 64
    # attention heads in each attention layer (diffusers' UNet2DConditionModel calls this attention_head_dim)
    attention_heads: int = 4
    thicken: int = 0  # >0: train on thickened strokes (the transfer experiment's style on the digits task)
    slant: float = 0.0  # compose only, != 0: train on slanted digits (the transfer style there; compose.slant_glyph)
    init_from: str = ""  # fine-tune from this teacher directory instead of training from scratch
    distill_guidance_scale: float = 0.0  # >0: guidance-distillation baseline of the init_from teacher
    prediction_type: str = "v_prediction"  # epsilon | v_prediction (the report measures noise-like samples)
    # digits: 16x16 digits, the prompt names the digit. compose: a digit on a canvas x canvas image with the
    # position, size and thickness the prompt names (noiserefine/digits/compose.py; the demo's default task)
    task: str = "digits"
    canvas: int = 24  # compose only: the image side (a multiple of 4, >= 24)


@dataclass
class ModelConfig:
    """Which denoiser family and where its weights are (a local path or model id)."""

    backend: str = "digits"  # digits | stable_diffusion | sdxl | sit | sd3
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
    """The guided sampler whose outputs are the training targets (README: "Teacher guidance")."""

    guidance: str = "cfg"  # cfg | cfg_pag | a diffusers.guiders class name (its arguments: guider_args)
    guider_args: dict[str, Any] = field(default_factory=dict)
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
    """``x̂_T = x_T + correction(x_T, t, c)``, zero at init (``form``: noiserefine/refiner.py); ``t = timestep``, or
    ``timestep - guidance_timestep_slope * (w - 1)`` for a refiner of several guidance scales w."""

    # single_call (zero-init head on 1 LoRA call; default: better at equal budget on the compose default,
    # bench/results/2026-12-07-one-call.md) | difference (f_LoRA - f: 2 calls; what refiners saved without a form are)
    form: str = "single_call"
    timestep: float = 999.0  # the denoiser's time input for the refiner forward
    guidance_timestep_slope: float = 0.0  # > 0: a refiner of several scales (data.guidance_scales), told w
    guidance_correction_gain: bool = False  # a refiner told w: its correction times (w - 1) (zero at w = 1)
    lora_rank: int = 8
    lora_alpha: float = 8.0
    target_modules: list[str] = field(default_factory=lambda: ["to_q", "to_k", "to_v", "to_out.0", "conv1", "conv2"])


@dataclass
class SourceConfig:
    kind: str = "digits"  # coco | pickapic | text | digits | composed_digits
    path: str = ""
    weight: float = 1.0


@dataclass
class MixtureComponentConfig:
    """One component of ``data.mixture``, its own cache (``noiserefine/mixture.py``; README "Data mixtures")."""

    name: str = ""  # [A-Za-z0-9][A-Za-z0-9._-]*, unique: the key of its shard rows in a checkpoint
    weight: Optional[float] = None  # share of the global batches; None: proportional to its data.num_samples
    data: dict[str, Any] = field(default_factory=dict)  # overlay of the run's data (sources, num_samples, ...)
    teacher: dict[str, Any] = field(default_factory=dict)  # overlay of the run's teacher (guidance, scales, ...)


@dataclass
class DataConfig:
    # A local directory or an S3 prefix (s3://bucket/prefix): credentials, region and endpoint come from the
    # AWS SDK's own environment/config (AWS_PROFILE, AWS_ACCESS_KEY_ID, AWS_ENDPOINT_URL, ...), never from here.
    cache_root: str = "cache"
    cache_dir: str = ""  # explicit teacher-cache directory; empty = derived from cache_root + teacher key
    sources: list[SourceConfig] = field(default_factory=lambda: [SourceConfig()])
    num_samples: int = 3000
    shard_size: int = 250
    base_seed: int = 0
    dedup: bool = True
    max_prompt_chars: int = 300
    target_dtype: str = "float16"  # float16 | float32
    # The trainer refuses a cache missing shards (or samples) of the plan; true: train on what exists (warned).
    allow_partial_cache: bool = False
    # Several teacher caches, one per guidance scale (each the cache of teacher.guidance_scale=w, generated
    # beforehand), for one refiner told w (refiner.guidance_timestep_slope > 0); global batch b comes from
    # guidance_scales[b % len(guidance_scales)]. Empty: the one cache of teacher.guidance_scale.
    guidance_scales: list[float] = field(default_factory=list)
    # Several caches (prompts, sample counts, teacher settings) in one run, in shares (data.guidance_scales: one
    # component per scale). Empty: one cache.
    mixture: list[MixtureComponentConfig] = field(default_factory=list)
    # Train only on samples scored >= min_score (ScorerConfig; the manifest's scores: no regeneration); null: all.
    min_score: Optional[float] = None
    # Object-store I/O: retries of a transient error (backoff io_backoff_s * 2**i, capped at 30 s, jittered),
    # and the size of each ranged GET (a read that breaks resumes from the last whole chunk).
    io_retries: int = 6
    io_backoff_s: float = 1.0
    io_chunk_bytes: int = 8388608


@dataclass
class ScorerConfig:
    """The teacher job's quality scorer (``noiserefine/scoring``); kind "": none, the cache as before scorers."""

    kind: str = ""  # "" | aesthetic (LAION improved-aesthetic-predictor) | digit_confidence (the embedded default)
    path: str = ""  # aesthetic: the MLP's .safetensors/.pth; digit_confidence: the classifier's directory
    clip_path: str = ""  # aesthetic: CLIP ViT-L/14 (a transformers CLIPModel + CLIPImageProcessor directory)


@dataclass
class PipelineConfig:
    address: str = ""  # Ray address; empty = start a local Ray
    num_workers: int = 1  # Ray actors; 0 = generate in this process, without Ray
    gpus_per_worker: float = 0.0
    cpus_per_worker: float = 1.0
    batch_size: int = 125
    max_retries: int = 3
    verify: bool = False
    # On an object store the job lock is a lease: a killed job's lease blocks the next job this long.
    lock_ttl_s: float = 120.0


@dataclass
class TrainConfig:
    output_dir: str = "runs/refiner"
    max_steps: int = 300
    # Samples per optimizer step over ALL ranks; each of W ranks takes global_batch_size / W (W must divide it).
    # Fixing it (not the per-rank batch) is what lets a run resume on another number of ranks with the same
    # sequence of samples (elastic resume, train/stream.py).
    global_batch_size: int = 64
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
    report_to: Any = "none"  # experiment trackers (train/tracking.py): none | tensorboard | wandb, or a list


@dataclass
class EvalConfig:
    num_samples: int = 500
    seed_offset: int = 10_000_000  # held-out seeds never used by the teacher cache
    batch_size: int = 250
    # Python threads that each roll out a fixed part of every batch with one intra-op thread (1: one rollout, on
    # torch's threads). A CPU setting: on 2 cores 2 beats one rollout on 2 intra-op threads by 1.47x.
    sampling_threads: int = 1
    grid_columns: int = 10
    prompts: list[str] = field(default_factory=list)  # cycled; empty = the plan's prompt draw
    # none | digit_classifier (the embedded default's in-domain classifier) | text_image (CLIPScore and/or
    # PickScore from the local weights below, whichever are set; noiserefine.evaluation.features)
    metrics: str = "none"
    classifier_dir: str = ""  # digit_classifier: where the classifier is trained once and cached
    # its training steps; 0: the classifier's own default (digits 500; compose 3000: the digit head reaches 0.99
    # held-out accuracy on the canvas, 0.94 at 500, which would cap every adherence figure)
    classifier_steps: int = 0
    # Local weight directories (nothing is downloaded); also used by ``python -m noiserefine.evaluate``.
    clip_path: str = ""  # CLIPScore: a transformers CLIPModel + CLIPProcessor directory (e.g. CLIP ViT-L/14)
    pickscore_path: str = ""  # PickScore: the PickScore_v1 CLIPModel directory
    pickscore_processor_path: str = ""  # its CLIPProcessor (CLIP-ViT-H-14 laion2B); "" = pickscore_path


@dataclass
class BenchmarkConfig:
    """The paper-table evaluation (``python -m noiserefine.evaluate``; README.md, "Reproducing the paper's table")."""

    protocol: str = "coco"  # coco (MS-COCO captions) | imagenet (class-conditional) | prompts (a text file)
    captions: str = ""  # coco: captions_val2014.json / captions_val2017.json
    prompts_file: str = ""  # prompts: one prompt per line, cycled
    num_classes: int = 1000  # imagenet: sample i is class i % num_classes (50K samples = 50 per class)
    num_samples: int = 30000
    base_seed: int = 0  # seed of sample i: noise.sample_seed(base_seed, seed_offset + i)
    seed_offset: int = 20_000_000  # beyond the teacher cache's and the periodic evaluation's ids
    reference: str = ""  # FID reference: a folder of real images or an .npz with mu/sigma; "" = no FID
    resolution: int = 0  # images are center-cropped and resized to this square size for FID; 0 = generated size
    inception_path: str = ""  # torch-fidelity's weights-inception-2015-12-05-6726825d.pth; "" = no FID/IS
    distilled_path: str = ""  # a guidance-distilled model (same family) for the third row; "" = no such row
    num_steps: int = 0  # sampler steps of every row; 0 = student.num_steps
    batch_size: int = 16  # sampling batch
    feature_batch_size: int = 64  # Inception/CLIP batch
    shard_size: int = 500  # samples per stored shard (the resume granularity)
    grid_columns: int = 8
    save_images: bool = False  # keep every sample as PNG (else only the grid's first columns)
    output_dir: str = "runs/eval"  # default --out: <output_dir>/<backend>-<run key>


@dataclass
class DemoConfig:
    """Budgets of the main job's extra experiments (``make demo``)."""

    num_ranks: int = 2  # DeepSpeed ranks for the refiner training
    full_gradient_steps: int = 50  # MSD vs full-gradient ablation (MSD: the main run's snapshot)
    distill_steps: int = 150  # guidance-distillation baseline fine-tuning
    transfer_steps: int = 150  # fine-tuning the teacher to the transfer style:
    transfer_thicken: int = 1  # strokes dilated by this many pixels (model.digits.thicken), and/or
    transfer_slant: float = 0.0  # digits slanted by this much (model.digits.slant; compose only)
    # guidance sweep of the teacher alone (w = 1: unguided); pick_guidance: sets teacher.guidance_scale (sweep.RULE)
    sweep_scales: list[float] = field(default_factory=lambda: [1.0, 1.1, 1.25, 1.5, 2.0, 3.0, 4.0, 6.0])
    pick_guidance: bool = True
    # python -m noiserefine.digits.multi_scale (not in `make demo`): per-w refiners vs one for all (README)
    multi_scale_guidance_scales: list[float] = field(default_factory=lambda: [1.1, 1.5, 2.0])
    multi_scale_held_out_scales: list[float] = field(default_factory=lambda: [1.25])
    multi_scale_timestep_slope: float = 200.0  # its refiner.guidance_timestep_slope
    multi_scale_max_steps: int = 0  # the multi-w refiner's train.max_steps; 0: train.max_steps (one per-w budget)
    multi_scale_correction_gain: bool = False  # its refiner.guidance_correction_gain


@dataclass
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    teacher: TeacherConfig = field(default_factory=TeacherConfig)
    student: StudentConfig = field(default_factory=StudentConfig)
    refiner: RefinerConfig = field(default_factory=RefinerConfig)
    data: DataConfig = field(default_factory=DataConfig)
    scorer: ScorerConfig = field(default_factory=ScorerConfig)
    pipeline: PipelineConfig = field(default_factory=PipelineConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    benchmark: BenchmarkConfig = field(default_factory=BenchmarkConfig)
    demo: DemoConfig = field(default_factory=DemoConfig)
    performance: PerformanceConfig = field(default_factory=PerformanceConfig)  # speed levers (performance.py)

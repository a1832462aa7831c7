"""Capacity plan of a config: samples, shards, bytes, teacher GPU-hours, training throughput (docs/scale.md).

    python -m noiserefine.capacity --config configs/sdxl.yaml --samples 1000000 [--wall-hours 24] \
        --measured bench/results/2026-11-26-h200-gpu_check.json [--mfu 0.4 --device-name H100]

Everything is arithmetic on the config and on measured GPU figures: ``--measured`` names the JSON that
``bench/gpu_check.py`` writes (the library takes them as data: :func:`measured_points`). Sizes are exact
for our shard format; times are ESTIMATES scaled from one measured point per model family (see
:func:`teacher_seconds_per_sample` and :func:`train_samples_per_second`). The model family, its latent
shape and the architecture a model directory's name suggests come from ``backends/registry.py``.

FLOPs (``--flops``, or ``--mfu``): one sample-forward of the architecture's denoiser counted exactly
(``flops.architecture_forward_flops``, on the meta device), times the forwards per sample; with ``--mfu`` and a
peak (``--peak-tflops``, or ``--device-name`` from ``flops.PEAKS``) the time that implies, next to the measured
figures' estimates.
"""

from __future__ import annotations

import argparse
import json
import math
from dataclasses import dataclass
from pathlib import Path

from .backends import registry

ARCHITECTURES = Path(__file__).resolve().parent / "backends" / "architectures"

TAR_BLOCK = 512
TAR_RECORD = 20 * TAR_BLOCK  # tarfile pads an archive to whole records of 10240 bytes
NPY_HEADER = 128  # np.save's header for a plain float array (version 1.0, padded to 64-byte alignment)
JSON_FIXED = 200  # the sample metadata without its prompt: ids, seed, source, teacher key, fingerprint (< 200)
DTYPE_BYTES = {"float16": 2, "float32": 4}
# sample-forwards per teacher step of the measured runs (bench results name cfg or cfg_pag)
FORWARDS_PER_STEP = {"cfg": 2, "cfg_pag": 3}
# ESTIMATE: a refiner training step's work besides the N-step rollout, in sample-forwards: the LoRA and the base
# forward, and the backward of the LoRA forward (input gradients ~ one forward; the LoRA's weight gradients are
# tiny). bench/gpu_check.py counts it exactly ("refiner_forward_backward").
REFINER_FORWARDS = 3


def _blocks(num_bytes: int) -> int:
    return -(-num_bytes // TAR_BLOCK) * TAR_BLOCK


def sample_bytes(latent_shape: tuple[int, ...], target_dtype: str, max_prompt_chars: int) -> int:
    """Bytes one sample takes in a shard: a header and padded data for ``.json`` and for ``.target.npy``.

    The json holds the prompt (at most ``max_prompt_chars``; ASCII assumed: escaped non-ASCII is 6 bytes
    a character) and fixed fields under 200 bytes.
    """
    target = math.prod(latent_shape) * DTYPE_BYTES[target_dtype] + NPY_HEADER
    return TAR_BLOCK + _blocks(JSON_FIXED + max_prompt_chars) + TAR_BLOCK + _blocks(target)


def shard_bytes(num_samples: int, per_sample: int) -> int:
    """A shard's size: its samples, the 1024-byte end marker, padded to a whole 10240-byte record."""
    return -(-(num_samples * per_sample + 2 * TAR_BLOCK) // TAR_RECORD) * TAR_RECORD


def cache_bytes(num_samples: int, shard_size: int, per_sample: int) -> int:
    full, last = divmod(num_samples, shard_size)
    return full * shard_bytes(shard_size, per_sample) + (shard_bytes(last, per_sample) if last else 0)


def architecture_of(cfg) -> str | None:
    """The architecture directory (``backends/architectures``) a config's model has, from
    ``model.architecture`` or the model path's name (the registry's hints); None if unknown."""
    return cfg.model.architecture or registry.architecture_for_path(cfg.model.path)


def latent_shape_of(cfg) -> tuple[int, int, int]:
    """The architecture's latent (its denoiser config), else the family's at its published resolution."""
    arch = architecture_of(cfg)
    if arch is None:
        try:
            return registry.family(cfg.model.backend).latent_shape()
        except ValueError as error:
            raise ValueError(f"cannot tell the latent shape of model.path={cfg.model.path} ({error}); pass "
                             "--latent-shape C,H,W") from None
    component = "unet.json" if (ARCHITECTURES / arch / "unet.json").is_file() else "transformer.json"
    spec = json.loads((ARCHITECTURES / arch / component).read_text())
    return (int(spec["in_channels"]), int(spec["sample_size"]), int(spec["sample_size"]))


@dataclass(frozen=True)
class Measured:
    """One measured point: ``seconds_per_forward`` of one sample at ``latent`` (a batched forward's share)."""

    family: str
    seconds_per_forward: float
    latent: tuple[int, ...]
    source: str


def measured_points(data: dict, source: str = "measured figures") -> dict[str, dict]:
    """From a GPU check (``bench/gpu_check.py``'s JSON, as data), per measured architecture: the generation
    rate as one sample-forward's cost, and the MSD step time per student step count. ``source`` names it."""
    try:
        cases = {case["name"]: case.get("figures") or {} for case in data["cases"]}
    except (KeyError, TypeError):
        raise ValueError(f"{source}: not a GPU check's figures (no list of named 'cases')") from None
    out = {}
    for name, gen in cases.items():
        if not name.endswith("_generation") or "generation_samples_per_s" not in gen:
            continue
        prefix = name[:-len("_generation")]
        arch, losses = gen.get("build", {}).get("architecture", prefix), cases.get(f"{prefix}_losses", {})
        try:
            forwards = FORWARDS_PER_STEP["cfg_pag" if "cfg_pag" in gen.get("guidance", "") else "cfg"]
            per_forward = 1.0 / (gen["generation_samples_per_s"] * gen["teacher_steps"] * forwards)
            msd = {row["steps"]: row["seconds"] for row in losses.get("rows", [])
                   if row.get("loss") == "msd" and not row.get("checkpointing") and row.get("status") == "ok"}
            out[arch] = {"teacher": Measured(arch, per_forward, tuple(gen["build"]["latent_shape"]),
                                             f"{source}: {name} {gen['generation_samples_per_s']} samples/s, batch "
                                             f"{gen['batch']}, {gen['teacher_steps']} steps, {gen['guidance']}"),
                         "msd_batch": losses.get("batch"), "msd_s_per_step": msd}
        except KeyError as missing:
            raise ValueError(f"{source}: case {name!r} (or {prefix}_losses) has no {missing}") from None
    return out


def load_measured(path: str | Path) -> dict[str, dict]:
    """:func:`measured_points` of a GPU check's JSON file; ``ValueError`` naming the file."""
    path = Path(path)
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError) as error:
        raise ValueError(f"--measured {str(path)!r}: cannot read a GPU check's JSON ({error})") from None
    return measured_points(data, path.name)


def measured_for(architecture: str | None, figures: dict[str, dict]) -> dict | None:
    """The measured point for ``architecture``: its own, else one of its family's (scaled by latent pixels:
    SD 1.5 and SD 2.1-768 use SD 2.1's); None when its family was not measured."""
    if architecture in figures:
        return figures[architecture]
    if architecture not in registry.architecture_names():
        return None
    siblings = registry.family_of_architecture(architecture).architectures
    return next((figures[arch] for arch in sorted(figures) if arch in siblings), None)


def teacher_seconds_per_sample(per_forward: float, num_steps: int, guider, latent: tuple[int, ...],
                               measured_latent: tuple[int, ...]) -> float:
    """ESTIMATE: the guider's sample-forwards over ``num_steps`` x the measured per-forward cost, scaled linearly by latent
    pixels (attention grows faster: a lower bound off the measured size). The measured batch was small
    (4 / 2): larger batches fill the GPU better, so at the measured size this is an upper bound."""
    scale = math.prod(latent[1:]) / math.prod(measured_latent[1:])
    from .guidance import network_calls

    return network_calls(guider, num_steps) * per_forward * scale


def train_samples_per_second(s_per_step: dict[int, float], batch: int, student_steps: int) -> float:
    """ESTIMATE: MSD samples/s per GPU at ``student_steps`` from the measured step times (batch ``batch``),
    linear in the student's step count (fitted through the measured N; the step's cost is the N-step rollout)."""
    points = sorted(s_per_step.items())
    if not points:
        raise ValueError("no measured MSD step times")
    if len(points) == 1:
        (n0, t0), = points
        seconds = t0 * student_steps / n0
    else:
        (n0, t0), (n1, t1) = points[0], points[-1]
        slope = (t1 - t0) / (n1 - n0)
        seconds = t0 + slope * (student_steps - n0)
    return batch / seconds


def plan(cfg, num_samples: int, *, wall_hours: float = 24.0, gpus_per_node: int = 8,
         seconds_per_forward: float | None = None, latent: tuple[int, ...] | None = None,
         figures: dict | None = None, flops_per_forward: int | None = None, mfu: float | None = None,
         peak: dict | None = None) -> dict:
    """The capacity table of ``cfg`` with ``num_samples`` samples (see the module docstring).

    ``figures``: :func:`measured_points` (measured architecture -> point); without a point for the
    config's family (or ``seconds_per_forward``) the table has sizes and no time estimates.
    ``flops_per_forward``: of one sample-forward; with ``mfu`` and ``peak`` (``flops.gpu_peak``'s form) the
    times that utilisation implies (:func:`implied_by_flops`)."""
    figures = figures or {}
    latent = tuple(latent) if latent else latent_shape_of(cfg)
    per_sample = sample_bytes(latent, cfg.data.target_dtype, cfg.data.max_prompt_chars)
    shard_size = cfg.data.shard_size
    num_shards = -(-num_samples // shard_size)
    total = cache_bytes(num_samples, shard_size, per_sample)
    out = {"config_backend": cfg.model.backend, "architecture": architecture_of(cfg), "latent_shape": list(latent),
           "target_dtype": cfg.data.target_dtype, "samples": num_samples, "shard_size": shard_size,
           "shards": num_shards, "bytes_per_sample": per_sample, "bytes_per_shard": shard_bytes(shard_size, per_sample),
           "cache_bytes": total, "teacher_steps": cfg.teacher.num_steps, "guidance": cfg.teacher.guidance}
    measured = measured_for(out["architecture"], figures)
    if seconds_per_forward is not None:
        per_forward, ref_latent, source = seconds_per_forward, latent, "--seconds-per-forward"
    elif measured is not None:
        point = measured["teacher"]
        per_forward, ref_latent, source = point.seconds_per_forward, point.latent, point.source
    else:
        per_forward = None
    if per_forward is not None:
        from .guidance import make_guider

        per = teacher_seconds_per_sample(per_forward, cfg.teacher.num_steps, make_guider(cfg.teacher), latent,
                                         ref_latent)
        gpu_hours = num_samples * per / 3600
        out.update({"teacher_source": source, "teacher_seconds_per_sample": per, "teacher_gpu_hours": gpu_hours,
                    "teacher_gpus_for_wall_hours": math.ceil(gpu_hours / wall_hours),
                    "teacher_nodes": math.ceil(math.ceil(gpu_hours / wall_hours) / gpus_per_node),
                    "write_bytes_per_second": total / (wall_hours * 3600)})
    global_batch = int(cfg.train.global_batch_size)
    trained = cfg.train.max_steps * global_batch
    out.update({"train_steps": cfg.train.max_steps, "global_batch_size": global_batch, "train_samples_seen": trained,
                "train_epochs": trained / num_samples})
    if flops_per_forward is not None:
        out.update(implied_by_flops(cfg, flops_per_forward, num_samples, trained, mfu, peak))
    if measured is not None and measured["msd_s_per_step"]:
        rate = train_samples_per_second(measured["msd_s_per_step"], measured["msd_batch"], cfg.student.num_steps)
        rate /= math.prod(latent[1:]) / math.prod(measured["teacher"].latent[1:])
        gpu_hours = trained / rate / 3600
        ranks = math.gcd(global_batch, gpus_per_node)  # the ranks of one node that split the global batch evenly
        per_rank = global_batch // ranks
        share = min(1.0, (shard_size + per_rank - 1) / global_batch)  # of the shards each rank reads
        out.update({"train_samples_per_s_per_gpu": rate, "train_gpu_hours": gpu_hours, "train_ranks": ranks,
                    "train_wall_hours": gpu_hours / ranks,
                    "train_read_bytes_per_s_per_rank": rate * per_sample * share * ranks})
    return out


def implied_by_flops(cfg, flops_per_forward: int, num_samples: int, trained: int, mfu: float | None,
                     peak: dict | None) -> dict:
    """FLOPs per sample of the teacher (the guider's forwards over ``teacher.num_steps``) and of an MSD training
    step (``REFINER_FORWARDS + student.num_steps`` forwards, an estimate), and with ``mfu`` x ``peak`` the seconds
    and GPU-hours they imply: time = FLOPs / (mfu * peak FLOP/s)."""
    from .guidance import make_guider, network_calls

    teacher = network_calls(make_guider(cfg.teacher), cfg.teacher.num_steps) * flops_per_forward
    train = (REFINER_FORWARDS + cfg.student.num_steps) * flops_per_forward
    out = {"flops_per_forward": flops_per_forward, "teacher_flops_per_sample": teacher,
           "train_flops_per_sample": train}
    if mfu is None or not peak or not peak.get("peak_flop_per_s"):
        return out
    rate = mfu * peak["peak_flop_per_s"]
    out.update({"mfu": mfu, "peak_flop_per_s": peak["peak_flop_per_s"], "peak_source": peak["peak_source"],
                "implied_teacher_seconds_per_sample": teacher / rate,
                "implied_teacher_gpu_hours": num_samples * teacher / rate / 3600,
                "implied_train_samples_per_s_per_gpu": rate / train,
                "implied_train_gpu_hours": trained * train / rate / 3600})
    return out


def _size(num_bytes: float) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if num_bytes < 1000 or unit == "TB":
            return f"{num_bytes:.3g} {unit}"
        num_bytes /= 1000
    return f"{num_bytes} B"


def render(table: dict) -> str:
    rows = [("samples", f"{table['samples']:,}"),
            ("latent (target)", f"{'x'.join(map(str, table['latent_shape']))} {table['target_dtype']}"),
            ("bytes per sample (tar)", f"{table['bytes_per_sample']:,}"),
            ("shards", f"{table['shards']:,} of {table['shard_size']} ({_size(table['bytes_per_shard'])} each)"),
            ("cache size", _size(table["cache_bytes"]))]
    if "teacher_gpu_hours" in table:
        rows += [("teacher", f"{table['guidance']}, {table['teacher_steps']} steps: "
                             f"{table['teacher_seconds_per_sample'] * 1000:.4g} ms/sample (estimate)"),
                 ("teacher GPU-hours", f"{table['teacher_gpu_hours']:,.4g} (estimate; {table['teacher_source']})"),
                 ("for the wall-clock goal", f"{table['teacher_gpus_for_wall_hours']} GPUs = {table['teacher_nodes']} "
                                             f"node(s); writes {_size(table['write_bytes_per_second'])}/s")]
    else:
        rows.append(("teacher GPU-hours", "not measured for this model family: pass --measured (a GPU check's JSON "
                                          "that measured it) or --seconds-per-forward"))
    rows.append(("training", f"{table['train_steps']} steps x global batch {table['global_batch_size']} = "
                             f"{table['train_samples_seen']:,} samples ({table['train_epochs']:.3g} epochs)"))
    if "train_gpu_hours" in table:
        rows += [("training throughput", f"{table['train_samples_per_s_per_gpu']:.3g} samples/s per GPU (estimate)"),
                 ("training GPU-hours", f"{table['train_gpu_hours']:.3g} = {table['train_wall_hours']:.3g} h on "
                                        f"{table['train_ranks']} ranks; each reads "
                                        f"{_size(table['train_read_bytes_per_s_per_rank'])}/s")]
    if "flops_per_forward" in table:
        rows += [("FLOPs per sample-forward", f"{table['flops_per_forward'] / 1e9:.4g} GFLOP (counted: the "
                                              f"{table['architecture']} denoiser, batch 1)"),
                 ("FLOPs per sample", f"teacher {table['teacher_flops_per_sample'] / 1e12:.4g} TFLOP; training "
                                      f"{table['train_flops_per_sample'] / 1e12:.4g} TFLOP (estimate: "
                                      f"{REFINER_FORWARDS} + student steps forwards)")]
    if "implied_teacher_gpu_hours" in table:
        rows.append((f"at MFU {table['mfu']:g} of {table['peak_flop_per_s'] / 1e12:.4g} TFLOP/s",
                     f"teacher {table['implied_teacher_seconds_per_sample'] * 1000:.4g} ms/sample = "
                     f"{table['implied_teacher_gpu_hours']:,.4g} GPU-hours; training "
                     f"{table['implied_train_samples_per_s_per_gpu']:.3g} samples/s per GPU = "
                     f"{table['implied_train_gpu_hours']:.3g} GPU-hours ({table['peak_source']})"))
    width = max(len(name) for name, _ in rows)
    return "\n".join(f"{name.ljust(width)}  {value}" for name, value in rows)


def main(argv: list[str] | None = None) -> int:
    from .config import load_config

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", required=True)
    parser.add_argument("--samples", type=int, help="data.num_samples to plan for (default: the config's)")
    parser.add_argument("--wall-hours", type=float, default=24.0, help="wall-clock goal of the teacher job")
    parser.add_argument("--gpus-per-node", type=int, default=8)
    parser.add_argument("--measured", help="measured GPU figures: the JSON bench/gpu_check.py writes, e.g. "
                                           "bench/results/2026-11-26-h200-gpu_check.json (no times without it)")
    parser.add_argument("--seconds-per-forward", type=float, help="measured cost of one sample-forward")
    parser.add_argument("--latent-shape", help="C,H,W if the config's model is not a known architecture")
    parser.add_argument("--flops", action="store_true", help="count the FLOPs per sample (the architecture's "
                                                                 "denoiser on the meta device: ~10-60 s)")
    parser.add_argument("--mfu", type=float, help="a model FLOPs utilisation in (0, 1]: the times it implies "
                                                  "(counts the FLOPs; needs --peak-tflops or --device-name)")
    parser.add_argument("--peak-tflops", type=float, help="the device's dense bf16 peak in TFLOP/s")
    parser.add_argument("--device-name", help="a GPU of the peaks table (noiserefine/flops.py PEAKS), e.g. H100")
    parser.add_argument("--json", action="store_true", help="print the table as JSON")
    args = parser.parse_args(argv)
    cfg = load_config(args.config)
    latent = tuple(int(x) for x in args.latent_shape.split(",")) if args.latent_shape else None
    figures = load_measured(args.measured) if args.measured else {}
    peak = _peak(args)
    flops_per_forward = None
    if args.flops or args.mfu is not None:
        from .flops import architecture_forward_flops

        architecture = architecture_of(cfg)
        if architecture is None or latent is not None:
            raise ValueError("--flops/--mfu count a shipped architecture's denoiser: set model.architecture (or a "
                             "model path the registry recognises) and leave out --latent-shape")
        flops_per_forward = architecture_forward_flops(architecture)
    table = plan(cfg, args.samples or cfg.data.num_samples, wall_hours=args.wall_hours,
                 gpus_per_node=args.gpus_per_node, seconds_per_forward=args.seconds_per_forward, latent=latent,
                 figures=figures, flops_per_forward=flops_per_forward, mfu=args.mfu, peak=peak)
    print(json.dumps(table, indent=1, default=str) if args.json else render(table))
    return 0


def _peak(args) -> dict | None:
    """``--peak-tflops`` or ``--device-name`` (the peaks table) as ``flops.gpu_peak``'s dict; checks ``--mfu``."""
    if args.mfu is not None and not 0 < args.mfu <= 1:
        raise ValueError(f"--mfu {args.mfu}: a utilisation in (0, 1]")
    if args.peak_tflops is not None and args.device_name:
        raise ValueError("--peak-tflops and --device-name both give the peak: pass one")
    if args.peak_tflops is not None:
        if not args.peak_tflops > 0:
            raise ValueError(f"--peak-tflops {args.peak_tflops}: must be > 0")
        return {"peak_flop_per_s": args.peak_tflops * 1e12, "peak_source": "--peak-tflops"}
    if args.device_name:
        from .flops import PEAKS, gpu_peak

        peak = gpu_peak(args.device_name)
        if peak["peak_flop_per_s"] is None:
            raise ValueError(f"--device-name {args.device_name!r} is not in the peaks table "
                             f"{[name for name, _, _ in PEAKS]}; pass --peak-tflops")
        return peak
    if args.mfu is not None:
        raise ValueError("--mfu needs the device's peak: --peak-tflops or --device-name")
    return None


if __name__ == "__main__":
    raise SystemExit(main())

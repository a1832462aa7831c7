"""The one module that imports DeepSpeed and owns distributed state.

Works under the ``deepspeed`` launcher (which sets RANK, WORLD_SIZE, LOCAL_RANK,
MASTER_ADDR and MASTER_PORT for every rank) and as a single plain ``python``
process (those variables default to a world of one on 127.0.0.1 and a free
port). Without CUDA, ``DS_ACCELERATOR=cpu`` is set before DeepSpeed is
imported and the process group uses gloo; with CUDA it uses nccl.

Checkpoints are DeepSpeed's own (frozen base weights excluded); before DeepSpeed
unpickles one, every file must pass ``torch.load(weights_only=True)``
(:func:`read_client_state`). Cadence, tags and retention: ``train/checkpoint.py``.
"""

from __future__ import annotations

import os
import re
import socket
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

_deepspeed = None
SHM_COMM_OP = "deepspeed_shm_comm"  # ShareMemCommBuilder.NAME


def _prepare_environment() -> None:
    if not torch.cuda.is_available():
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    defaults = {"RANK": "0", "WORLD_SIZE": "1", "LOCAL_RANK": "0", "MASTER_ADDR": "127.0.0.1"}
    for key, value in defaults.items():
        os.environ.setdefault(key, value)
    if "MASTER_PORT" not in os.environ:
        os.environ["MASTER_PORT"] = str(free_port())


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def _ds():
    """``import deepspeed`` after the environment is prepared (it picks its accelerator at import)."""
    global _deepspeed
    if _deepspeed is None:
        _prepare_environment()
        import deepspeed

        _deepspeed = deepspeed
    return _deepspeed


def launch_rank_world() -> tuple[int, int]:
    """This process's rank and the world size as the launcher set them (before :func:`init`)."""
    return int(os.environ.get("RANK", "0")), int(os.environ.get("WORLD_SIZE", "1"))


def on_cuda() -> bool:
    return torch.cuda.is_available() and os.environ.get("DS_ACCELERATOR", "cuda") == "cuda"


@dataclass(frozen=True)
class DistInfo:
    rank: int
    world_size: int
    local_rank: int
    backend: str

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def init() -> DistInfo:
    """Initialise the process group (gloo on CPU, nccl on CUDA); idempotent."""
    deepspeed = _ds()
    backend = "nccl" if on_cuda() else "gloo"
    if not on_cuda():
        # On CPU, DeepSpeed's comm backend JIT-compiles its shared-memory all-reduce op at
        # init (g++, ~80 s on every new machine). Only inference tensor parallelism
        # (inference_all_reduce) uses that op; training all-reduces go through gloo. Marking
        # it incompatible skips the build; DeepSpeed caches this dict so that edits persist.
        deepspeed.ops.__compatible_ops__[SHM_COMM_OP] = False
    if not deepspeed.comm.is_initialized():
        deepspeed.init_distributed(dist_backend=backend, verbose=False)
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if on_cuda():
        torch.cuda.set_device(local_rank)
    return DistInfo(rank(), world_size(), local_rank, backend)


def device_for(configured: str) -> str:
    """``model.device`` for this rank: a bare ``cuda`` becomes ``cuda:<LOCAL_RANK>``."""
    if configured == "cuda":
        return f"cuda:{int(os.environ.get('LOCAL_RANK', '0'))}"
    return configured


def rank() -> int:
    deepspeed = _ds()
    return deepspeed.comm.get_rank() if deepspeed.comm.is_initialized() else 0


def world_size() -> int:
    deepspeed = _ds()
    return deepspeed.comm.get_world_size() if deepspeed.comm.is_initialized() else 1


def barrier() -> None:
    deepspeed = _ds()
    if deepspeed.comm.is_initialized() and world_size() > 1:
        deepspeed.comm.barrier()


def all_gather_object(obj: Any) -> list:
    """``obj`` of every rank, in rank order."""
    if world_size() == 1:
        return [obj]
    out = [None] * world_size()
    _ds().comm.all_gather_object(out, obj)
    return out


def all_reduce_sum(values: list[float]) -> list[float]:
    """Element-wise sum of a list of floats over all ranks (float64 on the communication device)."""
    if world_size() == 1:
        return [float(v) for v in values]
    device = f"cuda:{torch.cuda.current_device()}" if on_cuda() else "cpu"
    tensor = torch.tensor(values, dtype=torch.float64, device=device)
    _ds().comm.all_reduce(tensor)
    return tensor.cpu().tolist()


def ds_config(cfg) -> dict:
    """DeepSpeed config from the training config: micro batch = ``train.batch_size`` per rank, no
    accumulation, ZeRO ``train.zero_stage``, gradient clipping, bf16 only on CUDA with a bf16 model."""
    train = cfg.train
    if train.zero_stage not in (0, 1, 2):
        raise ValueError(f"train.zero_stage must be 0, 1 or 2, got {train.zero_stage} (stage 3 partitions the "
                         "LoRA weights, which the refiner export does not gather)")
    bf16 = on_cuda() and cfg.model.dtype == "bfloat16"
    config = {
        "train_micro_batch_size_per_gpu": int(train.batch_size),
        "gradient_accumulation_steps": 1,
        "zero_optimization": {"stage": int(train.zero_stage)},
        "gradient_clipping": float(train.gradient_clipping),
        "steps_per_print": 10**9,
        "wall_clock_breakdown": False,
        "bf16": {"enabled": bool(bf16)},
        "fp16": {"enabled": False},
    }
    if train.zero_stage > 0:
        config["zero_allow_untested_optimizer"] = True  # plain torch AdamW on the LoRA parameters
    return config


def build_engine(refiner: torch.nn.Module, cfg):
    """``deepspeed.initialize`` with AdamW over the refiner's trainable (LoRA) parameters only."""
    deepspeed = _ds()
    params = list(refiner.trainable_parameters())
    if not params or not all(p.requires_grad for p in params):
        raise ValueError("the refiner has no trainable parameters (or some are frozen)")
    optimizer = torch.optim.AdamW(params, lr=float(cfg.train.learning_rate),
                                  weight_decay=float(cfg.train.weight_decay))
    engine, *_ = deepspeed.initialize(model=refiner, model_parameters=params, optimizer=optimizer,
                                      config=ds_config(cfg))
    return engine


def save_checkpoint(engine, ckpt_dir: str | Path, tag: str, client_state: dict) -> None:
    """DeepSpeed's checkpoint ``ckpt_dir/tag``: call on EVERY rank (DeepSpeed synchronises inside).

    ``latest`` is not written here (DeepSpeed writes it in place): the caller writes it atomically once
    the checkpoint is complete and recorded.
    """
    engine.save_checkpoint(str(ckpt_dir), tag=tag, client_state=client_state, exclude_frozen_parameters=True,
                           save_latest=False)
    barrier()


def _checkpoint_classes() -> list:
    """The DeepSpeed classes a ZeRO optimizer checkpoint pickles besides tensors and containers
    (plain data holders), allowed in the ``weights_only`` check."""
    _ds()
    from deepspeed.runtime.fp16.loss_scaler import LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum
    from deepspeed.utils.tensor_fragment import fragment_address

    return [LossScaler, ZeroStageEnum, fragment_address]


class CheckpointDamaged(ValueError):
    """A checkpoint that cannot be used as written (truncated, zeroed, a file missing, a save cut short):
    the resume falls back to an older one. Other ``ValueError``s (e.g. a foreign pickle) are refusals."""


def _load_refusal(error: Exception) -> str | None:
    """The weights-only unpickler's reason if it refused an object it does not know (not damage)."""
    match = re.search(r"WeightsUnpickler error: (Unsupported global[^\n]*?)(?:\. Please|\n|$)", str(error))
    return match.group(1) if match else None


def read_client_state(ckpt_dir: str | Path, tag: str) -> dict:
    """The client state of checkpoint ``tag``, after every file of it passed ``torch.load(weights_only=True)``.

    DeepSpeed unpickles checkpoints with ``weights_only=False``: a checkpoint copied in
    from elsewhere that references any Python object other than tensors, containers and
    :func:`_checkpoint_classes` is refused here (``ValueError``), before DeepSpeed ever opens
    it. A missing model-states file or one that does not load at all (truncated, zeroed)
    raises :class:`CheckpointDamaged`.
    """
    directory = Path(ckpt_dir) / tag
    parts = sorted(directory.glob("*.pt"))
    model_states = directory / "mp_rank_00_model_states.pt"
    if model_states not in parts:
        raise CheckpointDamaged(f"no {model_states.name} (incomplete checkpoint)")
    loaded = {}
    with torch.serialization.safe_globals(_checkpoint_classes()):
        for part in parts:
            try:
                loaded[part] = torch.load(part, map_location="cpu", weights_only=True)
            except Exception as error:
                refusal = _load_refusal(error)
                if refusal is not None:
                    raise ValueError(f"{part}: refused, it does not load with torch.load(weights_only=True) "
                                     f"({refusal})") from None
                first = (str(error).strip().splitlines() or [""])[0]
                first = first if len(first) <= 120 else first[:120] + "…"
                raise CheckpointDamaged(f"{part.name} does not load ({type(error).__name__}: {first})") from None
    state = loaded[model_states]
    if not isinstance(state, dict):
        raise CheckpointDamaged(f"{model_states.name}: not a DeepSpeed model-states dict")
    return state


def load_checkpoint(engine, ckpt_dir: str | Path, tag: str) -> dict:
    """Load checkpoint ``tag`` into ``engine`` (check it with :func:`read_client_state` first)."""
    path, client_state = engine.load_checkpoint(str(ckpt_dir), tag=tag, load_module_strict=False)
    if path is None:
        raise ValueError(f"{ckpt_dir}: checkpoint {tag} could not be loaded")
    return client_state


def shutdown() -> None:
    deepspeed = _ds()
    if deepspeed.comm.is_initialized():
        barrier()
        try:
            deepspeed.comm.destroy_process_group()
        except Exception:  # best effort at exit
            pass

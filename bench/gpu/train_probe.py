"""``trainer/train.py`` run unchanged as ``__main__``, plus a record of what DeepSpeed built and the peak memory.

    deepspeed --num_gpus 1 bench/gpu/train_probe.py --config configs/digits.yaml ...   (same arguments)

``bench/gpu_check.py`` starts the uninterrupted digits run through this wrapper;
the killed and resumed run use ``trainer/train.py`` itself, so comparing their
refiners also shows the wrapper changes nothing. It wraps
``noiserefine.train.distributed.build_engine`` from outside (as ``tests/hooks``
do) to note the engine's optimizer class, whether bf16 is on, the DeepSpeed
config and the LoRA dtypes, and at exit writes that with the CUDA peak memory to
``$NOISEREFINE_GPU_PROBE.rank<R>.json``.
"""

from __future__ import annotations

import atexit
import json
import os
import runpy
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
TRAINER = REPO / "trainer" / "train.py"
PROBE_ENV = "NOISEREFINE_GPU_PROBE"
record: dict = {}


def _write() -> None:
    import torch

    target = os.environ.get(PROBE_ENV)
    if not target:
        return
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        record["cuda_max_memory_allocated_gb"] = round(torch.cuda.max_memory_allocated() / 2**30, 4)
        record["cuda_max_memory_reserved_gb"] = round(torch.cuda.max_memory_reserved() / 2**30, 4)
    Path(f"{target}.rank{os.environ.get('RANK', '0')}.json").write_text(json.dumps(record, default=str))


def _install() -> None:
    sys.path.insert(0, str(REPO))
    from noiserefine.train import distributed

    build_engine = distributed.build_engine

    def probed_build_engine(refiner, cfg):
        engine = build_engine(refiner, cfg)
        params = refiner.trainable_parameters()
        record.update(optimizer=type(engine.optimizer).__name__, bf16=bool(engine.bfloat16_enabled()),
                      ds_config=distributed.ds_config(cfg), lora_dtypes=sorted({str(p.dtype) for p in params}),
                      device=str(params[0].device), refiner_timestep=float(refiner.timestep),
                      refiner_timestep_dtype=str(refiner.timestep.dtype))
        return engine

    distributed.build_engine = probed_build_engine


if __name__ == "__main__":
    atexit.register(_write)
    _install()
    sys.argv[0] = str(TRAINER)
    runpy.run_path(str(TRAINER), run_name="__main__")

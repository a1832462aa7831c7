"""Test-only fault injection, loaded by every Python process started with this folder on PYTHONPATH.

Production code has no test hooks: these patch it from outside, in the processes
a test starts (the trainer, the Ray workers of a local Ray, which inherit the
environment). Each hook patches its module right after that module is first imported.

- ``NOISEREFINE_FAULT_EXIT_ONCE=<marker file>``: the first process to finish one batch
  of a shard (its temp file half written) creates the marker and exits hard (code 17),
  like a killed worker; later processes see the marker and work normally.
- ``NOISEREFINE_SHARD_DELAY_S=<seconds>``: every shard's generation starts with a sleep (slow
  workers, so that a test can remove a Ray node while shards are being written).
- ``NOISEREFINE_TRAIN_EXIT_AFTER_STEP=<N>``: the trainer exits hard (code 17) when step
  N+1 starts, i.e. after step N and its checkpoint (if due) completed.
- ``NOISEREFINE_TRAIN_KILL_RANK=<rank>:<N>``: the trainer process of that rank sends itself
  SIGKILL when step N starts (one rank of several dying mid-run).
- ``NOISEREFINE_TRAIN_KILL_NODE=<rank>:<N>``: the trainer process of that rank sends SIGKILL to its
  whole process group when step N starts: a node lost with its launcher and every rank on it (the test
  starts each "node" as its own session, as srun's tasks are).
- ``NOISEREFINE_RECORD_WRITES=<dir>``: every file the process writes through ``torch.save`` (DeepSpeed's
  checkpoint files), ``noiserefine.files.atomic_path`` or ``append_csv`` is appended (absolute path, one
  per line, once per write) to ``<dir>/writes.<pid>.txt``: which process wrote what, how often.
- ``NOISEREFINE_TRAIN_KILL_IN_SAVE=<N>``: the trainer sends itself SIGKILL in the middle of
  DeepSpeed's write of checkpoint ``stepN`` (the first file half written, ``latest`` untouched).
"""

import importlib.abc
import importlib.util
import os
import sys

SHARD_MARKER = os.environ.get("NOISEREFINE_FAULT_EXIT_ONCE")
SHARD_DELAY = float(os.environ.get("NOISEREFINE_SHARD_DELAY_S", "0") or 0)
EXIT_AFTER_STEP = int(os.environ.get("NOISEREFINE_TRAIN_EXIT_AFTER_STEP", "0") or 0)
KILL_RANK = os.environ.get("NOISEREFINE_TRAIN_KILL_RANK", "")
KILL_IN_SAVE = int(os.environ.get("NOISEREFINE_TRAIN_KILL_IN_SAVE", "0") or 0)
KILL_NODE = os.environ.get("NOISEREFINE_TRAIN_KILL_NODE", "")
RECORD_WRITES = os.environ.get("NOISEREFINE_RECORD_WRITES", "")


def _sigkill_self() -> None:
    import signal

    sys.stdout.flush()
    sys.stderr.flush()
    os.kill(os.getpid(), signal.SIGKILL)


def _die_once(marker: str) -> None:
    try:
        with open(marker, "x") as handle:
            handle.write(str(os.getpid()))
    except FileExistsError:
        return
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(17)


def _patch_generate(module) -> None:
    original = module.shard_samples

    def shard_samples(*args, **kwargs):
        for count, sample in enumerate(original(*args, **kwargs), start=1):
            yield sample
            if count == kwargs["batch_size"]:  # mid-shard: one batch written to the temp file
                _die_once(SHARD_MARKER)

    module.shard_samples = shard_samples


def _patch_generate_delay(module) -> None:
    import time

    original = module.shard_samples

    def shard_samples(*args, **kwargs):
        time.sleep(SHARD_DELAY)
        yield from original(*args, **kwargs)

    module.shard_samples = shard_samples


def _both(first, second):
    def patch(module) -> None:
        first(module)
        second(module)

    return patch


def _patch_loop(module) -> None:
    original, calls = module.train_step, [0]

    def train_step(*args, **kwargs):
        calls[0] += 1
        if calls[0] == EXIT_AFTER_STEP + 1:  # used on fresh runs: call k is step k
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(17)
        return original(*args, **kwargs)

    module.train_step = train_step


def _patch_loop_kill_rank(module) -> None:
    rank, step = (int(part) for part in KILL_RANK.split(":"))
    original, calls = module.train_step, [0]

    def train_step(*args, **kwargs):
        calls[0] += 1
        if calls[0] == step and int(os.environ.get("RANK", "0")) == rank:
            print(f"test hook: SIGKILL to rank {rank} at step {step}", flush=True)
            _sigkill_self()
        return original(*args, **kwargs)

    module.train_step = train_step


def _patch_loop_kill_node(module) -> None:
    import signal

    rank, step = (int(part) for part in KILL_NODE.split(":"))
    original, calls = module.train_step, [0]

    def train_step(*args, **kwargs):
        calls[0] += 1
        if calls[0] == step and int(os.environ.get("RANK", "0")) == rank:
            print(f"test hook: SIGKILL to the node of rank {rank} at step {step}", flush=True)
            sys.stderr.flush()
            os.killpg(os.getpgid(0), signal.SIGKILL)
        return original(*args, **kwargs)

    module.train_step = train_step


def _record_write(path) -> None:
    with open(os.path.join(RECORD_WRITES, f"writes.{os.getpid()}.txt"), "a") as handle:
        handle.write(os.path.abspath(os.fspath(path)) + "\n")


def _patch_torch_save(module) -> None:
    original = module.save

    def save(obj, f, *args, **kwargs):
        if isinstance(f, (str, os.PathLike)):
            _record_write(f)
        return original(obj, f, *args, **kwargs)

    module.save = save


def _patch_files(module) -> None:
    import contextlib

    atomic_path, append_csv = module.atomic_path, module.append_csv

    @contextlib.contextmanager
    def recorded_atomic_path(path, *args, **kwargs):
        with atomic_path(path, *args, **kwargs) as tmp:
            yield tmp
        _record_write(path)  # replaced: written

    def recorded_append_csv(path, *args, **kwargs):
        _record_write(path)
        return append_csv(path, *args, **kwargs)

    module.atomic_path, module.append_csv = recorded_atomic_path, recorded_append_csv


def _patch_distributed(module) -> None:
    original = module.save_checkpoint

    def save_checkpoint(engine, ckpt_dir, tag, client_state):
        if tag != f"step{KILL_IN_SAVE:08d}":
            return original(engine, ckpt_dir, tag, client_state)
        import io

        import torch

        def half_save(obj, path, *args, **kwargs):  # the kill lands mid-write of the first file
            buffer = io.BytesIO()
            torch_save(obj, buffer, *args, **kwargs)
            with open(path, "wb") as handle:
                handle.write(buffer.getvalue()[: len(buffer.getvalue()) // 2])
                handle.flush()
            _sigkill_self()

        torch_save, torch.save = torch.save, half_save
        return original(engine, ckpt_dir, tag, client_state)

    module.save_checkpoint = save_checkpoint


class _PatchAfterImport(importlib.abc.MetaPathFinder):
    def __init__(self, patches):
        self.patches = patches

    def find_spec(self, name, path, target=None):
        if name not in self.patches:
            return None
        sys.meta_path.remove(self)
        try:
            spec = importlib.util.find_spec(name)
        finally:
            sys.meta_path.insert(0, self)
        exec_module, patch = spec.loader.exec_module, self.patches.pop(name)

        def patched_exec(module):
            exec_module(module)
            patch(module)

        spec.loader.exec_module = patched_exec
        return spec


_patches = {}
if SHARD_MARKER:
    _patches["noiserefine.targets.generate"] = _patch_generate
if SHARD_DELAY:
    previous = _patches.get("noiserefine.targets.generate")
    _patches["noiserefine.targets.generate"] = (_both(previous, _patch_generate_delay) if previous
                                                else _patch_generate_delay)
if EXIT_AFTER_STEP:
    _patches["noiserefine.train.loop"] = _patch_loop
if KILL_RANK:
    _patches["noiserefine.train.loop"] = _patch_loop_kill_rank
if KILL_IN_SAVE:
    _patches["noiserefine.train.distributed"] = _patch_distributed
if KILL_NODE:
    _patches["noiserefine.train.loop"] = _patch_loop_kill_node
if RECORD_WRITES:
    _patches["torch"] = _patch_torch_save
    _patches["noiserefine.files"] = _patch_files
if _patches:
    sys.meta_path.insert(0, _PatchAfterImport(_patches))

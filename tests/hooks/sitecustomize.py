"""Test-only fault injection, loaded by every Python process started with this folder on PYTHONPATH.

Production code has no test hooks: these patch it from outside, in the processes
a test starts (the trainer, the Ray workers of a local Ray, which inherit the
environment). Each hook patches its module right after that module is first imported.

- ``NOISEREFINE_FAULT_EXIT_ONCE=<marker file>``: the first process to finish one batch
  of a shard (its temp file half written) creates the marker and exits hard (code 17),
  like a killed worker; later processes see the marker and work normally.
- ``NOISEREFINE_TRAIN_EXIT_AFTER_STEP=<N>``: the trainer exits hard (code 17) when step
  N+1 starts, i.e. after step N and its checkpoint (if due) completed.
"""

import importlib.abc
import importlib.util
import os
import sys

SHARD_MARKER = os.environ.get("NOISEREFINE_FAULT_EXIT_ONCE")
EXIT_AFTER_STEP = int(os.environ.get("NOISEREFINE_TRAIN_EXIT_AFTER_STEP", "0") or 0)


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
if EXIT_AFTER_STEP:
    _patches["noiserefine.train.loop"] = _patch_loop
if _patches:
    sys.meta_path.insert(0, _PatchAfterImport(_patches))

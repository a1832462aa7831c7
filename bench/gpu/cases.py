"""The GPU check's cases, declared as data: what each measures, on which model, batch, steps, device needs.

``bench/gpu/runner.py`` runs a selected list of them; the real-size ones (``runner="realsize"``) are measured
by ``bench/gpu/measure.py`` in one process per model family (``bench/gpu/realsize.py``). The report lists the
cases in this order (by importance); inside a family they run generation, sampling, losses (the losses case is
the long one and takes the time that is left).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

# loss, activation checkpointing, the N (student steps) it is measured at
LossPlan = tuple[tuple[str, bool, tuple[int, ...]], ...]

# --tiny (CPU smoke run): the same plan with few steps; the figures keep their names, with the N they used.
TINY_STEPS = {2: 1, 5: 2, 10: 3, 25: 5, 50: 10}


@dataclass(frozen=True)
class Case:
    name: str
    measures: str  # the report's title of the case
    runner: str  # "pytest" | "digits" | "realsize": which code runs it
    family: str = ""  # model family: "digits" (configs/digits.yaml) or a real-size architecture (sd21, sdxl)
    measure: str = ""  # realsize only: "generation" | "sampling" | "losses" (a function of bench/gpu/measure.py)
    batch: int = 0  # prompts per generation/sampling batch; samples per training step
    steps: tuple[int, ...] = ()  # teacher steps N' (generation), sampling steps N, training steps (digits)
    repeats: int = 1  # timed repetitions after the warm-up (the median is reported)
    plan: LossPlan = ()  # losses only: the training steps measured
    optional_steps: tuple[int, ...] = ()  # losses only: N run only if the estimated time leaves room
    needs: str = "any"  # "cuda": without CUDA the case only checks that it is ready (gpu_tests collects)
    cap_s: float = 0.0  # pytest/digits: the most seconds it may take of the default budget (leaves the later
                        # cases their share; scaled up with a larger --budget-s, see Runner.cap)
    tiny: tuple[tuple[str, object], ...] = ()  # --tiny overrides beyond the step mapping
    levers: tuple[str, ...] = ()  # levers only: the speed levers measured on/off (bench/gpu/levers.py)

    def for_tiny(self) -> "Case":
        """The CPU smoke run's version: steps through TINY_STEPS, one repeat, then the declared overrides."""
        def small(steps):
            return tuple(TINY_STEPS.get(n, n) for n in steps)

        tiny = dataclasses.replace(self, steps=small(self.steps), repeats=1, optional_steps=small(self.optional_steps),
                                   plan=tuple((loss, ckpt, small(ns)) for loss, ckpt, ns in self.plan))
        return dataclasses.replace(tiny, **dict(self.tiny))


def _real_size(family: str, title: str, generation: dict, losses: dict, sampling: dict) -> tuple[Case, ...]:
    return (
        Case(f"{family}_generation", f"{title} random init: bare forwards vs CFG+PAG target generation",
             "realsize", family, "generation", **generation),
        Case(f"{family}_losses", f"{title} random init: MSD vs full-gradient training step vs N (time, peak memory)",
             "realsize", family, "losses", **losses),
        Case(f"{family}_sampling", f"{title} random init: refined unguided vs CFG sampling, N=25",
             "realsize", family, "sampling", steps=(25,), **sampling),
    )


CASES: tuple[Case, ...] = (
    Case("gpu_tests", "pytest -m gpu tests/test_gpu.py", "pytest", needs="cuda", cap_s=120, tiny=(("cap_s", 60),)),
    # batch/steps: DeepSpeed training; the rest of the digits sizes are in bench/gpu/digits.py
    Case("digits_deepspeed", "digits default end to end: teacher, cache, 1-rank DeepSpeed (bf16 on CUDA), kill + resume",
         "digits", "digits", batch=32, steps=(24,), cap_s=130, tiny=(("batch", 8), ("steps", (6,)), ("cap_s", 150))),
    # Full gradient without checkpointing also at N = 2 and 5: it may run out of memory well below N = 10
    # (then larger N are not tried), and the small N bracket where it does.
    *_real_size("sd21", "SD 2.1",
                generation=dict(batch=4, steps=(10,), repeats=2),
                losses=dict(batch=4, plan=(("msd", False, (10, 25, 50)), ("full_gradient", False, (2, 5, 10, 25, 50)),
                                           ("full_gradient", True, (10, 25, 50)))),
                sampling=dict(batch=4, repeats=2)),
    *_real_size("sdxl", "SDXL",
                generation=dict(batch=2, steps=(10,)),
                losses=dict(batch=1, plan=(("msd", False, (10, 25, 50)), ("full_gradient", False, (2, 5, 10, 25)),
                                           ("full_gradient", True, (10, 25, 50))), optional_steps=(50,)),
                sampling=dict(batch=2)),
)
# The speed levers on/off (bench/gpu/levers.py): last, so the default budget may skip it (compiling SD 2.1
# takes minutes): `bench/gpu_check.py --cases sd21_levers --budget-s 560`. --tiny leaves compile out (inductor
# on the CPU takes minutes even for the tiny UNet: tests/test_performance.py compiles a tinier one).
_LEVERS = ("compile", "compile_cuda_graphs", "channels_last", "sdpa_math", "sdpa_flash", "sdpa_efficient", "sdpa_cudnn",
           "autocast_bf16", "refiner_micro_batch")
CASES += (
    Case("sd21_levers", "SD 2.1 random init: each speed lever (performance.*) on vs off", "realsize", "sd21", "levers",
         batch=4, steps=(10,), repeats=2, levers=_LEVERS,
         tiny=(("levers", tuple(name for name in _LEVERS if "compile" not in name)),)),
)
BY_NAME = {case.name: case for case in CASES}
MEASURE_ORDER = ("generation", "sampling", "losses", "levers")  # inside one family's process


def select(spec: str) -> list[Case]:
    """Cases named in a comma list of names or prefixes (``digits,sd21``), in declaration order; all if empty."""
    if not spec:
        return list(CASES)
    chosen: set[str] = set()
    for item in (part.strip() for part in spec.split(",")):
        matches = [case.name for case in CASES if case.name.startswith(item)]
        if not item or not matches:
            raise ValueError(f"--cases: {item!r} matches none of {[case.name for case in CASES]}")
        chosen.update(matches)
    return [case for case in CASES if case.name in chosen]


def resolve(names: list[str], tiny: bool) -> list[Case]:
    """The declared cases called ``names`` (tiny versions with ``tiny``); ValueError names an unknown one."""
    unknown = [name for name in names if name not in BY_NAME]
    if unknown:
        raise ValueError(f"unknown case(s) {unknown}; declared: {list(BY_NAME)}")
    return [BY_NAME[name].for_tiny() if tiny else BY_NAME[name] for name in names]

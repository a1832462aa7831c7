"""The chaos bench's fault schedule (``bench/chaos_schedule.py``) is a function of its seed: the same seed draws
the same faults, other seeds draw others, and every schedule can be carried out (the faults of the cache job
come before its stall, the stall leaves job B shards to write, the rank kill is inside the run)."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

_spec = importlib.util.spec_from_file_location("chaos_schedule",
                                               Path(__file__).resolve().parents[1] / "bench" / "chaos_schedule.py")
chaos_schedule = importlib.util.module_from_spec(_spec)
sys.modules["chaos_schedule"] = chaos_schedule  # dataclasses look their module up while the class is made
_spec.loader.exec_module(chaos_schedule)
draw_schedule = chaos_schedule.draw_schedule


def test_the_same_seed_draws_the_same_schedule_and_other_seeds_others():
    assert draw_schedule(7) == draw_schedule(7)
    assert draw_schedule(7).lines() == draw_schedule(7).lines()
    schedules = {tuple(draw_schedule(seed).lines()) for seed in range(20)}
    assert len(schedules) == 20


def test_every_schedule_can_be_carried_out():
    seen = set()
    for seed in range(200):
        schedule = draw_schedule(seed)
        *before, stall = schedule.cache
        assert [f.kind for f in before].count("kill_worker") == 2 and [f.kind for f in before].count("restart_s3") == 1
        assert stall.kind == "stall_job" and stall.after_puts <= chaos_schedule.NUM_SHARDS - 4
        assert all(1 <= f.after_puts < stall.after_puts for f in before)
        assert [(f.after_puts, f.delay_s) for f in before] == sorted((f.after_puts, f.delay_s) for f in before)
        assert 2 <= schedule.rank.step <= chaos_schedule.MAX_STEPS and schedule.rank.rank in (0, 1)
        seen.add((stall.scope, stall.resume, schedule.rank.resume_world))
    assert len(seen) == 8  # every stall scope, resume moment and resume rank count is drawn by some seed

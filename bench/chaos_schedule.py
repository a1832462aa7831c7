"""The chaos bench's fault schedule (``bench/chaos.py``): everything random about a chaos run comes from
``random.Random(seed)`` in :func:`draw_schedule`, so a seed names one run. The moments are triggers ("after job
A's k-th shard PUT, wait d seconds"), so a seed means the same faults on a faster or slower machine.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field

NUM_SHARDS = 12  # of 8 samples: 12 shard PUTs by the job, enough moments for every fault
LEASE_TTL_S = 6.0  # the jobs' pipeline.lock_ttl_s: a stall of a few seconds outlives it
MAX_STEPS = 6  # tests/faults/test_elastic.py's settings: 6 steps, a checkpoint every 3


@dataclass(frozen=True)
class CacheFault:
    """``kind`` fires ``delay_s`` after job A's ``after_puts``-th shard PUT."""

    kind: str  # "kill_worker" | "restart_s3" | "stall_job"
    after_puts: int
    delay_s: float
    pick: float = 0.0  # kill_worker: which of the live Ray workers (sorted by pid), as a fraction
    down_s: float = 0.0  # restart_s3: how long the server is down
    scope: str = ""  # stall_job: "driver" (its Ray workers go on) or "node" (driver and every Ray process)
    resume: str = ""  # stall_job: SIGCONT while job B runs ("b_running") or after it ended ("b_done")

    def describe(self) -> str:
        what = {"kill_worker": f"SIGKILL Ray worker #{self.pick:.2f}", "restart_s3": f"S3 down {self.down_s:.1f} s",
                "stall_job": f"SIGSTOP job A ({self.scope}) past its lease, job B takes over, SIGCONT "
                             f"{'while B runs' if self.resume == 'b_running' else 'after B ended'}"}[self.kind]
        return f"{what}, {self.delay_s:.2f} s after shard PUT {self.after_puts}"


@dataclass(frozen=True)
class RankFault:
    """SIGKILL to ``rank`` when training step ``step`` starts; the same command resumes on ``resume_world`` ranks."""

    rank: int
    step: int
    resume_world: int

    def describe(self) -> str:
        return f"SIGKILL rank {self.rank} of 2 at step {self.step}, resume on {self.resume_world} rank(s)"


@dataclass(frozen=True)
class Schedule:
    seed: int
    cache: list[CacheFault] = field(default_factory=list)  # in firing order; the stall is last
    rank: RankFault | None = None

    def lines(self) -> list[str]:
        return ([f"  cache job: {fault.describe()}" for fault in self.cache]
                + [f"  training: {self.rank.describe()}"])


def draw_schedule(seed: int, num_kills: int = 2) -> Schedule:
    """The faults of one chaos run, from ``seed`` only: ``num_kills`` Ray worker kills and one S3 restart at
    shard PUTs before the stall, the stall after PUT 5..8 of :data:`NUM_SHARDS` (job B has shards left to write),
    and one rank kill at step 2..6 (with no checkpoint before step 3, the resume starts over)."""
    rng = random.Random(seed)
    stall_after = rng.randint(5, 8)
    faults = [CacheFault("kill_worker", rng.randint(1, stall_after - 1), round(rng.uniform(0, 1.0), 2),
                         pick=round(rng.random(), 2)) for _ in range(num_kills)]
    faults.append(CacheFault("restart_s3", rng.randint(1, stall_after - 1), round(rng.uniform(0, 1.0), 2),
                             down_s=round(rng.uniform(0.5, 2.0), 1)))
    faults.sort(key=lambda f: (f.after_puts, f.delay_s))
    faults.append(CacheFault("stall_job", stall_after, round(rng.uniform(0, 0.8), 2),
                             scope=rng.choice(["driver", "node"]), resume=rng.choice(["b_running", "b_done"])))
    rank = RankFault(rank=rng.randint(0, 1), step=rng.randint(2, MAX_STEPS), resume_world=rng.choice([1, 2]))
    return Schedule(seed, faults, rank)

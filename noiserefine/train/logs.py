"""The trainer's logs: ``train_log.csv`` rows, per-rank sample-id logs, and the window between rows.

On resume every log is cut back to the checkpoint's step first, so a resumed run's
logs equal an uninterrupted run's.
"""

from __future__ import annotations

import csv
import json
import time
from pathlib import Path

from ..files import atomic_path, write_text_atomic

LOG_FIELDS = ("step", "loss", "grad_norm", "samples_per_s", "seconds", "corrupt_skipped")


class LogWindow:
    """Loss and sample sums of the steps since the last log row, and the wall-clock they took.

    Its state (with the seconds elapsed so far) goes into checkpoints, so the first row
    after a resume reports the same mean loss and throughput as an uninterrupted run.
    """

    def __init__(self) -> None:
        self.load_state_dict({})

    def add(self, loss: float, num_samples: int) -> None:
        self.loss += loss
        self.steps += 1
        self.samples += num_samples

    def seconds(self) -> float:
        return time.perf_counter() - self.started

    def reset(self) -> None:
        self.load_state_dict({})

    def state_dict(self) -> dict:
        return {"loss": self.loss, "steps": self.steps, "samples": self.samples, "seconds": self.seconds()}

    def load_state_dict(self, state: dict) -> None:
        self.loss = float(state.get("loss", 0.0))
        self.steps = int(state.get("steps", 0))
        self.samples = int(state.get("samples", 0))
        self.started = time.perf_counter() - float(state.get("seconds", 0.0))


def trim_jsonl(path: Path, last_step: int) -> None:
    """Keep the lines of steps <= ``last_step`` (a torn last line is dropped)."""
    if not path.exists():
        return
    kept = []
    for line in path.read_text().splitlines():
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            continue
        if int(record["step"]) <= last_step:
            kept.append(line)
    write_text_atomic(path, "".join(f"{line}\n" for line in kept))


def trim_csv(path: Path, last_step: int) -> None:
    """Keep the header and the complete rows of steps <= ``last_step`` (a torn last row is dropped)."""
    if not path.exists():
        return
    with open(path, newline="") as handle:
        reader = csv.DictReader(handle)
        fields = list(reader.fieldnames or [])
        rows = []
        for row in reader:
            try:
                if int(row["step"]) <= last_step and all(row.get(f) is not None for f in fields):
                    rows.append(row)
            except (TypeError, ValueError):
                continue
    with atomic_path(path) as tmp, open(tmp, "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=fields)
        writer.writeheader()
        writer.writerows(rows)

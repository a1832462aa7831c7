"""Unit tests of the trainer's logs and resume checks (no processes started)."""

from __future__ import annotations

import csv
import json
from pathlib import Path

from noiserefine.train.checkpoint import resume_mismatch
from noiserefine.files import append_csv
from noiserefine.train.logs import LOG_FIELDS, LogWindow, trim_csv, trim_jsonl


def read_log(path: Path) -> list[dict]:
    with open(path) as handle:
        return list(csv.DictReader(handle))


def read_samples(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_resume_mismatch_lists_training_changes_only():
    base = {"model": {"path": "m"}, "teacher": {}, "student": {"num_steps": 3}, "refiner": {"lora_rank": 4},
            "data": {"cache_root": "a"}, "train": {"max_steps": 10, "learning_rate": 0.01, "log_every": 1}}
    changed = json.loads(json.dumps(base))
    changed["train"].update(max_steps=20, log_every=5)
    changed["data"]["cache_root"] = "b"
    assert resume_mismatch(base, changed) == []
    changed["train"]["learning_rate"] = 0.02
    changed["refiner"]["lora_rank"] = 8
    assert resume_mismatch(base, changed) == ["refiner.lora_rank", "train.learning_rate"]


def test_log_trimming_keeps_steps_up_to_checkpoint(tmp_path):
    samples = tmp_path / "samples_rank0.jsonl"
    samples.write_text("".join(json.dumps({"step": s, "sample_ids": [s]}) + "\n" for s in range(1, 6))
                       + '{"step": 6, "sampl')  # torn last line
    trim_jsonl(samples, 3)
    assert [r["step"] for r in read_samples(samples)] == [1, 2, 3]
    log = tmp_path / "train_log.csv"
    for step in (2, 4, 6):
        append_csv(log, LOG_FIELDS, {f: step for f in LOG_FIELDS})
    with open(log, "a") as handle:
        handle.write("8,0.1")  # torn last row
    trim_csv(log, 8)
    assert [int(r["step"]) for r in read_log(log)] == [2, 4, 6]
    trim_csv(log, 4)
    assert [int(r["step"]) for r in read_log(log)] == [2, 4]
    assert log.read_text().splitlines()[0] == ",".join(LOG_FIELDS)
    trim_csv(tmp_path / "new.csv", 0)
    assert not (tmp_path / "new.csv").exists()


def test_log_window_state_round_trips_with_its_elapsed_time():
    window = LogWindow()
    window.add(0.5, 8)
    window.add(0.25, 8)
    state = window.state_dict()
    state["seconds"] = 12.5  # as if 12.5 s had passed before the checkpoint
    resumed = LogWindow()
    resumed.load_state_dict(state)
    assert (resumed.loss, resumed.steps, resumed.samples) == (0.75, 2, 16)
    assert 12.5 <= resumed.seconds() < 13.5
    resumed.reset()
    assert (resumed.loss, resumed.steps, resumed.samples) == (0.0, 0, 0) and resumed.seconds() < 1.0

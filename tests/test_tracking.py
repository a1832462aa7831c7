"""Experiment tracking (``train.report_to``): TensorBoard event files and W&B offline runs, read back with the
trackers' own readers, across a SIGKILL + resume of the real trainer."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest

from helpers_cache import tiny_cache, tiny_root, tiny_teacher  # noqa: F401
from noiserefine.config import load_config
from noiserefine.train import tracking
from test_trainer import finish, run, start, train_args

SETTINGS = ["train.max_steps=10", "train.checkpoint_every=3", "train.log_every=1", "train.eval_every=3",
            "eval.metrics=none", "train.learning_rate=0.01", "train.report_to=[tensorboard,wandb]"]
KILL_AT = 8  # SIGKILL when step 8 starts: steps 1..7 logged, checkpoint 6 is the newest
TRAIN_TAGS = ("train/loss", "train/learning_rate", "train/grad_norm", "train/samples_per_s", "train/step_seconds",
              "train/peak_rss_mb")


def wandb_env(tmp: Path) -> dict:
    """W&B offline, every folder of its own under ``tmp`` (nothing in the home directory, no network)."""
    return {"WANDB_MODE": "offline", "WANDB_SILENT": "true", "WANDB_DIR": str(tmp / "wandb-dir"),
            "WANDB_CONFIG_DIR": str(tmp / "wandb-config"), "WANDB_CACHE_DIR": str(tmp / "wandb-cache"),
            "WANDB_DATA_DIR": str(tmp / "wandb-data"), "WANDB_PROJECT": "noiserefine-test"}


def accumulator(log_dir: Path, purge: bool = True):
    """TensorBoard's own reader of a log directory (``purge``: honour the resumed writer's purge_step)."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(log_dir), size_guidance={"scalars": 0, "images": 0, "tensors": 0},
                              purge_orphaned_data=purge)
    events.Reload()
    return events


def raw_steps(log_dir: Path, tag: str) -> list[int]:
    """The steps of ``tag`` in every event file as written (no purge applied): what the kill left behind."""
    from tensorboard.backend.event_processing.event_file_loader import EventFileLoader

    steps = []
    for path in sorted(log_dir.glob("events.out.tfevents.*")):
        for event in EventFileLoader(str(path)).Load():
            steps += [event.step for value in event.summary.value if value.tag == tag]
    return steps


def wandb_records(run_file: Path) -> list[dict]:
    """The records of a ``.wandb`` transaction log, through wandb's own reader (``wandb leet inspect --json``)."""
    result = subprocess.run([sys.executable, "-m", "wandb", "leet", "inspect", "--json", str(run_file)],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-3000:]
    return [json.loads(line) for line in result.stdout.splitlines() if line.startswith("{")]


def wandb_history(run_file: Path) -> list[dict]:
    return [r["history"]["item"] for r in wandb_records(run_file) if r["type"] == "history"]


# --- fast: configuration and the missing-package error -------------------------------------------------------

@pytest.mark.parametrize("value, message", [("mlflow", "names 'mlflow'"), ("[none,wandb]", "'none' goes alone"),
                                            ("[wandb,wandb]", "each tracker once"), ("3", "is 3")])
def test_report_to_refuses_unknown_trackers_naming_the_key(value, message):
    with pytest.raises(ValueError, match="train.report_to") as error:
        load_config(None, [f"train.report_to={value}"])
    assert message in str(error.value)


def test_report_to_accepts_one_name_or_a_list():
    assert tracking.require_installed(load_config(None, ["train.report_to=none"]).train.report_to) == []
    names = load_config(None, ["train.report_to=[tensorboard,wandb]"]).train.report_to
    assert tracking.require_installed(names) == ["tensorboard", "wandb"]


def test_tracker_not_installed_names_the_extra(monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "wandb" else real(name, *a))
    with pytest.raises(ModuleNotFoundError,
                       match=r"train.report_to=wandb needs the wandb package.*noiserefine\[track\]"):
        tracking.require_installed("wandb")


@pytest.mark.slow  # imports TensorBoard's writer and reader
def test_tensorboard_tracker_logs_eval_metrics_grids_and_config_and_purges_on_resume(tmp_path):
    import numpy as np
    from PIL import Image

    cfg = load_config(None, ["train.report_to=tensorboard", f"train.output_dir={tmp_path}"])
    grid = tmp_path / "eval_step2.png"
    Image.fromarray(np.full((6, 10), 200, dtype=np.uint8)).save(grid)  # a grayscale grid, as the digits' are
    rows = {"guided teacher": {"accuracy": 0.9, "nfe": 20}, "refined": {"accuracy": 0.7, "nfe": 12, "note": "x"}}
    first = tracking.open_trackers(cfg, tmp_path, 0, is_main=True)
    for step in (1, 2, 3):
        first.log_train(step, {"loss": 1.0 / step})
    first.log_eval(2, rows, grid)
    first.close()
    resumed = tracking.open_trackers(cfg, tmp_path, 2, is_main=True)  # a checkpoint at 2: step 3 is redone
    resumed.log_train(3, {"loss": 0.25})
    resumed.close()
    events = accumulator(tmp_path / tracking.TENSORBOARD_DIR)
    assert [(e.step, e.value) for e in events.Scalars("train/loss")] == [(1, 1.0), (2, 0.5), (3, 0.25)]
    assert [(e.step, e.value) for e in events.Scalars("eval/guided_teacher/accuracy")] == [(2, pytest.approx(0.9))]
    assert [e.step for e in events.Scalars("eval/refined/nfe")] == [2]
    assert "eval/refined/note" not in events.Tags()["scalars"]
    assert [(e.step, e.width, e.height) for e in events.Images("eval/grid")] == [(2, 10, 6)]
    assert [e.step for e in events.Tensors("config/text_summary")] == [0]
    assert tracking.open_trackers(cfg, tmp_path, 0, is_main=False).trackers == []  # ranks other than 0


# --- the trainer: an uninterrupted run and one killed (SIGKILL) then resumed -----------------------------------

@pytest.fixture(scope="module")
def tracked(tiny_root, tiny_teacher, tiny_cache, tmp_path_factory) -> dict:  # noqa: F811
    base = tmp_path_factory.mktemp("tracked")
    env = wandb_env(base)
    full, killed = base / "full", base / "killed"
    procs = [start([sys.executable] + train_args(tiny_root, tiny_teacher, full, *SETTINGS), base / "full.log", **env),
             start([sys.executable] + train_args(tiny_root, tiny_teacher, killed, *SETTINGS), base / "killed.log",
                   NOISEREFINE_TRAIN_KILL_RANK=f"0:{KILL_AT}", **env)]
    (code_full, text_full), (code_killed, text_killed) = [finish(p, base / n) for p, n in
                                                          zip(procs, ("full.log", "killed.log"))]
    assert code_full == 0, text_full[-4000:]
    assert code_killed == -9, text_killed[-4000:]
    run_id = (killed / tracking.RUN_ID_FILE).read_text().strip()
    code, text = run([sys.executable] + train_args(tiny_root, tiny_teacher, killed, *SETTINGS), base / "resume.log",
                     **env)
    assert code == 0, text[-4000:]
    assert "resuming from" in text and "step00000006" in text, text[-4000:]
    return {"full": full, "killed": killed, "run_id_before_resume": run_id}


@pytest.mark.slow
def test_tensorboard_has_each_step_once_after_sigkill_and_resume(tracked):
    full, resumed = accumulator(tracked["full"] / "tensorboard"), accumulator(tracked["killed"] / "tensorboard")
    for tag in TRAIN_TAGS:
        assert [e.step for e in resumed.Scalars(tag)] == list(range(1, 11)), tag
    assert [e.value for e in resumed.Scalars("train/loss")] == [e.value for e in full.Scalars("train/loss")]
    assert [e.value for e in resumed.Scalars("train/learning_rate")] == pytest.approx([0.01] * 10)
    # the killed attempt did log step 7 (after checkpoint 6): the purge, not luck, keeps one of it
    assert raw_steps(tracked["killed"] / "tensorboard", "train/loss").count(7) == 2
    unpurged = [e.step for e in accumulator(tracked["killed"] / "tensorboard", purge=False).Scalars("train/loss")]
    assert unpurged.count(7) == 2
    grids = resumed.Images("eval/grid")
    assert [e.step for e in grids] == [3, 6, 9] and all(e.width > 0 and e.height > 0 for e in grids)
    config = resumed.Tensors("config/text_summary")
    assert [e.step for e in config] == [0]
    assert "report_to" in config[0].tensor_proto.string_val[0].decode()


@pytest.mark.slow
def test_wandb_offline_run_is_resumed_under_its_stored_id(tracked):
    killed = tracked["killed"]
    run_id = (killed / tracking.RUN_ID_FILE).read_text().strip()
    assert run_id == tracked["run_id_before_resume"]
    files = sorted(killed.glob("wandb/offline-run-*/run-*.wandb"))
    assert len(files) == 2 and all(f.name == f"run-{run_id}.wandb" for f in files)
    first, second = (wandb_records(f) for f in files)
    # the killed attempt's file holds what wandb's service had flushed before the kill (every 15 s): on a fast
    # machine possibly not even its run record, so its records are checked only as far as they go
    runs = [next((r["run"] for r in records if r["type"] == "run"), None) for records in (first, second)]
    assert runs[1] is not None and runs[1]["run_id"] == run_id and runs[1].get("resume")
    assert runs[0] is None or (runs[0]["run_id"] == run_id and runs[0].get("resume"))
    assert runs[1]["config"]["update"]["train"]["report_to"] == ["tensorboard", "wandb"]
    # the killed attempt: what wandb's service had flushed to the file (every 15 s) before the kill, in order
    before = [h["_step"] for h in wandb_history(files[0])]
    after = wandb_history(files[1])
    assert before == list(range(1, len(before) + 1)) and len(before) < KILL_AT
    assert [h["_step"] for h in after] == list(range(7, 11))
    # W&B keeps the first value of a step: the resumed attempt's steps 7.. re-log the same numbers
    full = {h["_step"]: h for h in wandb_history(next(tracked["full"].glob("wandb/offline-run-*/run-*.wandb")))}
    assert all(h["train/loss"] == full[h["_step"]]["train/loss"] for h in after)
    assert [h["_step"] for h in after if h.get("eval/grid._type") == "image-file"] == [9]
    assert all(set(TRAIN_TAGS) <= set(h) for h in after)

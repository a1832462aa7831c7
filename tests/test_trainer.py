"""The DeepSpeed trainer end to end on the tiny cache: 2 ranks under the launcher, kill + resume.

Every run is a subprocess (``OMP_NUM_THREADS=1``, ``DS_ACCELERATOR=cpu``) of the real
entry point ``trainer/train.py``; the checkpoints are DeepSpeed's own.
"""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from helpers_cache import REPO, tiny_cache, tiny_overrides, tiny_root, tiny_teacher  # noqa: F401
from noiserefine.config import load_config
from noiserefine.train.distributed import free_port

TIMEOUT = 600
pytestmark = pytest.mark.slow  # subprocesses, Ray, DeepSpeed or teacher training: `make test` only
HOOKS = REPO / "tests" / "hooks"  # sitecustomize.py: test-only fault injection in child processes
EXIT_AFTER_STEP_ENV = "NOISEREFINE_TRAIN_EXIT_AFTER_STEP"


def child_env(**extra: str) -> dict:
    env = {k: v for k, v in os.environ.items()
           if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT", "LOCAL_SIZE",
                        EXIT_AFTER_STEP_ENV)}
    if any(k.startswith("NOISEREFINE_") and k != "NOISEREFINE_TEST_TEACHER" for k in extra):
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(HOOKS), env.get("PYTHONPATH")]))
    return {**env, "OMP_NUM_THREADS": "1", "DS_ACCELERATOR": "cpu", "PYTHONUNBUFFERED": "1", **extra}


def train_args(root: Path, teacher: Path, output_dir: Path, *extra: str) -> list[str]:
    return ["trainer/train.py", "--config", "configs/digits.yaml", *tiny_overrides(root, teacher),
            f"train.output_dir={output_dir}", *extra]


def start(command: list[str], log: Path, **env: str) -> subprocess.Popen:
    handle = open(log, "w")
    return subprocess.Popen(command, cwd=REPO, env=child_env(**env), stdout=handle, stderr=subprocess.STDOUT,
                            text=True)


def finish(proc: subprocess.Popen, log: Path) -> tuple[int, str]:
    code = proc.wait(timeout=TIMEOUT)
    return code, log.read_text()


def run(command: list[str], log: Path, **env: str) -> tuple[int, str]:
    return finish(start(command, log, **env), log)


def deepspeed_launcher() -> list[str]:
    script = Path(sys.executable).parent / "deepspeed"
    return [str(script)] if script.is_file() else [sys.executable, "-m", "deepspeed.launcher.runner"]


def read_log(path: Path) -> list[dict]:
    with open(path) as handle:
        return list(csv.DictReader(handle))


def read_samples(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_two_rank_deepspeed_run(tiny_root, tiny_teacher, tiny_cache, tmp_path):
    """The deepspeed launcher, 2 CPU ranks (gloo): finishes, loss drops, ranks see disjoint samples."""
    out = tmp_path / "run"
    steps = 32
    command = deepspeed_launcher() + ["--num_gpus", "2", "--master_port", str(free_port())] + train_args(
        tiny_root, tiny_teacher, out, f"train.max_steps={steps}", "train.global_batch_size=16", "train.log_every=1",
        "train.checkpoint_every=16",
        "train.eval_every=16", "train.learning_rate=0.01", "train.num_loader_workers=1")
    code, text = run(command, tmp_path / "launcher.log")
    assert code == 0, text[-4000:]

    done = json.loads((out / "done.json").read_text())
    assert done["world_size"] == 2 and done["max_steps"] == steps and done["corrupt_skipped"] == 0
    assert (out / "refiner" / "refiner.safetensors").is_file() and (out / "config.yaml").is_file()
    assert load_config(out / "config.yaml").train.max_steps == steps

    log = read_log(out / "train_log.csv")
    assert [int(r["step"]) for r in log] == list(range(1, steps + 1))
    losses = [float(r["loss"]) for r in log]
    first, last = sum(losses[:6]) / 6, sum(losses[-6:]) / 6
    assert last < 0.7 * first, (first, last, losses)
    assert all(float(r["grad_norm"]) > 0 for r in log)

    ranks = [read_samples(out / f"samples_rank{r}.jsonl") for r in range(2)]
    assert [[s["step"] for s in rank] for rank in ranks] == [list(range(1, steps + 1))] * 2
    all_ids = set(range(64))
    epochs = {s["epoch"] for s in ranks[0]} & {s["epoch"] for s in ranks[1]}
    complete = [e for e in sorted(epochs) if all(
        sum(len(s["sample_ids"]) for s in rank if s["epoch"] == e) == 32 for rank in ranks)]
    assert len(complete) >= 7
    for epoch in complete:
        ids = [[i for s in rank if s["epoch"] == epoch for i in s["sample_ids"]] for rank in ranks]
        assert set(ids[0]).isdisjoint(ids[1]), epoch
        assert sorted(ids[0] + ids[1]) == sorted(all_ids), epoch

    # periodic evaluation on rank 0: grid PNGs and metric rows (guided teacher, unguided, refined)
    assert (out / "eval_step16.png").is_file() and (out / "eval_step32.png").is_file()
    rows = read_log(out / "eval_log.csv")
    assert [r["row"] for r in rows] == ["guided teacher", "unguided", "refined"] * 2
    assert all(0.0 <= float(r["accuracy"]) <= 1.0 and float(r["fid"]) >= 0 for r in rows)
    assert sorted(p.name for p in (out / "checkpoints").iterdir() if p.is_dir()) == ["step00000016",
                                                                                   "step00000032"]
    # a refiner snapshot per checkpoint; the last one is the exported refiner
    assert sorted(p.name for p in (out / "snapshots").iterdir()) == ["step00000016", "step00000032"]
    final = load_file(str(out / "refiner" / "refiner.safetensors"))
    last = load_file(str(out / "snapshots" / "step00000032" / "refiner.safetensors"))
    first = load_file(str(out / "snapshots" / "step00000016" / "refiner.safetensors"))
    assert all(torch.equal(final[k], last[k]) for k in final)
    assert not all(torch.equal(final[k], first[k]) for k in final)


def test_kill_and_resume_matches_uninterrupted(tiny_root, tiny_teacher, tiny_cache, tmp_path):
    """Killed after step 7 (checkpoint at 6), re-run: same weights and per-step samples as an uninterrupted run.

    Also: a run with max_steps=6 ends with exactly the uninterrupted run's step-6 snapshot
    (nothing depends on max_steps), which is what lets the demo's MSD ablation reuse the
    main run's snapshot instead of training it again.
    """
    settings = ["train.max_steps=10", "train.checkpoint_every=3", "train.log_every=2", "train.eval_every=0",
                "train.learning_rate=0.01", "train.num_loader_workers=2"]
    python = [sys.executable]
    full, killed, short = tmp_path / "uninterrupted", tmp_path / "killed", tmp_path / "short"
    short_settings = [s for s in settings if not s.startswith("train.max_steps")] + ["train.max_steps=6"]
    procs = [start(python + train_args(tiny_root, tiny_teacher, full, *settings), tmp_path / "full.log"),
             start(python + train_args(tiny_root, tiny_teacher, killed, *settings), tmp_path / "killed1.log",
                   **{EXIT_AFTER_STEP_ENV: "7"}),
             start(python + train_args(tiny_root, tiny_teacher, short, *short_settings), tmp_path / "short.log")]
    (code_full, text_full), (code_killed, text_killed), (code_short, text_short) = [
        finish(p, tmp_path / n) for p, n in zip(procs, ("full.log", "killed1.log", "short.log"))]
    assert code_full == 0, text_full[-4000:]
    assert code_killed == 17, text_killed[-4000:]
    assert code_short == 0, text_short[-4000:]
    assert sorted(p.name for p in (full / "snapshots").iterdir()) == [
        "step00000003", "step00000006", "step00000009", "step00000010"]
    stopped = load_file(str(short / "refiner" / "refiner.safetensors"))
    snapshot = load_file(str(full / "snapshots" / "step00000006" / "refiner.safetensors"))
    assert stopped.keys() == snapshot.keys() and all(torch.equal(stopped[k], snapshot[k]) for k in stopped)
    assert len(read_samples(killed / "samples_rank0.jsonl")) == 7  # step 7 ran after the step-6 checkpoint
    assert not (killed / "refiner").exists() and not (killed / "done.json").exists()

    code, text = run(python + train_args(tiny_root, tiny_teacher, killed, *settings), tmp_path / "killed2.log")
    assert code == 0, text[-4000:]
    assert "resuming from" in text and "step00000006" in text

    a = load_file(str(full / "refiner" / "refiner.safetensors"))
    b = load_file(str(killed / "refiner" / "refiner.safetensors"))
    assert a.keys() == b.keys()
    for key in a:
        torch.testing.assert_close(b[key], a[key])
    assert any(v.abs().sum() > 0 for k, v in a.items() if "lora_B" in k)  # it did train
    assert read_samples(killed / "samples_rank0.jsonl") == read_samples(full / "samples_rank0.jsonl")
    key = ("step", "loss", "grad_norm", "corrupt_skipped")
    assert [[r[k] for k in key] for r in read_log(killed / "train_log.csv")] == \
        [[r[k] for k in key] for r in read_log(full / "train_log.csv")]

    # the same command again: finished, nothing retrained
    before = (killed / "refiner" / "refiner.safetensors").stat().st_mtime_ns
    code, text = run(python + train_args(tiny_root, tiny_teacher, killed, *settings), tmp_path / "again.log")
    assert code == 0, text[-4000:]
    assert "nothing to do" in text
    assert (killed / "refiner" / "refiner.safetensors").stat().st_mtime_ns == before
    # ... but not for another config in the same directory
    changed = [s for s in settings if not s.startswith("train.learning_rate")] + ["train.learning_rate=0.02"]
    code, text = run(python + train_args(tiny_root, tiny_teacher, killed, *changed), tmp_path / "changed.log")
    assert code == 1 and "differs in: train.learning_rate" in text, text[-4000:]


def test_missing_cache_fails_with_hint(tiny_root, tiny_teacher, tmp_path):
    code, text = run([sys.executable] + train_args(tiny_root, tiny_teacher, tmp_path / "run",
                                                   f"data.cache_dir={tmp_path / 'nowhere'}"),
                     tmp_path / "missing.log")
    assert code == 1
    assert "nowhere" in text and "generate_targets.py" in text


def test_cpu_process_group_is_gloo_without_building_the_shm_op():
    """On CPU, DeepSpeed's inference-only shared-memory op is not JIT-built (g++, ~80 s per new machine)."""
    code = ("from noiserefine.train import distributed; info = distributed.init(); "
            "import deepspeed.comm.comm as comm; print(info.backend, comm.cdb.shm_comm_op); distributed.shutdown()")
    result = subprocess.run([sys.executable, "-c", code], cwd=REPO, env=child_env(), capture_output=True,
                            text=True, timeout=TIMEOUT)
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.split()[-2:] == ["gloo", "None"], result.stdout[-2000:]


def test_resume_refuses_foreign_pickles_and_tags_outside_the_checkpoint_dir(tmp_path):
    """DeepSpeed unpickles with weights_only=False: a checkpoint must pass weights_only=True first.

    In a subprocess: importing DeepSpeed sets the rank variables of the process it runs in.
    """
    code = """
import sys
from pathlib import Path
import torch
from noiserefine.train.checkpoint_files import latest_tag
from noiserefine.train.distributed import read_client_state

class NotAllowlisted:  # weights_only does not know it: a stand-in for any code a pickle could run
    pass

ckpt = Path(sys.argv[1]) / "checkpoints"
(ckpt / "step00000001").mkdir(parents=True)
torch.save({"module": {}, "payload": NotAllowlisted()}, ckpt / "step00000001" / "mp_rank_00_model_states.pt")
(ckpt.parent / "outside").mkdir()
for tag in ("step00000001", "../outside", "step1", "step00000002"):
    (ckpt / "latest").write_text(tag)
    try:
        read_client_state(ckpt, latest_tag(ckpt))  # before any engine sees it
        print(tag, "LOADED")
    except ValueError as error:
        print(tag, "refused:", error)
"""
    result = subprocess.run([sys.executable, "-c", code, str(tmp_path)], cwd=REPO, env=child_env(),
                            capture_output=True, text=True, timeout=TIMEOUT)
    assert result.returncode == 0, result.stderr[-3000:]
    lines = [line for line in result.stdout.splitlines() if " refused: " in line or " LOADED" in line]
    assert len(lines) == 4, result.stdout[-3000:]
    assert "mp_rank_00_model_states.pt: refused" in lines[0]
    assert all("not a checkpoint directory" in line for line in lines[1:]), lines


def test_zero_stage_1_checkpoint_resumes(tiny_root, tiny_teacher, tiny_cache, tmp_path):
    """ZeRO optimizer states pickle a few DeepSpeed classes: they pass the weights_only check."""
    out = tmp_path / "zero1"
    settings = ["train.zero_stage=1", "train.checkpoint_every=1", "train.eval_every=0"]
    code, text = run([sys.executable] + train_args(tiny_root, tiny_teacher, out, *settings, "train.max_steps=2"),
                     tmp_path / "first.log")
    assert code == 0, text[-4000:]
    code, text = run([sys.executable] + train_args(tiny_root, tiny_teacher, out, *settings, "train.max_steps=3"),
                     tmp_path / "second.log")
    assert code == 0, text[-4000:]
    assert "resuming from" in text and "step00000002" in text

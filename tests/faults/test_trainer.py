"""Fault tests of stage 2 (the trainer): incomplete or changed caches, malformed targets, damaged
checkpoints, a killed rank, a kill during a checkpoint write, a finished run re-run with another config,
and evaluation writing outside its directories.

Trainer runs are subprocesses of ``trainer/train.py`` (one rank unless two are what is tested). The
trained runs share one module fixture: an uninterrupted reference run and a run killed (SIGKILL) in the
middle of writing its last checkpoint, both on a cache whose last shard is partial (56 samples:
16+16+16+8), ZeRO stage 1 (so checkpoints have a model-states and an optimizer-states file).
"""

from __future__ import annotations

import hashlib
import io
import json
import math
import re
import shutil
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from helpers_cache import SHARD_SIZE, TINY, copy_cache, tiny_config
from noiserefine.noise import fingerprint, noise_from_seed
from noiserefine.shards import ShardInfo, read_manifest, read_shard, sample_key, write_manifest, write_shard
from noiserefine.targets.cache import open_cache, record_shards
from noiserefine.targets.scan import scan_cache
from noiserefine.targets.plan import Plan
from noiserefine.train.checkpoint import finished_run
from noiserefine.train.distributed import free_port
from noiserefine.train.stream import TeacherStream
from test_trainer import REPO, child_env, deepspeed_launcher, finish, read_samples, run, start, train_args

pytestmark = pytest.mark.slow
PYTHON = [sys.executable]
LATENT = (1, 16, 16)  # the digits backend's latent shape
NUM_PARTIAL = 3 * SHARD_SIZE + SHARD_SIZE // 2  # 56: the last shard holds 8 of 16
REPAIR = "python pipeline/generate_targets.py --config <same config> pipeline.verify=true"
COMPLETE = "python pipeline/generate_targets.py --config <same config>"


def shard_names(cache: Path) -> list[str]:
    return sorted(read_manifest(cache))


def same_weights(a: Path, b: Path) -> bool:
    x, y = load_file(str(a / "refiner.safetensors")), load_file(str(b / "refiner.safetensors"))
    return x.keys() == y.keys() and all(torch.equal(x[k], y[k]) for k in x)


# --- 4. a partial cache ----------------------------------------------------------------------------------

def drop_shards(cache: Path, keep: set[int]) -> None:
    """The generator died: only the shards in ``keep`` are on disk and in the manifest."""
    manifest = read_manifest(cache)
    for index, name in enumerate(sorted(manifest)):
        if index not in keep:
            (cache / name).unlink()
            del manifest[name]
    write_manifest(cache, list(manifest.values()))


def test_partial_cache_is_refused_naming_the_missing_shards(tiny_root, tiny_teacher, tiny_cache, tmp_path):
    cache = copy_cache(tiny_cache, tmp_path / "cache")
    drop_shards(cache, {0, 1})
    for extra, total in (([], 64), (["data.num_samples=100000"], 100000)):
        cfg = tiny_config(tiny_root, tiny_teacher, [f"data.cache_dir={cache}", *extra])
        with pytest.raises(ValueError) as caught:
            open_cache(cfg)
        message = str(caught.value)
        assert str(cache) in message and "shard-000002.tar" in message and "shard-000003.tar" in message
        assert f"32 of the plan's {total} samples" in message and COMPLETE in message, message
        assert "data.allow_partial_cache=true" in message, message
    # a shard recorded with fewer samples than the plan asks is missing samples too
    row = read_manifest(cache)["shard-000001.tar"]
    record_shards(cache, [ShardInfo(row.name, 5, row.num_bytes, row.sha256)])
    with pytest.raises(ValueError, match=r"shard-000001\.tar \(5 of 16 samples\)"):
        open_cache(tiny_config(tiny_root, tiny_teacher, [f"data.cache_dir={cache}"]))


def test_partial_cache_opt_in_trains_on_what_exists_with_a_warning(tiny_root, tiny_teacher, tiny_cache, tmp_path,
                                                                    capsys):
    cache = copy_cache(tiny_cache, tmp_path / "cache")
    drop_shards(cache, {0, 1})
    cfg = tiny_config(tiny_root, tiny_teacher, [f"data.cache_dir={cache}", "data.allow_partial_cache=true"])
    cache_dir, rows = open_cache(cfg)
    assert cache_dir == cache and sorted(rows) == ["shard-000000.tar", "shard-000001.tar"]
    err = capsys.readouterr().err
    assert "WARNING" in err and "PARTIAL" in err and "shard-000002.tar" in err and "32 of the plan's 64" in err
    # a shard index recorded twice (a grown partial shard under a new name): one row per index, the larger
    grown = "shard-000001-n16.tar"
    shutil.copy(cache / "shard-000001.tar", cache / grown)
    row = read_manifest(cache)["shard-000001.tar"]
    record_shards(cache, [ShardInfo(row.name, 9, row.num_bytes, row.sha256),
                          ShardInfo(grown, row.num_samples, row.num_bytes, row.sha256)])
    _, rows = open_cache(cfg)
    assert sorted(rows) == ["shard-000000.tar", grown]


# --- 7. a same-size bit flip: the hint names the command that repairs it -------------------------------

def test_bit_flip_hint_names_the_command_that_repairs_it(tiny_root, tiny_teacher, tiny_cache, tmp_path):
    cache = copy_cache(tiny_cache, tmp_path / "cache")
    name = "shard-000001.tar"
    data = bytearray((cache / name).read_bytes())
    data[len(data) // 2] ^= 0x01
    (cache / name).write_bytes(bytes(data))
    cfg = tiny_config(tiny_root, tiny_teacher, [f"data.cache_dir={cache}"])
    stream = TeacherStream.from_config(cfg, latent_shape=LATENT)
    with pytest.raises(ValueError) as caught:
        list(stream.epoch_batches(0))
    message = str(caught.value)
    assert name in message and "sha256" in message and REPAIR in message, message
    # what the hint says is true: a plain scan sees 4/4 complete, a verifying scan rebuilds the shard
    plan = Plan.from_config(cfg.data)
    assert scan_cache(cache, plan).missing == []
    assert scan_cache(cache, plan, verify=True).missing == [1]


# --- 10. targets of the wrong shape or dtype, bad sample metadata --------------------------------------

KEY = "digits-faults"


def crafted_sample(index: int, *, target=None, noise_shape=LATENT, meta: dict | None = None) -> list[tuple[str, bytes]]:
    """Sample ``index`` (key, id and seed 1000+index), honest unless ``target``/``meta`` say otherwise."""
    seed = 1000 + index
    if target is None:
        target = np.zeros(LATENT, np.float16)
    meta = {"sample_id": index, "seed": seed, "prompt": "a handwritten one", "source": "digits",
            "teacher_key": KEY, "noise_fingerprint": fingerprint(noise_from_seed(seed, noise_shape)), **(meta or {})}
    buffer = io.BytesIO()
    np.save(buffer, target, allow_pickle=False)
    key = sample_key(index)
    return [(f"{key}.json", json.dumps(meta, sort_keys=True).encode()), (f"{key}.target.npy", buffer.getvalue())]


def crafted_stream(directory: Path, samples: list[list[tuple[str, bytes]]], *, skip_corrupt=False) -> TeacherStream:
    """A one-shard cache whose manifest row matches the crafted bytes (only the content checks can refuse)."""
    directory.mkdir()
    path = directory / "shard-000000.tar"
    with tarfile.open(path, "w", format=tarfile.USTAR_FORMAT) as tar:
        for members in samples:
            for member, payload in members:
                info = tarfile.TarInfo(member)
                info.size, info.mode = len(payload), 0o444
                tar.addfile(info, io.BytesIO(payload))
    data = path.read_bytes()
    info = ShardInfo(path.name, len(samples), len(data), hashlib.sha256(data).hexdigest())
    return TeacherStream(directory, {path.name: info}, teacher_key=KEY, seed=0, rank=0, world_size=1,
                         global_batch_size=len(samples),
                         skip_corrupt=skip_corrupt, latent_shape=LATENT)


BAD_TARGETS = {
    # 32x32 targets for a 16x16 backend, the fingerprint made from 32x32 noise (so it matches)
    "wrong shape": (dict(target=np.zeros((1, 32, 32), np.float16), noise_shape=(1, 32, 32)), r"shape \(1, 32, 32\)"),
    "mixed shape": (dict(target=np.zeros((1, 8, 8), np.float32), noise_shape=(1, 8, 8)), r"shape \(1, 8, 8\)"),
    "string dtype": (dict(target=np.full(LATENT, "x")), r"dtype <U1"),
    "datetime dtype": (dict(target=np.zeros(LATENT, "datetime64[s]")), r"dtype datetime64"),
    "complex dtype": (dict(target=np.zeros(LATENT, np.complex64)), r"dtype complex64"),
    "float64 dtype": (dict(target=np.zeros(LATENT, np.float64)), r"dtype float64"),
    "non-finite": (dict(target=np.full(LATENT, np.inf, np.float16)), r"non-finite"),
    "negative seed": (dict(seed=-1), r"seed -1"),
    "huge seed": (dict(seed=2**64), r"seed 18446744073709551616"),
    "string seed": (dict(seed="1001"), r"seed '1001'"),
    "NaN sample_id": (dict(sample_id=math.nan), r"sample_id nan"),
    "negative sample_id": (dict(sample_id=-3), r"sample_id -3"),
    "bool sample_id": (dict(sample_id=True), r"sample_id True"),
    "sample_id of another key": (dict(sample_id=7), r"sample_id 7"),
    "prompt not a string": (dict(prompt=5), r"prompt 5"),
}


@pytest.mark.parametrize("case", sorted(BAD_TARGETS))
def test_malformed_sample_is_refused_naming_sample_and_shard(case, tmp_path):
    changes, expected = BAD_TARGETS[case]
    changes = dict(changes)
    target, noise_shape = changes.pop("target", None), changes.pop("noise_shape", LATENT)
    bad = crafted_sample(1, target=target, noise_shape=noise_shape, meta=changes)
    for skip_corrupt in (False, True):  # content errors are never skipped
        stream = crafted_stream(tmp_path / f"cache-{skip_corrupt}", [crafted_sample(0), bad, crafted_sample(2)],
                                skip_corrupt=skip_corrupt)
        with pytest.raises(ValueError, match=rf"sample '000000001' of shard .*shard-000000\.tar.*{expected}"):
            list(stream.epoch_batches(0))


def test_honest_crafted_shard_is_accepted(tmp_path):
    (batch,) = list(crafted_stream(tmp_path / "cache", [crafted_sample(i) for i in range(3)]).epoch_batches(0))
    assert batch["sample_id"] == [0, 1, 2] and batch["target"].shape == (3, *LATENT)


# --- trained runs: a reference and a run killed while writing a checkpoint --------------------------------

SETTINGS = ["train.max_steps=6", "train.checkpoint_every=2", "train.log_every=2", "train.eval_every=0",
            "train.learning_rate=0.01", "train.zero_stage=1"]


@pytest.fixture(scope="module")
def partial_cache(tiny_cache, tmp_path_factory) -> Path:
    """The tiny cache as generated for data.num_samples=56: shard 3 holds its first 8 samples."""
    cache = copy_cache(tiny_cache, tmp_path_factory.mktemp("partial") / "cache")
    name = "shard-000003.tar"
    samples = list(read_shard(cache / name))[: NUM_PARTIAL - 3 * SHARD_SIZE]
    (cache / name).unlink()
    record_shards(cache, [write_shard(cache / name, samples)])
    return cache


def run_args(root, teacher, cache, out, *extra):
    return train_args(root, teacher, out, f"data.cache_dir={cache}", f"data.num_samples={NUM_PARTIAL}", *SETTINGS,
                      *extra)


@pytest.fixture(scope="module")
def trained(tiny_root, tiny_teacher, partial_cache, tmp_path_factory) -> dict:
    """``reference``: 6 steps; ``killed``: SIGKILL in the middle of writing checkpoint 6 (4 is complete)."""
    base = tmp_path_factory.mktemp("trained")
    runs = {"reference": {}, "killed": {"NOISEREFINE_TRAIN_KILL_IN_SAVE": "6"}}
    procs = {name: start(PYTHON + run_args(tiny_root, tiny_teacher, partial_cache, base / name),
                         base / f"{name}.log", **env) for name, env in runs.items()}
    codes = {name: finish(proc, base / f"{name}.log") for name, proc in procs.items()}
    assert codes["reference"][0] == 0, codes["reference"][1][-4000:]
    assert codes["killed"][0] == -9, codes["killed"][1][-4000:]
    killed = base / "killed"
    assert (killed / "checkpoints" / "latest").read_text() == "step00000004"
    assert (killed / "checkpoints" / "step00000006").is_dir() and not (killed / "done.json").exists()
    return {name: base / name for name in runs}


def copy_run(trained: dict, name: str, destination: Path) -> Path:
    return Path(shutil.copytree(trained[name], destination))


# --- 8 + 14 + kill during a checkpoint write: exact resume from the newest intact checkpoint, cache grown -----

def test_killed_mid_checkpoint_write_resumes_exactly_from_the_newest_intact_one(tiny_root, tiny_teacher, tiny_cache,
                                                                                partial_cache, trained, tmp_path):
    """The run killed while writing checkpoint 6 (``latest`` still names 4), checkpoint 4 then truncated, and
    data.num_samples grown to 64 (shard 3 regrown under a new name, the old file kept): it resumes from
    checkpoint 2, saying why, and trains on the shard rows it started with, bit for bit."""
    out = copy_run(trained, "killed", tmp_path / "killed")
    optimizer = out / "checkpoints" / "step00000004" / "zero_pp_rank_0_mp_rank_00_optim_states.pt"
    optimizer.write_bytes(optimizer.read_bytes()[: optimizer.stat().st_size // 3])
    grown = copy_cache(partial_cache, tmp_path / "grown")
    shutil.copy(tiny_cache / "shard-000003.tar", grown / "shard-000003-n16.tar")
    full = read_manifest(tiny_cache)["shard-000003.tar"]
    record_shards(grown, [ShardInfo("shard-000003-n16.tar", full.num_samples, full.num_bytes, full.sha256)])
    code, text = run(PYTHON + run_args(tiny_root, tiny_teacher, grown, out, "data.num_samples=64"),
                     tmp_path / "resume.log")
    assert code == 0, text[-4000:]
    assert "checkpoint step00000004 is unreadable (" in text and "resuming from step00000002" in text, text[-4000:]
    reference = trained["reference"]
    assert read_samples(out / "samples_rank0.jsonl") == read_samples(reference / "samples_rank0.jsonl")
    assert same_weights(out / "refiner", reference / "refiner")


def test_resume_refuses_training_shards_that_changed_or_are_gone(tiny_root, tiny_teacher, tiny_cache, partial_cache,
                                                                  trained, tmp_path):
    """data.num_samples grown to 64 and shard 3 regrown in place (what the generator does today), shard 2
    deleted: the resumed run would train on other samples than it started with; it is refused, naming both."""
    out = copy_run(trained, "killed", tmp_path / "killed")
    cache = copy_cache(partial_cache, tmp_path / "cache")
    shutil.copy(tiny_cache / "shard-000003.tar", cache / "shard-000003.tar")
    record_shards(cache, [read_manifest(tiny_cache)["shard-000003.tar"]])
    (cache / "shard-000002.tar").unlink()
    code, text = run(PYTHON + run_args(tiny_root, tiny_teacher, cache, out, "data.num_samples=64"),
                     tmp_path / "resume.log")
    assert code == 1, text[-4000:]
    assert f"{cache / 'shard-000002.tar'} is gone" in text and f"{cache / 'shard-000003.tar'} changed" in text, \
        text[-4000:]
    assert ", in open_cache" in text, text[-4000:]  # refused before the model, the engine or the process group


# --- 14. resume with another config; damaged checkpoints ----------------------------------------------

def test_resume_with_another_lora_config_is_refused_before_deepspeed_loads(tiny_root, tiny_teacher,
                                                                           partial_cache, trained, tmp_path):
    out = copy_run(trained, "killed", tmp_path / "killed")
    code, text = run(PYTHON + run_args(tiny_root, tiny_teacher, partial_cache, out, "refiner.lora_rank=2",
                                       "refiner.target_modules=[to_q,to_k]"), tmp_path / "resume.log")
    assert code == 1, text[-4000:]
    assert "differs in: refiner.lora_rank, refiner.target_modules" in text, text[-4000:]
    assert ", in find" in text, text[-4000:]  # Checkpointer.find: before the model, the engine or DeepSpeed's load


SELECT = """
import json, shutil, sys
from pathlib import Path
import torch
from noiserefine.train.checkpoint_files import select_checkpoint

class NotAllowlisted:
    pass

source, base = Path(sys.argv[1]), Path(sys.argv[2])
def zero(p): p.write_bytes(bytes(p.stat().st_size))
def foreign(p): torch.save({"payload": NotAllowlisted()}, p)
STATES, OPTIM = "mp_rank_00_model_states.pt", "zero_pp_rank_0_mp_rank_00_optim_states.pt"
cases = {
    "zeroed states": lambda c: zero(c / "step00000006" / STATES),
    "zeroed optimizer states": lambda c: zero(c / "step00000006" / OPTIM),
    "empty latest": lambda c: (c / "latest").write_text(""),
    "latest cut short": lambda c: (c / "latest").write_text("step0000"),
    "deleted optimizer states": lambda c: (c / "step00000006" / OPTIM).unlink(),
    "deleted states": lambda c: (c / "step00000006" / STATES).unlink(),
    "none intact": lambda c: [zero(c / "step00000006" / STATES), (c / "step00000004" / OPTIM).unlink()],
    "foreign pickle": lambda c: foreign(c / "step00000006" / STATES),
}
results = {}
for name, damage in cases.items():
    ckpt = base / name.replace(" ", "-") / "checkpoints"
    shutil.copytree(source, ckpt)
    damage(ckpt)
    try:
        chosen = select_checkpoint(ckpt)
        results[name] = {"tag": chosen[0] if chosen else None, "step": chosen[1]["step"] if chosen else None}
    except ValueError as error:
        results[name] = {"error": str(error), "type": type(error).__name__}
print("RESULTS " + json.dumps(results))
"""


def test_damaged_checkpoints_fall_back_to_the_newest_intact_one(trained, tmp_path):
    result = subprocess.run(PYTHON + ["-c", SELECT, str(trained["reference"] / "checkpoints"), str(tmp_path)],
                            cwd=REPO, env=child_env(), capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-4000:]
    line = next(x for x in result.stdout.splitlines() if x.startswith("RESULTS "))
    results = json.loads(line[len("RESULTS "):])
    for case in ("zeroed states", "zeroed optimizer states", "deleted optimizer states", "deleted states"):
        assert results[case] == {"tag": "step00000004", "step": 4}, (case, results[case])
    for case in ("empty latest", "latest cut short"):  # DeepSpeed writes `latest` in place, last
        assert results[case] == {"tag": "step00000006", "step": 6}, (case, results[case])
    log = result.stderr
    assert "checkpoint step00000006 is unreadable (" in log and "resuming from step00000004" in log, log[-3000:]
    assert "is empty or cut short" in log, log[-3000:]
    none = results["none intact"]
    assert "error" in none and "no intact checkpoint" in none["error"] and "none-intact/checkpoints" in none["error"]
    foreign = results["foreign pickle"]  # not damage: refused, never silently skipped
    assert "error" in foreign and "refused" in foreign["error"] and "Unsupported global" in foreign["error"], foreign


# --- 15. a finished run re-run with another config, config.yaml deleted ------------------------------------

def test_finished_run_without_config_yaml_refuses_another_config(tiny_root, tiny_teacher, partial_cache, trained,
                                                                 tmp_path):
    out = copy_run(trained, "reference", tmp_path / "run")
    (out / "config.yaml").unlink()
    settings = [f"data.cache_dir={partial_cache}", f"data.num_samples={NUM_PARTIAL}", *SETTINGS,
                f"train.output_dir={out}"]
    assert finished_run(tiny_config(tiny_root, tiny_teacher, settings))["max_steps"] == 6
    with pytest.raises(ValueError, match=r"differs in: refiner\.lora_rank"):
        finished_run(tiny_config(tiny_root, tiny_teacher, settings + ["refiner.lora_rank=2"]))


# --- 16. evaluation writes nothing outside the configured directories --------------------------------------

def test_evaluation_writes_nothing_outside_the_configured_directories(tiny_teacher, tiny_cache, tmp_path):
    from safetensors.torch import save_file

    from noiserefine.digits import classifier

    cwd, home, xdg = tmp_path / "cwd", tmp_path / "home", tmp_path / "xdg"
    for directory in (cwd, home, xdg):
        directory.mkdir()
    classifier_dir, out = tmp_path / "classifier", tmp_path / "run"
    torch.manual_seed(0)  # an untrained classifier in place: the evaluation loads it, trains none
    classifier_dir.mkdir()
    save_file(classifier.DigitClassifier().state_dict(), str(classifier_dir / classifier.WEIGHTS_FILENAME))
    (classifier_dir / classifier.META_FILENAME).write_text(json.dumps(
        {"format_version": classifier.FORMAT_VERSION, "seed": 0, "num_steps": classifier.DEFAULT_NUM_STEPS}))
    cache_before = sorted((p.name, p.stat().st_mtime_ns) for p in tiny_cache.iterdir())
    # data.cache_root stays the relative default "cache": nothing may appear under ./cache
    command = PYTHON + [str(REPO / "trainer" / "train.py"), "--config", str(REPO / "configs" / "digits.yaml"), *TINY,
                        f"model.path={tiny_teacher}", f"data.cache_dir={tiny_cache}", f"train.output_dir={out}",
                        f"eval.classifier_dir={classifier_dir}", "eval.metrics=digit_classifier",
                        "train.max_steps=1", "train.eval_every=1", "train.checkpoint_every=1"]
    env = {**child_env(), "HOME": str(home), "XDG_CACHE_HOME": str(xdg), "NOISEREFINE_HASH_CACHE": str(xdg / "h.json")}
    result = subprocess.run(command, cwd=cwd, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, (result.stdout + result.stderr)[-4000:]
    assert (out / "eval_step1.png").is_file() and (out / "eval_log.csv").is_file()
    assert sorted(p.name for p in classifier_dir.iterdir()) == sorted([classifier.WEIGHTS_FILENAME,
                                                                       classifier.META_FILENAME])
    assert list(cwd.rglob("*")) == [] and list(home.rglob("*")) == [], (list(cwd.rglob("*")), list(home.rglob("*")))
    assert sorted((p.name, p.stat().st_mtime_ns) for p in tiny_cache.iterdir()) == cache_before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["classifier", "cwd", "home", "run", "xdg"]


# --- one of two ranks killed -------------------------------------------------------------------------------

def test_one_rank_killed_the_other_exits_with_a_clear_error(tiny_root, tiny_teacher, tiny_cache, tmp_path):
    """SIGKILL to rank 1 under the deepspeed launcher (2 CPU ranks): no hang. Rank 0 fails at its next
    collective (gloo: connection closed by peer) or is stopped by the launcher's SIGTERM first (it polls
    its ranks every second); either way it says so, and the launcher names the dead rank's exit status."""
    log = tmp_path / "launcher.log"
    command = deepspeed_launcher() + ["--num_gpus", "2", "--master_port", str(free_port())] + train_args(
        tiny_root, tiny_teacher, tmp_path / "run", "train.max_steps=200", "train.eval_every=0",
        "train.checkpoint_every=100")
    proc = start(command, log, NOISEREFINE_TRAIN_KILL_RANK="1:3")
    killed_at = None
    deadline = time.monotonic() + 240
    while proc.poll() is None and time.monotonic() < deadline:
        if killed_at is None and "test hook: SIGKILL to rank 1" in log.read_text():
            killed_at = time.monotonic()
        time.sleep(0.2)
    if proc.poll() is None:
        proc.kill()
    code, text = finish(proc, log)
    assert killed_at is not None, text[-4000:]
    assert time.monotonic() - killed_at < 60, text[-4000:]
    assert code != 0 and "exits with return code = -9" in text, text[-4000:]
    assert re.search(r"rank 0 (lost contact with another rank|stopped by SIGTERM) at step 3", text), text[-4000:]
    assert not (tmp_path / "run" / "done.json").exists()

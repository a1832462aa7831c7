"""``python -m noiserefine.evaluate`` end to end on tiny random models of configs/sd21.yaml's classes.

A tiny SD pipeline (and a second one as the guidance-distilled model), a refiner with non-zero LoRA
weights, a COCO captions JSON with its image folder, a tiny CLIP for CLIPScore and another for
PickScore, a tiny Inception-like network: 16 samples in shards of 4. Then: a run killed by SIGKILL in
the middle of a shard write and re-run gives the uninterrupted run's numbers without re-sampling a stored
shard; another refiner into the same --out is refused, and with a shared --store only its own row is
sampled; the trainer's periodic evaluation scores with the same CLIP code.
"""

from __future__ import annotations

import json
import multiprocessing
import os
import signal
from pathlib import Path

import numpy as np
import pytest
import torch
from tiny_eval import build_tiny_clip, tiny_inception_features, write_coco_fixture
from faults.tiny_refiner import save_tiny_refiner
from tiny_models import build_tiny_sd

import noiserefine.evaluation.benchmark as benchmark_module
from noiserefine.config import load_config, save_config
from noiserefine.evaluate import evaluate

REPO = Path(__file__).resolve().parents[1]
NUM_SAMPLES, SHARD = 16, 4



pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


def tiny_config(root: Path, **extra):
    captions, folder = root / "captions_val2014.json", root / "val2014"
    overrides = {"model.path": root / "sd", "model.device": "cpu", "model.dtype": "float32",
                 "teacher.num_steps": 2, "student.num_steps": 2, "benchmark.num_steps": 0,  # rows at 2 steps
                 "teacher.guidance": "cfg_pag",  # a CFG+PAG guided row (configs/sd21.yaml's teacher is CFG alone)
                 "data.sources": "[{kind: text, path: prompts.txt}]",
                 "benchmark.captions": captions, "benchmark.reference": folder,
                 "benchmark.num_samples": NUM_SAMPLES, "benchmark.shard_size": SHARD, "benchmark.batch_size": 3,
                 "benchmark.feature_batch_size": 5, "benchmark.grid_columns": 4,
                 "benchmark.distilled_path": root / "distilled", "benchmark.inception_path": "''",
                 "eval.clip_path": root / "clip", "eval.pickscore_path": root / "pick", **extra}
    return load_config(REPO / "configs" / "sd21.yaml", [f"{k}={v}" for k, v in overrides.items()])


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("evaluate")
    patch = pytest.MonkeyPatch()
    patch.setenv("NOISEREFINE_HASH_CACHE", str(root / "file_hashes.json"))  # model files' sha256 memo
    build_tiny_sd(root / "sd", seed=0)
    build_tiny_sd(root / "distilled", seed=1)
    write_coco_fixture(root, num_images=20)
    build_tiny_clip(root / "clip", seed=0)
    build_tiny_clip(root / "pick", seed=1, logit_scale=50.0)
    cfg = tiny_config(root)
    save_config(cfg, root / "eval.yaml")
    refiner = save_tiny_refiner(cfg, root / "refiner", seed=0)
    report = evaluate(cfg, refiner, out=root / "out", progress=False, inception=tiny_inception_features())
    yield root, cfg, refiner, report
    patch.undo()


class RolloutCounter:
    """Counts the samples each row's rollouts produce (wraps noiserefine.evaluation.benchmark's rollout)."""

    def __init__(self, monkeypatch):
        self.samples = 0
        original = benchmark_module.rollout

        def counted(backend, noise, *args, **kwargs):
            self.samples += noise.shape[0]
            return original(backend, noise, *args, **kwargs)

        monkeypatch.setattr(benchmark_module, "rollout", counted)


@pytest.mark.slow  # >= 1 s on an idle 2-core machine: `make test` only, not the fast lane
def test_tiny_sd21_evaluation_end_to_end(setup):
    root, cfg, refiner, report = setup
    out = root / "out"
    rows = report["rows"]
    assert list(rows) == ["gaussian-unguided", "gaussian-guided", "distilled", "refined"]
    assert [rows[k]["nfe"] for k in rows] == [2, 6, 2, 3]  # 2 steps; CFG+PAG 3 branches; refiner +1 (single_call)
    for slug, m in rows.items():
        for key in ("fid", "inception_score", "clip_score", "pick_score", "seconds_per_image"):
            assert np.isfinite(m[key]), (slug, key)
        assert m["num_samples"] == NUM_SAMPLES and 0 <= m["clip_score"] <= 100
    for slug in ("distilled", "refined"):
        expected = (rows["gaussian-unguided"]["fid"] - rows[slug]["fid"]) / \
                   (rows["gaussian-unguided"]["fid"] - rows["gaussian-guided"]["fid"])
        assert rows[slug]["gap_closed"] == pytest.approx(expected)
    assert rows["refined"]["fid"] != rows["gaussian-unguided"]["fid"]  # the refiner changes the samples

    saved = json.loads((out / "metrics.json").read_text())
    assert saved["rows"] == json.loads(json.dumps(rows)) and saved["run_key"] == report["run_key"]
    table = (out / "table.md").read_text()
    assert "| setting | NFE | FID ↓ | IS ↑ | CLIPScore ↑ | PickScore ↑ | s/image | gap closed |" in table
    assert "Gaussian, guided (CFG 7.5 + PAG 3)" in table and "16 samples, MS-COCO captions" in table
    from PIL import Image

    with Image.open(out / "grid.png") as grid:  # 4 rows x 4 columns of 16 px images, upscaled 4x
        assert grid.size[1] == 2 + 4 * (16 * 4 + 2)

    protocol = json.loads((out / "protocol.json").read_text())
    from noiserefine.hashing import file_sha256

    assert protocol["captions_sha256"] == file_sha256(root / "captions_val2014.json")
    assert protocol["num_samples"] == NUM_SAMPLES and protocol["resolution"] == 16
    assert "center crop" in protocol["fid_image_rule"] and protocol["reference"]["num_images"] == NUM_SAMPLES
    lines = (out / "samples.csv").read_text().splitlines()
    assert len(lines) == NUM_SAMPLES + 1 and lines[1].endswith(",a photo of thing 100 version 1.")

    # sample 0 of the unguided row is the rollout of its protocol seed and caption, decoded
    from noiserefine.backends import load_backend
    from noiserefine.noise import noise_from_seeds
    from noiserefine.sampling import rollout

    backend = load_backend(cfg.model)
    seed, prompt = int(lines[1].split(",")[1]), lines[1].split(",", 2)[2]
    with torch.no_grad():
        image = backend.decode(rollout(backend, noise_from_seeds([seed], backend.latent_shape),
                                       backend.encode_prompts([prompt]), 2))
    stored = np.asarray(Image.open(next((root / "out" / "store").glob("gaussian-unguided-*")) / "images" / "00000000.png"))
    expected = (image[0].clamp(0, 1) * 255).round().to(torch.uint8).permute(1, 2, 0).numpy()
    assert np.abs(stored.astype(int) - expected.astype(int)).max() <= 1

    # the FID of a row is the Frechet distance of its stored pool features to the reference folder's
    from noiserefine.evaluation.protocols import load_reference_image
    from noiserefine.evaluation.scores import feature_statistics, frechet_distance

    inception = tiny_inception_features()
    folder = root / "val2014"
    names = [json.loads((root / "captions_val2014.json").read_text())["images"]]
    files = sorted(names[0], key=lambda image: image["id"])[:NUM_SAMPLES]
    reference = inception(torch.stack([load_reference_image(folder / f["file_name"], 16) for f in files]))["pool"]
    store = next((root / "out" / "store").glob("refined-*"))
    pool = np.concatenate([np.load(store / f"shard-{a:08d}-{min(a + SHARD, NUM_SAMPLES):08d}.npz")["inception_pool"]
                           for a in range(0, NUM_SAMPLES, SHARD)])
    assert rows["refined"]["fid"] == pytest.approx(
        frechet_distance(*feature_statistics(pool), *feature_statistics(reference)), rel=1e-9)


def _killed_run(config_path: str, refiner: str, out: str, kill_at_write: int) -> None:
    """Child process: the evaluation, SIGKILLed while writing shard number ``kill_at_write`` (half a temp file)."""
    torch.set_num_threads(1)
    from noiserefine.evaluation import store as store_module

    original, calls = store_module.ShardStore.write, [0]

    def write(self, start, stop, arrays):
        calls[0] += 1
        if calls[0] == kill_at_write:
            with open(self.directory / f".{self.shard_name(start, stop)}.{os.getpid()}-dead.tmp", "wb") as handle:
                handle.write(b"PK\x03\x04 half a shard")
                handle.flush()
            os.kill(os.getpid(), signal.SIGKILL)
        return original(self, start, stop, arrays)

    store_module.ShardStore.write = write
    evaluate(load_config(config_path), refiner, out=out, progress=False, inception=tiny_inception_features())


@pytest.mark.slow  # starts (forks) a process
def test_resume_after_sigkill_gives_the_same_numbers_and_samples_nothing_twice(setup, tmp_path, monkeypatch):
    root, cfg, refiner, report = setup
    out = tmp_path / "out"
    # the reference's 4 shards + the unguided row's 4 + 2 of the guided row, then killed mid-write of the next
    child = multiprocessing.get_context("fork").Process(
        target=_killed_run, args=(str(root / "eval.yaml"), str(refiner), str(out), 11))
    child.start()
    child.join(timeout=240)
    assert child.exitcode == -signal.SIGKILL
    store = out / "store"
    done = {d.name.split("-")[0] + "-" + d.name.split("-")[1]: sorted(p.name for p in d.glob("shard-*.npz"))
            for d in store.iterdir()}
    guided = next(d for d in store.iterdir() if d.name.startswith("gaussian-guided"))
    assert len(list(guided.glob("shard-*.npz"))) == 2 and list(guided.glob(".*.tmp"))  # killed mid-write
    assert not (out / "metrics.json").exists(), done

    counter = RolloutCounter(monkeypatch)
    resumed = evaluate(cfg, refiner, out=out, progress=False, inception=tiny_inception_features())
    # missing: 2 shards of the guided row, the distilled and refined rows
    assert counter.samples == 2 * SHARD + 2 * NUM_SAMPLES
    for slug, metrics in report["rows"].items():
        for key in ("fid", "inception_score", "inception_score_std", "clip_score", "pick_score", "nfe"):
            assert resumed["rows"][slug][key] == pytest.approx(metrics[key], rel=1e-9, abs=1e-9), (slug, key)
    assert resumed["run_key"] == report["run_key"]

    counter.samples = 0  # a finished run re-run samples nothing
    again = evaluate(cfg, refiner, out=out, progress=False, inception=tiny_inception_features())
    assert counter.samples == 0 and again["rows"] == resumed["rows"]


@pytest.mark.slow  # >= 1 s on an idle 2-core machine: `make test` only, not the fast lane
def test_another_refiner_is_refused_in_the_same_out_and_shares_a_store(setup, tmp_path, monkeypatch):
    root, cfg, _, report = setup
    other = save_tiny_refiner(cfg, tmp_path / "other-refiner", seed=1)
    with pytest.raises(ValueError, match=r"another configuration \(differs in: .*rows\.refined"):
        evaluate(cfg, other, out=root / "out", progress=False, inception=tiny_inception_features())
    counter = RolloutCounter(monkeypatch)
    result = evaluate(cfg, other, out=tmp_path / "out", store=root / "out" / "store", progress=False,
                      inception=tiny_inception_features())
    assert counter.samples == NUM_SAMPLES  # only the new refined row; the Gaussian and distilled rows are reused
    assert result["rows"]["gaussian-guided"]["fid"] == pytest.approx(report["rows"]["gaussian-guided"]["fid"])
    assert result["rows"]["refined"]["fid"] != pytest.approx(report["rows"]["refined"]["fid"])
    counter.samples = 0  # a shorter run on the shared store: its whole shards exist, nothing is sampled
    shorter = evaluate(cfg, root / "refiner", out=tmp_path / "out8", store=root / "out" / "store", num_samples=8,
                       progress=False, inception=tiny_inception_features())
    assert counter.samples == 0 and shorter["rows"]["refined"]["num_samples"] == 8


@pytest.mark.slow  # >= 1 s on an idle 2-core machine: `make test` only, not the fast lane
def test_two_workers_share_the_shards_and_the_last_writes_the_report(setup, tmp_path, monkeypatch):
    root, cfg, refiner, report = setup
    counter = RolloutCounter(monkeypatch)
    first = evaluate(cfg, refiner, out=tmp_path / "out", progress=False, worker=(0, 2),
                     inception=tiny_inception_features())
    assert first["complete"] is False and counter.samples == 4 * NUM_SAMPLES // 2  # windows 0 and 2 of each row
    assert first["missing"] == {slug: NUM_SAMPLES // 2 for slug in report["rows"]} | {"reference": True}
    assert not (tmp_path / "out" / "metrics.json").exists()
    second = evaluate(cfg, refiner, out=tmp_path / "out", progress=False, worker=(1, 2),
                      inception=tiny_inception_features())
    assert counter.samples == 4 * NUM_SAMPLES
    for slug, metrics in report["rows"].items():
        assert second["rows"][slug]["fid"] == pytest.approx(metrics["fid"], rel=1e-9)
        assert second["rows"][slug]["pick_score"] == pytest.approx(metrics["pick_score"], rel=1e-9)


@pytest.mark.slow  # >= 1 s on an idle 2-core machine: `make test` only, not the fast lane
def test_command_line_and_missing_weights_name_the_file(setup, tmp_path):
    root, cfg, refiner, _ = setup
    from noiserefine.evaluate import main

    with pytest.raises(FileNotFoundError, match=r"benchmark\.inception_path.*nowhere\.pth"):
        main(["--config", str(root / "eval.yaml"), "--refiner", str(refiner), "--out", str(tmp_path / "o"),
              "--no-progress", f"benchmark.inception_path={tmp_path / 'nowhere.pth'}"])
    with pytest.raises(FileNotFoundError, match=r"eval\.pickscore_path.*missing-pick"):
        main(["--config", str(root / "eval.yaml"), "--refiner", str(refiner), "--out", str(tmp_path / "o"),
              "--no-progress", f"eval.pickscore_path={tmp_path / 'missing-pick'}"])
    # no Inception configured: the command runs, CLIP/Pick only, and says what it left out
    assert main(["--config", str(root / "eval.yaml"), "--refiner", str(refiner), "--out", str(tmp_path / "o"),
                 "--no-progress", "--num-samples", "4", "benchmark.distilled_path=''", "benchmark.reference=''"]) == 0
    metrics = json.loads((tmp_path / "o" / "metrics.json").read_text())
    assert list(metrics["rows"]) == ["gaussian-unguided", "gaussian-guided", "refined"]
    assert "fid" not in metrics["rows"]["refined"] and "clip_score" in metrics["rows"]["refined"]
    assert any("inception_path is not set" in note for note in metrics["notes"])


def test_trainer_periodic_evaluation_scores_with_the_same_clip_code(setup, tmp_path):
    import importlib.util

    from noiserefine.backends import load_backend
    from noiserefine.evaluation.evaluator import EVAL_LOG, Evaluator
    from noiserefine.evaluation.features import TextImageScores
    from noiserefine.refiner import load_refiner

    root, _, refiner_dir, _ = setup
    spec = importlib.util.spec_from_file_location("train_entry", REPO / "trainer" / "train.py")
    train_entry = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(train_entry)
    cfg = tiny_config(root, **{"eval.metrics": "text_image", "eval.num_samples": 4, "eval.batch_size": 4,
                               "eval.grid_columns": 2})
    metric = train_entry.metric_factory(cfg)()
    assert isinstance(metric, TextImageScores) and metric.names == ["clip_score", "pick_score"]
    backend = load_backend(cfg.model)
    result = Evaluator(cfg, backend, tmp_path, metric)(load_refiner(refiner_dir, backend), step=7)
    assert set(result["rows"]["refined"]) >= {"clip_score", "pick_score", "nfe"}
    assert (tmp_path / "eval_step7.png").is_file()
    header = (tmp_path / EVAL_LOG).read_text().splitlines()[0]
    assert "clip_score" in header and "pick_score" in header
    with pytest.raises(ValueError, match="neither eval.clip_path nor eval.pickscore_path"):
        tiny_config(root, **{"eval.metrics": "text_image", "eval.clip_path": "''", "eval.pickscore_path": "''"})


def test_imagenet_protocol_on_a_tiny_sit_with_a_statistics_file(tmp_path, monkeypatch):
    """configs/sit_xl2.yaml's classes: class-conditional samples (i % classes), FID against an npz's mu/sigma."""
    from tiny_models import build_tiny_dit

    from noiserefine.evaluation.scores import feature_statistics, frechet_distance

    monkeypatch.setenv("NOISEREFINE_HASH_CACHE", str(tmp_path / "file_hashes.json"))
    build_tiny_dit(tmp_path / "sit", flow=True, num_classes=10)
    reference = np.random.default_rng(0).normal(size=(50, 8))
    np.savez(tmp_path / "ref.npz", mu=reference.mean(0), sigma=np.cov(reference, rowvar=False))
    overrides = {"model.path": tmp_path / "sit", "model.device": "cpu", "model.dtype": "float32",
                 "teacher.num_steps": 2, "student.num_steps": 2, "benchmark.num_classes": 10,
                 "benchmark.num_samples": 20, "benchmark.shard_size": 10, "benchmark.batch_size": 5,
                 "benchmark.reference": tmp_path / "ref.npz", "benchmark.inception_path": "''"}
    cfg = load_config(REPO / "configs" / "sit_xl2.yaml", [f"{k}={v}" for k, v in overrides.items()])
    refiner = save_tiny_refiner(cfg, tmp_path / "refiner", seed=0)
    report = evaluate(cfg, refiner, out=tmp_path / "out", progress=False, inception=tiny_inception_features())
    assert report["protocol"]["samples_per_class"] == [2, 2] and report["rows"]["gaussian-guided"]["nfe"] == 4
    lines = (tmp_path / "out" / "samples.csv").read_text().splitlines()
    assert [line.split(",")[2] for line in lines[1:12]] == [str(i % 10) for i in range(11)]
    store = next((tmp_path / "out" / "store").glob("refined-*"))
    pool = np.concatenate([np.load(store / name)["inception_pool"]
                           for name in ("shard-00000000-00000010.npz", "shard-00000010-00000020.npz")])
    assert report["rows"]["refined"]["fid"] == pytest.approx(
        frechet_distance(*feature_statistics(pool), *feature_statistics(reference)), rel=1e-9)
    assert "CLIPScore" in (tmp_path / "out" / "table.md").read_text()  # the column is there, n/a

"""Fault tests of ``python -m noiserefine.evaluate`` (issue 21): its output folders, its stored shards, its FID
reference and the COCO captions' file names.

A tiny SD pipeline, a refiner, a COCO captions JSON with its images and a tiny Inception-like network: 4
samples in shards of 2, no CLIP (built once per module, evaluated once).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from tiny_eval import tiny_inception_features, write_coco_fixture

import noiserefine.evaluation.benchmark as benchmark_module
from noiserefine.evaluate import evaluate
from noiserefine.evaluation.benchmark import Evaluation
from noiserefine.evaluation.protocols import build_protocol
from noiserefine.evaluation.store import ShardStore

from .tiny_refiner import tiny_sd_and_refiner, tiny_sd_config

NUM_SAMPLES, SHARD = 4, 2

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py
tiny_config = tiny_sd_config


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("evaluate-faults")
    patch = pytest.MonkeyPatch()
    patch.setenv("NOISEREFINE_HASH_CACHE", str(root / "file_hashes.json"))
    write_coco_fixture(root, num_images=6)
    cfg, refiner_dir = tiny_sd_and_refiner(root)
    report = evaluate(cfg, refiner_dir, out=root / "out", progress=False, inception=tiny_inception_features())
    yield root, cfg, refiner_dir, report
    patch.undo()


def count_rollouts(monkeypatch) -> list[int]:
    """``[samples]`` the evaluation's rollouts produce from now on."""
    counted, original = [0], benchmark_module.rollout

    def rollout(backend, noise, *args, **kwargs):
        counted[0] += noise.shape[0]
        return original(backend, noise, *args, **kwargs)

    monkeypatch.setattr(benchmark_module, "rollout", rollout)
    return counted


def snapshot(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


# ------------------------------------------------------------------------------------- item 2: --out, --store
def test_out_refuses_a_foreign_folder_and_replaces_nothing(setup, tmp_path):
    root, cfg, refiner, report = setup
    mine = tmp_path / "my-paper"
    mine.mkdir()
    for name in ("config.yaml", "table.md", "metrics.json", "samples.csv", "grid.png", "protocol.json"):
        (mine / name).write_text(f"the user's own {name}\n")
    before = snapshot(mine)
    with pytest.raises(ValueError, match=rf"{mine}.*not .*evaluate"):
        evaluate(cfg, refiner, out=mine, progress=False, inception=tiny_inception_features())
    assert snapshot(mine) == before
    # its own folder: re-running resumes (here: the finished run's report again, nothing sampled)
    again = evaluate(cfg, refiner, out=root / "out", progress=False, inception=tiny_inception_features())
    assert again["rows"] == report["rows"]


def test_store_refuses_a_foreign_folder(setup, tmp_path):
    root, cfg, refiner, _ = setup
    mine = tmp_path / "datasets"
    (mine / "coco").mkdir(parents=True)
    (mine / "notes.txt").write_text("mine\n")
    before = snapshot(mine)
    with pytest.raises(ValueError, match=rf"{mine}.*not .*store"):
        evaluate(cfg, refiner, out=tmp_path / "out", store=mine, progress=False, inception=tiny_inception_features())
    assert snapshot(mine) == before and sorted(p.name for p in mine.iterdir()) == ["coco", "notes.txt"]
    # a store folder of ours (every entry a keyed store directory) is shared as before
    shared = evaluate(cfg, refiner, out=tmp_path / "out2", store=root / "out" / "store", progress=False,
                      inception=tiny_inception_features())
    assert shared["complete"]


# ------------------------------------------------------------------------------- item 3: stored array lengths
@pytest.mark.slow  # >= 1 s on an idle 2-core machine: `make test` only, not the fast lane
def test_a_shard_with_short_arrays_is_named_and_resampled(setup, tmp_path, monkeypatch):
    root, cfg, refiner, report = setup
    out = tmp_path / "out"
    evaluate(cfg, refiner, out=out, progress=False, inception=tiny_inception_features())
    store = next((out / "store").glob("refined-*"))
    shard = store / "shard-00000002-00000004.npz"
    with np.load(shard) as data:
        arrays = {name: data[name] for name in data.files}
    arrays["inception_pool"] = arrays["inception_pool"][:1]  # ids and seeds still right
    with open(shard, "wb") as handle:
        np.savez(handle, **arrays)
    rollouts = count_rollouts(monkeypatch)
    with pytest.warns(UserWarning, match=r"shard-00000002-00000004\.npz.*inception_pool.*1 rows.*2 samples"):
        again = evaluate(cfg, refiner, out=out, progress=False, inception=tiny_inception_features())
    assert rollouts[0] == SHARD  # that one shard re-sampled
    assert again["rows"]["refined"]["fid"] == pytest.approx(report["rows"]["refined"]["fid"], rel=1e-9)
    assert list(store.glob("shard-00000002-00000004.npz.bad*"))  # kept aside, not lost


def test_read_names_the_shard_and_the_array_of_a_wrong_length(tmp_path):
    store = ShardStore(tmp_path, "row", {"x": 1})
    store.write(0, 4, {"sample_ids": np.arange(4), "seeds": np.arange(4), "clip_score": np.ones(4)})
    path = store.directory / store.shard_name(0, 4)
    np.savez(path, sample_ids=np.arange(4), seeds=np.arange(4), clip_score=np.ones(6))
    with pytest.raises(ValueError, match=r"shard-00000000-00000004\.npz.*clip_score.*6 rows.*4 samples"):
        store.read(0, 4, list(range(4)))
    with pytest.raises(ValueError, match=r"clip_score.*6 rows"):
        store.write(0, 4, {"sample_ids": np.arange(4), "seeds": np.arange(4), "clip_score": np.ones(6)})


def test_read_all_names_a_shard_whose_features_have_another_width(tmp_path):
    store = ShardStore(tmp_path, "row", {"x": 1})
    store.write(0, 2, {"sample_ids": np.arange(2), "seeds": np.arange(2), "inception_pool": np.ones((2, 8))})
    store.write(2, 4, {"sample_ids": np.arange(2, 4), "seeds": np.arange(2, 4), "inception_pool": np.ones((2, 5))})
    with pytest.raises(ValueError, match=r"shard-00000002-00000004\.npz.*inception_pool.*\(2, 5\)"):
        store.read_all([(0, 2), (2, 4)], None)


# ------------------------------------------------------------------------------- item 4: the reference .npz
def _statistics(path: Path, mu, sigma) -> Path:
    np.savez(path, mu=mu, sigma=sigma)
    return path


def _bad_references(tmp_path: Path) -> dict[str, tuple[Path, str]]:
    rng = np.random.default_rng(0)
    features = rng.normal(size=(40, 8))
    mu, sigma = features.mean(0), np.cov(features, rowvar=False)
    asymmetric = sigma.copy()
    asymmetric[0, 1] += 5.0
    infinite = sigma.copy()
    infinite[2, 2] = np.inf
    return {"feature size": (_statistics(tmp_path / "wide.npz", np.zeros(16), np.eye(16)), r"mu.*16 features.*8"),
            "negative definite": (_statistics(tmp_path / "negative.npz", mu, -sigma), r"sigma.*positive semi-definite"),
            "asymmetric": (_statistics(tmp_path / "asymmetric.npz", mu, asymmetric), r"sigma.*not symmetric"),
            "not finite": (_statistics(tmp_path / "infinite.npz", mu, infinite), r"sigma.*not finite|finite")}


@pytest.mark.parametrize("fault", ["feature size", "negative definite", "asymmetric", "not finite"])
def test_a_bad_reference_is_refused_before_sampling(setup, tmp_path, monkeypatch, fault):
    root, _, refiner, _ = setup
    path, message = _bad_references(tmp_path)[fault]
    cfg = tiny_config(root, **{"benchmark.reference": path})
    rollouts = count_rollouts(monkeypatch)
    with pytest.raises(ValueError, match=rf"{path}.*{message}"):
        Evaluation(cfg, refiner, out=tmp_path / "out", progress=False, inception=tiny_inception_features()).run()
    assert rollouts[0] == 0


# ------------------------------------------------------------------------------- item 13: COCO file names
def _captions_with(root: Path, edit) -> Path:
    data = json.loads((root / "captions_val2014.json").read_text())
    edit(data["images"])
    path = root / "edited.json"
    path.write_text(json.dumps(data))
    return path


@pytest.mark.parametrize("escape", ["absolute", "parent"])
def test_coco_file_names_stay_inside_the_reference_folder(tmp_path, escape):
    (tmp_path / "coco").mkdir()
    captions, folder = write_coco_fixture(tmp_path / "coco", num_images=4)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    from PIL import Image

    Image.new("RGB", (20, 20)).save(elsewhere / "x.png")
    name = str(elsewhere / "x.png") if escape == "absolute" else "../../elsewhere/x.png"
    assert (folder / name).is_file()  # it exists: only the check refuses it

    def edit(images):
        min(images, key=lambda image: image["id"])["file_name"] = name

    cfg = tiny_config(tmp_path, **{"benchmark.captions": _captions_with(tmp_path / "coco", edit),
                                   "benchmark.reference": folder})
    with pytest.raises(ValueError, match=r"edited\.json.*file_name.*x\.png.*outside"):
        build_protocol(cfg.benchmark)


def test_two_coco_images_sharing_one_file_are_refused(tmp_path):
    (tmp_path / "coco").mkdir()
    captions, folder = write_coco_fixture(tmp_path / "coco", num_images=4)

    def edit(images):
        first, second = sorted(images, key=lambda image: image["id"])[:2]
        second["file_name"] = "./" + first["file_name"]  # the same file, spelt otherwise

    cfg = tiny_config(tmp_path, **{"benchmark.captions": _captions_with(tmp_path / "coco", edit),
                                   "benchmark.reference": folder})
    with pytest.raises(ValueError, match=r"edited\.json.*image ids \d+ and \d+ share .*\.png"):
        build_protocol(cfg.benchmark)


# ------------------------------------------------------------------ item 11's class: counts bounded before lists
@pytest.mark.parametrize("protocol", ["coco", "imagenet"])
def test_a_huge_num_samples_is_refused_before_any_list_is_built(tmp_path, protocol):
    (tmp_path / "coco").mkdir()
    captions, folder = write_coco_fixture(tmp_path / "coco", num_images=4)
    cfg = tiny_config(tmp_path, **{"benchmark.captions": captions, "benchmark.reference": folder,
                                   "benchmark.protocol": protocol, "benchmark.num_classes": 10})
    with pytest.raises(ValueError, match=r"num_samples=1000000000000.*at most"):
        build_protocol(cfg.benchmark, 10**12)

"""Quality-filtered targets: scores in the shards and the manifest, the data.min_score filter, the scorers."""

from __future__ import annotations

import itertools
import json
from pathlib import Path

import numpy as np
import pytest
import torch

from noiserefine.noise import fingerprint, noise_from_seed
from noiserefine.shards import (ShardInfo, ShardSample, manifest_bytes, parse_manifest, read_manifest, read_shard,
                                sample_key, write_manifest, write_shard)
from noiserefine.train.stream import DataPosition, TeacherStream

SHAPE = (1, 2, 2)
NUM_SHARDS, SHARD_SIZE, GLOBAL_BATCH = 4, 8, 4


def _shard_samples(index: int, scores: list[float] | None):
    for row in range(SHARD_SIZE):
        sample_id = index * SHARD_SIZE + row
        meta = {"sample_id": sample_id, "seed": 1000 + sample_id, "prompt": f"p{sample_id}", "teacher_key": "t",
                "noise_fingerprint": fingerprint(noise_from_seed(1000 + sample_id, SHAPE))}
        if scores is not None:
            meta["score"] = scores[row]
        yield ShardSample(sample_key(sample_id), meta, {"target": np.full(SHAPE, sample_id, np.float32)})


def _write_cache(directory: Path, scored: bool) -> dict[str, ShardInfo]:
    rng = np.random.default_rng(7)
    infos = []
    for index in range(NUM_SHARDS):
        scores = rng.random(SHARD_SIZE).round(6).tolist() if scored else None
        infos.append(write_shard(directory / f"shard-{index:06d}.tar", _shard_samples(index, scores)))
    write_manifest(directory, infos)
    return read_manifest(directory)


@pytest.fixture(scope="module")
def scored_cache(tmp_path_factory):
    directory = tmp_path_factory.mktemp("scored")
    return directory, _write_cache(directory, scored=True)


@pytest.fixture(scope="module")
def unscored_cache(tmp_path_factory):
    directory = tmp_path_factory.mktemp("unscored")
    return directory, _write_cache(directory, scored=False)


def _stream(cache, rank=0, world=1, min_score=None, **kw) -> TeacherStream:
    directory, manifest = cache
    return TeacherStream(directory, manifest, teacher_key="t", seed=3, rank=rank, world_size=world,
                         global_batch_size=GLOBAL_BATCH, min_score=min_score, latent_shape=SHAPE, **kw)


def _global(cache, world: int, count: int, min_score, start: int = 0) -> list[list[int]]:
    streams = [_stream(cache, r, world, min_score) for r in range(world)]
    per_rank = [list(itertools.islice(s.batches(DataPosition(start)), count)) for s in streams]
    return [sum((batches[i]["sample_id"] for batches in per_rank), []) for i in range(count)]


def _score_of(manifest) -> dict[int, float]:
    """sample id -> score, from the manifest rows (sample ids follow the shard rows in _write_cache)."""
    return {int(name[6:12]) * SHARD_SIZE + row: score
            for name, info in manifest.items() for row, score in enumerate(info.scores)}


# --- scores stored with the samples and in the manifest -------------------------------------------------------
def test_scores_are_stored_in_each_sample_and_the_manifest_row(scored_cache):
    directory, manifest = scored_cache
    info = manifest["shard-000001.tar"]
    metas = [sample.meta for sample in read_shard(directory / info.name)]
    assert info.scores == tuple(meta["score"] for meta in metas) and len(info.scores) == SHARD_SIZE
    import pyarrow.parquet as pq

    table = pq.read_table(directory / "manifest.parquet").to_pylist()
    row = next(r for r in table if r["name"] == info.name)
    assert row["scores"] == list(info.scores)
    assert (row["score_min"], row["score_max"]) == (min(info.scores), max(info.scores))
    assert row["score_mean"] == pytest.approx(sum(info.scores) / SHARD_SIZE)


def test_an_unscored_manifest_is_as_before_and_an_old_one_loads(unscored_cache):
    directory, manifest = unscored_cache
    import pyarrow.parquet as pq

    assert pq.read_table(directory / "manifest.parquet").column_names == ["name", "num_samples", "num_bytes", "sha256"]
    assert all(info.scores is None for info in manifest.values())
    assert all("scores" not in info.to_dict() for info in manifest.values())  # checkpoints record rows as before
    row = ShardInfo("shard-000000.tar", 2, 10, "0" * 64, [0.5, 0.25])
    assert parse_manifest(manifest_bytes([row]), "m")[row.name] == row
    with pytest.raises(ValueError, match="m: row 'shard-000000.tar' has 1 scores for 2 samples"):
        parse_manifest(manifest_bytes([ShardInfo(row.name, 2, 10, "0" * 64, [0.5])]), "m")


def test_a_shard_with_only_some_samples_scored_is_refused(tmp_path):
    samples = list(_shard_samples(0, [0.5] * SHARD_SIZE))
    del samples[3].meta["score"]
    with pytest.raises(ValueError, match="1 of 8 samples have no score"):
        write_shard(tmp_path / "shard-000000.tar", samples)
    assert not (tmp_path / "shard-000000.tar").exists()


# --- the filter ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("threshold", [0.3, 0.75])
def test_a_threshold_keeps_exactly_the_samples_at_or_above_it_each_once_per_epoch(scored_cache, threshold):
    score_of = _score_of(scored_cache[1])
    kept = {i for i, score in score_of.items() if score >= threshold}
    assert 0 < len(kept) < len(score_of)
    stream = _stream(scored_cache, min_score=threshold)
    assert stream.samples_per_epoch == len(kept)
    batches = list(itertools.islice(iter(stream), -(-3 * len(kept) // GLOBAL_BATCH)))
    ids = [i for b in batches for i in b["sample_id"]]
    assert all(len(b["sample_id"]) == GLOBAL_BATCH for b in batches)  # full batches (they straddle epochs)
    for epoch in range(3):
        assert sorted(ids[epoch * len(kept):(epoch + 1) * len(kept)]) == sorted(kept)  # each kept sample once
    first = batches[0]
    assert [float(t[0, 0, 0]) for t in first["target"]] == first["sample_id"]  # the row read is the one kept
    again = list(itertools.islice(iter(_stream(scored_cache, min_score=threshold)), len(batches)))
    assert [b["sample_id"] for b in again] == [b["sample_id"] for b in batches]  # deterministic


def test_without_a_threshold_a_scored_cache_streams_every_sample_as_an_unscored_one(scored_cache, unscored_cache):
    assert _global(scored_cache, 1, 16, None) == _global(unscored_cache, 1, 16, None)


def test_filtered_order_is_the_same_for_two_ranks_and_one(scored_cache):
    one = _global(scored_cache, 1, 12, 0.3)
    assert _global(scored_cache, 2, 12, 0.3) == one == _global(scored_cache, 4, 12, 0.3)


def test_filtered_resume_mid_epoch_and_on_fewer_ranks_continues_the_sequence(scored_cache):
    full = _global(scored_cache, 1, 14, 0.3)
    for consumed in (3, 9):  # mid-epoch, and in the 2nd epoch
        streams = [_stream(scored_cache, r, 2, 0.3) for r in range(2)]
        for s in streams:
            list(itertools.islice(iter(s), consumed))
        states = [json.loads(json.dumps(s.state_dict())) for s in streams]  # as a checkpoint stores them
        assert states[0]["min_score"] == 0.3 and states[0]["batches"] == consumed
        same = [_stream(scored_cache, r, 2, 0.3) for r in range(2)]
        tails = [list(itertools.islice(s.batches(s.load_state_dict(st)), 14 - consumed)) for s, st in zip(same, states)]
        assert [a["sample_id"] + b["sample_id"] for a, b in zip(*tails)] == full[consumed:]
        single = _stream(scored_cache, 0, 1, 0.3)
        position = single.load_state_dict(single.elastic_state(states, 0))
        assert [b["sample_id"] for b in itertools.islice(single.batches(position), 14 - consumed)] == full[consumed:]


def test_a_resume_with_another_threshold_is_refused(scored_cache):
    first = _stream(scored_cache, min_score=0.3)
    list(itertools.islice(iter(first), 2))
    state = first.state_dict()
    with pytest.raises(ValueError, match=r"trained with data.min_score=0.3, this run has 0.5"):
        _stream(scored_cache, min_score=0.5).load_state_dict(state)
    with pytest.raises(ValueError, match=r"data.min_score=0.3, this run has None"):
        _stream(scored_cache).load_state_dict(state)


def test_a_threshold_on_an_unscored_cache_or_one_that_keeps_nothing_is_an_error(scored_cache, unscored_cache):
    with pytest.raises(ValueError, match=rf"data.min_score=0.5 but teacher cache {unscored_cache[0]} is not scored "
                                         r"\(4 of its 4 shards have no scores"):
        _stream(unscored_cache, min_score=0.5)
    best = max(_score_of(scored_cache[1]).values())
    with pytest.raises(ValueError, match=rf"data.min_score=2 keeps none of the 32 samples of teacher cache "
                                         rf"{scored_cache[0]} \(its highest score is {best:g}\)"):
        _stream(scored_cache, min_score=2.0)


def test_a_manifest_score_that_disagrees_with_the_sample_is_refused(scored_cache):
    directory, manifest = scored_cache
    name = "shard-000000.tar"
    forged = dict(manifest)
    forged[name] = ShardInfo(name, SHARD_SIZE, manifest[name].num_bytes, manifest[name].sha256,
                             [2.0] * SHARD_SIZE)  # every row kept, but the samples' .json say otherwise
    stream = _stream((directory, forged), min_score=1.5)
    with pytest.raises(ValueError, match=r"sample '000000000' of shard .*shard-000000.tar: score 0\.\d+ in its "
                                         r"metadata, the manifest records 2.0"):
        next(iter(stream))


# --- scorers ---------------------------------------------------------------------------------------------------
def test_the_registry_refuses_an_unknown_kind_and_the_config_checks_the_scorer():
    from types import SimpleNamespace

    from noiserefine.config import load_config
    from noiserefine.scoring import load_scorer, scorer_identity

    yaml = Path(__file__).resolve().parents[1] / "configs" / "digits.yaml"
    with pytest.raises(ValueError, match=r"scorer.kind.*'pickscore'.*expected one of"):
        load_config(yaml, ["scorer.kind=pickscore"])
    with pytest.raises(ValueError, match="'scorer.clip_path' is empty but scorer.kind is 'aesthetic'"):
        load_config(yaml, ["scorer.kind=aesthetic", "scorer.path=head.safetensors"])
    none = SimpleNamespace(kind="", path="", clip_path="")
    assert scorer_identity(none) is None and load_scorer(none) is None
    with pytest.raises(ValueError, match="scorer.kind 'nope' is not a registered scorer"):
        load_scorer(SimpleNamespace(kind="nope", path="x", clip_path=""))
    with pytest.raises(FileNotFoundError, match="scorer.path '/no/such' is neither a file nor a directory"):
        scorer_identity(SimpleNamespace(kind="digit_confidence", path="/no/such", clip_path=""))

"""State owned where it lives (fast, no DeepSpeed): the stream's state (position and shard rows) and the
checkpointer, which saves and restores whatever stateful objects it is given."""

from __future__ import annotations

import dataclasses
import itertools
import json
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf

from helpers_cache import copy_cache, tiny_cache, tiny_config, tiny_root, tiny_teacher  # noqa: F401
from noiserefine.config import load_config
from noiserefine.shards import ShardInfo, read_manifest
from noiserefine.targets.cache import record_shards
from noiserefine.train import checkpoint, distributed
from noiserefine.train.checkpoint import Checkpointer
from noiserefine.train.checkpoint_files import CHECKPOINT_FORMAT, checkpoint_tag
from noiserefine.train.stream import TeacherStream

REPO = Path(__file__).resolve().parents[1]


def _ids(batches) -> list:
    return [(b["index"], b["sample_id"]) for b in batches]


# --- the stream owns its position and its shard rows ---------------------------------------------------

def test_stream_state_round_trip_gives_the_same_next_batches(tiny_root, tiny_teacher, tiny_cache):
    cfg = tiny_config(tiny_root, tiny_teacher)
    full = list(itertools.islice(iter(TeacherStream.from_config(cfg, 1, 2)), 12))
    first = TeacherStream.from_config(cfg, 1, 2)
    list(itertools.islice(iter(first), 5))
    state = json.loads(json.dumps(first.state_dict()))  # as a checkpoint stores it
    assert state["batches"] == 5 and [row["name"] for row in state["shard_rows"]] == first.shard_names
    resumed = TeacherStream.from_config(cfg, 1, 2)
    tail = list(itertools.islice(resumed.batches(resumed.load_state_dict(state)), 7))
    assert _ids(tail) == _ids(full[5:])
    assert all(torch.equal(a["target"], b["target"]) for a, b in zip(tail, full[5:]))
    assert resumed.state_dict() == {**state, "batches": 12}


def test_a_stream_resumes_on_its_recorded_rows_not_on_the_cache_as_it_is_now(tiny_root, tiny_teacher, tiny_cache,
                                                                             tmp_path):
    """The recorded rows (here: 2 of the 4 shards, in their order) win over what a new run would read."""
    cfg = tiny_config(tiny_root, tiny_teacher)
    names = sorted(read_manifest(tiny_cache))
    two = TeacherStream.from_config(cfg, 0, 1, shards=names[2:])
    state = json.loads(json.dumps(two.state_dict()))
    resumed = TeacherStream.from_config(cfg, 0, 1)
    resumed.load_state_dict(state)
    assert resumed.shard_names == names[2:] and resumed.samples_per_epoch == two.samples_per_epoch
    assert _ids(itertools.islice(resumed.batches(), 6)) == _ids(itertools.islice(two.batches(), 6))


def test_load_state_dict_refuses_a_recorded_shard_that_changed_or_is_gone_naming_it(tiny_root, tiny_teacher,
                                                                                     tiny_cache, tmp_path):
    cache = copy_cache(tiny_cache, tmp_path / "cache")
    cfg = tiny_config(tiny_root, tiny_teacher, [f"data.cache_dir={cache}"])
    state = TeacherStream.from_config(cfg).state_dict()
    (cache / "shard-000002.tar").unlink()
    grown = read_manifest(cache)["shard-000001.tar"]
    (cache / "shard-000001.tar").write_bytes((cache / "shard-000001.tar").read_bytes() + b"\0" * 512)
    record_shards(cache, [ShardInfo(grown.name, grown.num_samples, grown.num_bytes + 512, "0" * 64)])
    with pytest.raises(ValueError, match=r"(?s)shard-000001\.tar changed.*shard-000002\.tar is gone"):
        TeacherStream.from_config(cfg).load_state_dict(state)
    # a recorded row that differs from the manifest (same size, other sha256): refused too
    fresh = copy_cache(tiny_cache, tmp_path / "fresh")
    cfg = tiny_config(tiny_root, tiny_teacher, [f"data.cache_dir={fresh}"])
    state = TeacherStream.from_config(cfg).state_dict()
    state["shard_rows"][3]["sha256"] = "f" * 64
    with pytest.raises(ValueError, match=r"shard-000003\.tar changed"):
        TeacherStream.from_config(cfg).load_state_dict(state)
    # a stream given its manifest (no cache to re-open) checks the rows against that manifest
    manifest = read_manifest(fresh)
    given = TeacherStream(fresh, manifest, teacher_key="k", seed=0, rank=0, world_size=1, global_batch_size=8)
    with pytest.raises(ValueError, match=r"shard-000003\.tar \(changed\)"):
        given.load_state_dict(state)
    gone = dict(manifest)
    del gone["shard-000000.tar"]
    given = TeacherStream(fresh, gone, teacher_key="k", seed=0, rank=0, world_size=1, global_batch_size=8)
    with pytest.raises(ValueError, match=r"shard-000000\.tar \(gone\)"):
        given.load_state_dict({"batches": 0, "shard_rows": [dataclasses.asdict(r) for r in manifest.values()]})
    with pytest.raises(ValueError, match="records no list of shard_rows"):
        given.load_state_dict({"batches": 3, "corrupt_skipped": 0})


def test_the_elastic_state_keeps_position_and_rows_and_gives_the_counters_to_rank_0():
    states = [{"batches": 6, "corrupt_skipped": 3, "shard_rows": ["a"]},
              {"batches": 6, "corrupt_skipped": 4, "shard_rows": ["a"]}]
    assert TeacherStream.elastic_state(states, 0) == {"batches": 6, "corrupt_skipped": 7, "shard_rows": ["a"]}
    assert TeacherStream.elastic_state(states, 1) == {"batches": 6, "shard_rows": ["a"]}


# --- the checkpointer saves and restores what it is given, knowing nothing about it -------------------------

class Tally:
    """A stateful object the checkpointer has never heard of."""

    def __init__(self, count: int = 0, notes: list | None = None):
        self.count, self.notes = count, list(notes or [])

    def state_dict(self) -> dict:
        return {"count": self.count, "notes": list(self.notes)}

    def load_state_dict(self, state: dict) -> None:
        self.count, self.notes = int(state["count"]), list(state["notes"])


class ElasticTally(Tally):
    @staticmethod
    def elastic_state(states: list[dict], rank: int) -> dict:
        return {"count": sum(s["count"] for s in states) if rank == 0 else 0, "notes": states[0]["notes"]}


@pytest.fixture
def no_deepspeed(monkeypatch):
    """The checkpointer's DeepSpeed calls replaced: the client state lands where DeepSpeed puts it.
    ``ranks`` is the simulated world: ``all_gather_object`` returns one object per simulated rank
    (rank r's states are rank 0's with every ``count`` + 10 r)."""
    world = {"ranks": 1}

    def gather(obj):
        return [{name: {**state, "count": state["count"] + 10 * r} for name, state in obj.items()}
                for r in range(world["ranks"])]

    def save_checkpoint(engine, ckpt_dir, tag, client_state):
        (Path(ckpt_dir) / tag).mkdir(parents=True, exist_ok=True)
        torch.save(dict(client_state), Path(ckpt_dir) / tag / "mp_rank_00_model_states.pt")

    monkeypatch.setattr(distributed, "all_gather_object", gather)
    monkeypatch.setattr(distributed, "save_checkpoint", save_checkpoint)
    monkeypatch.setattr(distributed, "full_training_state", lambda engine, params: ({"param/weight": torch.ones(2)}, 1))
    monkeypatch.setattr(distributed, "read_client_state", lambda ckpt_dir, tag: torch.load(
        Path(ckpt_dir) / tag / "mp_rank_00_model_states.pt", weights_only=True))
    monkeypatch.setattr(distributed, "barrier", lambda: None)
    monkeypatch.setattr(distributed, "rank", lambda: 0)
    monkeypatch.setattr(checkpoint, "save_refiner", lambda refiner, directory, cfg: None)
    return world


def _cfg(tmp_path):
    return load_config(REPO / "configs" / "digits.yaml", [f"train.output_dir={tmp_path / 'run'}",
                                                          "train.checkpoint_every=2", "train.max_steps=4"])


def test_the_checkpointer_saves_and_restores_any_stateful_objects(no_deepspeed, tmp_path):
    cfg, refiner = _cfg(tmp_path), torch.nn.Linear(2, 1, bias=False)
    Checkpointer(cfg).save(None, refiner, 2, 1.5, {"tally": Tally(5, ["x", 2]), "other": Tally(1)})
    resume = Checkpointer(cfg).find(0, 1)
    assert resume.step == 2 and resume.tag == checkpoint_tag(2) and resume.seconds == 1.5
    assert resume.states == {"tally": [{"count": 5, "notes": ["x", 2]}], "other": [{"count": 1, "notes": []}]}
    tally, other = Tally(), Tally()
    Checkpointer(cfg).restore(resume, {"tally": tally, "other": other}, 0, 1)
    assert (tally.count, tally.notes, other.count) == (5, ["x", 2], 1)
    client = torch.load(resume.path / "mp_rank_00_model_states.pt", weights_only=True)
    assert client["checkpoint_format"] == CHECKPOINT_FORMAT and client["world_size"] == 1
    with pytest.raises(ValueError, match=r"holds no state of 'missing' \(it has \['other', 'tally'\]\)"):
        Checkpointer(cfg).restore(resume, {"missing": Tally()}, 0, 1)


def test_on_another_number_of_ranks_each_object_makes_its_own_state(no_deepspeed, tmp_path):
    cfg, refiner = _cfg(tmp_path), torch.nn.Linear(2, 1, bias=False)
    no_deepspeed["ranks"] = 2
    Checkpointer(cfg).save(None, refiner, 4, 3.0, {"tally": ElasticTally(5, ["n"]), "plain": Tally(1)})
    resume = Checkpointer(cfg).find(0, 1)
    assert resume.world_size == 2 and [s["count"] for s in resume.states["tally"]] == [5, 15]
    tally = ElasticTally()
    Checkpointer(cfg).restore(resume, {"tally": tally}, 0, 1)  # 2 ranks -> 1
    assert (tally.count, tally.notes) == (20, ["n"])
    with pytest.raises(ValueError, match=r"state of 'plain' was written by 2 rank\(s\) and cannot be split over 1"):
        Checkpointer(cfg).restore(resume, {"plain": Tally()}, 0, 1)
    same = Tally()
    Checkpointer(cfg).restore(resume, {"plain": same}, 1, 2)  # the same number of ranks: rank 1's own state
    assert same.count == 11


def test_a_format_3_checkpoint_is_read_as_the_states_of_the_stream_and_the_log_window(no_deepspeed, tmp_path):
    """Checkpoints written before the checkpointer was handed its objects still resume."""
    cfg = _cfg(tmp_path)
    rows = [{"name": "shard-000000.tar", "num_samples": 16, "num_bytes": 51200, "sha256": "a" * 64}]
    window = {"loss": 1.0, "steps": 1, "samples": 8, "seconds": 0.5}
    client = {"step": 2, "seconds": 1.0, "global_batch_size": 8, "shards": ["shard-000000.tar"], "shard_rows": rows,
              "data_position": [{"batches": 2, "corrupt_skipped": 1, "log_window": window}],
              "config": OmegaConf.to_container(cfg, resolve=True), "world_size": 1,
              "trainable_names": ["weight"], "checkpoint_format": 3}
    directory = tmp_path / "run" / "checkpoints" / checkpoint_tag(2)
    directory.mkdir(parents=True)
    torch.save(client, directory / "mp_rank_00_model_states.pt")
    checkpoint.write_record(directory)
    (directory.parent / "latest").write_text(checkpoint_tag(2))
    resume = Checkpointer(cfg).find(0, 1)
    assert resume.states == {"data": [{"batches": 2, "corrupt_skipped": 1, "shard_rows": rows}],
                             "log_window": [window]}
    client["checkpoint_format"] = 2  # older ones (a per-rank data order) are still refused
    torch.save(client, directory / "mp_rank_00_model_states.pt")
    checkpoint.write_record(directory)
    with pytest.raises(ValueError, match="written by an older trainer"):
        Checkpointer(cfg).find(0, 1)


def test_a_checkpoint_record_naming_a_file_outside_its_directory_is_refused(tmp_path):
    """Found in review (issue 21's class: paths read from a file): ``checkpoint.json`` names were joined onto the
    checkpoint directory unchecked, so ``../`` or an absolute name made the resume stat and hash files elsewhere."""
    from noiserefine.hashing import file_sha256
    from noiserefine.train.checkpoint_files import RECORD_FILE, CheckpointDamaged, read_checkpoint

    outside = tmp_path / "outside.bin"
    outside.write_bytes(b"not of this checkpoint")
    for name in ("../../outside.bin", str(outside)):
        tag = tmp_path / "ckpt" / "step00000003"
        tag.mkdir(parents=True, exist_ok=True)
        record = {"format": 4, "files": {name: {"num_bytes": outside.stat().st_size, "sha256": file_sha256(outside)}}}
        (tag / RECORD_FILE).write_text(json.dumps(record))
        with pytest.raises(CheckpointDamaged, match="not a file name of the checkpoint directory"):
            read_checkpoint(tmp_path / "ckpt", "step00000003")

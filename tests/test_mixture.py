"""A data mixture: several teacher caches (prompts, sample counts, teacher settings) in one run, in declared shares.

Fast: the schedule, the shares, the config rules, the generator's component choice, the resume comparison of
configs. Slow (they build caches; `make test`): the stream on two tiny caches (a: the session cache, CFG 3;
b: CFG 1.5 + PAG 2, 32 samples of another base seed) and a format-4 multi-scale state; trained runs (SIGKILL +
resume, 2 -> 1 rank resume) and the generator's ``--component``: tests/faults/test_mixture_resume.py.
"""

from __future__ import annotations

import itertools
import json

import pytest
import torch

from helpers_cache import build_cache, tiny_cache, tiny_config, tiny_root, tiny_teacher  # noqa: F401
from noiserefine.config import load_config
from noiserefine.mixture import component_named, components, integer_shares
from noiserefine.targets.cache import cache_dir_for, read_teacher_record
from noiserefine.targets.identity import teacher_key
from noiserefine.train.mixture import MixtureStream, Schedule
from noiserefine.train.stream import TeacherStream

B_TEACHER = "{guidance: cfg_pag, guidance_scale: 1.5, pag_scale: 2.0}"
MIX = f"data.mixture=[{{name: a, weight: 2}}, {{name: b, weight: 1, data: {{num_samples: 32, base_seed: 1}}, " \
      f"teacher: {B_TEACHER}}}]"


# --- the schedule and the shares (no cache) -----------------------------------------------------------------

def _first(schedule: Schedule, count: int, start: int = 0) -> list[int]:
    return list(itertools.islice(schedule.components_from(start), count))


def test_equal_shares_are_the_multi_scale_rule_b_mod_s():
    for count in (1, 2, 3, 5):
        assert _first(Schedule([1] * count), 40) == [b % count for b in range(40)]


@pytest.mark.parametrize("shares", [[2, 1], [1, 2], [2, 3], [5, 1, 3], [1, 7], [4, 4, 1]])
def test_the_schedule_keeps_the_shares_exactly_per_period_and_within_one_batch_in_every_prefix(shares):
    schedule = Schedule(shares)
    total, order = sum(shares), _first(schedule, 6 * sum(shares))
    for window in range(5):  # every period holds exactly s_c batches of c (and periods repeat)
        part = order[window * total:(window + 1) * total]
        assert [part.count(c) for c in range(len(shares))] == shares
        assert part == order[:total]
    taken = [0] * len(shares)
    for b, c in enumerate(order):  # taken(b) is the count before b, and never a batch off its share
        assert schedule.taken(b) == taken
        assert all(abs(taken[k] - b * shares[k] / total) < 1 for k in range(len(shares)))
        taken[c] += 1
    for start in (0, 1, total - 1, total, 3 * total + 2):  # from any batch on: the same sequence
        assert _first(schedule, 2 * total, start) == order[start:start + 2 * total]


def test_two_to_one_gives_a_b_a_and_exactly_two_thirds_of_batches_to_a():
    order = _first(Schedule([2, 1]), 300)
    assert order[:6] == [0, 1, 0, 0, 1, 0]
    assert order.count(0) == 200 and order.count(1) == 100
    with pytest.raises(ValueError, match="integer shares >= 1"):
        Schedule([2, 0])


def test_integer_shares_are_exact_and_coprime():
    assert integer_shares([0.4, 0.6]) == [2, 3]
    assert integer_shares([2, 1]) == [2, 1]
    assert integer_shares([20000, 30000]) == [2, 3]
    assert integer_shares([0.1, 0.2, 0.7]) == [1, 2, 7]
    assert integer_shares([3]) == [1]
    with pytest.raises(ValueError, match="must be > 0"):
        integer_shares([1, 0])


# --- the config -------------------------------------------------------------------------------------------

def test_components_merge_their_overlays_onto_the_run_config():
    cfg = load_config(overrides=[
        MIX.replace("{name: a, weight: 2}", "{name: a, teacher: {guider_args: {eta: 0.0}}}"),
        "teacher.guidance=AdaptiveProjectedGuidance", "teacher.guider_args={eta: 0.5, adaptive_projected_guidance_rescale: 10.0}",
        "data.sources=[{kind: digits, weight: 1.0}, {kind: digits, weight: 2.0}]"])
    a, b = components(cfg)
    assert (a.name, b.name) == ("a", "b")
    # a's weight left out: its data.num_samples (3000) against b's 1 -> shares 3000:1
    assert (a.share, b.share) == (3000, 1)
    # guider arguments replace the run's (not merged key by key); another guidance starts from none
    assert a.cfg.teacher.guidance == "AdaptiveProjectedGuidance" and dict(a.cfg.teacher.guider_args) == {"eta": 0.0}
    assert dict(b.cfg.teacher.guider_args) == {}
    assert (b.cfg.teacher.guidance, b.cfg.teacher.guidance_scale, b.cfg.teacher.pag_scale) == ("cfg_pag", 1.5, 2.0)
    assert (b.cfg.data.num_samples, b.cfg.data.base_seed, a.cfg.data.base_seed) == (32, 1, 0)
    assert len(b.cfg.data.sources) == 2 and not b.cfg.data.mixture  # a component's config is one cache's
    assert list(cfg.data.mixture[1].teacher.keys()) == ["guidance", "guidance_scale", "pag_scale"]
    # an overlay's list replaces the run's
    one = load_config(overrides=["data.mixture=[{name: x, data: {sources: [{kind: digits, weight: 3.0}]}}]"])
    assert [s.weight for s in components(one)[0].cfg.data.sources] == [3.0]
    assert component_named(cfg, "b").cfg.teacher.guidance == "cfg_pag"
    with pytest.raises(ValueError, match=r"--component 'c'.*components: a, b"):
        component_named(cfg, "c")


def test_guidance_scales_are_the_mixture_of_one_component_per_scale():
    cfg = load_config(overrides=["data.guidance_scales=[1.5,3.0]", "refiner.guidance_timestep_slope=200"])
    found = components(cfg)
    assert [(c.name, c.share, c.scale) for c in found] == [("1.5", 1, 1.5), ("3.0", 1, 3.0)]
    assert [c.cfg.teacher.guidance_scale for c in found] == [1.5, 3.0]
    assert components(load_config()) == []


@pytest.mark.parametrize("mixture, message", [
    ("[{name: a}, {name: a}]", r"'data.mixture.1.name': 'a' names two components"),
    ("[{name: ''}]", r"'data.mixture.0.name' is ''"),
    ("[{name: 'a/b'}]", r"'data.mixture.0.name' is 'a/b'"),
    ("[{name: a, weight: 0}]", r"'data.mixture.0.weight' must be finite and in \(0, inf\), got 0.0"),
    ("[{name: a, weight: -1}]", r"'data.mixture.0.weight' must be finite"),
    ("[{name: a, data: {cache_root: x}}]", r"'data.mixture.0' \(component 'a'\): its data overlay sets \['cache_root'\]"),
    ("[{name: a, teacher: {nope: 1}}]", r"component 'a'\): bad key 'teacher.nope'"),
    ("[{name: a, teacher: {guidance_scale: -1}}]", r"component 'a'\): config key 'teacher.guidance_scale' must be"),
    ("[{name: a, teacher: {guidance: Nope}}]", r"component 'a'\): config key 'teacher.guidance'"),
    ("[{name: a, data: {num_samples: 0}}]", r"component 'a'\): config key 'data.num_samples' must be >= 1"),
    ("[{name: a, data: {num_samples: 20000000}}]", r"component 'a'\): config key 'eval.seed_offset'"),
])
def test_a_bad_component_is_refused_naming_it_and_the_key(mixture, message):
    with pytest.raises(ValueError, match=message):
        load_config(overrides=[f"data.mixture={mixture}"])


def test_mixture_rules_with_the_run_keys():
    with pytest.raises(ValueError, match="'data.mixture' and 'data.guidance_scales' are both set"):
        load_config(overrides=["data.mixture=[{name: a}]", "data.guidance_scales=[1.5,2]",
                               "refiner.guidance_timestep_slope=100"])
    with pytest.raises(ValueError, match="'data.cache_dir' is 'x' with a data.mixture"):
        load_config(overrides=["data.mixture=[{name: a}]", "data.cache_dir=x"])
    # a refiner told w may learn a mixture (each sample is given its component's scale) ...
    told = load_config(overrides=["data.mixture=[{name: a}, {name: b, teacher: {guidance_scale: 1.5}}]",
                                  "refiner.guidance_timestep_slope=100"])
    assert [c.scale for c in components(told)] == [3.0, 1.5]
    with pytest.raises(ValueError, match=r"component 'b'\) has teacher.guidance_scale=20.*is negative"):
        load_config(overrides=["data.mixture=[{name: a}, {name: b, teacher: {guidance_scale: 20}}]",
                               "refiner.guidance_timestep_slope=100"])
    # ... and without scales or a mixture the slope is still refused
    with pytest.raises(ValueError, match="data.guidance_scales is empty"):
        load_config(overrides=["refiner.guidance_timestep_slope=100"])


# --- the stream on two tiny caches ----------------------------------------------------------------------------

@pytest.fixture(scope="module")
def mix_cfg(tiny_root, tiny_teacher, tiny_cache):
    cfg = tiny_config(tiny_root, tiny_teacher, [MIX])
    for component in components(cfg):
        build_cache(component.cfg)  # a: the session cache (built already); b: built once per session
    return cfg


def _mixture(cfg, rank=0, world=1) -> MixtureStream:
    return MixtureStream.from_config(cfg, rank, world)


@pytest.mark.slow
def test_batches_come_from_their_component_in_the_declared_shares_with_its_teacher(mix_cfg):
    found = {c.name: c for c in components(mix_cfg)}
    batches = list(itertools.islice(iter(_mixture(mix_cfg)), 12))
    assert [b["index"] for b in batches] == list(range(12))
    assert [b["component"][0] for b in batches] == ["a", "b", "a"] * 4  # weights 2:1: exactly 2/3 from a
    singles = {name: list(itertools.islice(iter(TeacherStream.from_config(c.cfg)), 8)) for name, c in found.items()}
    taken = {"a": 0, "b": 0}
    for batch in batches:
        name = batch["component"][0]
        component = found[name]
        expected = singles[name][taken[name]]
        taken[name] += 1
        assert batch["component"] == [name] * 8 and "guidance_scale" not in batch  # a refiner not told w
        # every sample's teacher is its component's: the key its shard recorded (checked by the reader) ...
        assert batch["teacher_key"] == [teacher_key(component.cfg)] * 8
        # ... whose record holds the component's guidance
        record = read_teacher_record(cache_dir_for(component.cfg))
        assert record["teacher_key"] == teacher_key(component.cfg)
        for key in ("guidance", "guidance_scale", "pag_scale"):
            assert record["teacher"][key] == component.cfg.teacher[key]
        assert batch["sample_id"] == expected["sample_id"] and torch.equal(batch["target"], expected["target"])
    assert found["a"].cfg.teacher.guidance == "cfg" and found["b"].cfg.teacher.guidance == "cfg_pag"
    assert teacher_key(found["a"].cfg) != teacher_key(found["b"].cfg)
    # b's samples have other seeds (base seed 1) and other targets: the checks above can fail
    assert batches[0]["seed"] != batches[1]["seed"] and not torch.equal(batches[0]["target"], batches[1]["target"])


@pytest.mark.slow
def test_the_mixture_is_rank_independent_and_resumes_exactly(mix_cfg):
    full = list(itertools.islice(iter(_mixture(mix_cfg)), 14))
    ranks = [list(itertools.islice(iter(_mixture(mix_cfg, r, 2)), 14)) for r in range(2)]
    assert [r0["sample_id"] + r1["sample_id"] for r0, r1 in zip(*ranks)] == [b["sample_id"] for b in full]
    assert all(r0["component"] + r1["component"] == b["component"] for r0, r1, b in zip(*ranks, full))
    for consumed in (1, 2, 5, 9):
        first = _mixture(mix_cfg)
        list(itertools.islice(iter(first), consumed))
        state = json.loads(json.dumps(first.state_dict()))  # as stored in a checkpoint
        assert (state["batches"], sorted(state["shard_rows"])) == (consumed, ["a", "b"])
        assert [len(state["shard_rows"][n]) for n in ("a", "b")] == [4, 2]
        resumed = _mixture(mix_cfg)
        tail = list(itertools.islice(resumed.batches(resumed.load_state_dict(state)), 14 - consumed))
        assert [(b["index"], b["component"], b["sample_id"]) for b in tail] == \
            [(b["index"], b["component"], b["sample_id"]) for b in full[consumed:]]
        assert all(torch.equal(a["target"], b["target"]) for a, b in zip(tail, full[consumed:]))
    elastic = _mixture(mix_cfg, 1, 2)  # a 1-rank state continued by rank 1 of 2
    state = elastic.elastic_state([json.loads(json.dumps(_mixture(mix_cfg).state_dict()))], 1)
    assert next(elastic.batches(elastic.load_state_dict(state)))["sample_id"] == full[0]["sample_id"][4:]
    with pytest.raises(ValueError, match=r"records no shards for component 'b' \(it has \['a'\]\)"):
        _mixture(mix_cfg).load_state_dict({"batches": 3, "shard_rows": {"a": state["shard_rows"]["a"]}})


@pytest.mark.slow
def test_a_refiner_told_w_gets_each_samples_component_scale(mix_cfg, tiny_root, tiny_teacher):
    cfg = tiny_config(tiny_root, tiny_teacher, [MIX, "refiner.guidance_timestep_slope=100"])
    for batch in itertools.islice(iter(_mixture(cfg)), 3):
        w = 3.0 if batch["component"][0] == "a" else 1.5
        assert batch["guidance_scale"].dtype == torch.float32 and batch["guidance_scale"].tolist() == [w] * 8


@pytest.mark.slow
def test_a_missing_component_cache_names_it_and_the_command(mix_cfg, tiny_root, tiny_teacher):
    cfg = tiny_config(tiny_root, tiny_teacher, [MIX.replace("num_samples: 32", "num_samples: 48")
                                                .replace("base_seed: 1", "base_seed: 7")])
    with pytest.raises(FileNotFoundError, match=r"component 'b' of data.mixture \(`python pipeline/generate_targets"
                                                r".py --config <same config> --component b`"):
        _mixture(cfg).describe()
    same = tiny_config(tiny_root, tiny_teacher, ["data.mixture=[{name: a}, {name: c, weight: 3}]"])
    with pytest.raises(ValueError, match="components 'a' and 'c' of data.mixture have the same cache"):
        _mixture(same)


@pytest.mark.slow
def test_a_multi_scale_checkpoint_of_format_4_resumes_as_the_mixture_of_its_scales(tiny_root, tiny_teacher,
                                                                                    tiny_cache):
    """Format 4's multi-scale data state (rows keyed by repr(w), a position in global batches), as its
    MultiScaleStream wrote it, continues where that stream would have (batch b: scale b % 2, its batch b // 2)."""

    from noiserefine.mixture import at_guidance_scale
    from noiserefine.targets.cache import open_cache
    from noiserefine.train.streams import open_stream

    cfg = tiny_config(tiny_root, tiny_teacher, ["data.guidance_scales=[1.5,3.0]", "refiner.guidance_timestep_slope=200"])
    build_cache(at_guidance_scale(cfg, 1.5))
    rows = {repr(w): [r.to_dict() for r in open_cache(at_guidance_scale(cfg, w))[1].values()] for w in (1.5, 3.0)}
    stream = open_stream(cfg, 0, 1)
    batches = list(itertools.islice(stream.batches(stream.load_state_dict(
        {"batches": 5, "corrupt_skipped": 2, "shard_rows": rows})), 2))
    singles = {w: list(itertools.islice(iter(TeacherStream.from_config(at_guidance_scale(cfg, w))), 4))
               for w in (1.5, 3.0)}
    assert [b["index"] for b in batches] == [5, 6] and stream.corrupt_skipped == 2
    assert batches[0]["guidance_scale"].tolist() == [3.0] * 8 and batches[0]["sample_id"] == singles[3.0][2]["sample_id"]
    assert batches[1]["guidance_scale"].tolist() == [1.5] * 8 and batches[1]["sample_id"] == singles[1.5][3]["sample_id"]
    assert torch.equal(batches[1]["target"], singles[1.5][3]["target"])
    assert stream.state_dict()["shard_rows"] == rows


def test_the_generator_generates_one_component_per_call():
    import importlib.util

    from helpers_cache import REPO

    spec = importlib.util.spec_from_file_location("generate_targets", REPO / "pipeline" / "generate_targets.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    mix_cfg = load_config(overrides=[MIX])
    assert module.target_config(mix_cfg, "b") == components(mix_cfg)[1].cfg
    with pytest.raises(ValueError, match=r"data mixture \(data.mixture: a, b\).*--component NAME"):
        module.target_config(mix_cfg, None)
    with pytest.raises(ValueError, match=r"--component 'z'"):
        module.target_config(mix_cfg, "z")
    plain = load_config()
    assert module.target_config(plain, None) is plain


def test_a_checkpoint_config_from_before_the_mixture_key_is_the_same_config():
    """Checkpoints (and done.json) written before ``data.mixture`` existed store no such key: it meant no mixture,
    the default, so a run resumed with today's trainer is not refused as "another config" (it was, for every run)."""
    from omegaconf import OmegaConf

    from noiserefine.train.checkpoint import resume_mismatch

    current = OmegaConf.to_container(load_config(overrides=["data.guidance_scales=[1.5,3.0]",
                                                            "refiner.guidance_timestep_slope=200"]), resolve=True)
    stored = json.loads(json.dumps(current))
    del stored["data"]["mixture"]
    assert resume_mismatch(stored, current) == []
    stored["data"]["guidance_scales"] = [1.5, 2.0]  # a real difference is still one
    assert resume_mismatch(stored, current) == ["data.guidance_scales"]
    mixed = OmegaConf.to_container(load_config(overrides=["data.mixture=[{name: a}]",
                                                          "refiner.guidance_timestep_slope=200"]), resolve=True)
    assert resume_mismatch(stored | {"data": {**stored["data"], "guidance_scales": []}}, mixed) == ["data.mixture"]

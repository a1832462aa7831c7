"""A data mixture trained, killed and resumed: the refiner of the uninterrupted run, on the same global sequence.

Two components on tiny caches (``tests/test_mixture.py``'s: a = the session cache at CFG 3, weight 2;
b = CFG 1.5 + PAG 2, 32 samples of base seed 1, weight 1), global batch 8, 6 steps, a checkpoint every 2.
Phase 1 at once: an uninterrupted 1-rank and 2-rank run, a 1-rank run SIGKILLed at step 5 and a 2-rank run
whose rank 1 is SIGKILLed at step 5 (both after the step-4 checkpoint). Phase 2: the 1-rank run resumed
on 1 rank (bit for bit the uninterrupted run), the 2-rank run resumed on 1 rank (elastic: the 2-rank
run's refiner up to float rounding). Also: the generator's ``--component`` finds b's cache complete (keyed
as one cache), and the refiner's ``config.yaml`` records the mixture and samples.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from helpers_cache import build_cache, tiny_config, tiny_overrides
from noiserefine.mixture import components
from noiserefine.targets.cache import cache_dir_for
from noiserefine.train.distributed import free_port
from faults.test_elastic import assert_same_refiner, global_sequence, wait
from test_mixture import MIX
from test_trainer import REPO, child_env, train_args

pytestmark = pytest.mark.slow
SETTINGS = ["train.max_steps=6", "train.checkpoint_every=2", "train.log_every=1", "train.eval_every=0",
            "train.learning_rate=0.01", "train.global_batch_size=8", MIX]


def launch(root, teacher, out: Path, world: int, log: Path, **env: str) -> list[subprocess.Popen]:
    port, procs = str(free_port()), []
    for rank in range(world):
        ranks = {} if world == 1 else {"RANK": str(rank), "WORLD_SIZE": str(world), "LOCAL_RANK": str(rank),
                                       "LOCAL_SIZE": str(world), "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": port}
        handle = open(log.with_suffix(f".rank{rank}.log"), "w")
        procs.append(subprocess.Popen([sys.executable] + train_args(root, teacher, out, *SETTINGS), cwd=REPO,
                                      env=child_env(**ranks, **env), stdout=handle, stderr=subprocess.STDOUT,
                                      text=True))
    return procs


@pytest.fixture(scope="module")
def runs(tiny_root, tiny_teacher, tiny_cache, tmp_path_factory) -> dict:
    for component in components(tiny_config(tiny_root, tiny_teacher, [MIX])):
        build_cache(component.cfg)
    base = tmp_path_factory.mktemp("mixture")
    phase1 = {"one": launch(tiny_root, tiny_teacher, base / "one", 1, base / "one"),
              "killed": launch(tiny_root, tiny_teacher, base / "killed", 1, base / "killed",
                               NOISEREFINE_TRAIN_KILL_RANK="0:5"),
              "two": launch(tiny_root, tiny_teacher, base / "two", 2, base / "two"),
              "two_killed": launch(tiny_root, tiny_teacher, base / "two_killed", 2, base / "two_killed",
                                   NOISEREFINE_TRAIN_KILL_RANK="1:5")}
    results = {name: wait(procs, base / name) for name, procs in phase1.items()}
    results["resumed"] = wait(launch(tiny_root, tiny_teacher, base / "killed", 1, base / "resumed"), base / "resumed")
    results["elastic"] = wait(launch(tiny_root, tiny_teacher, base / "two_killed", 1, base / "elastic"),
                              base / "elastic")
    return {"base": base, **results}


def _components_per_step(out: Path) -> list[list[str]]:
    return [json.loads(line)["components"] for line in (out / "samples_rank0.jsonl").read_text().splitlines()]


def test_a_mixture_killed_and_resumed_gives_the_uninterrupted_refiner(runs):
    base = runs["base"]
    assert runs["one"][0] == [0], runs["one"][1][-4000:]
    assert runs["killed"][0] == [-9], runs["killed"][1][-4000:]
    assert "test hook: SIGKILL to rank 0 at step 5" in runs["killed"][1]
    codes, text = runs["resumed"]
    assert codes == [0] and "resuming from" in text and "step00000004" in text, text[-4000:]
    assert "data mixture of 2 teacher caches: a (share 2)" in text and "b (share 1)" in text, text[-4000:]
    assert _components_per_step(base / "one") == [["a"], ["b"], ["a"]] * 2  # weights 2:1
    assert (base / "killed" / "samples_rank0.jsonl").read_text() == (base / "one" / "samples_rank0.jsonl").read_text()
    a = load_file(str(base / "one" / "refiner" / "refiner.safetensors"))
    b = load_file(str(base / "killed" / "refiner" / "refiner.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert any(v.abs().sum() > 0 for k, v in a.items() if "lora_B" in k)  # it did train
    state = torch.load(base / "one" / "checkpoints" / "step00000006" / "mp_rank_00_model_states.pt",
                       map_location="cpu", weights_only=False)  # ours
    rows = state["states"]["data"][0]["shard_rows"]
    assert sorted(rows) == ["a", "b"] and [len(rows["a"]), len(rows["b"])] == [4, 2]


def test_a_mixture_on_two_ranks_killed_and_resumed_on_one_matches_the_two_rank_run(runs):
    base = runs["base"]
    assert runs["two"][0] == [0, 0], runs["two"][1][-4000:]
    codes, text = runs["two_killed"]
    assert codes[1] == -9 and codes[0] != 0, text[-4000:]
    codes, text = runs["elastic"]
    assert codes == [0], text[-4000:]
    assert "elastic resume: step00000004 was written by 2 rank(s), this run has 1" in text, text[-3000:]
    assert global_sequence(base / "two_killed") == global_sequence(base / "two")
    assert global_sequence(base / "two") == global_sequence(base / "one")  # one order for every rank count
    assert_same_refiner(base / "two", base / "two_killed")


def test_the_refiner_records_the_mixture_and_samples(runs, tmp_path):
    from noiserefine.config import load_config
    from noiserefine.sample import main as sample_main

    refiner = runs["base"] / "one" / "refiner"
    saved = load_config(refiner / "config.yaml")
    assert [(c.name, c.share, c.cfg.teacher.guidance) for c in components(saved)] == [("a", 2, "cfg"),
                                                                                      ("b", 1, "cfg_pag")]
    assert sample_main(["--refiner", str(refiner), "--out", str(tmp_path / "samples"), "--prompt",
                        "a handwritten one", "--seeds", "0-1", "--no-progress"]) == 0
    assert json.loads((tmp_path / "samples" / "sample.json").read_text())["seeds"] == [0, 1]


def test_the_generator_finds_a_components_cache_keyed_as_one_cache(tiny_root, tiny_teacher, tiny_cache):
    """``--component b`` of the run's config: b's cache, already complete (built as one cache), nothing generated."""
    cfg = tiny_config(tiny_root, tiny_teacher, [MIX])
    build_cache(components(cfg)[1].cfg)
    result = subprocess.run([sys.executable, "pipeline/generate_targets.py", "--config", "configs/digits.yaml",
                             "--component", "b", *tiny_overrides(tiny_root, tiny_teacher), MIX,
                             "pipeline.num_workers=0"], cwd=REPO, env=child_env(), capture_output=True, text=True,
                            timeout=600)
    assert result.returncode == 0, (result.stdout + result.stderr)[-4000:]
    lines = result.stdout.strip().splitlines()
    assert lines[-1] == str(cache_dir_for(components(cfg)[1].cfg))
    assert "2/2 shards complete, 0 to generate" in result.stdout, result.stdout[-2000:]
    refused = subprocess.run([sys.executable, "pipeline/generate_targets.py", "--config", "configs/digits.yaml",
                              *tiny_overrides(tiny_root, tiny_teacher), MIX], cwd=REPO, env=child_env(),
                             capture_output=True, text=True, timeout=600)
    assert refused.returncode != 0 and "generate each with --component NAME" in refused.stderr, refused.stderr[-2000:]

"""Cache identity by content (``targets/identity.py``): what changes the teacher key and what does not."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
from omegaconf import OmegaConf

from conftest import tiny_digits_backend
from noiserefine.config import load_config
from noiserefine.targets import identity
from noiserefine.targets.cache import prepare_cache_dir
from noiserefine.hashing import tree_sha256
from noiserefine.targets.identity import teacher_key

REPO = Path(__file__).resolve().parents[1]
DIGITS = REPO / "configs" / "digits.yaml"


@pytest.fixture(autouse=True)
def private_hash_memo(tmp_path, monkeypatch):
    monkeypatch.setenv("NOISEREFINE_HASH_CACHE", str(tmp_path / "memo" / "file_hashes.json"))
    identity._memo_in_process.clear()


@pytest.fixture
def model_dir(tmp_path) -> Path:
    directory = tmp_path / "teacher"
    tiny_digits_backend(seed=0).save_pretrained(directory)
    return directory


def key(model: Path, *overrides: str) -> str:
    identity._memo_in_process.clear()  # as a new process would
    return teacher_key(load_config(DIGITS, [f"model.path={model}", *overrides]))


@pytest.mark.parametrize("override", ["teacher.guidance_scale=4.5", "teacher.num_steps=20", "teacher.guidance=cfg_pag",
                                      "data.base_seed=3", "data.target_dtype=float32", "data.shard_size=7",
                                      "model.dtype=bfloat16", "data.max_prompt_chars=5"])
def test_key_changes_with_what_determines_targets(model_dir, override):
    assert key(model_dir, override) != key(model_dir)


def test_key_of_a_guider_named_by_class_is_its_class_and_saved_config(model_dir):
    apg = ["teacher.guidance=AdaptiveProjectedGuidance", "teacher.guider_args={eta: 0.0}"]
    assert key(model_dir, *apg) != key(model_dir, "teacher.guidance=AdaptiveProjectedGuidance")  # an argument
    assert key(model_dir, *apg) != key(model_dir, "teacher.guidance=TangentialClassifierFreeGuidance")  # the class
    assert key(model_dir, *apg, "teacher.guidance_scale=4") != key(model_dir, *apg)
    assert key(model_dir, *apg, "teacher.pag_scale=1") == key(model_dir, *apg)  # not an argument of APG
    guider = identity.teacher_record(load_config(DIGITS, [f"model.path={model_dir}", *apg]))["teacher"]["guider"]
    assert guider["class"] == "AdaptiveProjectedGuidance" and guider["config"]["eta"] == 0.0


@pytest.mark.parametrize("form", ["cfg", "cfg_pag"])
def test_short_forms_keep_the_record_and_key_of_before_guiders(model_dir, form):
    """Existing caches keep their key: the record's teacher part is the teacher section as it was
    before ``teacher.guider_args`` existed."""
    cfg = load_config(DIGITS, [f"model.path={model_dir}", f"teacher.guidance={form}"])
    teacher = OmegaConf.to_container(cfg.teacher, resolve=True)
    assert teacher.pop("guider_args") == {}
    assert identity.teacher_record(cfg)["teacher"] == teacher


@pytest.mark.parametrize("override", ["train.max_steps=5", "train.learning_rate=0.1", "student.num_steps=3",
                                      "refiner.lora_rank=2", "pipeline.num_workers=7", "data.num_samples=10",
                                      "eval.num_samples=3", "train.loss=noise_space", "model.device=cuda",
                                      "pipeline.batch_size=5", "model.digits.train_steps=3"])
def test_key_ignores_what_does_not(model_dir, override):
    assert key(model_dir, override) == key(model_dir)


def test_model_by_content_not_by_path(model_dir, tmp_path):
    moved = tmp_path / "elsewhere" / "moved-teacher"
    shutil.copytree(model_dir, moved)
    assert key(moved) == key(model_dir)
    (moved / "notes.md").write_text("a note is not the model")
    assert key(moved) == key(model_dir)
    tiny_digits_backend(seed=1).save_pretrained(moved)  # retrained in place: other weights, same path
    assert key(moved) != key(model_dir)


def test_prompt_file_by_content_not_by_path(model_dir, tmp_path):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a handwritten seven\na cat\n")
    source = "data.sources=[{kind: text, path: %s, weight: 1.0}]"
    original = key(model_dir, source % prompts)
    moved = tmp_path / "moved.txt"
    shutil.copy(prompts, moved)
    assert key(model_dir, source % moved) == original
    prompts.write_text("a handwritten seven\na dog\n")  # edited in place
    assert key(model_dir, source % prompts) != original


def test_file_hashes_are_memoised_by_path_size_mtime(model_dir, monkeypatch):
    first = tree_sha256(model_dir)
    calls = []
    real_open = open

    def counting_open(path, *args, **kwargs):
        if str(path).endswith(".safetensors"):
            calls.append(path)
        return real_open(path, *args, **kwargs)

    monkeypatch.setattr("builtins.open", counting_open)
    assert tree_sha256(model_dir) == first and calls == []
    weights = next(model_dir.rglob("*.safetensors"))
    weights.write_bytes(weights.read_bytes())  # same bytes, new mtime: hashed again, same result
    assert tree_sha256(model_dir) == first and calls == [weights]


def test_missing_model_names_the_path(tmp_path):
    with pytest.raises(FileNotFoundError, match="no-such-model"):
        key(tmp_path / "no-such-model")


def test_generation_batch_size_is_pinned_per_cache(model_dir, tmp_path):
    base = [f"model.path={model_dir}", f"data.cache_root={tmp_path / 'cache'}"]
    cache_dir = prepare_cache_dir(load_config(DIGITS, [*base, "pipeline.batch_size=4"]))
    assert prepare_cache_dir(load_config(DIGITS, [*base, "pipeline.batch_size=4"])) == cache_dir
    with pytest.raises(ValueError, match=r"generated with \{'batch_size': 4\}.*pipeline.batch_size"):
        prepare_cache_dir(load_config(DIGITS, [*base, "pipeline.batch_size=5"]))

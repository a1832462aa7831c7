"""Quality-filtered targets: scores in the shards and the manifest, the data.min_score filter, the scorers."""

from __future__ import annotations

import itertools
import json
from pathlib import Path

import numpy as np
import pytest
import torch

from helpers_cache import build_cache, tiny_config, tiny_teacher  # noqa: F401
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


# --- the digit classifier's confidence (the embedded default's scorer) -------------------------------------------
def _save_classifier(directory: Path, classifier) -> Path:
    from safetensors.torch import save_file

    directory.mkdir(parents=True, exist_ok=True)
    state = {k: v.contiguous() for k, v in classifier.state_dict().items()}
    save_file(state, str(directory / "classifier.safetensors"))
    return directory


def test_digit_confidence_is_the_probability_of_the_prompted_digit(tmp_path):
    from types import SimpleNamespace

    from noiserefine.digits.classifier import DigitClassifier
    from noiserefine.scoring import load_scorer

    probabilities = torch.tensor([0.02, 0.03, 0.05, 0.4, 0.1, 0.05, 0.05, 0.2, 0.05, 0.05], dtype=torch.float64)
    fixed = DigitClassifier()
    with torch.no_grad():  # no weights: the logits are the bias whatever the image, so P(digit) is known exactly
        for parameter in fixed.parameters():
            parameter.zero_()
        fixed.fc2.bias.copy_(probabilities.log())
    cfg = SimpleNamespace(kind="digit_confidence", path=str(_save_classifier(tmp_path / "fixed", fixed)), clip_path="")
    scorer = load_scorer(cfg)
    images = torch.rand(3, 1, 16, 16, generator=torch.Generator().manual_seed(0))
    scores = scorer.score(images, ["a handwritten three", "a handwritten 7", "a handwritten zero"])
    assert scores == pytest.approx([0.4, 0.2, 0.02], abs=1e-6)
    with pytest.raises(ValueError, match="prompt 'a cat' names none"):
        scorer.score(images[:1], ["a cat"])

    torch.manual_seed(1)  # an image-dependent classifier: each row's score is its own prompted digit's probability
    random = DigitClassifier().eval()
    scorer = load_scorer(SimpleNamespace(kind="digit_confidence", path=str(_save_classifier(tmp_path / "r", random)),
                                         clip_path=""))
    probs = torch.softmax(random(images).double(), dim=1)
    assert scorer.score(images, ["one", "five", "nine"]) == pytest.approx(
        [probs[0, 1].item(), probs[1, 5].item(), probs[2, 9].item()])


def test_digit_confidence_refuses_a_missing_or_foreign_classifier(tmp_path):
    from types import SimpleNamespace

    from safetensors.torch import save_file

    from noiserefine.scoring import load_scorer

    with pytest.raises(FileNotFoundError, match=r"scorer.path '.*nothing' holds no classifier.safetensors"):
        load_scorer(SimpleNamespace(kind="digit_confidence", path=str(tmp_path / "nothing"), clip_path=""))
    (tmp_path / "foreign").mkdir()
    save_file({"fc2.weight": torch.zeros(3, 3)}, str(tmp_path / "foreign" / "classifier.safetensors"))
    with pytest.raises(ValueError, match=r"foreign/classifier.safetensors: not a digit classifier's weights"):
        load_scorer(SimpleNamespace(kind="digit_confidence", path=str(tmp_path / "foreign"), clip_path=""))


# --- the LAION aesthetic predictor (tiny random CLIP and head) ------------------------------------------------------
EMBED = 8  # the tiny CLIP's projection_dim (ViT-L/14's is 768)


def _released_layout(embedding_dim: int) -> torch.nn.Sequential:
    """The head as improved-aesthetic-predictor's simple_inference.py writes it (``MLP.layers``)."""
    nn = torch.nn
    return nn.Sequential(nn.Linear(embedding_dim, 1024), nn.Dropout(0.2), nn.Linear(1024, 128), nn.Dropout(0.2),
                         nn.Linear(128, 64), nn.Dropout(0.1), nn.Linear(64, 16), nn.Linear(16, 1))


@pytest.fixture(scope="module")
def aesthetic_files(tmp_path_factory):
    from safetensors.torch import save_file
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel

    root = tmp_path_factory.mktemp("aesthetic")
    torch.manual_seed(0)
    text = dict(vocab_size=64, hidden_size=8, intermediate_size=16, num_hidden_layers=1, num_attention_heads=2,
                max_position_embeddings=16, bos_token_id=0, eos_token_id=1, pad_token_id=1)
    vision = dict(hidden_size=8, intermediate_size=16, num_hidden_layers=1, num_attention_heads=2, image_size=32,
                  patch_size=8)
    CLIPModel(CLIPConfig(text_config=text, vision_config=vision, projection_dim=EMBED)).save_pretrained(root / "clip")
    CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}).save_pretrained(root / "clip")
    released = torch.nn.Module()
    released.layers = _released_layout(EMBED)
    state = {k: v.contiguous() for k, v in released.state_dict().items()}
    save_file(state, str(root / "head.safetensors"))
    torch.save(state, root / "head.pth")
    return root, released.eval()


@pytest.mark.slow  # transformers' import and a CLIP forward: a few seconds
def test_aesthetic_scorer_loads_local_files_and_scores_as_the_reference(aesthetic_files):
    from types import SimpleNamespace

    from transformers import CLIPImageProcessor, CLIPModel

    from noiserefine.scoring import load_scorer, scorer_identity

    root, released = aesthetic_files
    images = torch.rand(3, 3, 40, 40, generator=torch.Generator().manual_seed(2))
    cfg = SimpleNamespace(kind="aesthetic", path=str(root / "head.safetensors"), clip_path=str(root / "clip"))
    scores = load_scorer(cfg).score(images, ["a", "b", "c"])
    # the reference: CLIP image embedding, L2-normalised, through the released MLP
    clip = CLIPModel.from_pretrained(root / "clip", local_files_only=True).eval()
    processor = CLIPImageProcessor.from_pretrained(root / "clip", local_files_only=True)
    pixels = [(image * 255).round().to(torch.uint8).permute(1, 2, 0).numpy() for image in images]
    with torch.no_grad():
        output = clip.get_image_features(pixel_values=processor(images=pixels, return_tensors="pt")["pixel_values"])
        embedding = output if torch.is_tensor(output) else output.pooler_output
        expected = released.layers(embedding / embedding.norm(dim=-1, keepdim=True)).squeeze(-1)
    assert scores == pytest.approx(expected.tolist(), rel=1e-5, abs=1e-6)
    assert len(set(scores)) == 3  # the images are told apart
    pth = SimpleNamespace(kind="aesthetic", path=str(root / "head.pth"), clip_path=str(root / "clip"))
    assert load_scorer(pth).score(images, ["a", "b", "c"]) == pytest.approx(scores, rel=1e-6)
    grey = load_scorer(cfg).score(images[:, :1], ["a", "b", "c"])  # a grey image is scored as its RGB repeat
    assert grey == pytest.approx(load_scorer(cfg).score(images[:, :1].repeat(1, 3, 1, 1), ["a", "b", "c"]))
    identity = scorer_identity(cfg)
    assert identity["kind"] == "aesthetic" and len(identity["path_sha256"]) == len(identity["clip_path_sha256"]) == 64
    assert scorer_identity(pth)["path_sha256"] != identity["path_sha256"]


@pytest.mark.slow  # transformers' import
def test_aesthetic_scorer_refuses_a_head_of_another_layout(aesthetic_files, tmp_path):
    from types import SimpleNamespace

    from safetensors.torch import save_file

    from noiserefine.scoring import load_scorer

    root, released = aesthetic_files
    state = {k: v.contiguous() for k, v in released.state_dict().items()}

    def load(path):
        return load_scorer(SimpleNamespace(kind="aesthetic", path=str(path), clip_path=str(root / "clip")))

    save_file({k: v for k, v in state.items() if k != "layers.7.bias"}, str(tmp_path / "short.safetensors"))
    with pytest.raises(ValueError, match=r"short.safetensors: not an improved-aesthetic-predictor head: missing key "
                                         r"'layers.7.bias'"):
        load(tmp_path / "short.safetensors")
    relu = torch.nn.Sequential(*[m for m in _released_layout(EMBED)][:1], torch.nn.ReLU(), *_released_layout(EMBED)[1:])
    save_file({f"layers.{k}": v.contiguous() for k, v in relu.state_dict().items()}, str(tmp_path / "relu.safetensors"))
    with pytest.raises(ValueError, match=r"relu.safetensors: .*(missing|unexpected) key 'layers\.\d\.(weight|bias)'"):
        load(tmp_path / "relu.safetensors")
    wide = torch.nn.Module()
    wide.layers = _released_layout(768)  # the real ViT-L/14 head against the tiny CLIP
    torch.save(wide.state_dict(), tmp_path / "vit-l.pth")
    with pytest.raises(ValueError, match=r"vit-l.pth: key 'layers.0.weight' has shape \(1024, 768\), expected "
                                         r"\(1024, 8\)"):
        load(tmp_path / "vit-l.pth")
    torch.save({"layers.0.weight": Path("x")}, tmp_path / "pickled.pth")  # an object: weights_only refuses it
    with pytest.raises(ValueError, match=r"pickled.pth: not a plain state dict of tensors"):
        load(tmp_path / "pickled.pth")
    with pytest.raises(FileNotFoundError, match=r"scorer.clip_path '.*nowhere' is not a local directory"):
        load_scorer(SimpleNamespace(kind="aesthetic", path=str(root / "head.pth"), clip_path=str(tmp_path / "nowhere")))


# --- the teacher job scores, the trainer filters (the tiny digit teacher) ------------------------------------------
@pytest.fixture(scope="module")
def scored_digits(tmp_path_factory, tiny_teacher):
    from noiserefine.digits.classifier import DigitClassifier

    root = tmp_path_factory.mktemp("scored-digits")
    torch.manual_seed(3)
    classifier = _save_classifier(root / "classifier", DigitClassifier().eval())
    extra = ["data.num_samples=24", "data.shard_size=8", "pipeline.batch_size=8", "scorer.kind=digit_confidence",
             f"scorer.path={classifier}"]
    cfg = tiny_config(root, tiny_teacher, extra)
    return cfg, build_cache(cfg), root, extra


def test_the_teacher_job_stores_the_classifier_confidence_of_each_stored_target(scored_digits):
    from noiserefine.backends.digits import parse_digit
    from noiserefine.digits.classifier import DigitClassifier
    from safetensors.torch import load_file

    cfg, cache_dir, root, _ = scored_digits
    manifest = read_manifest(cache_dir)
    assert len(manifest) == 3
    classifier = DigitClassifier().eval()
    classifier.load_state_dict(load_file(str(root / "classifier" / "classifier.safetensors")))
    for name, info in manifest.items():
        samples = list(read_shard(cache_dir / name))
        assert info.scores == tuple(s.meta["score"] for s in samples)
        targets = torch.stack([torch.from_numpy(s.arrays["target"].astype(np.float32)) for s in samples])
        with torch.no_grad():  # the digits backend decodes x to (x + 1) / 2 in [0, 1]
            probs = torch.softmax(classifier(((targets + 1) / 2).clamp(0, 1)).double(), dim=1)
        digits = [parse_digit(s.meta["prompt"]) for s in samples]
        assert list(info.scores) == pytest.approx([probs[i, d].item() for i, d in enumerate(digits)], abs=1e-6)
    assert len({s for info in manifest.values() for s in info.scores}) == 24


def test_the_scorer_is_pinned_per_cache_and_not_part_of_the_key(scored_digits, tiny_teacher):
    import yaml

    from noiserefine.hashing import tree_sha256
    from noiserefine.targets.cache import hold_cache
    from noiserefine.targets.identity import teacher_key

    cfg, cache_dir, root, extra = scored_digits
    pinned = yaml.safe_load((cache_dir / "teacher.yaml").read_text())["generation"]
    assert pinned == {"batch_size": 8, "scorer": {"kind": "digit_confidence",
                                                  "path_sha256": tree_sha256(root / "classifier")}}
    unscored = tiny_config(root, tiny_teacher, extra[:3])
    assert teacher_key(unscored) == teacher_key(cfg)  # the same teacher: the same key and directory
    with pytest.raises(ValueError, match=r"teacher.yaml: this cache was generated with .*'scorer': \{'kind': "
                                         r"'digit_confidence'.*this run has \{'batch_size': 8\}"):
        with hold_cache(unscored):
            pass


def test_the_trainer_keeps_by_data_min_score_without_regenerating(scored_digits, tiny_teacher):
    cfg, cache_dir, root, extra = scored_digits
    before = {p.name: p.stat().st_mtime_ns for p in cache_dir.iterdir()}
    scores = {i * 8 + row: score for name, info in sorted(read_manifest(cache_dir).items())
              for i, row, score in [(int(name[6:12]), r, s) for r, s in enumerate(info.scores)]}
    threshold = sorted(scores.values())[4]  # drop the bottom 20% (4 of 24; the scores are distinct)
    filtered = tiny_config(root, tiny_teacher, extra + [f"data.min_score={threshold}"])
    stream = TeacherStream.from_config(filtered)
    kept = {i for i, s in scores.items() if s >= threshold}
    assert stream.samples_per_epoch == len(kept) == 20
    ids = [i for b in itertools.islice(iter(stream), 5) for i in b["sample_id"]]  # 5 x 8 = two epochs
    assert sorted(ids[:20]) == sorted(ids[20:]) == sorted(kept)
    assert "(scored >= " in stream.describe()
    assert {p.name: p.stat().st_mtime_ns for p in cache_dir.iterdir()} == before  # nothing regenerated


def test_a_scored_shard_adopted_after_a_crash_keeps_its_scores(scored_digits, tmp_path):
    """The job died between a shard's rename and its manifest row: the re-run adopts it, with its scores."""
    import shutil

    from noiserefine.targets.plan import Plan
    from noiserefine.targets.scan import scan_cache

    cfg, cache_dir, _, _ = scored_digits
    copy = shutil.copytree(cache_dir, tmp_path / "cache")
    manifest = read_manifest(copy)
    lost = manifest.pop("shard-000001.tar")
    write_manifest(copy, list(manifest.values()))
    state = scan_cache(copy, Plan.from_config(cfg.data))
    assert state.adopted == [lost.name] and not state.missing
    assert read_manifest(copy)[lost.name] == lost and lost.scores is not None

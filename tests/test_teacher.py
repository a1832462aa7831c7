"""The embedded default teacher's recipe (at 200 of its 800 steps: see conftest) shows a clear guidance effect."""


import pytest
import torch
from diffusers.guiders import ClassifierFreeGuidance

from conftest import REPO
from noiserefine.backends.digits import DigitsBackend, parse_digit
from noiserefine.digits.teacher import train_digits_teacher
from noiserefine.config import load_config
from noiserefine.evaluation.rows import eval_set, sample_row, score_rows
from noiserefine.digits.classifier import DigitMetrics, load_or_train_classifier

pytestmark = pytest.mark.slow  # subprocesses, Ray, DeepSpeed or teacher training: `make test` only


def test_parse_digit():
    assert parse_digit("a handwritten seven") == 7
    assert parse_digit("A Handwritten Digit 3") == 3
    assert parse_digit("Nine.") == 9
    assert parse_digit("a cat") is None
    assert parse_digit("someone") is None  # "one" inside a word is not a digit


def test_teacher_weights_do_not_depend_on_the_progress_bar(tmp_path):
    """The EMA decay follows the step count, not the bar's counter (tqdm updates that only when it redraws)."""
    settings = load_config(overrides=["model.digits.train_steps=12", "model.digits.batch_size=8",
                                      "model.digits.block_out_channels=[8,16,16]"]).model.digits
    quiet = DigitsBackend.from_pretrained(train_digits_teacher(settings, tmp_path / "quiet", progress=False))
    shown = DigitsBackend.from_pretrained(train_digits_teacher(settings, tmp_path / "shown", progress=True))
    a, b = quiet.denoiser.state_dict(), shown.denoiser.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert torch.equal(quiet.embedding, shown.embedding)


def test_unknown_prompt_gets_null_conditioning(trained_teacher_dir):
    backend = DigitsBackend.from_pretrained(trained_teacher_dir)
    cond = backend.encode_prompts(["a cat", "seven"])["encoder_hidden_states"]
    null = backend.null_conditioning(1)["encoder_hidden_states"]
    assert torch.equal(cond[0], null[0])
    assert not torch.equal(cond[1], null[0])


def test_teacher_shows_clear_guidance_effect(trained_teacher_dir, tmp_path_factory):
    cfg = load_config(REPO / "configs" / "digits.yaml", ["eval.num_samples=300"])
    backend = DigitsBackend.from_pretrained(trained_teacher_dir)
    metrics = DigitMetrics(load_or_train_classifier(tmp_path_factory.mktemp("classifier")))
    evals = eval_set(cfg)
    rows = [sample_row("unguided", backend, evals, cfg.student.num_steps),
            sample_row("cfg1.25", backend, evals, cfg.student.num_steps, guidance=ClassifierFreeGuidance(guidance_scale=1.25)),
            sample_row("cfg3", backend, evals, cfg.student.num_steps, guidance=ClassifierFreeGuidance(guidance_scale=3.0))]
    score_rows(rows, backend, evals, metrics)
    unguided, mild, guided = rows[0].metrics, rows[1].metrics, rows[2].metrics
    print(f"unguided {unguided}\nmild {mild}\nguided {guided}")
    assert unguided["accuracy"] > 0.5, "the teacher must have learnt the digits at all"
    # strong guidance at least halves the share of wrong digits; mild guidance improves the
    # class-conditional FID (the regime the demo's sweep picks its guidance scale from)
    assert 1 - guided["accuracy"] <= 0.5 * (1 - unguided["accuracy"])
    assert mild["fid_class"] < 0.95 * unguided["fid_class"]


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
def test_teacher_saves_the_prediction_type_it_was_trained_for(tmp_path, prediction_type):
    settings = load_config(overrides=["model.digits.train_steps=2", "model.digits.batch_size=4",
                                      "model.digits.block_out_channels=[8,16,16]",
                                      f"model.digits.prediction_type={prediction_type}"]).model.digits
    backend = DigitsBackend.from_pretrained(train_digits_teacher(settings, tmp_path / "t", progress=False))
    assert backend.scheduler_config["prediction_type"] == prediction_type


def test_teacher_refuses_an_unknown_prediction_type(tmp_path):
    settings = load_config(overrides=["model.digits.prediction_type=sample"]).model.digits
    with pytest.raises(ValueError, match="prediction_type"):
        train_digits_teacher(settings, tmp_path / "t", progress=False)
    assert not (tmp_path / "t").exists()


def _flat(state: dict) -> torch.Tensor:
    return torch.cat([state[k].flatten().float() for k in sorted(state)])


def test_two_threads_train_the_one_backward_teacher_up_to_float_rounding(tmp_path):
    """model.digits.train_threads=2 (each batch in 2 parts, one thread each, gradients summed) is the same
    training, also fine-tuning (an odd batch too): the teachers differ by float rounding (which Adam's first
    steps amplify for near-zero gradients), a small fraction of how far training moved them."""
    from noiserefine.backends.digits import build_unet

    overrides = ["model.digits.train_steps=6", "model.digits.batch_size=7", "model.digits.block_out_channels=[8,16,16]",
                 "model.digits.task=compose"]
    one = load_config(overrides=overrides + ["model.digits.train_threads=1"]).model.digits
    two = load_config(overrides=overrides + ["model.digits.train_threads=2"]).model.digits
    torch.manual_seed(int(one.seed))
    start = _flat(build_unet([8, 16, 16], int(one.cross_attention_dim), int(one.canvas)).state_dict())
    trained = {name: _flat(DigitsBackend.from_pretrained(train_digits_teacher(
        settings, tmp_path / name, progress=False)).denoiser.state_dict()) for name, settings in
        (("one", one), ("two", two))}
    moved = (trained["one"] - start).norm()
    assert (trained["one"] - trained["two"]).norm() < 0.05 * moved

    distilled = {**two, "init_from": str(tmp_path / "one"), "distill_guidance_scale": 3.0, "train_steps": 3}
    fine = {threads: _flat(DigitsBackend.from_pretrained(train_digits_teacher(
        {**distilled, "train_threads": threads}, tmp_path / f"d{threads}", progress=False)).denoiser.state_dict())
        for threads in (1, 2)}
    assert (fine[1] - fine[2]).norm() < 0.05 * (fine[1] - trained["one"]).norm()

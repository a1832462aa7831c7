import pytest
import torch
from safetensors.torch import load_file, save_file

from conftest import REFINER_PROMPTS as PROMPTS, randomise_lora, refiner_inputs, tiny_digits_backend
from noiserefine.config import load_config
from noiserefine.config_schema import RefinerConfig
from noiserefine.refiner import (CONFIG_FILE, SAMPLER_FILE, WEIGHTS_FILE, Refiner, adapters_enabled, load_refiner,
                                 lora_enabled, save_refiner)
from noiserefine.sampling import rollout



def test_refined_equals_noise_exactly_at_init(tiny_backend):
    refiner = Refiner(tiny_backend, RefinerConfig())
    noise, cond = refiner_inputs(tiny_backend)
    assert len(set(cond["encoder_hidden_states"][:, 0, 0].tolist())) == len(PROMPTS)  # prompts differ
    refined = refiner(noise, cond)
    assert torch.equal(refined, noise)
    assert torch.equal(refiner.refine(noise, PROMPTS), noise)
    assert not adapters_enabled(tiny_backend.denoiser)


def test_teacher_and_student_calls_run_the_base_model(tiny_backend):
    fresh = tiny_digits_backend()
    refiner = Refiner(tiny_backend, RefinerConfig())
    randomise_lora(refiner)
    noise, cond = refiner_inputs(tiny_backend)
    refined = refiner(noise, cond)
    assert (refined - noise).abs().max() > 1e-3, "the LoRA must change the refined noise"
    t = torch.tensor(500)
    with torch.no_grad():
        assert torch.equal(tiny_backend.denoise(noise, t, cond), fresh.denoise(noise, t, cond))
        assert torch.equal(rollout(tiny_backend, noise, cond, 4), rollout(fresh, noise, cond, 4))
        with lora_enabled(tiny_backend.denoiser):  # the check above can fail: LoRA output differs
            assert not torch.equal(tiny_backend.denoise(noise, t, cond), fresh.denoise(noise, t, cond))
    assert not adapters_enabled(tiny_backend.denoiser)


def test_adapters_disabled_after_error_in_refiner_forward(tiny_backend, monkeypatch):
    refiner = Refiner(tiny_backend, RefinerConfig())
    original = tiny_backend.denoise

    def failing(x, t, cond):
        if adapters_enabled(tiny_backend.denoiser):
            raise RuntimeError("boom inside the LoRA forward")
        return original(x, t, cond)

    monkeypatch.setattr(tiny_backend, "denoise", failing)
    noise, cond = refiner_inputs(tiny_backend)
    with pytest.raises(RuntimeError, match="boom"):
        refiner(noise, cond)
    assert not adapters_enabled(tiny_backend.denoiser)
    assert all(p.requires_grad for p in refiner.trainable_parameters())


def test_only_lora_is_trainable_and_receives_gradient(tiny_backend):
    # the difference form: the LoRA is all it trains (single_call adds its head: tests/test_refiner_forms.py)
    refiner = Refiner(tiny_backend, RefinerConfig(form="difference"))
    lora = refiner.trainable_parameters()
    lora_ids = {id(p) for p in lora}
    assert lora and all("lora_" in n for n, p in tiny_backend.denoiser.named_parameters() if id(p) in lora_ids)
    trainable = [n for n, p in tiny_backend.denoiser.named_parameters() if p.requires_grad]
    assert len(trainable) == len(lora) and all(".lora_" in n for n in trainable)
    noise, cond = refiner_inputs(tiny_backend)
    refined = refiner(noise, cond)
    # the flags survive the enable/disable toggling, or backward would silently skip them
    assert all(p.requires_grad for p in lora)
    (refined - 1.0).square().mean().backward()
    lora_b = [p for n, p in tiny_backend.denoiser.named_parameters() if "lora_B" in n]
    assert all(p.grad is not None for p in lora)
    assert sum(p.grad.abs().sum() for p in lora_b) > 0
    frozen = [p for p in tiny_backend.denoiser.parameters() if id(p) not in lora_ids]
    assert all(p.grad is None for p in frozen)


def test_save_load_round_trip(tiny_backend, tmp_path):
    cfg = load_config(overrides=["refiner.lora_rank=4", "refiner.lora_alpha=4.0"])
    refiner = Refiner(tiny_backend, cfg.refiner)
    randomise_lora(refiner)
    noise, cond = refiner_inputs(tiny_backend)
    expected = refiner.refine(noise, PROMPTS)
    save_refiner(refiner, tmp_path / "out", cfg)
    assert (tmp_path / "out" / CONFIG_FILE).is_file() and (tmp_path / "out" / WEIGHTS_FILE).is_file()
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == sorted([WEIGHTS_FILE, CONFIG_FILE, SAMPLER_FILE,
                                                                             "README.md"])
    assert load_config(tmp_path / "out" / CONFIG_FILE).refiner.lora_rank == 4

    loaded = load_refiner(tmp_path / "out", tiny_digits_backend())
    assert torch.equal(loaded.refine(noise, PROMPTS), expected)
    assert not adapters_enabled(loaded.backend.denoiser)

    with pytest.raises(ValueError, match="differs"):
        save_refiner(refiner, tmp_path / "other", load_config())


def test_load_with_mismatched_keys_names_the_file(tiny_backend, tmp_path):
    cfg = load_config()
    save_refiner(Refiner(tiny_backend, cfg.refiner), tmp_path, cfg)
    weights = tmp_path / WEIGHTS_FILE
    state = load_file(str(weights))
    dropped = sorted(state)[0]
    state["not.a.lora_A.weight"] = state.pop(dropped)
    save_file(state, str(weights))
    backend = tiny_digits_backend()
    with pytest.raises(ValueError, match=WEIGHTS_FILE) as error:
        load_refiner(tmp_path, backend)
    assert dropped in str(error.value) and "not.a.lora_A.weight" in str(error.value)
    assert "refiner" not in getattr(backend.denoiser, "peft_config", {})  # backend left clean
    Refiner(backend, cfg.refiner)  # so a retry works


def test_load_with_wrong_rank_errors(tiny_backend, tmp_path):
    cfg = load_config()
    save_refiner(Refiner(tiny_backend, cfg.refiner), tmp_path, cfg)
    other = load_config(overrides=["refiner.lora_rank=2"])
    (tmp_path / CONFIG_FILE).write_text((tmp_path / CONFIG_FILE).read_text().replace(
        "lora_rank: 8", "lora_rank: 2"))
    assert load_config(tmp_path / CONFIG_FILE).refiner == other.refiner
    with pytest.raises(ValueError, match="wrong shapes"):
        load_refiner(tmp_path, tiny_digits_backend())


class _Payload:
    """Unpickling this creates a marker file: proof that the loader executed code from the file."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


def test_loading_a_pickled_refiner_file_runs_no_code(tiny_backend, tmp_path):
    cfg = load_config()
    save_refiner(Refiner(tiny_backend, cfg.refiner), tmp_path, cfg)
    marker = tmp_path / "code-ran"
    torch.save({"weights": _Payload(marker)}, tmp_path / WEIGHTS_FILE)  # a pickle under the refiner's name
    with pytest.raises(Exception) as error:
        load_refiner(tmp_path, tiny_digits_backend())
    assert not marker.exists()
    assert "safetensors" in type(error.value).__module__.lower() or WEIGHTS_FILE in str(error.value) \
        or "header" in str(error.value).lower()

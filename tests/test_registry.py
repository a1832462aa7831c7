"""The model-family registry (``noiserefine/backends/registry.py``): the one place a family is named.

A stock pipeline is matched to a family by its registered class and never guessed; the registrations
agree with the shipped architectures, the config choices and the backend classes they point to.
"""

from __future__ import annotations

import pytest
from diffusers import DDIMScheduler, DiffusionPipeline, DiTPipeline

from noiserefine.backends import registry
from noiserefine.config import load_config
from noiserefine.config_checks import _CHOICES
from noiserefine.pipelines import backend_for_pipeline
from noiserefine.sampler_record import scheduler_record
from tiny_models import build_tiny_dit


class PixArtLikePipeline(DiffusionPipeline):
    """A transformer pipeline of no registered family (PixArt, Flux, ... have this shape)."""

    def __init__(self, transformer, vae, scheduler):
        super().__init__()
        self.register_modules(transformer=transformer, vae=vae, scheduler=scheduler)


class MyDiTPipeline(DiTPipeline):
    """A user's subclass of a registered pipeline: it belongs to the same family."""


@pytest.fixture(scope="module")
def dit_parts(tmp_path_factory):
    pipe = DiTPipeline.from_pretrained(build_tiny_dit(tmp_path_factory.mktemp("dit") / "dit"))
    record = scheduler_record(DDIMScheduler, dict(pipe.scheduler.config))
    return pipe, record


def test_an_unregistered_transformer_pipeline_is_refused_naming_the_known_ones(dit_parts):
    """The old dispatch took any transformer pipeline that was not SD3 for a DiT/SiT one."""
    dit, record = dit_parts
    pipe = PixArtLikePipeline(transformer=dit.transformer, vae=dit.vae, scheduler=dit.scheduler)
    with pytest.raises(ValueError, match=r"PixArtLikePipeline is not a registered pipeline.*'DiTPipeline'.*"
                                         r"'StableDiffusion3Pipeline'.*'StableDiffusionXLPipeline'"):
        backend_for_pipeline(pipe, record)


def test_a_registered_pipeline_and_its_subclasses_get_their_family(dit_parts):
    dit, record = dit_parts
    assert registry.family_for_pipeline(dit).name == "sit"
    mine = MyDiTPipeline(transformer=dit.transformer, vae=dit.vae, scheduler=dit.scheduler)
    backend = backend_for_pipeline(mine, record)
    assert backend.name == "sit" and backend.denoiser is dit.transformer
    assert backend.latent_shape == tuple(backend_for_pipeline(dit, record).latent_shape)


def test_registrations_agree_with_the_shipped_architectures_and_the_backend_classes():
    from noiserefine.backends.random_init import architecture_names, read_architecture

    assert list(registry.architecture_names()) == architecture_names()
    for family in registry.FAMILIES:
        cls = family.backend_class()
        assert cls.name == family.name, family
        for arch in family.architectures:
            assert read_architecture(arch).backend == family.name
            assert registry.family_of_architecture(arch) is family
        if family.pipelines:
            assert "from_pipeline" in vars(cls) or any("from_pipeline" in vars(base) for base in cls.__mro__[1:-1])
    pipelines = [name for family in registry.FAMILIES for name in family.pipelines]
    assert len(pipelines) == len(set(pipelines)), "a pipeline class registered by two families"


def test_config_choices_are_the_registered_names():
    assert _CHOICES["model.backend"] == registry.family_names()
    assert _CHOICES["model.architecture"] == ("", *registry.architecture_names())
    with pytest.raises(ValueError, match=r"model.backend.*'pixart'.*'stable_diffusion'"):
        load_config(overrides=["model.backend=pixart"])


def test_unknown_family_and_random_init_without_an_architecture_name_the_choices():
    from noiserefine.backends import load_backend

    with pytest.raises(ValueError, match=r"'flux' is not a registered model family.*'sd3'"):
        registry.family("flux")
    cfg = load_config(overrides=["model.init=random"]).model
    with pytest.raises(ValueError, match="no digits architecture is shipped"):
        load_backend(cfg)
    cfg = load_config(overrides=["model.backend=sit", "model.init=random"]).model
    with pytest.raises(ValueError, match=r"model.architecture.*\('dit_xl2', 'sit_xl2'\)"):
        load_backend(cfg)


def test_latent_shapes_and_path_hints():
    assert registry.family("sd3").latent_shape() == (16, 128, 128)
    assert registry.family("sdxl").latent_shape(512) == (4, 64, 64)
    assert registry.family("digits").latent_shape() == (1, 16, 16)
    with pytest.raises(ValueError, match="several resolutions"):
        registry.family("stable_diffusion").latent_shape()
    assert registry.architecture_for_path("models/stable-diffusion-2-1-base") == "sd21"
    assert registry.architecture_for_path("/m/stable-diffusion-2-1/") == "sd21_768"
    assert registry.architecture_for_path("models/stable-diffusion-xl-base-1.0") == "sdxl"
    assert registry.architecture_for_path("models/stable-diffusion-v1-5") == "sd15"
    assert registry.architecture_for_path("models/my-model") is None


def test_the_registry_imports_nothing_heavy():
    import subprocess
    import sys

    code = "import sys, noiserefine.config, noiserefine.backends.registry; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "False"

"""Real-size architectures with RANDOM WEIGHTS: for speed/memory measurements and smoke tests; samples are noise.

``model.init=random`` builds a backend's models at the published size of a
model family (``model.architecture``: sd15, sd21, sd21_768, sdxl, dit_xl2,
sit_xl2) from the configs shipped in ``architectures/<name>/``, instead of
loading ``model.path``. Nothing is downloaded and no weights exist: every
parameter is drawn by the classes' own initialisers from a fixed seed, so two
builds are identical, and the models' outputs are meaningless. Use it to time a
teacher step, size a GPU, or smoke-test the pipeline at real shapes; never to
generate targets or report sample quality.

Each ``architectures/<name>/`` holds one JSON per component, written from the
published diffusers/transformers ``config.json`` files of that model, and a
``pipeline.json`` (like diffusers' ``model_index.json``) with the backend
family, the component classes (``[library, class]``) and pipeline-level facts
(``force_zeros_for_empty_prompt`` for SDXL). A tokenizer component is the real
tokenizer's special tokens and length; it is built by ``builtin_clip_tokenizer``,
which is NOT the real CLIP tokenizer.

Models are built directly on the target device, in the target dtype (the
default dtype is switched while the classes initialise), so an SDXL-size UNet
never exists as float32 on the CPU when it is asked for in bfloat16 on a GPU;
``device="meta"`` builds the structure alone (parameter counts, no memory).
"""

from __future__ import annotations

import contextlib
import functools
import json
import tempfile
import warnings
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

RANDOM_WEIGHTS = "random weights: for speed/memory measurements and smoke tests; samples are noise"
ARCHITECTURES_DIR = Path(__file__).resolve().with_name("architectures")
DEFAULT_SEED = 0


class RandomWeightsWarning(UserWarning):
    """Issued once per load of a random-weight backend: its samples are noise."""


@dataclass(frozen=True)
class Architecture:
    """One shipped architecture: ``pipeline.json`` plus one config per component."""

    name: str
    backend: str
    pipeline: dict[str, Any]
    configs: dict[str, dict[str, Any]] = field(repr=False)

    @property
    def components(self) -> dict[str, tuple[str, str]]:
        """Component name -> (library, class name), as in a ``model_index.json``."""
        return {name: tuple(spec) for name, spec in self.pipeline["components"].items()}


def architecture_names() -> list[str]:
    """The architectures shipped in ``architectures/`` (the values ``model.architecture`` accepts)."""
    return sorted(p.name for p in ARCHITECTURES_DIR.iterdir() if (p / "pipeline.json").is_file())


def read_architecture(name: str, backend: str | None = None) -> Architecture:
    """The shipped architecture ``name``; with ``backend``, it must belong to that model family."""
    names = architecture_names()
    if name not in names:
        raise ValueError(f"model.architecture {name!r} is not shipped; model.init=random needs one of {names}")
    directory = ARCHITECTURES_DIR / name
    pipeline = json.loads((directory / "pipeline.json").read_text())
    configs = {}
    for component in pipeline["components"]:
        path = directory / f"{component}.json"
        if not path.is_file():
            raise FileNotFoundError(f"architecture {name!r} lists component {component!r} but {path} is missing")
        configs[component] = json.loads(path.read_text())
    arch = Architecture(name=name, backend=pipeline["backend"], pipeline=pipeline, configs=configs)
    if backend is not None and arch.backend != backend:
        raise ValueError(f"model.architecture {name!r} is a {arch.backend!r} model; set model.backend="
                         f"{arch.backend} (got model.backend={backend})")
    return arch


# --- the built-in tokenizer ------------------------------------------------------------------------------------

def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2/CLIP's reversible byte -> printable character map (its order fixes the first 256 CLIP ids)."""
    printable = (list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1))
                 + list(range(ord("®"), ord("ÿ") + 1)))
    codes, extra = printable[:], 0
    for byte in range(256):
        if byte not in printable:
            printable.append(byte)
            codes.append(256 + extra)
            extra += 1
    return dict(zip(printable, map(chr, codes)))


# A few merges so that common words are not all single characters; any text still tokenizes (every byte
# and its end-of-word form are in the vocabulary).
_MERGES = ("t h", "th e</w>", "a n", "an d</w>", "o f</w>", "i n", "e r", "o n", "r e", "in g</w>")


def _builtin_vocab(vocab_size: int) -> tuple[dict[str, int], list[str]]:
    if vocab_size < 2 * 256 + len(_MERGES) + 2:
        raise ValueError(f"vocab_size {vocab_size} is too small for the built-in CLIP-style vocabulary")
    characters = list(_bytes_to_unicode().values())
    tokens = characters + [c + "</w>" for c in characters] + ["".join(m.split()) for m in _MERGES]
    # Unused placeholders keep the ids dense up to the real tokenizer's special-token ids (BPE never forms them).
    tokens += [f"<|unused_{i}|>" for i in range(len(tokens), vocab_size - 2)]
    tokens += ["<|startoftext|>", "<|endoftext|>"]
    return {token: index for index, token in enumerate(tokens)}, list(_MERGES)


@functools.lru_cache(maxsize=8)
def _builtin_files(vocab_size: int) -> tuple[str, str]:
    vocab, merges = _builtin_vocab(vocab_size)
    return json.dumps(vocab), "#version: 0.2\n" + "\n".join(merges) + "\n"


def builtin_clip_tokenizer(vocab_size: int = 49408, model_max_length: int = 77, pad_token: str = "<|endoftext|>"):
    """A deterministic CLIP-style BPE tokenizer for random-weight models. NOT the real CLIP tokenizer.

    Same layout as the real one, so its ids mean the same things to a CLIP text
    encoder config: the 256 byte characters (id 0 is "!") and their end-of-word
    forms, a handful of merges, unused placeholders, then ``<|startoftext|>`` =
    ``vocab_size - 2`` and ``<|endoftext|>`` = ``vocab_size - 1`` (49406 and 49407,
    as in CLIP). The eos is the largest id, so the legacy ``argmax`` pooling of
    configs with ``eos_token_id == 2`` finds it. ``pad_token`` is "<|endoftext|>"
    (SD 1.x, SDXL's first tokenizer) or "!" (the OpenCLIP tokenizers of SD 2.x and
    SDXL's second). Words split into far more tokens than with the real vocabulary:
    only token ids and shapes are realistic, never the text encoding.
    """
    from transformers import CLIPTokenizer

    vocab, merges = _builtin_files(vocab_size)
    with tempfile.TemporaryDirectory(prefix="noiserefine-tokenizer-") as tmp:
        directory = Path(tmp)
        (directory / "vocab.json").write_text(vocab)
        (directory / "merges.txt").write_text(merges)
        (directory / "tokenizer_config.json").write_text(json.dumps({"model_max_length": model_max_length}))
        return CLIPTokenizer.from_pretrained(directory, pad_token=pad_token, model_max_length=model_max_length,
                                             local_files_only=True)


def check_tokenizer_fits(tokenizer, text_config, what: str = "text encoder") -> None:
    """The tokenizer's ids index the encoder's embedding, and the encoder's pooling finds the tokenizer's eos."""
    if len(tokenizer) > text_config.vocab_size:
        raise ValueError(f"the tokenizer has {len(tokenizer)} tokens but the {what} embeds only "
                         f"{text_config.vocab_size}")
    eos = tokenizer.eos_token_id
    if text_config.eos_token_id == 2:  # transformers' legacy pooling: argmax of the input ids
        if eos != len(tokenizer) - 1:
            raise ValueError(f"the {what} pools at argmax(input_ids) (eos_token_id 2) but the tokenizer's eos "
                             f"id {eos} is not its largest id {len(tokenizer) - 1}")
    elif text_config.eos_token_id != eos:
        raise ValueError(f"the {what} pools at eos id {text_config.eos_token_id}; the tokenizer's eos is {eos}")


# --- building the models --------------------------------------------------------------------------------------

@contextlib.contextmanager
def _default_dtype(dtype: torch.dtype) -> Iterator[None]:
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        yield
    finally:
        torch.set_default_dtype(previous)


def _model_class(library: str, class_name: str):
    if library == "diffusers":
        import diffusers

        return getattr(diffusers, class_name)
    if library == "transformers":
        import transformers

        return getattr(transformers, class_name)
    raise ValueError(f"unknown component library {library!r} (expected diffusers or transformers)")


def build_model(library: str, class_name: str, config: Mapping[str, Any], device: str | torch.device = "cpu",
                dtype: torch.dtype = torch.float32, seed: int = DEFAULT_SEED) -> torch.nn.Module:
    """One model from its config, RANDOM WEIGHTS, created on ``device`` in ``dtype``; same seed, same weights.

    The initialisers run under ``torch.device(device)`` with ``dtype`` as the
    default dtype, so nothing is materialised elsewhere first; on ``meta`` no
    memory is used. The global RNG state is restored afterwards.
    """
    cls = _model_class(library, class_name)
    device = torch.device(device)
    config = {k: v for k, v in config.items() if k not in ("architectures", "torch_dtype", "dtype")}
    fork_devices = [] if device.type != "cuda" else [
        device.index if device.index is not None else torch.cuda.current_device()]
    with torch.random.fork_rng(devices=fork_devices), device, _default_dtype(dtype):
        torch.manual_seed(seed)
        if library == "diffusers":
            model = cls.from_config(config)
        else:
            model = cls(cls.config_class(**config))
    if any(p.dtype != dtype for p in model.parameters() if p.is_floating_point()):
        model = model.to(dtype=dtype)  # a parameter an initialiser created in float32 explicitly
    return model.eval().requires_grad_(False)


def build_components(arch: Architecture, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32,
                     dtypes: Mapping[str, torch.dtype] | None = None, seed: int = DEFAULT_SEED) -> dict[str, Any]:
    """Every component of ``arch``: models (RANDOM WEIGHTS), built-in tokenizers, and the raw scheduler config.

    ``dtypes`` overrides the dtype per component (SDXL's VAE runs in float32).
    Each model is seeded with ``seed`` on its own, so its weights do not depend
    on the other components or their dtypes.
    """
    built: dict[str, Any] = {}
    for name, (library, class_name) in arch.components.items():
        config = arch.configs[name]
        if name == "scheduler":
            if config.get("_class_name", class_name) != class_name:
                raise ValueError(f"architecture {arch.name!r}: pipeline.json names scheduler {class_name} but "
                                 f"scheduler.json is a {config['_class_name']}")
            built[name] = dict(config)
        elif class_name == "CLIPTokenizer":
            encoder = arch.configs.get(name.replace("tokenizer", "text_encoder"), {})
            built[name] = builtin_clip_tokenizer(vocab_size=encoder.get("vocab_size", 49408),
                                                 model_max_length=config.get("model_max_length", 77),
                                                 pad_token=config.get("pad_token", "<|endoftext|>"))
        else:
            built[name] = build_model(library, class_name, config, device, (dtypes or {}).get(name, dtype), seed)
    for name, value in built.items():
        if name.startswith("tokenizer"):
            encoder = built.get(name.replace("tokenizer", "text_encoder"))
            if encoder is not None:
                check_tokenizer_fits(value, encoder.config, f"{arch.name} {name.replace('tokenizer', 'text_encoder')}")
    return built


def warn_random_weights(arch: Architecture, device: str | torch.device, dtype: torch.dtype) -> None:
    """The one warning a random-weight load prints."""
    warnings.warn(f"model.init=random: built {arch.name} ({arch.pipeline.get('published_as', arch.name)}) at its "
                  f"published size on {device} in {str(dtype).removeprefix('torch.')} with {RANDOM_WEIGHTS}",
                  RandomWeightsWarning, stacklevel=3)


def mark_random(backend, arch: Architecture):
    """Label a backend built from random weights (``init``, ``architecture``, ``weights``) and warn once."""
    backend.init = "random"
    backend.architecture = arch.name
    backend.weights = f"{arch.name}, {RANDOM_WEIGHTS}"
    warn_random_weights(arch, backend.device, backend.dtype)
    return backend


def count_parameters(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())

"""The LAION aesthetic predictor (christophschuhmann/improved-aesthetic-predictor), from local files.

Its released heads (``sac+logos+ava1-l14-linearMSE.pth`` and kin) are an MLP over the L2-normalised
CLIP ViT-L/14 image embedding (768-d): ``Linear(768, 1024), Dropout(0.2), Linear(1024, 128),
Dropout(0.2), Linear(128, 64), Dropout(0.1), Linear(64, 16), Linear(16, 1)`` in an ``nn.Sequential``
named ``layers`` (no activations in the "linear" heads), so the state-dict keys are
``layers.{0,2,4,6,7}.{weight,bias}``. Its score is on AVA's 1..10 scale (the paper keeps targets
above 6). The reference embeds with OpenAI's ``clip`` package; here the same network comes as a
transformers ``CLIPModel`` (``get_image_features``: the projected embedding) with its
``CLIPImageProcessor`` (resize, center crop, normalise: the reference's preprocessing) from
``scorer.clip_path``; the head from ``scorer.path`` (``.safetensors``, or a ``.pth`` read with
``torch.load(weights_only=True)``: never unpickled). A head of another layout is refused naming the
file and the key.
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn as nn

HIDDEN = (1024, 128, 64, 16)  # the released heads' widths
DROPOUT = (0.2, 0.2, 0.1)  # after the first three linear layers


class AestheticMLP(nn.Module):
    """The predictor's head: ``layers`` exactly as released (see the module docstring)."""

    def __init__(self, embedding_dim: int = 768):
        super().__init__()
        widths = (embedding_dim, *HIDDEN)
        modules: list[nn.Module] = []
        for index, (width_in, width_out) in enumerate(zip(widths, widths[1:])):
            modules.append(nn.Linear(width_in, width_out))
            if index < len(DROPOUT):
                modules.append(nn.Dropout(DROPOUT[index]))
        modules.append(nn.Linear(HIDDEN[-1], 1))
        self.layers = nn.Sequential(*modules)

    def forward(self, embeddings: torch.Tensor) -> torch.Tensor:
        return self.layers(embeddings)


def read_weights(path: str | Path) -> dict[str, torch.Tensor]:
    """A state dict from ``.safetensors`` or a ``.pth``/``.pt``/``.bin`` (``torch.load(weights_only=True)``)."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise FileNotFoundError(f"scorer.path {str(path)!r} is not a file (the aesthetic head's weights)")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(str(path))
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # pickle with objects beyond tensors is refused by weights_only, not run
        raise ValueError(f"{path}: not a plain state dict of tensors ({type(error).__name__}: "
                         f"{str(error).splitlines()[0][:200]})") from None
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ValueError(f"{path}: not a state dict of tensors (got {type(state).__name__})")
    return state


def load_head(path: str | Path, embedding_dim: int) -> AestheticMLP:
    """The head with the weights of ``path``; ``ValueError`` naming the file and the first key that is
    missing, unexpected or of another shape than a head over ``embedding_dim``-d embeddings."""
    state = read_weights(path)
    head = AestheticMLP(embedding_dim)
    expected = {key: tuple(value.shape) for key, value in head.state_dict().items()}
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    if missing or unexpected:
        raise ValueError(f"{path}: not an improved-aesthetic-predictor head: "
                         + (f"missing key {missing[0]!r}" if missing else f"unexpected key {unexpected[0]!r}")
                         + f" (expected keys {sorted(expected)})")
    for key, shape in expected.items():
        if tuple(state[key].shape) != shape:
            raise ValueError(f"{path}: key {key!r} has shape {tuple(state[key].shape)}, expected {shape} (a head "
                             f"over {embedding_dim}-d CLIP embeddings: scorer.clip_path's projection_dim)")
    head.load_state_dict({key: value.float() for key, value in state.items()})
    return head.eval().requires_grad_(False)


class AestheticScorer:
    """CLIP image embedding, L2-normalised, through the aesthetic head: one score per image."""

    def __init__(self, clip_path: str, head_path: str, device="cpu"):
        from transformers import CLIPImageProcessor, CLIPModel

        directory = Path(clip_path).expanduser()
        if not clip_path or not directory.is_dir():
            raise FileNotFoundError(f"scorer.clip_path {clip_path!r} is not a local directory (a transformers "
                                    "CLIPModel + CLIPImageProcessor, e.g. CLIP ViT-L/14); nothing is downloaded")
        try:
            self.clip = CLIPModel.from_pretrained(directory, local_files_only=True, dtype=torch.float32)
            self.processor = CLIPImageProcessor.from_pretrained(directory, local_files_only=True)
        except (OSError, ValueError) as error:
            raise FileNotFoundError(f"scorer.clip_path: cannot load CLIP from {str(directory)!r}: "
                                    f"{str(error).splitlines()[0]}") from None
        self.device = torch.device(device)
        self.clip = self.clip.to(self.device).eval().requires_grad_(False)
        self.head = load_head(head_path, int(self.clip.config.projection_dim)).to(self.device)

    @classmethod
    def from_config(cls, scorer_cfg, device="cpu") -> "AestheticScorer":
        return cls(scorer_cfg.clip_path, scorer_cfg.path, device)

    @torch.no_grad()
    def embeddings(self, images: torch.Tensor) -> torch.Tensor:
        """L2-normalised CLIP image embeddings of ``images`` in [0, 1] (grey images repeated to RGB)."""
        if images.shape[1] == 1:
            images = images.repeat(1, 3, 1, 1)
        pixels = (images.detach().float().clamp(0, 1) * 255).round().to(torch.uint8).cpu()
        arrays = [image.permute(1, 2, 0).numpy() for image in pixels]  # what the reference gets from PIL
        values = self.processor(images=arrays, return_tensors="pt")["pixel_values"].to(self.device)
        output = self.clip.get_image_features(pixel_values=values)
        embedding = (output if torch.is_tensor(output) else output.pooler_output).float()
        norm = embedding.norm(dim=-1, keepdim=True)
        return embedding / torch.where(norm == 0, torch.ones_like(norm), norm)  # the reference's normalized()

    @torch.no_grad()
    def score(self, images: torch.Tensor, prompts: list[str]) -> list[float]:
        return self.head(self.embeddings(images)).squeeze(-1).cpu().tolist()

"""The embedded default's target scorer (``scorer.kind=digit_confidence``): the digit classifier's confidence.

A target's score is the classifier's softmax probability of the digit its prompt names, on the decoded
target: near 1 for a clean digit of the right class, near 0 for a blob or another digit. The classifier
is the one the evaluation uses (``classifier.py``), read from ``scorer.path`` (its directory, holding
``classifier.safetensors``, e.g. ``artifacts/digit-classifier``, or that file); it is never trained here.
"""

from __future__ import annotations

from pathlib import Path

import torch

from ..backends.digits import parse_digit
from .classifier import WEIGHTS_FILENAME, DigitClassifier


class DigitConfidenceScorer:
    def __init__(self, classifier: DigitClassifier, device="cpu"):
        self.device = torch.device(device)
        self.classifier = classifier.to(self.device).eval().requires_grad_(False)

    @classmethod
    def from_config(cls, scorer_cfg, device="cpu") -> "DigitConfidenceScorer":
        from safetensors.torch import load_file

        path = Path(scorer_cfg.path).expanduser()
        weights = path / WEIGHTS_FILENAME if path.is_dir() else path
        if not scorer_cfg.path or not weights.is_file():
            raise FileNotFoundError(f"scorer.path {scorer_cfg.path!r} holds no {WEIGHTS_FILENAME} (the digit "
                                    "classifier; any digits evaluation trains it into eval.classifier_dir)")
        classifier = DigitClassifier()
        try:
            classifier.load_state_dict(load_file(str(weights)))
        except RuntimeError as error:  # missing/unexpected keys or shapes
            raise ValueError(f"{weights}: not a digit classifier's weights: {str(error).splitlines()[0]}") from None
        return cls(classifier, device)

    @torch.no_grad()
    def score(self, images: torch.Tensor, prompts: list[str]) -> list[float]:
        """P(prompted digit | image) per image in [0, 1]; ``ValueError`` for a prompt that names no digit."""
        if len(prompts) != images.shape[0]:
            raise ValueError(f"{images.shape[0]} images but {len(prompts)} prompts")
        digits = [parse_digit(prompt) for prompt in prompts]
        unnamed = [prompt for prompt, digit in zip(prompts, digits) if digit is None]
        if unnamed:
            raise ValueError(f"digit_confidence scores a target by the digit its prompt names; prompt "
                             f"{unnamed[0]!r} names none")
        probs = torch.softmax(self.classifier(images.to(self.device, torch.float32)).double(), dim=1).cpu()
        return probs[torch.arange(len(digits)), torch.tensor(digits)].tolist()

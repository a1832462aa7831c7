"""Tiny random stand-ins for the evaluation networks, built in the tests (no weights exist here).

* :class:`TinyInception`: torch-fidelity's feature-extractor contract (uint8 (B, 3, H, W) in, a tuple
  (pool features, logits) out, its own resize inside) at 8 features and 10 classes.
* :func:`build_tiny_clip`: a transformers ``CLIPModel`` + ``CLIPProcessor`` saved with ``save_pretrained``
  (the layout of a real CLIP / PickScore directory), with the tests' minimal CLIP tokenizer.
* :func:`write_coco_fixture`: a COCO captions JSON (several captions per image, ids out of order) and a
  folder of its real images (non-square PNGs).
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from tiny_models import write_clip_tokenizer


class TinyInception(torch.nn.Module):
    """uint8 images -> (pool (B, 8), logits (B, 10)), resized to 16 px inside like Inception resizes to 299."""

    def __init__(self, seed: int = 0):
        super().__init__()
        generator = torch.Generator().manual_seed(seed)
        self.conv = torch.nn.Conv2d(3, 8, 3, padding=1)
        self.fc = torch.nn.Linear(8, 10)
        with torch.no_grad():
            for parameter in self.parameters():
                parameter.copy_(torch.randn(parameter.shape, generator=generator) * 0.5)

    def forward(self, x: torch.Tensor):
        assert x.dtype == torch.uint8
        x = F.interpolate(x.float() / 128 - 1, size=(16, 16), mode="bilinear", align_corners=False)
        pool = torch.tanh(self.conv(x)).mean(dim=(2, 3)) * 4
        return pool, self.fc(pool)


def tiny_inception_features(seed: int = 0, batch_size: int = 8):
    from noiserefine.evaluation.features import InceptionFeatures

    return InceptionFeatures(TinyInception(seed), "cpu", batch_size, {"network": "TinyInception", "seed": seed})


def build_tiny_clip(directory: Path, seed: int = 0, logit_scale: float | None = None) -> Path:
    from transformers import (CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPProcessor, CLIPTextConfig,
                              CLIPVisionConfig)

    directory.mkdir(parents=True, exist_ok=True)
    tokenizer = write_clip_tokenizer(directory)
    text = CLIPTextConfig(vocab_size=len(tokenizer), hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                          num_attention_heads=2, max_position_embeddings=77, bos_token_id=tokenizer.bos_token_id,
                          eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    vision = CLIPVisionConfig(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
                              image_size=32, patch_size=8)
    torch.manual_seed(seed)
    model = CLIPModel(CLIPConfig(text_config=text.to_dict(), vision_config=vision.to_dict(), projection_dim=8))
    if logit_scale is not None:
        with torch.no_grad():
            model.logit_scale.fill_(math.log(logit_scale))
    model.save_pretrained(directory)
    image_processor = CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})
    CLIPProcessor(image_processor=image_processor, tokenizer=tokenizer).save_pretrained(directory)
    return directory


def write_coco_fixture(root: Path, num_images: int = 20, seed: int = 0) -> tuple[Path, Path]:
    """``captions.json`` (2 captions per image, image and annotation ids shuffled) and ``images/``."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    image_ids = [int(i) for i in rng.permutation(np.arange(100, 100 + num_images))]
    images = [{"id": image_id, "file_name": f"COCO_val2014_{image_id:012d}.jpg".replace(".jpg", ".png"),
               "width": 24, "height": 20} for image_id in image_ids]
    annotations, next_id = [], 5000
    for image_id in image_ids:
        for k in (0, 1):  # the later-listed caption (version 1) has the lower annotation id
            annotations.append({"image_id": image_id, "id": next_id - k * 1000,
                                "caption": f"  a photo   of thing {image_id} version {k}. "})
        next_id += 1
    captions = root / "captions_val2014.json"
    captions.write_text(json.dumps({"images": images, "annotations": annotations}))
    folder = root / "val2014"
    folder.mkdir(parents=True, exist_ok=True)
    for image in images:
        array = rng.integers(0, 256, size=(20, 24, 3), dtype=np.uint8)
        Image.fromarray(array).save(folder / image["file_name"])
    return captions, folder

"""The paper's evaluation protocols: which prompts and seeds, and which real images are the FID reference.

* ``coco``: MS-COCO captions (``captions_val2014.json`` for COCO-30K, or val2017). One caption per
  image, in a fixed order: images sorted by ``image_id``, each with its caption of the lowest annotation
  ``id``; sample ``i`` is the ``i``-th image of that order. The FID reference is the real images of the
  same selection (``file_name`` in the JSON's ``images``) in a local folder, or a statistics file.
* ``imagenet``: class-conditional, sample ``i`` is class ``i % num_classes`` (50K samples = 50 per class
  for every prefix of whole rounds); the prompt is the class id as text, which the DiT/SiT backends read.
  The reference is every image under a local folder, or a statistics file (ADM's ``VIRTUAL_imagenet256_
  labeled.npz`` holds ``mu``/``sigma``).
* ``prompts``: a text file, one prompt per line, cycled; an optional reference folder or file.

Seeds: sample ``i`` has ``noise.sample_seed(base_seed, seed_offset + i)``, its ``x_T`` drawn as everywhere
else (:func:`noiserefine.noise.noise_from_seed`). Sample ``i``'s prompt and seed never depend on
``num_samples``, so a longer run extends a shorter one.

Every image, generated or real, goes through :func:`fid_image_rule` before the Inception network:
uint8, center crop to the shorter side, PIL bicubic resize to ``resolution`` (skipped when already that
size). The rule, the files' sha256 and the counts are written into the output (``protocol.json``).
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass, field
from pathlib import Path, PurePath

import numpy as np
import torch

from ..noise import sample_seed
from ..hashing import file_sha256

MAX_SAMPLES = 10_000_000  # the paper's protocols use 30K (COCO) and 50K (ImageNet)
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp")
FID_IMAGE_RULE = ("uint8 RGB (generated: round(255 * x) of the decoded image in [0, 1]); center crop to the "
                  "shorter side; PIL bicubic resize to resolution x resolution (skipped when already that size); "
                  "then torch-fidelity's InceptionV3 (its TF1-compatible bilinear resize to 299)")
COCO_SELECTION = ("images sorted by image_id; per image the caption with the lowest annotation id; "
                  "sample i = the i-th image of that order")


@dataclass
class Protocol:
    """The prompts and seeds of ``num_samples`` samples, where the reference comes from, and the record."""

    kind: str
    prompts: list[str]
    seeds: list[int]
    reference_files: list[Path] | None  # real images for the FID reference (None: a statistics file or none)
    reference_path: str
    record: dict = field(default_factory=dict)  # written to protocol.json
    identity: dict = field(default_factory=dict)  # what fixes sample i (independent of num_samples)

    @property
    def num_samples(self) -> int:
        return len(self.prompts)


def _sha256_json(value) -> str:
    return hashlib.sha256(json.dumps(value, ensure_ascii=False).encode()).hexdigest()


def _existing(path: str, what: str) -> Path:
    if not path:
        raise ValueError(f"{what} is not set")
    resolved = Path(path).expanduser()
    if not resolved.exists():
        raise FileNotFoundError(f"{what}: {str(resolved)!r} does not exist")
    return resolved


def read_coco_selection(path: str | Path) -> list[dict]:
    """Every image of a COCO captions JSON with one caption, in the protocol's order (see the module docstring).

    Returns ``[{"image_id", "file_name", "caption", "annotation_id"}, ...]``; ``file_name`` is "" when the
    JSON has no ``images`` entry for the image.
    """
    path = Path(path)
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise ValueError(f"{str(path)!r} is not a COCO captions JSON: {error}") from None
    if not isinstance(data, dict) or not isinstance(data.get("annotations"), list):
        raise ValueError(f"{str(path)!r} has no 'annotations' list (not a COCO captions JSON)")
    names = {int(image["id"]): str(image.get("file_name", "")) for image in data.get("images", [])
             if isinstance(image, dict) and "id" in image}
    first: dict[int, dict] = {}
    for annotation in data["annotations"]:
        try:
            image_id, annotation_id = int(annotation["image_id"]), int(annotation["id"])
            caption = " ".join(str(annotation["caption"]).split())
        except (KeyError, TypeError, ValueError):
            raise ValueError(f"{str(path)!r}: annotation {annotation!r} lacks image_id, id or caption") from None
        if not caption:
            continue
        kept = first.get(image_id)
        if kept is None or annotation_id < kept["annotation_id"]:
            first[image_id] = {"image_id": image_id, "file_name": names.get(image_id, ""), "caption": caption,
                               "annotation_id": annotation_id}
    return [first[image_id] for image_id in sorted(first)]


def _files_inside(chosen: list[dict], captions: Path) -> list[dict]:
    """The selection with each ``file_name`` normalised, refusing a name that leaves the reference folder (absolute
    or through ``..``: a captions file must not make the evaluation read elsewhere) and two images sharing one file
    (it would count twice in the reference)."""
    owners: dict[str, int] = {}
    out = []
    for item in chosen:
        name = item["file_name"]
        if name:
            normal = os.path.normpath(name)
            if os.path.isabs(name) or PurePath(name).anchor or normal == ".." or normal.startswith(".." + os.sep):
                raise ValueError(f"{str(captions)!r}: image id {item['image_id']} has file_name {name!r}, outside the "
                                 "reference folder (benchmark.reference); names must be relative paths inside it")
            if normal in owners:
                raise ValueError(f"{str(captions)!r}: image ids {owners[normal]} and {item['image_id']} share the "
                                 f"file {normal!r}; each selected image needs its own file")
            owners[normal] = item["image_id"]
            name = normal
        out.append({**item, "file_name": name})
    return out


def list_images(folder: Path) -> list[Path]:
    """Image files under ``folder`` (recursive, hidden ones skipped), sorted by relative path."""
    return sorted(p for p in folder.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES
                  and not any(part.startswith(".") for part in p.relative_to(folder).parts))


def seeds_for(bench, num_samples: int) -> list[int]:
    return [sample_seed(bench.base_seed, bench.seed_offset + i) for i in range(num_samples)]


def build_protocol(bench, num_samples: int | None = None) -> Protocol:
    """The protocol of ``cfg.benchmark`` for ``num_samples`` (default ``benchmark.num_samples``)."""
    count = int(num_samples if num_samples is not None else bench.num_samples)
    if count < 1:
        raise ValueError(f"num_samples must be >= 1, got {count}")
    if count > MAX_SAMPLES:  # before a seed or prompt is listed: a typo must not fill the memory
        raise ValueError(f"num_samples={count} (benchmark.num_samples or --num-samples): at most {MAX_SAMPLES}")
    seeds = seeds_for(bench, count)
    reference = str(bench.reference or "")
    reference_path = Path(reference).expanduser() if reference else None
    if reference_path is not None and not reference_path.exists():
        raise FileNotFoundError(f"benchmark.reference: {str(reference_path)!r} does not exist (a folder of real "
                                "images or an .npz file with mu and sigma)")
    folder = reference_path if reference_path is not None and reference_path.is_dir() else None
    record: dict = {"kind": bench.protocol, "num_samples": count}
    if bench.protocol == "coco":
        captions = _existing(bench.captions, "benchmark.captions (a COCO captions JSON)")
        selection = read_coco_selection(captions)
        if count > len(selection):
            raise ValueError(f"benchmark.num_samples={count} but {str(captions)!r} has {len(selection)} captioned "
                             "images (one caption per image; COCO-30K uses captions_val2014.json)")
        chosen = selection[:count]
        prompts = [item["caption"] for item in chosen]
        identity = {"kind": "coco", "captions_sha256": file_sha256(captions), "selection": COCO_SELECTION}
        record.update(captions_file=str(captions.resolve()), captions_sha256=identity["captions_sha256"],
                      selection=COCO_SELECTION, num_captioned_images=len(selection),
                      image_ids_sha256=_sha256_json([item["image_id"] for item in chosen]))
        files = None
        if folder is not None:
            chosen = _files_inside(chosen, captions)
            missing = [item["file_name"] or f"(image id {item['image_id']} has no file_name)" for item in chosen
                       if not item["file_name"] or not (folder / item["file_name"]).is_file()]
            if missing:
                raise FileNotFoundError(f"benchmark.reference {str(folder)!r} lacks {len(missing)} of the {count} "
                                        f"selected COCO images, e.g. {missing[:3]} (a folder of the captions file's "
                                        "images, e.g. val2014/, or an .npz with mu/sigma)")
            files = [folder / item["file_name"] for item in chosen]
    elif bench.protocol == "imagenet":
        prompts = [str(i % bench.num_classes) for i in range(count)]
        identity = {"kind": "imagenet", "num_classes": int(bench.num_classes), "class_of_sample": "i % num_classes"}
        per_class = np.bincount(np.arange(count) % bench.num_classes, minlength=bench.num_classes)
        record.update(num_classes=int(bench.num_classes), class_of_sample="i % num_classes",
                      samples_per_class=[int(per_class.min()), int(per_class.max())])
        files = list_images(folder) if folder is not None else None
    elif bench.protocol == "prompts":
        prompts_file = _existing(bench.prompts_file, "benchmark.prompts_file (one prompt per line)")
        lines = [" ".join(line.split()) for line in prompts_file.read_text(encoding="utf-8-sig").splitlines()]
        lines = [line for line in lines if line]
        if not lines:
            raise ValueError(f"benchmark.prompts_file {str(prompts_file)!r} holds no prompt")
        prompts = [lines[i % len(lines)] for i in range(count)]
        identity = {"kind": "prompts", "prompts_sha256": _sha256_json(lines), "order": "line i % lines"}
        record.update(prompts_file=str(prompts_file.resolve()), prompts_file_sha256=file_sha256(prompts_file),
                      num_prompts=len(lines))
        files = list_images(folder) if folder is not None else None
    else:
        raise ValueError(f"benchmark.protocol {bench.protocol!r} is not one of coco, imagenet, prompts")
    if files is not None and len(files) < 2:
        raise ValueError(f"benchmark.reference {str(folder)!r} holds {len(files)} images; FID needs at least 2")
    identity.update(base_seed=int(bench.base_seed), seed_offset=int(bench.seed_offset))
    record.update(seeds=f"noiserefine.noise.sample_seed(base_seed={bench.base_seed}, {bench.seed_offset} + i) for "
                        "sample i; x_T = noise.noise_from_seed(seed, latent shape) (CPU generator, float32)",
                  base_seed=int(bench.base_seed), seed_offset=int(bench.seed_offset),
                  seeds_sha256=_sha256_json(seeds), prompts_sha256=_sha256_json(prompts), fid_image_rule=FID_IMAGE_RULE)
    if reference_path is None:
        record["reference"] = None
    elif files is not None:
        record["reference"] = {"kind": "folder", "path": str(reference_path.resolve()), "num_images": len(files)}
    else:
        record["reference"] = {"kind": "statistics file", "path": str(reference_path.resolve()),
                               "sha256": file_sha256(reference_path)}
    return Protocol(bench.protocol, prompts, seeds, files, reference, record, identity)


# ----------------------------------------------------------------------------------------------- image rule
def to_uint8(images01: torch.Tensor) -> torch.Tensor:
    """(B, C, H, W) floats in [0, 1] -> uint8 RGB ``round(255 x)`` on the CPU (grey images repeated to 3 channels)."""
    x = images01.detach().float().clamp(0, 1).mul(255).round().to(torch.uint8).cpu()
    if x.ndim != 4 or x.shape[1] not in (1, 3):
        raise ValueError(f"expected (B, 1|3, H, W) images, got {tuple(x.shape)}")
    return x.repeat(1, 3, 1, 1) if x.shape[1] == 1 else x


def _crop_resize(image, resolution: int):
    """PIL image -> center crop to the shorter side, bicubic resize to ``resolution`` (if not already)."""
    from PIL import Image

    width, height = image.size
    side = min(width, height)
    if (width, height) != (side, side):
        left, top = (width - side) // 2, (height - side) // 2
        image = image.crop((left, top, left + side, top + side))
    if side != resolution:
        image = image.resize((resolution, resolution), Image.BICUBIC)
    return image


def fid_image_rule(images_uint8: torch.Tensor, resolution: int) -> torch.Tensor:
    """The protocol's crop/resize on (B, 3, H, W) uint8 images; identity when they are already square at it."""
    if images_uint8.dtype != torch.uint8:
        raise ValueError(f"expected uint8 images, got {images_uint8.dtype}")
    height, width = images_uint8.shape[-2:]
    if resolution <= 0 or (height == width == resolution):
        return images_uint8
    from PIL import Image

    out = [np.asarray(_crop_resize(Image.fromarray(image.permute(1, 2, 0).numpy()), resolution))
           for image in images_uint8]
    return torch.from_numpy(np.stack(out)).permute(0, 3, 1, 2).contiguous()


def load_reference_image(path: Path, resolution: int) -> torch.Tensor:
    """A real image file as (3, R, R) uint8 under the protocol's rule."""
    from PIL import Image

    with Image.open(path) as image:
        image = _crop_resize(image.convert("RGB"), resolution)
        return torch.from_numpy(np.asarray(image).copy()).permute(2, 0, 1)


def load_statistics(path: str | Path, num_features: int | None = None,
                    key: str = "benchmark.reference") -> tuple[np.ndarray, np.ndarray]:
    """``mu`` (F,) and ``sigma`` (F, F) from an .npz (no pickle), checked before any sample is drawn: finite,
    ``F == num_features`` (the Inception network's, when given), ``sigma`` symmetric positive semi-definite (as
    every covariance is; anything else makes the FID meaningless or fails at the end in ``sqrtm``). Errors name
    the file, ``key`` and the array."""
    path = Path(path)
    where = f"{str(path)!r} ({key})"
    try:
        data = np.load(path, allow_pickle=False)
    except Exception as error:  # not .npy/.npz, truncated, or an object array (pickle refused)
        raise ValueError(f"{where} is not a readable .npz statistics file: {error}") from None
    if not isinstance(data, np.lib.npyio.NpzFile):
        raise ValueError(f"{where} is a single array, not an .npz with mu and sigma")
    with data:
        if "mu" not in data.files or "sigma" not in data.files:
            raise ValueError(f"{where} holds {sorted(data.files)}, not mu and sigma")
        try:
            mu, sigma = np.asarray(data["mu"], np.float64), np.asarray(data["sigma"], np.float64)
        except Exception as error:
            raise ValueError(f"{where}: unreadable mu/sigma: {error}") from None
    if mu.ndim != 1 or sigma.shape != (mu.size, mu.size):
        raise ValueError(f"{where}: mu {mu.shape} and sigma {sigma.shape} are not (F,) and (F, F) arrays")
    if not (np.isfinite(mu).all() and np.isfinite(sigma).all()):
        raise ValueError(f"{where}: mu or sigma is not finite (holds inf or nan)")
    if num_features is not None and mu.size != num_features:
        raise ValueError(f"{where}: mu and sigma are of {mu.size} features; the Inception network gives "
                         f"{num_features} (statistics of another network or layer)")
    scale = max(float(np.abs(sigma).max()), 1e-30)
    asymmetry = float(np.abs(sigma - sigma.T).max())
    if asymmetry > 1e-5 * scale:
        raise ValueError(f"{where}: sigma is not symmetric (max |sigma - sigma^T| = {asymmetry:.3g}, max |sigma| = "
                         f"{scale:.3g}); not a covariance matrix")
    eigenvalues = np.linalg.eigvalsh((sigma + sigma.T) / 2)
    if eigenvalues[0] < -1e-5 * max(float(np.abs(eigenvalues).max()), 1e-30):
        raise ValueError(f"{where}: sigma is not positive semi-definite (smallest eigenvalue {eigenvalues[0]:.3g}, "
                         f"largest {eigenvalues[-1]:.3g}); not a covariance matrix")
    return mu, sigma

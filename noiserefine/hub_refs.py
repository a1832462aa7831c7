"""Where a refiner comes from: a local directory or a Hugging Face Hub repo id.

A ``--refiner`` (or :func:`noiserefine.refiner.load_refiner`'s argument), the rule:

- a ``pathlib.Path``, or a string written as a path (absolute, ``./`` or ``../``, ``~``, more than one ``/``,
  a backslash, or anything that is not a valid repo id) is a local directory: the Hub is never asked;
- any other string (``name`` or ``owner/name``, huggingface_hub's ``validate_repo_id``) is a Hub repo id,
  resolved by ``snapshot_download`` (offline, ``HF_HUB_OFFLINE=1``: from its cache, else an error saying the
  id is not cached); only the refiner's files are fetched, never code or pickles;
- a repo-id-shaped string that also names an existing local directory is refused as ambiguous (write
  ``./owner/name`` for the directory): neither a folder planted in the working directory nor a repo id
  silently takes the other's place.

The files resolved from the Hub go through the same checks as a local directory (``load_refiner``).
"""

from __future__ import annotations

import os
from pathlib import Path

REFINER_FILES = ("refiner.safetensors", "config.yaml", "sampler.json")
CARD_FILE = "README.md"  # the model card (model_card.py)


def _written_as_path(text: str) -> bool:
    return (os.path.isabs(text) or text.startswith(("./", "../", "~")) or text in (".", "..")
            or "\\" in text or text.count("/") > 1 or text.endswith("/"))


def hub_repo_id(reference: str | Path) -> str | None:
    """The Hub repo id ``reference`` names under the rule above, or None for a local directory."""
    if isinstance(reference, Path):
        return None
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    text = str(reference)
    if _written_as_path(text):
        return None
    try:
        validate_repo_id(text)
    except HFValidationError:
        return None
    return text


def resolve_refiner(reference: str | Path, revision: str | None = None) -> Path:
    """The local directory of a refiner given as a directory or a Hub repo id (see the module's rule)."""
    repo_id = hub_repo_id(reference)
    if repo_id is None:
        return Path(reference).expanduser()
    if Path(repo_id).exists():
        raise ValueError(f"refiner {repo_id!r} is both a Hub repo id and a local path; write ./{repo_id} for the "
                         "local directory (a repo id is never read from the working directory)")
    from huggingface_hub import constants, snapshot_download
    from huggingface_hub.errors import LocalEntryNotFoundError, RepositoryNotFoundError

    try:
        return Path(snapshot_download(repo_id, revision=revision, allow_patterns=[*REFINER_FILES, CARD_FILE]))
    except LocalEntryNotFoundError as error:
        if constants.is_offline_mode():
            raise FileNotFoundError(f"refiner {repo_id!r}: the Hub repo id is not in the local Hub cache "
                                    f"({constants.HF_HUB_CACHE}) and HF_HUB_OFFLINE=1 forbids downloading it "
                                    f"(for a local directory write ./{repo_id})") from error
        raise FileNotFoundError(f"refiner {repo_id!r}: the Hub cannot be reached and the repo id is not in the "
                                f"local Hub cache ({error})") from error
    except RepositoryNotFoundError as error:
        raise FileNotFoundError(f"refiner {repo_id!r}: no such Hub repo (or no access; `hf auth login`); for a "
                                f"local directory write ./{repo_id}") from error

"""Share a refiner on the Hugging Face Hub: push an exported refiner directory to a model repo.

    python -m noiserefine.hub push RUN_DIR/refiner OWNER/NAME [--private] [--revision BRANCH]

``push`` uploads the refiner's files (``refiner.safetensors``, ``config.yaml``, ``sampler.json`` and the
model card ``README.md``) with ``huggingface_hub`` (``HfApi.create_repo`` + ``upload_folder``); the token
and endpoint are huggingface_hub's own (``HF_TOKEN`` / ``hf auth login``, ``HF_ENDPOINT``).

Where a ``--refiner`` or :func:`noiserefine.refiner.load_refiner`'s argument comes from (a directory or a
repo id): ``hub_refs.py``.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from .hub_refs import CARD_FILE, REFINER_FILES


def check_refiner_dir(directory: Path) -> None:
    missing = [name for name in REFINER_FILES if not (directory / name).is_file()]
    if missing:
        raise FileNotFoundError(f"{directory} is not an exported refiner: no {', '.join(missing)}")


def name_repo_in_card(path: Path, repo_id: str) -> None:
    """The card's usage snippet names the repo it is pushed to (export wrote a placeholder)."""
    from huggingface_hub import ModelCard

    from .files import write_text_atomic
    from .model_card import REPO_PLACEHOLDER

    card = ModelCard.load(path)
    if REPO_PLACEHOLDER in card.text:
        card.text = card.text.replace(REPO_PLACEHOLDER, repo_id)
        write_text_atomic(path, str(card))


def push(directory: str | Path, repo_id: str, private: bool = False, revision: str | None = None,
         api=None) -> str:
    """Upload an exported refiner's files (its model card written first if missing); returns the repo URL."""
    from huggingface_hub import HfApi
    from huggingface_hub.utils import validate_repo_id

    directory = Path(directory)
    check_refiner_dir(directory)
    validate_repo_id(repo_id)
    if not (directory / CARD_FILE).is_file():  # exported before model cards existed
        from .config import load_config
        from .model_card import write_model_card
        from .sampler_record import read_sampler_record

        write_model_card(directory, load_config(directory / "config.yaml"), read_sampler_record(directory), repo_id)
    name_repo_in_card(directory / CARD_FILE, repo_id)
    api = api or HfApi()
    url = api.create_repo(repo_id, repo_type="model", private=private, exist_ok=True)
    if revision:
        api.create_branch(repo_id, branch=revision, exist_ok=True)
    api.upload_folder(repo_id=repo_id, folder_path=str(directory), repo_type="model", revision=revision,
                      allow_patterns=[*REFINER_FILES, CARD_FILE],
                      commit_message=f"NoiseRefine refiner from {directory.resolve()}")
    return str(url)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m noiserefine.hub", description=__doc__.splitlines()[0])
    commands = parser.add_subparsers(dest="command", required=True)
    push_parser = commands.add_parser("push", help="upload an exported refiner directory to a Hub model repo")
    push_parser.add_argument("refiner", help="the refiner directory (RUN_DIR/refiner)")
    push_parser.add_argument("repo_id", help="OWNER/NAME on the Hub (created if missing)")
    push_parser.add_argument("--private", action="store_true", help="create the repo private")
    push_parser.add_argument("--revision", help="a branch to push to (created if missing); default main")
    args = parser.parse_args(argv)
    url = push(args.refiner, args.repo_id, private=args.private, revision=args.revision)
    print(f"pushed {args.refiner} to {url}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Train (or reuse) the embedded digit teacher.

    python -m noiserefine.digits.train_teacher --config configs/digits.yaml

Re-running with the same ``model.digits`` settings reuses the saved teacher.
"""

from __future__ import annotations

import sys

from .teacher import ensure_digits_teacher
from ..config import parse_cli, save_config


def main(argv: list[str] | None = None) -> int:
    cfg, _ = parse_cli(argv, description=__doc__)
    if cfg.model.backend != "digits":
        raise ValueError(f"only the digits backend is trained by the project, got model.backend={cfg.model.backend!r}")
    path = ensure_digits_teacher(cfg.model.digits, cfg.model.path)
    save_config(cfg, path / "config.yaml")
    print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())

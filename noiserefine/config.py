"""One typed configuration tree for every stage (teacher cache, training, evaluation).

The tree is a set of dataclasses used through ``OmegaConf.structured`` so that an unknown key or a wrong
type is caught when a YAML file or a ``key=value`` override is merged. Those errors are re-raised as
``ValueError`` naming the key and the file. The resolved config is saved next to every output.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from omegaconf import DictConfig, ListConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from .config_checks import ConfigValueError, validate
from .files import write_text_atomic
from .config_schema import Config


_RENAMED = {"train.batch_size": "train.batch_size (per rank) was replaced by train.global_batch_size (samples "
                                  "per step over all ranks: the old value times the number of ranks)"}


def _wrap(error: OmegaConfBaseException, origin: str) -> ValueError:
    key = getattr(error, "full_key", None) or "?"
    reason = str(error).splitlines()[0] if str(error) else type(error).__name__
    hint = f"; {_RENAMED[key]}" if key in _RENAMED else ""
    return ValueError(f"{origin}: bad config key '{key}': {reason}{hint}")


def _parse_override(item: str) -> tuple[str, Any]:
    """``key=value`` -> (key, value parsed like OmegaConf's dotlist does: YAML scalars, lists, dicts)."""
    key, _, raw = item.partition("=")
    key = key.strip()
    if not key:
        raise ValueError(f"command line: override '{item}' is not of the form key=value")
    return key, OmegaConf.to_container(OmegaConf.from_dotlist([f"value={raw}"]))["value"]


def _apply_override(cfg: DictConfig, key: str, value: Any) -> None:
    """Set ``key`` (dotted; list items by index: ``data.sources.0.weight``) in the typed tree.

    ``OmegaConf.from_dotlist`` turns ``data.sources.0.weight`` into a dict that cannot be
    merged into a list (a bare TypeError); ``OmegaConf.update`` walks lists by index.
    """
    parts = key.split(".")
    node: Any = cfg
    for depth, part in enumerate(parts[:-1]):
        child_key = ".".join(parts[:depth + 1])
        if isinstance(node, ListConfig):
            if not part.isdigit() or int(part) >= len(node):
                raise ValueError(f"command line: bad config key '{key}': no item {part!r} in "
                                 f"'{'.'.join(parts[:depth])}' (it has {len(node)} items)")
            node = node[int(part)]
        else:
            node = OmegaConf.select(node, part) if part in node else None
            if node is None:  # unknown key: let OmegaConf name it
                break
        if node is not None and not isinstance(node, (DictConfig, ListConfig)):
            raise ValueError(f"command line: bad config key '{key}': '{child_key}' is a value, not a section")
    try:
        OmegaConf.update(cfg, key, value, merge=True)
    except OmegaConfBaseException as error:
        raise _wrap(error, "command line") from None
    except (TypeError, ValueError) as error:
        raise ValueError(f"command line: bad config key '{key}': {error}") from None


def load_config(paths: list[str | Path] | str | Path | None = None,
                overrides: list[str] | None = None) -> DictConfig:
    """Merge the schema, then each YAML file in order, then ``key=value`` overrides.

    Raises ``ValueError`` naming the file (or "command line") and the key for an
    unknown key, a wrong type, a value outside its allowed choices or range.
    """
    if paths is None:
        paths = []
    elif isinstance(paths, (str, Path)):
        paths = [paths]
    cfg = OmegaConf.structured(Config)
    origins: list[tuple[str, Any]] = []  # (where, what it sets): files, then the command line
    for path in paths:
        path = Path(path)
        if not path.is_file():
            raise ValueError(f"config file not found: {path}")
        try:
            loaded = OmegaConf.load(path)
            cfg = OmegaConf.merge(cfg, loaded)
        except OmegaConfBaseException as error:
            raise _wrap(error, str(path)) from None
        except Exception as error:  # YAML syntax errors
            raise ValueError(f"{path}: cannot parse config: {error}") from None
        origins.append((str(path), loaded))
    if overrides:
        parsed = []
        for item in overrides:
            if "=" not in item:
                raise ValueError(f"command line: override '{item}' is not of the form key=value")
            parsed.append(_parse_override(item))
        for key, value in parsed:
            _apply_override(cfg, key, value)
        origins.append(("command line", [key for key, _ in parsed]))
    try:
        validate(cfg)
    except ConfigValueError as error:
        raise ValueError(f"{_origin(error.keys, origins)}: {error}") from None
    OmegaConf.set_readonly(cfg, True)
    return cfg


def refiner_run_config(refiner: str | Path, config_files: list, overrides: list) -> tuple[Path, DictConfig]:
    """``--refiner DIR`` of a command and its config: the given files, else the refiner's own ``config.yaml``."""
    from .hub_refs import resolve_refiner  # a Hub repo id: downloaded, or found in the Hub cache
    refiner_dir = resolve_refiner(refiner)
    if not refiner_dir.is_dir():
        raise FileNotFoundError(f"--refiner {str(refiner)!r} is not a directory ({refiner_dir})")
    return refiner_dir, load_config(config_files or [refiner_dir / "config.yaml"], overrides)


def _sets(source: Any, key: str) -> bool:
    if isinstance(source, list):  # override keys
        return any(key == k or key.startswith(k + ".") or k.startswith(key + ".") for k in source)
    try:
        return OmegaConf.select(source, key, default=None) is not None
    except OmegaConfBaseException:
        return False


def _origin(keys: tuple[str, ...], origins: list[tuple[str, Any]]) -> str:
    """The last source (command line, else the last file) that sets one of ``keys``; else the defaults."""
    for where, source in reversed(origins):
        if any(_sets(source, key) for key in keys):
            return where
    return "defaults"


def to_yaml(cfg: DictConfig) -> str:
    return OmegaConf.to_yaml(cfg, resolve=True)


def save_config(cfg: DictConfig, path: str | Path) -> Path:
    """Write the resolved config as YAML atomically (temp file + rename)."""
    path = Path(path)
    write_text_atomic(path, to_yaml(cfg))
    return path


def config_from_container(container: dict[str, Any]) -> DictConfig:
    """Rebuild a typed config from a plain dict (e.g. one stored in a checkpoint)."""
    try:
        cfg = OmegaConf.merge(OmegaConf.structured(Config), container)
    except OmegaConfBaseException as error:
        raise _wrap(error, "stored config") from None
    try:
        validate(cfg)
    except ConfigValueError as error:
        raise ValueError(f"stored config: {error}") from None
    return cfg


def parse_cli(argv: list[str] | None = None, description: str = "",
              add_arguments: Any = None) -> tuple[DictConfig, Any]:
    """``--config FILE`` (repeatable, later wins) then ``key=value`` overrides; ``add_arguments(parser)`` adds a
    command's own options."""
    import argparse

    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--config", action="append", default=[], help="YAML config (repeatable)")
    if add_arguments is not None:
        add_arguments(parser)
    parser.add_argument("overrides", nargs="*", help="key=value overrides, applied last")
    args, unknown = parser.parse_known_args(argv)
    # deepspeed's launcher adds --local_rank=N; everything else unknown is a mistake.
    stray = [a for a in unknown if not a.startswith("--local_rank")]
    if stray:
        parser.error(f"unrecognised arguments: {' '.join(stray)}")
    return load_config(args.config, args.overrides), args

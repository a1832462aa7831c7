"""Offline checks of ``infra/cluster.yaml``, the Ray cluster-launcher config.

Ray's own validation is used the way ``ray up`` uses it before it first talks
to AWS (``ray.autoscaler._private.commands._bootstrap_config``):

* ``prepare_config``: merges ``ray/autoscaler/aws/defaults.yaml`` under the
  file (``fillout_defaults``), prepends ``setup_commands`` to the head/worker
  setup lists, checks the docker section and fills per-node-type worker
  bounds.  For ``provider.type: aws`` this is purely local (no boto3, no
  network; the ``no_network`` fixture enforces that).
* ``validate_config``: ``jsonschema`` against ``ray/autoscaler/ray-schema.json``
  plus Ray's cross-field checks (head type exists, sum of min_workers).

What ``ray up`` does afterwards (autodetecting node resources via the EC2 API,
``bootstrap_aws``: IAM role, key pair, subnets, security groups) needs AWS and
is not exercised here. Beyond Ray's checks only two facts are tested: the
local paths of ``file_mounts`` exist (``ray up`` asserts it) and the documented
``ray submit`` overrides are valid keys of our own config.
"""

from __future__ import annotations

import copy
import os
import re
import socket
from pathlib import Path

import pytest
import yaml

try:
    import jsonschema
    from ray.autoscaler._private.util import prepare_config, validate_config
except ImportError as exc:  # deliberately not importorskip: a moved API must fail loudly
    raise ImportError(
        "tests/test_cluster_config.py validates infra/cluster.yaml with Ray's PRIVATE "
        "cluster-launcher helpers ray.autoscaler._private.util.prepare_config and "
        "validate_config (and jsonschema, which validate_config uses). Importing them "
        f"failed: {exc!r}. If Ray was upgraded and they moved, update this import "
        "(look for them next to ray/autoscaler/_private/commands.py::_bootstrap_config)."
    ) from exc

REPO_ROOT = Path(__file__).resolve().parents[1]
CLUSTER_YAML = REPO_ROOT / "infra" / "cluster.yaml"
README = REPO_ROOT / "infra" / "README.md"



def load_raw() -> dict:
    with open(CLUSTER_YAML) as handle:
        return yaml.safe_load(handle)  # what `ray up` does


def ray_validate(config: dict) -> dict:
    """prepare_config + validate_config, in the order `ray up` applies them."""
    prepared = prepare_config(copy.deepcopy(config))
    validate_config(prepared)
    return prepared


@pytest.fixture
def no_network(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("cluster-config validation tried to use the network")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)
    monkeypatch.setattr(socket, "getaddrinfo", refuse)


@pytest.fixture
def raw() -> dict:
    return load_raw()


def worker_types(config: dict) -> dict:
    return {
        name: node_type
        for name, node_type in config["available_node_types"].items()
        if name != config["head_node_type"]
    }


def repo_mount(config: dict) -> str:
    """The remote path that file_mounts maps to the repo root."""
    remotes = [
        remote
        for remote, local in config.get("file_mounts", {}).items()
        if (REPO_ROOT / os.path.expanduser(local)).resolve() == REPO_ROOT
    ]
    assert remotes, (
        f"no file_mounts entry maps a remote path to the repo root {REPO_ROOT} "
        "(local paths are resolved against the directory `ray up` runs in: the repo root)"
    )
    assert len(remotes) == 1, f"repo root mounted more than once: {remotes}"
    return remotes[0]


# --------------------------------------------------------------------------- Ray's validation


def test_passes_ray_validation_offline(raw, no_network):
    prepared = ray_validate(raw)
    # prepare_config really merged Ray's AWS defaults under our file ...
    assert "cluster_synced_files" in prepared and "cluster_synced_files" not in raw
    # ... and prepended the common setup_commands to the head/worker lists.
    assert prepared["head_setup_commands"][: len(raw["setup_commands"])] == raw["setup_commands"]
    assert prepared["worker_setup_commands"][: len(raw["setup_commands"])] == raw["setup_commands"]


def _set(*path, new_key=False):
    """Return a mutation that sets config[path...] = value (the key must exist unless new_key)."""

    def mutate(config, value):
        *parents, leaf = path
        node = config
        for key in parents:
            node = node[key]  # a KeyError means the YAML changed shape: update the test
        assert new_key or leaf in node, f"{path} is not in the config: update the test"
        node[leaf] = value

    return mutate


def _worker(config) -> tuple:
    return ("available_node_types", next(iter(worker_types(config))))


# name: (mutation, exception Ray must raise, text the error must mention)
BROKEN = {
    "unknown top-level key": (
        lambda c: _set("max_worker", new_key=True)(c, 4),  # typo of max_workers
        jsonschema.ValidationError,
        "max_worker",
    ),
    "max_workers is a string": (
        lambda c: _set("max_workers")(c, "many"),
        jsonschema.ValidationError,
        "many",
    ),
    "idle_timeout_minutes is a string": (
        lambda c: _set("idle_timeout_minutes")(c, "ten"),
        jsonschema.ValidationError,
        "ten",
    ),
    "unknown key in a node type": (
        lambda c: _set(*_worker(c), "min_worker", new_key=True)(c, 1),
        jsonschema.ValidationError,
        "min_worker",
    ),
    "fractional GPU resource": (
        lambda c: _set(*_worker(c), "resources", "GPU")(c, 0.5),
        jsonschema.ValidationError,
        "0.5",
    ),
    "start commands are a string": (
        lambda c: _set("head_start_ray_commands")(c, "ray start --head"),
        jsonschema.ValidationError,
        "ray start --head",
    ),
    "head_node_type not defined": (
        lambda c: _set("head_node_type")(c, "no_such_type"),
        ValueError,
        "head_node_type",
    ),
}


@pytest.mark.parametrize("case", sorted(BROKEN))
def test_broken_copy_fails_ray_validation(case, no_network):
    mutate, error, fragment = BROKEN[case]
    broken = load_raw()
    mutate(broken)
    assert broken != load_raw()
    with pytest.raises(error) as info:
        ray_validate(broken)
    assert fragment in str(info.value)


# --------------------------------------------------------------------------- what `ray up` and our config check


def test_file_mounts_map_a_path_to_the_repo_root(raw):
    remote = repo_mount(raw)
    assert remote.rstrip("/") == "~/noiserefine"
    for remote_path, local in raw["file_mounts"].items():
        # `ray up` asserts os.path.exists(local) for every mount.
        assert (REPO_ROOT / os.path.expanduser(local)).exists(), (
            f"file_mounts {remote_path}: local path {local!r} does not exist under the repo root"
        )


def test_head_setup_installs_boto3(raw, no_network):
    # Overriding head_setup_commands drops Ray's default boto3 install, and the
    # autoscaler on the head needs boto3 to launch workers.
    prepared = ray_validate(raw)
    assert any("boto3" in cmd for cmd in prepared["head_setup_commands"])


@pytest.mark.parametrize("doc", [CLUSTER_YAML, README], ids=lambda p: p.name)
def test_documented_submit_overrides_are_valid_config_keys(doc):
    from noiserefine.config import load_config
    from noiserefine.storage import is_remote

    sections = "model|teacher|student|refiner|data|pipeline|train|eval"
    overrides = re.findall(rf"(?<![\w.-])((?:{sections})\.[\w.]+=\S+)", doc.read_text())
    assert overrides, f"{doc.name} documents no key=value overrides for `ray submit`"
    cfg = load_config(overrides=overrides)  # raises ValueError on an unknown key / bad type
    assert is_remote(cfg.data.cache_root) or os.path.isabs(cfg.data.cache_root), (
        f"{doc.name}: data.cache_root should be an object-store URL or an absolute path on shared storage"
    )

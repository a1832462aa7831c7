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
is not exercised here.  The semantic checks below cover what the schema does
not.
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
    import ray
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

AMI_ID = re.compile(r"^ami-(?:[0-9a-f]{8}|[0-9a-f]{17})$")
MIN_ROOT_VOLUME_GIB = 100  # the EC2 default (8 GiB) cannot even hold the DLAMI


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


def test_loads_as_yaml_for_aws(raw):
    assert isinstance(raw, dict), "infra/cluster.yaml is not a YAML mapping"
    assert raw["cluster_name"] == "noiserefine"
    provider = raw["provider"]
    assert provider["type"] == "aws"
    assert re.fullmatch(r"[a-z]{2}(-[a-z]+)+-\d", provider.get("region", "")), provider
    assert isinstance(provider.get("cache_stopped_nodes"), bool)
    for key in ("max_workers", "upscaling_speed", "idle_timeout_minutes"):
        assert key in raw, f"{key} should be set explicitly"


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


# --------------------------------------------------------------------------- what the schema does not check


def test_head_node_type_is_an_available_node_type(raw):
    assert raw["head_node_type"] in raw["available_node_types"], (
        f"head_node_type {raw['head_node_type']!r} not in {sorted(raw['available_node_types'])}"
    )


def test_head_is_cpu_only_and_workers_have_gpus(raw):
    head = raw["available_node_types"][raw["head_node_type"]]
    assert head["resources"].get("CPU", 0) >= 1, "head should advertise its CPUs"
    assert head["resources"].get("GPU", 0) == 0, "the head is the CPU node"
    workers = worker_types(raw)
    assert workers, "no worker node type"
    for name, node_type in workers.items():
        resources = node_type["resources"]
        assert resources.get("GPU", 0) >= 1, f"worker type {name} has no GPU resources"
        assert resources.get("CPU", 0) >= 1, f"worker type {name} has no CPU resources"


def test_node_configs_are_plausible_ec2_launch_configs(raw):
    for name, node_type in raw["available_node_types"].items():
        node_config = node_type["node_config"]
        assert isinstance(node_config.get("InstanceType"), str), f"{name}: InstanceType"
        assert AMI_ID.fullmatch(str(node_config.get("ImageId", ""))), (
            f"{name}: ImageId {node_config.get('ImageId')!r} is not an AMI id"
        )
        volumes = [
            mapping["Ebs"]["VolumeSize"]
            for mapping in node_config.get("BlockDeviceMappings", [])
            if mapping.get("DeviceName") in ("/dev/sda1", "/dev/xvda")
        ]
        assert volumes and volumes[0] >= MIN_ROOT_VOLUME_GIB, (
            f"{name}: needs a root-volume BlockDeviceMapping >= {MIN_ROOT_VOLUME_GIB} GiB"
        )


def test_file_mounts_map_a_path_to_the_repo_root(raw):
    remote = repo_mount(raw)
    assert remote.rstrip("/") == "~/noiserefine"
    for remote_path, local in raw["file_mounts"].items():
        # `ray up` asserts os.path.exists(local) for every mount.
        assert (REPO_ROOT / os.path.expanduser(local)).exists(), (
            f"file_mounts {remote_path}: local path {local!r} does not exist under the repo root"
        )


def test_setup_commands_pip_install_the_mounted_project_on_every_node(raw):
    remote = re.escape(repo_mount(raw).rstrip("/"))
    install = re.compile(rf"\bpip install\b[^;&|]*\s-e\s+{remote}/?(?=\s|$|[;&|])")
    # Global setup_commands run on the head and on every worker.
    assert any(install.search(cmd) for cmd in raw["setup_commands"]), raw["setup_commands"]
    # A node type's own worker_setup_commands REPLACE the global ones on that type.
    for name, node_type in raw["available_node_types"].items():
        override = node_type.get("worker_setup_commands")
        if override is not None:
            assert any(install.search(cmd) for cmd in override), (
                f"{name}.worker_setup_commands overrides setup_commands without installing the project"
            )


def test_setup_commands_pin_the_local_ray_version(raw):
    pins = re.findall(r"ray\[default\]==([0-9][^\s\"']*)", " ".join(raw["setup_commands"]))
    assert pins == [ray.__version__], (
        f"setup_commands pin ray {pins}, but `ray up` runs with ray {ray.__version__}; "
        "the cluster's Ray must match the local one"
    )


def test_head_setup_installs_boto3(raw, no_network):
    # Overriding head_setup_commands drops Ray's default boto3 install, and the
    # autoscaler on the head needs boto3 to launch workers.
    prepared = ray_validate(raw)
    assert any("boto3" in cmd for cmd in prepared["head_setup_commands"])


def test_start_commands(raw):
    head = " ; ".join(raw["head_start_ray_commands"])
    assert raw["head_start_ray_commands"][0].strip() == "ray stop"
    for flag in ("ray start --head", "--port=6379", "--autoscaling-config=~/ray_bootstrap_config.yaml"):
        assert flag in head, f"head_start_ray_commands lacks {flag}"
    worker = " ; ".join(raw["worker_start_ray_commands"])
    assert raw["worker_start_ray_commands"][0].strip() == "ray stop"
    assert "ray start --address=$RAY_HEAD_IP:6379" in worker


def test_worker_bounds(raw):
    global_max = raw["max_workers"]
    assert isinstance(global_max, int) and global_max >= 1
    for name, node_type in raw["available_node_types"].items():
        low, high = node_type.get("min_workers"), node_type.get("max_workers")
        assert isinstance(low, int) and isinstance(high, int), f"{name}: set min/max_workers"
        assert 0 <= low <= high <= global_max, f"{name}: need 0 <= {low} <= {high} <= {global_max}"
    assert any(t["max_workers"] >= 1 for t in worker_types(raw).values()), "workers cannot scale up"
    assert sum(t["min_workers"] for t in raw["available_node_types"].values()) <= global_max


def test_rsync_never_uploads_the_local_venv_or_git(raw):
    excludes = {pattern.strip("/") for pattern in raw.get("rsync_exclude", [])}
    assert {".venv", ".git"} <= excludes, raw.get("rsync_exclude")


@pytest.mark.parametrize("doc", [CLUSTER_YAML, README], ids=lambda p: p.name)
def test_documented_submit_overrides_are_valid_config_keys(doc):
    from noiserefine.config import load_config

    sections = "model|teacher|student|refiner|data|pipeline|train|eval"
    overrides = re.findall(rf"(?<![\w.-])((?:{sections})\.[\w.]+=\S+)", doc.read_text())
    assert overrides, f"{doc.name} documents no key=value overrides for `ray submit`"
    cfg = load_config(overrides=overrides)  # raises ValueError on an unknown key / bad type
    assert os.path.isabs(cfg.data.cache_root), (
        f"{doc.name}: data.cache_root should be an absolute path on shared storage"
    )

"""The Slurm scripts (``infra/slurm/``): they parse, they name real entry points and options, and the multi-node
training script trains as two "nodes" on this machine.

The two-node runs execute ``infra/slurm/train.sbatch`` itself with stand-ins for ``srun`` and ``scontrol``
(``tests/slurm_stub/``: one task per node, each in its own session with ``SLURM_NODEID`` set, as srun starts
them). So the whole chain runs: sbatch script -> srun -> ``train_node.sh`` -> ``deepspeed --no_ssh --node_rank
N`` -> ``trainer/train.py``, one rank per node (DS_ACCELERATOR=cpu, gloo), rendezvous at the first node's
address. The node names are two names of this machine (127.0.0.1, localhost): only the first is connected to.
Tiny digits cache, 4 steps of global batch 8, a checkpoint every 2.
"""

from __future__ import annotations

import csv
import importlib.util
import json
import os
import re
import subprocess
import sys
from collections import defaultdict
from pathlib import Path

import pytest

from faults.test_elastic import assert_same_refiner, assert_same_up_to_rounding_amplified_by_adam, global_sequence
from helpers_cache import REPO, tiny_cache, tiny_root, tiny_teacher  # noqa: F401
from noiserefine.train.distributed import free_port
from test_trainer import child_env, deepspeed_launcher, train_args

SLURM = REPO / "infra" / "slurm"
STUB = REPO / "tests" / "slurm_stub"
SCRIPTS = sorted(SLURM.glob("*.sbatch")) + sorted(SLURM.glob("*.sh")) + sorted(STUB.iterdir())
MAX_STEPS, LEARNING_RATE = 4, 0.01
SETTINGS = [f"train.max_steps={MAX_STEPS}", "train.checkpoint_every=2", "train.log_every=1", "train.eval_every=0",
            f"train.learning_rate={LEARNING_RATE}", "train.global_batch_size=8"]
TIMEOUT = 600
ENTRY_POINT = re.compile(r"\b(?:trainer|pipeline|infra/slurm)/[\w./-]+\.(?:py|sh)\b")


# --- fast: the scripts parse and name what exists ------------------------------------------------------------

def bash_n(path: Path) -> subprocess.CompletedProcess:
    return subprocess.run(["bash", "-n", str(path)], capture_output=True, text=True)


def package_file(package: str, *parts: str) -> Path:
    return Path(importlib.util.find_spec(package).submodule_search_locations[0], *parts)


def test_bash_n_catches_a_broken_script(tmp_path):
    """Guard: the syntax check below can fail."""
    broken = tmp_path / "broken.sbatch"
    broken.write_text("#!/bin/bash\nif [ -n x ]; then\n  echo\n")
    assert bash_n(broken).returncode != 0


@pytest.mark.parametrize("script", SCRIPTS, ids=lambda p: p.name)
def test_scripts_pass_bash_n(script):
    result = bash_n(script)
    assert result.returncode == 0, result.stderr
    assert os.access(script, os.X_OK), f"{script} is not executable"


def test_scripts_name_real_entry_points_and_options():
    text = {path.name: path.read_text() for path in SCRIPTS if path.parent == SLURM}
    assert set(text) == {"generate_targets.sbatch", "train.sbatch", "train_node.sh"}
    named = {name: set(ENTRY_POINT.findall(body)) for name, body in text.items()}
    assert "pipeline/generate_targets.py" in named["generate_targets.sbatch"]
    assert "infra/slurm/train_node.sh" in named["train.sbatch"] and "trainer/train.py" in named["train_node.sh"]
    missing = sorted(p for paths in named.values() for p in paths if not (REPO / p).is_file())
    assert not missing, f"the scripts name files that do not exist: {missing}"
    # The launchers' options as the pinned versions spell them (their parsers' source, read without importing)
    deepspeed_line = text["train_node.sh"][text["train_node.sh"].index("exec deepspeed"):]
    options = set(re.findall(r"(--[a-z_]+)", deepspeed_line.split("trainer/train.py")[0]))
    assert {"--no_ssh", "--node_rank", "--master_addr", "--master_port", "--hostfile"} <= options
    source = package_file("deepspeed", "launcher", "runner.py").read_text()
    assert all(f'"{option}"' in source for option in options), options
    ray_lines = [line.split("ray start", 1)[-1] for line in text["generate_targets.sbatch"].splitlines()
                 if "ray start" in line or line.startswith("cpus=")]
    flags = {flag for line in ray_lines for flag in re.findall(r"(--[a-z-]+)", line)}
    assert {"--head", "--address", "--port", "--block", "--node-ip-address"} <= flags
    source = package_file("ray", "scripts", "scripts.py").read_text()
    assert all(f'"{flag}"' in source for flag in flags), flags


def test_the_ray_scripts_python_wait_compiles():
    """bash -n does not parse the Python heredoc that waits for the Ray nodes: compile it."""
    text = (SLURM / "generate_targets.sbatch").read_text()
    heredoc = re.search(r"<<'PY'\n(.*?)\nPY\n", text, re.S)
    assert heredoc and "ray.nodes()" in heredoc.group(1)
    compile(heredoc.group(1), "generate_targets.sbatch <<'PY'", "exec")


# --- slow: two "nodes" of one rank each -----------------------------------------------------------------------

def sbatch(out: Path, root: Path, teacher: Path, logs: Path, **env: str) -> subprocess.Popen:
    """``bash infra/slurm/train.sbatch <trainer arguments>`` in a stand-in allocation of two nodes."""
    logs.mkdir(parents=True, exist_ok=True)
    arguments = train_args(root, teacher, out, *SETTINGS)[1:]  # after the script: --config ... key=value ...
    path = os.pathsep.join([str(STUB), str(Path(sys.executable).parent), os.environ.get("PATH", "")])
    allocation = {"SLURM_JOB_NODELIST": "127.0.0.1,localhost", "SLURM_JOB_ID": str(os.getpid()),
                  "SLURM_SUBMIT_DIR": str(REPO), "MASTER_PORT": str(free_port()), "GPUS_PER_NODE": "1",
                  "SRUN_STUB_LOGS": str(logs), "TMPDIR": str(logs), "PATH": path}
    handle = open(logs / "sbatch.log", "w")
    return subprocess.Popen(["bash", str(SLURM / "train.sbatch"), *arguments], cwd=logs,
                            env=child_env(**allocation, **env), stdout=handle, stderr=subprocess.STDOUT, text=True)


def node_logs(logs: Path) -> dict[int, str]:
    """Each node's output (the stand-in srun writes ``<step>.node<ID>.log``)."""
    found = {int(p.name.rsplit("node", 1)[1][:-len(".log")]): p.read_text() for p in logs.glob("*.node*.log")}
    return dict(sorted(found.items()))


def finish(proc: subprocess.Popen, logs: Path) -> tuple[int, dict[int, str]]:
    code = proc.wait(timeout=TIMEOUT)
    return code, node_logs(logs)


def writes(record_dir: Path) -> dict[str, list[int]]:
    """Path -> the pid of each write to it (``NOISEREFINE_RECORD_WRITES``, tests/hooks/sitecustomize.py)."""
    found: dict[str, list[int]] = defaultdict(list)
    for path in record_dir.glob("writes.*.txt"):
        pid = int(path.name.split(".")[1])
        for line in path.read_text().splitlines():
            found[line].append(pid)
    return found


@pytest.fixture(scope="module")
def runs(tiny_root, tiny_teacher, tiny_cache, tmp_path_factory) -> dict:
    """At once: the 2-rank single-node reference (deepspeed --num_gpus 2), the two-node run (writes recorded),
    and a two-node run whose node 1 is SIGKILLed (launcher and rank) at step 3. Then that run submitted again."""
    base = tmp_path_factory.mktemp("slurm")
    (base / "record").mkdir()
    reference_log = open(base / "reference.log", "w")
    reference = subprocess.Popen(deepspeed_launcher() + ["--num_gpus", "2", "--master_port", str(free_port())]
                                 + train_args(tiny_root, tiny_teacher, base / "reference", *SETTINGS), cwd=REPO,
                                 env=child_env(), stdout=reference_log, stderr=subprocess.STDOUT, text=True)
    two_nodes = sbatch(base / "two_nodes", tiny_root, tiny_teacher, base / "two_nodes_logs",
                       NOISEREFINE_RECORD_WRITES=str(base / "record"))
    killed = sbatch(base / "killed", tiny_root, tiny_teacher, base / "killed_logs", NOISEREFINE_TRAIN_KILL_NODE="1:3")
    results = {"reference": (reference.wait(timeout=TIMEOUT), (base / "reference.log").read_text()),
               "two_nodes": finish(two_nodes, base / "two_nodes_logs"),
               "killed": finish(killed, base / "killed_logs")}
    results["finished_after_kill"] = (base / "killed" / "done.json").exists()
    results["resumed"] = finish(sbatch(base / "killed", tiny_root, tiny_teacher, base / "resumed_logs"),
                                base / "resumed_logs")
    return {"base": base, **results}


def both_ok(result) -> None:
    code, logs = result
    assert code == 0 and sorted(logs) == [0, 1], "\n".join(text[-3000:] for text in logs.values())


@pytest.mark.slow
def test_two_nodes_of_one_rank_train_the_refiner_of_two_ranks_on_one_node(runs):
    assert runs["reference"][0] == 0, runs["reference"][1][-4000:]
    both_ok(runs["two_nodes"])
    logs = runs["two_nodes"][1]
    for node in (0, 1):  # deepspeed's launcher on each node, told its node rank, one local rank each
        assert f"nnodes=2, num_local_procs=1, node_rank={node}" in logs[node], logs[node][-3000:]
    base = runs["base"]
    assert sorted(p.name for p in (base / "two_nodes").glob("samples_rank*.jsonl")) == [
        "samples_rank0.jsonl", "samples_rank1.jsonl"]  # global ranks 0 and 1, not two local rank 0s
    assert global_sequence(base / "two_nodes") == global_sequence(base / "reference")
    assert_same_up_to_rounding_amplified_by_adam(base / "reference", base / "two_nodes", LEARNING_RATE, MAX_STEPS)


@pytest.mark.slow
def test_each_checkpoint_and_log_is_written_once_by_one_process(runs):
    """Each node's rank has LOCAL_RANK 0: only global rank 0 may write the shared run directory's files."""
    both_ok(runs["two_nodes"])
    out = runs["base"] / "two_nodes"
    written = {path: pids for path, pids in writes(runs["base"] / "record").items()
               if Path(path).is_relative_to(out)}
    checkpoint_files = sorted(str(p) for p in (out / "checkpoints").glob("step*/*") if p.is_file())
    assert any(p.endswith("mp_rank_00_model_states.pt") for p in checkpoint_files)  # DeepSpeed's writes are seen
    assert set(checkpoint_files) <= set(written), sorted(set(checkpoint_files) - set(written))
    assert all(len(set(pids)) == 1 for pids in written.values()), {p: v for p, v in written.items()
                                                                     if len(set(v)) > 1}
    once = {p: len(pids) for p, pids in written.items() if not p.endswith((".csv", ".jsonl", "latest"))}
    assert set(once.values()) == {1}, {p: n for p, n in once.items() if n > 1}
    for tag in ("step00000002", "step00000004"):  # the record lists exactly the files there, unchanged since
        record = json.loads((out / "checkpoints" / tag / "checkpoint.json").read_text())
        assert sorted(record["files"]) == sorted(p.name for p in (out / "checkpoints" / tag).iterdir()
                                                 if p.name != "checkpoint.json")
    with open(out / "train_log.csv") as handle:
        steps = [int(row["step"]) for row in csv.DictReader(handle)]
    assert steps == list(range(1, MAX_STEPS + 1))


@pytest.mark.slow
def test_a_node_sigkilled_then_both_resubmitted_ends_with_the_uninterrupted_refiner(runs):
    code, logs = runs["killed"]
    assert code != 0 and not runs["finished_after_kill"], "\n".join(t[-3000:] for t in logs.values())
    assert "test hook: SIGKILL to the node of rank 1 at step 3" in logs[1], logs[1][-3000:]
    assert "lost contact with another rank" in logs[0], logs[0][-3000:]
    both_ok(runs["resumed"])
    resumed = runs["resumed"][1]
    assert "resuming from" in resumed[0] and "step00000002" in resumed[0], resumed[0][-3000:]
    base = runs["base"]
    assert global_sequence(base / "killed") == global_sequence(base / "two_nodes")
    assert_same_refiner(base / "two_nodes", base / "killed")

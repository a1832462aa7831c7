"""Fault tests of the commands' output folders (issue 21 item 2, the class): a user's non-empty folder given as
``--out`` / ``--run-dir`` is refused before anything in it is replaced; the command's own folder is re-used
(``files.refuse_foreign_directory``; the evaluation and sample commands are tested in test_evaluate/test_sample)."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

from noiserefine.digits.demo import parse_args, run_setup
from noiserefine.files import refuse_foreign_directory

REPO = Path(__file__).resolve().parents[2]


def files_of(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def test_refuse_foreign_directory_accepts_only_what_is_positively_ours(tmp_path):
    refuse_foreign_directory(tmp_path / "new", "marker.json", "ours")  # new
    (tmp_path / "empty").mkdir()
    refuse_foreign_directory(tmp_path / "empty", "marker.json", "ours")
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "marker.json").write_text("{}")
    (tmp_path / "mine" / "report.md").write_text("x")
    refuse_foreign_directory(tmp_path / "mine", "marker.json", "ours")
    (tmp_path / "old").mkdir()
    (tmp_path / "old" / "legacy.json").write_text("{}")
    refuse_foreign_directory(tmp_path / "old", "marker.json", "ours", also_ours=("legacy.json",))
    (tmp_path / "theirs").mkdir()
    (tmp_path / "theirs" / "thesis.tex").write_text("x")
    with pytest.raises(ValueError, match=r"theirs is not empty and holds no marker\.json: it is not ours.*thesis"):
        refuse_foreign_directory(tmp_path / "theirs", "marker.json", "ours")
    (tmp_path / "a-file").write_text("x")
    with pytest.raises(ValueError, match=r"a-file exists and is not a directory"):
        refuse_foreign_directory(tmp_path / "a-file", "marker.json", "ours")


@pytest.mark.parametrize("command", ["demo", "multi_scale"])
def test_the_demo_run_dir_refuses_a_foreign_folder(tmp_path, command):
    from noiserefine.digits.multi_scale import QUICK_MULTI

    quick = [QUICK_MULTI] if command == "multi_scale" else []
    mine = tmp_path / "home"
    mine.mkdir()
    (mine / "config.yaml").write_text("my: config\n")
    (mine / "metrics.json").write_text("{}\n")
    before = files_of(mine)
    with pytest.raises(ValueError, match=rf"{mine}.*not a run directory of the digits demo"):
        run_setup(parse_args(["--run-dir", str(mine), "--quick"]), *quick)
    assert files_of(mine) == before
    run_dir, _, _ = run_setup(parse_args(["--run-dir", str(tmp_path / "run"), "--quick"]), *quick)
    (run_dir / "config.yaml").write_text("written by the demo\n")
    assert run_setup(parse_args(["--run-dir", str(run_dir)]))[0] == run_dir  # its own: re-used (demo + multi_scale)


def test_gpu_check_out_refuses_a_foreign_folder(tmp_path):
    if str(REPO) not in sys.path:
        sys.path.insert(0, str(REPO))
    from bench.gpu.runner import Runner

    mine = tmp_path / "docs"
    mine.mkdir()
    (mine / "cases.txt").write_text("mine\n")
    before = files_of(mine)

    def runner(out):
        return Runner([], out, tmp_path / "work", device="cpu", tiny=True, budget_s=60.0, started=0.0)

    with pytest.raises(ValueError, match=rf"{mine}.*not an output folder of bench/gpu_check\.py"):
        runner(mine)
    assert files_of(mine) == before
    assert runner(tmp_path / "report").out == tmp_path / "report"


@pytest.mark.slow  # the tiny teacher fixture; on the old code the whole run trained into the folder
def test_the_trainer_refuses_a_foreign_output_dir_before_writing(tmp_path, tiny_root, tiny_teacher, tiny_cache):
    """Found in review (issue 21's output-folder class): ``train.output_dir`` at a user's non-empty folder got the
    run's config.yaml, logs, checkpoints/ and refiner/ written into it."""
    from helpers_cache import tiny_config
    from noiserefine.train.loop import train

    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "config.yml").write_text("my notes\n")
    before = files_of(mine)
    cfg = tiny_config(tiny_root, tiny_teacher, [f"train.output_dir={mine}", "train.max_steps=1"])
    with pytest.raises(ValueError, match=rf"{mine}.*not the output folder of a training run"):
        train(cfg)
    assert files_of(mine) == before


@pytest.mark.parametrize("value", ["S3://bucket/run", "s3://bucket/run", "gs://bucket/run", "s3:/bucket/run"])
def test_a_url_as_the_training_output_dir_is_refused_naming_the_key(value):
    """``train.output_dir`` is a local (or mounted) directory: a URL became a local folder ``S3:`` (or ``s3:``)."""
    from noiserefine.config import load_config

    with pytest.raises(ValueError, match="train.output_dir"):
        load_config(REPO / "configs" / "digits.yaml", [f"train.output_dir={value}"])

"""Fault tests of ``python -m noiserefine.sample`` (issue 21): its ``--out``, ``--seeds``, ``--prompts-file`` and
the refiner's ``sampler.json``."""

from __future__ import annotations

import json
import shutil

import pytest

from noiserefine.sample import main, parse_seeds
from noiserefine.sampler_record import read_sampler_record

from .tiny_refiner import tiny_sd_and_refiner

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


@pytest.fixture(scope="module")
def refiner_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("sample-faults")
    patch = pytest.MonkeyPatch()
    patch.setenv("NOISEREFINE_HASH_CACHE", str(root / "file_hashes.json"))
    _, directory = tiny_sd_and_refiner(root)
    yield directory
    patch.undo()


def sample(refiner_dir, out, *extra):
    return main(["--refiner", str(refiner_dir), "--prompt", "a red cat", "--seeds", "0-1", "--out", str(out),
                 "--no-progress", *extra])


# ----------------------------------------------------------------------------------------------- item 2: --out
def test_out_refuses_a_foreign_folder_and_replaces_nothing(refiner_dir, tmp_path):
    mine = tmp_path / "holiday"
    mine.mkdir()
    (mine / "config.yaml").write_text("my: own config\n")
    (mine / "prompts.json").write_text("[]\n")
    before = {p.name: p.read_bytes() for p in mine.iterdir()}
    with pytest.raises(ValueError, match=rf"{mine}.*not .*sample"):
        sample(refiner_dir, mine)
    assert {p.name: p.read_bytes() for p in mine.iterdir()} == before
    # a new folder, then the same command into it again (its own folder)
    out = tmp_path / "samples"
    assert sample(refiner_dir, out) == 0
    assert sample(refiner_dir, out, "--compare") == 0
    assert len(list((out / "refined").glob("*.png"))) == 2 and len(list((out / "compare").glob("*.png"))) == 2


# --------------------------------------------------------------------------------------------- item 11: --seeds
def test_a_huge_seed_range_is_refused_before_it_is_built():
    with pytest.raises(ValueError, match=r"--seeds.*0-1000000000000.*1000000000001 seeds.*at most"):
        parse_seeds("0-1000000000000")
    with pytest.raises(ValueError, match=r"--seeds.*at most"):  # many ranges together
        parse_seeds(",".join(f"{k * 1_000_000}-{k * 1_000_000 + 999_999}" for k in range(3)))
    with pytest.raises(ValueError, match=r"--seeds.*18446744073709551616.*2\*\*64"):  # the generator's range
        parse_seeds("18446744073709551616")
    assert parse_seeds("0-2,7") == [0, 1, 2, 7]


# ------------------------------------------------------------------------------------- item 12: the inputs
def test_a_prompts_file_of_invalid_utf8_is_named(refiner_dir, tmp_path):
    path = tmp_path / "prompts.txt"
    path.write_bytes(b"a red cat\n\xff\xfe a broken line\n")
    with pytest.raises(ValueError, match=rf"{path}.*UTF-8"):
        sample(refiner_dir, tmp_path / "out", "--prompts-file", str(path))
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("steps", [2.7, "2", True, 0])
def test_a_non_integer_num_steps_in_sampler_json_is_refused(refiner_dir, tmp_path, steps):
    copy = shutil.copytree(refiner_dir, tmp_path / "refiner")
    record = json.loads((copy / "sampler.json").read_text())
    (copy / "sampler.json").write_text(json.dumps({**record, "num_steps": steps}))
    with pytest.raises(ValueError, match=r"sampler\.json.*num_steps.*positive integer"):
        read_sampler_record(copy)
    with pytest.raises(ValueError, match=r"sampler\.json.*num_steps"):
        sample(copy, tmp_path / "out")

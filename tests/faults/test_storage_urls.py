"""Faults of a configured storage location: a URL that is almost ``s3://bucket/...`` (another case, one slash,
no slashes) or of a scheme we do not serve must be refused naming it, never taken as a local folder named
``S3:`` or ``gs:`` in the working directory."""

from __future__ import annotations

import pytest

from helpers_cache import REPO, tiny_overrides
from helpers_s3 import run_job_in_process
from noiserefine.storage import is_remote, location, store_for

NEAR_MISSES = ["S3://bucket/x", "s3:/bucket/x", "s3:bucket/x", "S3:/bucket/x", "s3:///x", "gs://bucket/x",
               "file:///tmp/x", "https://host/x"]


@pytest.mark.parametrize("url", NEAR_MISSES)
def test_a_url_that_is_not_exactly_s3_is_refused_naming_it(url, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    for parse in (location, store_for, is_remote):
        with pytest.raises(ValueError) as caught:
            parse(url)
        assert repr(url) in str(caught.value), caught.value
    assert list(tmp_path.iterdir()) == []  # nothing created in the working directory


def test_local_paths_and_s3_urls_still_parse(tmp_path):
    assert location("cache/x").parts == ("cache", "x") and not is_remote("cache/x")
    assert location("./with:colon/x").name == "x"  # a colon inside a local path is not a scheme
    assert str(location("s3://bucket/x/")) == "s3://bucket/x" and is_remote("s3://bucket/x")


@pytest.mark.slow
def test_the_job_refuses_an_upper_case_s3_cache_root_and_writes_no_local_folder(tiny_root, tiny_teacher, tmp_path,
                                                                               monkeypatch):
    """The defect: ``data.cache_root=S3://bucket/x`` exited 0 with the cache in ``./S3:/bucket/x/...``."""
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ValueError, match="'S3://bucket/x'"):  # main raises; a CLI run exits 1 with it
        run_job_in_process(["--config", str(REPO / "configs" / "digits.yaml"), *tiny_overrides(tiny_root, tiny_teacher),
                            "data.cache_root=S3://bucket/x", "pipeline.num_workers=0"])
    assert list(tmp_path.iterdir()) == []

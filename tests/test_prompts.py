"""Tests for noiserefine.targets.prompts: real-format fixtures are written into tmp_path."""

from __future__ import annotations

import json
import re

import pyarrow as pa
import pyarrow.parquet as pq
import pytest


from noiserefine.targets.prompts import (
    DIGIT_WORDS,
    PromptStats,
    digit_prompts,
    load_prompt_source,
    normalize_prompts,
    read_coco_captions,
    read_pickapic_captions,
    read_text_prompts,
)


# ----------------------------------------------------------------------------- fixtures

def _write_coco(path, annotations, **extra):
    data = {
        "info": {"description": "COCO 2017 Dataset", "version": "1.0", "year": 2017},
        "licenses": [{"url": "http://creativecommons.org/licenses/by-nc-sa/2.0/", "id": 1,
                      "name": "Attribution-NonCommercial-ShareAlike License"}],
        "images": [
            {"license": 1, "file_name": "000000179765.jpg", "height": 480, "width": 640,
             "id": 179765},
            {"license": 1, "file_name": "000000190236.jpg", "height": 426, "width": 640,
             "id": 190236},
        ],
        "annotations": annotations,
    }
    data.update(extra)
    path.write_text(json.dumps(data), encoding="utf-8")
    return path


COCO_ANNOTATIONS = [
    {"image_id": 179765, "id": 38, "caption": "A black Honda motorcycle parked in front of a garage."},
    {"image_id": 179765, "id": 182, "caption": "  A Honda motorcycle parked in a grass driveway\n"},
    {"image_id": 190236, "id": 401, "caption": "An office cubicle with four different types of computers."},
    {"image_id": 190236, "id": 404, "caption": "A black Honda motorcycle  parked in front of a garage. "},
    {"image_id": 190236, "id": 405, "caption": "   "},
    {"image_id": 190236, "id": 406, "caption": "A Honda motorcycle parked in a grass driveway"},
]


def _pickapic_table(captions):
    n = len(captions)
    jpeg = lambda i: b"\xff\xd8\xff\xe0" + bytes([i % 251]) * 50_000 + b"\xff\xd9"  # noqa: E731
    return pa.table({
        "are_different": pa.array([True] * n),
        "best_image_uid": pa.array([f"uid-{i}" for i in range(n)], pa.string()),
        "caption": pa.array(captions, pa.string()),
        "created_at": pa.array([1_680_000_000_000 + i for i in range(n)], pa.int64()),
        "has_label": pa.array([True] * n),
        "image_0_uid": pa.array([f"img0-{i}" for i in range(n)], pa.string()),
        "image_1_uid": pa.array([f"img1-{i}" for i in range(n)], pa.string()),
        "jpg_0": pa.array([jpeg(i) for i in range(n)], pa.binary()),
        "jpg_1": pa.array([jpeg(i + 7) for i in range(n)], pa.binary()),
        "label_0": pa.array([1.0, 0.0, 0.5, 1.0][:n] + [0.0] * max(0, n - 4), pa.float64()),
        "label_1": pa.array([0.0, 1.0, 0.5, 0.0][:n] + [1.0] * max(0, n - 4), pa.float64()),
        "model_0": pa.array(["sdxl"] * n, pa.string()),
        "model_1": pa.array(["sd-2.1"] * n, pa.string()),
        "ranking_id": pa.array(list(range(n)), pa.int64()),
        "user_id": pa.array([42] * n, pa.int64()),
    })


PICK_A = ["a cat wearing a hat", "a cat wearing a hat", None, "  a dog\ton the moon "]
PICK_B = ["a dog on the moon", "a red car", "a cat wearing a hat"]


@pytest.fixture
def pickapic_dir(tmp_path):
    d = tmp_path / "pickapic"
    d.mkdir()
    # Written in reverse name order to prove the reader sorts by name.
    pq.write_table(_pickapic_table(PICK_B), d / "train-00001-of-00002.parquet")
    pq.write_table(_pickapic_table(PICK_A), d / "train-00000-of-00002.parquet")
    (d / "README.md").write_text("not parquet")
    sub = d / "nested"
    sub.mkdir()
    pq.write_table(_pickapic_table(["from a subdirectory"]), sub / "x.parquet")
    return d


# ----------------------------------------------------------------------------- normalise

def test_normalize_collapses_whitespace_and_counts():
    out, st = normalize_prompts(["  a\t\tb\n c  ", None, "", " \n ", "a b c", "d"])
    assert out == ["a b c", "d"]
    assert (st.num_read, st.num_empty, st.num_truncated, st.num_duplicates, st.num_kept) == (6, 3, 0, 1, 2)


def test_normalize_truncates_then_rstrips_and_dedups_capped_text():
    out, st = normalize_prompts(["abc  defgh", "abc   xyz", "abcd"], max_chars=5)
    # "abc defgh"[:5] == "abc d"; "abc xyz"[:5] == "abc x"; "abcd" untouched
    assert out == ["abc d", "abc x", "abcd"]
    assert st.num_truncated == 2
    out, st = normalize_prompts(["abc defgh", "abc   xyz", "ab"], max_chars=4)
    assert out == ["abc", "ab"]  # "abc " -> rstrip -> "abc", twice -> one duplicate
    assert (st.num_truncated, st.num_duplicates, st.num_kept) == (2, 1, 2)


def test_normalize_dedup_off_keeps_duplicates():
    out, st = normalize_prompts(["x", " x ", "x"], dedup=False)
    assert out == ["x", "x", "x"]
    assert st.num_duplicates == 0 and st.num_kept == 3


@pytest.mark.parametrize("bad", [0, -3])
def test_normalize_rejects_bad_max_chars(bad):
    with pytest.raises(ValueError, match=re.escape(str(bad))):
        normalize_prompts(["a"], max_chars=bad)
    with pytest.raises(ValueError, match="max_chars"):
        load_prompt_source("digits", None, max_chars=bad)


def test_stats_summary_is_one_line():
    st = PromptStats(num_read=10, num_empty=1, num_truncated=2, num_duplicates=3, num_kept=6)
    s = str(st)
    assert s == st.summary() and "\n" not in s
    for token in ("10", "kept 6", "empty 1", "duplicates 3", "truncated 2"):
        assert token in s


# ----------------------------------------------------------------------------- COCO

def test_coco_raw_and_normalised(tmp_path):
    path = _write_coco(tmp_path / "captions_train2017.json", COCO_ANNOTATIONS)
    assert read_coco_captions(path) == [a["caption"] for a in COCO_ANNOTATIONS]

    out, st = load_prompt_source("coco", str(path))
    assert out == [
        "A black Honda motorcycle parked in front of a garage.",
        "A Honda motorcycle parked in a grass driveway",
        "An office cubicle with four different types of computers.",
    ]
    assert (st.num_read, st.num_empty, st.num_truncated, st.num_duplicates, st.num_kept) == (6, 1, 0, 2, 3)

    out, st = load_prompt_source("coco", str(path), dedup=False)
    assert out == [
        "A black Honda motorcycle parked in front of a garage.",
        "A Honda motorcycle parked in a grass driveway",
        "An office cubicle with four different types of computers.",
        "A black Honda motorcycle parked in front of a garage.",
        "A Honda motorcycle parked in a grass driveway",
    ]
    assert (st.num_read, st.num_empty, st.num_duplicates, st.num_kept) == (6, 1, 0, 5)


def test_coco_expands_home(tmp_path, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path))
    _write_coco(tmp_path / "caps.json", COCO_ANNOTATIONS[:1])
    out, _ = load_prompt_source("coco", "~/caps.json")
    assert out == ["A black Honda motorcycle parked in front of a garage."]


def test_coco_malformed_json(tmp_path):
    path = tmp_path / "broken_captions.json"
    path.write_text('{"annotations": [', encoding="utf-8")
    with pytest.raises(ValueError, match="broken_captions.json"):
        read_coco_captions(path)


def test_coco_missing_annotations(tmp_path):
    path = tmp_path / "no_ann.json"
    path.write_text(json.dumps({"info": {}, "licenses": [], "images": []}), encoding="utf-8")
    with pytest.raises(ValueError, match=r"no_ann\.json.*annotations"):
        load_prompt_source("coco", str(path))


def test_coco_caption_not_string(tmp_path):
    anns = COCO_ANNOTATIONS[:2] + [{"image_id": 1, "id": 9, "caption": 123}]
    path = _write_coco(tmp_path / "bad_caption.json", anns)
    with pytest.raises(ValueError, match=r"bad_caption\.json.*annotations\[2\].*caption"):
        read_coco_captions(path)
    path = _write_coco(tmp_path / "no_caption.json", [{"image_id": 1, "id": 9}])
    with pytest.raises(ValueError, match=r"no_caption\.json.*annotations\[0\]"):
        read_coco_captions(path)


def test_coco_missing_file(tmp_path):
    missing = tmp_path / "nope.json"
    with pytest.raises((FileNotFoundError, ValueError), match="nope.json"):
        load_prompt_source("coco", str(missing))


# ----------------------------------------------------------------------------- Pick-a-Pic

EXPECTED_RAW = PICK_A + PICK_B


def test_pickapic_directory_sorted_non_recursive(pickapic_dir):
    assert read_pickapic_captions(pickapic_dir) == EXPECTED_RAW
    out, st = load_prompt_source("pickapic", str(pickapic_dir))
    assert out == ["a cat wearing a hat", "a dog on the moon", "a red car"]
    assert (st.num_read, st.num_empty, st.num_duplicates, st.num_kept) == (7, 1, 3, 3)


def test_pickapic_dedup_off(pickapic_dir):
    out, st = load_prompt_source("pickapic", str(pickapic_dir), dedup=False)
    assert out == ["a cat wearing a hat", "a cat wearing a hat", "a dog on the moon",
                   "a dog on the moon", "a red car", "a cat wearing a hat"]
    assert (st.num_empty, st.num_duplicates, st.num_kept) == (1, 0, 6)


def test_pickapic_glob_and_single_file(pickapic_dir):
    assert read_pickapic_captions(str(pickapic_dir / "train-*.parquet")) == EXPECTED_RAW
    assert read_pickapic_captions(str(pickapic_dir / "*00001*.parquet")) == PICK_B
    single = pickapic_dir / "train-00000-of-00002.parquet"
    assert read_pickapic_captions(single) == PICK_A
    out, st = load_prompt_source("pickapic", str(single))
    assert out == ["a cat wearing a hat", "a dog on the moon"]
    assert (st.num_read, st.num_empty, st.num_duplicates) == (4, 1, 1)


def test_pickapic_reads_only_caption_column(pickapic_dir, monkeypatch):
    calls = []
    real_read_table = pq.read_table

    def spy(source, *args, **kwargs):
        calls.append((source, args, kwargs))
        return real_read_table(source, *args, **kwargs)

    monkeypatch.setattr(pq, "read_table", spy)
    monkeypatch.setattr(pq.ParquetFile, "read", lambda *a, **k: pytest.fail("ParquetFile.read"))
    assert read_pickapic_captions(pickapic_dir) == EXPECTED_RAW
    assert len(calls) == 2
    for _source, args, kwargs in calls:
        assert not args and kwargs.get("columns") == ["caption"]


def test_pickapic_missing_caption_column(tmp_path):
    path = tmp_path / "nocap.parquet"
    pq.write_table(_pickapic_table(["x"]).drop(["caption"]), path)
    with pytest.raises(ValueError, match=r"nocap\.parquet.*caption"):
        read_pickapic_captions(path)


def test_pickapic_glob_without_match(tmp_path):
    pattern = str(tmp_path / "shards" / "*.parquet")
    with pytest.raises(ValueError, match=re.escape(pattern)):
        load_prompt_source("pickapic", pattern)
    empty = tmp_path / "empty_dir"
    empty.mkdir()
    with pytest.raises(ValueError, match="empty_dir"):
        read_pickapic_captions(empty)
    with pytest.raises((FileNotFoundError, ValueError), match="absent.parquet"):
        read_pickapic_captions(tmp_path / "absent.parquet")


# ----------------------------------------------------------------------------- text

def test_text_prompts(tmp_path):
    path = tmp_path / "prompts.txt"
    path.write_bytes("a café  at night\r\n\n\tcafé at night \nsecond  one\nx" .encode("utf-8")
                     + b"\n")
    assert read_text_prompts(path) == ["a café  at night", "", "\tcafé at night ", "second  one", "x"]
    out, st = load_prompt_source("text", str(path), max_chars=12)
    assert out == ["a café at ni", "café at nigh", "second one", "x"]
    assert (st.num_read, st.num_empty, st.num_truncated, st.num_duplicates, st.num_kept) == (5, 1, 2, 0, 4)


def test_text_not_utf8(tmp_path):
    path = tmp_path / "latin1.txt"
    path.write_bytes("caf\xe9 au lait\n".encode("latin-1"))
    with pytest.raises(ValueError, match=r"latin1\.txt.*UTF-8"):
        load_prompt_source("text", str(path))


# ----------------------------------------------------------------------------- kinds, digits

def test_unknown_kind_lists_valid_kinds():
    with pytest.raises(ValueError, match="laion") as exc:
        load_prompt_source("laion", "/data/x")
    for kind in ("coco", "pickapic", "text", "digits"):
        assert kind in str(exc.value)


def test_path_required_for_file_kinds():
    with pytest.raises(ValueError, match="text"):
        load_prompt_source("text", None)


def test_digit_prompts():
    assert DIGIT_WORDS == ("zero", "one", "two", "three", "four", "five", "six", "seven",
                           "eight", "nine")
    prompts = digit_prompts()
    assert len(prompts) == 20 and len(set(prompts)) == 20
    assert prompts[:4] == ["a handwritten zero", "a handwritten digit 0",
                           "a handwritten one", "a handwritten digit 1"]
    for d, word in enumerate(DIGIT_WORDS):
        assert f"a handwritten {word}" in prompts
        assert f"a handwritten digit {d}" in prompts
    assert digit_prompts() == prompts
    out, st = load_prompt_source("digits", "/ignored/path")
    assert out == prompts and st.num_kept == 20 and st.num_read == 20


class _Payload:
    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


def test_pickapic_reads_captions_without_unpickling_other_columns(tmp_path):
    """A parquet's other columns (and its pandas metadata) may hold pickles: only `caption` is read."""
    import pickle

    marker = tmp_path / "code-ran"
    blob = pickle.dumps(_Payload(marker))
    table = pa.table({"caption": ["a red bus", "a red bus", "two dogs"], "jpg_0": [blob] * 3})
    table = table.replace_schema_metadata({b"pandas": json.dumps({"columns": [], "note": blob.hex()}).encode()})
    pq.write_table(table, tmp_path / "part.parquet")
    prompts, stats = load_prompt_source("pickapic", tmp_path / "part.parquet")
    assert prompts == ["a red bus", "two dogs"] and stats.num_duplicates == 1
    assert not marker.exists()

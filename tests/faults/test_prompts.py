"""Fault tests of the prompt readers (``targets/prompts.py``) on real-world Pick-a-Pic parquet files (item 19)."""

from __future__ import annotations

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from noiserefine.targets.prompts import load_prompt_source, read_pickapic_captions

CAPTIONS = ["a red fox in snow", "a castle at dusk", "a red fox in snow", None, "a castle at dusk"]


def test_dictionary_encoded_captions_are_read(tmp_path):
    """Pick-a-Pic shards written from pandas categoricals store ``caption`` as dictionary<string>."""
    path = tmp_path / "part-0.parquet"
    table = pa.table({"caption": pa.array(CAPTIONS).dictionary_encode(), "jpg_0": [b"\xff\xd8"] * len(CAPTIONS)})
    pq.write_table(table, path)
    assert pa.types.is_dictionary(pq.read_schema(path).field("caption").type)
    assert read_pickapic_captions(path) == CAPTIONS
    prompts, stats = load_prompt_source("pickapic", path)
    assert prompts == ["a red fox in snow", "a castle at dusk"] and stats.num_duplicates == 2


def test_dictionary_of_non_strings_is_refused_naming_the_file(tmp_path):
    path = tmp_path / "ints.parquet"
    pq.write_table(pa.table({"caption": pa.array([1, 2, 1]).dictionary_encode()}), path)
    with pytest.raises(ValueError, match=rf"{path}.*'caption' column must be string"):
        read_pickapic_captions(path)


def test_a_corrupt_page_names_the_file(tmp_path):
    path = tmp_path / "corrupt.parquet"
    captions = [f"caption number {i} " * 8 for i in range(400)]
    pq.write_table(pa.table({"caption": captions}), path, compression="snappy", use_dictionary=False)
    column = pq.ParquetFile(path).metadata.row_group(0).column(0)
    data = bytearray(path.read_bytes())
    start = column.data_page_offset + column.total_compressed_size // 2  # inside the compressed page data
    for offset in range(start, start + 16):
        data[offset] ^= 0x5A
    path.write_bytes(bytes(data))
    pq.read_schema(path)  # the footer is intact: only the page is damaged
    with pytest.raises(ValueError, match=rf"{path}.*Corrupt snappy compressed data"):
        read_pickapic_captions(path)

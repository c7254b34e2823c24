"""The output schema builder and the atomic Parquet writer."""

from __future__ import annotations

import numpy as np
import pyarrow.dataset as ds
import pyarrow.parquet as pq
import pytest

from annotator.schema import SCHEMA, error_row, frame_rows
from annotator.writer import OutputLayout, PartWriter, merge_parts, read_metadata, schema_with_metadata


def _rows(counts, frame_offset=0):
    counts = np.array(counts)
    n = int(counts.sum())
    rng = np.random.default_rng(0)
    probs = rng.dirichlet(np.ones(7), size=n).astype(np.float32)
    return frame_rows(
        video_path="/v/a.mp4", video_id="abc", model_id="m:1",
        frame_index=np.arange(len(counts)) + frame_offset, pts_s=np.arange(len(counts)) / 25.0,
        faces_per_frame=counts, boxes=np.tile([1, 2, 3, 4], (n, 1)).astype(np.float32) * np.arange(1, n + 1)[:, None],
        scores=np.linspace(0.9, 1.0, n), landmarks=np.zeros((n, 5, 2)), track_ids=np.arange(n),
        probs=probs, va=None,
    ), probs


def test_frame_rows_one_row_per_face_and_per_empty_frame():
    batch, probs = _rows([2, 0, 1])
    assert batch.schema == SCHEMA
    table = batch.to_pydict()
    assert table["frame_index"] == [0, 0, 1, 2]
    assert table["face_index"] == [0, 1, None, 0]
    assert table["x1"] == [1.0, 2.0, None, 3.0]
    assert table["track_id"] == [0, 1, None, 2]
    assert table["model_id"] == ["m:1", "m:1", None, "m:1"]
    assert table["valence"] == [None] * 4
    names = ["neutral", "anger", "disgust", "fear", "happiness", "sadness", "surprise"]
    assert table["expression"] == [names[i] for i in probs.argmax(1)[:2]] + [None, names[probs[2].argmax()]]
    assert table["error"] == [None] * 4


def test_error_row():
    table = error_row("/v/bad.mp4", "/v/bad.mp4: cannot open").to_pydict()
    assert table["error"] == ["/v/bad.mp4: cannot open"] and table["frame_index"] == [None]


def test_part_writer_is_atomic_and_merge_keeps_order(tmp_path):
    schema = schema_with_metadata({"version": "test"})
    layout = OutputLayout(tmp_path / "out.parquet")
    writer = PartWriter(layout.part_path("a"), schema)
    writer.write(_rows([1, 1])[0])
    assert not layout.part_path("a").exists()  # nothing visible before commit
    assert layout.completed_keys() == set()
    writer.commit()
    other = PartWriter(layout.part_path("b"), schema)
    other.write(_rows([0, 3], frame_offset=10)[0])
    other.commit()
    PartWriter(layout.part_path("c"), schema).abort()
    assert layout.completed_keys() == {"a", "b"}
    rows = merge_parts([layout.part_path("b"), layout.part_path("a")], layout.out, schema)
    table = pq.read_table(layout.out)
    assert rows == table.num_rows == 6
    assert table.column("frame_index").to_pylist() == [10, 11, 11, 11, 0, 1]
    merged = read_metadata(layout.out)
    assert {k: v for k, v in merged.items() if k != "parts"} == {"version": "test", "videos": []}
    # Every part is listed (a re-run adds to the file by it), without stamps: these have no facts.
    assert [(e["key"], e["status"], e["file_size"]) for e in merged["parts"]] == [("b", "done", None), ("a", "done", None)]
    assert not list(tmp_path.glob(".*tmp"))


def test_directory_output_reads_as_one_dataset(tmp_path):
    schema = schema_with_metadata({"version": "test"})
    layout = OutputLayout(tmp_path / "results")
    assert not layout.single_file and layout.parts_dir == tmp_path / "results"
    for key, counts in (("a", [1]), ("b", [2, 0])):
        w = PartWriter(layout.part_path(key), schema)
        w.write(_rows(counts)[0])
        w.commit()
    assert ds.dataset(layout.out, format="parquet").to_table().num_rows == 4


def test_a_scan_of_many_parts_counts_each_once_and_removes_only_the_unreadable(tmp_path):
    """The footers are read on a few threads (a re-run on a shared filesystem reads one per video):
    each readable part counts, whatever its place; a cut one and a foreign file are removed."""
    from annotator.writer import SCAN_THREADS

    schema = schema_with_metadata({"version": "test", "fingerprint": {"model": "m"}})
    layout = OutputLayout(tmp_path / "results")
    keys = [f"{i:04d}" for i in range(4 * SCAN_THREADS + 3)]
    for key in keys:
        w = PartWriter(layout.part_path(key), schema)
        w.write(_rows([1])[0])
        w.commit()
    cut, foreign = layout.part_path(keys[1]), layout.part_path(keys[-2])
    cut.write_bytes(cut.read_bytes()[: cut.stat().st_size // 2])
    pq.write_table(pq.read_table(foreign).replace_schema_metadata(None), foreign)  # no annotator metadata
    found = layout.scan()
    assert found.done == set(keys) - {keys[1], keys[-2]}
    assert found.unreadable == [cut, foreign] and not cut.exists() and not foreign.exists()
    assert found.fingerprints == {'{"model": "m"}'}


@pytest.mark.parametrize("name, single", [("x.parquet", True), ("x", False), ("x.d", False)])
def test_layout_kind(tmp_path, name, single):
    assert OutputLayout(tmp_path / name).single_file is single


def test_a_merge_gathers_small_parts_into_full_row_groups(tmp_path, monkeypatch):
    """Parts of short videos are small row groups; copied one for one, a file of 2,000 four-frame
    videos had a 7.3 MB footer for 8,000 rows and took 1.7 s to read. The merge now gathers rows
    into groups of ROW_GROUP_ROWS (5 here), in order, with the base's rows first."""
    import annotator.writer as writer_module
    from annotator.writer import MergedResult

    monkeypatch.setattr(writer_module, "ROW_GROUP_ROWS", 5)
    schema = schema_with_metadata({"version": "test"})
    layout = OutputLayout(tmp_path / "out.parquet")
    for key, offset in zip("abcdef", range(0, 60, 10)):
        part = PartWriter(layout.part_path(key), schema)
        part.write(_rows([1, 0, 2], frame_offset=offset)[0])  # 4 rows each
        part.commit()
    first = merge_parts([layout.part_path(k) for k in "abcd"], layout.out, schema)
    assert first == 16 and [pq.ParquetFile(layout.out).metadata.row_group(g).num_rows for g in range(4)] == [5, 5, 5, 1]
    rows = merge_parts([layout.part_path(k) for k in "ef"], layout.out, schema, base=MergedResult.read(layout.out))
    merged = pq.ParquetFile(layout.out)
    assert rows == 24 and [merged.metadata.row_group(g).num_rows for g in range(merged.num_row_groups)] == [5] * 4 + [4]
    assert merged.read().column("frame_index").to_pylist() == [i + o for o in range(0, 60, 10) for i in (0, 1, 2, 2)]

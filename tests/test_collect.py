"""The driver's part collector: streamed tables → committed parts, never a row twice."""

from __future__ import annotations

import numpy as np
import pytest
import pyarrow.parquet as pq

from annotator.collect import PartCollector, split_runs
from annotator.schema import error_row, frame_rows
from annotator.worker import tag_table
from annotator.writer import OutputLayout, schema_with_metadata


def _rows(first_frame: int, n_frames: int):
    n = n_frames
    return frame_rows(
        video_path="/v.mp4", video_id="id", model_id="m", frame_index=np.arange(first_frame, first_frame + n),
        pts_s=np.arange(first_frame, first_frame + n) / 25.0, faces_per_frame=np.ones(n, np.int64),
        boxes=np.tile([0, 0, 10, 10], (n, 1)).astype(np.float32), scores=np.ones(n), landmarks=np.zeros((n, 5, 2)),
        track_ids=np.zeros(n), probs=np.full((n, 7), 1 / 7), va=None,
    )


def _collector(tmp_path):
    return PartCollector(OutputLayout(tmp_path / "out"), schema_with_metadata({"v": 1}))


def test_a_video_restarted_by_ray_is_written_once(tmp_path):
    collector = _collector(tmp_path)
    assert collector.add(tag_table(_rows(0, 2), "k", "rows")) == 0
    # The actor died; Ray re-ran the video from its first frame.
    assert collector.add(tag_table(_rows(0, 2), "k", "rows")) == 0
    assert collector.add(tag_table(_rows(2, 2), "k", "done")) == 1
    table = pq.read_table(collector.layout.part_path("k"))
    assert table.column("frame_index").to_pylist() == [0, 1, 2, 3]
    assert collector.frames == 4 and collector.faces == 4


def test_failure_discards_partial_rows_and_close_keeps_nothing_partial(tmp_path):
    collector = _collector(tmp_path)
    collector.add(tag_table(_rows(0, 3), "bad", "rows"))
    assert collector.add(tag_table(error_row("/v.mp4", "/v.mp4: decode failed"), "bad", "failed")) == 1
    assert not collector.layout.part_path("bad").exists()
    assert pq.read_table(collector.layout.part_path("bad", failed=True)).num_rows == 1
    assert collector.failed == 1 and collector.frames == 0
    collector.add(tag_table(_rows(0, 2), "open", "rows"))
    collector.close()  # interrupted run
    assert sorted(p.name for p in collector.layout.parts_dir.iterdir()) == ["part-bad.error.parquet"]


def test_split_runs_separates_concatenated_blocks():
    import pyarrow as pa

    block = pa.concat_tables([tag_table(_rows(0, 2), "a", "rows"), tag_table(_rows(2, 1), "a", "done"), tag_table(_rows(0, 1), "b", "rows")])
    runs = [(run.tag, run.status, run.rows.num_rows, run.progress) for run in split_runs(block)]
    assert runs == [("a", "rows", 2, 0.0), ("a", "done", 1, 1.0), ("b", "rows", 1, 0.0)]


def test_rows_move_the_progress_by_the_part_of_the_video_they_finish(tmp_path):
    """A long video must not sit at 0 of 1 until its end: each table of rows counts the part of
    the video it finishes (in hundredths, rounded down), a video Ray restarts does not count
    twice, and the video's end counts exactly what is left of its 1."""
    collector = _collector(tmp_path)
    assert collector.add(tag_table(_rows(0, 2), "k", "rows", progress=0.255)) == pytest.approx(0.25)
    assert collector.add(tag_table(_rows(2, 2), "k", "rows", progress=0.5)) == pytest.approx(0.25)
    assert collector.add(tag_table(_rows(0, 2), "k", "rows", progress=0.25)) == 0  # restarted by Ray
    assert collector.add(tag_table(_rows(2, 2), "k", "rows", progress=0.5)) == 0
    assert collector.add(tag_table(_rows(4, 2), "k", "done")) == pytest.approx(0.5)
    assert collector.add(tag_table(_rows(0, 1), "bad", "rows", progress=0.4)) == pytest.approx(0.4)
    assert collector.add(tag_table(error_row("/v.mp4", "/v.mp4: decode failed"), "bad", "failed")) == pytest.approx(0.6)

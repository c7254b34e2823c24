"""Recordings whose frames change size or whose clock starts again mid-stream: MPEG-TS captures
joined byte for byte (``cat a.ts b.ts``), live streams that switched renditions. Every frame is
annotated at its own size, the change is recorded, and a video whose clock goes back is never
cut into time segments (a segment would take the frames of every piece within its times)."""

from __future__ import annotations

import json
import logging

import cv2
import numpy as np
import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest

from annotator.config import RunConfig
from annotator.run import run
from annotator.segmenting import save_plan, work_items
from annotator.writer import TIMESTAMPS_CHECKED, OutputLayout, part_key, read_metadata, video_stamp
from engines.decoders import DecodeError, DecodeReport, Sampling
from engines.decoders.dali import packet_times
from engines.decoders.pyav import decode
from engines.decoders.segments import Segment, TimestampsGoBack, plan_segments
from faults import carphone_frames, write_joined_ts


def _resized(frames: list[np.ndarray], width: int, height: int) -> list[np.ndarray]:
    return [cv2.resize(f, (width, height), interpolation=cv2.INTER_LINEAR) for f in frames]


@pytest.fixture(scope="module")
def frames(carphone):
    return carphone_frames(carphone)


@pytest.fixture(scope="module")
def joined(frames, tmp_path_factory):
    """40 frames at 352x288, then 40 others at 640x360 whose clock starts again (two recordings
    joined), and the second piece alone."""
    folder = tmp_path_factory.mktemp("joined")
    second = _resized(frames[40:80], 640, 360)
    return (write_joined_ts(folder / "joined.ts", [(_resized(frames[:40], 352, 288), 40), (second, 40)]),
            write_joined_ts(folder / "second.ts", [(second, 40)]))


def _faces(table):
    return table.filter(pc.is_valid(table.column("face_index")))


def test_each_batch_has_one_size_and_the_change_is_reported(joined):
    report = DecodeReport()
    batches = list(decode(joined[0], Sampling(), 8, report=report))
    shapes = [tuple(b.frames.shape[1:3]) for b in batches for _ in b.frame_index]
    assert shapes == [(288, 352)] * 40 + [(360, 640)] * 40
    assert np.concatenate([b.frame_index for b in batches]).tolist() == list(range(80))
    assert (report.width, report.height, report.size_changes) == (352, 288, [[40, 640, 360]])
    times = np.concatenate([b.pts_s for b in batches])
    assert times[40] < times[39]  # the stream's own clock, started again: rows keep it as it is


def test_sampling_by_time_starts_again_with_the_clock(joined):
    """--sample-fps 10 keeps the first frame at or after each tenth of a second; where the clock
    starts again, so do the ticks: the second piece keeps what the first does, its first frame
    included (it was skipped, its tick behind the last one kept)."""
    kept = np.concatenate([b.frame_index for b in decode(joined[0], Sampling(fps=10.0), 8)]).tolist()
    first = [i for i in kept if i < 40]
    assert [i - 40 for i in kept if i >= 40] == first and first[0] == 0 and len(first) == 14


def test_frames_after_a_size_change_are_annotated_in_their_own_pixels(joined, tmp_path):
    """Before, a later frame of another size was stretched to the first frame's (352x288: the
    face squeezed 9 % across) and its boxes given in that frame's pixels."""
    out = tmp_path / "joined.parquet"
    summary = run(RunConfig(inputs=(joined[0],), out=out, workers=0), progress=False)
    assert summary.failed == 0 and summary.frames == 80
    table = pq.read_table(out)
    faces = _faces(table)
    assert faces.num_rows >= 78 and set(faces.column("track_id").to_pylist()) == {0}  # one person, one track
    after = faces.filter(pc.greater_equal(faces.column("frame_index"), 40))
    # The second piece annotated on its own: the same faces, in the same pixels.
    alone = tmp_path / "alone.parquet"
    run(RunConfig(inputs=(joined[1],), out=alone, workers=0), progress=False)
    reference = _faces(pq.read_table(alone))
    assert after.num_rows == reference.num_rows
    for column in ("x1", "y1", "x2", "y2", "left_eye_x", "mouth_right_y"):
        ours, theirs = (t.column(column).to_numpy(zero_copy_only=False) for t in (after, reference))
        assert np.median(np.abs(ours - theirs)) < 1.5, column
    assert float(pc.max(after.column("x2")).as_py()) > 352  # pixels of the 640-wide frames
    videos = read_metadata(out)["videos"]  # listed among the notable videos of the merged file
    assert [(v["width"], v["height"], v["size_changes"]) for v in videos] == [(352, 288, [[40, 640, 360]])]


def test_a_recording_whose_clock_starts_again_is_annotated_whole(frames, tmp_path, caplog):
    """Segments are found by time: the second piece's frames lie within the first's times, so
    cutting the video lost half of it without a word (1,800 frames in, 900 rows out)."""
    clip = write_joined_ts(tmp_path / "joined.ts", [(frames, 650), (frames, 650)])
    with pytest.raises(TimestampsGoBack, match="go back from"):
        plan_segments(clip, 2)
    layout = OutputLayout(tmp_path / "results")
    with caplog.at_level(logging.WARNING, logger="annotator.segmenting"):
        items = work_items(layout, [(clip, part_key(clip))], workers=2)
    assert [i.segment for i in items] == [None]  # one worker, every frame once
    assert "annotated whole, not in 2 segments: its timestamps go back" in caplog.text
    assert not layout.plan_path(part_key(clip)).exists()


def test_dali_leaves_a_recording_whose_clock_starts_again_to_pyav(joined):
    """DALI's frames get the file's timestamps sorted: those of two joined pieces would interleave.
    The error comes before the first frame, where the router hands the file to PyAV."""
    with pytest.raises(DecodeError, match="joined.ts: its timestamps go back from"):
        packet_times(joined[0])
    times = packet_times(joined[1])
    assert len(times) == 40 and np.all(np.diff(times) > 0)


def test_size_changes_at_and_inside_segments_stitch_as_a_whole_decode(frames, tmp_path):
    """A live stream's renditions (its clock goes on): 250 frames at 176x144, 100 at 352x288,
    250 at 176x144, cut at frame 250 into two segments on two workers. The stitched video has the
    rows, the size changes and the one track of the video annotated whole."""
    clip = write_joined_ts(tmp_path / "renditions.ts", [(frames, 250), (_resized(frames, 352, 288), 100),
                                                        (frames[10:] + frames[:10], 250)], continuous=True)
    assert [s.first_frame for s in plan_segments(clip, 2)] == [0, 250]
    out = tmp_path / "results"
    sampling = Sampling(every_n=2)
    assert run(RunConfig(inputs=(clip,), out=out, workers=2, sampling=sampling), progress=False).failed == 0
    whole = tmp_path / "whole.parquet"
    run(RunConfig(inputs=(clip,), out=whole, workers=0, sampling=sampling), progress=False)
    part = OutputLayout(out).part_path(part_key(clip))
    split_facts = read_metadata(part)["video"]
    assert split_facts["segments"] == 2
    changes = [[250, 352, 288], [350, 176, 144]]
    assert split_facts["size_changes"] == changes == read_metadata(whole)["videos"][0]["size_changes"]
    split, reference = pq.read_table(part), pq.read_table(whole)
    assert split.column("frame_index").to_pylist() == reference.column("frame_index").to_pylist() == list(range(0, 600, 2))
    for table in (split, reference):
        faces = _faces(table)
        assert faces.num_rows >= 0.97 * 300 and set(faces.column("track_id").to_pylist()) == {0}
        middle = faces.filter(pc.and_(pc.greater_equal(faces.column("frame_index"), 250),
                                      pc.less(faces.column("frame_index"), 350)))
        assert float(pc.max(middle.column("x2")).as_py()) > 176  # the 352-wide frames' own pixels
    for column in ("x1", "y2"):
        ours, theirs = (_faces(t).column(column).to_numpy(zero_copy_only=False) for t in (split, reference))
        assert np.median(np.abs(ours - theirs)) < 1.5, column


def _as_before_the_check(part, **changes):
    """A part rewritten as a version from before the timestamps check left it: its facts say it
    was stitched from ``segments`` and carry no check, its rows as ``changes`` leave them."""
    table = pq.read_table(part)
    facts = {k: v for k, v in read_metadata(part)["video"].items() if k != TIMESTAMPS_CHECKED}
    facts.update(segments=2, **{k: v for k, v in changes.items() if k != "rows"})
    table = table.slice(0, changes.get("rows", table.num_rows))
    metadata = {**table.schema.metadata, b"annotator.video": json.dumps(facts).encode()}
    pq.write_table(table.replace_schema_metadata(metadata), part)


def test_results_of_a_joined_recording_split_by_an_earlier_version_are_redone(frames, tmp_path, caplog):
    """A part stitched before the check from a recording whose clock starts again lost the
    frames of a piece (650 of 1,300 rows, no error): a resume finds it and annotates the video
    again, whole. A part rightly stitched from segments then is kept as it is."""
    joined = write_joined_ts(tmp_path / "joined.ts", [(frames, 650), (frames, 650)])
    single = write_joined_ts(tmp_path / "single.ts", [(frames, 120)])
    out = tmp_path / "results"
    run(RunConfig(inputs=(joined, single), out=out, workers=0), progress=False)
    layout = OutputLayout(out)
    _as_before_the_check(layout.part_path(part_key(joined)), rows=650, frames_decoded=650)
    _as_before_the_check(layout.part_path(part_key(single)))
    kept = layout.part_path(part_key(single)).stat().st_mtime_ns
    with caplog.at_level(logging.WARNING, logger="annotator.run"):
        summary = run(RunConfig(inputs=(joined, single), out=out, workers=0), progress=False)
    assert summary.frames == 1300 and summary.videos == 2
    assert "joined.ts: cut into segments by an earlier version although its timestamps go back" in caplog.text
    assert pq.read_metadata(layout.part_path(part_key(joined))).num_rows == 1300
    assert "segments" not in read_metadata(layout.part_path(part_key(joined)))["video"]
    assert layout.part_path(part_key(single)).stat().st_mtime_ns == kept and "single.ts" not in caplog.text


def test_a_plan_from_an_earlier_version_is_checked_once(frames, tmp_path, caplog):
    """A resumed run finds a plan saved before the check: a joined recording's is dropped (with
    its finished segments) and the video annotated whole; a rightly split video's is kept and
    saved as checked."""
    joined = write_joined_ts(tmp_path / "joined.ts", [(frames, 650), (frames, 650)])
    live = write_joined_ts(tmp_path / "live.ts", [(frames, 300), (frames, 300)], continuous=True)
    layout = OutputLayout(tmp_path / "results")
    layout.parts_dir.mkdir()
    old_plan = [Segment(0, 2, None, 900000, 0, None, 0.0, 300), Segment(1, 2, 900000, None, 300, 9.9, 0.0, 600)]
    for video in (joined, live):
        save_plan(layout, part_key(video), old_plan, video_stamp(video))
        saved = json.loads(layout.plan_path(part_key(video)).read_text())
        del saved[TIMESTAMPS_CHECKED]  # as a version before the check wrote it
        layout.plan_path(part_key(video)).write_text(json.dumps(saved))
    layout.segment_path(part_key(joined), 0).write_bytes(b"a finished segment")
    with caplog.at_level(logging.WARNING, logger="annotator.segmenting"):
        items = work_items(layout, [(joined, part_key(joined)), (live, part_key(live))], workers=2)
    assert sorted((i.path.name, i.segment.index if i.segment else None) for i in items) == [
        ("joined.ts", None), ("live.ts", 0), ("live.ts", 1)]
    assert "joined.ts: cut into segments by an earlier version although its timestamps go back" in caplog.text
    assert not layout.plan_path(part_key(joined)).exists() and not layout.segment_path(part_key(joined), 0).exists()
    assert json.loads(layout.plan_path(part_key(live)).read_text())[TIMESTAMPS_CHECKED] is True

"""One long video over several workers: keyframe segments that decode as the whole video does,
stitched back with continuous track ids, resumed segment by segment."""

from __future__ import annotations

import dataclasses
import json
import os
import shutil

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest

from annotator.collect import PartCollector
from annotator.config import RunConfig
from annotator.ownership import OutputClaim
from annotator.pipeline import VideoPipeline
from annotator.run import run, run_metadata
from annotator.schema import frame_rows
from annotator.segmenting import _continuous_ids, load_plan, work_items
from annotator import worker
from annotator.worker import PROGRESS_COLUMN, STATUS_COLUMN, VIDEO_COLUMN, WorkItem, annotate_tagged
from annotator.writer import OutputLayout, part_key, recorded_stamp, schema_with_metadata, video_stamp
from engines.decoders import DecodeReport, Sampling
from engines.decoders.pyav import decode
from engines.decoders.segments import frame_count, plan_segments
from faults import carphone_frames, start_inside_a_gop, trim_by_edit_list, write_clip


@pytest.fixture(scope="module")
def long_clip(carphone, tmp_path_factory):
    """600 frames (20 s) of the carphone clip, a keyframe every 60 frames."""
    return write_clip(tmp_path_factory.mktemp("long") / "long.mp4", carphone_frames(carphone), 600, keyint=60)


@pytest.fixture(scope="module")
def long_mkv(carphone, tmp_path_factory):
    """The same 600 frames as H.264 in Matroska, whose headers count no frames (only the file's
    duration), as most downloaded video is."""
    return write_clip(tmp_path_factory.mktemp("long") / "long.mkv", carphone_frames(carphone), 600, keyint=60)


def _frames_of(batches):
    return [(int(i), float(t)) for b in batches for i, t in zip(b.frame_index, b.pts_s)]


@pytest.fixture(scope="module")
def long_ts(carphone, tmp_path_factory):
    """The same 600 frames as H.264 in MPEG-TS, as broadcast recordings are: no index, so FFmpeg
    seeks by bisecting on timestamps and can land past a keyframe."""
    return write_clip(tmp_path_factory.mktemp("long") / "long.ts", carphone_frames(carphone), 600, keyint=60)


@pytest.fixture(scope="module")
def long_trimmed(long_clip, tmp_path_factory):
    """The 600-frame MP4 trimmed by its edit list to start 10 frames in (a phone's trim): 590
    frames shown, the first GOP's hidden packets still in the file."""
    return trim_by_edit_list(long_clip, tmp_path_factory.mktemp("long") / "trimmed.mp4", 10)


@pytest.mark.parametrize("clip", ["long_clip", "long_mkv", "long_ts", "long_trimmed"])
@pytest.mark.parametrize("sampling", [Sampling(), Sampling(every_n=7), Sampling(fps=4.3)])
def test_segments_decode_exactly_the_frames_of_the_whole_video(clip, sampling, request):
    """Every container's segments hold the whole video's frames, each once; MPEG-TS segments
    after the first decoded nothing when the seek landed past their keyframe."""
    long_clip = request.getfixturevalue(clip)
    plan = plan_segments(long_clip, 4)
    firsts = [s.first_frame for s in plan]
    assert len(plan) == 4 and firsts[0] == 0 and firsts == sorted(set(firsts))
    hidden = 10 if clip == "long_trimmed" else 0  # frames before the edit list's start: not shown
    assert all((f + hidden) % 60 == 0 for f in firsts[1:])  # keyframes
    assert all(abs(f + hidden - 150 * i) <= 30 for i, f in enumerate(firsts))
    assert plan[-1].end_pts is None and all(a.end_pts == b.start_pts for a, b in zip(plan, plan[1:]))
    shown = 590 if clip == "long_trimmed" else 600
    assert [s.end_frame for s in plan] == [*firsts[1:], shown]
    whole = _frames_of(decode(long_clip, sampling, 8))
    reports = [DecodeReport() for _ in plan]
    pieces = [_frames_of(decode(long_clip, sampling, 8, segment=s, report=r)) for s, r in zip(plan, reports)]
    assert all(pieces) and sum(pieces, []) == whole
    assert not any(r.damaged for r in reports)


def _rows(frame: int, boxes: list[list[float]], ids: list[int]) -> pa.Table:
    n = len(boxes)
    batch = frame_rows(video_path="/v.mp4", video_id="id", model_id="m", frame_index=np.array([frame]),
                       pts_s=np.array([frame / 30]), faces_per_frame=np.array([n]),
                       boxes=np.array(boxes, np.float32).reshape(-1, 4), scores=np.ones(n),
                       landmarks=np.zeros((n, 5, 2)), track_ids=np.array(ids), probs=np.full((n, 7), 1 / 7), va=None)
    return pa.Table.from_batches([batch])


def test_track_ids_continue_across_a_boundary():
    previous_boxes = np.array([[0, 0, 50, 50], [200, 0, 250, 50]], np.float32)
    previous_ids = np.array([4, 7])
    # The next segment's first frame lists the two faces the other way round, plus a new one.
    rows = pa.concat_tables([_rows(100, [[201, 1, 251, 51], [1, 1, 51, 51], [400, 0, 450, 50]], [0, 1, 2]),
                             _rows(101, [[2, 1, 52, 51]], [1])])
    ids, next_id = _continuous_ids(rows, previous_boxes, previous_ids, next_id=8)
    assert ids.to_pylist() == [7, 4, 8, 4] and next_id == 9
    # A frame without faces keeps its null ids.
    empty = _rows(5, [], [])
    assert _continuous_ids(empty, previous_boxes, previous_ids, 8)[0].to_pylist() == [None]


def test_a_long_video_on_two_workers_is_stitched_and_resumed_per_segment(long_clip, tmp_path):
    out = tmp_path / "results"
    config = RunConfig(inputs=(long_clip,), out=out, workers=2, sampling=Sampling(every_n=3))
    layout, key = OutputLayout(out), part_key(long_clip)
    # An earlier run that stopped after one of its segments (as a killed run leaves it).
    with OutputClaim(out):
        items = work_items(layout, [(long_clip, key)], workers=2)  # 20 s: two 10 s segments
        assert [i.segment.index for i in items] == [0, 1] and items[1].segment.first_frame == 300
        collector = PartCollector(layout, schema_with_metadata(run_metadata(config)))
        pipeline = VideoPipeline(RunConfig(inputs=(long_clip,), out=out, workers=0, sampling=Sampling(every_n=3)))
        ours = pipeline.keyframes_int8_sha256
        pipeline.keyframes_int8_sha256 = "0" * 64  # as another machine's int8 copy would be
        for table in annotate_tagged(pipeline, items[0]):
            collector.add(table)
        assert layout.segment_done(key, 0) and not layout.part_path(key).exists()
        assert [i.segment.index for i in work_items(layout, [(long_clip, key)], workers=2)] == [1]
    summary = run(config, progress=False)
    assert summary.failed == 0 and summary.videos == 1 and summary.frames == 100  # only the missing segment
    assert sorted(p.name for p in out.iterdir() if not p.name.startswith(".annotator")) == [f"part-{key}.parquet"]
    assert load_plan(layout, key) is None  # the plan and the segment parts are gone once stitched
    table = pq.read_table(layout.part_path(key))
    frames = table.column("frame_index").to_pylist()
    assert frames == sorted(frames) and sorted(set(frames)) == list(range(0, 600, 3))  # each frame once, in order
    faces = table.filter(pc.is_valid(table.column("face_index")))
    assert faces.num_rows >= 0.97 * 200 and set(faces.column("track_id").to_pylist()) == {0}  # one person, one id
    facts = pq.read_metadata(layout.part_path(key)).metadata[b"annotator.video"]
    assert b'"segments": 2' in facts and b'"frames_decoded": 600' in facts
    assert recorded_stamp(json.loads(facts)) == video_stamp(long_clip)  # a re-run tells a changed file by it
    assert json.loads(facts)["keyframes_int8_sha256"] == sorted(["0" * 64, ours])  # each segment's copy named
    # The same rows as one worker on the whole video (segments start with a full detection, so
    # boxes differ by the tracker's jitter only).
    whole = run(RunConfig(inputs=(long_clip,), out=tmp_path / "whole.parquet", workers=0, sampling=Sampling(every_n=3)),
                progress=False)
    reference = pq.read_table(tmp_path / "whole.parquet")
    assert whole.frames == 200 and reference.column("frame_index").to_pylist() == frames
    for c in ("x1", "y2"):
        assert np.median(np.abs(reference.column(c).to_numpy(zero_copy_only=False)
                                - table.column(c).to_numpy(zero_copy_only=False))) < 2.0


def test_a_split_video_that_changed_is_planned_again(long_clip, tmp_path):
    """A plan and its finished segments are for the file as it was (size, modification time):
    rewritten since, its segments would stitch rows of two different files."""
    clip = tmp_path / "clip.mp4"
    shutil.copy(long_clip, clip)
    out = tmp_path / "results"
    layout, key = OutputLayout(out), part_key(clip)
    config = RunConfig(inputs=(clip,), out=out, workers=0, sampling=Sampling(every_n=30))
    with OutputClaim(out):
        items = work_items(layout, [(clip, key)], workers=2)
        assert [i.segment.index for i in items] == [0, 1] and items[0].stamp == video_stamp(clip)
        collector = PartCollector(layout, schema_with_metadata(run_metadata(config)))
        for table in annotate_tagged(VideoPipeline(config), items[0]):
            collector.add(table)
        assert layout.segment_done(key, 0)
        assert [i.segment.index for i in work_items(layout, [(clip, key)], workers=2)] == [1]  # unchanged: resumed
        mtime_ns = clip.stat().st_mtime_ns
        os.utime(clip, ns=(mtime_ns, mtime_ns + 10**9))  # rewritten in place
        assert [i.segment.index for i in work_items(layout, [(clip, key)], workers=2)] == [0, 1]
        assert not layout.segment_path(key, 0).exists()


def test_each_segment_moves_the_progress_by_its_share(long_clip, tmp_path, monkeypatch):
    """A run of one long video must not sit at 0 of 1 videos until its end: each segment counts
    its share batch by batch, and the stitching brings the video to exactly 1."""
    monkeypatch.setattr(worker, "TABLE_EVERY_S", 0.0)  # a table per batch, whatever this machine's speed
    out = tmp_path / "results"
    layout, key = OutputLayout(out), part_key(long_clip)
    config = RunConfig(inputs=(long_clip,), out=out, workers=0, sampling=Sampling(every_n=6))
    with OutputClaim(out):
        items = work_items(layout, [(long_clip, key)], workers=2)
        collector = PartCollector(layout, schema_with_metadata(run_metadata(config)))
        pipeline = VideoPipeline(config)
        credits = [[collector.add(table) for table in annotate_tagged(pipeline, item)] for item in items]
        collector.close()
    assert [sum(c) for c in credits] == [pytest.approx(0.5), pytest.approx(0.5)]
    assert all(len(c) == 7 and all(x > 0 for x in c[:-1]) for c in credits)  # 50 frames each: 7 batches
    assert layout.part_path(key).exists() and not layout.segment_done(key, 0)


def test_a_matroska_video_is_counted_and_split_like_an_mp4(long_mkv, tmp_path):
    """Matroska headers hold no frame count: the count comes from the file's duration, so a long
    MKV or WebM is split over the workers (it ran whole on one worker) and moves the progress."""
    assert frame_count(long_mkv) == 600
    with OutputClaim(tmp_path / "out"):
        items = work_items(OutputLayout(tmp_path / "out"), [(long_mkv, part_key(long_mkv))], workers=2)
    assert [item.segment.first_frame for item in items] == [0, 300]
    report = DecodeReport()
    next(decode(long_mkv, Sampling(), 8, report=report))
    assert report.frames_expected == 600


@pytest.mark.parametrize(("sampling", "kept"), [(Sampling(every_n=10), 66), (Sampling(every_n=7), 95),
                                              (Sampling(fps=4), 88)])
def test_a_capture_that_starts_inside_a_gop_is_numbered_and_sampled_as_when_annotated_whole(
        carphone, tmp_path, sampling, kept):
    """A recording whose first 20 frames cannot be decoded (it starts inside a GOP). The stitched
    video's frame_index counts decoded frames, as the whole video's does: before, a gap of 20 at
    the boundary. And the segments sample the frames a whole run samples: before, they counted
    --every-n from the stream's first frame and --sample-fps ticks from its time, both undecodable,
    and kept other frames (unless 20 was a multiple of n, as with every 10th)."""
    recording = write_clip(tmp_path / "recording.ts", carphone_frames(carphone), 720, keyint=60)
    clip = start_inside_a_gop(recording, tmp_path / "capture.ts", 20)  # 680 frames from frame 40
    whole = run(RunConfig(inputs=(clip,), out=tmp_path / "whole.parquet", workers=0, sampling=sampling), progress=False)
    reference = pq.read_table(tmp_path / "whole.parquet")
    out = tmp_path / "split"
    layout, key = OutputLayout(out), part_key(clip)
    config = RunConfig(inputs=(clip,), out=out, workers=0, sampling=sampling)
    with OutputClaim(out):
        items = work_items(layout, [(clip, key)], workers=2)
        collector = PartCollector(layout, schema_with_metadata(run_metadata(config)))
        pipeline = VideoPipeline(config)
        for item in items:
            for table in annotate_tagged(pipeline, item):
                collector.add(table)
        collector.close()
    split = pq.read_table(layout.part_path(key))
    assert len(items) == 2 and whole.damaged == collector.damaged == 1  # the 20 frames are lost, and said so
    frames = [c.column("frame_index").drop_null().to_pylist() for c in (reference, split)]
    times = [c.column("pts_s").drop_null().to_pylist() for c in (reference, split)]
    assert frames[1] == frames[0] and times[1] == pytest.approx(times[0]) and len(frames[0]) == kept  # of 660


def test_decoders_know_how_many_frames_each_piece_holds(long_clip):
    """The progress bar's denominator: the whole video's frames from its header, a segment's from
    its plan; a middle segment of a plan stored before plans kept their end frame says nothing."""
    plan = plan_segments(long_clip, 2)
    for piece in [None, *plan]:
        report = DecodeReport()
        decoded = sum(len(batch) for batch in decode(long_clip, Sampling(every_n=5), 64, report=report, segment=piece))
        assert report.frames_expected == report.frames_decoded == decoded * 5
    older = [dataclasses.replace(piece, end_frame=None) for piece in plan]
    expected = []
    for piece in older:
        report = DecodeReport()
        for _ in decode(long_clip, Sampling(every_n=5), 64, report=report, segment=piece):
            pass
        expected.append(report.frames_expected)
    assert expected == [0, 600 - plan[1].first_frame]


def test_a_whole_video_moves_the_progress_batch_by_batch(long_clip, tmp_path, monkeypatch):
    """Each table of rows says how much of its video is done (frames so far over the header's
    count, below 1); the last says 1."""
    monkeypatch.setattr(worker, "TABLE_EVERY_S", 0.0)  # a table per batch, whatever this machine's speed
    config = RunConfig(inputs=(long_clip,), out=tmp_path / "out", workers=0, sampling=Sampling(every_n=12))
    tables = list(annotate_tagged(VideoPipeline(config), WorkItem(long_clip, part_key(long_clip))))
    progress = [t.column(PROGRESS_COLUMN)[0].as_py() for t in tables]
    assert [t.column(STATUS_COLUMN)[0].as_py() for t in tables] == ["rows"] * 6 + ["done"]  # 50 frames
    # Batch k ends with the (8k)-th kept frame, frame 12 (8k - 1): 96k - 11 of 600 frames are behind it.
    assert progress[:-1] == pytest.approx([(96 * k - 11) / 600 for k in range(1, 7)], rel=1e-5) and progress[-1] == 1


def test_a_worker_sends_its_rows_about_once_a_second_as_one_table(long_clip, tmp_path, monkeypatch):
    """Rows go to the driver as one table per TABLE_EVERY_S, not one per decoded batch (each
    table costs the driver CPU on the workers' cores): the same rows, in order, in fewer tables,
    the last still "done" with the video's facts."""
    config = RunConfig(inputs=(long_clip,), out=tmp_path / "out", workers=0, sampling=Sampling(every_n=12))
    pipeline, item = VideoPipeline(config), WorkItem(long_clip, part_key(long_clip))
    monkeypatch.setattr(worker, "TABLE_EVERY_S", 0.0)
    per_batch = list(annotate_tagged(pipeline, item))
    monkeypatch.setattr(worker, "TABLE_EVERY_S", 3600.0)
    together = list(annotate_tagged(pipeline, item))
    assert len(per_batch) == 7 and len(together) == 1  # 50 frames: 7 batches
    assert together[0].column(STATUS_COLUMN)[0].as_py() == "done"
    assert together[0].schema == per_batch[0].schema
    tags = (STATUS_COLUMN, PROGRESS_COLUMN, VIDEO_COLUMN)  # per table: its status, progress and the end's facts
    columns = [name for name in together[0].column_names if name not in tags]
    assert together[0].column(VIDEO_COLUMN)[0].as_py() == per_batch[-1].column(VIDEO_COLUMN)[0].as_py()
    assert together[0].select(columns).equals(pa.concat_tables(per_batch).select(columns))


def test_a_film_among_short_clips_is_cut_and_handed_out_first(carphone, long_clip, tmp_path):
    """Five videos on two workers are more than two a worker, so short clips stay whole; the one
    long video would still hold a worker alone after the rest were done, so it is cut at its
    keyframes, and its segments come first. Before, only runs with fewer than two videos per
    worker were split at all."""
    frames = carphone_frames(carphone)
    clips = [write_clip(tmp_path / f"short{i}.mp4", frames, 60, keyint=60) for i in range(4)]
    videos = [(path, part_key(path)) for path in [*clips, long_clip]]
    layout = OutputLayout(tmp_path / "out")
    with OutputClaim(tmp_path / "out"):
        items = work_items(layout, videos, workers=2)
        segments = [item for item in items if item.segment is not None]
        assert [item.path for item in segments] == [long_clip] * len(segments) and len(segments) >= 2
        # then the short ones, whole
        assert items[len(segments):] == [WorkItem(path, key, stamp=video_stamp(path)) for path, key in videos[:4]]
        assert all(item.segment.first_frame % 60 == 0 for item in segments)  # at keyframes
        # Its plan is kept: a re-run hands out the same segments, not a new cut.
        assert work_items(layout, videos, workers=2) == items
    # Equal clips, many a worker: none is worth cutting.
    equal = [(path, part_key(path)) for path in clips]
    assert work_items(OutputLayout(tmp_path / "out2"), equal, workers=2) == [WorkItem(p, k, stamp=video_stamp(p))
                                                                          for p, k in equal]


def test_stitching_imports_no_torch():
    """The driver stitches segments and imports torch nowhere else: associating faces across a
    boundary and telling a cut there are numpy (annotator.continuity), so the end of a segmented
    video, where the run waits for the stitch, does not wait 1.3 s for torch's import as well."""
    import subprocess
    import sys

    code = """
import sys
import numpy as np
import pyarrow as pa
from annotator.schema import frame_rows
from annotator.segmenting import _continuous_ids, is_cut
rows = pa.Table.from_batches([frame_rows(
    video_path="/v.mp4", video_id="id", model_id="m", frame_index=np.array([9]), pts_s=np.array([0.3]),
    faces_per_frame=np.array([1]), boxes=np.array([[1, 1, 51, 51]], np.float32), scores=np.ones(1),
    landmarks=np.zeros((1, 5, 2)), track_ids=np.array([0]), probs=np.full((1, 7), 1 / 7), va=None)])
ids, _ = _continuous_ids(rows, np.array([[0, 0, 50, 50]], np.float32), np.array([4]), next_id=5)
assert ids.to_pylist() == [4], ids
assert is_cut([0.0] * 432, [100.0] * 432) and not is_cut([0.0] * 432, [1.0] * 432)
assert "torch" not in sys.modules, "stitching imported torch"
"""
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]


def test_a_cut_on_a_segment_boundary_ends_the_tracks(carphone, tmp_path):
    """300 frames of carphone, then a cut to 300 darker ones (another exposure, the face where it
    was), on the boundary of the video's two segments: the stitcher must not carry the track
    across the cut, as one worker on the whole video does not."""
    frames = carphone_frames(carphone)
    shots = [frames[i % len(frames)] for i in range(300)] + [(frames[i % len(frames)] * 0.4).astype(np.uint8)
                                                             for i in range(300)]
    clip = write_clip(tmp_path / "cut.mp4", shots, 600, keyint=60)
    out = tmp_path / "results"
    summary = run(RunConfig(inputs=(clip,), out=out, workers=2, sampling=Sampling(every_n=3)), progress=False)
    assert summary.failed == 0 and summary.frames == 200
    layout, key = OutputLayout(out), part_key(clip)
    assert b'"segments": 2' in pq.read_metadata(layout.part_path(key)).metadata[b"annotator.video"]
    whole = tmp_path / "whole.parquet"
    run(RunConfig(inputs=(clip,), out=whole, workers=0, sampling=Sampling(every_n=3)), progress=False)
    for table in (pq.read_table(layout.part_path(key)), pq.read_table(whole)):
        faces = table.filter(pc.is_valid(table.column("face_index")))
        before = faces.filter(pc.less(faces.column("frame_index"), 300))
        after = faces.filter(pc.greater_equal(faces.column("frame_index"), 300))
        assert before.num_rows >= 95 and after.num_rows >= 95
        assert set(before.column("track_id").to_pylist()) == {0} and set(after.column("track_id").to_pylist()) == {1}

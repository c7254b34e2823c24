"""Long videos over several workers: cut them into segments, and stitch the segments back.

A long video would otherwise run on one worker while the others idle: a 2-hour film on a 16-core
machine, alone or at the end of a corpus of short clips. Such videos are cut at keyframes into
segments (``engines.decoders.segments``) that run in parallel. Each finished
segment is a hidden part; the plan is kept beside them, so a re-run redoes only the segments
that are missing. When the last segment of a video is in, its parts are stitched into the
video's one part: rows in frame order, each frame once, and track ids made continuous by
associating the faces of one segment's last sampled frame with the next one's first.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from annotator.continuity import associate, is_cut
from annotator.schema import SCHEMA, error_row
from annotator.worker import WorkItem
from annotator.writer import (KEYFRAMES_INT8_FACT, TIMESTAMPS_CHECKED, OutputLayout, PartWriter, changed_since,
                              read_metadata, recorded_stamp, video_stamp)
from engines.decoders import DecodeReport
from engines.decoders.segments import (Segment, TimestampsGoBack, check_video_timestamps, frame_count,
                                      plan_segments)

log = logging.getLogger(__name__)

#: A segment shorter than this (10 s at 30 fps) costs more in start-up (seek, a keyframe's full
#: detection, a fresh tracker) than it gains in parallelism.
MIN_SEGMENT_FRAMES = 300
#: Work items per worker when videos are split: enough that uneven segments still balance.
ITEMS_PER_WORKER = 4


def work_items(layout: OutputLayout, videos: list[tuple[Path, str]], workers: int) -> list[WorkItem]:
    """The items of a run: whole videos, and the missing segments of videos worth splitting.

    A video split by an earlier run keeps its plan, unless the file changed since (another size
    or modification time, :func:`annotator.writer.video_stamp`). Otherwise a video is cut into
    about as many pieces as its share of the run's work is worth in items of
    :data:`ITEMS_PER_WORKER` per worker (:func:`_pieces`): all of them where there are fewer
    than two videos per worker, and in a larger corpus the few long ones (a film among short
    clips) that would otherwise run on one worker after the rest are done. Segments are handed
    out first, so the whole videos fill the workers' last gaps.
    """
    stamps = {key: video_stamp(path) for path, key in videos}
    plans = {key: plan for path, key in videos if (plan := load_plan(layout, key, stamps[key], path)) is not None}
    fresh = [(path, key) for path, key in videos if key not in plans]
    pieces = _pieces(fresh, workers, few=len(videos) < 2 * workers) if workers > 1 and fresh else {}
    segments: list[WorkItem] = []
    wholes: list[WorkItem] = []
    for path, key in videos:
        plan = plans.get(key)
        if plan is None and pieces.get(key, 1) > 1:
            plan = _plan(path, pieces[key])
            if len(plan) > 1:
                save_plan(layout, key, plan, stamps[key])
        if plan is None or len(plan) == 1:
            wholes.append(WorkItem(path, key, stamp=stamps[key]))
            continue
        segments += [WorkItem(path, key, s, stamps[key]) for s in plan if not layout.segment_done(key, s.index)]
    return segments + wholes


def _pieces(fresh: list[tuple[Path, str]], workers: int, few: bool) -> dict[str, int]:
    """How many segments each video not yet planned is cut into (absent: one).

    A video's share of the run is its frames over all videos' frames where there are ``few``
    videos (each header is read). In a larger corpus it is estimated from file sizes, a stat
    each, so a run over thousands of files does not open them all on the driver; only a video
    whose share is worth two items or more is opened, to count its frames.
    """
    if few:
        frames = {key: _frames(path) for path, key in fresh}
        total = sum(frames.values()) or 1
        pieces = {}
        for _, key in fresh:
            # A multiple of the workers, so the last round of segments keeps all of them busy.
            rounds = min(round(frames[key] / total * ITEMS_PER_WORKER), frames[key] // (MIN_SEGMENT_FRAMES * workers))
            pieces[key] = workers * rounds if rounds >= 1 else max(1, frames[key] // MIN_SEGMENT_FRAMES)
        return pieces
    sizes = {key: _size(path) for path, key in fresh}
    total = sum(sizes.values()) or 1
    pieces = {}
    for path, key in fresh:
        worth = round(sizes[key] / total * workers * ITEMS_PER_WORKER)
        if worth >= 2:
            pieces[key] = max(1, min(worth, _frames(path) // MIN_SEGMENT_FRAMES))
    return pieces


def _size(path: Path) -> int:
    try:
        return path.stat().st_size
    except OSError:  # gone meanwhile: the worker reports it as the video's error row
        return 0


def _frames(path: Path) -> int:
    try:
        return frame_count(path)
    except Exception:  # unreadable here: the worker reports it as the video's error row
        return 0


def _plan(path: Path, pieces: int) -> list[Segment]:
    try:
        return plan_segments(path, pieces)
    except TimestampsGoBack as exc:  # one worker takes it: slower, every frame once
        log.warning("%s: annotated whole, not in %d segments: %s", path, pieces, exc)
        return [Segment(0, 1, None, None, 0, None)]
    except Exception as exc:  # noqa: BLE001 - a file that cannot be scanned is annotated whole
        log.info("%s: not split (%s)", path, exc)
        return [Segment(0, 1, None, None, 0, None)]


def split_in_error(video: Path) -> str | None:
    """Why ``video``, cut into segments before the check, should not have been (its timestamps
    go back: its segments lost frames); None where it was rightly cut or cannot be read now."""
    try:
        check_video_timestamps(video)
    except TimestampsGoBack as exc:
        return str(exc)
    except Exception:  # noqa: BLE001 - unreadable now: the run reports it as usual
        pass
    return None


def load_plan(layout: OutputLayout, key: str, stamp: tuple[int, int] | None = None,
              video: Path | None = None) -> list[Segment] | None:
    """A video's plan, as an earlier run saved it; None (its segments removed) where it cannot be
    read, where ``stamp`` (the file's now) is not the one the plan was made for, or where a plan
    from before the timestamps check (:data:`TIMESTAMPS_CHECKED`) cut a video it should not
    have. ``video``: its path, for the warning and the check."""
    path = layout.plan_path(key)
    if not path.is_file():
        return None
    try:
        saved = json.loads(path.read_text())
        plan = [Segment.from_json(s) for s in saved["segments"]]
        planned_for = saved.get("stamp")
        checked = bool(saved.get(TIMESTAMPS_CHECKED))
    except (OSError, ValueError, KeyError, TypeError):
        log.warning("%s: unreadable segment plan, the video is planned again", path)
        _drop_plan(layout, key)
        return None
    if changed_since(planned_for, stamp):
        log.warning("%s: changed since it was split (size or modification time): its segments are "
                    "annotated again", video or key)
        _drop_plan(layout, key)
        return None
    if not checked and video is not None:
        if (why := split_in_error(video)) is not None:
            log.warning("%s: cut into segments by an earlier version although %s (its segments lose "
                        "frames): annotated again, whole", video, why)
            _drop_plan(layout, key)
            return None
        save_plan(layout, key, plan, planned_for)  # checked now: not again at the next resume
    return plan


def _drop_plan(layout: OutputLayout, key: str) -> None:
    """Remove a video's plan and its segment parts (all written by annotate)."""
    for part in layout.parts_dir.glob(layout.segment_path(key, 0).name.replace(".seg0000.", ".seg*.")):
        part.unlink(missing_ok=True)
    layout.plan_path(key).unlink(missing_ok=True)


def save_plan(layout: OutputLayout, key: str, plan: list[Segment], stamp: tuple[int, int] | None = None) -> None:
    """Save a video's plan (write, fsync, rename), with the file's stamp it was made for."""
    path = layout.plan_path(key)
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w") as fh:
        json.dump({"segments": [s.to_json() for s in plan], "stamp": stamp, TIMESTAMPS_CHECKED: True}, fh)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)


def complete(layout: OutputLayout, key: str) -> bool:
    """Whether every segment of a planned video is in."""
    plan = load_plan(layout, key)
    return plan is not None and all(layout.segment_path(key, s.index).is_file() for s in plan)


def stitch(layout: OutputLayout, key: str, schema: pa.Schema) -> dict[str, object]:
    """Merge a video's segment parts into its part (then drop them); returns the video's facts.

    Track ids continue across a boundary where the faces do, unless the two frames either side
    of it are a cut (``shot_ends`` in a segment's facts, see annotator.continuity.is_cut).

    ``frame_index`` counts decoded frames, as in a video annotated whole. A segment numbers its
    frames from its place in the stream (its plan's ``first_frame``), which counts the frames
    earlier segments could not decode; those are taken off here, so a recording that starts
    inside a GOP (a broadcast capture) has no gap of its first lost frames at every boundary.
    """
    plan = load_plan(layout, key)
    assert plan is not None, key
    writer = PartWriter(layout.part_path(key), schema)
    reports, path, video_id = [], "", None
    unavailable: str | None = None  # why a segment's worker had no int8 copy (see worker.video_facts)
    stamps = set()  # the file's stamp each segment was annotated for (one: the plan was checked)
    int8_copies: set[str | None] = set()  # the int8 detectors the segments' keyframes took (one per machine)
    previous_boxes, previous_ids = np.zeros((0, 4), np.float32), np.zeros(0, np.int64)
    previous_end: list[float] | None = None  # the last frame's shot signature (annotator.tracking)
    next_id = 0
    decoded_before = 0  # frames the segments before this one decoded
    size_changes: list[list[int]] = []  # the video's (see DecodeReport.size_changes)
    shown: tuple[int, int] | None = None  # the size of the last frame so far, as displayed
    try:
        for segment in plan:
            part = layout.segment_path(key, segment.index)
            facts = read_metadata(part)["video"]
            path = facts["video_path"]
            stamps.add(recorded_stamp(facts))
            int8_copies.update([facts[KEYFRAMES_INT8_FACT]] if KEYFRAMES_INT8_FACT in facts else [])
            unavailable = facts.get("keyframes_int8_unavailable") or unavailable
            reports.append(_report(facts))
            table = pq.read_table(part).cast(SCHEMA)
            rows = table.filter(pc.is_null(table.column("error")))  # the segment's own damage row goes
            lost_before = segment.first_frame - decoded_before  # undecodable frames of the segments before
            decoded_before += reports[-1].frames_decoded
            if rows.num_rows == 0:
                continue
            if lost_before > 0:
                at = rows.schema.get_field_index("frame_index")
                rows = rows.set_column(at, "frame_index", pc.subtract(rows.column("frame_index"), lost_before))
            video_id = rows.column("video_id")[0].as_py()
            own_size = (reports[-1].width, reports[-1].height)  # its first frame's
            if shown is not None and own_size != shown:  # the frames changed size at the boundary
                size_changes.append([pc.min(rows.column("frame_index")).as_py(), *own_size])
                # The last faces' boxes follow into the new pixels, as the tracker's do within a segment.
                stretch = (own_size[0] / shown[0], own_size[1] / shown[1])
                previous_boxes = previous_boxes * np.array(stretch * 2, np.float32)
            size_changes += [[index - max(lost_before, 0), width, height]
                             for index, width, height in reports[-1].size_changes]
            shown = (size_changes[-1][1], size_changes[-1][2]) if reports[-1].size_changes else own_size
            ends = facts.get("shot_ends")
            if ends and previous_end is not None and is_cut(previous_end, ends[0]):
                previous_boxes, previous_ids = previous_boxes[:0], previous_ids[:0]  # a new shot: new tracks
            ids, next_id = _continuous_ids(rows, previous_boxes, previous_ids, next_id)
            rows = rows.set_column(rows.schema.get_field_index("track_id"), "track_id", ids)
            writer.write(rows)
            previous_boxes, previous_ids = _faces_of(rows, pc.max(rows.column("frame_index")).as_py())
            previous_end = ends[1] if ends else None
        report = _combine(reports)
        report.size_changes = size_changes
        if report.damaged:
            writer.write(error_row(path, f"{path}: {report.describe()}", video_id=video_id))
        facts = {"video_path": path, **dataclasses.asdict(report),
                 "damage": report.describe() if report.damaged else None, "segments": len(plan),
                 TIMESTAMPS_CHECKED: True}  # load_plan checked a plan from before the check
        if len(stamps) == 1 and (stamp := stamps.pop()) is not None:
            facts["file_size"], facts["file_mtime_ns"] = stamp
        if int8_copies:  # segments annotated on machines whose copies differ: each is named
            facts[KEYFRAMES_INT8_FACT] = int8_copies.pop() if len(int8_copies) == 1 else sorted(int8_copies, key=str)
        if unavailable is not None:
            facts["keyframes_int8_unavailable"] = unavailable
        writer.commit(json.dumps(facts))
    except BaseException:
        writer.abort()
        raise
    for segment in plan:
        layout.segment_path(key, segment.index).unlink(missing_ok=True)
    layout.plan_path(key).unlink(missing_ok=True)
    return facts


def _faces_of(rows: pa.Table, frame: int) -> tuple[np.ndarray, np.ndarray]:
    """(boxes, track ids) of the faces of one frame."""
    mask = pc.and_(pc.equal(rows.column("frame_index"), frame), pc.is_valid(rows.column("face_index")))
    faces = rows.filter(mask)
    boxes = np.stack([faces.column(c).to_numpy(zero_copy_only=False) for c in ("x1", "y1", "x2", "y2")], axis=1)
    return boxes.astype(np.float32).reshape(-1, 4), faces.column("track_id").to_numpy(zero_copy_only=False).astype(np.int64)


def _continuous_ids(rows: pa.Table, previous_boxes: np.ndarray, previous_ids: np.ndarray,
                    next_id: int) -> tuple[pa.Array, int]:
    """The segment's track ids (which start at 0) as the video's: a face on the segment's first
    frame that continues one on the previous segment's last frame keeps its id, others get new ones."""
    local = rows.column("track_id").combine_chunks()
    if local.null_count == len(local):
        return local, next_id
    mapping = np.full(int(pc.max(local).as_py()) + 1, -1, np.int64)
    boxes, first_ids = _faces_of(rows, pc.min(rows.column("frame_index")).as_py())
    continues = associate(previous_boxes, boxes)
    mapping[first_ids[continues >= 0]] = previous_ids[continues[continues >= 0]]
    for local_id in np.unique(local.drop_null().to_numpy()):
        if mapping[local_id] < 0:
            mapping[local_id], next_id = next_id, next_id + 1
    valid = local.is_valid().to_numpy(zero_copy_only=False)
    values = mapping[np.where(valid, local.fill_null(0).to_numpy(), 0)]
    return pa.array(values, pa.int64(), mask=~valid), next_id


def _report(facts: dict) -> DecodeReport:
    fields = DecodeReport.__dataclass_fields__
    return DecodeReport(**{k: v for k, v in facts.items() if k in fields})


def _combine(reports: list[DecodeReport]) -> DecodeReport:
    """One video's report from its segments' (in order)."""
    first_bad = [r.first_bad_s for r in reports if r.first_bad_s is not None]
    return DecodeReport(
        rotation_cw_deg=reports[0].rotation_cw_deg, mirrored=reports[0].mirrored,
        width=reports[0].width, height=reports[0].height,
        sample_aspect=reports[0].sample_aspect,
        frames_decoded=sum(r.frames_decoded for r in reports), frames_lost=sum(r.frames_lost for r in reports),
        bad_packets=sum(r.bad_packets for r in reports), first_bad_s=min(first_bad) if first_bad else None,
        stopped_early=next((r.stopped_early for r in reports if r.stopped_early), None),
        tone_mapped=reports[0].tone_mapped,
        other_video_streams=reports[0].other_video_streams,
    )

"""Driver side of a run: routes the streamed, tagged tables to one part writer per video.

Workers tag every table with its video's part key and a status (see annotator.worker). A part
is committed only on ``done`` (with the video's facts in its footer); a ``failed`` video gets an
error part; a video started again from its first frame (its worker died: see
annotator.actor_pool) has its open part started over, so no row is ever written twice.
"""

from __future__ import annotations

import json
import logging
import math
from collections.abc import Iterator
from typing import NamedTuple
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from annotator.worker import INTERNAL_COLUMNS, PART_COLUMN, PROGRESS_COLUMN, STATUS_COLUMN, VIDEO_COLUMN
from annotator import segmenting
from annotator.writer import OutputLayout, PartWriter, write_part

log = logging.getLogger(__name__)


class Run(NamedTuple):
    """Consecutive rows of one streamed table with one (part, status)."""

    tag: str  # the work item's part tag: a video's key, ``key#i`` for segment i
    status: str  # rows, done or failed
    rows: pa.Table  # output columns only
    video: str | None  # the video's facts (JSON) on ``done``
    progress: float  # how much of the work item is done with these rows, 0-1


def split_runs(table: pa.Table) -> Iterator[Run]:
    """Split a streamed table into runs of one (part, status).

    A worker tags each table it yields with one (part, status); the split keeps the collector
    right for a stream that joins tables (a video's last ``rows`` and its ``done`` rows, or
    several videos) into one, as Ray Data's blocks did.
    """
    keys = table.column(PART_COLUMN).to_numpy(zero_copy_only=False)
    statuses = table.column(STATUS_COLUMN).to_numpy(zero_copy_only=False)
    change = np.flatnonzero((keys[1:] != keys[:-1]) | (statuses[1:] != statuses[:-1])) + 1
    bounds = [0, *change.tolist(), table.num_rows]
    videos, progress = table.column(VIDEO_COLUMN), table.column(PROGRESS_COLUMN)
    rows = table.drop_columns(list(INTERNAL_COLUMNS))
    for lo, hi in zip(bounds[:-1], bounds[1:]):
        yield Run(str(keys[lo]), str(statuses[lo]), rows.slice(lo, hi - lo), videos[hi - 1].as_py(),
                  float(progress[hi - 1].as_py()))


def frames_and_faces(rows: pa.Table) -> tuple[int, int]:
    """(sampled frames, faces) in a run of output rows; error rows count as neither."""
    face_index = rows.column("face_index")
    is_frame = pc.and_(pc.is_valid(rows.column("frame_index")), pc.fill_null(pc.equal(face_index, 0), True))
    return pc.sum(is_frame).as_py() or 0, pc.count(face_index).as_py() or 0


class PartCollector:
    """Turns the stream into committed parts and keeps the run's counters.

    A table tagged ``key#i`` belongs to segment ``i`` of a split video: it goes to a hidden
    segment part, and the video's part is stitched when its last segment is in.
    """

    def __init__(self, layout: OutputLayout, schema: pa.Schema) -> None:
        self.layout = layout
        self.schema = schema
        self.frames = self.faces = self.failed = self.damaged = self.frames_lost = 0
        self.problems: list[str] = []  # one line per failed or damaged video, for the summary
        self._writers: dict[str, PartWriter] = {}
        self._last_frame: dict[str, int] = {}
        self._counted: dict[str, tuple[int, int]] = {}  # frames, faces of each open part
        self._failed: set[str] = set()  # videos with a failed segment: counted once
        self._credited: dict[str, float] = {}  # how much of each video the progress has counted
        self._item_credited: dict[str, float] = {}  # the same for each work item (a video or a segment)
        self._segments: dict[str, int] = {}  # segments in each split video's plan

    def _path(self, tag: str) -> Path:
        key, _, index = tag.partition("#")
        return self.layout.segment_path(key, int(index)) if index else self.layout.part_path(key)

    def add(self, table: pa.Table) -> float:
        """Consume one streamed table; returns how many videos' worth of work it finished.

        Progress counts in videos, in hundredths: a work item's rows count the part of it they
        finish (a whole video's share is 1, a segment's 1 / segments in its plan), so a long video
        moves the progress bar (and its time left) batch by batch; a whole video done or failed
        counts what is left of its 1, and so does a split video's stitching or failure.
        """
        finished = 0.0
        for tag, status, rows, video, progress in split_runs(table):
            key = tag.partition("#")[0]
            if status == "failed":
                self.add_failure(key, rows, tag)
                finished += self._credit(key, 1.0)
                continue
            first = rows.column("frame_index")[0].as_py()  # null on a damaged video's closing row
            if tag in self._writers and first is not None and first <= self._last_frame[tag]:
                log.warning("%s: started again on a new worker, rewriting its part", tag)
                self._drop(tag)
            if tag not in self._writers:
                self._writers[tag] = PartWriter(self._path(tag), self.schema)
                self._counted[tag] = (0, 0)
            self._writers[tag].write(rows)
            self._last_frame[tag] = pc.max(rows.column("frame_index")).as_py() or self._last_frame.get(tag, -1)
            frames, faces = frames_and_faces(rows)
            self.frames, self.faces = self.frames + frames, self.faces + faces
            self._counted[tag] = (self._counted[tag][0] + frames, self._counted[tag][1] + faces)
            if status == "rows" or tag != key:
                finished += self._advance(key, tag, progress)
            if status == "done":
                self._writers[tag].commit(video)
                del self._writers[tag], self._counted[tag]
                if tag == key:
                    self.note_damage(json.loads(video) if video else {})
                    finished += self._credit(key, 1.0)
                elif key not in self._failed and segmenting.complete(self.layout, key):
                    self.note_damage(segmenting.stitch(self.layout, key, self.schema))
                    finished += self._credit(key, 1.0)
        return finished

    def _advance(self, key: str, tag: str, progress: float) -> float:
        """Count work item ``tag`` as ``progress`` done (never backwards: a video started again
        keeps its count), in hundredths of a video rounded down, so a video's segments never
        add up to more than its stitching would."""
        share = 1.0 if tag == key else 1.0 / self._plan_size(key)
        target = math.floor(progress * share * 100 + 1e-6) / 100
        gain = target - self._item_credited.get(tag, 0.0)
        if key in self._failed or gain <= 0:
            return 0.0
        self._item_credited[tag] = target
        return self._credit(key, gain)

    def _credit(self, key: str, share: float) -> float:
        """Count ``share`` more of a video's progress, never more than its 1 in all."""
        done = self._credited.get(key, 0.0)
        share = min(share, 1.0 - done)
        self._credited[key] = done + share
        return share

    def _plan_size(self, key: str) -> int:
        if key not in self._segments:
            plan = segmenting.load_plan(self.layout, key)
            self._segments[key] = len(plan) if plan else 1
        return self._segments[key]

    def add_failure(self, key: str, error_row: pa.Table, tag: str | None = None) -> int:
        """Record a video that could not be annotated (or a segment of it): its one error row, as
        the video's error part. Returns 1 the first time a video fails, else 0."""
        self._drop(tag or key)
        write_part(self.layout.part_path(key, failed=True), self.schema, error_row.combine_chunks().to_batches()[0])
        self.problems.append(error_row.column("error")[0].as_py())
        if key in self._failed:
            return 0
        self._failed.add(key)
        self.failed += 1
        return 1

    def note_damage(self, facts: dict) -> None:
        """Count a video annotated as far as it decodes (its facts: worker.video_facts)."""
        if facts.get("damage"):
            self.damaged += 1
            self.frames_lost += int(facts.get("frames_lost") or 0)
            self.problems.append(f"{facts['video_path']}: {facts['damage']}")

    def _drop(self, tag: str) -> None:
        """Abandon an open part (its rows are being replaced) and uncount its rows."""
        if tag in self._writers:
            self._writers.pop(tag).abort()
            frames, faces = self._counted.pop(tag)
            self.frames, self.faces = self.frames - frames, self.faces - faces

    def close(self) -> None:
        """Abort parts still open (an interrupted run): nothing partial is ever kept."""
        for writer in self._writers.values():
            writer.abort()
        self._writers.clear()

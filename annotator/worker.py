"""The unit of work: one video → a stream of tagged Arrow tables, failures included.

Each table carries the output columns plus three internal ones the driver strips: ``_part``
(which part file the rows belong to), ``_status`` (``rows``; ``done`` on the video's last
table; ``failed`` on the single error row of a video that could not be annotated) and
``_video`` (on ``done`` rows: the video's facts as JSON, for the part's file metadata). The last
table is held back one step so it can be tagged ``done`` without an extra empty message.

A damaged video that partly decodes keeps its rows and ends with one extra row whose ``error``
says what was lost (see :meth:`engines.decoders.DecodeReport.describe`).
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterator
from pathlib import Path

import pyarrow as pa

from annotator.config import RunConfig
from annotator.pipeline import VideoPipeline
from annotator.schema import constant_column, error_row
from engines.decoders import DecodeError, DecodeReport

log = logging.getLogger(__name__)

PART_COLUMN = "_part"
STATUS_COLUMN = "_status"
VIDEO_COLUMN = "_video"
INTERNAL_COLUMNS = (PART_COLUMN, STATUS_COLUMN, VIDEO_COLUMN)


def tag_table(batch: pa.RecordBatch, part: str, status: str, video: str | None = None) -> pa.Table:
    n = batch.num_rows
    table = pa.Table.from_batches([batch])
    table = table.append_column(PART_COLUMN, constant_column(part, n))
    table = table.append_column(STATUS_COLUMN, constant_column(status, n))
    return table.append_column(VIDEO_COLUMN, constant_column(video, n))


def video_facts(path: Path, report: DecodeReport) -> dict[str, object]:
    """What the part's file metadata records about its video: size, rotation applied, damage."""
    return {"video_path": str(path), "width": report.width, "height": report.height,
            "rotation_cw_deg": report.rotation_cw_deg, "frames_decoded": report.frames_decoded,
            "frames_lost": report.frames_lost, "damage": report.describe() if report.damaged else None}


def annotate_tagged(pipeline: VideoPipeline, path: Path, part: str) -> Iterator[pa.Table]:
    """Tagged tables of one video; never raises for a bad video, it reports it as a row."""
    pending: pa.RecordBatch | None = None
    report = DecodeReport()
    try:
        for batch in pipeline.annotate(path, report):
            if pending is not None:
                yield tag_table(pending, part, "rows")
            pending = batch
        if pending is None:
            raise DecodeError(f"{path}: no frames decoded")
    except (DecodeError, OSError) as exc:
        message = str(exc) if str(path) in str(exc) else f"{path}: {exc}"
        log.info("%s", message)  # the driver lists failed videos after the run
        yield tag_table(error_row(str(path), message), part, "failed")
        return
    except Exception as exc:  # a bug or a model failure must not abort a week-long run
        log.exception("%s: annotation failed", path)
        yield tag_table(error_row(str(path), f"{path}: {type(exc).__name__}: {exc}"), part, "failed")
        return
    if report.damaged:
        log.info("%s: %s", path, report.describe())
        yield tag_table(pending, part, "rows")
        pending = error_row(str(path), f"{path}: {report.describe()}", video_id=pending.column("video_id")[0].as_py())
    yield tag_table(pending, part, "done", json.dumps(video_facts(path, report)))


class RayVideoWorker:
    """Ray Data callable class: models load once in ``__init__``, one video per call."""

    def __init__(self, config: RunConfig, threads: int = 0) -> None:
        logging.basicConfig(level=logging.WARNING)
        self.pipeline = VideoPipeline(config, threads=threads)

    def __call__(self, batch: pa.Table) -> Iterator[pa.Table]:
        for path, part in zip(batch.column("path").to_pylist(), batch.column("part").to_pylist()):
            yield from annotate_tagged(self.pipeline, Path(path), part)

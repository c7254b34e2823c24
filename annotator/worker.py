"""The unit of work: one video → a stream of tagged Arrow tables, failures included.

Each table carries the output columns plus two internal ones the driver strips: ``_part``
(which part file the rows belong to) and ``_status`` (``rows``; ``done`` on the video's last
table; ``failed`` on the single error row of a video that could not be annotated). The last
table is held back one step so it can be tagged ``done`` without an extra empty message.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from pathlib import Path

import pyarrow as pa

from annotator.config import RunConfig
from annotator.pipeline import VideoPipeline
from annotator.schema import constant_column, error_row
from engines.decoders import DecodeError

log = logging.getLogger(__name__)

PART_COLUMN = "_part"
STATUS_COLUMN = "_status"


def tag_table(batch: pa.RecordBatch, part: str, status: str) -> pa.Table:
    n = batch.num_rows
    table = pa.Table.from_batches([batch])
    table = table.append_column(PART_COLUMN, constant_column(part, n))
    return table.append_column(STATUS_COLUMN, constant_column(status, n))


def annotate_tagged(pipeline: VideoPipeline, path: Path, part: str) -> Iterator[pa.Table]:
    """Tagged tables of one video; never raises for a bad video, it reports it as a row."""
    pending: pa.RecordBatch | None = None
    try:
        for batch in pipeline.annotate(path):
            if pending is not None:
                yield tag_table(pending, part, "rows")
            pending = batch
        if pending is None:
            raise DecodeError(f"{path}: no frames decoded")
    except (DecodeError, OSError) as exc:
        message = str(exc) if str(path) in str(exc) else f"{path}: {exc}"
        log.warning("%s", message)
        yield tag_table(error_row(str(path), message), part, "failed")
        return
    except Exception as exc:  # a bug or a model failure must not abort a week-long run
        log.exception("%s: annotation failed", path)
        yield tag_table(error_row(str(path), f"{path}: {type(exc).__name__}: {exc}"), part, "failed")
        return
    yield tag_table(pending, part, "done")


class RayVideoWorker:
    """Ray Data callable class: models load once in ``__init__``, one video per call."""

    def __init__(self, config: RunConfig, threads: int = 0) -> None:
        logging.basicConfig(level=logging.WARNING)
        self.pipeline = VideoPipeline(config, threads=threads)

    def __call__(self, batch: pa.Table) -> Iterator[pa.Table]:
        for path, part in zip(batch.column("path").to_pylist(), batch.column("part").to_pylist()):
            yield from annotate_tagged(self.pipeline, Path(path), part)

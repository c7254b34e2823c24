"""The unit of work: one video (or one segment of a long video) → a stream of tagged Arrow
tables, failures included.

Each table carries the output columns plus four internal ones the driver strips: ``_part``
(the :attr:`WorkItem.tag`: which part file the rows belong to), ``_status`` (``rows``; ``done`` on the video's last
table; ``failed`` on the single error row of a video that could not be annotated), ``_video``
(on ``done`` rows: the video's facts as JSON, for the part's file metadata; on the ``failed`` row
of a video its worker could not open or raised on, the worker's node: :mod:`annotator.node_access`,
:data:`RAISED_FACT`) and ``_progress``
(how much of the work item is done with this table, 0-1, for the driver's progress bar). The
last table is held back one step so it can be tagged ``done`` without an extra empty message.

A damaged video that partly decodes keeps its rows and ends with one extra row whose ``error``
says what was lost (see :meth:`engines.decoders.DecodeReport.describe`).
"""

from __future__ import annotations

import dataclasses
import functools
import json
import logging
import os
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import pyarrow as pa

from annotator.config import RunConfig
from annotator.logs import log_to_stderr
from annotator.node_access import this_node, unreadable_facts, unreadable_here
from annotator.schema import constant_column, error_row
from annotator.watchdog import StallWatchdog
from annotator.writer import KEYFRAMES_INT8_FACT
from engines.decoders import DecodeError, DecodeReport
from engines.decoders.segments import Segment

if TYPE_CHECKING:
    from annotator.pipeline import VideoPipeline

log = logging.getLogger(__name__)

PART_COLUMN = "_part"
STATUS_COLUMN = "_status"
VIDEO_COLUMN = "_video"
PROGRESS_COLUMN = "_progress"
INTERNAL_COLUMNS = (PART_COLUMN, STATUS_COLUMN, VIDEO_COLUMN, PROGRESS_COLUMN)
#: The key of a failed row's video facts that names the node whose worker raised on the item (a
#: model or runtime failure, not a decoding one): the driver tries the item elsewhere once.
RAISED_FACT = "raised_on"
#: A table of rows never claims more of its item than this: what is left counts when it is done.
ROWS_PROGRESS_CAP = 0.99
#: A worker sends its rows about this often (seconds), as one table, rather than one table per
#: decoded batch: every table costs the driver about 4 ms of CPU (Ray's wait and deserialisation,
#: the collector, the progress bar), on the cores the workers decode on. One table per batch
#: was 940 tables for a 7,500-frame video.
TABLE_EVERY_S = 1.0


def raised_facts(node: dict[str, str] | None) -> str | None:
    """A failed row's video facts (JSON) saying that its worker raised on the item, on ``node``
    (None outside Ray: no other worker to try it on)."""
    return json.dumps({RAISED_FACT: node}) if node else None


def tag_table(batches: pa.RecordBatch | Sequence[pa.RecordBatch], part: str, status: str, video: str | None = None,
              progress: float | None = None) -> pa.Table:
    """``batches`` as one table with the internal columns; ``progress`` defaults to 1 for ``done``
    and ``failed``, else 0."""
    table = pa.Table.from_batches([batches] if isinstance(batches, pa.RecordBatch) else list(batches))
    n = table.num_rows
    if progress is None:
        progress = 0.0 if status == "rows" else 1.0
    table = table.append_column(PART_COLUMN, constant_column(part, n))
    table = table.append_column(STATUS_COLUMN, constant_column(status, n))
    table = table.append_column(VIDEO_COLUMN, constant_column(video, n))
    return table.append_column(PROGRESS_COLUMN, pa.array(np.full(n, progress, np.float32)))


def rows_progress(rows: pa.RecordBatch, first_frame: int, frames_expected: int) -> float:
    """How much of a work item is done once its ``rows`` are: the frames up to the batch's last
    over the frames its header promised (0 when it promised none), below
    :data:`ROWS_PROGRESS_CAP` (a header can be wrong; the item's end counts the rest)."""
    last = rows.column("frame_index")[rows.num_rows - 1].as_py() if rows.num_rows else None
    if not frames_expected or last is None:
        return 0.0
    return min(max((last + 1 - first_frame) / frames_expected, 0.0), ROWS_PROGRESS_CAP)


@dataclass(frozen=True)
class WorkItem:
    """What a worker annotates: a video, or one segment of it."""

    path: Path
    key: str  # the video's part key (annotator.writer.part_key)
    segment: Segment | None = None
    stamp: tuple[int, int] | None = None  # the file's (size, mtime_ns) when planned (annotator.writer.video_stamp)

    @property
    def tag(self) -> str:
        """The part the rows go to: the video's key, ``key#index`` for a segment."""
        return self.key if self.segment is None else f"{self.key}#{self.segment.index}"


def video_facts(path: Path, report: DecodeReport, stamp: tuple[int, int] | None = None,
                keyframes_int8: str | None = None, int8_unavailable: str | None = None) -> dict[str, object]:
    """What the part's file metadata records about its video: size, rotation applied, damage
    (with the report's fields, so the segments of a video can be summed up), the file's size and
    modification time (``stamp``), by which a re-run tells a changed video, and the sha256 of the
    int8 detector its keyframes took, if any (the worker's own copy, see engines.int8), or, where
    the worker could not have one, None and why."""
    facts = {"video_path": str(path), **dataclasses.asdict(report),
             "damage": report.describe() if report.damaged else None}
    if stamp is not None:
        facts["file_size"], facts["file_mtime_ns"] = stamp
    if keyframes_int8 is not None:
        facts[KEYFRAMES_INT8_FACT] = keyframes_int8
    elif int8_unavailable is not None:
        facts[KEYFRAMES_INT8_FACT], facts["keyframes_int8_unavailable"] = None, int8_unavailable
    return facts


def annotate_watched(pipeline: VideoPipeline, item: WorkItem, watchdog: StallWatchdog,
                     stalled: str) -> Iterator[pa.Table]:
    """:func:`annotate_tagged` under ``watchdog``: the process ends, saying ``stalled`` (a line
    naming the file), once the item decodes no frame and yields no table for its timeout.
    Frames decoded count as progress; waiting for the consumer to take a table does not count."""
    report = DecodeReport()
    with watchdog.watching(lambda: (report.frames_decoded, report.bad_packets), stalled) as watch:
        for table in annotate_tagged(pipeline, item, report):
            with watch.paused():
                yield table


def annotate_tagged(pipeline: VideoPipeline, item: WorkItem, report: DecodeReport | None = None) -> Iterator[pa.Table]:
    """Tagged tables of one work item; never raises for a bad video, it reports it as a row.

    ``report``: filled in as decoding goes (frames decoded so far, damage), for a watcher.
    """
    path, part = item.path, item.tag
    first_frame = item.segment.first_frame if item.segment is not None else 0
    pending: list[pa.RecordBatch] = []  # rows not sent yet: always the last batch, for the end
    sent_at = time.monotonic()
    report = report if report is not None else DecodeReport()

    def rows_table() -> pa.Table:
        return tag_table(pending, part, "rows", progress=rows_progress(pending[-1], first_frame, report.frames_expected))

    if (why := unreadable_here(path)) is not None:  # here: another node may read it (annotator.node_access)
        log.info("%s: %s", path, why)
        yield tag_table(error_row(str(path), f"{path}: {why}"), part, "failed", unreadable_facts(this_node()))
        return
    try:
        for batch in pipeline.annotate(path, report, item.segment):
            if pending and time.monotonic() - sent_at >= TABLE_EVERY_S:
                yield rows_table()
                pending, sent_at = [], time.monotonic()
            pending.append(batch)
        if not pending:
            raise DecodeError(f"{path}: no frames decoded")
    except (DecodeError, OSError) as exc:
        message = str(exc) if str(path) in str(exc) else f"{path}: {exc}"
        log.info("%s", message)  # the driver lists failed videos after the run
        yield tag_table(error_row(str(path), message), part, "failed")
        return
    except Exception as exc:  # a bug or a model failure must not abort a week-long run
        log.exception("%s: annotation failed", path)
        # Not the video's doing, as far as anyone knows (a GPU that errs, memory a neighbour
        # took): the driver tries it once on another worker before the row stands.
        yield tag_table(error_row(str(path), f"{path}: {type(exc).__name__}: {exc}"), part, "failed",
                        raised_facts(this_node()))
        return
    if report.other_video_streams and (item.segment is None or item.segment.index == 0):
        streams = f"{report.other_video_streams} other video stream{'s' * (report.other_video_streams > 1)}"
        log.warning("%s: only its first video stream is annotated, not its %s (another camera angle, "
                    "a sub-stream or programme?)", path, streams)
    if report.damaged:
        log.info("%s: %s", path, report.describe())
        yield rows_table()
        pending = [error_row(str(path), f"{path}: {report.describe()}", video_id=pending[-1].column("video_id")[0].as_py())]
    facts = video_facts(path, report, item.stamp, pipeline.keyframes_int8_sha256, pipeline.keyframes_int8_unavailable)
    if item.segment is not None:  # the driver looks for a cut between this segment and the last
        facts["shot_ends"] = pipeline.tracker.shot_ends()
    yield tag_table(pending, part, "done", json.dumps(facts))


def worker_device(requested: str, gpu_ids: list[int | str], visible_devices: str | None) -> tuple[str, int | None]:
    """This worker's device from what Ray gave it: (``cuda``, local index) or (``cpu``, None).

    ``auto`` becomes the GPU when Ray assigned one to this worker and the CPU otherwise, whatever
    the driver's machine has. Ray hides other GPUs through ``CUDA_VISIBLE_DEVICES``, so the
    assigned id is found in that list (index 0 when Ray set it); where the variable is not set
    (``RAY_EXPERIMENTAL_NOSET_CUDA_VISIBLE_DEVICES``) the id itself is the index.

    Raises:
        RuntimeError: ``cuda`` was asked for but Ray assigned this worker no GPU.
    """
    if requested == "cpu":
        return "cpu", None
    if not gpu_ids:
        if requested == "cuda":
            raise RuntimeError("--device cuda, but Ray assigned this worker no GPU (it was started without num_gpus)")
        return "cpu", None
    assigned = str(gpu_ids[0])
    visible = [v.strip() for v in visible_devices.split(",")] if visible_devices else []
    return "cuda", visible.index(assigned) if assigned in visible else int(assigned)


def resolve_in_worker(config: RunConfig) -> tuple[RunConfig, int | None]:
    """``config`` with its device set from this Ray worker's own resources (see
    :func:`worker_device`), and the local index of its GPU (None: none)."""
    import ray

    device, index = worker_device(config.device, ray.get_gpu_ids(), os.environ.get("CUDA_VISIBLE_DEVICES"))
    use_gpu(index)
    return dataclasses.replace(config, device=device), index  # type: ignore[arg-type]


def use_gpu(index: int | None) -> None:
    """Make "cuda" (engines, DALI, tensors) mean GPU ``index`` on the calling thread: the current
    device is per thread, and Ray may run an actor's calls on another thread than its
    constructor's (it has two groups of them, see :data:`annotator.actor_pool.HEALTH_GROUP`).
    None: this worker has no GPU."""
    if index is not None:
        import torch

        torch.cuda.set_device(index)


def return_freed_memory() -> None:
    """Give the C heap's free pages back to the system once a work item is done (glibc's
    ``malloc_trim``; nothing where the C library has none, as musl or macOS).

    Why: videos of different sizes leave the heap of a long-lived worker fragmented, and glibc
    keeps what was freed. Measured with one pipeline on ten resolutions in turn (176x144 to
    1080x1920): its RSS wandered between 743 and 937 MB over 200-400 videos, against 697-712 MB
    with a trim after each video, which took 2 ms (videos of one size: flat either way). Over a
    week of varied inputs that margin is what stands between a worker and Ray's memory monitor.
    """
    trim = getattr(_libc(), "malloc_trim", None)
    if trim is not None:
        trim(0)


@functools.cache
def _libc() -> object:
    import ctypes

    return ctypes.CDLL(None)  # the symbols the process already has: its C library's among them


class RayVideoWorker:
    """The Ray actor of a run's pool: models load once in ``__init__``, one work item per call."""

    def __init__(self, config: RunConfig, threads: int = 0) -> None:
        log_to_stderr(logging.WARNING)  # file names as the rows write them, as on the driver
        config, self.gpu = resolve_in_worker(config)
        self.pipeline = self.build_pipeline(config, threads)
        self.watchdog = StallWatchdog(config.stall_timeout)

    def build_pipeline(self, config: RunConfig, threads: int) -> VideoPipeline:
        """This worker's pipeline (``annotate distil``'s harvest worker builds its own)."""
        from annotator.pipeline import VideoPipeline  # torch and the models: in the worker only

        return VideoPipeline(config, threads=threads)

    def annotate(self, item: WorkItem) -> Iterator[pa.Table]:
        """The item's tagged tables, streamed to the driver as they are made.

        A worker that makes no progress on the item for ``--stall-timeout`` seconds ends itself
        (:mod:`annotator.watchdog`): the driver then gives the item to a new worker, and after
        a second time records it as failed. Frames decoded count as progress; waiting for the
        driver to take a table does not count against it. A process frozen whole (stopped, or
        stuck in the kernel) cannot end itself: the driver kills it when :meth:`alive` goes
        unanswered as long.
        """
        use_gpu(self.gpu)
        stalled = f"{item.path}: no progress for {self.watchdog.seconds:g} s (--stall-timeout); ending this worker"
        try:
            yield from annotate_watched(self.pipeline, item, self.watchdog, stalled)
        finally:
            return_freed_memory()

    def alive(self) -> int:
        """Answers the driver's liveness checks (:class:`annotator.actor_pool.LivenessChecks`),
        on a thread of its own while an item runs: this process's id."""
        return os.getpid()

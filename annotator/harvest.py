"""``annotate distil``, phase 1: run a teacher over the user's videos and keep what a student needs.

The same machinery as ``annotate run`` (discovery, the Ray actor pool of
:mod:`annotator.orchestrate`, the per-video :class:`~annotator.pipeline.VideoPipeline`: decode →
sample → find and track faces → align), with the teacher as the scorer; instead of output rows,
each face becomes a training row: the deployment's 112x112 crop and the teacher's outputs.

Crops are stored as PNG: lossless, so the student trains on exactly the pixels the teacher scored
(its stored outputs are exact targets for the un-augmented crop), and ~4x smaller than raw uint8.
JPEG at quality 95 would halve the size again but change pixels the targets were computed on.

One shard per video, ``OUT/shards/<key>.parquet`` (``key``: :func:`annotator.writer.part_key`),
written to a hidden temporary name and renamed when the video is done: a rerun skips every video
with a shard, and an interrupted one never leaves a partial shard. A sampled frame without a face
keeps one row with a null crop, so the corpus's frame count is known.
"""

from __future__ import annotations

import json
import logging
import os
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import torch

from annotator.config import ConfigError, RunConfig
from annotator.discover import find_videos
from annotator.orchestrate import on_cluster, stream_in_process, stream_with_ray
from annotator.ownership import writing
from annotator.pipeline import VideoPipeline
from annotator.progress import STATUS_EVERY_S, RunProgress
from annotator.wording import utf8_text
from annotator.stages import FaceBatch
from annotator.collect import split_runs
from annotator.wording import counted, listed
from annotator.worker import RayVideoWorker, WorkItem
from annotator.writer import changed_since, part_key, video_stamp
from engines.align import CropGeometry
from engines.decoders import FrameBatch

log = logging.getLogger(__name__)

SHARDS = "shards"
#: Shard file metadata key: what made the rows (teacher, sampling, detector), checked on resume.
FINGERPRINT_KEY = b"distil_fingerprint"
VIDEO_KEY = b"distil_video"
#: The video file's (size, mtime_ns) when harvested: a rerun harvests a changed video again.
STAMP_KEY = b"distil_stamp"

HARVEST_SCHEMA = pa.schema([
    ("video_path", pa.string()),
    ("video_id", pa.string()),
    ("frame_index", pa.int64()),
    ("pts_s", pa.float64()),
    ("track", pa.int64()),  # null on a frame without a face
    ("det_score", pa.float32()),
    ("crop_png", pa.binary()),  # the 112x112 RGB deployment crop, PNG; null on a frame without a face
    ("teacher_probs", pa.list_(pa.float32(), 7)),  # Aff-Wild2 order
    ("teacher_va", pa.list_(pa.float32(), 2)),  # null when the teacher predicts no valence/arousal
])


def encode_png(crop: np.ndarray) -> bytes:
    """uint8 (112, 112, 3) RGB → PNG bytes."""
    import cv2

    ok, buffer = cv2.imencode(".png", np.ascontiguousarray(crop[..., ::-1]))
    if not ok:
        raise RuntimeError("PNG encoding failed")
    return buffer.tobytes()


def decode_png(data: bytes) -> np.ndarray:
    """PNG bytes → uint8 (H, W, 3) RGB."""
    import cv2

    image = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_COLOR)
    if image is None:
        raise ValueError("not a PNG image")
    return image[..., ::-1]


class HarvestPipeline(VideoPipeline):
    """The run's pipeline with the teacher as scorer; a batch becomes training rows, not output rows."""

    def __init__(self, config: RunConfig, threads: int = 0) -> None:
        super().__init__(config, threads)
        self.student_crop = CropGeometry()  # what `annotate run --model OUT/model` will cut

    def _annotate_faces(self, faces: FaceBatch) -> Iterator[pa.RecordBatch]:
        batch = faces.frames
        with self._timed("align"):
            frame_of_face = faces.frame_of_face
            crops = self.student_crop.crops(batch.frames, frame_of_face, faces.landmarks).round().clamp(0, 255)
            # A teacher on our crop scores exactly the stored pixels; another geometry gets its own cut.
            teacher_crops = crops if self.scorer.crop == self.student_crop else self.align(faces).crops
        self.frames += len(batch)
        self.faces += len(crops)
        with self._timed("score"):
            probs, va = self.scorer.predict(teacher_crops)
        with self._timed("rows"):
            images = crops.to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()
            yield _rows(batch, faces.video_path, faces.video_id, faces.counts, faces.track_ids, faces.scores, images, probs, va)


def _rows(batch: FrameBatch, path: str, vid: str, counts: np.ndarray, tracks: np.ndarray, scores: np.ndarray,
          images: np.ndarray, probs: np.ndarray, va: np.ndarray | None) -> pa.RecordBatch:
    """One row per face, plus one row (null crop) per frame without a face."""
    frame_rows = np.repeat(np.arange(len(counts)), np.maximum(counts, 1))
    has_face = np.repeat(counts > 0, np.maximum(counts, 1))
    face_of_row = np.cumsum(has_face) - 1
    n = len(frame_rows)

    def per_face(values: list, empty: object = None) -> list:
        return [values[face_of_row[i]] if has_face[i] else empty for i in range(n)]

    pngs = [encode_png(image) for image in images]
    return pa.RecordBatch.from_pydict({
        "video_path": [utf8_text(path)] * n,
        "video_id": [vid] * n,
        "frame_index": batch.frame_index[frame_rows].astype(np.int64),
        "pts_s": batch.pts_s[frame_rows].astype(np.float64),
        "track": per_face(tracks.tolist()),
        "det_score": per_face(scores.astype(np.float32).tolist()),
        "crop_png": per_face(pngs),
        "teacher_probs": per_face(probs.astype(np.float32).tolist()),
        "teacher_va": per_face(va.astype(np.float32).tolist()) if va is not None else [None] * n,
    }, schema=HARVEST_SCHEMA)


class RayHarvestWorker(RayVideoWorker):
    """The Ray pool's callable class for the harvest: the teacher loads once per actor."""

    def build_pipeline(self, config: RunConfig, threads: int) -> HarvestPipeline:
        return HarvestPipeline(config, threads=threads)


@dataclass
class HarvestSummary:
    """What phase 1 did; ``failed`` lists one line per video that could not be harvested."""

    videos: int = 0
    skipped: int = 0  # shards from an earlier run, reused
    frames: int = 0
    faces: int = 0
    seconds: float = 0.0
    failed: list[str] = field(default_factory=list)

    def line(self) -> str:
        return (f"harvest: {counted(self.videos, 'video')} ({self.skipped:,} already done, {len(self.failed):,} failed), "
                f"{counted(self.frames, 'frame')}, {counted(self.faces, 'face')} in {self.seconds:.1f} s")


def fingerprint(config: RunConfig, teacher_id: str) -> str:
    """What makes shards interchangeable: same teacher weights, detector, deinterlacing and sampling."""
    return json.dumps({"teacher": teacher_id, "detector": config.detector, "det_threshold": config.det_threshold,
                       "det_size": config.det_size, "min_face": config.min_face,
                       "detect_every": config.detect_every, "deinterlace": config.deinterlace,
                       "sampling": {"every_n": config.sampling.every_n, "fps": config.sampling.fps}}, sort_keys=True)


def shard_fingerprint(path: Path) -> str | None:
    """The fingerprint a shard was written with (None: not a shard of ours)."""
    value = _shard_metadata(path).get(FINGERPRINT_KEY)
    return value.decode() if value is not None else None


def shard_stamp(path: Path) -> tuple[int, int] | None:
    """Its video's :func:`annotator.writer.video_stamp` when the shard was harvested (None: a
    shard from before stamps)."""
    value = _shard_metadata(path).get(STAMP_KEY)
    return tuple(json.loads(value)) if value is not None else None  # type: ignore[return-value]


def _shard_metadata(path: Path) -> dict[bytes, bytes]:
    try:
        return pq.read_schema(path).metadata or {}
    except (OSError, pa.ArrowException):
        return {}


class _ShardWriter:
    """Rows of the videos in flight, each to its hidden temporary shard, renamed when done."""

    def __init__(self, directory: Path, print_: str, stamps: dict[str, tuple[int, int] | None] | None = None) -> None:
        self.directory = directory
        self.fingerprint = print_
        self.stamps = stamps or {}  # key -> its video's stamp (annotator.writer.video_stamp)
        self.open: dict[str, tuple[pq.ParquetWriter, Path]] = {}
        self.last_frame: dict[str, int] = {}  # of each shard in flight
        self.counted: dict[str, tuple[int, int]] = {}  # frames, faces of each shard in flight

    def restarts(self, key: str, first_frame: int | None) -> bool:
        """Whether rows starting at ``first_frame`` begin the video again: Ray re-ran it after its
        actor died, so the rows written so far would be duplicated (as ``PartCollector`` checks)."""
        return key in self.open and first_frame is not None and first_frame <= self.last_frame.get(key, -1)

    def _writer(self, key: str, video: str) -> pq.ParquetWriter:
        if key not in self.open:
            tmp = self.directory / f".{key}.parquet.tmp"
            metadata = {FINGERPRINT_KEY: self.fingerprint.encode(), VIDEO_KEY: utf8_text(video).encode()}
            if self.stamps.get(key) is not None:
                metadata[STAMP_KEY] = json.dumps(self.stamps[key]).encode()
            schema = HARVEST_SCHEMA.with_metadata(metadata)
            self.open[key] = (pq.ParquetWriter(tmp, schema), tmp)
        return self.open[key][0]

    def add(self, key: str, video: str, table: pa.Table, frames: int, faces: int) -> None:
        self._writer(key, video).write_table(table.cast(HARVEST_SCHEMA))
        last = pc.max(table.column("frame_index")).as_py()
        self.last_frame[key] = max(self.last_frame.get(key, -1), -1 if last is None else last)
        done = self.counted.get(key, (0, 0))
        self.counted[key] = (done[0] + frames, done[1] + faces)

    def commit(self, key: str, video: str) -> Path:
        self._writer(key, video)  # a video whose rows were all error rows still gets its (empty) shard
        writer, tmp = self.open.pop(key)
        writer.close()
        self.last_frame.pop(key, None), self.counted.pop(key, None)
        final = self.directory / f"{key}.parquet"
        os.replace(tmp, final)
        return final

    def abandon(self, key: str) -> tuple[int, int]:
        """Drop the shard in flight; returns the (frames, faces) it had counted. Never raises for
        a disk that is already failing (closing flushes, which fails there too)."""
        self.last_frame.pop(key, None)
        if key in self.open:
            writer, tmp = self.open.pop(key)
            try:
                writer.close()
            except (OSError, pa.ArrowException):
                pass
            tmp.unlink(missing_ok=True)
        return self.counted.pop(key, (0, 0))

    def close(self) -> None:
        for key in list(self.open):
            self.abandon(key)


def harvest(config: RunConfig, teacher_id: str, out: Path, progress: bool = True,
            status_every: float = STATUS_EVERY_S) -> HarvestSummary:
    """Teacher outputs and crops of every video of ``config.inputs`` into ``out/shards/``.

    ``config.scorer`` is the teacher. Videos with a shard of the same fingerprint are skipped,
    unless the file changed since (another size or modification time: its shard is harvested
    again, and training, whose corpus then differs, starts afresh); a shard of another teacher or
    sampling is a configuration error (``--overwrite`` starts over).

    Raises:
        ConfigError: no video in the inputs, or shards from another teacher or sampling.
    """
    start = time.perf_counter()
    found = find_videos(config.inputs, listed=config.listed, list_name=config.files_from or "")
    if not found.videos:
        reasons = "; ".join(f"{p}: {why}" for p, why in found.problems[:3])
        given = [*map(str, config.inputs), *([f"the paths listed in {config.files_from}"] if config.listed else [])]
        raise ConfigError(f"no video found in {', '.join(given)}" + (f" ({reasons})" if reasons else ""))
    directory = out / SHARDS
    directory.mkdir(parents=True, exist_ok=True)
    print_ = fingerprint(config, teacher_id)
    summary = HarvestSummary(videos=len(found.videos), failed=[f"{p}: {why}" for p, why in found.problems])
    pending: list[WorkItem] = []
    changed: list[Path] = []
    for video in found.videos:
        key, stamp = part_key(video), video_stamp(video)
        shard = directory / f"{key}.parquet"
        if shard.is_file():
            if shard_fingerprint(shard) != print_:
                raise ConfigError(f"{shard}: was harvested with another teacher or sampling "
                                  "(pass --overwrite, or choose another --out)")
            if not changed_since(shard_stamp(shard), stamp):
                summary.skipped += 1
                continue
            shard.unlink()  # ours (our fingerprint): its video changed since
            changed.append(video)
        pending.append(WorkItem(video, key, stamp=stamp))
    if changed:
        log.warning("%s changed since harvested (size or modification time), harvested again: %s",
                    counted(len(changed), "video"), listed(changed))
    videos = {item.key: str(item.path) for item in pending}
    writer = _ShardWriter(directory, print_, {item.key: item.stamp for item in pending})
    bar = RunProgress(len(found.videos), summary.skipped, "distil: harvest", shown=progress, every_s=status_every)
    # A generator: nothing starts (no Ray) until it is read, and only when there is work.
    stream = (stream_in_process(config, pending, HarvestPipeline) if config.workers == 0
              else stream_with_ray(on_cluster(config), pending, RayHarvestWorker))
    try:
        for table in (stream if pending else ()):
            with writing(directory, "finished videos are kept, re-run to resume"):
                _take(table, writer, videos, summary, bar)
    finally:
        try:
            stream.close()  # the workers stop now, while Ray is up (see run._annotate)
        finally:
            writer.close()
            bar.close()
    summary.seconds = time.perf_counter() - start
    return summary


def _take(table: pa.Table, writer: _ShardWriter, videos: dict[str, str], summary: HarvestSummary,
          bar: RunProgress) -> None:
    """One streamed table (Ray may join several a worker yielded): rows to their shards, finished
    videos committed, failures noted."""
    for key, status, rows, _, _ in split_runs(table):
        errors = rows.column("error").drop_null() if "error" in rows.column_names else pa.array([], pa.string())
        if len(errors):  # annotate's error row: a failed or damaged video
            if status == "failed":
                frames, faces = writer.abandon(key)  # its rows so far are not kept, nor counted
                summary.frames, summary.faces = summary.frames - frames, summary.faces - faces
                summary.failed.append(errors[0].as_py())
                bar.advance(1, frames=summary.frames, faces=summary.faces, failed=len(summary.failed))
                continue
            log.warning("%s", errors[0].as_py())  # damaged: the frames that decoded are kept
        else:
            rows = rows.select(HARVEST_SCHEMA.names)
            if rows.num_rows and writer.restarts(key, rows.column("frame_index")[0].as_py()):
                log.warning("%s: started again on a new worker, harvesting it again", videos[key])
                frames, faces = writer.abandon(key)
                summary.frames, summary.faces = summary.frames - frames, summary.faces - faces
            frames = len(pc.unique(rows.column("frame_index").drop_null()))
            faces = rows.column("crop_png").length() - rows.column("crop_png").null_count
            writer.add(key, videos[key], rows, frames, faces)
            summary.frames, summary.faces = summary.frames + frames, summary.faces + faces
        if status == "done":
            writer.commit(key, videos[key])
            bar.advance(1, frames=summary.frames, faces=summary.faces, failed=len(summary.failed))


def read_shards(out: Path) -> pa.Table:
    """Every row of every shard under ``out/shards`` (faceless frames included: null crop), with
    a ``video_key`` column (the shard's name)."""
    tables = []
    for shard in sorted((out / SHARDS).glob("*.parquet")):
        table = pq.read_table(shard)
        table = table.append_column("video_key", pa.array([shard.stem] * table.num_rows, pa.string()))
        tables.append(table)
    if not tables:
        return HARVEST_SCHEMA.append(pa.field("video_key", pa.string())).empty_table()
    return pa.concat_tables(tables)


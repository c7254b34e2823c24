"""One video, end to end: decode → sample → find and track faces → align → score → record batches.

:class:`VideoPipeline` loads its models once and then annotates video after video; the Ray
worker and the in-process path both call it, so they produce identical rows. Per-stage wall
time is accumulated in :attr:`VideoPipeline.timings` for the benchmarks.
"""

from __future__ import annotations

import functools
import hashlib
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pyarrow as pa
import torch

from annotator.config import RunConfig
from annotator.schema import frame_rows
from annotator.tracking import FaceTracker
from engines.align import align_faces
from engines.decoders import DecodeReport, FrameBatch
from engines.decoders.segments import Segment
from engines.factory import Scorer, create_detector, create_scorer
from engines.retinaface import detector_side

STAGES = ("decode", "detect", "align", "score", "rows")
_ID_SAMPLE_BYTES = 8 << 20  # hash 8 MiB from each end: stable, content-derived, O(1) in size


def video_id(path: Path) -> str:
    """A content-derived id: sha256 over the size and the first and last 8 MiB (16 hex digits).

    Renaming or moving a file keeps its id; re-encoding changes it. Reading whole multi-GB
    files just to name them would cost more than decoding them at a low sample rate.
    """
    size = path.stat().st_size
    digest = hashlib.sha256(str(size).encode())
    with open(path, "rb") as fh:
        digest.update(fh.read(_ID_SAMPLE_BYTES))
        if size > 2 * _ID_SAMPLE_BYTES:
            fh.seek(size - _ID_SAMPLE_BYTES)
            digest.update(fh.read(_ID_SAMPLE_BYTES))
        elif size > _ID_SAMPLE_BYTES:
            digest.update(fh.read())
    return digest.hexdigest()[:16]


class VideoPipeline:
    """Models loaded once; :meth:`annotate` streams one video's rows."""

    def __init__(self, config: RunConfig, threads: int = 0) -> None:
        self.config = config
        device = config.resolved_device()
        backend = config.resolved_backend()
        if threads and device == "cpu":
            torch.set_num_threads(threads)  # the warps and the letterbox: this worker's share of cores
        self.detector, self.detector_artifacts = create_detector(
            config.detector, backend, device, threads, config.cache_dir,
            det_size=config.det_size, threshold=config.det_threshold, min_face=config.min_face,
        )
        self.tracker = FaceTracker(self.detector, detect_every=config.detect_every)
        self.scorer: Scorer = create_scorer(config.scorer, backend, device, threads, config.cache_dir)
        self.model_id = self.scorer.model_id
        self.timings = dict.fromkeys(STAGES, 0.0)
        self.frames = 0
        self.faces = 0
        self._decode = _decoder(config.resolved_decoder(), threads)

    @contextmanager
    def _timed(self, stage: str):
        start = time.perf_counter()
        yield
        self.timings[stage] += time.perf_counter() - start

    def annotate(self, path: Path, report: DecodeReport | None = None,
                 segment: Segment | None = None) -> Iterator[pa.RecordBatch]:
        """Record batches (one per decoded batch of frames) of one video, in frame order.

        ``report`` receives what decoding found (rotation, damage); a damaged video yields the
        rows of every frame that decodes. ``segment``: only that piece of the video (its track
        ids start at 0; the driver makes them continuous when it stitches the segments).

        Raises:
            engines.decoders.DecodeError: the video cannot be decoded at all.
        """
        vid = video_id(path)
        options = {"segment": segment} if segment is not None else {}  # only PyAV decodes segments
        batches = self._decode(path, self.config.sampling, self.config.resolved_batch_size(),
                               report=report if report is not None else DecodeReport(), **options)
        started = False
        while True:
            with self._timed("decode"):
                batch = next(batches, None)
            if batch is None:
                return
            if not started:  # the detector's size follows the video's: see detector_side
                # --min-face is in pixels of the video; a frame decoded smaller has fewer of them.
                min_face = self.config.min_face / batch.scale
                height, width = int(batch.frames.shape[1]), int(batch.frames.shape[2])
                self.tracker.start(detector_side(width, height, min_face, self.config.det_size), min_face)
                started = True
            yield self._annotate_batch(batch, str(path), vid)

    def _annotate_batch(self, batch: FrameBatch, path: str, vid: str) -> pa.RecordBatch:
        with self._timed("detect"):
            # Sequential by nature (each frame's crops follow the last frame's faces).
            faces = self.tracker(batch.frames)
        counts = np.array([len(f.scores) for f in faces], dtype=np.int64)
        boxes = np.concatenate([f.boxes for f in faces]).reshape(-1, 4)
        landmarks = np.concatenate([f.landmarks for f in faces]).reshape(-1, 5, 2)
        scores = np.concatenate([f.scores for f in faces]).reshape(-1)
        track_ids = np.concatenate([f.track_ids for f in faces]).astype(np.int64)
        frame_of_face = np.repeat(np.arange(len(counts)), counts)
        with self._timed("align"):
            crops = align_faces(batch.frames, frame_of_face, landmarks)
        with self._timed("score"):
            probs, va = self.scorer.predict(crops)
        with self._timed("rows"):
            rows = frame_rows(
                video_path=path, video_id=vid, model_id=self.model_id,
                frame_index=batch.frame_index, pts_s=batch.pts_s, faces_per_frame=counts,
                boxes=boxes * batch.scale, scores=scores, landmarks=landmarks * batch.scale, track_ids=track_ids,
                probs=probs, va=va,
            )
        self.frames += len(batch)
        self.faces += int(counts.sum())
        return rows


def _decoder(name: str, threads: int):
    if name == "dali":
        from engines.decoders.dali import decode

        return decode
    from engines.decoders.pyav import decode

    return functools.partial(decode, threads=threads)

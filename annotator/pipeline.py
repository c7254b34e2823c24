"""One video, end to end: decode → sample → detect → align → score → track → record batches.

:class:`VideoPipeline` loads its models once and then annotates video after video; the Ray
worker and the in-process path both call it, so they produce identical rows. Per-stage wall
time is accumulated in :attr:`VideoPipeline.timings` for the benchmarks.
"""

from __future__ import annotations

import hashlib
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pyarrow as pa

from annotator.align import warp_crops, warp_crops_tensor
from annotator.config import RunConfig
from annotator.schema import frame_rows
from annotator.tracking import IouTracker
from engines.decoders import DecodeReport, FrameBatch
from engines.factory import Scorer, create_detector, create_scorer

STAGES = ("decode", "detect", "align", "score", "track", "rows")
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
        self.detector, self.detector_artifacts = create_detector(
            config.detector, backend, device, threads, config.cache_dir,
            det_size=config.det_size, threshold=config.det_threshold, min_face=config.min_face,
        )
        self.scorer: Scorer = create_scorer(config.scorer, backend, device, threads, config.cache_dir)
        self.model_id = self.scorer.model_id
        self.timings = dict.fromkeys(STAGES, 0.0)
        self.frames = 0
        self.faces = 0
        self._decode = _decoder(config.resolved_decoder())

    @contextmanager
    def _timed(self, stage: str):
        start = time.perf_counter()
        yield
        self.timings[stage] += time.perf_counter() - start

    def annotate(self, path: Path, report: DecodeReport | None = None) -> Iterator[pa.RecordBatch]:
        """Record batches (one per decoded batch of frames) of one video, in frame order.

        ``report`` receives what decoding found (rotation, damage); a damaged video yields the
        rows of every frame that decodes.

        Raises:
            engines.decoders.DecodeError: the video cannot be decoded at all.
        """
        vid = video_id(path)
        tracker = IouTracker()
        batches = self._decode(path, self.config.sampling, self.config.resolved_batch_size(),
                               report=report if report is not None else DecodeReport())
        while True:
            with self._timed("decode"):
                batch = next(batches, None)
            if batch is None:
                return
            yield self._annotate_batch(batch, str(path), vid, tracker)

    def _annotate_batch(self, batch: FrameBatch, path: str, vid: str, tracker: IouTracker) -> pa.RecordBatch:
        with self._timed("detect"):
            # --min-face is in pixels of the video; a frame decoded smaller has fewer of them.
            detections = self.detector.detect(batch.frames, min_face=self.config.min_face / batch.scale)
        counts = np.array([len(d.scores) for d in detections], dtype=np.int64)
        boxes = np.concatenate([d.boxes for d in detections]).reshape(-1, 4)
        landmarks = np.concatenate([d.landmarks for d in detections]).reshape(-1, 5, 2)
        scores = np.concatenate([d.scores for d in detections]).reshape(-1)
        frame_of_face = np.repeat(np.arange(len(counts)), counts)
        on_device = not isinstance(batch.frames, np.ndarray)  # a torch tensor from DALI
        with self._timed("align"):
            if on_device:
                crops = warp_crops_tensor(batch.frames, frame_of_face, landmarks)
            else:
                crops, _ = warp_crops(batch.frames, frame_of_face, landmarks)
        with self._timed("score"):
            probs, va = self.scorer.predict_tensor(crops) if on_device else self.scorer.predict(crops)
        with self._timed("track"):
            # Sequential by nature (each frame depends on the last), but only per frame, not per pixel.
            track_ids = np.concatenate([tracker.update(d.boxes) for d in detections]).astype(np.int64)
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


def _decoder(name: str):
    if name == "dali":
        from engines.decoders.dali import decode
    else:
        from engines.decoders.pyav import decode
    return decode

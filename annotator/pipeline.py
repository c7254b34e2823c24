"""One video, end to end: decode → sample → find and track faces → align → score → record batches.

:class:`VideoPipeline` loads its models once and then annotates video after video; the Ray
worker and the in-process path both call it, so they produce identical rows. Per-stage wall
time is accumulated in :attr:`VideoPipeline.timings` for the benchmarks.
"""

from __future__ import annotations

import functools
import hashlib
import logging
import math
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pyarrow as pa
import torch

from annotator.config import DEFAULT_MIN_FACE, RunConfig, usable_cores
from annotator.prefetch import map_ahead
from annotator.stages import AlignFaces, BuildRows, FaceBatch, FindFaces, ScoreFaces
from annotator.temporal import TemporalScores, load_temporal_head
from annotator.tracking import FaceTracker
from engines.decoders import DecodeReport, FrameBatch
from engines.decoders.routed import RoutedDecoder
from engines.decoders.segments import Segment
from engines.factory import AnyScorer, create_detector, create_scorer
from engines.retinaface import capped_floor, detector_side
from engines.int8 import int8_sha256
from engines.sources import FetchError

log = logging.getLogger(__name__)

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


_warned: set[tuple[int, int, float, int]] = set()


def _warn_capped(path: Path, width: float, height: float, config: RunConfig) -> None:
    """Say, once per frame size in this process, when the detector's largest view (a scan, at
    twice --det-size; --det-size itself with --scan-every 0) keeps it from seeing faces as small
    as a --min-face the user set: such faces would be missed, silently. The default --min-face is a
    floor that the cap is documented to bound, so it warns on nothing: a warning on every 4K video
    would teach users to ignore it."""
    key = (round(width), round(height), config.min_face, config.scan_size)
    floor = capped_floor(*key)
    if floor is None or key in _warned or config.min_face == DEFAULT_MIN_FACE:
        return
    _warned.add(key)
    seen = (f"--det-size {config.det_size} with scans at {config.scan_size}" if config.scan_every
            else f"--det-size {config.det_size} with --scan-every 0")
    wanted = math.ceil(floor[1] * config.det_size / config.scan_size)  # the --det-size whose scans show them
    log.warning("%s: faces under %.0f px may be missed, not only those under --min-face %g: %s shows this "
                "%dx%d video at %.2fx at most; --det-size %d would show faces down to %.0f px, at a higher "
                "cost per keyframe", path, floor[0], config.min_face, seen, key[0], key[1],
                config.scan_size / max(key[:2]), wanted, floor[2])


class VideoPipeline:
    """Models loaded once; :meth:`annotate` streams one video's rows."""

    def __init__(self, config: RunConfig, threads: int = 0) -> None:
        self.config = config
        device = config.resolved_device()
        backend = config.resolved_backend()
        # ``threads``: this worker's share of the cores (0: all this process may use, --workers 0).
        # A CPU worker with two or more overlaps its stages (overlap): faces are found on a thread
        # of their own, while the caller's thread decodes the next batches and aligns, scores and
        # builds the rows of the last (FFmpeg, ONNX Runtime and torch's kernels release the GIL).
        # Finding faces is the slowest stage; with one intra-op thread it runs nearly as fast as
        # with two (7.1 vs 7.0 ms a 720p frame), so it gets one and the other stages the other
        # core. A worker with one core (the default pool: one per core) gains nothing from more
        # threads, so it runs its stages one after another, and FFmpeg's decoder has the whole share.
        # With overlap, FFmpeg gets half the share: on two cores it decodes on the caller's thread
        # alone, as its own threads would only take turns with the two running. 1080p, two cores,
        # medians of 4 alternating passes, two runs: 117.5 and 110.6 frames/s against 109.0 and
        # 100.2 with two decoding threads; 720p and the four-face clip unchanged (134.4 / 134.8,
        # 59.4 / 60.2). Larger shares (not measured: this machine has two cores) keep threads for
        # decoding large frames, where the find thread's intra-op threads leave cores idle.
        cores = threads or usable_cores()
        self.overlap = device == "cpu" and cores >= 2
        compute = max(1, cores - 1) if self.overlap else threads
        decode_threads = max(1, cores // 2) if self.overlap else threads
        if compute and device == "cpu":
            torch.set_num_threads(compute)  # the warps and the letterbox
        detector = functools.partial(
            create_detector, config.detector, backend, device, compute, config.cache_dir,
            det_size=config.det_size, threshold=config.det_threshold, min_face=config.min_face,
            batch_size=config.resolved_batch_size(), largest_side=config.scan_size)
        # Why the int8 copy for keyframes could not be had here (None: it was, or was not asked for).
        self.keyframes_int8_unavailable: str | None = None
        try:
            self.detector, self.detector_artifacts = detector(int8_frames=config.int8_keyframes)
        except FetchError as exc:
            # The driver made (or refused, in one line) the copy before any work; a worker on
            # another node makes its own, and one that cannot (a full or read-only cache, no
            # PyPI) keeps going with the float network rather than stop a run of days. Its
            # parts say so (annotator.worker.video_facts).
            self.keyframes_int8_unavailable = str(exc)
            log.warning("%s; keyframes on this worker use the float network", exc)
            self.detector, self.detector_artifacts = detector(int8_frames=False)
        # Each part records the int8 copy its keyframes took (engines.int8): its bytes can differ
        # from one machine to another, and a cluster's workers each make their own.
        frames = self.detector.frame_runtime
        self.keyframes_int8_sha256 = int8_sha256(frames.onnx_path) if frames is not None else None
        self.tracker = FaceTracker(self.detector, detect_every=config.detect_every, scan_every=config.scan_every)
        self.scorer: AnyScorer = create_scorer(config.scorer, backend, device, compute, config.cache_dir,
                                               batch_size=config.resolved_batch_size())
        self.model_id = self.scorer.model_id
        self.find, self.score = FindFaces(self.tracker), ScoreFaces(self.scorer)
        self.align = AlignFaces(self.scorer.crop)  # the crop this scorer eats (a spec's may differ)
        # --temporal: the CNN + GRU head replaces the per-frame scores; rows then wait (a bounded
        # lookahead per track) for their window, see annotator.temporal.
        self.temporal: TemporalScores | None = None
        if config.temporal:
            self.temporal = TemporalScores(load_temporal_head(config.scorer, device, compute))
            self.model_id = f"{self.model_id}+{self.temporal.head.model_id}"
        self.rows = BuildRows(self.model_id)
        self.timings = dict.fromkeys(STAGES, 0.0)
        self._timings_lock = threading.Lock()
        self.frames = 0
        self.faces = 0
        # Per file: DALI where it can decode the file, PyAV otherwise (engines.decoders.routed).
        # On a GPU, DALI's pipeline decodes ahead on its own queue. With overlap, PyAV's RGB
        # conversion stays on the caller's thread alone too: a second conversion thread would only
        # take turns with the thread finding faces (1080p: 106 vs 102 frames/s, medians of 4).
        self._decode = RoutedDecoder(config.decoder, device, decode_threads,
                                     convert_threads=1 if self.overlap else None, deinterlace=config.deinterlace)

    @contextmanager
    def _timed(self, stage: str):
        start = time.perf_counter()
        yield
        elapsed = time.perf_counter() - start
        with self._timings_lock:  # both threads may add to "align" (see annotate)
            self.timings[stage] += elapsed

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
        # The last batch's frame size (not the batch: the decoder reuses a buffer nobody holds).
        size: tuple[int, int] | None = None

        def find(batch: FrameBatch) -> FaceBatch:
            nonlocal size
            # The detector's size follows the video's (see detector_side), and so it does where
            # the frames change size mid-stream (engines.decoders.pyav: a batch has one size).
            height, width = int(batch.frames.shape[1]), int(batch.frames.shape[2])
            if size is None:
                det_size, min_face, scan_size = self._detector_sizes(batch, path)
                self.tracker.start(det_size, min_face, scan_size=scan_size)
            elif (width, height) != size:
                # The tracks' boxes follow into the new frames' pixels, the picture stretched to
                # the old frame's place as a player does.
                self.tracker.resize(width / size[0], height / size[1], *self._detector_sizes(batch, path))
            size = (width, height)
            with self._timed("detect"):
                return self.find(batch, str(path), vid)

        decoded = self._timed_batches(batches)
        # With overlap, faces are found on a thread of their own while this one decodes the next
        # batches and scores the last (annotator.prefetch); otherwise the stages take turns. The
        # face thread also aligns and scores a batch when it is the thread ahead (no decoded batch
        # waits for it): decoding is the slower work with large frames (1080p), finding faces with
        # smaller.
        found = map_ahead(find, decoded, spare=self._ahead) if self.overlap else map(find, decoded)
        try:
            yield from self._score_stream(found)
        finally:  # a consumer that stops early releases the thread, then the file, now
            for stream in (found, batches):
                close = getattr(stream, "close", None)
                if close is not None:
                    close()

    def _timed_batches(self, batches: Iterator[FrameBatch]) -> Iterator[FrameBatch]:
        """The decoder's batches, its time counted as "decode" (on the caller's thread either way)."""
        while True:
            with self._timed("decode"):
                batch = next(batches, None)
            if batch is None:
                return
            yield batch

    def _detector_sizes(self, batch: FrameBatch, path: Path) -> tuple[int, float, int]:
        """(keyframe detector side, smallest face in the frames' pixels, scan side) for the batch's frames."""
        # --min-face is in pixels of the video; a frame decoded smaller has fewer of them.
        min_face = self.config.min_face / batch.scale
        height, width = int(batch.frames.shape[1]), int(batch.frames.shape[2])
        _warn_capped(path, width * batch.scale, height * batch.scale, self.config)
        return (detector_side(width, height, min_face, self.config.det_size), min_face,
                detector_side(width, height, min_face, self.config.scan_size))

    def _score_stream(self, found: Iterator[FaceBatch]) -> Iterator[pa.RecordBatch]:
        """Align, score and build rows batch by batch; with --temporal, the rows of every earlier
        batch now complete, and at the end those of every track still open."""
        if self.temporal is not None:
            self.temporal.start()
        for faces in found:
            yield from self._annotate_faces(faces)
        if self.temporal is not None:  # the video (or segment) is over: every track ends
            with self._timed("score"):
                ready = self.temporal.flush()
            yield from self._rows(ready)

    def _annotate_faces(self, faces: FaceBatch) -> Iterator[pa.RecordBatch]:
        """One batch's found faces → its rows; with --temporal, the rows of every earlier batch
        now complete instead."""
        faces = self._aligned(faces)
        self.frames += len(faces.frames)
        self.faces += int(faces.counts.sum())
        if self.temporal is None:
            ready = [self._scored(faces)]
        else:
            with self._timed("score"):
                ready = self.temporal(faces)
        yield from self._rows(ready)

    def _ahead(self, faces: FaceBatch) -> FaceBatch:
        """What the face thread does to a batch when it is the thread ahead: align it and, without
        --temporal (whose state follows the batches in order), score it. With int8 keyframes,
        finding faces in 1080p takes less than decoding it, and the face thread then waits."""
        faces = self._aligned(faces)
        return self._scored(faces) if self.temporal is None else faces

    def _aligned(self, faces: FaceBatch) -> FaceBatch:
        """The batch with its faces' crops (cut here unless the face thread has cut them)."""
        if faces.crops is not None:
            return faces
        with self._timed("align"):
            return self.align(faces)

    def _scored(self, faces: FaceBatch) -> FaceBatch:
        """The batch with its faces' scores (scored here unless the face thread has scored it)."""
        if faces.probs is not None:
            return faces
        with self._timed("score"):
            return self.score(faces)

    def _rows(self, scored: list[FaceBatch]) -> Iterator[pa.RecordBatch]:
        for faces in scored:
            with self._timed("rows"):
                rows = self.rows(faces)
            yield rows


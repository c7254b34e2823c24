"""``annotate run --temporal``: the CNN + GRU student over each face track, streamed.

Per face, the frozen CNN's feature (``temporal_features.onnx``, one call per batch of frames)
is appended to its track; the GRU (``temporal.onnx``) reads each track in windows of 32 frames
that overlap by half, and each frame takes its output from the window where it sits in the middle
half (``engines.models.temporal.window_plan``, the same plan the training validation uses). So
away from a track's ends every frame sees at least 8 frames of past and of future.

Streaming: a bidirectional GRU needs future frames, so a batch of rows waits until every face on
it has its output: at most 31 frames of lookahead per track (a window is scored as soon as its
32nd frame arrives; past a track's first window, 23 frames), or the track's end (the tracker never reuses an id, so an id missing from a
frame has ended), or the video's end (:meth:`TemporalScores.flush`). Memory per track is bounded
by one window of features. All windows that become ready during a batch go through the GRU in
one call per window length (full windows: one call).

Segments of a long video (``annotator.segmenting``) are annotated separately, each from a fresh
:meth:`TemporalScores.start`, like the tracker: windows never cross a cut, and a track cut at a
boundary is two tracks with one-sided context at the cut.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np
import torch

from annotator.stages import FaceBatch
from annotator.temporal_card import head_model_id, verified_temporal_card
from engines.runtimes.onnxrt import OrtRuntime


@dataclass
class TemporalHead:
    """The verified feature extractor and GRU of one model directory."""

    features: OrtRuntime
    gru: OrtRuntime
    with_va: bool
    window: int
    stride: int
    model_id: str


def load_temporal_head(model: str, device: str = "cpu", threads: int = 0) -> TemporalHead:
    """Verify the head's artifacts, then load both graphs in ONNX Runtime.

    ONNX Runtime on any device: the GRU is tiny, and the feature graph is the CNN's backbone,
    one pass per face as the per-frame scorer's would be.

    Raises:
        NoTemporalHead: no head, or an artifact missing or not matching its digest.
    """
    head = verified_temporal_card(model)
    directory, names = Path(model), head["artifacts"]
    features = OrtRuntime(directory / names["features_onnx"], ("features",), device, threads)
    gru = OrtRuntime(directory / names["onnx"], ("expr_logits", "va"), device, threads)
    return TemporalHead(features, gru, bool(head.get("with_va", True)), head["window"], head["stride"],
                        head_model_id(head))


@dataclass
class _Pending:
    """A batch waiting for the outputs of its faces."""

    faces: FaceBatch
    probs: np.ndarray
    va: np.ndarray
    missing: int


@dataclass
class _Track:
    """The last ``window`` features of a live track and where each frame's outputs go.

    Every frame not yet promised an output lies among the last ``window`` frames (at most
    ``(window - stride) // 2 + stride - 1`` = 23 of them), so the deques never need more.
    """

    features: deque = field(default_factory=deque)  # (F,) arrays of the last frames
    owners: deque = field(default_factory=deque)  # (pending batch number, face index) per frame
    length: int = 0  # frames seen
    promised: int = 0  # frames (from the track's start) already given to a scored window


@dataclass(frozen=True)
class _Job:
    """One window for the GRU: its features, and the faces that take outputs from its frames
    ``keep_from`` onwards (window positions)."""

    features: np.ndarray  # (T, F)
    keep_from: int
    owners: list[tuple[int, int]]


class TemporalScores:
    """Per video: :meth:`start`, then the stage on each aligned batch, then :meth:`flush`.

    Each call returns the batches (in order) whose faces all have their temporal outputs, with
    ``probs``/``va`` filled, ready for ``BuildRows``.
    """

    def __init__(self, head: TemporalHead) -> None:
        self.head = head
        self.margin = (head.window - head.stride) // 2
        self.start()

    def start(self) -> None:
        """Forget every track and batch: a new video or segment."""
        self._tracks: dict[int, _Track] = {}
        self._pending: dict[int, _Pending] = {}
        self._first = 0  # number of the oldest pending batch
        self._next = 0

    def __call__(self, faces: FaceBatch) -> list[FaceBatch]:
        number = self._next
        self._next += 1
        n = len(faces.track_ids)
        self._pending[number] = _Pending(faces, np.zeros((n, 7), np.float32), np.zeros((n, 2), np.float32), n)
        jobs: list[_Job] = []
        if n:
            features = self.head.features(faces.crops)["features"].numpy()
            for face, track_id in enumerate(faces.track_ids.tolist()):  # frame order: each track in order
                track = self._tracks.setdefault(track_id, _Track())
                track.features.append(features[face])
                track.owners.append((number, face))
                track.length += 1
                if len(track.features) > self.head.window:
                    track.features.popleft()
                    track.owners.popleft()
                if track.length >= self.head.window and (track.length - self.head.window) % self.head.stride == 0:
                    start = track.length - self.head.window
                    jobs.append(self._job(track, start if start == 0 else start + self.margin,
                                          start + self.margin + self.head.stride))
        last_frame = len(faces.counts) - 1
        live = set(faces.track_ids[faces.frame_of_face == last_frame].tolist())
        for track_id in [t for t in self._tracks if t not in live]:  # ids are never reused: ended
            track = self._tracks.pop(track_id)
            jobs.append(self._job(track, track.promised, track.length))
        self._score(jobs)
        return self._release()

    def flush(self) -> list[FaceBatch]:
        """Every remaining batch, its open tracks ended (the video or segment is over)."""
        tracks, self._tracks = self._tracks, {}
        self._score([self._job(track, track.promised, track.length) for track in tracks.values()])
        return self._release()

    def _job(self, track: _Track, keep_from: int, keep_to: int) -> _Job:
        """The track's current window (its last ``window`` frames), answering for frames
        ``[keep_from, keep_to)`` of the track."""
        first = track.length - len(track.features)  # track position of the window's first frame
        owners = list(track.owners)[keep_from - first:keep_to - first]
        track.promised = keep_to
        return _Job(np.stack(list(track.features)), keep_from - first, owners)

    def _score(self, jobs: list[_Job]) -> None:
        """One GRU call per window length (full windows: one call for all tracks)."""
        by_length: dict[int, list[_Job]] = {}
        for job in jobs:
            if job.owners:
                by_length.setdefault(len(job.features), []).append(job)
        for group in by_length.values():
            out = self.head.gru(torch.from_numpy(np.stack([job.features for job in group]).astype(np.float32)))
            expr = torch.softmax(out["expr_logits"].float(), dim=-1).numpy()
            va = out["va"].float().numpy()
            for row, job in enumerate(group):
                for position, (batch, face) in enumerate(job.owners, start=job.keep_from):
                    pending = self._pending[batch]
                    pending.probs[face] = expr[row, position]
                    pending.va[face] = va[row, position]
                    pending.missing -= 1

    def _release(self) -> list[FaceBatch]:
        done = []
        while self._first < self._next and self._pending[self._first].missing == 0:
            pending = self._pending.pop(self._first)
            self._first += 1
            done.append(replace(pending.faces, probs=pending.probs,
                                va=pending.va if self.head.with_va else None))
        return done

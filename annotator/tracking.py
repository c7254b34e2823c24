"""Faces frame by frame: full detection on keyframes, every known face re-found where it was.

Full-frame detection is the expensive stage (41 ms for a 720p frame at 640 px on one core,
measured with ONNX Runtime), while a face moves little between consecutive sampled frames.
So full detection runs on keyframes only (every ``detect_every`` sampled frames, and on the
frame after a track was lost), and on every frame each face is re-detected by the same network in
a small square crop around its box (about 2.8 ms for a 128 px crop, ``engines.refind``): around the
last frame's box between keyframes, around the full detection's box on a keyframe. That gives
fresh landmarks at one scale, hence a properly and consistently aligned crop, on every frame; new
faces are picked up at the next keyframe. ``detect_every=1`` is plain per-frame detection.

The keyframe detector sees the frame at most ``det_size`` long, which hides faces much smaller
than a twentieth of the frame (at 640, a 720p frame is halved, and faces under about 64 px go
unseen). So the first keyframe, and then one every ``scan_every`` frames, is a scan at the
larger size those faces need: once found they are tracked in their crops like any other, where
they are seen at 64 px. A small face that appears mid-video is found within ``scan_every``
frames; one there from the start, at once.

Track ids follow faces by greedy IoU association between consecutive sampled frames; a face
that vanishes gets a new id when it comes back.

Edited footage cuts from shot to shot. A cut (:data:`CUT_THRESHOLD`) ends every track and makes
its frame a keyframe, and a scan where scans are on: the faces of the new shot, small ones
included, are found on its first frame, with new ids, instead of up to ``detect_every`` (or
``scan_every``) frames later, and a face of the new shot that happens to sit where the last
shot's face was does not inherit its track.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from annotator.continuity import CUT_THRESHOLD, associate, shot_changes
from engines.boxes import iou_matrix
from engines.refind import CROP_MARGIN, CROP_SIZE, refind
from engines.retinaface import Detections, RetinaFaceDetector

#: Two faces whose re-found boxes overlap this much have converged on one face: one is dropped.
_SAME_FACE_IOU = 0.6
#: Pixels sampled per frame for its signature, about: a grid of 36 x 64, stride the same both ways.
_SIGNATURE_GRID = (36, 64)


@dataclass(frozen=True)
class TrackedFaces:
    """The faces of one frame, highest score first, each with its track id."""

    boxes: np.ndarray  # float32 (n, 4) frame pixels
    landmarks: np.ndarray  # float32 (n, 5, 2)
    scores: np.ndarray  # float32 (n,)
    track_ids: np.ndarray  # int64 (n,)
    keyframe: bool  # found by full-frame detection (else re-found around the tracks)


def shot_signatures(frames: torch.Tensor) -> torch.Tensor:
    """Each frame's 9x16 block means (float (B, 3, 9, 16)), from a grid of about 36 x 64 of its
    pixels: about 25 µs a 720p or 1080p frame on one core, on the frames' own device."""
    height, width = int(frames.shape[1]), int(frames.shape[2])
    stride = max(1, min(height // _SIGNATURE_GRID[0], width // _SIGNATURE_GRID[1]))
    grid = frames[:, ::stride, ::stride].permute(0, 3, 1, 2).float()
    return F.adaptive_avg_pool2d(grid, (9, 16))


class FaceTracker:
    """Per video: call :meth:`start`, then the tracker on each batch of sampled frames in order.

    ``cut_threshold``: see :data:`CUT_THRESHOLD`; None: no cuts (tracks run on across them).
    """

    def __init__(self, detector: RetinaFaceDetector, detect_every: int = 1, scan_every: int = 0,
                 crop_size: int = CROP_SIZE, margin: float = CROP_MARGIN,
                 cut_threshold: float | None = CUT_THRESHOLD) -> None:
        if detect_every < 1:
            raise ValueError(f"detect_every must be >= 1, got {detect_every}")
        if scan_every < 0:
            raise ValueError(f"scan_every must be >= 0, got {scan_every}")
        self.detector = detector
        self.detect_every = detect_every
        self.scan_every = scan_every
        self.crop_size = crop_size
        self.margin = margin
        self.cut_threshold = cut_threshold
        self.start(detector.det_size, detector.min_face)

    def start(self, det_size: int, min_face: float, first_id: int = 0, scan_size: int | None = None) -> None:
        """Forget every track: a new video (or segment) begins with a keyframe.

        ``det_size``: the keyframe detector's long side. ``scan_size``: a larger one for a scan,
        the first keyframe and then the first one ``scan_every`` frames after the last scan, which
        finds the faces ``det_size`` shows too small (they are then tracked in their crops).
        """
        self.det_size = det_size
        self.scan_size = scan_size if scan_size and scan_size > det_size and self.scan_every else None
        self.min_face = min_face
        self._boxes = np.zeros((0, 4), np.float32)
        self._ids = np.zeros(0, np.int64)
        self._next_id = first_id
        self._since_keyframe = self.detect_every  # the first frame is a keyframe
        self._since_scan = self.scan_every  # and a scan
        self._signature: np.ndarray | None = None  # the last frame's (shot_signatures)
        self._first_signature: np.ndarray | None = None  # the first frame's since start()
        self.keyframes = 0
        self.scans = 0
        self.cuts = 0

    def resize(self, scale_x: float, scale_y: float, det_size: int, min_face: float,
               scan_size: int | None = None) -> None:
        """The frames from here on have another size (a recording joined from pieces, a stream
        that switched renditions): the tracks' boxes are moved into the new frames' pixels as a
        player stretches the picture to its window (``scale_x``, ``scale_y``: new pixels per old
        one), and the next frame is a keyframe and a scan at the detector sizes for the new
        frames, so a face the new picture shows elsewhere keeps its track only if the full frame
        finds it where the box went (see :meth:`_next`). Track ids go on."""
        self._boxes = self._boxes * np.array([scale_x, scale_y, scale_x, scale_y], np.float32)
        self.det_size = det_size
        self.scan_size = scan_size if scan_size and scan_size > det_size and self.scan_every else None
        self.min_face = min_face
        self._since_keyframe = self.detect_every
        self._since_scan = self.scan_every

    def __call__(self, frames: torch.Tensor) -> list[TrackedFaces]:
        """The faces of each frame of a batch (uint8 (B, H, W, 3), any device), in order."""
        cuts = self._cuts(frames)
        return [self._next(frames, b, bool(cuts[b])) for b in range(len(frames))]

    def _cuts(self, frames: torch.Tensor) -> np.ndarray:
        """Whether each frame of the batch begins a new shot (never the first frame of a video)."""
        if self.cut_threshold is None or not len(frames):
            return np.zeros(len(frames), bool)
        signatures = shot_signatures(frames).cpu().numpy()  # 432 numbers a frame
        if self._signature is None:
            self._first_signature = signatures[0]
        before = signatures[0] if self._signature is None else self._signature
        self._signature = signatures[-1]
        return shot_changes(np.concatenate([before[None], signatures])) > self.cut_threshold

    def shot_ends(self) -> list[list[float]] | None:
        """The signatures of the first and the last frame since :meth:`start` (flat, rounded),
        so the driver can tell a cut between two segments of a video (:func:`annotator.continuity.is_cut`)."""
        if self._first_signature is None or self._signature is None:
            return None
        return [[round(v, 2) for v in s.flatten().tolist()] for s in (self._first_signature, self._signature)]

    def _next(self, frames: torch.Tensor, index: int, cut: bool = False) -> TrackedFaces:
        if cut:  # a new shot: every track ends, and its faces are looked for on this frame
            self._boxes, self._ids = np.zeros((0, 4), np.float32), np.zeros(0, np.int64)
            self._since_keyframe = self.detect_every
            # With a scan: small faces too (a wide shot's), not up to scan_every frames later.
            self._since_scan = self.scan_every
            self.cuts += 1
        keyframe = self._since_keyframe >= self.detect_every
        self._since_scan += 1
        if keyframe:
            side = self.det_size
            if self.scan_size is not None and self._since_scan > self.scan_every:
                side, self._since_scan = self.scan_size, 1
                self.scans += 1
            full = self.detector.detect(frames[index:index + 1], min_face=self.min_face, det_size=side)[0]
            found = self._refined(frames, index, full)
            continues = associate(self._boxes, found.boxes)
            # Tracks the full frame missed (a small face near the detector's limit) are looked
            # for in their crops, where they are larger: a keyframe adds faces, it never drops one.
            missed = np.setdiff1d(np.arange(len(self._boxes)), continues)
            if len(missed):
                found, continues = _merge(found, continues, *self._refind(frames, index, missed))
            self._since_keyframe = 1
            self.keyframes += 1
        else:
            found, continues = self._refind(frames, index, np.arange(len(self._boxes)))
            # A lost face may have moved out of its crop: look at the whole next frame.
            lost = len(found) < len(self._ids)
            self._since_keyframe = self.detect_every if lost else self._since_keyframe + 1
        ids = np.full(len(found), -1, np.int64)
        ids[continues >= 0] = self._ids[continues[continues >= 0]]
        fresh = ids < 0
        ids[fresh] = np.arange(self._next_id, self._next_id + int(fresh.sum()))
        self._next_id += int(fresh.sum())
        self._boxes, self._ids = found.boxes, ids
        return TrackedFaces(found.boxes, found.landmarks, found.scores, ids, keyframe)

    def _refined(self, frames: torch.Tensor, index: int, full: Detections) -> Detections:
        """A keyframe's faces, each re-found in its crop window as a tracked face is (engines.refind),
        so keyframes and the frames between them align on landmarks of one scale; a face its
        crop does not confirm keeps the full frame's detection."""
        refound, owner = refind(self.detector, frames, np.full(len(full), index), full.boxes, self.min_face,
                                self.crop_size, self.margin)
        boxes, landmarks, scores = full.boxes.copy(), full.landmarks.copy(), full.scores.copy()
        boxes[owner], landmarks[owner], scores[owner] = refound.boxes, refound.landmarks, refound.scores
        keep = _distinct(boxes, scores)
        return Detections(boxes[keep], landmarks[keep], scores[keep])

    def _refind(self, frames: torch.Tensor, index: int, which: np.ndarray) -> tuple[Detections, np.ndarray]:
        """Tracks ``which`` re-detected in their crop windows: (faces, track of each)."""
        found, owner = refind(self.detector, frames, np.full(len(which), index), self._boxes[which], self.min_face,
                              self.crop_size, self.margin)
        keep = _distinct(found.boxes, found.scores)
        return Detections(found.boxes[keep], found.landmarks[keep], found.scores[keep]), which[owner[keep]]


def _merge(found: Detections, continues: np.ndarray, refound: Detections,
           owners: np.ndarray) -> tuple[Detections, np.ndarray]:
    """A keyframe's detections plus the tracks re-found in their crops, highest score first; a
    re-found face that the full frame also found is not added twice."""
    if not len(refound):
        return found, continues
    new = np.ones(len(refound), bool) if not len(found) else iou_matrix(refound.boxes, found.boxes).max(axis=1) < _SAME_FACE_IOU
    boxes = np.concatenate([found.boxes, refound.boxes[new]])
    landmarks = np.concatenate([found.landmarks, refound.landmarks[new]])
    scores = np.concatenate([found.scores, refound.scores[new]])
    order = np.argsort(-scores, kind="stable")
    return (Detections(boxes[order], landmarks[order], scores[order]),
            np.concatenate([continues, owners[new]])[order])


def _distinct(boxes: np.ndarray, scores: np.ndarray) -> np.ndarray:
    """Indices of the boxes to keep, highest score first, dropping any that repeats a kept face."""
    order = np.argsort(-scores, kind="stable")
    keep: list[int] = []
    for i in order.tolist():
        if not keep or iou_matrix(boxes[i:i + 1], boxes[keep]).max() < _SAME_FACE_IOU:
            keep.append(i)
    return np.asarray(keep, np.int64)

"""Faces frame by frame: full detection on keyframes, every tracked face re-found where it was.

Full-frame detection is the expensive stage (46 ms for a 720p frame at 640 px on one core,
measured with ONNX Runtime), while a face moves little between consecutive sampled frames.
So full detection runs on keyframes only (every ``detect_every`` sampled frames, and on the
frame after a track was lost), and in between each track is re-detected by the same network in
a small square crop around its last box (about 2.6 ms for a 128 px crop). That gives fresh
boxes and landmarks, hence a properly aligned crop, on every frame; new faces are picked up at
the next keyframe. ``detect_every=1`` is plain per-frame detection.

Track ids follow faces by greedy IoU association between consecutive sampled frames; a face
that vanishes gets a new id when it comes back.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from engines.align import apply, invert, square_matrices, warp
from engines.retinaface import Detections, RetinaFaceDetector

#: Below this overlap two boxes in consecutive sampled frames are different faces; 0.3 keeps a
#: face through a fast head turn at 5 fps sampling while two side-by-side faces never merge.
IOU_THRESHOLD = 0.3
#: Side of the square crop a tracked face is re-detected in, and how much larger than the face's
#: box the crop is: the face fills half the crop (64 px here, where RetinaFace is at its best),
#: and may move by half its size between frames and stay found.
CROP_SIZE = 128
CROP_MARGIN = 2.0
#: Two tracks whose re-found boxes overlap this much have converged on one face: one is dropped.
_SAME_FACE_IOU = 0.6
#: Score a tracked face needs to be re-found in its crop (hysteresis): a new face must reach the
#: detector's threshold (0.9) on a full frame, but one already followed keeps its track down to
#: this, through a turned head or motion blur.
TRACK_THRESHOLD = 0.5


def iou_matrix(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """IoU of every box in ``a`` (N, 4) with every box in ``b`` (M, 4), x1y1x2y2 → (N, M)."""
    x1 = np.maximum(a[:, None, 0], b[None, :, 0])
    y1 = np.maximum(a[:, None, 1], b[None, :, 1])
    x2 = np.minimum(a[:, None, 2], b[None, :, 2])
    y2 = np.minimum(a[:, None, 3], b[None, :, 3])
    inter = np.clip(x2 - x1, 0, None) * np.clip(y2 - y1, 0, None)
    area_a = (a[:, 2] - a[:, 0]) * (a[:, 3] - a[:, 1])
    area_b = (b[:, 2] - b[:, 0]) * (b[:, 3] - b[:, 1])
    return inter / np.maximum(area_a[:, None] + area_b[None, :] - inter, 1e-9)


def associate(previous: np.ndarray, boxes: np.ndarray, threshold: float = IOU_THRESHOLD) -> np.ndarray:
    """For each box, the index of the previous box it continues, or -1 (greedy by IoU)."""
    match = np.full(len(boxes), -1, dtype=np.int64)
    if not len(boxes) or not len(previous):
        return match
    iou = iou_matrix(boxes, previous)
    used = np.zeros(len(previous), dtype=bool)
    # Greedy by descending IoU: optimal enough for a handful of faces per frame.
    for flat in np.argsort(-iou, axis=None):
        i, j = divmod(int(flat), iou.shape[1])
        if iou[i, j] < threshold:
            break
        if match[i] < 0 and not used[j]:
            match[i], used[j] = j, True
    return match


@dataclass(frozen=True)
class TrackedFaces:
    """The faces of one frame, highest score first, each with its track id."""

    boxes: np.ndarray  # float32 (n, 4) frame pixels
    landmarks: np.ndarray  # float32 (n, 5, 2)
    scores: np.ndarray  # float32 (n,)
    track_ids: np.ndarray  # int64 (n,)
    keyframe: bool  # found by full-frame detection (else re-found around the tracks)


class FaceTracker:
    """Per video: call :meth:`start`, then the tracker on each batch of sampled frames in order."""

    def __init__(self, detector: RetinaFaceDetector, detect_every: int = 1, crop_size: int = CROP_SIZE,
                 margin: float = CROP_MARGIN) -> None:
        if detect_every < 1:
            raise ValueError(f"detect_every must be >= 1, got {detect_every}")
        self.detector = detector
        self.detect_every = detect_every
        self.crop_size = crop_size
        self.margin = margin
        self.start(detector.det_size, detector.min_face)

    def start(self, det_size: int, min_face: float, first_id: int = 0) -> None:
        """Forget every track: a new video (or segment) begins with a keyframe."""
        self.det_size = det_size
        self.min_face = min_face
        self._boxes = np.zeros((0, 4), np.float32)
        self._ids = np.zeros(0, np.int64)
        self._next_id = first_id
        self._since_keyframe = self.detect_every  # the first frame is a keyframe
        self.keyframes = 0

    def __call__(self, frames: torch.Tensor) -> list[TrackedFaces]:
        """The faces of each frame of a batch (uint8 (B, H, W, 3), any device), in order."""
        return [self._next(frames, b) for b in range(len(frames))]

    def _next(self, frames: torch.Tensor, index: int) -> TrackedFaces:
        keyframe = self._since_keyframe >= self.detect_every
        if keyframe:
            found = self.detector.detect(frames[index:index + 1], min_face=self.min_face, det_size=self.det_size)[0]
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

    def _refind(self, frames: torch.Tensor, index: int, which: np.ndarray) -> tuple[Detections, np.ndarray]:
        """Tracks ``which`` re-detected in square crops around their last boxes: (faces, track of each)."""
        if not len(which):
            return Detections.empty(), np.zeros(0, np.int64)
        tracks = self._boxes[which]
        centres = (tracks[:, :2] + tracks[:, 2:]) / 2
        sides = np.maximum((tracks[:, 2:] - tracks[:, :2]).max(axis=1) * self.margin, 16.0)
        matrices = square_matrices(centres, sides, self.crop_size)
        crops = warp(frames, np.full(len(tracks), index), matrices, self.crop_size)
        size = self.crop_size
        per_crop = self.detector.detect_inputs(crops, 1.0, size, size, min_face=0.0, threshold=TRACK_THRESHOLD)
        expected = apply(matrices, tracks.reshape(-1, 2, 2)).reshape(-1, 4)  # each track's box, crop pixels
        back = invert(matrices)
        height, width = int(frames.shape[1]), int(frames.shape[2])
        boxes, landmarks, scores, owners = [], [], [], []
        for t, found in enumerate(per_crop):
            if not len(found):
                continue
            overlap = iou_matrix(expected[t:t + 1], found.boxes)[0]
            best = int(overlap.argmax())
            if overlap[best] < IOU_THRESHOLD:
                continue
            box = apply(back[t:t + 1], found.boxes[best].reshape(1, 2, 2)).reshape(4)
            box = np.clip(box, 0, [width, height, width, height])
            if min(box[2] - box[0], box[3] - box[1]) < self.min_face:
                continue
            boxes.append(box)
            landmarks.append(apply(back[t:t + 1], found.landmarks[best][None])[0])
            scores.append(found.scores[best])
            owners.append(int(which[t]))
        if not boxes:
            return Detections.empty(), np.zeros(0, np.int64)
        boxes_, landmarks_ = np.asarray(boxes, np.float32), np.asarray(landmarks, np.float32)
        scores_, owners_ = np.asarray(scores, np.float32), np.asarray(owners, np.int64)
        keep = _distinct(boxes_, scores_)
        return Detections(boxes_[keep], landmarks_[keep], scores_[keep]), owners_[keep]


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

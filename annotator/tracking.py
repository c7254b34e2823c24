"""Track ids: greedy IoU association of faces across consecutive sampled frames.

Enough for a talking-head corpus and cheap (one small IoU matrix per frame); a face that
vanishes for one sampled frame gets a new id when it returns.
"""

from __future__ import annotations

import numpy as np

#: Below this overlap two boxes in consecutive sampled frames are different faces; 0.3 keeps a
#: face through a fast head turn at 5 fps sampling while two side-by-side faces never merge.
IOU_THRESHOLD = 0.3


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


class IouTracker:
    """Assigns a per-video track id to each face, frame after frame."""

    def __init__(self, iou_threshold: float = IOU_THRESHOLD) -> None:
        self.iou_threshold = iou_threshold
        self._boxes = np.zeros((0, 4), np.float32)
        self._ids = np.zeros(0, np.int64)
        self._next_id = 0

    def update(self, boxes: np.ndarray) -> np.ndarray:
        """Track ids (int64, one per box) for the faces of the next sampled frame."""
        ids = np.full(len(boxes), -1, dtype=np.int64)
        if len(boxes) and len(self._boxes):
            iou = iou_matrix(boxes, self._boxes)
            used = np.zeros(len(self._boxes), dtype=bool)
            # Greedy by descending IoU: optimal enough for a handful of faces per frame.
            for flat in np.argsort(-iou, axis=None):
                i, j = divmod(int(flat), iou.shape[1])
                if iou[i, j] < self.iou_threshold:
                    break
                if ids[i] < 0 and not used[j]:
                    ids[i] = self._ids[j]
                    used[j] = True
        fresh = ids < 0
        ids[fresh] = np.arange(self._next_id, self._next_id + int(fresh.sum()))
        self._next_id += int(fresh.sum())
        self._boxes, self._ids = boxes.astype(np.float32), ids
        return ids

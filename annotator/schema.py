"""The output table: one schema constant, and the vectorised builder of its record batches.

One row per detected face per sampled frame, plus one row per sampled frame with no face (face
fields null) so coverage is visible, plus one row per failed video (``error`` set, the rest
null). Coordinates are pixels of the original frame; probabilities are in Aff-Wild2 order.
"""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from annotator.wording import utf8_text
from engines.registry import EXPRESSIONS

PROB_COLUMNS: tuple[str, ...] = tuple(f"p_{name}" for name in EXPRESSIONS)
LANDMARK_COLUMNS: tuple[str, ...] = tuple(
    f"{point}_{axis}"
    for point in ("left_eye", "right_eye", "nose", "mouth_left", "mouth_right")
    for axis in ("x", "y")
)
BOX_COLUMNS: tuple[str, ...] = ("x1", "y1", "x2", "y2")

SCHEMA = pa.schema(
    [
        pa.field("video_path", pa.string(), nullable=False),
        pa.field("video_id", pa.string()),
        pa.field("frame_index", pa.int64()),
        pa.field("pts_s", pa.float64()),
        pa.field("face_index", pa.int32()),
        pa.field("track_id", pa.int64()),
        *(pa.field(c, pa.float32()) for c in BOX_COLUMNS),
        pa.field("det_score", pa.float32()),
        *(pa.field(c, pa.float32()) for c in LANDMARK_COLUMNS),
        *(pa.field(c, pa.float32()) for c in PROB_COLUMNS),
        pa.field("expression", pa.string()),
        pa.field("valence", pa.float32()),
        pa.field("arousal", pa.float32()),
        pa.field("model_id", pa.string()),
        pa.field("error", pa.string()),
    ]
)

_EXPRESSION_NAMES = pa.array(EXPRESSIONS, pa.string())


def constant_column(value: str | None, n: int) -> pa.Array:
    """``n`` copies of one string (or nulls), built by Arrow rather than per-row Python objects."""
    if value is None:
        return pa.nulls(n, pa.string())
    return pc.take(pa.array([utf8_text(value)], pa.string()), pa.array(np.zeros(n, np.int32)))


def _scatter(values: np.ndarray, face_rows: np.ndarray, n_rows: int, dtype: pa.DataType) -> pa.Array:
    """Place per-face ``values`` at ``face_rows`` of an ``n_rows`` column, null elsewhere."""
    full = np.zeros(n_rows, dtype=values.dtype)
    full[face_rows] = values
    mask = np.ones(n_rows, dtype=bool)
    mask[face_rows] = False
    return pa.array(full, type=dtype, mask=mask)


def frame_rows(
    *,
    video_path: str,
    video_id: str,
    model_id: str,
    frame_index: np.ndarray,
    pts_s: np.ndarray,
    faces_per_frame: np.ndarray,
    boxes: np.ndarray,
    scores: np.ndarray,
    landmarks: np.ndarray,
    track_ids: np.ndarray,
    probs: np.ndarray,
    va: np.ndarray | None,
) -> pa.RecordBatch:
    """The rows of a batch of sampled frames.

    Args:
        frame_index, pts_s: (F,) per sampled frame.
        faces_per_frame: int (F,) number of faces of each frame.
        boxes (N, 4), scores (N,), landmarks (N, 5, 2), track_ids (N,), probs (N, 7):
            per face, frame by frame in order; ``va`` (N, 2) or ``None`` for an
            expression-only scorer.
    """
    counts = faces_per_frame.astype(np.int64)
    rows_per_frame = np.maximum(counts, 1)
    n_rows = int(rows_per_frame.sum())
    frame_of_row = np.repeat(np.arange(len(counts)), rows_per_frame)
    first_row = np.concatenate([[0], np.cumsum(rows_per_frame)[:-1]])
    first_face = np.concatenate([[0], np.cumsum(counts)[:-1]])
    face_frame = np.repeat(np.arange(len(counts)), counts)
    within = np.arange(int(counts.sum())) - first_face[face_frame]
    face_rows = first_row[face_frame] + within

    columns: dict[str, pa.Array] = {
        "video_path": constant_column(video_path, n_rows),
        "video_id": constant_column(video_id, n_rows),
        "frame_index": pa.array(frame_index[frame_of_row], pa.int64()),
        "pts_s": pa.array(pts_s[frame_of_row], pa.float64()),
        "face_index": _scatter(within.astype(np.int32), face_rows, n_rows, pa.int32()),
        "track_id": _scatter(track_ids.astype(np.int64), face_rows, n_rows, pa.int64()),
        "det_score": _scatter(scores.astype(np.float32), face_rows, n_rows, pa.float32()),
    }
    for k, name in enumerate(BOX_COLUMNS):
        columns[name] = _scatter(boxes[:, k].astype(np.float32), face_rows, n_rows, pa.float32())
    flat_landmarks = landmarks.reshape(len(landmarks), 10).astype(np.float32)
    for k, name in enumerate(LANDMARK_COLUMNS):
        columns[name] = _scatter(flat_landmarks[:, k], face_rows, n_rows, pa.float32())
    for k, name in enumerate(PROB_COLUMNS):
        columns[name] = _scatter(probs[:, k].astype(np.float32), face_rows, n_rows, pa.float32())
    label = _scatter(probs.argmax(axis=1).astype(np.int32), face_rows, n_rows, pa.int32())
    columns["expression"] = pc.take(_EXPRESSION_NAMES, label)
    for k, name in enumerate(("valence", "arousal")):
        if va is None:
            columns[name] = pa.nulls(n_rows, pa.float32())
        else:
            columns[name] = _scatter(va[:, k].astype(np.float32), face_rows, n_rows, pa.float32())
    columns["model_id"] = _scatter_strings(model_id, face_rows, n_rows)
    columns["error"] = pa.nulls(n_rows, pa.string())
    return pa.RecordBatch.from_arrays([columns[f.name] for f in SCHEMA], schema=SCHEMA)


def _scatter_strings(value: str, face_rows: np.ndarray, n_rows: int) -> pa.Array:
    indices = _scatter(np.zeros(len(face_rows), np.int32), face_rows, n_rows, pa.int32())
    return pc.take(pa.array([value], pa.string()), indices)


def error_row(video_path: str, message: str, video_id: str | None = None) -> pa.RecordBatch:
    """The single row that records a failed video."""
    columns = {f.name: pa.nulls(1, f.type) for f in SCHEMA}
    columns["video_path"] = pa.array([utf8_text(video_path)], pa.string())
    columns["video_id"] = pa.array([video_id], pa.string())
    columns["error"] = pa.array([utf8_text(message)], pa.string())
    return pa.RecordBatch.from_arrays([columns[f.name] for f in SCHEMA], schema=SCHEMA)

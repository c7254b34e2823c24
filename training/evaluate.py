"""Score an ``annotate run`` results table against Aff-Wild2 annotation files (ABAW2 metrics).

Matching rules:
- a video matches the annotation file whose name is the video's file stem (``12-24-1920x1080.mp4``
  <-> ``12-24-1920x1080.txt``), searched in every ``EXPR_Set/*/`` and ``VA_Set/*/`` split;
- annotation line k after the header is frame k - 1 of the table's 0-based ``frame_index``;
- the table has no face area, so the face with ``face_index`` 0 is the one scored (Aff-Wild2
  two-person videos come as ``<video>_left``/``_right`` annotation files, which do not match a
  video stem and are skipped);
- an annotated frame with no scored face in the table (not sampled, or no face found) counts as
  an error, never as a skipped frame: EXPR gets the impossible class -1 (always wrong, and never
  a class of its own in the macro-F1, which averages over the classes present) and VA
  gets 0.0 (the uninformative prediction), so coverage gaps lower the score as in the ABAW2
  challenge, which scores every annotated frame.
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import pyarrow.compute as pc
import pyarrow.parquet as pq

from engines.models.student import EXPR_CLASSES
from training.datasets.affwild2 import read_expr_file, read_va_file
from training.labels import MISSING
from training.metrics import abaw_metrics

logger = logging.getLogger(__name__)

NO_EXPR = -1  # prediction for an annotated frame the table does not cover: never equals a class
NO_VA = 0.0
PROB_COLUMNS = [f"p_{name}" for name in EXPR_CLASSES]


def _predictions(results_parquet: Path) -> dict[str, dict[int, tuple[int, float, float]]]:
    """video stem -> frame_index -> (argmax class, valence, arousal) of face 0."""
    table = pq.read_table(results_parquet, columns=["video_path", "frame_index", "face_index",
                                                    *PROB_COLUMNS, "valence", "arousal"])
    table = table.filter(pc.equal(table["face_index"], 0))
    probs = np.stack([table[c].to_numpy(zero_copy_only=False) for c in PROB_COLUMNS], axis=1)
    # Nulls become NaN so a frame without VA can be told apart from a scored one.
    valence = table["valence"].to_numpy(zero_copy_only=False).astype(np.float64)
    arousal = table["arousal"].to_numpy(zero_copy_only=False).astype(np.float64)
    predictions: dict[str, dict[int, tuple[int, float, float]]] = {}
    for i, (video, frame) in enumerate(zip(table["video_path"].to_pylist(), table["frame_index"].to_pylist())):
        predictions.setdefault(Path(video).stem, {})[frame] = (int(probs[i].argmax()), float(valence[i]), float(arousal[i]))
    return predictions


def evaluate_table(results_parquet: Path, affwild2_dir: Path) -> dict[str, float]:
    """ABAW2 metrics of a results table over the annotated frames of its videos.

    Args:
        results_parquet: the Parquet table written by ``annotate run``.
        affwild2_dir: directory holding ``EXPR_Set/`` and/or ``VA_Set/``.

    Returns:
        ``abaw_metrics`` keys plus ``expr_frames``, ``va_frames`` (annotated frames scored) and
        ``missing_frames`` (annotated frames without a face-0 row, counted as errors).

    Raises:
        ValueError: none of the table's videos has an annotation file.
    """
    predictions = _predictions(results_parquet)
    expr_pairs: list[tuple[int, int]] = []
    va_pairs: list[tuple[float, float, float, float]] = []
    missing = 0
    for path in sorted(affwild2_dir.glob("EXPR_Set/*/*.txt")):
        frames = predictions.get(path.stem)
        if frames is not None:
            for frame, label in enumerate(read_expr_file(path)):
                if label != MISSING:
                    pred = frames.get(frame)
                    missing += pred is None
                    expr_pairs.append((NO_EXPR if pred is None else pred[0], label))
    for path in sorted(affwild2_dir.glob("VA_Set/*/*.txt")):
        frames = predictions.get(path.stem)
        if frames is not None:
            for frame, (valence, arousal) in enumerate(read_va_file(path)):
                if valence != MISSING:
                    pred = frames.get(frame)
                    # A face row whose VA is null (expression-only scorer) is a miss too.
                    scored = pred is not None and not np.isnan(pred[1:]).any()
                    missing += not scored
                    va_pairs.append((*pred[1:], valence, arousal) if scored else (NO_VA, NO_VA, valence, arousal))
    if not expr_pairs and not va_pairs:
        raise ValueError(f"{results_parquet}: no video matches an annotation file under {affwild2_dir}")
    expr = np.array(expr_pairs, dtype=np.int64).reshape(-1, 2)
    va = np.array(va_pairs, dtype=np.float64).reshape(-1, 4)
    metrics = abaw_metrics(expr[:, 0], expr[:, 1], va[:, :2], va[:, 2:])
    logger.info("%d annotated frames without a face-0 row counted as errors", missing)
    return {**metrics, "expr_frames": len(expr), "va_frames": len(va), "missing_frames": missing}

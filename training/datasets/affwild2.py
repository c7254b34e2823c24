"""Aff-Wild2 (ABAW2 release): cropped-aligned frames plus per-video EXPR and VA text files.

Layout under the root directory::

    cropped_aligned/<video>/<frame:05d>.jpg          1-based frame numbers
    EXPR_Set/<split>/<video>.txt                      header, then one int per frame, -1 = none
    VA_Set/<split>/<video>.txt                        "valence,arousal", then one pair, -5 = none

Line k after the header describes frame k (1-based), i.e. image ``<k:05d>.jpg``. A video
annotated in both sets shares frames: such a frame carries both labels in both lists (PAPER.md,
"shared videos"). Frames whose crop is absent (no face was found by the release's detector) are
skipped and counted.

The crops were cut by the release's own aligner, not the deployment's, so a sample carries no box
and no landmarks: ``training.datasets.alignment`` re-detects the face in the crop with RetinaFace
and re-aligns it onto the deployment template, like every other database.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

from training.labels import MISSING, AnnotationError, Sample, check_expr, check_va

logger = logging.getLogger(__name__)

EXPR_NONE = -1  # release marker for a frame without an expression label
VA_NONE = -5.0  # release marker for a frame without valence/arousal


def read_expr_file(path: Path) -> list[int]:
    """Per-frame expressions of one video (index 0 = frame 1), ``MISSING`` where -1.

    Raises:
        AnnotationError: a line that is not -1 or an integer 0..6.
    """
    labels: list[int] = []
    lines = path.read_text().splitlines()
    for number, line in enumerate(lines[1:], start=2):
        try:
            value = int(line.strip())
        except ValueError:
            raise AnnotationError(path, number, f"expected an integer expression, got {line!r}") from None
        labels.append(MISSING if value == EXPR_NONE else check_expr(value, path, number))
    return labels


def read_va_file(path: Path) -> list[tuple[float, float]]:
    """Per-frame (valence, arousal) of one video, ``(MISSING, MISSING)`` where either is -5.

    Raises:
        AnnotationError: a line that is not two comma-separated numbers on [-1, 1] or -5.
    """
    labels: list[tuple[float, float]] = []
    lines = path.read_text().splitlines()
    for number, line in enumerate(lines[1:], start=2):
        try:
            valence, arousal = (float(field) for field in line.split(","))
        except ValueError:
            raise AnnotationError(path, number, f"expected 'valence,arousal', got {line!r}") from None
        if VA_NONE in (valence, arousal):
            labels.append((MISSING, MISSING))
        else:
            labels.append((check_va(valence, path, number), check_va(arousal, path, number)))
    return labels


def read_affwild2(root: Path, split: str) -> tuple[list[Sample], list[Sample]]:
    """Read one split's EXPR and VA frames, merging labels of shared videos.

    Args:
        root: directory holding ``cropped_aligned/``, ``EXPR_Set/`` and ``VA_Set/``.
        split: ``Train_Set`` or ``Validation_Set``.

    Returns:
        ``(expr_samples, va_samples)``; a frame labelled in both sets appears in both lists with
        both labels.
    """
    # (video, 1-based frame) -> [expr, valence, arousal]
    labels: dict[tuple[str, int], list[float]] = {}
    for path in sorted((root / "EXPR_Set" / split).glob("*.txt")):
        for frame, expr in enumerate(read_expr_file(path), start=1):
            if expr != MISSING:
                labels.setdefault((path.stem, frame), [MISSING, MISSING, MISSING])[0] = expr
    for path in sorted((root / "VA_Set" / split).glob("*.txt")):
        for frame, (valence, arousal) in enumerate(read_va_file(path), start=1):
            if valence != MISSING:
                labels.setdefault((path.stem, frame), [MISSING, MISSING, MISSING])[1:] = [valence, arousal]

    frames_dir = root / "cropped_aligned"
    listings: dict[str, set[str]] = {}
    expr_samples: list[Sample] = []
    va_samples: list[Sample] = []
    missing = 0
    for (video, frame), (expr, valence, arousal) in sorted(labels.items()):
        if video not in listings:
            video_dir = frames_dir / video
            listings[video] = set(os.listdir(video_dir)) if video_dir.is_dir() else set()
        name = f"{frame:05d}.jpg"
        if name not in listings[video]:
            missing += 1
            continue
        sample = Sample(frames_dir / video / name, int(expr), valence, arousal)
        if sample.has_expr:
            expr_samples.append(sample)
        if sample.has_va:
            va_samples.append(sample)
    if missing:
        logger.warning("Aff-Wild2 %s: skipped %d annotated frames without an image under %s",
                       split, missing, frames_dir)
    logger.info("Aff-Wild2 %s: %d EXPR frames, %d VA frames", split, len(expr_samples), len(va_samples))
    return expr_samples, va_samples

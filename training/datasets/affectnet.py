"""AffectNet: one CSV per split (``training.csv``, ``validation.csv``) with face box and labels.

Columns used: ``subDirectory_filePath`` (relative to the image root), ``face_x``, ``face_y``,
``face_width``, ``face_height``, ``expression`` (0 neutral, 1 happy, 2 sad, 3 surprise, 4 fear,
5 disgust, 6 anger, 7 contempt, 8-10 none/uncertain/no-face), ``valence``, ``arousal`` (-2 =
missing). Codes 7-10 have no Aff-Wild2 class, so such rows keep only their VA label (if any).
"""

from __future__ import annotations

import csv
import logging
from pathlib import Path

from training.datasets.images import drop_missing_images
from training.labels import (AFFECTNET_CODES, AFFECTNET_TO_AFFWILD2, MISSING, AnnotationError, Sample,
                             check_va)

logger = logging.getLogger(__name__)

COLUMNS = ("subDirectory_filePath", "face_x", "face_y", "face_width", "face_height",
           "expression", "valence", "arousal")
VA_NONE = -2.0  # AffectNet's own marker for "no valence/arousal"


def _parse_row(row: dict[str, str], images: Path, path: Path, line: int) -> Sample:
    try:
        x, y, w, h = (int(float(row[key])) for key in COLUMNS[1:5])
        code = int(row["expression"])
        valence, arousal = float(row["valence"]), float(row["arousal"])
    except (TypeError, ValueError):
        raise AnnotationError(path, line, "non-numeric box, expression or valence/arousal") from None
    if code not in AFFECTNET_CODES:
        raise AnnotationError(path, line, f"expression code {code} outside 0..10")
    has_va = VA_NONE not in (valence, arousal)
    return Sample(
        image=images / row["subDirectory_filePath"],
        expr=AFFECTNET_TO_AFFWILD2.get(code, MISSING),
        valence=check_va(valence, path, line) if has_va else MISSING,
        arousal=check_va(arousal, path, line) if has_va else MISSING,
        box=(x, y, x + w, y + h),
    )


def read_affectnet(csv_path: Path, images: Path) -> list[Sample]:
    """Read an AffectNet split CSV; rows left with no usable label are dropped.

    Raises:
        AnnotationError: a missing column or a malformed row (names the CSV line).
    """
    with csv_path.open(newline="") as handle:
        reader = csv.DictReader(handle)
        absent = [column for column in COLUMNS if column not in (reader.fieldnames or [])]
        if absent:
            raise AnnotationError(csv_path, 1, f"missing columns {absent}")
        # Line 1 is the header; DictReader yields data rows from line 2 on.
        samples = [_parse_row(row, images, csv_path, line) for line, row in enumerate(reader, start=2)]
    labelled = [s for s in samples if s.has_expr or s.has_va]
    logger.info("AffectNet %s: %d rows, %d with a usable label", csv_path.name, len(samples), len(labelled))
    return drop_missing_images(labelled, f"AffectNet {csv_path.name}")

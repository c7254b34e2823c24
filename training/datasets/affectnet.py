"""AffectNet: one CSV per split (``training.csv``, ``validation.csv``) with face box and labels.

Columns, in the release's order: ``subDirectory_filePath`` (relative to the image root),
``face_x``, ``face_y``, ``face_width``, ``face_height``, ``facial_landmarks``, ``expression`` (0
neutral, 1 happy, 2 sad, 3 surprise, 4 fear, 5 disgust, 6 anger, 7 contempt, 8-10
none/uncertain/no-face), ``valence``, ``arousal`` (-2 = missing). Codes 7-10 have no Aff-Wild2
class, so such rows keep only their VA label (if any).

The release's ``training.csv`` starts with that header row but its ``validation.csv`` does not: a
file whose first row is a data row (an image path, then numbers) is read with the release's column
order, so both splits load as they are shipped.
"""

from __future__ import annotations

import csv
import logging
from collections.abc import Iterator
from pathlib import Path
from typing import TextIO

from training.datasets.images import drop_missing_images
from training.labels import (AFFECTNET_CODES, AFFECTNET_TO_AFFWILD2, MISSING, AnnotationError, Sample,
                             check_va)

logger = logging.getLogger(__name__)

# The release's column order, used for a file without a header row.
RELEASE_COLUMNS = ("subDirectory_filePath", "face_x", "face_y", "face_width", "face_height",
                   "facial_landmarks", "expression", "valence", "arousal")
COLUMNS = ("subDirectory_filePath", "face_x", "face_y", "face_width", "face_height",
           "expression", "valence", "arousal")
VA_NONE = -2.0  # AffectNet's own marker for "no valence/arousal"
# Suffixes of the release's image files (mostly .jpg, some .png/.bmp/.tif upper- or lower-case).
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".gif", ".webp")


def _is_number(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True


def _is_data_row(row: list[str]) -> bool:
    """A release data row: an image path first, then a numeric face box (a header has names there)."""
    return (len(row) == len(RELEASE_COLUMNS) and row[0].strip().lower().endswith(IMAGE_SUFFIXES)
            and all(_is_number(field) for field in row[1:5]))


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


def _rows(handle: TextIO, csv_path: Path) -> Iterator[tuple[int, dict[str, str]]]:
    """``(line, row as a dict)`` for every data row, with or without a header row.

    Raises:
        AnnotationError: the first row is neither a header naming ``COLUMNS`` nor a data row, or
            a row has the wrong number of fields.
    """
    reader = csv.reader(handle)
    first = next(reader, None)
    if first is None:
        return
    if _is_data_row(first):
        fieldnames: list[str] = list(RELEASE_COLUMNS)
        yield 1, dict(zip(fieldnames, first, strict=True))
    else:
        absent = [column for column in COLUMNS if column not in first]
        if absent:
            raise AnnotationError(csv_path, 1, f"missing columns {absent}, and the first row is not a data row "
                                               "(image path, x, y, width, height, landmarks, expression, valence, "
                                               "arousal)")
        fieldnames = first
    for row in reader:
        if not row:  # a blank line (DictReader skips them too)
            continue
        if len(row) != len(fieldnames):
            raise AnnotationError(csv_path, reader.line_num, f"expected {len(fieldnames)} fields, got {len(row)}")
        yield reader.line_num, dict(zip(fieldnames, row, strict=True))


def read_affectnet(csv_path: Path, images: Path) -> list[Sample]:
    """Read an AffectNet split CSV (header row optional); rows left with no usable label are dropped.

    Raises:
        AnnotationError: a missing column or a malformed row (names the CSV line).
    """
    with csv_path.open(newline="") as handle:
        samples = [_parse_row(row, images, csv_path, line) for line, row in _rows(handle, csv_path)]
    labelled = [s for s in samples if s.has_expr or s.has_va]
    logger.info("AffectNet %s: %d rows, %d with a usable label", csv_path.name, len(samples), len(labelled))
    return drop_missing_images(labelled, f"AffectNet {csv_path.name}")

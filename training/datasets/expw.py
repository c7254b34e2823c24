"""ExpW (Expression in-the-Wild): ``label.lst`` over the ``origin`` images.

Each row: ``image face_id top left right bottom confidence label`` with labels 0 angry,
1 disgust, 2 fear, 3 happy, 4 sad, 5 surprise, 6 neutral; an image may hold several faces.
The box only says which face: ``training.datasets.alignment`` finds that face's five landmarks
with RetinaFace (the face overlapping the box best) and aligns it as ``annotate run`` would.
"""

from __future__ import annotations

from pathlib import Path

from training.datasets.images import drop_missing_images
from training.labels import EXPW_TO_AFFWILD2, AnnotationError, Sample

FIELDS = 8


def _parse_line(line: str, images: Path, path: Path, number: int) -> Sample:
    fields = line.split()
    if len(fields) != FIELDS:
        raise AnnotationError(path, number, f"expected {FIELDS} fields, got {len(fields)}")
    try:
        top, left, right, bottom = (int(field) for field in fields[2:6])
        label = int(fields[7])
    except ValueError:
        raise AnnotationError(path, number, "non-integer face box or label") from None
    if label not in EXPW_TO_AFFWILD2:
        raise AnnotationError(path, number, f"label {label} outside 0..6")
    return Sample(images / fields[0], expr=EXPW_TO_AFFWILD2[label], box=(left, top, right, bottom))


def read_expw(label_list: Path, images: Path) -> list[Sample]:
    """Read ``label.lst``; blank lines are ignored, every face row becomes one sample.

    Raises:
        AnnotationError: a malformed row (names the file and line).
    """
    lines = label_list.read_text().splitlines()
    samples = [_parse_line(line, images, label_list, number)
               for number, line in enumerate(lines, start=1) if line.strip()]
    return drop_missing_images(samples, f"ExpW {label_list.name}")

"""Label space shared by every reader: Aff-Wild2 expression order, VA on [-1, 1], one sentinel.

A training item is a ``Sample``: an image path, an optional face box to crop first, an expression
index in Aff-Wild2 order and valence/arousal on [-1, 1]; any of the three labels may be
``MISSING`` (PAPER.md: "a missing label is a sentinel (the original used -2)"). -2 is outside
both the class range 0..6 and the VA range [-1, 1], so it can never be mistaken for a label.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from engines.models.student import EXPR_CLASSES

MISSING = -2

# AffectNet expression codes -> Aff-Wild2 index. 0 neutral, 1 happy, 2 sad, 3 surprise,
# 4 fear, 5 disgust, 6 anger; 7 contempt and 8-10 none/uncertain/no-face have no Aff-Wild2 class.
AFFECTNET_TO_AFFWILD2: dict[int, int] = {0: 0, 1: 4, 2: 5, 3: 6, 4: 3, 5: 2, 6: 1}
AFFECTNET_CODES = range(11)
# ExpW labels 0 angry, 1 disgust, 2 fear, 3 happy, 4 sad, 5 surprise, 6 neutral.
EXPW_TO_AFFWILD2: dict[int, int] = {0: 1, 1: 2, 2: 3, 3: 4, 4: 5, 5: 6, 6: 0}


@dataclass(frozen=True)
class Sample:
    """One labelled face image; ``box`` is (left, top, right, bottom) pixels, None = whole image.

    ``landmarks`` are the five points the face is aligned on (``engines.align`` order: eyes,
    nose tip, mouth corners, as seen in the image), in image pixels: shipped by the dataset, or
    filled in by ``training.datasets.alignment.with_landmarks`` before training.
    """

    image: Path
    expr: int = MISSING
    valence: float = MISSING
    arousal: float = MISSING
    box: tuple[int, int, int, int] | None = None
    landmarks: tuple[tuple[float, float], ...] | None = None

    @property
    def has_expr(self) -> bool:
        return self.expr != MISSING

    @property
    def has_va(self) -> bool:
        return self.valence != MISSING and self.arousal != MISSING


class AnnotationError(ValueError):
    """A malformed annotation; the message is ``<file>:<line>: <reason>``.

    ``line`` is a 1-based line number for text formats, or a key (``frames/00012``) for JSON.
    """

    def __init__(self, path: Path, line: int | str, reason: str) -> None:
        super().__init__(f"{path}:{line}: {reason}")


def check_expr(value: int, path: Path, line: int) -> int:
    """Return ``value`` if it is an Aff-Wild2 class index, else raise ``AnnotationError``."""
    if not 0 <= value < len(EXPR_CLASSES):
        raise AnnotationError(path, line, f"expression {value} outside 0..{len(EXPR_CLASSES) - 1}")
    return value


def check_va(value: float, path: Path, line: int) -> float:
    """Return ``value`` if it lies on [-1, 1], else raise ``AnnotationError``."""
    if not -1.0 <= value <= 1.0:
        raise AnnotationError(path, line, f"valence/arousal {value} outside [-1, 1]")
    return value

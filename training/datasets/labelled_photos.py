"""Folders of human-labelled face photos: a CSV naming each image and its expression.

The format is that of the crowd-labelled ``facial_expressions`` collection (github.com/muxspace/
facial_expressions, Apache-2.0: 13,690 photos, mostly of Labeled Faces in the Wild, each with
one of eight expression words): ``data/legend.csv`` with the columns ``image`` and ``emotion``
(other columns are ignored) over the files in ``images/``. Any folder laid out the same way
reads, so users can bring their own labelled photos.

Expression words map onto the seven Aff-Wild2 classes by name (``sad`` and ``sadness`` alike);
``contempt``, which has no Aff-Wild2 class, is dropped and counted. The photos carry no face box:
the labelled face is the one nearest the centre, so each sample's box is the photo's central
half, which ``training.datasets.alignment`` uses to pick that face among several.

Held-out people: an LFW file is named ``Person_Name_0001.jpg``; all photos of one person fall in
the same split, decided by a hash of the name (stable across machines and runs), so validation
and test faces belong to people never seen in training.
"""

from __future__ import annotations

import csv
import hashlib
import logging
import re
from collections import Counter
from pathlib import Path

from training.datasets.images import drop_missing_images
from training.labels import AnnotationError, Sample

from engines.models.student import EXPR_CLASSES

logger = logging.getLogger(__name__)

#: Expression words as they appear in such files → the Aff-Wild2 class name.
ALIASES = {"sad": "sadness", "happy": "happiness", "angry": "anger", "surprised": "surprise",
           "disgusted": "disgust", "fearful": "fear"}
#: Words with no Aff-Wild2 class: their photos are dropped (and counted).
DROPPED = {"contempt"}
_LFW_NAME = re.compile(r"^(?P<person>.+)_\d{4}\.\w+$")


def person_of(image_name: str) -> str:
    """The person a photo shows, from an LFW-style name; otherwise the file is its own person."""
    match = _LFW_NAME.match(image_name)
    return match.group("person") if match else image_name


def split_of(person: str, val_percent: int = 10, test_percent: int = 15) -> str:
    """``train``, ``val`` or ``test`` for a person, from a hash of the name (stable, disjoint)."""
    bucket = int(hashlib.sha256(person.encode()).hexdigest()[:8], 16) % 100
    return "test" if bucket < test_percent else "val" if bucket < test_percent + val_percent else "train"


def read_labelled_photos(root: Path, csv_name: str = "data/legend.csv",
                         images: str = "images") -> dict[str, list[Sample]]:
    """Samples per split (``train``, ``val``, ``test``) of a labelled-photo folder.

    Raises:
        AnnotationError: the CSV lacks the ``image`` or ``emotion`` column, or names an
            expression that is neither a class, an alias nor dropped (line number given).
        FileNotFoundError: no CSV at ``root / csv_name``.
    """
    path = root / csv_name
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such file (a labelled-photo folder has {csv_name})")
    splits: dict[str, list[Sample]] = {"train": [], "val": [], "test": []}
    dropped: Counter[str] = Counter()
    with open(path, newline="", encoding="utf-8") as fh:
        reader = csv.DictReader(fh)
        missing = {"image", "emotion"} - set(reader.fieldnames or ())
        if missing:
            raise AnnotationError(path, 1, f"missing columns: {', '.join(sorted(missing))}")
        for number, row in enumerate(reader, start=2):
            word = row["emotion"].strip().lower()
            word = ALIASES.get(word, word)
            if word in DROPPED:
                dropped[word] += 1
                continue
            if word not in EXPR_CLASSES:
                raise AnnotationError(path, number, f"unknown expression {row['emotion']!r}")
            name = row["image"].strip()
            sample = Sample(root / images / name, expr=EXPR_CLASSES.index(word), box=_central_box(root / images / name))
            splits[split_of(person_of(name))].append(sample)
    if dropped:
        logger.info("%s: dropped %s (no Aff-Wild2 class)", path, dict(dropped))
    return {name: drop_missing_images(samples, f"{path} ({name})") for name, samples in splits.items()}


def _central_box(image: Path) -> tuple[int, int, int, int] | None:
    """The central half of the photo (where its labelled face is), or None if it cannot be read."""
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(image) as handle:
            width, height = handle.size
    except (OSError, UnidentifiedImageError):
        return None
    return width // 4, height // 4, width - width // 4, height - height // 4

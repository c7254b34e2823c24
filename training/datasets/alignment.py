"""From a dataset sample to the five landmarks ``annotate run`` would align that face on.

Training, evaluation, export and ``annotate run`` must show the student the same face: the
112x112 crop that ``engines.align`` cuts from RetinaFace's five landmarks (no resize, no centre
crop). Every database ships a different geometry (Aff-Wild2 crops made by another aligner,
AffectNet and ExpW boxes in full images, AFEW-VA 68-point landmarks), so each sample gets its five
points here, in this order:

1. shipped landmarks (AFEW-VA's 68 points, reduced by :func:`five_from_68`);
2. the deployment detector (``retinaface-mnv2``) run once on the image the way ``annotate run``
   finds faces: the whole image at the deployment threshold first (a keyframe), taking the face
   that overlaps the sample's box best (the highest-scoring face for a sample without a box, such
   as Aff-Wild2's ``cropped_aligned`` frames, which are re-detected rather than trusted), then
   that face re-found in its 128 px crop window, whose landmarks are the ones kept (how
   ``annotate run`` refines every face, ``engines.refind``); if the whole image shows no face, the
   box region in its crop window at the tracker's lower threshold;
3. no face found: the template placed in the box (the whole image without one) where RetinaFace
   boxes an aligned face on average (:data:`TEMPLATE_FACE_BOX`); these are counted and logged.

Detection results are cached so each image is detected once: one small JSON file per image
directory under ``<cache root>/landmarks/`` (``$ANNOTATOR_CACHE``), keyed by file name, size,
mtime and box, written to a temporary name and renamed.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from collections import Counter, defaultdict
from collections.abc import Callable, Sequence
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from engines.align import TEMPLATE_112
from engines.boxes import IOU_THRESHOLD, iou_matrix
from engines.refind import refind
from engines.retinaface import RetinaFaceDetector
from training.labels import Sample

logger = logging.getLogger(__name__)

DETECTOR = "retinaface-mnv2"  # the default detector of ``annotate run``
#: Bump when the detection rule changes, so old caches are not trusted (2: every face refined in
#: its snapped crop window, as annotate run does since engines.refind).
CACHE_VERSION = 2
#: Where RetinaFace boxes a face aligned to the 112 template, in crop pixels (x1, y1, x2, y2):
#: centre (56.0, 69.0), size 84 x 107. Measured by mapping the detector's box through the
#: alignment of 121 real faces (carphone, 120 frames: centre (54.6, 67.0), size 84.7 x 106.5;
#: astronaut: (55.5, 70.1), 82.9 x 108.2); x centred on the template's own mean x.
TEMPLATE_FACE_BOX = np.array([14.0, 15.5, 98.0, 122.5], np.float32)
#: iBUG 68-point indices: eye contours (image-left eye first), nose tip, mouth corners.
_LEFT_EYE, _RIGHT_EYE, _NOSE_TIP, _MOUTH_LEFT, _MOUTH_RIGHT = range(36, 42), range(42, 48), 30, 48, 54
_MIN_EYE_DISTANCE = 1.0  # pixels; closer eyes are a degenerate annotation, not a face
_DETECT_BATCH = 32  # same-size images detected together (Aff-Wild2 frames all share one size)
_FLUSH_EVERY = 1000  # new detections between cache writes, so an interrupted pass keeps its work

Landmarks = np.ndarray  # float32 (5, 2) image pixels
Box = tuple[int, int, int, int]


def five_from_68(points: Sequence[Sequence[float]]) -> np.ndarray:
    """RetinaFace's five points from iBUG 68 landmarks: eye centres, nose tip, mouth corners.

    Raises:
        ValueError: not 68 (x, y) points.
    """
    p = np.asarray(points, np.float64)
    if p.shape != (68, 2):
        raise ValueError(f"expected 68 (x, y) landmarks, got shape {p.shape}")
    five = [p[list(_LEFT_EYE)].mean(0), p[list(_RIGHT_EYE)].mean(0), p[_NOSE_TIP], p[_MOUTH_LEFT], p[_MOUTH_RIGHT]]
    return np.asarray(five, np.float32)


def usable(landmarks: np.ndarray) -> bool:
    """Five finite points whose eyes are apart: a similarity transform can be fitted on them."""
    return bool(np.isfinite(landmarks).all() and np.linalg.norm(landmarks[1] - landmarks[0]) >= _MIN_EYE_DISTANCE)


def box_landmarks(box: Sequence[float]) -> Landmarks:
    """The template's points placed in ``box`` as RetinaFace would box that aligned face."""
    box = np.asarray(box, np.float32)
    layout = (TEMPLATE_112 - TEMPLATE_FACE_BOX[:2]) / (TEMPLATE_FACE_BOX[2:] - TEMPLATE_FACE_BOX[:2])
    return (box[:2] + layout * (box[2:] - box[:2])).astype(np.float32)


def decode_image(path: Path) -> np.ndarray:
    """uint8 (H, W, 3) RGB pixels of an image file, the frame the landmarks refer to."""
    with Image.open(path) as image:
        return np.array(image.convert("RGB"))  # a writable copy: torch wraps it without a warning


def _refind(detector: RetinaFaceDetector, image: np.ndarray, box: np.ndarray) -> Landmarks | None:
    """The face in the crop window around ``box`` (annotate run's re-detection of a known face)."""
    found, _ = refind(detector, torch.from_numpy(np.ascontiguousarray(image))[None], np.zeros(1, np.int64),
                      np.asarray(box, np.float32)[None])
    return found.landmarks[0] if len(found) else None


def find_landmarks(detector: RetinaFaceDetector, images: Sequence[np.ndarray],
                   boxes: Sequence[Box | None]) -> list[Landmarks | None]:
    """RetinaFace's five landmarks of the face each image's box holds (rule 2 of the module).

    Args:
        detector: the deployment detector (its threshold and ``det_size`` are annotate run's).
        images: uint8 (H, W, 3) RGB images; same-size ones are detected in one batch.
        boxes: per image, the face box (x1, y1, x2, y2) or None for "the image's main face".

    Returns:
        Per image, float32 (5, 2) landmarks in its pixels, or None where no face matched.
    """
    result: list[Landmarks | None] = [None] * len(images)
    by_shape: dict[tuple[int, ...], list[int]] = defaultdict(list)
    for index, image in enumerate(images):
        by_shape[image.shape].append(index)
    for indices in by_shape.values():
        for start in range(0, len(indices), _DETECT_BATCH):
            chunk = indices[start:start + _DETECT_BATCH]
            frames = torch.from_numpy(np.stack([images[i] for i in chunk]))
            for i, found in zip(chunk, detector.detect(frames, min_face=0.0)):
                if not len(found):
                    continue
                face = 0  # highest score first
                if boxes[i] is not None:
                    overlap = iou_matrix(np.asarray([boxes[i]], np.float32), found.boxes)[0]
                    if overlap.max() < IOU_THRESHOLD:
                        continue
                    face = int(overlap.argmax())
                refined = _refind(detector, images[i], found.boxes[face])
                result[i] = refined if refined is not None else found.landmarks[face]
    for i, image in enumerate(images):
        if result[i] is None:
            height, width = image.shape[:2]
            box = np.asarray(boxes[i] if boxes[i] is not None else (0, 0, width, height), np.float32)
            result[i] = _refind(detector, image, box)
    return result


class LandmarkCache:
    """The landmarks of one image directory, stored as ``<root>/<digest of the directory>.json``.

    An entry is ``{"points": [10 floats], "by": "detector" | "box"}``; a file written by another
    detector or another :data:`CACHE_VERSION` is ignored, so stale landmarks are never used.
    """

    def __init__(self, root: Path, directory: Path, detector_id: str) -> None:
        digest = hashlib.sha256(str(directory.resolve()).encode()).hexdigest()[:16]
        self.path = root / f"{digest}.json"
        self.header = {"version": CACHE_VERSION, "detector": detector_id, "directory": str(directory.resolve())}
        self.entries: dict[str, dict] = {}
        self.unsaved = 0
        try:
            stored = json.loads(self.path.read_text())
        except (OSError, ValueError):
            return
        if isinstance(stored, dict) and all(stored.get(k) == v for k, v in self.header.items()):
            self.entries = stored.get("faces", {})

    @staticmethod
    def key(sample: Sample) -> str:
        """File name, size and mtime (a replaced image is detected again) and the box."""
        stat = sample.image.stat()
        box = ",".join(map(str, sample.box)) if sample.box is not None else "-"
        return f"{sample.image.name}|{stat.st_size}|{stat.st_mtime_ns}|{box}"

    def put(self, key: str, points: Landmarks, by: str) -> None:
        self.entries[key] = {"points": [float(v) for v in points.reshape(-1)], "by": by}  # float32 exactly
        self.unsaved += 1
        if self.unsaved >= _FLUSH_EVERY:
            self.save()

    def save(self) -> None:
        """Write to a temporary sibling, then rename: readers never see half a file."""
        if not self.unsaved:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_name(f"{self.path.name}.{os.getpid()}.tmp")
        tmp.write_text(json.dumps({**self.header, "faces": self.entries}))
        os.replace(tmp, self.path)
        self.unsaved = 0


def _detector_id() -> str:
    from engines.registry import get_entry

    return f"{DETECTOR}:{get_entry(DETECTOR).sha256[:12]}"


def _as_tuple(points: np.ndarray) -> tuple[tuple[float, float], ...]:
    return tuple((float(x), float(y)) for x, y in np.asarray(points, np.float64).reshape(5, 2))


def with_landmarks(samples: Sequence[Sample], device: str = "cpu", cache_dir: Path | None = None,
                   detector_factory: Callable[[], RetinaFaceDetector] | None = None) -> list[Sample]:
    """The samples, each carrying the five landmarks it is aligned on (rules 1-3 of the module).

    Samples with usable shipped landmarks pass through untouched; the detector is only loaded
    when some sample is neither shipped nor cached.

    Args:
        samples: samples from any reader.
        device: where the detector runs (the training device).
        cache_dir: cache root (default ``$ANNOTATOR_CACHE`` or ``~/.cache/annotator``).
        detector_factory: builds the detector; default ``retinaface-mnv2`` on ``device``.

    Returns:
        New samples with ``landmarks`` set, in the same order.
    """
    from engines.cache import cache_root

    out = list(samples)
    pending: dict[Path, list[int]] = defaultdict(list)
    for index, sample in enumerate(out):
        if sample.landmarks is None or not usable(np.asarray(sample.landmarks, np.float32)):
            pending[sample.image.parent].append(index)
    if not pending:
        return out
    root = cache_root(cache_dir) / "landmarks"
    detector_id = _detector_id()
    detector: RetinaFaceDetector | None = None
    sources: Counter[str] = Counter()
    for directory, indices in pending.items():
        cache = LandmarkCache(root, directory, detector_id)
        keys = {i: LandmarkCache.key(out[i]) for i in indices}
        missing = [i for i in indices if keys[i] not in cache.entries]
        for start in range(0, len(missing), _DETECT_BATCH * 4):
            chunk = missing[start:start + _DETECT_BATCH * 4]
            if detector is None:
                detector = detector_factory() if detector_factory else _default_detector(device)
            images = [decode_image(out[i].image) for i in chunk]
            found = find_landmarks(detector, images, [out[i].box for i in chunk])
            for i, image, points in zip(chunk, images, found):
                if points is None:
                    height, width = image.shape[:2]
                    cache.put(keys[i], box_landmarks(out[i].box or (0, 0, width, height)), "box")
                else:
                    cache.put(keys[i], points, "detector")
            logger.info("landmarks of %s: %d of %d images detected", directory, start + len(chunk), len(missing))
        cache.save()
        for i in indices:
            entry = cache.entries[keys[i]]
            sources[entry["by"]] += 1
            out[i] = replace(out[i], landmarks=_as_tuple(np.asarray(entry["points"], np.float32)))
    shipped = len(out) - sum(sources.values())
    logger.info("aligned %d samples: %d on shipped landmarks, %d on RetinaFace's, %d on their box (no face found)",
                len(out), shipped, sources["detector"], sources["box"])
    if sources["box"]:
        logger.warning("%d of %d samples had no face RetinaFace could find; aligned from their box instead",
                       sources["box"], len(out))
    return out


def _default_detector(device: str) -> RetinaFaceDetector:
    from engines.factory import create_detector

    detector, _ = create_detector(DETECTOR, device=device)
    return detector

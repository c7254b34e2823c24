"""AFEW-VA: one directory per clip, ``<clip>/<clip>.json`` plus ``<clip>/<frame>.png`` frames.

The JSON holds ``{"frames": {"00000": {"valence": v, "arousal": a, "landmarks": [[x, y] x 68]}}}``
with integer valence/arousal on [-10, 10]; they are divided by 10 onto [-1, 1]. Frames are full
video frames; each sample is aligned on the five points its 68 landmarks give (eye centres, nose
tip, mouth corners: ``training.datasets.alignment.five_from_68``), like a RetinaFace face at
deployment. The box (the landmarks' bounding box grown by ``BOX_MARGIN`` per side) is kept for
frames whose landmarks are degenerate, which are re-detected in it instead.
"""

from __future__ import annotations

import json
from pathlib import Path

from training.datasets.alignment import five_from_68
from training.datasets.images import drop_missing_images
from training.labels import AnnotationError, Sample, check_va

VA_SCALE = 10.0  # AFEW-VA annotates on [-10, 10]
# 68-point landmarks run from the brows to the chin; 10 % per side keeps the forehead and jaw.
BOX_MARGIN = 0.1


def _box(landmarks: list[list[float]]) -> tuple[int, int, int, int]:
    xs = [point[0] for point in landmarks]
    ys = [point[1] for point in landmarks]
    dx = (max(xs) - min(xs)) * BOX_MARGIN
    dy = (max(ys) - min(ys)) * BOX_MARGIN
    return int(min(xs) - dx), int(min(ys) - dy), int(max(xs) + dx), int(max(ys) + dy)


def read_clip(path: Path) -> list[Sample]:
    """Read one clip's JSON.

    Raises:
        AnnotationError: invalid JSON (names the line) or a frame entry without valid labels.
    """
    try:
        frames = json.loads(path.read_text())["frames"]
    except json.JSONDecodeError as error:
        raise AnnotationError(path, error.lineno, f"invalid JSON: {error.msg}") from None
    except KeyError:
        raise AnnotationError(path, 1, "no 'frames' object") from None
    samples = []
    for name, frame in sorted(frames.items()):
        where = f"frames/{name}"
        try:
            valence, arousal = float(frame["valence"]), float(frame["arousal"])
            box = _box(frame["landmarks"])
            five = five_from_68(frame["landmarks"])
        except (KeyError, TypeError, ValueError, IndexError):
            raise AnnotationError(path, where, "needs numeric valence, arousal and 68 landmarks") from None
        samples.append(Sample(path.parent / f"{name}.png",
                              valence=check_va(valence / VA_SCALE, path, where),
                              arousal=check_va(arousal / VA_SCALE, path, where), box=box,
                              landmarks=tuple((float(x), float(y)) for x, y in five)))
    return samples


def read_afewva(root: Path) -> list[Sample]:
    """Read every ``<clip>/<clip>.json`` under ``root``."""
    samples = [s for clip in sorted(root.iterdir()) if (clip / f"{clip.name}.json").is_file()
               for s in read_clip(clip / f"{clip.name}.json")]
    return drop_missing_images(samples, f"AFEW-VA {root}")

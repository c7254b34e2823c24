"""RetinaFace post-processing shared by every RetinaFace backbone (MobileNetV2, ResNet-50).

The network (any runtime) maps a letterboxed batch ``(B, 3, Hp, Wp)`` float32 RGB 0..255 to
per-anchor raw outputs; this module turns them into faces in the pixels of the original frames.

Anchor scheme (SSD-style priors, checked against the decoding inside the upstream TF graph):
three levels with steps 8, 16, 32 and anchor sizes (16, 32), (64, 128), (256, 512) pixels;
anchors are ordered level, then feature-map row, then column, then size. An anchor is
``[cx, cy, w, h]`` normalised by the padded input size (Wp, Hp). Deltas decode with variances
(0.1, 0.2): ``centre = a_c + d_c * 0.1 * a_wh``, ``wh = a_wh * exp(d_wh * 0.2)``, landmarks
``a_c + d_k * 0.1 * a_wh``.

Landmark order, as seen in the image: left eye, right eye, nose tip, left mouth corner,
right mouth corner ("left" = smaller x in the image, i.e. the subject's right side).
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass

import cv2
import numpy as np
import torch
import torch.nn.functional as F

from engines.runtimes import Runtime  # the project's one runtime interface

STEPS: tuple[int, ...] = (8, 16, 32)
MIN_SIZES: tuple[tuple[int, ...], ...] = ((16, 32), (64, 128), (256, 512))
VARIANCES: tuple[float, float] = (0.1, 0.2)
# The coarsest level has stride 32, so inputs are padded to multiples of 32 for every level's
# feature map to tile the image exactly (the graph's anchors assume ceil(H / step) cells).
SIZE_MULTIPLE = 32
#: A face of this many network pixels still scores above 0.9 in most frames (measured on real
#: faces pasted at known sizes: 40 px: 70 %, 64 px: 100 %; the smallest anchor is 16 px).
SMALLEST_FACE = 32


def detector_side(width: int, height: int, min_face: float, cap: int) -> int:
    """Long side of the network input for ``width`` x ``height`` frames: the smallest that still
    shows a ``min_face`` face at :data:`SMALLEST_FACE` pixels, at most ``cap`` and at most the
    frame itself (detection cost grows with the square of this side)."""
    long_side = max(width, height)
    wanted = long_side * min(1.0, SMALLEST_FACE / min_face) if min_face > 0 else long_side
    return int(max(SIZE_MULTIPLE, min(cap, long_side, math.ceil(wanted))))


def capped_floor(width: int, height: int, min_face: float, cap: int) -> tuple[float, int, float] | None:
    """Where ``cap`` keeps :func:`detector_side` below what ``min_face`` asks for: (the smallest face,
    in frame pixels, that the capped detector still shows at :data:`SMALLEST_FACE` pixels; the
    side ``min_face`` needs, at most the frame's own; the smallest face at that side). None when
    the cap does not bind."""
    long_side = max(width, height)
    side = detector_side(width, height, min_face, cap)
    needed = detector_side(width, height, min_face, long_side)
    if side >= needed:
        return None
    return SMALLEST_FACE * long_side / side, needed, SMALLEST_FACE * long_side / needed


@functools.lru_cache(maxsize=32)
def anchor_grid(height: int, width: int) -> np.ndarray:
    """Anchors for a padded input of ``height`` x ``width`` pixels.

    Cached per size because every frame of a video shares one padded size.

    Args:
        height: padded input height in pixels (a multiple of 32).
        width: padded input width in pixels (a multiple of 32).

    Returns:
        Read-only float32 ``(A, 4)`` array of ``[cx, cy, w, h]`` normalised to the padded
        input, ordered level (stride 8, 16, 32), row, column, anchor size;
        ``A = sum_s ceil(H / s) * ceil(W / s) * 2``.
    """
    levels = []
    for step, sizes in zip(STEPS, MIN_SIZES):
        rows, cols = math.ceil(height / step), math.ceil(width / step)
        cy, cx = np.meshgrid(
            (np.arange(rows) + 0.5) * step / height,
            (np.arange(cols) + 0.5) * step / width,
            indexing="ij",
        )
        centres = np.stack([cx.ravel(), cy.ravel()], axis=-1)  # (rows * cols, 2), row-major
        wh = np.array([[s / width, s / height] for s in sizes])  # (n_sizes, 2)
        level = np.concatenate(
            [
                np.repeat(centres[:, None, :], len(sizes), axis=1),
                np.broadcast_to(wh, (len(centres), len(sizes), 2)),
            ],
            axis=-1,
        )
        levels.append(level.reshape(-1, 4))
    anchors = np.concatenate(levels).astype(np.float32)
    anchors.setflags(write=False)
    return anchors


def decode_boxes(
    deltas: np.ndarray, anchors: np.ndarray, variances: tuple[float, float] = VARIANCES
) -> np.ndarray:
    """Turn box regression deltas into corner boxes.

    Args:
        deltas: float ``(..., 4)`` raw ``[dx, dy, dw, dh]``.
        anchors: float ``(..., 4)`` ``[cx, cy, w, h]`` broadcastable against ``deltas``.
        variances: (centre, size) scaling used in training.

    Returns:
        float32 ``(..., 4)`` ``[x1, y1, x2, y2]`` in the anchors' normalised frame.
    """
    centre = anchors[..., :2] + deltas[..., :2] * variances[0] * anchors[..., 2:]
    half = anchors[..., 2:] * np.exp(deltas[..., 2:] * variances[1]) / 2
    return np.concatenate([centre - half, centre + half], axis=-1).astype(np.float32)


def decode_landmarks(
    deltas: np.ndarray, anchors: np.ndarray, variances: tuple[float, float] = VARIANCES
) -> np.ndarray:
    """Turn landmark regression deltas into points.

    Args:
        deltas: float ``(..., 10)`` raw offsets, five (x, y) pairs.
        anchors: float ``(..., 4)`` ``[cx, cy, w, h]`` broadcastable against ``deltas``.
        variances: (centre, size) scaling; landmarks use the centre one.

    Returns:
        float32 ``(..., 5, 2)`` (x, y) in the anchors' normalised frame, order as in the module
        docstring.
    """
    points = deltas.reshape(*deltas.shape[:-1], 5, 2)
    anchors = anchors[..., None, :]
    return (anchors[..., :2] + points * variances[0] * anchors[..., 2:]).astype(np.float32)


def nms(boxes: np.ndarray, scores: np.ndarray, iou_threshold: float) -> np.ndarray:
    """Greedy non-maximum suppression, OpenCV's (``cv2.dnn.NMSBoxes``).

    A box is dropped when its IoU with a higher-scoring kept box exceeds ``iou_threshold`` (the
    rule of TF's NonMaxSuppressionV3, which the upstream graph uses); equal scores keep the
    earlier box first. IoU does not change under per-axis scaling, so boxes may be normalised or
    in pixels. Boxes need a positive area and scores must be positive (OpenCV's own score filter,
    at 0, drops the rest): the detector's decoded boxes and thresholded scores always are.

    Args:
        boxes: float ``(n, 4)`` ``[x1, y1, x2, y2]``.
        scores: float ``(n,)``.
        iou_threshold: overlap above which the lower-scoring box is suppressed.

    Returns:
        int64 ``(k,)`` indices into ``boxes`` of the kept boxes, highest score first.
    """
    boxes = np.asarray(boxes, np.float64).reshape(-1, 4)
    xywh = np.concatenate([boxes[:, :2], boxes[:, 2:] - boxes[:, :2]], axis=1)
    keep = cv2.dnn.NMSBoxes(xywh, np.asarray(scores, np.float32), 0.0, float(iou_threshold))
    return np.asarray(keep, np.int64).reshape(-1)


def letterbox(frames: torch.Tensor, det_size: int) -> tuple[torch.Tensor, float]:
    """Shrink frames so the long side is at most ``det_size``; pad right/bottom to multiples of 32.

    Smaller frames keep their native size: upscaling costs compute (a 176x144 clip at 640 is
    16x the pixels) and adds no detail, and the smallest anchor (16 px) still fits their faces.
    Shrinking is antialiased bilinear on the uint8 frames (torch's fast path, any device), so
    only the small result is ever converted to float.

    Padding on the right and bottom only keeps the origin fixed, so mapping back is a single
    division by ``scale``.

    Args:
        frames: uint8 ``(B, H, W, 3)`` RGB tensor, one size per batch, on any device.
        det_size: largest length of the long side in pixels.

    Returns:
        ``(batch, scale)``: float32 ``(B, 3, Hp, Wp)`` RGB 0..255 with zero padding on the
        frames' device, and the factor from original to resized pixels.

    Raises:
        ValueError: ``frames`` is not a uint8 ``(B, H, W, 3)`` tensor.
    """
    if frames.ndim != 4 or frames.shape[-1] != 3 or frames.dtype != torch.uint8:
        raise ValueError(f"frames must be uint8 (B, H, W, 3), got {frames.dtype} {tuple(frames.shape)}")
    batch, height, width, _ = frames.shape
    scale = min(1.0, det_size / max(height, width))
    new_w, new_h = round(width * scale), round(height * scale)
    x = frames.permute(0, 3, 1, 2)
    padded_h = math.ceil(new_h / SIZE_MULTIPLE) * SIZE_MULTIPLE
    padded_w = math.ceil(new_w / SIZE_MULTIPLE) * SIZE_MULTIPLE
    out = torch.zeros((batch, 3, padded_h, padded_w), dtype=torch.float32, device=frames.device)
    if (new_w, new_h) == (width, height):
        out[:, :, :new_h, :new_w] = x
    elif frames.device.type == "cpu":
        out[:, :, :new_h, :new_w] = F.interpolate(x, size=(new_h, new_w), mode="bilinear", antialias=True,
                                                  align_corners=False)
    else:
        # CUDA has no uint8 antialiased resize; half precision is exact for 0..255 and halves the
        # copy, and converting a few frames at a time bounds it (a 1080p batch of 32 as float32
        # would be 0.8 GB, as half 0.4 GB; in chunks it is RESIZE_CHUNK_BYTES).
        resize_in_chunks(x, out[:, :, :new_h, :new_w], torch.float16)
    return out, scale


#: Bytes of source frames converted to the resize's working precision at once (off the CPU).
RESIZE_CHUNK_BYTES = 64 << 20


def resize_in_chunks(frames: torch.Tensor, out: torch.Tensor, dtype: torch.dtype,
                     chunk_bytes: int = RESIZE_CHUNK_BYTES) -> None:
    """Antialiased bilinear resize of uint8 (B, 3, H, W) ``frames`` into ``out`` (B, 3, h, w), a
    few frames at a time in ``dtype``, so no full-batch copy in a wider type is ever made."""
    per_frame = frames[0].numel() * torch.finfo(dtype).bits // 8
    step = max(1, chunk_bytes // max(per_frame, 1))
    size = tuple(out.shape[2:])
    for start in range(0, len(frames), step):
        chunk = frames[start:start + step].to(dtype)
        out[start:start + step] = F.interpolate(chunk, size=size, mode="bilinear", antialias=True, align_corners=False)


@dataclass(frozen=True)
class Detections:
    """Faces found in one frame, highest score first, in pixels of the original frame.

    Attributes:
        boxes: float32 ``(n, 4)`` ``[x1, y1, x2, y2]``, clipped to the frame.
        landmarks: float32 ``(n, 5, 2)`` (x, y): left eye, right eye, nose, left mouth, right
            mouth as seen in the image; not clipped (a point may lie outside a cut-off face).
        scores: float32 ``(n,)`` face probability.
    """

    boxes: np.ndarray
    landmarks: np.ndarray
    scores: np.ndarray

    @classmethod
    def empty(cls) -> Detections:
        """No faces, with the same dtypes and trailing shapes as a non-empty result."""
        return cls(
            np.zeros((0, 4), np.float32), np.zeros((0, 5, 2), np.float32), np.zeros(0, np.float32)
        )

    def __len__(self) -> int:
        return len(self.scores)


class RetinaFaceDetector:
    """Batch face detector: letterbox, run the network, threshold, decode, NMS, map back.

    Args:
        runtime: takes float32 ``(B, 3, H, W)`` RGB 0..255 and returns ``"boxes" (B, A, 4)``,
            ``"landmarks" (B, A, 10)``, ``"scores" (B, A)`` tensors on its device.
        det_size: cap on the long side of the network input in pixels (larger frames are
            shrunk, smaller ones kept). At 640 a 1080p frame is shrunk 3x, so faces of about
            50 px and up are found (the smallest anchor is 16 px).
        threshold: minimum face probability; true faces score >= 0.99 on real footage while
            false ones mostly stay below 0.9.
        nms_iou: IoU above which overlapping detections are merged (0.4 as in the upstream
            graph).
        min_face: drop faces whose shorter box side is below this many original pixels.
        frame_runtime: the network for whole frames (:meth:`detect`) where it differs from
            ``runtime``: an int8 copy on a CPU (:mod:`engines.int8`). Inputs prepared by the
            caller (:meth:`detect_inputs`: the crops faces are re-found and aligned in) always
            go through ``runtime``.
    """

    def __init__(
        self,
        runtime: Runtime,
        det_size: int = 640,
        threshold: float = 0.9,
        nms_iou: float = 0.4,
        min_face: float = 0.0,
        frame_runtime: Runtime | None = None,
    ) -> None:
        self.runtime = runtime
        self.frame_runtime = frame_runtime
        self.det_size = det_size
        self.threshold = threshold
        self.nms_iou = nms_iou
        self.min_face = min_face

    def detect(self, frames: torch.Tensor, min_face: float | None = None,
               det_size: int | None = None) -> list[Detections]:
        """Detect faces in a batch of frames.

        Args:
            frames: uint8 ``(B, H, W, 3)`` RGB tensor on any device (letterboxed there; the
                network runs on its runtime's device and only candidates come back to the host).
            min_face: this batch's smallest face side in its pixels, instead of ``self.min_face``
                (frames decoded smaller than the video have fewer pixels per face).
            det_size: this call's cap on the network input's long side, instead of ``self.det_size``.

        Returns:
            One :class:`Detections` per frame, in pixels of the original frames.
        """
        inputs, scale = letterbox(frames, self.det_size if det_size is None else det_size)
        height, width = int(frames.shape[1]), int(frames.shape[2])
        return self.detect_inputs(inputs, scale, width, height, min_face, runtime=self.frame_runtime)

    def detect_inputs(self, inputs: torch.Tensor, scale: float, width: int, height: int,
                      min_face: float | None = None, threshold: float | None = None,
                      runtime: Runtime | None = None) -> list[Detections]:
        """:meth:`detect` on network inputs already prepared (letterboxed frames, or crops).

        Args:
            inputs: float32 ``(B, 3, Hp, Wp)`` RGB 0..255, sides multiples of 32.
            scale: network pixels per output pixel; results are divided by it.
            width, height: the output frame, to which boxes are clipped.
            threshold: this call's face score threshold, instead of ``self.threshold``.
            runtime: the network to run, instead of ``self.runtime``.
        """
        outputs = (runtime or self.runtime)(inputs)
        # Threshold where the outputs are (the GPU keeps them); only a handful come to the host.
        cut = self.threshold if threshold is None else threshold
        frame_idx, anchor_idx = (outputs["scores"] >= cut).nonzero(as_tuple=True)
        picked = (outputs["scores"][frame_idx, anchor_idx], outputs["boxes"][frame_idx, anchor_idx],
                  outputs["landmarks"][frame_idx, anchor_idx])
        # float32 before exp(): an FP16 engine's deltas would otherwise decode in half precision.
        scores, box_deltas, landmark_deltas = (t.float().cpu().numpy() for t in picked)
        frame_idx, anchor_idx = frame_idx.cpu().numpy(), anchor_idx.cpu().numpy()
        batch, _, padded_h, padded_w = inputs.shape
        # All candidates of the whole batch are decoded in one vectorised call.
        anchors = anchor_grid(padded_h, padded_w)[anchor_idx]
        to_pixels = np.array([padded_w, padded_h], np.float32) / scale
        boxes = decode_boxes(box_deltas, anchors)
        boxes = (boxes.reshape(-1, 2, 2) * to_pixels).reshape(-1, 4)
        landmarks = decode_landmarks(landmark_deltas, anchors) * to_pixels
        smallest = self.min_face if min_face is None else min_face
        return [
            self._frame_detections(boxes[frame_idx == b], landmarks[frame_idx == b], scores[frame_idx == b],
                                   width, height, smallest)
            for b in range(batch)
        ]

    def _frame_detections(
        self,
        boxes: np.ndarray,
        landmarks: np.ndarray,
        scores: np.ndarray,
        width: int,
        height: int,
        min_face: float,
    ) -> Detections:
        if not len(scores):
            return Detections.empty()
        keep = nms(boxes, scores, self.nms_iou)
        boxes = np.clip(boxes[keep], 0, [width, height, width, height]).astype(np.float32)
        sides = np.minimum(boxes[:, 2] - boxes[:, 0], boxes[:, 3] - boxes[:, 1])
        big_enough = sides >= min_face
        return Detections(
            boxes[big_enough],
            landmarks[keep][big_enough].astype(np.float32),
            scores[keep][big_enough].astype(np.float32),
        )

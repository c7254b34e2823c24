"""Face crops: a 5-point similarity transform onto the 112x112 ArcFace template, and the one warp
that cuts every crop the project needs (aligned faces for the scorer, square regions around a
tracked face for the detector), on the frames' own device.

Landmark order (image left to right as seen): left eye, right eye, nose tip, left mouth
corner, right mouth corner — the order RetinaFace emits. A pure array function with no
knowledge of videos or runs, so training and annotation share it.
"""

from __future__ import annotations

from dataclasses import dataclass

import cv2
import numpy as np
import torch
import torch.nn.functional as F

CROP_SIZE = 112
#: The ArcFace 112x112 five-point template (insightface), in pixels of the crop.
TEMPLATE_112 = np.array(
    [[38.2946, 51.6963], [73.5318, 51.5014], [56.0252, 71.7366], [41.5493, 92.3655], [70.7299, 92.2041]],
    dtype=np.float32,
)


def similarity_matrices(landmarks: np.ndarray, template: np.ndarray = TEMPLATE_112) -> np.ndarray:
    """Least-squares similarity transforms (Umeyama, no reflection) mapping landmarks → template.

    Args:
        landmarks: float (N, 5, 2) source points in frame pixels.
        template: float (5, 2) destination points.

    Returns:
        float32 (N, 2, 3) affine matrices, frame pixels → crop pixels (``cv2.warpAffine``'s).
    """
    src = landmarks.astype(np.float64)
    dst = template.astype(np.float64)
    src_mean = src.mean(axis=1, keepdims=True)
    dst_mean = dst.mean(axis=0)
    src_c = src - src_mean
    dst_c = dst - dst_mean
    # Closed form for 2-D similarity: with complex numbers z = x + iy the optimal map is
    # w = a * z + b, a = sum(conj(z_c) * w_c) / sum(|z_c|^2); no SVD needed, vectorised over N.
    z = src_c[..., 0] + 1j * src_c[..., 1]
    w = dst_c[:, 0] + 1j * dst_c[:, 1]
    a = (np.conj(z) * w).sum(axis=1) / np.maximum((np.abs(z) ** 2).sum(axis=1), 1e-12)
    cos, sin = a.real, a.imag
    matrices = np.empty((len(src), 2, 3), dtype=np.float64)
    matrices[:, 0, 0], matrices[:, 0, 1] = cos, -sin
    matrices[:, 1, 0], matrices[:, 1, 1] = sin, cos
    rotated_mean = np.einsum("nij,nj->ni", matrices[:, :, :2], src_mean[:, 0])
    matrices[:, :, 2] = dst_mean - rotated_mean
    return matrices.astype(np.float32)


def square_matrices(centres: np.ndarray, sides: np.ndarray, size: int) -> np.ndarray:
    """Matrices (frame → crop) that cut axis-aligned squares (centre, side) into size x size crops.

    Pixel centres map to pixel centres, so a square covering pixels [x0, x0 + side) fills the
    crop exactly.
    """
    scale = size / np.asarray(sides, np.float64)
    matrices = np.zeros((len(scale), 2, 3), np.float64)
    matrices[:, 0, 0] = matrices[:, 1, 1] = scale
    corner = np.asarray(centres, np.float64) - np.asarray(sides, np.float64)[:, None] / 2
    matrices[:, :, 2] = (0.5 - corner) * scale[:, None] - 0.5
    return matrices.astype(np.float32)


def invert(matrices: np.ndarray) -> np.ndarray:
    """Inverse of each 2x3 affine matrix (crop pixels → frame pixels)."""
    m = matrices.astype(np.float64)
    linear = np.linalg.inv(m[:, :, :2])
    offset = -np.einsum("nij,nj->ni", linear, m[:, :, 2])
    return np.concatenate([linear, offset[:, :, None]], axis=2).astype(np.float32)


def apply(matrices: np.ndarray, points: np.ndarray) -> np.ndarray:
    """Map (N, K, 2) points through (N, 2, 3) matrices."""
    return np.einsum("nij,nkj->nki", matrices[:, :, :2], points) + matrices[:, None, :, 2]


def warp(frames: torch.Tensor, frame_of_crop: np.ndarray, matrices: np.ndarray, size: int) -> torch.Tensor:
    """Crops of ``frames`` through affine ``matrices`` (frame → crop), as the networks eat them.

    One rule on every device: bilinear sampling at the inverse-mapped crop pixel centres, zero
    outside the frame, no prefilter, the rule of ``cv2.warpAffine(INTER_LINEAR, BORDER_CONSTANT)``.
    Frames in host memory go through OpenCV itself; frames on a GPU through ``grid_sample`` over
    the region under each crop (:func:`_warp_on_device`), which samples the same points: the two
    agree to OpenCV's rounding of its result to whole levels (tested). OpenCV reads only the
    pixels its taps need, in fixed point; the torch path on a CPU converted each crop's region to
    float first and cost 0.43 against 0.06 ms a 128 px crop, 0.8-0.9 ms inside the pipeline
    (every tracked face is warped twice a frame: re-found, then aligned).

    Args:
        frames: uint8 (B, H, W, 3) RGB on any device.
        frame_of_crop: int (N,) index into ``frames`` of each crop.
        matrices: float (N, 2, 3) frame pixels → crop pixels.
        size: crop side in pixels.

    Returns:
        float32 (N, 3, size, size) RGB 0..255 on the frames' device.
    """
    if frames.device.type == "cpu":
        return _warp_in_memory(frames, frame_of_crop, matrices, size)
    return _warp_on_device(frames, frame_of_crop, matrices, size)


def _warp_in_memory(frames: torch.Tensor, frame_of_crop: np.ndarray, matrices: np.ndarray, size: int) -> torch.Tensor:
    """:func:`warp` of frames in host memory, one ``cv2.warpAffine`` a crop (serial at this size:
    OpenCV splits a warp over threads only from 65,536 output pixels)."""
    images = frames.numpy()
    matrices = np.asarray(matrices, np.float32).reshape(-1, 2, 3)
    out = np.empty((len(matrices), size, size, 3), images.dtype)
    for i, owner in enumerate(np.asarray(frame_of_crop).tolist()):
        cv2.warpAffine(np.ascontiguousarray(images[owner]), matrices[i], (size, size), dst=out[i],
                       flags=cv2.INTER_LINEAR, borderMode=cv2.BORDER_CONSTANT, borderValue=0)
    return torch.from_numpy(out).permute(0, 3, 1, 2).contiguous().float()


def _warp_on_device(frames: torch.Tensor, frame_of_crop: np.ndarray, matrices: np.ndarray, size: int) -> torch.Tensor:
    """:func:`warp` with torch ops on the frames' device: each crop's frame region converted to
    float, then one ``grid_sample``, so whole frames are never converted."""
    n = len(frame_of_crop)
    out = torch.zeros((n, 3, size, size), dtype=torch.float32, device=frames.device)
    if n == 0:
        return out
    _, height, width, _ = frames.shape
    inverse = invert(np.asarray(matrices, np.float32)).astype(np.float64)  # crop → frame
    # The frame region each crop reads (its corners' bounding box, one pixel wider for the taps).
    corners = np.array([[0, 0], [size - 1, 0], [0, size - 1], [size - 1, size - 1]], np.float64)
    mapped = apply(inverse, np.broadcast_to(corners, (n, 4, 2)))
    low = np.floor(mapped.min(axis=1)).astype(int) - 1
    high = np.ceil(mapped.max(axis=1)).astype(int) + 2
    x0, y0 = np.clip(low[:, 0], 0, width), np.clip(low[:, 1], 0, height)
    x1, y1 = np.clip(high[:, 0], 0, width), np.clip(high[:, 1], 0, height)
    # affine_grid's theta: crop coordinates normalised to [-1, 1] → region coordinates likewise
    # (pixel centres, align_corners=False): u = size/2 * un + (size-1)/2, and a frame coordinate x
    # is pixel x - r0 of the R the region spans: rn = (2 (x - r0) + 1) / R - 1.
    extent = np.stack([np.maximum(x1 - x0, 1), np.maximum(y1 - y0, 1)], axis=1).astype(np.float64)
    origin = np.stack([x0, y0], axis=1).astype(np.float64)
    linear = inverse[:, :, :2] * (size / 2)
    shift = inverse[:, :, :2].sum(axis=2) * (size - 1) / 2 + inverse[:, :, 2] - origin
    theta = np.concatenate([linear, shift[:, :, None]], axis=2) * (2 / extent)[:, :, None]
    theta[:, :, 2] += 1 / extent - 1
    grids = _affine_grids(torch.from_numpy(theta.astype(np.float32)).to(frames.device), size)
    owners, bounds = np.asarray(frame_of_crop).tolist(), np.stack([x0, x1, y0, y1], axis=1).tolist()
    for i, (owner, (left, right, top, bottom)) in enumerate(zip(owners, bounds)):
        if right > left and bottom > top:  # a crop entirely off the frame stays zero
            region = frames[owner, top:bottom, left:right].float().permute(2, 0, 1)[None]
            out[i] = F.grid_sample(region, grids[i:i + 1], mode="bilinear", padding_mode="zeros", align_corners=False)[0]
    return out


def _affine_grids(theta: torch.Tensor, size: int) -> torch.Tensor:
    """``F.affine_grid(theta, (n, 3, size, size), align_corners=False)`` by broadcasting: the same
    sampling points (to float32 rounding) at a fraction of its cost, and a warp runs once per
    tracked face per frame. Each coordinate is a row term plus a column term plus an offset, so
    the only full-size operations are one sum and one add (22 vs 116 us for a 128 px crop with
    both coordinates computed in full and stacked, with bit-identical points); grid_sample reads
    the permuted (not copied) result as fast as a contiguous one."""
    base = (torch.arange(size, dtype=theta.dtype, device=theta.device) * 2 + 1) / size - 1  # pixel centres
    along_x = theta[:, :, 0, None] * base  # (n, 2, size): each coordinate's term from the column
    along_y = theta[:, :, 1, None] * base  # ... and from the row
    grid = along_x[:, :, None, :] + along_y[:, :, :, None]  # (n, 2, rows, columns)
    grid += theta[:, :, 2, None, None]
    return grid.permute(0, 2, 3, 1)


def scaled_template(size: int = CROP_SIZE, margin: float = 1.0) -> np.ndarray:
    """TEMPLATE_112 for a ``size`` x ``size`` crop showing ``margin`` times the 112 crop's extent.

    The 112 crop's extent, pixel edges [0, 112), is scaled about its centre by ``size / (112 *
    margin)``, so pixel centres stay pixel centres at any size, and margin 1.25 keeps the face
    centred with 25 % more context on each axis. (112, 1.0) returns the template itself, so our
    own crops stay bit-identical.
    """
    if size == CROP_SIZE and margin == 1.0:
        return TEMPLATE_112
    scale = size / (CROP_SIZE * margin)
    return ((TEMPLATE_112.astype(np.float64) + 0.5 - CROP_SIZE / 2) * scale + size / 2 - 0.5).astype(np.float32)


@dataclass(frozen=True)
class CropGeometry:
    """The aligned crop a scorer eats: its side and how much context around the template face.

    A scorer declares one and ``AlignFaces`` cuts it, so a model with another input size gets
    its crop straight from the frame through the same :func:`warp` (one interpolation).
    """

    size: int = CROP_SIZE
    margin: float = 1.0

    def crops(self, frames: torch.Tensor, frame_of_face: np.ndarray, landmarks: np.ndarray) -> torch.Tensor:
        """float32 (N, 3, size, size) RGB 0..255 crops of every face, on the frames' device."""
        points = np.asarray(landmarks, np.float32).reshape(-1, 5, 2)
        matrices = similarity_matrices(points, scaled_template(self.size, self.margin))
        return warp(frames, frame_of_face, matrices, self.size)


def align_faces(frames: torch.Tensor, frame_of_face: np.ndarray, landmarks: np.ndarray) -> torch.Tensor:
    """Aligned 112x112 crops of every face (float32 (N, 3, 112, 112) RGB 0..255, frames' device)."""
    return CropGeometry().crops(frames, frame_of_face, landmarks)

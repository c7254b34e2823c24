"""Face alignment: a 5-point similarity transform onto the 112x112 ArcFace template.

Landmark order (image left to right as seen): left eye, right eye, nose tip, left mouth
corner, right mouth corner — the order RetinaFace emits. Crops are what every scorer eats:
112x112 RGB, and the 2x3 matrices are returned so landmarks can be mapped back.
"""

from __future__ import annotations

import cv2
import numpy as np

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
        float32 (N, 2, 3) affine matrices for ``cv2.warpAffine``.
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


def warp_crops(frames: np.ndarray, frame_of_face: np.ndarray, landmarks: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Aligned crops of every face in a batch of frames.

    Args:
        frames: uint8 (B, H, W, 3) RGB.
        frame_of_face: int (N,) index into ``frames`` of each face.
        landmarks: float (N, 5, 2) in frame pixels.

    Returns:
        (crops uint8 (N, 112, 112, 3) RGB, matrices float32 (N, 2, 3)).
    """
    matrices = similarity_matrices(landmarks)
    crops = np.empty((len(matrices), CROP_SIZE, CROP_SIZE, 3), dtype=np.uint8)
    for i, (frame_id, matrix) in enumerate(zip(frame_of_face, matrices)):
        # One warp per face is C++ work of ~12k pixels; the loop itself is per face, not per pixel.
        cv2.warpAffine(frames[frame_id], matrix, (CROP_SIZE, CROP_SIZE), dst=crops[i],
                       flags=cv2.INTER_LINEAR, borderMode=cv2.BORDER_CONSTANT)
    return crops, matrices


def warp_crops_tensor(frames, frame_of_face: np.ndarray, landmarks: np.ndarray):
    """:func:`warp_crops` on the frames' own device (the GPU path), as scorer input.

    Bilinear sampling at the inverse-mapped crop pixel centres with zero outside the frame,
    the same rule as ``cv2.warpAffine(INTER_LINEAR, BORDER_CONSTANT)``, done as four gathers
    over all faces at once instead of one warp per face.

    Args:
        frames: torch uint8 ``(B, H, W, 3)`` RGB.
        frame_of_face: int ``(N,)``; landmarks: float ``(N, 5, 2)`` frame pixels.

    Returns:
        torch float32 ``(N, 3, 112, 112)`` RGB 0..255 on the frames' device.
    """
    import torch

    device = frames.device
    batch, height, width, _ = frames.shape
    n = len(frame_of_face)
    if n == 0:
        return torch.zeros((0, 3, CROP_SIZE, CROP_SIZE), dtype=torch.float32, device=device)
    forward = similarity_matrices(landmarks).astype(np.float64)
    # Invert each 2x3 similarity: crop pixel -> frame pixel.
    linear_inv = np.linalg.inv(forward[:, :, :2])
    offset_inv = -np.einsum("nij,nj->ni", linear_inv, forward[:, :, 2])
    inverse = torch.from_numpy(np.concatenate([linear_inv, offset_inv[:, :, None]], axis=2)).float().to(device)
    axis = torch.arange(CROP_SIZE, dtype=torch.float32, device=device)
    v, u = torch.meshgrid(axis, axis, indexing="ij")
    grid = torch.stack([u.reshape(-1), v.reshape(-1), torch.ones(CROP_SIZE * CROP_SIZE, device=device)])
    source = inverse @ grid  # (N, 2, 112*112) frame x, y
    x, y = source[:, 0], source[:, 1]
    x0, y0 = x.floor(), y.floor()
    wx, wy = x - x0, y - y0
    flat = frames.reshape(batch * height * width, 3).float()
    base = torch.from_numpy(np.asarray(frame_of_face, np.int64)).to(device)[:, None] * (height * width)
    out = torch.zeros((n, CROP_SIZE * CROP_SIZE, 3), dtype=torch.float32, device=device)
    for dx, dy, weight in ((0, 0, (1 - wx) * (1 - wy)), (1, 0, wx * (1 - wy)), (0, 1, (1 - wx) * wy), (1, 1, wx * wy)):
        xi, yi = x0 + dx, y0 + dy
        inside = (xi >= 0) & (xi < width) & (yi >= 0) & (yi < height)
        index = base + yi.clamp(0, height - 1).long() * width + xi.clamp(0, width - 1).long()
        out += flat[index] * (weight * inside)[..., None]
    return out.reshape(n, CROP_SIZE, CROP_SIZE, 3).permute(0, 3, 1, 2).contiguous()

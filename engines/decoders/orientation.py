"""How a stored frame is shown: the display matrix's quarter turns and mirror images.

Phones store frames as the sensor sees them and put a display matrix (ISO 14496-12 ``tkhd``,
FFmpeg's DISPLAYMATRIX side data) in the file saying how to show them. Most matrices are a turn
(a phone held upright: 90 degrees clockwise), but some cameras and apps mirror front-camera
video with the matrix instead of the pixels, and a turn-only reading of a mirror (FFmpeg calls a
horizontal flip "-180 degrees") would show the frame upside down: faces in it are then missed.

The matrix maps stored pixel ``(x, y)`` to shown ``(a x + c y, b x + d y)`` (plus a shift), with
``a b c d`` its 2x2 part; every matrix a camera writes is one of the eight turns and mirrors of
the square, which is three switches here: swap the axes, then reverse rows and/or columns.
Other angles (a tripod's 5 degrees) are rounded to the nearest quarter turn, as before.
"""

from __future__ import annotations

import math
import struct
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    import av
    import torch


@dataclass(frozen=True)
class Orientation:
    """Stored → shown: transpose (swap rows and columns) first, then reverse rows, then columns."""

    transpose: bool = False  # the shown frame's width is the stored frame's height
    flip_rows: bool = False
    flip_columns: bool = False

    def show(self, rgb: np.ndarray) -> np.ndarray:
        """``rgb`` (H, W, C) as shown: a view, no copy."""
        shown = rgb.transpose(1, 0, 2) if self.transpose else rgb
        return shown[::-1 if self.flip_rows else 1, ::-1 if self.flip_columns else 1]

    def show_batch(self, frames: torch.Tensor) -> torch.Tensor:
        """(B, H, W, C) frames on any device, as shown (contiguous)."""
        import torch

        shown = frames.transpose(1, 2) if self.transpose else frames
        dims = [d for d, flip in ((1, self.flip_rows), (2, self.flip_columns)) if flip]
        return (torch.flip(shown, dims) if dims else shown).contiguous()

    def described(self) -> tuple[int, bool]:
        """(clockwise degrees, mirrored): the same change as a mirror image (columns reversed)
        when ``mirrored``, then a clockwise turn; for the file's metadata."""
        probe = np.arange(6).reshape(2, 3, 1)
        target = self.show(probe)
        for mirrored in (False, True):
            start = probe[:, ::-1] if mirrored else probe
            for quarter in range(4):
                if np.array_equal(np.rot90(start, -quarter), target):
                    return quarter * 90, mirrored
        raise AssertionError("the eight orientations are covered")  # unreachable


UPRIGHT = Orientation()


def orientation(frame: av.VideoFrame) -> Orientation:
    """How ``frame`` is shown, from its display matrix (upright without one)."""
    matrix = _display_matrix(frame)
    if matrix is None:
        return UPRIGHT
    return from_matrix(*matrix)


def from_matrix(a: float, b: float, c: float, d: float) -> Orientation:
    """The turn or mirror of the display matrix's 2x2 part (any scale; rounded to quarter turns)."""
    angle = math.degrees(math.atan2(b, a))  # where the stored x axis points when shown
    quarter = round(angle / 90) % 4
    axis_x = ((1, 0), (0, 1), (-1, 0), (0, -1))[quarter]  # (x', y') of a stored unit step in x
    # The stored y axis goes 90 degrees on from x (a turn) or back (a mirror): the determinant.
    mirrored = a * d - b * c < 0
    axis_y = (axis_x[1], -axis_x[0]) if mirrored else (-axis_x[1], axis_x[0])
    if axis_x[0]:  # x stays horizontal: no transpose
        return Orientation(False, flip_rows=axis_y[1] < 0, flip_columns=axis_x[0] < 0)
    return Orientation(True, flip_rows=axis_x[1] < 0, flip_columns=axis_y[0] < 0)


def _display_matrix(frame: av.VideoFrame) -> tuple[float, float, float, float] | None:
    from av.sidedata.sidedata import Type

    data = frame.side_data.get(Type.DISPLAYMATRIX)  # a Mapping (iterating it gives PyAV 19 the keys)
    if data is None:
        return None
    values = struct.unpack("=9i", bytes(data))  # 16.16 fixed point, FFmpeg's native int32
    return values[0], values[1], values[3], values[4]

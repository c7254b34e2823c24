"""Video decoders. Every backend yields the same :class:`FrameBatch`; sampling is shared.

Frames are uint8 RGB, NHWC; ``frame_index`` is the 0-based index of the frame in decode
(presentation) order; ``pts_s`` comes from the container's timestamps, so variable-frame-rate
video gets true times rather than ``index / fps``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

VIDEO_EXTENSIONS: frozenset[str] = frozenset({
    ".mp4", ".m4v", ".mov", ".mkv", ".webm", ".avi", ".mpg", ".mpeg", ".ts", ".mts", ".m2ts",
    ".flv", ".wmv", ".3gp", ".ogv", ".y4m",
})


class DecodeError(RuntimeError):
    """A video cannot be opened or decoded; the message names the file and the reason."""


@dataclass(frozen=True)
class FrameBatch:
    """Sampled frames of one video, in presentation order."""

    frames: np.ndarray  # uint8 (B, H, W, 3) RGB (or a CUDA tensor from the DALI decoder)
    frame_index: np.ndarray  # int64 (B,)
    pts_s: np.ndarray  # float64 (B,)

    def __len__(self) -> int:
        return len(self.frame_index)


@dataclass(frozen=True)
class Sampling:
    """Which decoded frames to keep: every frame, every n-th, or about ``fps`` per second.

    ``fps`` keeps the first frame at or after each tick ``t0 + k / fps`` (``t0`` = first
    timestamp), which stays right on variable frame rate; a source slower than ``fps`` simply
    keeps every frame.
    """

    every_n: int = 1
    fps: float | None = None

    def __post_init__(self) -> None:
        if self.every_n < 1:
            raise ValueError(f"every_n must be >= 1, got {self.every_n}")
        if self.fps is not None and not (self.fps > 0 and math.isfinite(self.fps)):
            raise ValueError(f"sample fps must be a positive number, got {self.fps}")

    def selector(self) -> "FrameSelector":
        return FrameSelector(self)


class FrameSelector:
    """Per-video state of a :class:`Sampling`: decides frame by frame, before conversion."""

    _EPS = 1e-6  # seconds; absorbs rounding in rational timestamps such as 1001/30000

    def __init__(self, sampling: Sampling) -> None:
        self.sampling = sampling
        self._t0: float | None = None
        self._next_tick = -math.inf

    def keep(self, frame_index: int, pts_s: float) -> bool:
        fps = self.sampling.fps
        if fps is None:
            return frame_index % self.sampling.every_n == 0
        if self._t0 is None:
            self._t0 = pts_s
        if pts_s + self._EPS < self._next_tick:
            return False
        elapsed_ticks = math.floor((pts_s - self._t0) * fps + self._EPS)
        self._next_tick = self._t0 + (elapsed_ticks + 1) / fps
        return True

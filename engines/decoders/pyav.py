"""The CPU decoder: PyAV (FFmpeg), sequential decode with frame threading, no seeking.

Frames that sampling drops are never converted to RGB, which is most of a decoder's cost
after the bitstream itself.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import av
import numpy as np

from engines.decoders import DecodeError, FrameBatch, Sampling


def decode(path: str | Path, sampling: Sampling, batch_size: int) -> Iterator[FrameBatch]:
    """Yield sampled frames of the first video stream in batches of ``batch_size``.

    Raises:
        DecodeError: the file cannot be opened, has no video stream, or fails mid-stream.
    """
    selector = sampling.selector()
    try:
        container = av.open(str(path))
    except (av.error.FFmpegError, OSError) as exc:
        raise DecodeError(f"{path}: cannot open ({_reason(exc)})") from None
    with container:
        if not container.streams.video:
            raise DecodeError(f"{path}: no video stream")
        stream = container.streams.video[0]
        # Frame threading decodes several frames at once; 'AUTO' adds slice threading.
        stream.thread_type = "AUTO"
        fallback_rate = float(stream.average_rate or stream.guessed_rate or 25)
        frames: list[np.ndarray] = []
        indices: list[int] = []
        times: list[float] = []
        try:
            for index, frame in enumerate(container.decode(stream)):
                pts_s = frame.time if frame.time is not None else index / fallback_rate
                if not selector.keep(index, pts_s):
                    continue
                frames.append(frame.to_ndarray(format="rgb24"))
                indices.append(index)
                times.append(pts_s)
                if len(frames) == batch_size:
                    yield _batch(frames, indices, times)
                    frames, indices, times = [], [], []
        except av.error.FFmpegError as exc:
            raise DecodeError(f"{path}: decode failed after {len(indices)} frames ({_reason(exc)})") from None
        if frames:
            yield _batch(frames, indices, times)


def _batch(frames: list[np.ndarray], indices: list[int], times: list[float]) -> FrameBatch:
    return FrameBatch(
        frames=np.stack(frames),
        frame_index=np.asarray(indices, dtype=np.int64),
        pts_s=np.asarray(times, dtype=np.float64),
    )


def _reason(exc: Exception) -> str:
    return getattr(exc, "strerror", None) or str(exc).split(":")[-1].strip() or type(exc).__name__


def probe(path: str | Path) -> tuple[int, int, float]:
    """(width, height, average fps) of the first video stream, for benchmarks and reports."""
    with av.open(str(path)) as container:
        stream = container.streams.video[0]
        return stream.width, stream.height, float(stream.average_rate or 0)

"""The GPU decoder: NVIDIA DALI's video reader on NVDEC, frames left in GPU memory.

Yields the same :class:`~engines.decoders.FrameBatch` as the PyAV decoder, except that
``frames`` is a CUDA ``torch.uint8`` tensor (B, H, W, 3) RGB on ``cuda:<device_id>``, so
letterboxing and detection read it without a host round trip.

What DALI can and cannot do here (checked against DALI 2.4):

- The reader is ``fn.experimental.readers.video``. It is the only DALI video reader with a CPU
  backend (the older ``fn.readers.video`` is GPU-only), so one graph serves the GPU path and
  the CPU test path; it also returns a frame number per frame (``enable_frame_num="sequence"``)
  instead of one per sequence, and a timestamp per frame.
- Variable frame rate: timestamps are each frame's own presentation time in seconds, so VFR
  clips get true times (a VP9 clip with irregular gaps reads back exactly as PyAV reads it).
  The older ``fn.readers.video`` "only supports constant frame rate videos" and checks for
  VFR input (``skip_vfr_check`` turns the check off, at the risk of wrong frames).
- Codecs: the GPU backend decodes H.264, HEVC, AV1, MPEG-4, VP8, VP9 and MJPEG; the CPU
  backend only VP8, VP9 and MJPEG. Anything else (ProRes, MPEG-2, ...) belongs to PyAV.
- ``every_n`` becomes the reader's ``stride``: skipped frames are still decoded (inter-coded
  streams need them as references) but are never returned, so they cost no output memory and
  no copy. ``fps`` sampling cannot be expressed as a stride (the gap between kept frames varies,
  and on VFR input it is not a whole number of frames), so the reader returns every frame and
  the shared :class:`~engines.decoders.FrameSelector` picks them, exactly as PyAV's path does.
- No seeking by time and no partial decode: one pipeline reads one file front to back.
- A file DALI cannot open is dropped by its reader with only a log line, and the build then
  fails with "number of input samples: 0"; the file and codec are therefore checked here
  first, so the error names the real reason.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any, Literal

import av
import numpy as np
import torch

from engines.decoders import DecodeError, DecodeReport, FrameBatch, Sampling

log = logging.getLogger(__name__)

DaliDevice = Literal["cpu", "gpu"]

INSTALL_HINT = "pip install nvidia-dali-cuda120"
#: Codecs (FFmpeg names) each reader backend decodes, from DALI 2.4's reader documentation.
SUPPORTED_CODECS: dict[DaliDevice, frozenset[str]] = {
    "gpu": frozenset({"h264", "hevc", "av1", "mpeg4", "vp8", "vp9", "mjpeg"}),
    "cpu": frozenset({"vp8", "vp9", "mjpeg"}),
}
_READER = "reader"
# Pipeline CPU threads: the graph has no CPU operator but the reader, which decodes one
# sequence at a time from one file, so a second thread only covers demuxing and bookkeeping.
_NUM_THREADS = 2
# Iterations DALI runs ahead of the consumer. Each queued iteration holds one sequence of
# batch_size frames: 64 frames of 1920x1080 RGB are 64 * 1920 * 1080 * 3 B = 398 MB of GPU
# memory, so depth 2 costs ~0.8 GB per decoder to overlap decoding the next sequence with
# inference on this one. (The reader's ``initial_fill`` is the shuffle buffer: it is left at
# its default because ``random_shuffle`` stays False, which makes DALI ignore it; with
# shuffling it would buffer 1024 such sequences, ~400 GB.)
_PREFETCH_DEPTH = 2


def video_graph(filename: str, device: DaliDevice, sequence_length: int, stride: int) -> tuple[Any, Any, Any]:
    """The DALI graph: one reader, one file, sequences of ``sequence_length`` frames.

    Meant to be wrapped by ``nvidia.dali.pipeline_def`` (done lazily in :func:`build_pipeline`,
    so that importing this module does not need DALI); ``batch_size``, ``device_id`` and
    ``num_threads`` are given only when the pipeline is built.

    Sequences tile the video (``step = sequence_length * stride``), so every kept frame is read
    exactly once. ``pad_mode="constant"`` keeps the tail: without it the last, shorter sequence
    is silently dropped; padded slots carry frame number -1. ``pad_last_batch`` is not needed
    because the pipeline's batch is one sequence, and the ``file_list`` rounding options (the
    older reader's ``file_list_include_preceding_frame``) only apply to time ranges, while this
    graph reads whole files.

    Returns:
        (frames (1, F, H, W, 3) uint8 RGB, frame numbers (1, F) int, timestamps (1, F) seconds).
    """
    from nvidia.dali import fn

    frames, frame_num, timestamps = fn.experimental.readers.video(
        device=device,
        filenames=[filename],
        sequence_length=sequence_length,
        stride=stride,
        step=sequence_length * stride,
        pad_mode="constant",
        enable_frame_num="sequence",
        enable_timestamps=True,
        random_shuffle=False,
        name=_READER,
    )
    return frames, frame_num, timestamps


def build_pipeline(path: Path, device: DaliDevice, sequence_length: int, stride: int, device_id: int | None) -> Any:
    """Build (but do not run) the DALI pipeline for one file.

    Raises:
        RuntimeError: DALI is not installed.
        DecodeError: DALI cannot build a reader for this file.
    """
    try:
        from nvidia.dali import pipeline_def
    except ImportError:
        raise RuntimeError(f"the DALI decoder needs NVIDIA DALI: {INSTALL_HINT}") from None
    pipe = pipeline_def(video_graph)(
        filename=str(path),
        device=device,
        sequence_length=sequence_length,
        stride=stride,
        batch_size=1,  # one sequence per iteration; the sequence is the FrameBatch
        num_threads=_NUM_THREADS,
        device_id=device_id,
        prefetch_queue_depth=_PREFETCH_DEPTH,
        # The dynamic executor allocates every output afresh and never reuses a buffer the
        # caller still holds, which is what makes the zero-copy DLPack hand-off below safe.
        exec_dynamic=True,
    )
    try:
        pipe.build()
    except RuntimeError as exc:
        raise DecodeError(f"{path}: DALI cannot read it ({_dali_reason(exc)})") from None
    return pipe


def decode(path: str | Path, sampling: Sampling, batch_size: int, device_id: int = 0, *,
           report: DecodeReport | None = None) -> Iterator[FrameBatch]:
    """Yield sampled frames of the first video stream as CUDA tensors, ``batch_size`` at a time.

    Args:
        path: the video file.
        sampling: which frames to keep (shared semantics with the PyAV decoder).
        batch_size: frames per yielded batch (the last one may be shorter).
        device_id: the CUDA device whose NVDEC decodes and whose memory holds the frames.
        report: receives the display rotation applied and the size (DALI reports no damage:
            a file it cannot decode fails as a whole).

    Raises:
        RuntimeError: DALI is not installed or no CUDA device is visible.
        DecodeError: the file cannot be opened, its codec is not supported, or decoding fails.
    """
    return _decode(Path(path), sampling, batch_size, "gpu", device_id, report or DecodeReport())


def decode_cpu(path: str | Path, sampling: Sampling, batch_size: int, *,
               report: DecodeReport | None = None) -> Iterator[FrameBatch]:
    """The same graph on DALI's CPU backend, yielding numpy frames; for tests without a GPU.

    DALI's CPU reader decodes only VP8, VP9 and MJPEG, so production CPU decoding is PyAV's.
    """
    return _decode(Path(path), sampling, batch_size, "cpu", None, report or DecodeReport())


def _decode(
    path: Path, sampling: Sampling, batch_size: int, device: DaliDevice, device_id: int | None,
    report: DecodeReport,
) -> Iterator[FrameBatch]:
    # A generator, like PyAV's decode: every error surfaces on the first next(), in the
    # caller's per-video try block, whichever backend it runs.
    if device == "gpu" and not torch.cuda.is_available():
        raise RuntimeError("the DALI decoder needs a CUDA device; use the PyAV decoder on a CPU")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    turns = _check_codec(path, device, report)
    stride = sampling.every_n if sampling.fps is None else 1
    pipe = build_pipeline(path.resolve(), device, batch_size, stride, device_id)
    log.debug("%s: DALI %s reader, %d sequences of %d frames, stride %d",
              path, device, pipe.epoch_size(_READER), batch_size, stride)
    for batch in _rebatch(_sequences(pipe, path, sampling), batch_size):
        report.frames_decoded += len(batch)
        yield _upright(batch, turns)


def _upright(batch: FrameBatch, turns: int) -> FrameBatch:
    """Turn frames as the display matrix says (DALI's reader returns them as stored)."""
    if not turns:
        return batch
    return FrameBatch(torch.rot90(batch.frames, turns, dims=(1, 2)).contiguous(), batch.frame_index, batch.pts_s, batch.scale)


def _sequences(pipe: Any, path: Path, sampling: Sampling) -> Iterator[FrameBatch]:
    """One batch per DALI iteration: the kept frames of one sequence (possibly none)."""
    selector = sampling.selector()
    for _ in range(pipe.epoch_size(_READER)):
        try:
            frames, frame_num, timestamps = pipe.run()
        except RuntimeError as exc:
            raise DecodeError(f"{path}: DALI decode failed ({_dali_reason(exc)})") from None
        index = _host_array(frame_num).astype(np.int64)
        pts_s = _host_array(timestamps).astype(np.float64)
        if sampling.fps is None:
            # The stride already dropped the other frames; only the tail's padding (-1) goes.
            keep = index >= 0
        else:
            # The selector's state carries across sequences, so this loop is sequential, but it
            # runs over F scalars per sequence; the frames themselves are gathered in one op.
            keep = np.fromiter(
                (i >= 0 and selector.keep(int(i), float(t)) for i, t in zip(index, pts_s)),
                dtype=bool, count=len(index),
            )
        yield FrameBatch(_select_frames(frames, keep), index[keep], pts_s[keep])


def _host_array(tensor_list: Any) -> np.ndarray:
    """A small per-frame output (frame numbers or timestamps) of the one sample, on the host."""
    return np.array(tensor_list.as_cpu().as_tensor()).reshape(-1)


def _select_frames(tensor_list: Any, keep: np.ndarray) -> torch.Tensor:
    """The kept frames of the one sequence: a CUDA tensor for the GPU reader, a host one for the CPU.

    DLPack hands DALI's buffer to torch without a copy and orders torch's current stream after
    DALI's; only the gather of a partial selection copies, and only the kept frames.
    """
    frames = torch.from_dlpack(tensor_list.as_tensor())[0]
    if not keep.all():
        frames = frames[torch.from_numpy(np.flatnonzero(keep)).to(frames.device)]
    return frames


def _rebatch(chunks: Iterable[FrameBatch], batch_size: int) -> Iterator[FrameBatch]:
    """Regroup per-sequence selections into batches of exactly ``batch_size`` (last: fewer).

    With ``every_n`` each sequence already is one full batch and passes through untouched;
    with ``fps`` a sequence keeps only some frames, and small batches would starve the detector.
    """
    pending: list[FrameBatch] = []
    count = 0
    for chunk in chunks:
        if not len(chunk):
            continue
        pending.append(chunk)
        count += len(chunk)
        while count >= batch_size:
            merged = _concat(pending)
            yield _slice(merged, 0, batch_size)
            rest = _slice(merged, batch_size, count)
            pending, count = ([rest] if len(rest) else []), len(rest)
    if pending:
        yield _concat(pending)


def _concat(batches: list[FrameBatch]) -> FrameBatch:
    if len(batches) == 1:
        return batches[0]
    return FrameBatch(
        frames=torch.cat([b.frames for b in batches]),
        frame_index=np.concatenate([b.frame_index for b in batches]),
        pts_s=np.concatenate([b.pts_s for b in batches]),
    )


def _slice(batch: FrameBatch, start: int, stop: int) -> FrameBatch:
    if start == 0 and stop == len(batch):
        return batch
    return FrameBatch(batch.frames[start:stop], batch.frame_index[start:stop], batch.pts_s[start:stop])


def _check_codec(path: Path, device: DaliDevice, report: DecodeReport) -> int:
    """Fail with the real reason before DALI would fail with "number of input samples: 0".

    Reads the container header and decodes the first frame on the CPU (milliseconds), whose
    display matrix says how to turn the frames upright.

    Returns:
        Counterclockwise quarter turns to apply to the frames.
    """
    if not path.is_file():
        raise DecodeError(f"{path}: no such file")
    try:
        with av.open(str(path)) as container:
            if not container.streams.video:
                raise DecodeError(f"{path}: no video stream")
            stream = container.streams.video[0]
            codec = stream.codec_context.name
            first = next(container.decode(stream), None)
    except (av.error.FFmpegError, OSError) as exc:
        raise DecodeError(f"{path}: cannot open ({getattr(exc, 'strerror', None) or exc})") from None
    turns = round(((first.rotation or 0) if first is not None else 0) / 90) % 4
    report.rotation_cw_deg = (4 - turns) % 4 * 90
    report.width, report.height = (stream.height, stream.width) if turns % 2 else (stream.width, stream.height)
    if codec not in SUPPORTED_CODECS[device]:
        supported = ", ".join(sorted(SUPPORTED_CODECS[device]))
        raise DecodeError(f"{path}: codec {codec} is not decoded by DALI's {device} reader (supported: {supported})")
    return turns


def _dali_reason(exc: Exception) -> str:
    """The one informative line of a DALI error.

    DALI's messages run "Error in <backend> operator ..., used in the pipeline definition with
    the following traceback: ... encountered: <reason> C++ context: ..."; the reason is the line
    after ``encountered:``.
    """
    text = str(exc)
    _, marker, tail = text.partition("encountered:")
    lines = [line.strip() for line in (tail if marker else text).splitlines() if line.strip()]
    return lines[0] if lines else type(exc).__name__

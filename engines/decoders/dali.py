"""The GPU decoder: NVIDIA DALI on NVDEC, one pipeline per worker fed file after file.

Yields the same :class:`~engines.decoders.FrameBatch` as the PyAV decoder, except that on a GPU
``frames`` is a CUDA ``torch.uint8`` tensor (B, H, W, 3) RGB on ``cuda:<device_id>``, so
letterboxing and detection read it without a host round trip.

Why this shape (checked against DALI 2.4):

- The operator is ``fn.experimental.inputs.video``: it decodes an encoded file handed to it with
  ``Pipeline.feed_input`` in sequences, and takes the next file when one ends. So a worker builds
  its pipeline (and NVDEC decoder session) once and feeds it every video it is given; building a
  reader per file (``fn.experimental.readers.video`` takes its file names at build time) costs a
  pipeline build and a decoder instance per video. The same operator has a CPU backend (VP8,
  VP9, MJPEG), so the one graph runs in the tests on any machine.
- The file is handed over as a read-only memory map with ``no_copy``: the OS pages it in as
  NVDEC consumes it, so a long video does not become a process-sized buffer.
- The operator returns frames only. Frame numbers and presentation times come from demuxing the
  same file with PyAV (packet timestamps in presentation order, no decoding): one timestamp per
  packet, which is one frame for every codec this decoder accepts. Variable frame rate stays
  exact, and ``every_n``/``fps`` sampling both go through the shared
  :class:`~engines.decoders.FrameSelector`, as in PyAV's path.
- No seeking and no partial decode: a file is read front to back (segments are PyAV's).
- DALI reports no damage of its own: a file it cannot decode raises, and the router decodes it,
  or the rest of it, with PyAV (:mod:`engines.decoders.routed`). A file cut short is found as
  PyAV's path finds it, its last frame well before the end its headers declare.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any, Literal

import av
import numpy as np
import torch

from engines.decoders import (DecodeError, DecodeReport, FrameBatch, Sampling, check_end, frame_rate,
                              video_stream)
from engines.decoders.choice import DALI_CPU_CODECS, NVDEC_CODECS
from engines.decoders.orientation import UPRIGHT, Orientation
from engines.decoders.probe import StreamInfo, probe
from engines.decoders.segments import TimestampsGoBack, check_timestamps_go_on

log = logging.getLogger(__name__)

DaliDevice = Literal["cpu", "gpu"]

#: The first DALI with everything used here: ``fn.experimental.inputs.video`` (CPU 1.22, GPU
#: 1.23) and the dynamic executor as a supported, zero-copy mode (1.44: before it, outputs were
#: buffers DALI reuses, which the DLPack hand-off below would read after they were overwritten).
MIN_DALI_VERSION = (1, 44)
INSTALL_HINT = "pip install 'nvidia-dali-cuda120>=1.44'"
#: Codecs each backend decodes (FFmpeg names); NVDEC's AV1 depends on the GPU (engines.decoders.choice).
SUPPORTED_CODECS: dict[DaliDevice, frozenset[str]] = {"gpu": NVDEC_CODECS | {"av1"}, "cpu": DALI_CPU_CODECS}
_INPUT = "video"
# Pipeline CPU threads: demuxing and bookkeeping for the one operator.
_NUM_THREADS = 2
# One iteration at a time: the operator must not run ahead past the end of the file it was fed
# (it would fail for want of data, or start on the next file before that one is fed). Decoding
# still overlaps inference, across the several pipelines (actors) a GPU runs.
_PREFETCH_DEPTH = 1


def dali_version(module: Any) -> tuple[int, int]:
    """(major, minor) of an imported ``nvidia.dali``."""
    parts = str(getattr(module, "__version__", "0.0")).split(".")
    return int(parts[0]), int(parts[1]) if len(parts) > 1 and parts[1].isdigit() else 0


def require_dali() -> Any:
    """Import ``nvidia.dali`` or fail with one line: not installed, or older than the floor.

    Raises:
        RuntimeError: DALI is missing or older than :data:`MIN_DALI_VERSION`.
    """
    try:
        import nvidia.dali as dali
    except ImportError:
        raise RuntimeError(f"the DALI decoder needs NVIDIA DALI: {INSTALL_HINT}") from None
    if dali_version(dali) < MIN_DALI_VERSION:
        floor = ".".join(map(str, MIN_DALI_VERSION))
        raise RuntimeError(f"NVIDIA DALI {dali.__version__} is older than {floor}, the first with the "
                           f"video input operator and zero-copy outputs used here: {INSTALL_HINT}")
    return dali


def video_graph(device: DaliDevice, sequence_length: int) -> Any:
    """The DALI graph: one video input, sequences of ``sequence_length`` frames.

    Meant to be wrapped by ``nvidia.dali.pipeline_def`` (done in :class:`DaliVideoDecoder`, so
    importing this module needs no DALI). ``last_sequence_policy="partial"`` returns a file's
    last, shorter sequence as it is (no padding to trim).

    Returns:
        frames: (1, F, H, W, 3) uint8 RGB per iteration.
    """
    from nvidia.dali import fn

    return fn.experimental.inputs.video(
        name=_INPUT,
        device="mixed" if device == "gpu" else "cpu",
        sequence_length=sequence_length,
        last_sequence_policy="partial",
        no_copy=True,  # the memory map below is read in place and kept alive until the file ends
    )


def packet_times(path: Path) -> np.ndarray:
    """Presentation times (s, float64, ascending) of the video stream's frames (not a cover's), by demuxing.

    One per packet that carries data; a stream without timestamps gets ``index / rate``.

    Raises:
        DecodeError: the times go back or repeat (recordings joined into one file): sorted, they
            would not be the frames' (the router then decodes the file with PyAV).
    """
    with av.open(str(path)) as container:
        stream = video_stream(container, path)
        # Edit lists: see segments.presented.
        packets = [(p.pts, p.is_keyframe) for p in container.demux(stream) if p.size and not p.is_discard]
        rate = float(frame_rate(stream) or 25)
        if not packets or any(t is None for t, _ in packets):
            return np.arange(len(packets), dtype=np.float64) / rate
        try:
            check_timestamps_go_on(packets, float(stream.time_base))
        except TimestampsGoBack as exc:
            raise DecodeError(f"{path}: {exc}") from None
        return np.sort(np.asarray([t for t, _ in packets], np.float64)) * float(stream.time_base)


class DaliVideoDecoder:
    """One DALI pipeline, built on first use and fed file after file.

    Args:
        device: ``gpu`` (NVDEC, frames in GPU memory) or ``cpu`` (DALI's CPU reader).
        batch_size: frames per yielded batch, and per DALI sequence.
        device_id: the CUDA device (``gpu`` only; None: torch's current device).
    """

    def __init__(self, device: DaliDevice, batch_size: int, device_id: int | None = None) -> None:
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        self.device = device
        self.batch_size = batch_size
        self.device_id = device_id
        self._pipe: Any = None
        self.files_fed = 0  # files this one pipeline has decoded (how many builds were saved)

    def _pipeline(self) -> Any:
        if self._pipe is None:
            if self.device == "gpu":
                if not torch.cuda.is_available():
                    raise RuntimeError("DALI's GPU decoder needs a CUDA device; use the PyAV decoder on a CPU")
                if self.device_id is None:
                    self.device_id = torch.cuda.current_device()
            require_dali()
            from nvidia.dali import pipeline_def

            pipe = pipeline_def(video_graph)(
                device=self.device,
                sequence_length=self.batch_size,
                batch_size=1,  # one sequence per iteration; the sequence is the FrameBatch
                num_threads=_NUM_THREADS,
                device_id=self.device_id if self.device == "gpu" else None,
                prefetch_queue_depth=_PREFETCH_DEPTH,
                # The dynamic executor allocates every output afresh and never reuses a buffer the
                # caller still holds, which is what makes the zero-copy DLPack hand-off safe.
                exec_dynamic=True,
            )
            pipe.build()
            self._pipe = pipe
        return self._pipe

    def reset(self) -> None:
        """Drop the pipeline (after a failure its input queue may hold part of a file)."""
        self._pipe = None

    def decode(self, path: str | Path, sampling: Sampling, *, report: DecodeReport | None = None,
               info: StreamInfo | None = None) -> Iterator[FrameBatch]:
        """Yield the sampled frames of one file in batches of ``batch_size`` (the last: fewer).

        A generator, like PyAV's decode: every error surfaces on the first ``next()``, in the
        caller's per-video try block.

        Raises:
            RuntimeError: DALI is missing or too old, or (GPU) no CUDA device is visible.
            DecodeError: the file cannot be opened, its codec is not this backend's, or
                decoding fails (one line naming the file and DALI's reason).
        """
        path = Path(path)
        report = report if report is not None else DecodeReport()
        info = info or probe(path)
        if info.codec not in SUPPORTED_CODECS[self.device]:
            supported = ", ".join(sorted(SUPPORTED_CODECS[self.device]))
            raise DecodeError(f"{path}: codec {info.codec} is not decoded by DALI's {self.device} reader "
                              f"(supported: {supported})")
        shown = info.orientation
        report.rotation_cw_deg, report.mirrored = shown.described()
        report.width, report.height = (info.height, info.width) if shown.transpose else (info.width, info.height)
        report.other_video_streams = info.other_video_streams
        times = packet_times(path)
        if not len(times):
            raise DecodeError(f"{path}: no frames decoded")
        report.frames_expected = len(times)
        pipe = self._pipeline()
        log.debug("%s: DALI %s pipeline, file %d, %d frames", path, self.device, self.files_fed + 1, len(times))
        try:
            for batch in _rebatch(self._sequences(pipe, path, sampling, times), self.batch_size):
                report.frames_decoded = int(batch.frame_index[-1]) + 1
                yield _upright(batch, shown)
        except BaseException:
            self.reset()  # the operator may still hold the rest of this file
            raise
        self.files_fed += 1
        report.frames_decoded = len(times)
        if info.end_s is not None and info.rate:  # a file cut short holds fewer packets than its header promises
            check_end(float(times[0]), float(times[-1]), len(times), info.end_s, info.rate, report)

    def _sequences(self, pipe: Any, path: Path, sampling: Sampling, times: np.ndarray) -> Iterator[FrameBatch]:
        """One batch per DALI iteration: the kept frames of one sequence (possibly none)."""
        data = np.memmap(path, np.uint8, mode="r")
        pipe.feed_input(_INPUT, [data])
        selector = sampling.selector()
        total = len(times)
        start = 0
        for _ in range(math.ceil(total / self.batch_size)):
            try:
                (frames,) = pipe.run()
            except RuntimeError as exc:
                raise DecodeError(f"{path}: DALI decode failed ({_dali_reason(exc)})") from None
            count = int(frames.as_tensor().shape()[1])
            expected = min(self.batch_size, total - start)
            if count != expected:
                # More or fewer frames than packets: the timestamps would be wrong, and extra
                # frames would be read as the next file's.
                raise DecodeError(f"{path}: DALI decoded {count} frames where the container has {expected} "
                                  f"at frame {start}")
            index = np.arange(start, start + count, dtype=np.int64)
            pts_s = times[start:start + count]
            keep = np.fromiter((selector.keep(int(i), float(t)) for i, t in zip(index, pts_s)),
                               dtype=bool, count=count)
            start += count
            yield FrameBatch(_select_frames(frames, keep), index[keep], pts_s[keep])
        del data  # DALI has consumed the file: the map may go


def decode(path: str | Path, sampling: Sampling, batch_size: int, device_id: int = 0, *,
           report: DecodeReport | None = None) -> Iterator[FrameBatch]:
    """One file on NVDEC with a pipeline of its own (a worker keeps a :class:`DaliVideoDecoder`)."""
    return DaliVideoDecoder("gpu", batch_size, device_id).decode(path, sampling, report=report)


def decode_cpu(path: str | Path, sampling: Sampling, batch_size: int, *,
               report: DecodeReport | None = None) -> Iterator[FrameBatch]:
    """The same graph on DALI's CPU backend (VP8, VP9, MJPEG), yielding host frames."""
    return DaliVideoDecoder("cpu", batch_size).decode(path, sampling, report=report)


def _upright(batch: FrameBatch, shown: Orientation) -> FrameBatch:
    """Turn (or mirror) frames as the display matrix says (DALI returns them as stored)."""
    if shown == UPRIGHT:
        return batch
    return FrameBatch(shown.show_batch(batch.frames), batch.frame_index, batch.pts_s, batch.scale)


def _select_frames(tensor_list: Any, keep: np.ndarray) -> torch.Tensor:
    """The kept frames of the one sequence: a CUDA tensor for the GPU backend, a host one for the CPU.

    DLPack hands DALI's buffer to torch without a copy and orders torch's current stream after
    DALI's; only the gather of a partial selection copies, and only the kept frames.
    """
    frames = torch.from_dlpack(tensor_list.as_tensor())[0]
    if not keep.all():
        frames = frames[torch.from_numpy(np.flatnonzero(keep)).to(frames.device)]
    return frames


def _rebatch(chunks: Iterable[FrameBatch], batch_size: int) -> Iterator[FrameBatch]:
    """Regroup per-sequence selections into batches of exactly ``batch_size`` (last: fewer).

    Without sampling each sequence already is one full batch and passes through untouched; with
    sampling a sequence keeps only some frames, and small batches would starve the detector.
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

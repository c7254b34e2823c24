"""The CPU decoder: PyAV (FFmpeg), sequential decode with frame threading, no seeking.

Frames that sampling drops are never converted to RGB, which is most of a decoder's cost
after the bitstream itself, and those no other frame refers to are not even decoded
(:mod:`engines.decoders.skipping`). Kept frames are converted (and, for frames beyond the
batch's pixel budget, scaled) by one FFmpeg call straight into the batch, turned upright as the
display matrix says, and a damaged file is decoded packet by packet, skipping what FFmpeg refuses.
"""

from __future__ import annotations

import sys
from collections.abc import Iterator
from pathlib import Path

import av
import numpy as np
import torch
from av.video.reformatter import VideoReformatter

from engines.decoders import (CPU_BATCH_PIXELS, DecodeError, DecodeReport, FrameBatch, Sampling, batch_shape,
                              cannot_open, check_end, declared_end_s, display_size, ffmpeg_reason, frame_rate,
                              other_video_streams, sample_aspect, video_stream)
from engines.decoders.deinterlace import deinterlaced
from engines.decoders.orientation import orientation
from engines.decoders.segments import Segment, header_frames, packets_from_keyframe, presented
from engines.decoders.skipping import SkipPlan
from engines.decoders.tonemap import sdr_conversion


def decode(path: str | Path, sampling: Sampling, batch_size: int, *, max_pixels: int | None = CPU_BATCH_PIXELS,
           report: DecodeReport | None = None, threads: int = 0, convert_threads: int | None = None,
           segment: Segment | None = None, deinterlace: bool = True,
           square_pixels: bool = True) -> Iterator[FrameBatch]:
    """Yield sampled frames of the video stream (:func:`~engines.decoders.video_stream`), as displayed, in batches.

    A batch holds up to ``batch_size`` frames and at most ``max_pixels`` pixels (see
    :func:`engines.decoders.batch_shape`). Damaged packets are skipped and counted in ``report``.
    ``threads``: FFmpeg's decoding threads (0: one per core), a worker's share of the cores.
    ``convert_threads``: threads of the RGB conversion (None: ``threads``); 1 where the other
    cores of the share run another stage meanwhile (a worker that finds faces on a thread).
    ``segment``: decode only that piece (seek to its keyframe, stop at its end); frame indices
    and sampling stay those of the whole video. ``deinterlace``: interlaced frames are made
    progressive (:mod:`engines.decoders.deinterlace`); progressive video is untouched either way.
    ``square_pixels``: frames stored with non-square pixels are scaled to their displayed shape
    (:func:`~engines.decoders.sample_aspect`); False keeps them as stored.

    Raises:
        DecodeError: the file cannot be opened, has no video stream, or no frame decodes.
    """
    report = report if report is not None else DecodeReport()
    piece = segment or Segment(0, 1, None, None, 0, None)
    selector = sampling.selector(start_s=piece.video_start_s, previous_s=piece.previous_s)
    try:
        container = av.open(str(path))
    except (av.error.FFmpegError, OSError) as exc:
        raise cannot_open(path, exc) from None
    with container:
        stream = video_stream(container, path)
        report.other_video_streams = other_video_streams(container)
        # Frame threading decodes several frames at once; 'AUTO' adds slice threading.
        stream.thread_type = "AUTO"
        stream.codec_context.thread_count = threads
        fallback_rate = float(frame_rate(stream) or 25)
        report.frames_expected = _expected_frames(stream, piece)
        packets = (container.demux(stream) if piece.start_pts is None
                   else packets_from_keyframe(container, stream, piece.start_pts))
        batcher: _Batcher | None = None
        count = 0
        plan = SkipPlan.for_decode(path, sampling, piece)  # None: every frame decoded
        frames = _frames(packets, stream, report, piece, plan)
        if deinterlace:
            frames = deinterlaced(frames, stream, str(path))
        for count, frame in enumerate(frames, start=1):
            index = piece.first_frame + count - 1 if plan is None else plan.index(frame, count)
            report.frames_decoded = index - piece.first_frame + 1  # as it goes: a worker's stall watchdog reads it
            pts_s = frame.time if frame.time is not None else index / fallback_rate
            if not selector.keep(index, pts_s):
                continue
            if batcher is None:
                batcher = _Batcher(frame, batch_size, max_pixels, report,
                                   threads if convert_threads is None else convert_threads,
                                   sample_aspect(stream) if square_pixels else 1.0)
            elif (batch := batcher.resize(frame, index, report)) is not None:
                yield batch
            if (batch := batcher.add(frame, index, pts_s)) is not None:
                yield batch
        # Frames left undecoded on purpose are not lost: they count with the decoded ones.
        report.frames_decoded = count + (plan.skipped_count if plan is not None else 0)
        if report.frames_decoded == 0:
            what = f"; {report.describe()}" if report.damaged else ""
            raise DecodeError(f"{path}: no frames decoded{what}")
        if batcher is not None and (batch := batcher.flush()) is not None:
            yield batch


def _frames(packets: Iterator[av.Packet], stream: av.video.stream.VideoStream,
            report: DecodeReport, piece: Segment, plan: SkipPlan | None = None) -> Iterator[av.VideoFrame]:
    """The segment's decoded frames, packet by packet: a damaged packet is skipped, not fatal.

    Frames come out in presentation order, so the segment ends at the first frame at or after
    its end (frames that precede it in time but follow it in the bitstream are still decoded
    here, with their references). Frames lost are the segment's packets (or the header's count,
    for a whole file cut short) minus the frames that came out, neither counting the packets an
    edit list hides (:func:`~engines.decoders.segments.presented`); the first lost one is found by
    timestamp, because with frame threading FFmpeg reports a damaged packet a few packets late.
    ``plan``: frames the sampling drops and nothing refers to are left undecoded
    (:mod:`engines.decoders.skipping`); they are accounted for with the decoded ones, not lost.
    """
    start, end = piece.start_pts, piece.end_pts

    def inside(pts: int | None) -> bool:
        return pts is None or ((start is None or pts >= start) and (end is None or pts < end))

    demuxed: list[int] = []
    hidden = 0
    decoded: set[int] = set()
    count = 0
    first_error_pts: int | None = None
    finished = False
    while not finished:
        try:
            packet = next(packets)
        except StopIteration:
            break
        except av.error.FFmpegError as exc:  # the container itself is cut or broken here
            report.stopped_early = ffmpeg_reason(exc)
            packet = None
        if packet is not None and packet.is_discard:
            hidden += 1  # decoded for its references, never shown: an edit list trims it
        elif packet is not None and presented(packet) and inside(packet.pts):
            demuxed.append(packet.pts)
        if plan is not None and packet is not None:
            plan.send(stream.codec_context, packet.pts)
        try:
            # A None packet flushes the decoder, so frames it holds come out after a cut.
            frames = stream.codec_context.decode(packet) if packet is None else packet.decode()
        except av.error.FFmpegError:
            report.bad_packets += 1
            if plan is not None:
                plan.stop(stream.codec_context)  # from here on, a lost frame is told from a skipped one
            if first_error_pts is None and packet is not None:
                first_error_pts = packet.pts
            continue
        for frame in frames:
            if end is not None and frame.pts is not None and frame.pts >= end:
                finished = True
                break
            if not inside(frame.pts):
                continue  # before the segment: the tail of the GOP the seek landed in
            count += 1
            if frame.pts is not None:
                decoded.add(frame.pts)
            if plan is not None:
                plan.frame_out(frame)
                if frame.interlaced_frame:
                    plan.stop(stream.codec_context)  # bwdif reads each frame's neighbours
            yield frame
        if packet is None:
            break
    skipped = plan.skipped(decoded) & set(demuxed) if plan is not None else set()  # the piece's own
    count += len(skipped)  # frames the file holds that are accounted for
    if plan is not None:
        plan.skipped_count = len(skipped)
    whole = start is None and end is None
    expected = max(len(demuxed), (stream.frames or 0) - hidden if whole else 0)
    report.frames_lost = max(0, expected - count)
    time_base = stream.time_base or 0
    if report.frames_lost or report.bad_packets or report.stopped_early:
        missing = sorted(set(demuxed) - decoded - skipped)
        first = missing[0] if missing else first_error_pts
        if first is not None:
            report.first_bad_s = float(first * time_base)  # the same clock as the rows' pts_s
    if end is None and decoded and (end_s := declared_end_s(stream)) is not None and (rate := frame_rate(stream)):
        first, last = min(decoded | skipped), max(decoded | skipped)
        check_end(float(first * time_base), float(last * time_base), count, end_s, float(rate), report)


class _Batcher:
    """Fills fresh uint8 batches frame by frame: one FFmpeg conversion per frame, no re-stacking.

    The display rotation is that of the video's first kept frame. A frame of another size than
    the one before it (a recording joined from pieces, a stream that switched renditions) starts a
    new batch at its own size (:meth:`resize`), so a batch has one shape and every row's pixels
    are its own frame's, as a player shows it, whatever the segment the frame was decoded in.

    Every frame goes through one :class:`VideoReformatter`, so FFmpeg sets up its scaler (and,
    with ``threads`` other than 1, starts its pool of threads) once per video. A frame's own
    ``to_ndarray(format=...)`` makes a new one for every frame: with two threads, 1080p decoded
    and converted at 176-186 frames/s that way against 211-234 with one reformatter.
    """

    def __init__(self, first: av.VideoFrame, batch_size: int, max_pixels: int | None, report: DecodeReport,
                 threads: int = 0, aspect: float = 1.0) -> None:
        # PyAV 17 converts on a thread per CPU unless told: a worker's conversions stay on its
        # own share of the cores, as its decoding does (0: FFmpeg's choice).
        self.convert_options = {"threads": threads} if _CONVERTS_ON_THREADS else {}
        self.reformatter = VideoReformatter()
        # HDR (PQ, HLG, BT.2020) is shown as SDR BT.709 by the same conversion (decoders.tonemap).
        self.color_options, report.tone_mapped = sdr_conversion(first)
        self.orientation = orientation(first)  # the display matrix's turn or mirror
        # Non-square pixels (DVD, DV, HDV, SD broadcast) are scaled to square ones: a face must
        # have its true shape to be detected and aligned, and coordinates are the player's.
        self.aspect, self.batch_size, self.max_pixels = aspect, batch_size, max_pixels
        report.rotation_cw_deg, report.mirrored = self.orientation.described()
        report.width, report.height = self._shape_for(first)
        report.sample_aspect = aspect

    def _shape_for(self, frame: av.VideoFrame) -> tuple[int, int]:
        """Set the batches' shape for frames of ``frame``'s size; (width, height) as displayed."""
        self.stored = (frame.width, frame.height)
        shown_w, shown_h = display_size(frame.width, frame.height, self.aspect)
        width, height = (shown_h, shown_w) if self.orientation.transpose else (shown_w, shown_h)
        self.size, out_w, out_h = batch_shape(width, height, self.batch_size, self.max_pixels)
        self.scale = width / out_w
        # The frame as stored, at the working size: the turn or mirror comes after the conversion.
        self.stored_size = (out_h, out_w) if self.orientation.transpose else (out_w, out_h)
        self.interpolation = "AREA" if self.scale > 1 else None  # None: bilinear (a wider pixel's stretch)
        self.shape = (out_h, out_w, 3)
        self._buffers: list[np.ndarray] = []
        self._start()
        return width, height

    def resize(self, frame: av.VideoFrame, index: int, report: DecodeReport) -> FrameBatch | None:
        """Where ``frame`` is stored at another size than the frames before it: the batch so far
        (None if empty), and the batches from here on at the new size, recorded in ``report``."""
        if (frame.width, frame.height) == self.stored:
            return None
        batch = self.flush()
        report.size_changes.append([index, *self._shape_for(frame)])
        return batch

    def _start(self) -> None:
        # Recycle a batch buffer once nobody holds a view of it (its batch was consumed): a fresh
        # one costs a page fault per 4 KB on first write, ~1 ms per 720p frame.
        free = next((b for b in self._buffers if sys.getrefcount(b) == _UNREFERENCED), None)
        if free is None:
            free = np.empty((self.size, *self.shape), np.uint8)
            self._buffers = [*self._buffers[-1:], free]  # at most two: the batch out there, and this
        self.frames = free
        self.index = np.empty(self.size, np.int64)
        self.pts = np.empty(self.size, np.float64)
        self.count = 0

    def add(self, frame: av.VideoFrame, index: int, pts_s: float) -> FrameBatch | None:
        """Convert one kept frame into the batch; the batch when it is full."""
        width, height = self.stored_size
        rgb = self.reformatter.reformat(frame, format="rgb24", width=width, height=height,
                                        interpolation=self.interpolation, **self.convert_options,
                                        **self.color_options).to_ndarray()
        self.frames[self.count] = self.orientation.show(rgb)
        self.index[self.count], self.pts[self.count] = index, pts_s
        self.count += 1
        return self.flush() if self.count == self.size else None

    def flush(self) -> FrameBatch | None:
        if not self.count:
            return None
        n = self.count
        batch = FrameBatch(torch.from_numpy(self.frames[:n]), self.index[:n], self.pts[:n], self.scale)
        self._start()
        return batch


#: PyAV 17 added ``threads`` to its reformatter (conversions on several threads, by default one per CPU).
_CONVERTS_ON_THREADS = int(av.__version__.split(".")[0]) >= 17
#: sys.getrefcount of a buffer referenced only by the list holding it (the list, the loop
#: variable and getrefcount's own argument).
_UNREFERENCED = 3


def _expected_frames(stream: av.video.stream.VideoStream, piece: Segment) -> int:
    """Frames ``piece`` of the stream holds as far as the headers tell (0: they do not)."""
    if piece.end_frame is not None:
        return piece.end_frame - piece.first_frame
    if piece.end_pts is not None:  # a middle segment of a plan that did not keep its end frame
        return 0
    return max(header_frames(stream) - piece.first_frame, 0)


def probe(path: str | Path) -> tuple[int, int, float]:
    """(width, height, average fps) of the video stream, for benchmarks and reports."""
    with av.open(str(path)) as container:
        stream = video_stream(container, path)
        return stream.width, stream.height, float(frame_rate(stream) or 0)

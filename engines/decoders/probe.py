"""What a video file holds, read once from its header: codec, profile, bit depth, container.

The decoder is chosen per file from this (:mod:`engines.decoders.choice`), so the probe must be
cheap and must name codecs the way every decoder table does. PyAV reports the *decoder* it
would use (``codec_context.name`` is ``libdav1d`` for AV1), so the canonical codec name
(``Codec.canonical_name``, FFmpeg's codec id: ``av1``) is what is recorded here.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import av

from engines.decoders import (DecodeError, cannot_open, declared_end_s, frame_rate, other_video_streams, sample_aspect,
                              video_stream)
from engines.decoders.deinterlace import is_interlaced
from engines.decoders.orientation import UPRIGHT, Orientation, orientation
from engines.decoders.tonemap import sdr_conversion


@dataclass(frozen=True)
class StreamInfo:
    """The video stream of a file (not its cover art), as its header describes it.

    ``orientation`` shows frames upright (the first frame's display matrix: a turn, or a mirror).
    """

    path: Path
    codec: str  # FFmpeg's canonical codec name: h264, hevc, av1, mpeg4, vp9, mjpeg, mpeg2video, prores, ...
    profile: str | None  # e.g. "High", "High 10", "Main", "Profile 0"
    pix_fmt: str | None  # e.g. yuv420p, yuv420p10le, yuvj422p
    bit_depth: int  # bits per luma sample (8 unless the pixel format says otherwise)
    container: str  # FFmpeg demuxer name, e.g. "mov,mp4,m4a,3gp,3g2,mj2", "matroska,webm", "avi"
    width: int
    height: int
    orientation: Orientation = UPRIGHT
    interlaced: bool = False  # the first frame (or the header's field order) says its fields are interlaced
    sample_aspect: float = 1.0  # width over height of a pixel as shown (engines.decoders.sample_aspect)
    hdr: str | None = None  # how the first frame's HDR colours are mapped to SDR (decoders.tonemap); None: SDR
    other_video_streams: int = 0  # moving video streams besides this one (engines.decoders.other_video_streams)
    end_s: float | None = None  # where the headers say the stream ends (engines.decoders.declared_end_s)
    rate: float | None = None  # frames per second (engines.decoders.frame_rate)

    @property
    def chroma(self) -> str:
        """``420``, ``422``, ``444`` (or ``other``), from the pixel format."""
        fmt = self.pix_fmt or ""
        for sub in ("420", "422", "444"):
            if sub in fmt or (sub == "420" and fmt in ("nv12", "p010le", "p016le")):
                return sub
        return "other"

    def describe(self) -> str:
        """``h264 High 8-bit 4:2:0 in mov`` for log lines."""
        profile = f" {self.profile}" if self.profile else ""
        return f"{self.codec}{profile} {self.bit_depth}-bit {self.chroma} in {self.container.split(',')[0]}"


def probe(path: str | Path) -> StreamInfo:
    """Read the header of ``path`` (and decode its first frame on the CPU for the display matrix).

    Raises:
        DecodeError: the file is missing, cannot be opened, or has no video stream (one line
            naming the file).
    """
    path = Path(path)
    if not path.is_file():
        raise DecodeError(f"{path}: no such file")
    try:
        with av.open(str(path)) as container:
            stream = video_stream(container, path)
            context = stream.codec_context
            fmt = context.format
            bit_depth = fmt.components[0].bits if fmt is not None and fmt.components else 8
            try:
                first = next(container.decode(stream), None)
            except av.error.FFmpegError:
                first = None  # a damaged start: the decoder finds out; the probe only describes
            return StreamInfo(
                path=path,
                codec=context.codec.canonical_name,
                profile=context.profile,
                pix_fmt=context.pix_fmt,
                bit_depth=int(bit_depth),
                container=container.format.name,
                width=stream.width,
                height=stream.height,
                orientation=orientation(first) if first is not None else UPRIGHT,
                interlaced=is_interlaced(stream, first),
                sample_aspect=sample_aspect(stream),
                hdr=sdr_conversion(first)[1] if first is not None else None,
                other_video_streams=other_video_streams(container),
                end_s=declared_end_s(stream),
                rate=float(rate) if (rate := frame_rate(stream)) else None,
            )
    except (av.error.FFmpegError, OSError) as exc:
        raise cannot_open(path, exc) from None

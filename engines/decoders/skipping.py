"""Sampled decoding that leaves undecoded the frames nothing needs: FFmpeg's ``skip_frame``.

With ``--sample-fps`` or ``--every-n`` most frames are dropped after decoding, yet decoding the
bitstream is most of a decoder's cost. A frame no other frame refers to (most B-frames of x264,
YouTube and broadcast encodes: 157 of 300 frames in the 720p bench clip) can be left undecoded
when it is not one the sampling keeps: FFmpeg skips such a packet when the codec context's
``skip_frame`` is ``NONREF`` as it is sent, and decodes it as usual under ``DEFAULT``.

Which frames the sampling keeps is known before decoding: it depends only on each frame's time
and position, and the packet headers give every frame's time (one packet per frame, read
without decoding). So a :class:`SkipPlan` runs the run's own :class:`~engines.decoders.FrameSelector`
over those times once the first frame is out (sampling counts from the first frame that
decodes), and each packet is sent with ``DEFAULT`` if its frame is kept, else ``NONREF``.

Frames that are left undecoded do not come out, so a frame's ``frame_index`` is its position
among the stream's frames by time (as the plan and the segments count them), which is what
counting decoded frames gives whenever nothing is lost. At the first damaged packet, and at the
first interlaced frame (``bwdif`` reads a frame's neighbours), skipping stops for the rest of
the file. A video whose timestamps go back or repeat, or lack, is decoded whole.
"""

from __future__ import annotations

import bisect
from fractions import Fraction
from pathlib import Path

import av

from engines.decoders import DecodeError, Sampling
from engines.decoders.segments import Segment, TimestampsGoBack, check_timestamps_go_on, shown_packets

_DECODE = "DEFAULT"
_SKIP_IF_UNREFERENCED = "NONREF"


class SkipPlan:
    """Which packets of one decode (a whole video or a segment) are sent to be skipped if unreferenced.

    Args:
        times: presentation times (stream time base) of the video stream's shown frames, ascending.
        time_base: the stream's time base.
        sampling: the run's sampling (which keeps a subset of the frames).
        piece: the segment decoded (the whole video: ``Segment(0, 1, None, None, 0, None)``).
    """

    def __init__(self, times: list[int], time_base: Fraction, sampling: Sampling, piece: Segment) -> None:
        self.times, self.time_base, self.sampling, self.piece = times, time_base, sampling, piece
        self.rank = {pts: i for i, pts in enumerate(times)}
        self.first_rank: int | None = None  # the position of the piece's first frame out
        self.wanted: frozenset[int] | None = None  # pts of the frames the sampling keeps (None: not known yet)
        self.skipping = True
        self.sent_to_skip: set[int] = set()  # pts of packets sent with NONREF
        self.skipped_count = 0  # frames left undecoded, once the decode is over
        self._last_index: int | None = None
        self._mode = _DECODE

    @classmethod
    def for_decode(cls, path: str | Path, sampling: Sampling, piece: Segment) -> SkipPlan | None:
        """A plan for decoding ``piece`` of ``path`` with ``sampling``; None where every frame is
        kept, or the frames' times cannot say which are (none, repeated, or going back)."""
        if sampling.every_n == 1 and sampling.fps is None:
            return None
        try:
            packets, time_base = shown_packets(Path(path), piece)
            check_timestamps_go_on(packets, float(time_base))
        except (TimestampsGoBack, DecodeError, av.error.FFmpegError, OSError):
            return None
        if not packets or not time_base:
            return None
        return cls(sorted(pts for pts, _ in packets), time_base, sampling, piece)

    def send(self, context: av.codec.context.CodecContext, pts: int | None) -> None:
        """Set ``context`` to decode the packet of ``pts`` next: in full if its frame may be kept."""
        # A packet an edit list hides (not in rank) is decoded as usual: its frame is never shown.
        skip = self.skipping and self.wanted is not None and pts in self.rank and pts not in self.wanted
        if skip:
            self.sent_to_skip.add(pts)
        mode = _SKIP_IF_UNREFERENCED if skip else _DECODE
        if mode != self._mode:
            context.skip_frame = mode
            self._mode = mode

    def stop(self, context: av.codec.context.CodecContext) -> None:
        """Decode every frame from here on (damage, or interlaced frames)."""
        self.skipping = False
        if self._mode != _DECODE:
            context.skip_frame = _DECODE
            self._mode = _DECODE

    def frame_out(self, frame: av.VideoFrame) -> None:
        """A frame of the piece came out: the first one fixes which frames the sampling keeps."""
        if self.wanted is None and frame.pts in self.rank:
            self.first_rank = self.rank[frame.pts]
            self.wanted = frozenset(self._kept_from(self.first_rank))

    def _kept_from(self, first_rank: int) -> list[int]:
        """The frames the run's selector keeps, given every frame from ``first_rank`` on."""
        piece = self.piece
        selector = self.sampling.selector(start_s=piece.video_start_s, previous_s=piece.previous_s)
        stop = len(self.times) if piece.end_pts is None else bisect.bisect_left(self.times, piece.end_pts)
        # pts * num / den: integer true division rounds as PyAV's frame.time (float(pts * time_base)) does.
        num, den = self.time_base.numerator, self.time_base.denominator
        return [pts for rank, pts in enumerate(self.times[first_rank:stop], start=first_rank)
                if selector.keep(piece.first_frame + rank - first_rank, pts * num / den)]

    def index(self, frame: av.VideoFrame, count: int) -> int:
        """``frame_index`` of the ``count``-th frame out: its position by time (frames left
        undecoded counted); a frame without a known time follows the one before it."""
        pts = frame.pts
        if pts is not None and frame.time_base is not None and frame.time_base != self.time_base:
            pts = round(pts * frame.time_base / self.time_base)  # a filter's clock (the deinterlacer's)
        if self.first_rank is not None and pts in self.rank:
            index = self.piece.first_frame + self.rank[pts] - self.first_rank
        elif self._last_index is not None:
            index = self._last_index + 1
        else:
            index = self.piece.first_frame + count - 1
        self._last_index = index
        return index

    def skipped(self, decoded: set[int]) -> set[int]:
        """The frames left undecoded on purpose: sent to be skipped, and not out."""
        return self.sent_to_skip - decoded

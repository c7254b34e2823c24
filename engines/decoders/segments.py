"""Time segments of a long video, cut at keyframes, so several workers can annotate one video.

A segment starts at a keyframe: a decoder seeks there and decodes from it without the frames
before, so segments decode independently and every frame belongs to exactly one segment (the
one whose [start, end) holds its presentation time). Planning reads packet headers only (no
decoding: 0.12 s for 7,500 packets of 720p H.264), which gives the exact keyframe times and the
frame count before each cut, so frame indices stay those of the whole video.
"""

from __future__ import annotations

import bisect
import dataclasses
from collections.abc import Iterator
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path

import av

from engines.decoders import frame_rate, video_stream


@dataclass(frozen=True)
class Segment:
    """One piece of a video: presentation times [start_pts, end_pts) in the stream's time base."""

    index: int
    count: int  # segments of this video
    start_pts: int | None  # None: the video's start
    end_pts: int | None  # None: the video's end
    first_frame: int  # frame_index of the first frame of the segment (frames that cannot decode at the
    # video's start not counted, as a whole decode does not count them; plans before that counted them)
    previous_s: float | None  # time of the frame just before the segment (fps sampling needs it)
    video_start_s: float | None = None  # time of the video's first frame that decodes (fps sampling counts from it)
    end_frame: int | None = None  # frame_index just after the segment (None: a plan from before it was kept)

    @property
    def last(self) -> bool:
        return self.index == self.count - 1

    def to_json(self) -> dict[str, object]:
        return dataclasses.asdict(self)

    @classmethod
    def from_json(cls, data: dict[str, object]) -> Segment:
        return cls(**data)  # type: ignore[arg-type]


def frame_count(path: Path) -> int:
    """Frames of the video stream (not a cover) as the header says (0 when it does not say)."""
    with av.open(str(path)) as container:
        return header_frames(video_stream(container, path))


def header_frames(stream: av.video.stream.VideoStream) -> int:
    """Frames of an open video stream as its headers say (0: they do not).

    MP4 and MOV count a stream's frames; Matroska and WebM (what most downloaded video is) count
    neither frames nor the stream's duration, only the file's, so the last resort is the
    container's duration times the stream's frame rate (rounded: an estimate, for planning and
    progress, never for frame indices).
    """
    if stream.frames:
        return int(stream.frames)
    rate = frame_rate(stream)
    if not rate:
        return 0
    if stream.duration and stream.time_base:
        return int(stream.duration * stream.time_base * rate)
    container_duration = stream.container.duration  # microseconds (AV_TIME_BASE)
    return round(container_duration / 1_000_000 * rate) if container_duration else 0


def presented(packet: av.Packet) -> bool:
    """Whether a packet is a frame the video shows: it carries data and a timestamp, and no edit
    list hides it. A video trimmed without re-encoding (a phone's trim, a lossless cut) starts
    its edit list inside a GOP; FFmpeg then demuxes the GOP's earlier packets flagged "discard",
    decodes them for their references, and never outputs their frames."""
    return bool(packet.size) and packet.pts is not None and not packet.is_discard


def plan_segments(path: Path, pieces: int) -> list[Segment]:
    """Cut ``path`` into at most ``pieces`` segments of about equal length, at keyframes.

    Fewer segments come back when keyframes are too sparse; one segment when ``pieces`` <= 1.

    Raises:
        av.error.FFmpegError, OSError, engines.decoders.DecodeError: the file cannot be read, or
            has no video stream (the caller annotates it whole, and the decode then reports the
            problem as usual).
        TimestampsGoBack: its timestamps go back or repeat (the caller annotates it whole).
    """
    packets, time_base = _packet_times(path)
    if pieces <= 1 or not packets:
        return [Segment(0, 1, None, None, 0, None)]
    check_timestamps_go_on(packets, time_base)
    times = sorted(pts for pts, _ in packets)  # presentation order
    keyframes = sorted(pts for pts, key in packets if key)
    # A capture that starts inside a GOP shows nothing before its first keyframe. A whole decode
    # counts (frame_index) and samples (--sample-fps ticks, --every-n) from the first frame that
    # decodes, so the segments do too: else a split run kept other frames than a whole one.
    shown = first_decoded_pts(path)
    shown = times[0] if shown is None or shown < times[0] else shown
    hidden = _count_before(times, shown)  # frames before it: lost at the start, never numbered
    cuts: list[int] = []
    for k in range(1, pieces):
        wanted = times[len(times) * k // pieces]
        nearest = min(keyframes, key=lambda pts: abs(pts - wanted))
        if nearest > shown and nearest not in cuts and (not cuts or nearest > cuts[-1]):
            cuts.append(nearest)
    bounds = [None, *cuts, None]
    segments = []
    for i, (start, end) in enumerate(zip(bounds[:-1], bounds[1:])):
        first = 0 if start is None else _count_before(times, start)
        after = len(times) if end is None else _count_before(times, end)
        previous = None if start is None else times[first - 1] * time_base
        segments.append(Segment(i, len(bounds) - 1, start, end, max(first - hidden, 0), previous, shown * time_base,
                                after - hidden))
    return segments


class TimestampsGoBack(Exception):
    """A video whose frames' times go back or repeat: it cannot be cut into time segments, nor its
    frames matched to its sorted timestamps (DALI's decoder)."""


#: Packets read past a segment's end keyframe for the frames shown before it but stored after
#: it (an open GOP's leading pictures).
_REORDER_PACKETS = 64


def shown_packets(path: Path, piece: Segment | None = None) -> tuple[list[tuple[int, bool]], Fraction]:
    """(pts, is keyframe) of each packet of the video stream that is shown, in file order, and
    the stream's time base (0 if none); packet headers only, no decoding. ``piece``: only the
    packets from its keyframe to a little past its end (a segment needs no more)."""
    with av.open(str(path)) as container:
        stream = video_stream(container, path)
        if piece is None or piece.start_pts is None and piece.end_pts is None:
            packets = container.demux(stream)
        else:
            packets = _packets_of(container, stream, piece)
        return [(p.pts, p.is_keyframe) for p in packets if presented(p)], Fraction(stream.time_base or 0)


def _packets_of(container: av.container.InputContainer, stream: av.video.stream.VideoStream,
                piece: Segment) -> Iterator[av.Packet]:
    """The packets of ``piece``: from its keyframe (the file's start for the first) to
    :data:`_REORDER_PACKETS` past the first keyframe at or after its end."""
    start, end = piece.start_pts, piece.end_pts
    packets = container.demux(stream) if start is None else packets_from_keyframe(container, stream, start)
    after_end = None
    for packet in packets:
        yield packet
        if after_end is not None:
            after_end += 1
            if after_end >= _REORDER_PACKETS:
                return
        elif end is not None and packet.is_keyframe and packet.pts is not None and packet.pts >= end:
            after_end = 0


def _packet_times(path: Path) -> tuple[list[tuple[int, bool]], float]:
    """:func:`shown_packets` with the time base as a float."""
    packets, time_base = shown_packets(path)
    return packets, float(time_base)


def shown_times(path: Path) -> tuple[list[int], float]:
    """Presentation times (stream time base, ascending) of the video stream's shown frames (one
    per packet, as a whole decode numbers them), and the time base; packet headers only."""
    packets, time_base = _packet_times(path)
    return sorted(pts for pts, _ in packets), time_base


def check_video_timestamps(path: Path) -> None:
    """:func:`check_timestamps_go_on` for a video file: for a plan, or a part stitched from
    segments, made before the check (its segments may have lost frames).

    Raises:
        TimestampsGoBack: see :func:`check_timestamps_go_on`.
        av.error.FFmpegError, OSError, engines.decoders.DecodeError: the file cannot be read.
    """
    check_timestamps_go_on(*_packet_times(path))


def check_timestamps_go_on(packets: list[tuple[int, bool]], time_base: float) -> None:
    """Check that time goes on through a video's packets ((pts, is keyframe), in file order).

    Segments are found by presentation time, so a video whose time goes back (recordings joined
    byte for byte, ``cat a.ts b.ts``: each piece's clock starts again) or repeats is not split:
    a segment would take the frames of every piece within its times, and another none.

    Raises:
        TimestampsGoBack: a keyframe no later than the one before it, in file order (a frame
            between keyframes may come before them in time: B-frames), or two frames at one time.
    """
    keyframes = [pts for pts, key in packets if key]
    for before, after in zip(keyframes, keyframes[1:]):
        if after <= before:
            raise TimestampsGoBack(f"its timestamps go back from {before * time_base:.3f} s to "
                                    f"{after * time_base:.3f} s (recordings joined into one file?)")
    if len({pts for pts, _ in packets}) < len(packets):
        raise TimestampsGoBack("two of its frames have one timestamp")


#: Packets decoded at most to find a video's first frame that decodes (past them: its first packet).
_FIRST_FRAME_PACKETS = 1000


def first_decoded_pts(path: Path) -> int | None:
    """Presentation time (stream time base) of the first frame that decodes; None if none does
    within the first :data:`_FIRST_FRAME_PACKETS` packets. Slice threading only, so the first frame
    comes out at its own packet, not a few packets later."""
    with av.open(str(path)) as container:
        stream = video_stream(container, path)
        stream.thread_type = "SLICE"
        for count, packet in enumerate(container.demux(stream)):
            if count >= _FIRST_FRAME_PACKETS:
                return None
            try:
                frames = packet.decode()
            except av.error.FFmpegError:
                continue
            for frame in frames:
                if frame.pts is not None:
                    return frame.pts
    return None


def _count_before(sorted_times: list[int], pts: int) -> int:
    return bisect.bisect_left(sorted_times, pts)


#: How far before a keyframe to seek again, in seconds, when a seek lands after it.
_SEEK_BACK_S = (1.0, 5.0, 30.0)


def packets_from_keyframe(container: av.container.InputContainer, stream: av.video.stream.VideoStream,
                           start_pts: int) -> Iterator[av.Packet]:
    """Demuxed packets from a keyframe at or before ``start_pts`` (a segment's own, found by
    its plan, or the last before a time asked for), the packets before that keyframe dropped.

    An indexed container (MP4, MOV, Matroska) seeks to that keyframe exactly. MPEG-TS has no
    index: FFmpeg finds the position by bisecting on timestamps and can land a few packets past
    the keyframe, whose frames then cannot be decoded, so a segment of a broadcast recording
    decoded nothing. Where the first keyframe after the seek comes after ``start_pts``, the seek
    is repeated further back (:data:`_SEEK_BACK_S`), then from the start of the file; the frames
    decoded before the segment are dropped by the caller, as the tail of a GOP is.
    """
    time_base = float(stream.time_base or 0) or 1 / 90000
    for back_s in (0.0, *_SEEK_BACK_S, None):
        if back_s is None:
            container.seek(0)  # the beginning, whatever its first timestamp
        else:
            container.seek(start_pts - round(back_s / time_base), stream=stream, backward=True, any_frame=False)
        packets = container.demux(stream)
        keyframe = _first_keyframe(packets)
        if keyframe is not None and (keyframe.pts <= start_pts or back_s is None):
            yield keyframe
            yield from packets
            return
    # No keyframe at all: hand the decoder what there is, as a whole-file decode would.
    container.seek(0)
    yield from container.demux(stream)


def _first_keyframe(packets: Iterator[av.Packet]) -> av.Packet | None:
    """The first keyframe packet (with a timestamp) of ``packets``, which go on after it; None at
    the end of the stream or at damage (the caller seeks elsewhere)."""
    try:
        for packet in packets:
            if packet.is_keyframe and packet.pts is not None:
                return packet
    except av.error.FFmpegError:
        pass
    return None

"""Video decoders. Every backend yields the same :class:`FrameBatch`; sampling is shared.

Frames are uint8 RGB, NHWC, as a viewer sees them (the container's display rotation applied);
``frame_index`` is the 0-based index of the frame among the decoded frames, in presentation
order; ``pts_s`` comes from the container's timestamps, so variable-frame-rate video gets true
times rather than ``index / fps``. What a decoder found on the way (rotation, damage) goes into a
:class:`DecodeReport` the caller passes in.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from fractions import Fraction
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:  # the CLI loads this before torch, so Ray can start while torch loads
    import av
    import torch

VIDEO_EXTENSIONS: frozenset[str] = frozenset({
    ".mp4", ".m4v", ".mov", ".mkv", ".webm", ".avi", ".mpg", ".mpeg", ".ts", ".mts", ".m2ts",
    ".flv", ".wmv", ".3gp", ".ogv", ".y4m",
    # Broadcast and camera archives (MXF, DV, HDV, camcorders' MOD/TOD), DVDs, and raw streams
    # as encoders and recorders dump them (no container: frames timed by the stream's rate).
    ".mxf", ".dv", ".m2t", ".mod", ".tod", ".vob", ".m2v", ".h264", ".264", ".h265", ".265", ".hevc",
    ".asf", ".f4v", ".divx", ".mjpeg", ".mjpg",
})


class DecodeError(RuntimeError):
    """A video cannot be opened or decoded; the message names the file and the reason."""


def ffmpeg_reason(exc: Exception) -> str:
    """FFmpeg's (or the OS's) reason for an error, without PyAV's repetition of the call and path."""
    return getattr(exc, "strerror", None) or str(exc).split(":")[-1].strip() or type(exc).__name__


def cannot_open(path: str | Path, exc: Exception) -> DecodeError:
    """The one-line error for a file FFmpeg cannot open. Two common cases get their own reason
    rather than FFmpeg's "Invalid data found when processing input": an empty file, and an MP4 or
    MOV whose index (the ``moov`` box) was never written, as when a recording was interrupted."""
    try:
        size = Path(path).stat().st_size
        reason = "empty file (0 bytes)" if size == 0 else _mp4_without_index(Path(path), size)
    except OSError:
        reason = None
    return DecodeError(f"{path}: {reason or f'cannot open ({ffmpeg_reason(exc)})'}")


def video_stream(container: av.container.InputContainer, path: str | Path) -> av.video.stream.VideoStream:
    """The stream whose frames are the video: the first video stream that is not a still picture.

    FFmpeg lists a file's cover art (an MP4's ``covr``, as yt-dlp's ``--embed-thumbnail`` and
    iTunes write it; a Matroska image attachment) as a video stream of one frame, flagged
    "attached picture", and where the tags come before the tracks it is stream 0: taking the
    first video stream annotated the cover, as a one-frame video, and none of the film.

    Raises:
        DecodeError: no video stream, or only still pictures (an audio file with its cover).
    """
    moving = _moving_video_streams(container)
    if moving:
        return moving[0]
    if container.streams.video:
        raise DecodeError(f"{path}: no video stream, only a still picture attached to the file (cover art)")
    raise DecodeError(f"{path}: no video stream")


#: Frame rates above this are a header's error, not a video's: DV reports its time base's
#: 60,000 per second as its average rate (its 25 frames a second: a clean file taken for one
#: that lost 98 % of its frames).
_PLAUSIBLE_FPS = 1000


def frame_rate(stream: av.video.stream.VideoStream) -> Fraction | None:
    """The stream's frames per second: its average (right for variable frame rate), unless the
    header gives none or an absurd one, then FFmpeg's guess (as its own tools use); None if neither."""
    for rate in (stream.average_rate, stream.guessed_rate):
        if rate and 0 < rate <= _PLAUSIBLE_FPS:
            return rate
    return None


def other_video_streams(container: av.container.InputContainer) -> int:
    """Moving video streams besides the one annotated (:func:`video_stream`'s): a second camera
    angle, a security recorder's sub-stream, the other programmes of a broadcast capture."""
    return max(0, len(_moving_video_streams(container)) - 1)


def _moving_video_streams(container: av.container.InputContainer) -> list[av.video.stream.VideoStream]:
    import av  # here: the CLI imports this module before PyAV is needed

    stills = av.stream.Disposition.attached_pic | av.stream.Disposition.timed_thumbnails
    return [stream for stream in container.streams.video if not stream.disposition & stills]


def _mp4_without_index(path: Path, size: int) -> str | None:
    """Why an ISO-BMFF file (MP4, MOV) cannot be read, when its top-level boxes say: ``None``
    unless it starts with ``ftyp`` and no ``moov`` box follows."""
    with open(path, "rb") as fh:
        head = fh.read(8)
        if len(head) < 8 or head[4:8] != b"ftyp":
            return None
        offset = 0
        for _ in range(100_000):  # top-level boxes are few; a garbled size cannot loop forever
            fh.seek(offset)
            header = fh.read(16)
            if len(header) < 8:
                break
            box_size, kind = int.from_bytes(header[:4], "big"), header[4:8]
            if kind == b"moov":
                return None
            if box_size == 1 and len(header) == 16:
                box_size = int.from_bytes(header[8:16], "big")
            if box_size < 8:  # 0: the box runs to the end of the file; else garbled
                break
            offset += box_size
    return (f"no index (moov box) in its {size:,} bytes: an MP4/MOV whose recording or copy was "
            "cut short; its frames cannot be located")


#: Pixels of frames in one CPU batch: one 4K UHD frame, or 9 frames of 720p. A batch never holds
#: more (a larger frame is decoded scaled down to this many pixels, see :class:`FrameBatch`), so a
#: worker's memory is bounded by this budget whatever the resolution of the corpus.
CPU_BATCH_PIXELS = 3840 * 2160


def batch_shape(width: int, height: int, batch_size: int, max_pixels: int | None) -> tuple[int, int, int]:
    """(frames per batch, width, height) of decoded batches for a ``width`` x ``height`` video.

    Up to ``batch_size`` frames whose pixels together stay within ``max_pixels``; a single frame
    larger than the budget is scaled down (aspect kept) to fit it. ``None``: no budget.
    """
    if max_pixels is None or width * height <= max_pixels:
        frames = batch_size if max_pixels is None else max(1, min(batch_size, max_pixels // (width * height)))
        return frames, width, height
    shrink = math.sqrt(max_pixels / (width * height))
    return 1, max(2, int(width * shrink) // 2 * 2), max(2, int(height * shrink) // 2 * 2)


#: Sample aspect ratios outside this range are taken for a broken header, not a picture.
_PLAUSIBLE_SAR = (0.25, 4.0)


def sample_aspect(stream: av.video.stream.VideoStream) -> float:
    """Width of the stream's pixels over their height, as a player shows them (1: square pixels).

    DVD, DV, HDV and SD broadcast store frames narrower or wider than they are shown: 16:9 PAL is
    stored 720x576 and shown 1024x576 (sample aspect 64:45). The container's value comes first,
    then the bitstream's, as FFmpeg's players take them; a missing or absurd one counts as 1.
    """
    for value in (stream.sample_aspect_ratio, stream.codec_context.sample_aspect_ratio):
        if value and _PLAUSIBLE_SAR[0] <= float(value) <= _PLAUSIBLE_SAR[1]:
            return float(value)
    return 1.0


def display_size(width: int, height: int, aspect: float) -> tuple[int, int]:
    """The stored ``width`` x ``height`` as shown with pixels of ``aspect`` (width over height):
    the width follows the aspect, the height stays, as FFmpeg's players do (``iw*sar``). A
    stretched width is rounded to an even number (what a 4:2:0 encoder of the overlay needs):
    carphone's 176 pixels of 128:117 are shown 192 wide, 4:3."""
    return (width if aspect == 1.0 else max(2, round(width * aspect / 2) * 2)), height


@dataclass(frozen=True)
class FrameBatch:
    """Sampled frames of one video, in presentation order.

    ``scale`` is source pixels per frame pixel: 1 unless the video's frames exceed the batch's
    pixel budget and were decoded smaller; coordinates found on ``frames`` times ``scale`` are
    pixels of the video as displayed.
    """

    frames: torch.Tensor  # uint8 (B, H, W, 3) RGB on ``device``: host memory from PyAV, GPU from DALI
    frame_index: np.ndarray  # int64 (B,)
    pts_s: np.ndarray  # float64 (B,)
    scale: float = 1.0

    def __len__(self) -> int:
        return len(self.frame_index)

    @property
    def device(self) -> "torch.device":
        return self.frames.device


@dataclass
class DecodeReport:
    """What decoding one video found, filled in by the decoder as it goes.

    A damaged file is decoded as far as it goes: damaged packets are skipped (FFmpeg conceals
    what it can in the frames that follow) and a container that ends early stops the decode
    there; the frames that decode are kept, and this report says what was lost.
    """

    rotation_cw_deg: int = 0  # clockwise turn applied to show frames as displayed: 0, 90, 180, 270
    mirrored: bool = False  # the display matrix mirrors the frame too (applied before the turn)
    width: int = 0  # as displayed: upright, square pixels, in source pixels
    height: int = 0
    sample_aspect: float = 1.0  # the stored pixels' width over height (:func:`sample_aspect`), shown square
    frames_decoded: int = 0
    frames_lost: int = 0  # frames the container holds that did not decode
    bad_packets: int = 0
    first_bad_s: float | None = None  # presentation time of the first lost frame
    stopped_early: str | None = None  # why the container stopped before its end, if it did
    frames_expected: int = 0  # frames the header says the decoded piece holds (0: it does not say); for progress
    tone_mapped: str | None = None  # HDR shown as SDR, e.g. "PQ BT.2020 mapped to SDR BT.709" (decoders.tonemap)
    # [frame_index, width, height] (as displayed) of each frame whose size differs from the frame
    # before it: a recording joined from pieces, a stream that switched renditions
    size_changes: list[list[int]] = field(default_factory=list)
    other_video_streams: int = 0  # moving video streams of the file besides the one decoded (not annotated)

    @property
    def damaged(self) -> bool:
        return bool(self.frames_lost or self.bad_packets or self.stopped_early)

    def describe(self) -> str:
        """One line for the error column and the run summary, e.g. "damaged: 2 bad packets ..."."""
        parts = []
        if self.bad_packets:
            parts.append(f"{self.bad_packets} damaged packet{'s' * (self.bad_packets != 1)} skipped")
        if self.stopped_early:
            parts.append(f"stream ends early ({self.stopped_early})")
        lost = f"{self.frames_lost} of {self.frames_decoded + self.frames_lost} frames lost"
        if self.first_bad_s is not None:
            lost += f", the first at {self.first_bad_s:.3f} s"
        return f"damaged: {'; '.join(parts + [lost])}"


def declared_end_s(stream: av.video.stream.VideoStream) -> float | None:
    """When the video stream ends (s, the frames' clock) as the file's headers say; None if they do not.

    MP4, MOV and most containers time the stream itself. Matroska and WebM (most downloaded
    video, and OBS's recordings) time only the whole file, and FFmpeg's and mkvmerge's muxers
    add each track's end as a ``DURATION`` tag (its end time, not its length: checked on a track
    from 10 to 12 s), which is used when present. The file's own duration (FLV's, a tagless
    WebM's) stands in only for a file with no other stream, whose end could be that stream's (an
    audio track may run on past the last frame).
    """
    if stream.duration and stream.time_base:
        return float(((stream.start_time or 0) + stream.duration) * stream.time_base)
    tagged = _clock_time_s(stream.metadata.get("DURATION") or stream.metadata.get("duration") or "")
    if tagged is not None:
        return tagged
    container = stream.container
    if len(container.streams) == 1 and container.duration:  # microseconds (AV_TIME_BASE)
        # Matroska's duration runs from 0, not from the first frame (the 10-12 s track: 12 s).
        start = 0 if "matroska" in container.format.name else (container.start_time or 0)
        return (start + container.duration) / 1_000_000
    return None


def _clock_time_s(text: str) -> float | None:
    """Seconds of an ``HH:MM:SS.fraction`` time (Matroska's DURATION tag); None if it is not one."""
    hours, _, rest = text.strip().partition(":")
    minutes, _, seconds = rest.partition(":")
    try:
        value = int(hours) * 3600 + int(minutes) * 60 + float(seconds)
    except ValueError:
        return None
    return value if value > 0 and math.isfinite(value) else None


def check_end(first_s: float, last_s: float, count: int, end_s: float, rate: float, report: DecodeReport) -> None:
    """A stream whose last frame comes well before the end its headers declare was cut short
    (an interrupted download or copy, a recorder that stopped): ``report`` says so and counts
    as lost the frames the stream's rate puts between its first frame and that end, less the
    ``count`` that came (so frames missing just before the last one count too: B-frames whose
    packets followed it in the file). Within 2.5 frame periods is the last frame's own duration
    and rounding."""
    period = 1.0 / rate
    if end_s - last_s <= 2.5 * period:
        return
    report.stopped_early = report.stopped_early or f"the last frame is at {last_s:.3f} s of {end_s:.3f} s"
    after = round((end_s - last_s) * rate) - 1
    report.frames_lost = max(report.frames_lost, after, round((end_s - first_s) * rate) - count)
    if report.first_bad_s is None:
        report.first_bad_s = last_s + period


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

    def selector(self, start_s: float | None = None, previous_s: float | None = None) -> "FrameSelector":
        """Per-video state; ``start_s``/``previous_s`` continue a video from inside (a segment)."""
        return FrameSelector(self, start_s, previous_s)


class FrameSelector:
    """Per-video state of a :class:`Sampling`: decides frame by frame, before conversion.

    With ``fps`` a frame is kept when a tick ``t0 + k / fps`` falls after the previous frame and
    at or before it: the first frame at or after each tick. The rule looks only at the frame and
    the one before it, so a segment that knows ``t0`` and its previous frame's time keeps exactly
    the frames the whole video would. Where the clock goes back by a tick or more (recordings
    joined into one file, each starting its clock again: never split into segments), the ticks
    start again from that frame, which is kept, as a video's first frame is.
    """

    #: A frame this close before a tick (in ticks) counts as at it: absorbs rounding in rational
    #: timestamps (1001/30000) and a requested rate a hair below the source's (29.97 for 30000/1001).
    _EPS = 0.01

    def __init__(self, sampling: Sampling, start_s: float | None = None, previous_s: float | None = None) -> None:
        self.sampling = sampling
        self._t0 = start_s
        continuing = previous_s is not None and start_s is not None and sampling.fps is not None
        self._last_tick = self._tick(previous_s) if continuing else None

    def _tick(self, pts_s: float) -> int:
        return math.floor((pts_s - self._t0) * self.sampling.fps + self._EPS)

    def keep(self, frame_index: int, pts_s: float) -> bool:
        if self.sampling.fps is None:
            return frame_index % self.sampling.every_n == 0
        if self._t0 is None:
            self._t0 = pts_s
        tick = self._tick(pts_s)
        if self._last_tick is not None and tick < self._last_tick:  # the clock started again
            self._t0, tick = pts_s, 0
            self._last_tick = None
        kept = self._last_tick is None or tick > self._last_tick
        self._last_tick = tick
        return kept

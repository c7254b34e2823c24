"""HDR video (PQ or HLG, BT.2020) converted to SDR BT.709, as the models were trained on.

Why: an HDR10 camera or an iPhone (HLG by default) stores light on another curve and with
wider primaries. Converted to RGB as if it were SDR, its frames come out darker and flatter
(on the carphone clip stored as PQ they differ from the SDR original by 24.8 grey levels on
average, as HLG by 15.6), and the expressions read from them drift.

How: FFmpeg's scaler maps them itself, in the same call that makes RGB (FFmpeg 8's colour
management, through PyAV's ``dst_color_trc`` and ``dst_color_primaries``): the frames then
differ from the SDR original by 3.1 (PQ) and 2.7 (HLG) grey levels. It works in floating point:
39 ms a 1080p frame on one core, against 5.2 ms for the plain conversion, so an HDR video
annotates more slowly. A faster approximation was tried and dropped: the scaler's curve for
greys as a per-channel table, then BT.2020's primaries matrix (5.6 ms a 1080p frame) matched
on PQ but over-saturated HLG, whose SDR rendering acts on luminance, not on each channel.

Only videos tagged HDR (or BT.2020) take this path: SDR video converts exactly as before.
"""

from __future__ import annotations

import av

from av.video.reformatter import VideoReformatter

try:
    from av.video.reformatter import ColorPrimaries, ColorTrc
except ImportError:  # PyAV before 17: no colour management in its reformatter
    ColorPrimaries = ColorTrc = None  # type: ignore[assignment,misc]

_TRANSFERS = {"SMPTE2084": "PQ", "ARIB_STD_B67": "HLG"}


def sdr_conversion(frame: av.VideoFrame) -> tuple[dict[str, object], str | None]:
    """Reformat options that show ``frame``'s video (by its tags) as SDR BT.709, and what they
    do in words, for the video's facts; ({}, None) for SDR video, or where this PyAV or FFmpeg
    cannot map its colours (tried once here, on ``frame``, so the per-frame conversion never
    has to fall back)."""
    if ColorTrc is None:
        return {}, None
    transfer = next((label for name, label in _TRANSFERS.items()
                     if frame.color_trc == int(getattr(ColorTrc, name))), None)
    wide = frame.color_primaries == int(ColorPrimaries.BT2020)
    if transfer is None and not wide:
        return {}, None
    options = {"dst_color_trc": ColorTrc.BT709, "dst_color_primaries": ColorPrimaries.BT709}
    try:
        VideoReformatter().reformat(frame, format="rgb24", **options)
    except (TypeError, av.error.FFmpegError):  # a PyAV without the options, tags FFmpeg refuses
        return {}, None
    source = " ".join(filter(None, (transfer, "BT.2020" if wide else None)))
    return options, f"{source} mapped to SDR BT.709"

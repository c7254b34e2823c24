"""``annotate overlay``: a video re-encoded with its annotations drawn on, to trust what the rows say.

Each frame is decoded with PyAV, turned upright and given square pixels exactly as the
annotator's PyAV decoder does it (the rows' boxes are pixels of the frame as displayed), drawn on
with OpenCV, and encoded as H.264 with the source's time base and each frame's own pts, so the
overlay lines up with the ``pts_s`` column frame for frame. The output is upright and carries no
rotation matrix; audio is not copied. Frames are matched to rows by presentation time (by
decoded-frame index where a frame has no pts), which stays right after a seek to ``start_s``.
"""

from __future__ import annotations

import os
from collections import defaultdict
from collections.abc import Iterator
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path

import av
import cv2
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.dataset as ds

from annotator.results import Results, open_results
from annotator.schema import BOX_COLUMNS, PROB_COLUMNS
from engines.decoders import DecodeError, display_size, sample_aspect, video_stream
from engines.decoders.deinterlace import deinterlaced
from engines.decoders.orientation import orientation

#: Box colours by track id (matplotlib's tab10, RGB), so a face keeps its colour while tracked.
TRACK_COLOURS = ((31, 119, 180), (255, 127, 14), (44, 160, 44), (214, 39, 40), (148, 103, 189),
                 (140, 86, 75), (227, 119, 194), (127, 127, 127), (188, 189, 34), (23, 190, 207))
_VALENCE_COLOURS = ((46, 160, 67), (200, 40, 40))  # positive, negative
_AROUSAL_COLOUR = (255, 160, 0)
_BAR_BACK = (40, 40, 40)


class OverlayError(ValueError):
    """The video or the results cannot be used; the message names the file and the reason."""


@dataclass(frozen=True)
class Face:
    """What is drawn for one face of one frame."""

    track_id: int | None
    box: tuple[float, float, float, float]  # x1 y1 x2 y2, pixels of the displayed frame
    expression: str
    probability: float
    valence: float | None
    arousal: float | None


@dataclass(frozen=True)
class OverlaySummary:
    out: Path
    frames: int  # frames written
    annotated: int  # frames written with at least one face drawn


def draw_faces(rgb: np.ndarray, faces: list[Face]) -> np.ndarray:
    """Draw each face's box, ``track expression probability`` label and valence/arousal bars, in place.

    Sizes follow the frame (a 176x144 clip and a 4K one both stay readable). The two bars under
    the box run from its centre: valence (green right, red left), then arousal (orange).
    """
    height, width = rgb.shape[:2]
    unit = max(1, round(min(height, width) / 360))
    scale = max(0.3, min(height, width) / 900)
    for face in faces:
        colour = TRACK_COLOURS[(face.track_id or 0) % len(TRACK_COLOURS)]
        x1, y1, x2, y2 = (int(round(v)) for v in face.box)
        cv2.rectangle(rgb, (x1, y1), (x2, y2), colour, unit, cv2.LINE_AA)
        track = "-" if face.track_id is None else str(face.track_id)
        label = f"{track} {face.expression} {face.probability:.2f}"
        (tw, th), base = cv2.getTextSize(label, cv2.FONT_HERSHEY_SIMPLEX, scale, 1)
        top = y1 - th - base - 2 * unit if y1 - th - base - 2 * unit >= 0 else y1  # above the box, or inside
        cv2.rectangle(rgb, (x1, top), (x1 + tw + 2 * unit, top + th + base + 2 * unit), colour, cv2.FILLED)
        cv2.putText(rgb, label, (x1 + unit, top + th + unit), cv2.FONT_HERSHEY_SIMPLEX, scale, (255, 255, 255), 1,
                    cv2.LINE_AA)
        if face.valence is not None and face.arousal is not None:
            bar = max(2, 2 * unit)
            below = y2 + unit + 1 if y2 + unit + 2 * bar + 2 < height else y2 - 2 * bar - unit - 1
            valence_colour = _VALENCE_COLOURS[0] if face.valence >= 0 else _VALENCE_COLOURS[1]
            _bar(rgb, x1, x2, below, bar, face.valence, valence_colour)
            _bar(rgb, x1, x2, below + bar + 1, bar, face.arousal, _AROUSAL_COLOUR)
    return rgb


def _bar(rgb: np.ndarray, x1: int, x2: int, top: int, height: int, value: float,
         colour: tuple[int, int, int]) -> None:
    """A bar as wide as the box, filled from its centre to ``value`` in [-1, 1] of half its width."""
    centre = (x1 + x2) // 2
    end = int(round(centre + max(-1.0, min(1.0, value)) * (x2 - x1) / 2))
    cv2.rectangle(rgb, (x1, top), (x2, top + height - 1), _BAR_BACK, cv2.FILLED)
    cv2.rectangle(rgb, (min(centre, end), top), (max(centre, end), top + height - 1), colour, cv2.FILLED)


def _rows_of(results: Results, video: Path) -> pa.Table:
    """The face rows of ``video``: matched by path as recorded, by real path, then by content id."""
    dataset = results.dataset()
    paths = pc.unique(dataset.to_table(columns=["video_path"])["video_path"]).to_pylist()
    wanted = os.path.realpath(video)
    match = next((p for p in paths if p == str(video)), None) or next(
        (p for p in paths if os.path.realpath(p) == wanted), None)
    if match is not None:
        condition = ds.field("video_path") == match
    else:
        from annotator.pipeline import video_id  # the same content id the rows carry (renamed files)

        condition = ds.field("video_id") == video_id(video)
    columns = ["frame_index", "pts_s", "face_index", "track_id", *BOX_COLUMNS, "expression", *PROB_COLUMNS,
               "valence", "arousal", "error"]
    rows = dataset.to_table(columns=columns, filter=condition)
    if rows.num_rows == 0:
        raise OverlayError(f"{video}: not in {results.path} (no rows with this path or content)")
    if pc.all(pc.is_null(rows["frame_index"])).as_py():
        error = rows.filter(pc.is_valid(rows["error"]))["error"][0].as_py()
        raise OverlayError(f"{video}: failed in {results.path}, nothing to draw ({error})")
    return rows.filter(pc.is_valid(rows["face_index"]))


def faces_by_frame(rows: pa.Table) -> tuple[dict[int, list[Face]], dict[int, list[Face]]]:
    """Faces keyed by pts in microseconds, and by frame index (for frames without a pts)."""
    if rows.num_rows == 0:
        return {}, {}
    probs = np.stack([rows[c].to_numpy(zero_copy_only=False) for c in PROB_COLUMNS], axis=1)
    boxes = np.stack([rows[c].to_numpy(zero_copy_only=False) for c in BOX_COLUMNS], axis=1)
    columns = {name: rows[name].to_pylist() for name in ("frame_index", "pts_s", "track_id", "expression",
                                                        "valence", "arousal")}
    by_pts: dict[int, list[Face]] = defaultdict(list)
    by_index: dict[int, list[Face]] = defaultdict(list)
    for n in range(rows.num_rows):
        face = Face(columns["track_id"][n], tuple(float(v) for v in boxes[n]), columns["expression"][n],
                    float(probs[n].max()), columns["valence"][n], columns["arousal"][n])
        if columns["pts_s"][n] is not None:
            by_pts[_micros(columns["pts_s"][n])].append(face)
        by_index[columns["frame_index"][n]].append(face)
    return by_pts, by_index


def _micros(seconds: float) -> int:
    return int(round(seconds * 1e6))


def write_overlay(video: Path, results_path: Path, out: Path, *, every_n: int = 1, start_s: float | None = None,
                  end_s: float | None = None, crf: int = 18) -> OverlaySummary:
    """Re-encode ``video`` to ``out`` (H.264, MP4) with the faces of ``results_path`` drawn on.

    Every frame from ``start_s`` to ``end_s`` is written, or every ``every_n``-th of them, each
    with its source pts; ``crf`` 0 is lossless. Written to a temporary file, then renamed.

    Raises:
        OverlayError, annotator.results.ResultsError: unusable video or results.
        OSError: ``out`` cannot be written.
    """
    faces_at, faces_of_index = faces_by_frame(_rows_of(open_results(results_path), video))
    try:
        source = av.open(str(video))
    except (av.error.FFmpegError, OSError) as exc:
        raise OverlayError(f"{video}: cannot open ({exc})") from None
    tmp = out.with_name(f".{out.name}.tmp")
    written = annotated = 0
    try:
        with source:
            try:
                stream = video_stream(source, video)  # as annotate run chose it: not a cover
                aspect = sample_aspect(stream)
            except DecodeError as exc:
                raise OverlayError(str(exc)) from None
            stream.thread_type = "AUTO"
            if start_s:
                source.seek(int(start_s / stream.time_base), stream=stream, backward=True, any_frame=False)
            with av.open(str(tmp), "w", format="mp4") as sink:
                encoder: av.video.stream.VideoStream | None = None
                for index, frame in _frames_in_range(source, stream, start_s, end_s, every_n):
                    rgb = _upright(frame, aspect)
                    if frame.pts is not None:
                        faces = faces_at.get(_micros(frame.time), [])
                    else:
                        faces = faces_of_index.get(index, [])
                    if faces:
                        draw_faces(rgb, faces)
                        annotated += 1
                    if encoder is None:
                        encoder = _encoder(sink, stream, rgb.shape, crf)
                    out_frame = av.VideoFrame.from_ndarray(_even(rgb), format="rgb24")
                    out_frame.pts, out_frame.time_base = frame.pts, stream.time_base
                    sink.mux(encoder.encode(out_frame))
                    written += 1
                if encoder is None:
                    raise OverlayError(f"{video}: no frame decoded in the range asked for")
                sink.mux(encoder.encode(None))
        os.replace(tmp, out)
    except av.error.FFmpegError as exc:
        raise OverlayError(f"{video}: cannot decode or encode ({exc})") from None
    finally:
        tmp.unlink(missing_ok=True)
    return OverlaySummary(out, written, annotated)


def _frames_in_range(source: av.container.InputContainer, stream: av.video.stream.VideoStream,
                     start_s: float | None, end_s: float | None, every_n: int) -> Iterator[tuple[int, av.VideoFrame]]:
    """(decoded-frame index, frame) for every ``every_n``-th frame whose time is in [start_s, end_s).

    Interlaced frames come out progressive, as ``annotate run`` saw them (one frame per frame,
    times kept, so rows still match by time)."""
    kept = 0
    for index, frame in enumerate(deinterlaced(source.decode(stream), stream, source.name)):
        time = frame.time
        if start_s is not None and time is not None and time < start_s - 1e-9:
            continue
        if end_s is not None and time is not None and time >= end_s:
            break
        if kept % every_n == 0:
            yield index, frame
        kept += 1


def _upright(frame: av.VideoFrame, aspect: float = 1.0) -> np.ndarray:
    """RGB as displayed: square pixels and the same turn or mirror as engines.decoders.pyav (the
    rows' pixel frame)."""
    width, height = display_size(frame.width, frame.height, aspect)
    rgb = frame.to_ndarray(format="rgb24", width=width, height=height)
    return np.ascontiguousarray(orientation(frame).show(rgb))


def _even(rgb: np.ndarray) -> np.ndarray:
    """H.264 in 4:2:0 needs even sides: an odd last row or column is repeated."""
    height, width = rgb.shape[:2]
    if height % 2 or width % 2:
        rgb = np.pad(rgb, ((0, height % 2), (0, width % 2), (0, 0)), mode="edge")
    return rgb


def _encoder(sink: av.container.OutputContainer, source: av.video.stream.VideoStream, shape: tuple[int, ...],
             crf: int) -> av.video.stream.VideoStream:
    rate = source.average_rate or source.guessed_rate or Fraction(25)
    encoder = sink.add_stream("libx264", rate=rate)
    encoder.height, encoder.width = shape[0] + shape[0] % 2, shape[1] + shape[1] % 2
    encoder.pix_fmt = "yuv420p"
    encoder.time_base = source.time_base  # keep the source's clock: pts are copied, not renumbered
    encoder.codec_context.time_base = source.time_base
    encoder.options = {"crf": str(crf)}
    return encoder

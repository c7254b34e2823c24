"""``annotate overlay``: a video re-encoded with its annotations drawn on, to trust what the rows say.

Each frame is decoded with PyAV, turned upright and given square pixels exactly as the
annotator's PyAV decoder does it (the rows' boxes are pixels of the frame as displayed), drawn on
with OpenCV, and encoded as H.264 with the source's time base and each frame's own pts, so the
overlay lines up with the ``pts_s`` column frame for frame. The output is upright and carries no
rotation matrix; audio is not copied.

Recordings joined from pieces (``cat a.ts b.ts``: TV captures, streams that switched
renditions) break two things a single recording never does:

- Timestamps restart mid-stream, so one pts belongs to several frames. Rows are matched to
  frames by pts and frame index together (:class:`FrameFaces`), so a frame never gets the faces
  of its twin in another piece; and the output clock goes on after a restart instead of going
  back (:class:`_Clock`), since MP4 needs increasing timestamps.
- Frames change size. Each frame is drawn on at its own displayed size, as its rows' boxes are,
  then fitted into the output's size (the first written frame's) as a player with a fixed
  window shows it: aspect kept, centred, black bands (:func:`_letterbox`).
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
from engines.decoders import DecodeError, display_size, frame_rate, sample_aspect, video_stream
from engines.decoders.deinterlace import deinterlaced
from engines.decoders.orientation import orientation
from engines.decoders.segments import packets_from_keyframe

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
    """The rows of ``video``'s sampled frames, faceless ones included (they tell which frames
    share a pts): matched by path as recorded, by real path, then by content id."""
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
    return rows.filter(pc.is_valid(rows["frame_index"]))


def faces_by_frame(rows: pa.Table) -> tuple[dict[int, list[Face]], dict[int, set[int]]]:
    """The faces of each frame index, and the frame indices of the rows at each pts (in
    microseconds): several where the timestamps restart (a joined recording)."""
    faces: dict[int, list[Face]] = defaultdict(list)
    frames_at: dict[int, set[int]] = defaultdict(set)
    for index, pts_s in zip(rows["frame_index"].to_pylist(), rows["pts_s"].to_pylist()):
        if pts_s is not None:
            frames_at[_micros(pts_s)].add(index)
    rows = rows.filter(pc.is_valid(rows["face_index"]))
    if rows.num_rows == 0:
        return faces, frames_at
    probs = np.stack([rows[c].to_numpy(zero_copy_only=False) for c in PROB_COLUMNS], axis=1)
    boxes = np.stack([rows[c].to_numpy(zero_copy_only=False) for c in BOX_COLUMNS], axis=1)
    columns = {name: rows[name].to_pylist() for name in ("frame_index", "track_id", "expression",
                                                        "valence", "arousal")}
    for n in range(rows.num_rows):
        faces[columns["frame_index"][n]].append(
            Face(columns["track_id"][n], tuple(float(v) for v in boxes[n]), columns["expression"][n],
                 float(probs[n].max()), columns["valence"][n], columns["arousal"][n]))
    return faces, frames_at


def _micros(seconds: float) -> int:
    return int(round(seconds * 1e6))


class FrameFaces:
    """The faces of a decoded frame, found by its pts, and by its decoded-frame index as well
    where the rows' timestamps restart.

    A pts names one frame of a single recording, wherever the overlay starts decoding. In one
    joined from pieces (``cat a.ts b.ts``) a pts names a frame of each piece, and a frame that
    the run did not sample would get its twin's faces; there the overlay decodes from the start
    (never seeks), so its decoded index is the rows' ``frame_index`` and tells the twins apart.
    A frame without a pts is matched by index.
    """

    def __init__(self, rows: pa.Table) -> None:
        self.faces, self.frames_at = faces_by_frame(rows)
        pts_of = dict(zip(rows["frame_index"].to_pylist(), rows["pts_s"].to_pylist()))  # one per frame
        timed = [pts_s for _, pts_s in sorted(pts_of.items()) if pts_s is not None]
        #: The frames' pts do not increase with their index: the timestamps restart somewhere.
        self.restarts = any(later <= earlier for earlier, later in zip(timed, timed[1:]))

    def __call__(self, index: int, pts_s: float | None) -> list[Face]:
        if pts_s is None:
            return self.faces.get(index, [])
        frames = self.frames_at.get(_micros(pts_s), set())
        if not self.restarts:
            return self.faces.get(next(iter(frames)), []) if frames else []
        return self.faces.get(index, []) if index in frames else []


class _Clock:
    """Output pts, in the source's time base: the source's own, while they increase.

    A frame whose pts does not come after the last written one (the timestamps restarted: a
    joined recording) is written one ``period`` after it, and the frames that follow keep that
    shift, so a restart plays on as continuous time; MP4 needs increasing timestamps.
    """

    def __init__(self, period: int) -> None:
        self.period, self.shift, self.last = period, 0, None

    def __call__(self, pts: int | None) -> int:
        if pts is None:
            out = 0 if self.last is None else self.last + self.period
        else:
            out = pts + self.shift
            if self.last is not None and out <= self.last:
                self.shift += self.last + self.period - out
                out = self.last + self.period
        self.last = out
        return out


def write_overlay(video: Path, results_path: Path, out: Path, *, every_n: int = 1, start_s: float | None = None,
                  end_s: float | None = None, crf: int = 18) -> OverlaySummary:
    """Re-encode ``video`` to ``out`` (H.264, MP4) with the faces of ``results_path`` drawn on.

    Every frame from ``start_s`` to ``end_s`` is written, or every ``every_n``-th of them, each
    with its source pts (shifted on past a restart of the timestamps, see :class:`_Clock`) and at
    the first written frame's size (a frame of another size letterboxed into it); ``crf`` 0 is
    lossless. Written to a temporary file, then renamed.

    Where the rows' timestamps restart, a time names a frame of each piece and ``start_s`` and
    ``end_s`` are ambiguous: the range is then their first passage (see :func:`_frames_in_range`),
    decoded from the beginning of the file rather than seeked to, since a seek by time lands in
    whichever piece FFmpeg's bisection finds (MPEG-TS has no index) and the frame index that
    tells the pieces' rows apart would be lost.

    Raises:
        OverlayError, annotator.results.ResultsError: unusable video or results.
        OSError: ``out`` cannot be written.
    """
    faces_of = FrameFaces(_rows_of(open_results(results_path), video))
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
            rate = frame_rate(stream) or Fraction(25)
            clock = _Clock(max(1, round(1 / (rate * stream.time_base))))
            if start_s and not faces_of.restarts:
                # MPEG-TS has no index: a seek can land past the keyframe (see packets_from_keyframe).
                packets = packets_from_keyframe(source, stream, int(start_s / stream.time_base))
            else:
                packets = source.demux(stream)
            frames = (frame for packet in packets for frame in packet.decode())
            # The movie's clock is the stream's, so the edit list that starts the track at its
            # first pts (0.067 s in a TS) keeps it exactly, not rounded to FFmpeg's milliseconds.
            with av.open(str(tmp), "w", format="mp4",
                         options={"movie_timescale": str(stream.time_base.denominator)}) as sink:
                encoder: av.video.stream.VideoStream | None = None
                size: tuple[int, int] = (0, 0)  # the output's (height, width): the first frame's
                for index, frame in _frames_in_range(frames, stream, source.name, start_s, end_s, every_n):
                    rgb = _upright(frame, aspect)
                    if faces := faces_of(index, frame.time):
                        draw_faces(rgb, faces)
                        annotated += 1
                    if encoder is None:
                        size = rgb.shape[:2]
                        encoder = _encoder(sink, stream, rate, size, crf)
                    out_frame = av.VideoFrame.from_ndarray(_even(_letterbox(rgb, *size)), format="rgb24")
                    out_frame.pts, out_frame.time_base = clock(frame.pts), stream.time_base
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


def _frames_in_range(frames: Iterator[av.VideoFrame], stream: av.video.stream.VideoStream, name: str,
                     start_s: float | None, end_s: float | None, every_n: int) -> Iterator[tuple[int, av.VideoFrame]]:
    """(decoded-frame index, frame) for every ``every_n``-th of ``frames`` whose time is in [start_s, end_s).

    A range asked for is one passage through it: where the timestamps restart (a recording
    joined from pieces), the first; it ends at a frame at or after ``end_s``, or at a restart.
    Interlaced frames come out progressive, as ``annotate run`` saw them (one frame per frame,
    times kept, so rows still match by time)."""
    ranged = start_s is not None or end_s is not None
    kept = 0
    previous: float | None = None
    for index, frame in enumerate(deinterlaced(frames, stream, name)):
        time = frame.time
        if time is not None:
            if ranged and kept and previous is not None and time < previous:
                break  # the timestamps restarted: the passage through the range is over
            previous = time
            if start_s is not None and time < start_s - 1e-9:
                continue
            if end_s is not None and time >= end_s:
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


def _letterbox(rgb: np.ndarray, height: int, width: int) -> np.ndarray:
    """``rgb`` fitted into ``height`` x ``width`` as a player with a fixed window shows a frame
    of another size: scaled with its aspect kept (OpenCV's area average to shrink, bilinear to
    enlarge), centred, the bands left black. A frame of that size is returned as it is."""
    h, w = rgb.shape[:2]
    if (h, w) == (height, width):
        return rgb
    scale = min(width / w, height / h)
    fit_w, fit_h = max(1, min(width, round(w * scale))), max(1, min(height, round(h * scale)))
    picture = cv2.resize(rgb, (fit_w, fit_h), interpolation=cv2.INTER_AREA if scale < 1 else cv2.INTER_LINEAR)
    boxed = np.zeros((height, width, 3), np.uint8)
    top, left = (height - fit_h) // 2, (width - fit_w) // 2
    boxed[top:top + fit_h, left:left + fit_w] = picture
    return boxed


def _even(rgb: np.ndarray) -> np.ndarray:
    """H.264 in 4:2:0 needs even sides: an odd last row or column is repeated."""
    height, width = rgb.shape[:2]
    if height % 2 or width % 2:
        rgb = np.pad(rgb, ((0, height % 2), (0, width % 2), (0, 0)), mode="edge")
    return rgb


def _encoder(sink: av.container.OutputContainer, source: av.video.stream.VideoStream, rate: Fraction,
             shape: tuple[int, ...], crf: int) -> av.video.stream.VideoStream:
    encoder = sink.add_stream("libx264", rate=rate)
    encoder.height, encoder.width = shape[0] + shape[0] % 2, shape[1] + shape[1] % 2
    encoder.pix_fmt = "yuv420p"
    encoder.time_base = source.time_base  # keep the source's clock: pts are copied (see _Clock)
    encoder.codec_context.time_base = source.time_base
    encoder.options = {"crf": str(crf)}
    return encoder

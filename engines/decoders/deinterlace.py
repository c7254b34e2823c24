"""Interlaced video made progressive before faces are looked for: FFmpeg's ``bwdif`` filter.

Broadcast recordings (1080i, 576i: TV archives, MPEG-TS captures) store two fields per frame,
taken 1/50 or 1/60 s apart; shown as one frame, anything that moves is combed, and a face's
aligned crop with it. ``bwdif`` rebuilds each frame from its fields and its neighbours, one frame
out per frame in (``send_frame``), timestamps kept, so frame indices and times are those of the
stream. Only frames the decoder marks interlaced are touched (``deint=interlaced``); a video
none of whose frames is marked interlaced, and whose stream declares no field order, never
builds a graph, so progressive video is decoded exactly as without this module.
"""

from __future__ import annotations

import itertools
import logging
from collections.abc import Iterator

import av

log = logging.getLogger(__name__)

#: FFmpeg's AVFieldOrder values for interlaced streams (TT, BB, TB, BT); 0 unknown, 1 progressive.
_INTERLACED_FIELD_ORDERS = frozenset({2, 3, 4, 5})
_FILTER = "bwdif"
_FILTER_ARGS = "mode=send_frame:parity=auto:deint=interlaced"


def is_interlaced(stream: av.video.stream.VideoStream, first: av.VideoFrame | None) -> bool:
    """Whether a stream's frames are interlaced: its first frame says so, or its header's field order."""
    if first is not None and first.interlaced_frame:
        return True
    return int(getattr(stream.codec_context, "field_order", 0) or 0) in _INTERLACED_FIELD_ORDERS


def deinterlaced(frames: Iterator[av.VideoFrame], stream: av.video.stream.VideoStream,
                 path: str = "") -> Iterator[av.VideoFrame]:
    """``frames`` (decoded, in presentation order) with interlaced ones made progressive.

    One frame out per frame in, a frame behind (``bwdif`` looks at the next frame; the last comes
    out at the end). A frame of another size or pixel format (recordings joined from pieces: an
    SD and an HD broadcast) gets a graph of its own, the frames the last one holds out first:
    ``bwdif`` takes one size, and FFmpeg failed the whole video at the first frame of another.
    Where the filter fails otherwise, the frames it holds come out, the rest pass as decoded, and
    the log says so once.
    """
    first = next(frames, None)
    if first is None:
        return
    if not is_interlaced(stream, first):
        # Progressive so far: frames pass as decoded, unless one marked interlaced comes (a
        # recording joined from a progressive piece and an interlaced one); the filter runs from it.
        yield first
        first = None
        for frame in frames:
            if frame.interlaced_frame:
                first = frame
                break
            yield frame
        if first is None:
            return
    graph: av.filter.Graph | None = None
    shape = _shape(first)
    for frame in itertools.chain([first], frames):
        if _shape(frame) != shape:
            if graph is not None:
                yield from _drain(graph, flush=True)
            graph, shape = None, _shape(frame)
        try:
            if graph is None:  # built here, so a size or format the filter refuses stops it as below
                graph = _graph(frame, stream)
            graph.push(frame)
        except av.error.FFmpegError as exc:
            log.warning("%s: deinterlacing stopped (%s); the rest of the video is decoded as stored", path, exc)
            if graph is not None:
                yield from _drain(graph, flush=True)
            yield frame
            yield from frames
            return
        yield from _drain(graph, flush=False)
    if graph is not None:
        yield from _drain(graph, flush=True)


def _shape(frame: av.VideoFrame) -> tuple[int, int, str]:
    return frame.width, frame.height, frame.format.name


def _graph(frame: av.VideoFrame, stream: av.video.stream.VideoStream) -> av.filter.Graph:
    """``bwdif`` for frames of ``frame``'s size and pixel format, on the stream's clock."""
    graph = av.filter.Graph()
    source = graph.add_buffer(width=frame.width, height=frame.height, format=frame.format.name,
                              time_base=stream.time_base)
    bwdif, sink = graph.add(_FILTER, _FILTER_ARGS), graph.add("buffersink")
    source.link_to(bwdif)
    bwdif.link_to(sink)
    graph.configure()
    return graph


def _drain(graph: av.filter.Graph, flush: bool) -> Iterator[av.VideoFrame]:
    """The frames the graph has ready (all it holds, after an end-of-stream push, with ``flush``)."""
    try:
        if flush:
            graph.push(None)
        while True:
            yield graph.pull()
    except (av.error.BlockingIOError, av.error.EOFError):
        return

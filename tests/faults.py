"""Broken and unusual inputs, made from the real carphone clip: what users' folders really hold.

Each maker writes a real file with PyAV and then damages or marks it the way real files are
damaged or marked: packets overwritten in the middle, a cut-off tail, a display matrix saying
"turn me 90 degrees" as phones write it.
"""

from __future__ import annotations

import io
import struct
from fractions import Fraction
from pathlib import Path

import av
import cv2
import numpy as np


def carphone_frames(carphone: Path) -> list[np.ndarray]:
    with av.open(str(carphone)) as container:
        return [f.to_ndarray(format="rgb24") for f in container.decode(video=0)]


def write_clip(path: Path, frames: list[np.ndarray], n: int, fps: int = 30, faststart: bool = False,
               codec: str = "libx264", keyint: int | None = None, lossless: bool = False) -> Path:
    """``n`` frames (cycling through ``frames``) as H.264 MP4 at ``fps``, a keyframe every ``keyint``.

    x264 reads memory it never wrote (measured: the same frames give other bitstreams after the
    process's heap held other data, even with one thread), so a lossy clip's pixels may differ a
    little from one test run to the next. ``lossless``: x264 at QP 0, whose decoded frames are the
    YUV 4:2:0 of ``frames`` exactly, whatever choices the encoder made: for exact comparisons.
    """
    height, width = frames[0].shape[:2]
    options = {"movflags": "faststart"} if faststart else {}
    codec_options = {"g": str(keyint)} if keyint else {}
    if lossless:
        codec_options["qp"] = "0"
    with av.open(str(path), "w", options=options) as out:
        stream = out.add_stream(codec, rate=fps, options=codec_options)
        stream.width, stream.height, stream.pix_fmt = width, height, "yuv420p"
        for i in range(n):
            out.mux(stream.encode(av.VideoFrame.from_ndarray(frames[i % len(frames)], format="rgb24")))
        out.mux(stream.encode())
    return path


def video_packets(path: Path) -> list[tuple[int, int]]:
    """(byte offset, size) of each video packet, in file order."""
    with av.open(str(path)) as container:
        return [(p.pos, p.size) for p in container.demux(video=0) if p.size]


def overwrite_packets(src: Path, dst: Path, indices: tuple[int, ...], seed: int = 1) -> Path:
    """A copy of ``src`` whose packets ``indices`` are overwritten with noise (their size kept)."""
    data = bytearray(src.read_bytes())
    rng = np.random.default_rng(seed)
    for pos, size in (video_packets(src)[i] for i in indices):
        data[pos + 4:pos + size] = rng.integers(0, 256, size - 4, dtype=np.uint8).tobytes()
    dst.write_bytes(bytes(data))
    return dst


def truncate(src: Path, dst: Path, fraction: float) -> Path:
    data = src.read_bytes()
    dst.write_bytes(data[: int(len(data) * fraction)])
    return dst


def write_interlaced_clip(path: Path, frames: list[np.ndarray], n: int, fps: int = 30) -> Path:
    """``n`` interlaced H.264 frames, top field first, as a broadcast camera makes them: frame k's
    even rows come from ``frames[2k]`` and its odd rows from ``frames[2k + 1]``, a field period
    later, so whatever moves is combed. Frames are scaled to 352x288 (x264 interlaced coding
    wants a height that is a multiple of 32 per field pair)."""
    import cv2

    scaled = [cv2.resize(f, (352, 288), interpolation=cv2.INTER_AREA) for f in frames]
    with av.open(str(path), "w") as out:
        stream = out.add_stream("libx264", rate=fps, options={"x264-params": "interlaced=1:tff=1"})
        stream.width, stream.height, stream.pix_fmt = 352, 288, "yuv420p"
        for k in range(n):
            frame = scaled[(2 * k) % len(scaled)].copy()
            frame[1::2] = scaled[(2 * k + 1) % len(scaled)][1::2]
            out.mux(stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")))
        out.mux(stream.encode())
    return path


def write_anamorphic_clip(path: Path, frames: list[np.ndarray], n: int, aspect: Fraction, fps: int = 30) -> Path:
    """``frames`` (square pixels) stored as DVD, DV, HDV and SD broadcast store them: squeezed to
    ``1 / aspect`` of their width (INTER_AREA) and tagged with that sample aspect ratio, so a
    player shows the original shape. H.264 MP4; the ratio goes in the bitstream and the ``pasp`` box.
    """
    height, width = frames[0].shape[:2]
    stored = round(width / aspect)
    with av.open(str(path), "w") as out:
        stream = out.add_stream("libx264", rate=fps)
        stream.width, stream.height, stream.pix_fmt = stored, height, "yuv420p"
        stream.codec_context.sample_aspect_ratio = aspect
        for i in range(n):
            squeezed = cv2.resize(frames[i % len(frames)], (stored, height), interpolation=cv2.INTER_AREA)
            out.mux(stream.encode(av.VideoFrame.from_ndarray(squeezed, format="rgb24")))
        out.mux(stream.encode())
    return path


def combing(frame: np.ndarray) -> float:
    """Mean distance of each row from the mean of its neighbours (grey levels): large where
    fields taken at different times are woven into one frame."""
    grey = frame.astype(np.float32).mean(axis=2)
    return float(np.abs(grey[1:-1] - (grey[:-2] + grey[2:]) / 2).mean())


def start_inside_a_gop(src: Path, dst: Path, packets_before_keyframe: int, keyframe: int = 1) -> Path:
    """A copy of ``src``'s video (same container type) whose first packet is ``packets_before_keyframe``
    packets before its ``keyframe``-th keyframe, as a broadcast capture starts: those first frames
    reference frames that are not in the file, so they cannot be decoded."""
    with av.open(str(src)) as inp:
        stream = inp.streams.video[0]
        packets = [p for p in inp.demux(stream) if p.size]
        first = [i for i, p in enumerate(packets) if p.is_keyframe][keyframe] - packets_before_keyframe
        with av.open(str(dst), "w") as out:
            copy = out.add_stream_from_template(stream)
            for packet in packets[first:]:
                packet.stream = copy
                out.mux(packet)
    return dst


def trim_by_edit_list(src: Path, dst: Path, frames: int) -> Path:
    """A copy of an MP4 (one video track, one edit, as FFmpeg writes them) that starts ``frames``
    frames later by its edit list alone, as a phone's "trim" or a lossless cut does: the packets
    before the new start stay in the file, needed to decode the frames after them.

    The edit (ISO 14496-12 ``elst``, version 0) gets its media time moved by ``frames`` frames of
    the track's timescale and its duration shortened by as much of the movie's timescale.
    """
    with av.open(str(src)) as container:
        stream = container.streams.video[0]
        rate = float(stream.average_rate)
        ticks = round(1 / (rate * float(stream.time_base)))  # track timescale per frame
    data = bytearray(src.read_bytes())
    movie_scale = int.from_bytes(data[data.find(b"mvhd") + 16:data.find(b"mvhd") + 20], "big")  # version 0
    at = data.find(b"elst")
    assert data[at + 4] == 0 and int.from_bytes(data[at + 8:at + 12], "big") == 1, "one version-0 edit expected"
    duration, media_time = at + 12, at + 16
    shorter = round(frames / rate * movie_scale)
    data[duration:duration + 4] = (int.from_bytes(data[duration:duration + 4], "big") - shorter).to_bytes(4, "big")
    data[media_time:media_time + 4] = (int.from_bytes(data[media_time:media_time + 4], "big")
                                       + frames * ticks).to_bytes(4, "big")
    dst.write_bytes(bytes(data))
    return dst


def _box(kind: bytes, payload: bytes) -> bytes:
    return struct.pack(">I", 8 + len(payload)) + kind + payload


def add_cover_art(src: Path, dst: Path, picture: np.ndarray, before_tracks: bool = True) -> Path:
    """A copy of an MP4 (its ``moov`` last, as FFmpeg writes it) with ``picture`` as its cover
    art: the iTunes ``covr`` tag (``moov/udta/meta/ilst``), as yt-dlp's ``--embed-thumbnail`` and
    iTunes write it. FFmpeg lists it as a one-frame video stream flagged "attached picture";
    ``before_tracks`` puts the tags right after ``mvhd``, so that stream is stream 0.

    The media data comes before ``moov``, so no chunk offset moves.
    """
    data = src.read_bytes()
    at, boxes = 0, []
    while at < len(data):
        size, kind = struct.unpack(">I4s", data[at:at + 8])
        boxes.append((kind, at, size))
        at += size
    kind, moov_at, moov_size = boxes[-1]
    assert kind == b"moov", "an MP4 with its index last expected"
    moov = data[moov_at + 8:moov_at + moov_size]
    assert moov[4:8] == b"mvhd"
    jpeg = io.BytesIO()
    av.VideoFrame.from_ndarray(np.ascontiguousarray(picture), format="rgb24").to_image().save(jpeg, format="JPEG")
    handler = _box(b"hdlr", bytes(8) + b"mdir" + b"appl" + bytes(8) + b"\0")
    cover = _box(b"covr", _box(b"data", struct.pack(">II", 13, 0) + jpeg.getvalue()))  # 13: JPEG
    tags = _box(b"udta", _box(b"meta", bytes(4) + handler + _box(b"ilst", cover)))
    mvhd_end = struct.unpack(">I", moov[:4])[0]
    inner = moov[:mvhd_end] + tags + moov[mvhd_end:] if before_tracks else moov + tags
    dst.write_bytes(data[:moov_at] + _box(b"moov", inner))
    return dst


def set_display_rotation(src: Path, dst: Path, clockwise_deg: int) -> Path:
    """A copy of an MP4 whose track header says "turn clockwise by ``clockwise_deg``" to display.

    Phones store sensor-oriented frames and this matrix (ISO 14496-12 ``tkhd``), exactly as here.
    """
    one = 0x10000
    turn = {90: (0, one, -one, 0), 180: (-one, 0, 0, -one), 270: (0, -one, one, 0)}[clockwise_deg]
    return set_display_matrix(src, dst, *turn)


def set_display_matrix(src: Path, dst: Path, a: int, b: int, c: int, d: int) -> Path:
    """A copy of an MP4 whose track header's display matrix has the 2x2 part ``a b c d`` (16.16
    fixed point): stored pixel (x, y) is shown at (a x + c y, b x + d y). A turn, or a mirror, as
    some cameras and apps store front-camera video."""
    data = bytearray(src.read_bytes())
    at = data.find(b"tkhd")
    version = data[at + 4]
    matrix_at = at + 8 + (32 if version == 1 else 20) + 8 + 8  # times and ids, reserved, layer..volume
    data[matrix_at:matrix_at + 36] = struct.pack(">9i", a, b, 0, c, d, 0, 0, 0, 0x40000000)
    dst.write_bytes(bytes(data))
    return dst


def write_joined_ts(path: Path, pieces: list[tuple[list[np.ndarray], int]], fps: int = 30,
                    continuous: bool = False, interlaced: bool = False) -> Path:
    """MPEG-TS recordings joined byte for byte (``cat a.ts b.ts``), as joined recordings are:
    each piece's frames (cycled to its count) at their own size, and each piece's timestamps
    starting again from the beginning; ``continuous``: each piece's timestamps go on from the
    piece before, as a live stream's do when it switches renditions. ``interlaced``: each frame
    woven from two of ``frames`` as :func:`write_interlaced_clip`'s are (heights: multiples of 32)."""
    data = b""
    first = 0
    for frames, n in pieces:
        height, width = frames[0].shape[:2]
        piece = path.with_name(f".{path.stem}-{len(data)}.ts")
        with av.open(str(piece), "w", format="mpegts") as out:
            # Continuous time without B-frames: x264 would delay each piece's clock by two frames.
            options = {"bf": "0"} if continuous else {}
            if interlaced:
                options["x264-params"] = "interlaced=1:tff=1"
            stream = out.add_stream("libx264", rate=fps, options=options)
            stream.width, stream.height, stream.pix_fmt = width, height, "yuv420p"
            for i in range(n):
                picture = frames[(2 * i if interlaced else i) % len(frames)]
                if interlaced:
                    picture = picture.copy()
                    picture[1::2] = frames[(2 * i + 1) % len(frames)][1::2]
                frame = av.VideoFrame.from_ndarray(picture, format="rgb24")
                frame.pts = first + i if continuous else i
                out.mux(stream.encode(frame))
            out.mux(stream.encode())
        first += n
        data += piece.read_bytes()
        piece.unlink()
    path.write_bytes(data)
    return path

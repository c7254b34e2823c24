"""Benchmark media made from real footage: the carphone clip upscaled with PyAV."""

from __future__ import annotations

from pathlib import Path

import av


def upscale(src: Path, dst: Path, width: int, height: int, max_frames: int | None = None) -> Path:
    """Re-encode ``src`` at ``width``x``height`` H.264 (bicubic scaling, same timestamps)."""
    dst.parent.mkdir(parents=True, exist_ok=True)
    tmp = dst.with_name(f".{dst.name}.tmp{dst.suffix}")
    with av.open(str(src)) as inp, av.open(str(tmp), "w") as out:
        in_stream = inp.streams.video[0]
        stream = out.add_stream("libx264", rate=in_stream.average_rate)
        stream.width, stream.height, stream.pix_fmt = width, height, "yuv420p"
        stream.options = {"crf": "20", "preset": "veryfast"}
        for i, frame in enumerate(inp.decode(in_stream)):
            if max_frames is not None and i >= max_frames:
                break
            scaled = frame.reformat(width=width, height=height, format="yuv420p", interpolation="BICUBIC")
            scaled.pts, scaled.time_base = frame.pts, frame.time_base
            for packet in stream.encode(scaled):
                out.mux(packet)
        for packet in stream.encode():
            out.mux(packet)
    tmp.replace(dst)
    return dst

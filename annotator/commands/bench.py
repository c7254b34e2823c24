"""``annotate bench``: the throughput benchmark (each stage alone, the whole pipeline, optionally Ray).

The work is in :mod:`benchmarks.suite` (and :mod:`benchmarks.stage`, which runs each stage in
its own process); this module only parses options and prints.
"""

from __future__ import annotations

import os
from pathlib import Path

import click

from annotator.commands.options import cache_dir
from annotator import config as run_defaults  # the run's defaults, so a bench measures what a run does

EPILOG = """\b
Examples:
  annotate bench                                   # default clips, onnxrt + torch, batch 4 8 16
  annotate bench --quick --backend onnxrt --batch-size 8
  annotate bench --video my.mp4 --batch-size 8,32 --out runs/bench.json
  annotate bench --ray-workers 1,2 --memory        # also annotate run through Ray, and memory
  python -m json.tool bench.json                   # compare reports across commits

\b
Default clips (made offline once, cached in --workdir): the carphone clip upscaled
to 1280x720 and to 1920x1080 and looped to 300 frames, and a 1280x720 clip of four
real faces (48-320 px) with per-frame ground truth (recall is reported for it).
Each stage runs in its own process with one thread, as one Ray worker does, on
frames decoded once and held in memory; the pipeline runs in process, no Ray.
TensorRT and DALI run where a CUDA device and their packages are present;
otherwise they are skipped with the reason.
"""


class _IntList(click.ParamType):
    """An integer, or several separated by commas (``8`` or ``4,8,16``)."""

    name = "N[,N...]"

    def convert(self, value, param, ctx):
        if isinstance(value, (list, tuple)):
            return value
        try:
            numbers = tuple(int(part) for part in str(value).replace(" ", ",").split(",") if part)
        except ValueError:
            self.fail(f"{value!r} is not a list of integers", param, ctx)
        if not numbers or min(numbers) < 1:
            self.fail(f"{value!r}: give integers >= 1", param, ctx)
        return numbers


def _flatten(values: tuple[tuple[int, ...], ...]) -> tuple[int, ...]:
    return tuple(dict.fromkeys(n for group in values for n in group))


@click.command("bench", epilog=EPILOG)
@click.option("--video", "videos", multiple=True, type=click.Path(exists=True, dir_okay=False, path_type=Path),
              help="A clip to measure (repeatable).  [default: the three generated clips]")
@click.option("--batch-size", "batch_sizes", multiple=True, type=_IntList(),
              help="Frames per decoded batch (repeatable, or comma-separated).  [default: 4,8,16]")
@click.option("--backend", "backends", multiple=True, type=click.Choice(["onnxrt", "torch", "tensorrt"]),
              help="Inference backend (repeatable).  [default: onnxrt and torch, and tensorrt where it can run]")
@click.option("--device", type=click.Choice(["auto", "cpu", "cuda"]), default="auto", show_default=True)
@click.option("--detect-every", type=click.IntRange(min=1), default=run_defaults.DEFAULT_DETECT_EVERY,
              show_default=True,
              help="Full-frame detection every K-th frame, tracked faces re-found in between (as annotate run).")
@click.option("--scan-every", type=click.IntRange(min=0), default=run_defaults.DEFAULT_SCAN_EVERY, show_default=True,
              help="A keyframe every N frames (the first included) scans at up to twice --det-size (as annotate run).")
@click.option("--det-size", type=click.IntRange(32, 4096), default=run_defaults.DEFAULT_DET_SIZE, show_default=True)
@click.option("--int8-keyframes/--no-int8-keyframes", default=True, show_default=True,
              help="Keyframes through the detector's int8 copy on a CPU with ONNX Runtime (as annotate run); full "
                   "detection on every frame, the comparison, always uses the float network.")
@click.option("--min-face", type=click.FloatRange(min=0), default=run_defaults.DEFAULT_MIN_FACE, show_default=True)
@click.option("--det-threshold", type=click.FloatRange(0, 1, min_open=True, max_open=True),
              default=run_defaults.DEFAULT_DET_THRESHOLD, show_default=True)
@click.option("--detector", default=run_defaults.DEFAULT_DETECTOR, show_default=True)
@click.option("--model", "scorer", default=run_defaults.DEFAULT_SCORER, show_default=True,
              help="Scorer name or model directory.")
@click.option("--frames", type=click.IntRange(min=1), default=None,
              help="Frames of each clip to measure.  [default: 300; 48 with --quick]")
@click.option("--full-frames", type=click.IntRange(min=1), default=None,
              help="Frames for the comparison with full-frame detection on every frame (speed, and "
                   "expression agreement on the same faces).  [default: 300; 16 with --quick]")
@click.option("--threads", type=click.IntRange(min=1), default=1, show_default=True,
              help="Threads per stage process (1: as one Ray worker per core).")
@click.option("--repeats", type=click.IntRange(min=1), default=None,
              help="Timed passes of each stage and of the pipeline; the median is reported (full detection "
                   "on every frame: one).  [default: 3; 1 with --quick]")
@click.option("--rounds", type=click.IntRange(min=1), default=1, show_default=True,
              help="Runs of every stage's process, interleaved (round 1 runs every stage, then round 2 ...): "
                   "each stage reports its median round and the ratio is the median of the rounds' ratios, "
                   "so a slow minute of a shared machine cannot decide it alone.")
@click.option("--quick", is_flag=True, help="Fewer frames (a smoke test, e.g. for CI); numbers are rough.")
@click.option("--workdir", type=click.Path(file_okay=False, path_type=Path), default=None,
              help="Where the generated clips are cached.  [default: <cache-dir>/bench-media]")
@click.option("--out", "-o", type=click.Path(dir_okay=False, path_type=Path), default=Path("bench.json"),
              show_default=True, help="The JSON report (machine, versions, options, results).")
@click.option("--plot", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="PNG of per-stage time per frame.  [default: the --out path with .png]")
@click.option("--ray-workers", multiple=True, type=_IntList(),
              help="Also time 'annotate run' through Ray with these worker counts (e.g. 1,2).")
@click.option("--ray-copies", type=click.IntRange(min=1), default=None,
              help="Copies of each clip for the Ray runs.  [default: the most workers]")
@click.option("--memory", is_flag=True,
              help="Also check memory stays flat: peak RSS on a 1-minute vs a 20-minute clip (15 s vs 1 min with --quick).")
@cache_dir
def bench(videos: tuple[Path, ...], batch_sizes, backends: tuple[str, ...], ray_workers, workdir: Path | None,
          out: Path, plot: Path | None, cache_dir: Path | None, **options) -> None:
    """Measure throughput: each stage alone (decode, detect, align, score, write) and the whole
    per-video pipeline, per clip, backend and batch size.

    Prints frames/s of each stage and of the pipeline, the ratio of the pipeline to its slowest
    stage, per-stage shares, faces/s and peak RSS; writes them as JSON to OUT, with the machine,
    package versions and options, and a PNG plot of per-stage time.
    """
    from benchmarks.suite import BenchError, BenchOptions, format_tables, plot as draw, run_bench, write_json
    from engines.cache import cache_root

    if cache_dir is not None:
        os.environ["ANNOTATOR_CACHE"] = str(cache_dir)  # the stage processes load models from it
    settings = BenchOptions(
        videos=videos, batch_sizes=_flatten(batch_sizes) or BenchOptions.batch_sizes, backends=backends,
        workdir=workdir or cache_root(cache_dir) / "bench-media", ray_workers=_flatten(ray_workers), **options,
    )
    echo = lambda line: click.echo(line, err=True)  # noqa: E731 - progress on stderr, the tables on stdout
    try:
        report = run_bench(settings, echo=echo)
    except BenchError as exc:
        raise click.ClickException(str(exc)) from None
    except RuntimeError as exc:  # a stage process failed: its message ends with its stderr
        raise click.ClickException(str(exc)) from None
    write_json(report, out)
    picture = None
    try:
        picture = draw(report, plot or out.with_suffix(".png")) if report["results"] else None
    except ImportError:
        echo("no plot: it needs matplotlib (pip install -e .[bench])")
    click.echo(format_tables(report))
    click.echo(f"\nwrote {out}" + (f" and {picture}" if picture else ""))

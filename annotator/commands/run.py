"""``annotate run PATH... --out OUT``: the main job."""

from __future__ import annotations

from pathlib import Path
from typing import BinaryIO

import click

from annotator.cluster import release_ray
from annotator.commands.options import cache_dir, files_from, listed_videos, status_every
from annotator.config import (
    DEFAULT_DET_SIZE,
    DEFAULT_DET_THRESHOLD,
    DEFAULT_DETECT_EVERY,
    DEFAULT_DETECTOR,
    DEFAULT_MIN_FACE,
    DEFAULT_SCAN_EVERY,
    DEFAULT_SCORER,
    DEFAULT_STALL_TIMEOUT_S,
    MAX_PIPELINES_PER_GPU,
    ConfigError,
    RunConfig,
    check_out_name,
)
from engines.decoders import Sampling
from engines.sources import FetchError

EPILOG = """\b
Examples:
  annotate run videos/ --out results.parquet
  annotate run a.mp4 b.mkv --out results/ --sample-fps 5
  annotate run /data/corpus --out /data/out/ --address auto --device cuda
  find /data -name '*.mp4' -print0 | annotate run --files-from - --out out/

\b
Exit codes:
  0  every video annotated
  1  the program or the Ray cluster failed, or the output stopped accepting
     writes (finished videos are kept: re-run the same command to resume)
  2  usage error: bad option or path, an --out that cannot be used, or one
     that another run is writing; nothing was done
  3  the run finished, but some inputs failed or were damaged (see the
     error column; a re-run retries the failed ones)
"""
#: Failed or damaged videos listed after the summary line; the rest are in the error column.
_PROBLEMS_SHOWN = 10


@click.command("run", epilog=EPILOG)
@click.argument("paths", nargs=-1, type=click.Path(path_type=Path))
@click.option("--out", "-o", required=True, type=click.Path(path_type=Path),
              help="A .parquet file, or a directory of Parquet parts (one per video).")
@files_from
@click.option("--sample-fps", type=click.FloatRange(min=0, min_open=True), default=None,
              help="Keep about F frames per second (by timestamp).  [default: every frame]")
@click.option("--every-n", type=click.IntRange(min=1), default=None, help="Keep every N-th frame.")
@click.option("--batch-size", type=click.IntRange(min=1), default=None,
              help="Frames per detector batch.  [default: 32 on a GPU, 8 on a CPU]")
@click.option("--workers", type=click.IntRange(min=0), default=None,
              help="Ray workers (0: run in this process).  [default: sized to the cluster, 1 per GPU or CPU core]")
@click.option("--pipelines-per-gpu", type=click.IntRange(1, MAX_PIPELINES_PER_GPU), default=None,
              help="Decode pipelines (Ray workers) per GPU, each with 1/N of it.  [default: one per NVDEC "
                   "engine of the GPU model Ray reports (7 on an H100), within its memory; else 1]")
@click.option("--address", default=None,
              help="Join this Ray cluster ('auto' or host:port).  [default: start a local instance]")
@click.option("--device", type=click.Choice(["auto", "cpu", "cuda"]), default="auto", show_default=True)
@click.option("--decoder", type=click.Choice(["auto", "pyav", "dali"]), default="auto", show_default=True,
              help="auto: on a GPU, DALI (NVDEC) for each file it can decode, PyAV for the rest; PyAV on a "
                   "CPU. dali: also on a CPU, where DALI's reader takes VP8/VP9/MJPEG and PyAV the rest.")
@click.option("--deinterlace/--no-deinterlace", default=True, show_default=True,
              help="Make interlaced video (broadcast 1080i/576i) progressive with FFmpeg's bwdif before faces "
                   "are looked for; progressive video is untouched. On a GPU, interlaced files go to PyAV.")
@click.option("--backend", type=click.Choice(["auto", "torch", "onnxrt", "tensorrt"]), default="auto",
              show_default=True, help="auto: TensorRT (else torch) on a GPU, ONNX Runtime on a CPU.")
@click.option("--detector", default=DEFAULT_DETECTOR, show_default=True, help="Detector name (annotate models list).")
@click.option("--model", "scorer", default=DEFAULT_SCORER, show_default=True,
              help="Scorer name, a directory written by 'annotate export', or an ONNX model's SPEC.toml "
                   "(see the README: 'Use a better model').")
@click.option("--det-threshold", type=click.FloatRange(0, 1, min_open=True, max_open=True), default=DEFAULT_DET_THRESHOLD,
              show_default=True, help="Face score threshold.")
@click.option("--det-size", type=click.IntRange(32, 4096), default=DEFAULT_DET_SIZE, show_default=True,
              help="Cap on the long side of the frame as the keyframe detector sees it (pixels; scans see up "
                   "to twice it); below the cap the size follows --min-face.")
@click.option("--min-face", type=click.FloatRange(min=0), default=DEFAULT_MIN_FACE, show_default=True,
              help="Smallest face to find: shorter box side in video pixels. Smaller is slower: the detector "
                   "sees frames scaled so that such a face is 32 pixels, up to the --det-size cap on keyframes "
                   "(at the default 640: faces from about 64 px at 720p, 96 at 1080p) and twice it on scans "
                   "(see --scan-every). A value you set that the caps cannot show gets a warning naming the "
                   "--det-size that would.")
@click.option("--detect-every", type=click.IntRange(min=1), default=DEFAULT_DETECT_EVERY, show_default=True,
              help="Full-frame detection on every K-th sampled frame; in between each tracked face is re-found "
                   "around its last position (new faces appear at the next full detection). 1: every frame.")
@click.option("--scan-every", type=click.IntRange(min=0), default=DEFAULT_SCAN_EVERY, show_default=True,
              help="The first keyframe, then one every N sampled frames, looks at the frame at up to twice "
                   "--det-size, where faces down to --min-face that the cap hides are found (and then "
                   "tracked). 0: never.")
@click.option("--int8-keyframes/--no-int8-keyframes", default=True, show_default=True,
              help="On a CPU with ONNX Runtime, keyframes' full-frame detection runs an int8 copy of the "
                   "detector (made once, on first use): about 2x faster keyframes, 8-25 % more frames/s for the whole command at 720p (measured). "
                   "Every face is still re-found and aligned by the float network, so the rows agree with "
                   "--no-int8-keyframes (top-1 expression 0.999-1.000 on the benchmark clips). GPUs and "
                   "--backend torch always use the float network.")
@click.option("--temporal", is_flag=True,
              help="Score each face track with the model's temporal head (CNN features -> bidirectional GRU over "
                   "32-frame windows, PAPER.md); needs a --model directory exported with one.")
@click.option("--stall-timeout", type=click.FloatRange(min=0), default=DEFAULT_STALL_TIMEOUT_S, show_default=True,
              metavar="SECONDS",
              help="A Ray worker that decodes no frame and yields no row for this long (a file that hangs "
                   "its decoder, a read that never returns) ends itself, and one frozen whole (stopped, stuck "
                   "in the kernel) that answers no liveness check for this long is killed; its video is tried "
                   "once more on a new worker, then recorded as failed. With --workers 0 the run stops, in "
                   "one line naming the video. 0: never.")
@click.option("--overwrite", is_flag=True,
              help="Start over instead of resuming: remove the parts annotate wrote in OUT (nothing else).")
@click.option("--no-progress", is_flag=True,
              help="No progress output: neither the bar (on a terminal) nor status lines (in a log).")
@status_every
@cache_dir
def run_command(paths: tuple[Path, ...], out: Path, sample_fps: float | None, every_n: int | None,
                no_progress: bool, status_every: float, files_from: BinaryIO | None, **options) -> int:
    """Annotate every video in PATHS (files, or folders searched recursively) and in --files-from LIST into OUT.

    One row per face per sampled frame, one row per sampled frame without a face, one row per
    video that failed, and for a damaged video the rows of every frame that decodes plus one row
    saying what was lost. Re-running the same command resumes: finished videos are skipped, and
    new, failed or changed ones are annotated (into OUT.parquet too, whose other rows are kept).
    OUT is annotate's own: a new or empty directory, where --overwrite removes only the parts
    annotate wrote, or a .parquet file that annotate merged.
    """
    from annotator.cluster import ClusterError
    from annotator.ownership import OutputBusy, OutputWriteError
    from annotator.run import run

    if sample_fps is not None and every_n is not None:
        raise click.UsageError("--sample-fps and --every-n are exclusive; give one")
    options.update(listed_videos(paths, files_from))
    scorer = Path(options["scorer"]).expanduser()
    if scorer.exists():  # a model directory or spec: absolute, so every Ray worker finds it
        options["scorer"] = str(scorer.resolve())
    try:
        check_out_name(out)
        config = RunConfig(inputs=paths, out=out, sampling=Sampling(every_n=every_n or 1, fps=sample_fps), **options)
        summary = run(config, progress=not no_progress, status_every=status_every)
    except (ConfigError, OutputBusy) as exc:
        raise click.UsageError(str(exc)) from None
    except (FetchError, ClusterError, OutputWriteError, ValueError) as exc:
        raise click.ClickException(str(exc)) from None
    except KeyboardInterrupt:  # Ctrl-C, or SIGTERM (annotator.stopping): main() ends with one line
        click.echo(f"{out}: finished videos are kept; run the same command again to resume", err=True)
        raise
    click.echo(summary.line())
    for problem in summary.problems[:_PROBLEMS_SHOWN]:
        click.echo(f"  {problem}", err=True)
    if len(summary.problems) > _PROBLEMS_SHOWN:
        click.echo(f"  ... and {len(summary.problems) - _PROBLEMS_SHOWN} more (see the error column)", err=True)
    release_ray()
    return summary.exit_code

"""``annotate distil VIDEOS... --teacher NAME|SPEC --out DIR``: a fast student from a slow teacher."""

from __future__ import annotations

from pathlib import Path
from typing import BinaryIO

import click

from annotator.commands.options import cache_dir, files_from, listed_videos, status_every

EPILOG = """\b
Examples:
  annotate distil videos/ --teacher fer-minixception --out distilled/
  annotate distil videos/ --teacher my_model/SPEC.toml --out distilled/ --sample-fps 4
  annotate distil videos/ --teacher slow-model --labels affwild2_labels/ --out distilled/
  annotate run videos/ --model distilled/model --out results.parquet

\b
OUT holds shards/ (the teacher's outputs and the aligned crops, one Parquet
file per video: a rerun skips finished videos), train/ (checkpoints: a rerun
resumes) and model/ (the student and its card: teacher, corpus, held-out
agreement and CCC with the teacher, speed against it).

\b
--labels DIR: Aff-Wild2-format files named after each video's stem, under a
folder starting with EXPR (one expression 0..6 per frame, -1 = none) or VA
("valence,arousal" per frame, -5 = none); e.g. DIR/EXPR_Set/clip01.txt.
Labelled faces get 0.6 x label + 0.4 x distillation, the others
distillation alone (PAPER.md).

\b
Exit codes:
  0  the student was written
  1  the program or the Ray cluster failed (finished videos are kept: re-run)
  2  usage error: bad option, teacher, labels or path; nothing was done
  3  the student was written, but some videos failed (listed)
"""


@click.command("distil", epilog=EPILOG)
@click.argument("paths", nargs=-1, type=click.Path(path_type=Path))
@files_from
@click.option("--teacher", required=True,
              help="The teacher: a scorer name (annotate models list), a model directory, or an ONNX model's SPEC.toml.")
@click.option("--out", "-o", required=True, type=click.Path(path_type=Path), help="Output directory (see below).")
@click.option("--sample-fps", type=click.FloatRange(min=0, min_open=True), default=2.0, show_default=True,
              help="Frames per second to harvest: neighbouring frames add little, 2 covers a corpus evenly.")
@click.option("--labels", type=click.Path(path_type=Path), default=None,
              help="Aff-Wild2-format EXPR/VA annotation files, mixed with the teacher as the paper does.")
@click.option("--epochs", type=click.IntRange(min=1), default=20, show_default=True,
              help="Training epochs: the learning rate falls along a cosine to 0 over them and the last "
                   "epoch is the student (the held-out videos are reported, not used to choose).")
@click.option("--batch-size", type=click.IntRange(min=2), default=64, show_default=True, help="Crops per training step.")
@click.option("--steps-per-epoch", type=click.IntRange(min=1), default=40, show_default=True,
              help="Fewest training steps per epoch (a large corpus gets one pass over its faces).")
@click.option("--student-backbone", type=click.Choice(["mobilenetv2-half", "mobilenetv2", "tiny"]),
              default="mobilenetv2-half", show_default=True,
              help="mobilenetv2-half: MobileNetV2 on the crop averaged to 56x56 (fast on a CPU); tiny: for tests.")
@click.option("--init", "init", type=click.Choice(["shipped", "scratch"]), default=None,
              help="Start from the shipped student's weights (it has learnt faces from 10,099 labelled photos, "
                   "so a small corpus generalises further) or from random ones.  "
                   "[default: shipped with its backbone (mobilenetv2-half), else scratch]")
@click.option("--workers", type=click.IntRange(min=0), default=None,
              help="Ray workers for the harvest (0: in this process).  [default: sized to the cluster]")
@click.option("--address", default=None, help="Join this Ray cluster ('auto' or host:port).")
@click.option("--device", type=click.Choice(["auto", "cpu", "cuda"]), default="auto", show_default=True)
@click.option("--overwrite", is_flag=True, help="Start over: remove the shards, checkpoints and model distil wrote in OUT.")
@click.option("--no-progress", is_flag=True, help="No progress output: no bars, no status lines.")
@status_every
@cache_dir
def distil_command(paths: tuple[Path, ...], teacher: str, out: Path, sample_fps: float, labels: Path | None,
                   epochs: int, batch_size: int, steps_per_epoch: int, student_backbone: str, init: str | None, no_progress: bool,
                   status_every: float, files_from: BinaryIO | None, **options) -> int:
    """Distil TEACHER into a fast student on the videos in PATHS and in --files-from LIST (unlabelled; files or folders).

    Phase 1 (Ray, like annotate run): the teacher scores every face of the sampled frames.
    Phase 2: a student learns the teacher's outputs (T^2 KL at T = 1.5; valence/arousal through
    20-bin heads when the teacher has them), videos held out to choose the epoch and to report.
    """
    from annotator.cluster import ClusterError
    from annotator.config import ConfigError, RunConfig
    from annotator.distil import distil
    from annotator.ownership import OutputWriteError
    from engines.decoders import Sampling
    from engines.sources import FetchError
    from training.distil import DistilOptions
    from training.progress import show_epochs

    show_epochs(not no_progress)
    options.update(listed_videos(paths, files_from))
    path = Path(teacher).expanduser()
    if path.exists():  # a model directory or spec: absolute, so every Ray worker finds it
        teacher = str(path.resolve())
    try:
        config = RunConfig(inputs=paths, out=out, sampling=Sampling(fps=sample_fps), scorer=teacher, **options)
        summary = distil(config, labels, DistilOptions(backbone=student_backbone, init=init, epochs=epochs, batch_size=batch_size,
                                                        min_steps_per_epoch=steps_per_epoch,
                                                        progress=not no_progress), progress=not no_progress,
                         status_every=status_every)
    except ConfigError as exc:
        raise click.UsageError(str(exc)) from None
    except (FetchError, ClusterError, OutputWriteError, ValueError, OSError) as exc:
        raise click.ClickException(str(exc)) from None
    click.echo(summary.harvest.line())
    click.echo(summary.line())
    for problem in summary.harvest.failed:
        click.echo(f"  {problem}", err=True)
    return 3 if summary.harvest.failed else 0

"""``annotate overlay VIDEO --results RESULTS --out overlay.mp4``: the annotations drawn on the video.

The work is in :mod:`annotator.overlay`; this module only parses options and guards the output.
"""

from __future__ import annotations

from pathlib import Path

import click

from annotator.commands.output_file import check_out
from annotator.wording import counted

EPILOG = """\b
Examples:
  annotate overlay videos/carphone.mp4 --results results.parquet --out overlay.mp4
  annotate overlay long.mp4 --results results/ --out part.mp4 --start 600 --end 660
  annotate overlay long.mp4 --results results/ --out skim.mp4 --every-n 10

\b
Drawn on each annotated frame: the box in its track's colour, "track expression
probability" above it, and under it two bars from the box's centre: valence
(green right, red left) and arousal (orange), when the model predicts them.
Frames keep the source's timestamps (continued past a restart, in recordings
joined from pieces) and the first frame's size (a frame of another size is
fitted in, black bands around it); the output is upright and has no audio.
"""


@click.command("overlay", epilog=EPILOG)
@click.argument("video", type=click.Path(exists=True, dir_okay=False, path_type=Path))
@click.option("--results", "-r", required=True, type=click.Path(path_type=Path),
              help="The result of annotate run that holds VIDEO (.parquet file or parts directory).")
@click.option("--out", "-o", required=True, type=click.Path(dir_okay=False, path_type=Path),
              help="The MP4 file to write (H.264).")
@click.option("--every-n", type=click.IntRange(min=1), default=1, show_default=True,
              help="Write every N-th frame of the range (a shorter skim of a long video).")
@click.option("--start", "start_s", type=click.FloatRange(min=0), default=None,
              help="First second to write (presentation time).  [default: the beginning]")
@click.option("--end", "end_s", type=click.FloatRange(min=0), default=None,
              help="Second to stop at (excluded).  [default: the end]")
@click.option("--crf", type=click.IntRange(0, 51), default=18, show_default=True,
              help="x264 quality: lower is better and larger; 0 is lossless.")
@click.option("--overwrite", is_flag=True, help="Replace --out if it exists.")
def overlay(video: Path, results: Path, out: Path, every_n: int, start_s: float | None, end_s: float | None,
            crf: int, overwrite: bool) -> None:
    """Re-encode VIDEO with each face's box, track id, top expression and valence/arousal drawn on."""
    from annotator.overlay import OverlayError, write_overlay
    from annotator.results import ResultsError

    if start_s is not None and end_s is not None and end_s <= start_s:
        raise click.UsageError(f"--end ({end_s:g}) must come after --start ({start_s:g})")
    check_out(out, overwrite, inputs=(video, results))
    try:
        summary = write_overlay(video, results, out, every_n=every_n, start_s=start_s, end_s=end_s, crf=crf)
    except (OverlayError, ResultsError) as exc:
        raise click.ClickException(str(exc)) from None
    except OSError as exc:
        raise click.ClickException(f"{out}: cannot write ({exc.strerror or exc})") from None
    click.echo(f"{summary.out}: {counted(summary.frames, 'frame')}, {summary.annotated} with faces drawn")

"""``annotate report RESULTS --out report.html``: see a result as one self-contained HTML page.

The work is in :mod:`annotator.report`; this module only parses options and guards the output.
"""

from __future__ import annotations

import time
from pathlib import Path

import click

from annotator.commands.output_file import check_out

EPILOG = """\b
Examples:
  annotate report results.parquet --out report.html
  annotate report results/ --out report.html --videos 25 --tracks 2
  annotate report results.parquet --out report.html --overwrite

\b
The page needs no server and no network: figures are embedded. It shows the
run (models with digests and licences, options, version), counts of videos,
failures with their messages, frames and faces, the corpus (expressions,
valence/arousal density, faces per frame, coverage, detector scores) and a
smoothed timeline per track of the longest videos.
"""


@click.command("report", epilog=EPILOG)
@click.argument("results", type=click.Path(path_type=Path))
@click.option("--out", "-o", required=True, type=click.Path(dir_okay=False, path_type=Path),
              help="The HTML file to write.")
@click.option("--videos", type=click.IntRange(min=0), default=10, show_default=True,
              help="Timelines for this many of the longest videos.")
@click.option("--tracks", type=click.IntRange(min=1), default=4, show_default=True,
              help="Per timeline, the tracks with the most faces.")
@click.option("--smooth", "smooth_s", type=click.FloatRange(min=0), default=0.5, show_default=True,
              help="Width of the moving mean on the timelines (seconds of video).")
@click.option("--overwrite", is_flag=True, help="Replace --out if it exists.")
def report(results: Path, out: Path, videos: int, tracks: int, smooth_s: float, overwrite: bool) -> None:
    """Write an HTML report of RESULTS (a .parquet file or a directory of parts from annotate run).

    Reads the result with pyarrow and aggregates it batch by batch, so a result of any size
    becomes a page of a few hundred KB.
    """
    from annotator.report import build_report
    from annotator.results import ResultsError

    check_out(out, overwrite, inputs=(results,))
    start = time.perf_counter()
    try:
        summary = build_report(results, out, videos=videos, tracks=tracks, smooth_s=smooth_s)
    except ResultsError as exc:
        raise click.ClickException(str(exc)) from None
    except OSError as exc:
        raise click.ClickException(f"{out}: cannot write ({exc.strerror or exc})") from None
    click.echo(f"{summary.out}: {summary.rows:,} rows, {summary.videos:,} videos, "
               f"{summary.timelines} timelines, in {time.perf_counter() - start:.1f} s")

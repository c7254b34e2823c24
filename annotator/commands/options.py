"""Options shared by several commands, each defined once (pip-tools' scripts/options.py)."""

from __future__ import annotations

from pathlib import Path

import click

cache_dir = click.option(
    "--cache-dir",
    type=click.Path(file_okay=False, path_type=Path),
    default=None,
    envvar="ANNOTATOR_CACHE",
    show_envvar=True,
    help="Model cache directory [default: ~/.cache/annotator].",
)


def spec_error(message: str) -> click.ClickException:
    """A bad model spec: one line (``Error: <file>: <key>: <why>``), exit code 2 like a bad option.

    ``click.BadParameter`` would add a usage block around the line; the spec file, not the
    command line, is what needs fixing.
    """
    error = click.ClickException(message)
    error.exit_code = 2
    return error

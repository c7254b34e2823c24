"""Options shared by several commands, each defined once (pip-tools' scripts/options.py)."""

from __future__ import annotations

from pathlib import Path
from typing import BinaryIO

import click

from annotator.progress import STATUS_EVERY_S

cache_dir = click.option(
    "--cache-dir",
    type=click.Path(file_okay=False, path_type=Path),
    default=None,
    envvar="ANNOTATOR_CACHE",
    show_envvar=True,
    help="Model cache directory [default: ~/.cache/annotator].",
)

files_from = click.option(
    "--files-from",
    type=click.File("rb"),
    default=None,
    metavar="LIST",
    help="Also take the paths listed in LIST, one a line (or NUL-separated, as find -print0 writes them; "
         "'-': standard input). A listed path that does not exist becomes its error row, not the end of "
         "the run; relative paths are taken from the current folder.",
)

status_every = click.option(
    "--status-every",
    type=click.FloatRange(min=0),
    default=STATUS_EVERY_S,
    show_default=True,
    metavar="SECONDS",
    help="Where stderr is not a terminal (a batch log, ray job submit), a status line this often instead of "
         "a progress bar: videos done, frames, rate, time left. 0: none.",
)


def listed_videos(paths: tuple[Path, ...], listing: BinaryIO | None) -> dict[str, object]:
    """The RunConfig fields for ``--files-from`` (none without it).

    Raises:
        click.UsageError: neither PATHS nor a list were given, or the list lists nothing.
    """
    from annotator.config import ConfigError
    from annotator.file_list import read_file_list

    if listing is None:
        if not paths:
            raise click.UsageError("give the videos: PATHS (files or folders), or --files-from LIST")
        return {}
    name = "-" if listing.name == "<stdin>" else listing.name
    try:
        return {"files_from": name, "listed": read_file_list(listing, name)}
    except ConfigError as exc:
        raise click.UsageError(str(exc)) from None


def spec_error(message: str) -> click.ClickException:
    """A bad model spec: one line (``Error: <file>: <key>: <why>``), exit code 2 like a bad option.

    ``click.BadParameter`` would add a usage block around the line; the spec file, not the
    command line, is what needs fixing.
    """
    error = click.ClickException(message)
    error.exit_code = 2
    return error

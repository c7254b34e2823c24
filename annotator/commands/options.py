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

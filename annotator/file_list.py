"""``annotate run --files-from LIST``: the videos of a run named in a file, one path a line.

Corpora are often defined by a manifest (a split of a dataset, the output of ``find``) rather
than by a folder, and tens of thousands of paths do not fit on one command line. A list is read
as bytes and each path decoded as the file system names it (``os.fsdecode``), so a name that is
not UTF-8 survives; ``find -print0`` output (paths separated by NUL, the one byte no path can
hold) is recognised, so any name, even one with a line break, can be listed.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import BinaryIO

from annotator.config import ConfigError


def read_file_list(stream: BinaryIO, name: str) -> tuple[Path, ...]:
    """The paths listed in ``stream`` (``name`` is what error messages call it), in order.

    One path a line (``\\n`` or ``\\r\\n``), or NUL-separated where the list holds a NUL byte.
    Lines of only white space are passed over; everything else on a line is the path, spaces
    included. Relative paths are taken from the current folder, as on the command line.

    Raises:
        ConfigError: the list cannot be read, or lists no path.
    """
    try:
        data = stream.read()
    except OSError as exc:
        raise ConfigError(f"--files-from {name}: cannot be read ({exc.strerror or exc})") from None
    if b"\0" in data:
        entries = data.split(b"\0")
    else:
        entries = [line[:-1] if line.endswith(b"\r") else line for line in data.split(b"\n")]
    paths = tuple(Path(os.fsdecode(entry)) for entry in entries if entry.strip())
    if not paths:
        raise ConfigError(f"--files-from {name}: lists no paths (one path a line, or NUL-separated)")
    return paths

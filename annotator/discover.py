"""Finding the videos of a run: files as given, folders searched recursively by extension."""

from __future__ import annotations

import os
from pathlib import Path

from annotator.config import ConfigError
from engines.decoders import VIDEO_EXTENSIONS


def find_videos(paths: tuple[Path, ...] | list[Path]) -> list[Path]:
    """Video files under ``paths``, sorted and without duplicates.

    A file named explicitly is taken whatever its extension (the user asked for it; if it is not
    a video, the run records why). Folders are walked recursively for known video extensions;
    hidden files and folders are skipped, and each symlinked folder is followed once, so a link
    cycle cannot loop.

    Raises:
        ConfigError: a path does not exist, or nothing to annotate was found.
    """
    found: dict[Path, None] = {}
    for path in paths:
        if not path.exists():
            raise ConfigError(f"{path}: no such file or directory")
        if path.is_file():
            found[path.absolute()] = None
            continue
        seen_dirs: set[Path] = set()
        for root, dirs, files in os.walk(path, followlinks=True):
            real = Path(root).resolve()
            if real in seen_dirs:
                dirs[:] = []
                continue
            seen_dirs.add(real)
            dirs[:] = sorted(d for d in dirs if not d.startswith("."))
            for name in files:
                if not name.startswith(".") and Path(name).suffix.lower() in VIDEO_EXTENSIONS:
                    found[(Path(root) / name).absolute()] = None
    if not found:
        shown = ", ".join(str(p) for p in paths)
        raise ConfigError(f"{shown}: no video files found (extensions: {', '.join(sorted(VIDEO_EXTENSIONS))})")
    return sorted(found)

"""Finding the videos of a run: files as given, folders searched recursively by extension.

Discovery never aborts a run over one bad entry: a folder that cannot be listed, a dangling
link, a link loop, a file that cannot be read or is not a regular file (a FIFO would block a
decoder forever) becomes a problem that the run records as that path's error row.
"""

from __future__ import annotations

import errno
import os
import stat
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from annotator.config import ConfigError
from annotator.wording import counted
from engines.decoders import VIDEO_EXTENSIONS


@dataclass
class Discovery:
    """What the inputs hold."""

    videos: list[Path] = field(default_factory=list)  # sorted, absolute, no duplicates (one path per file)
    problems: list[tuple[Path, str]] = field(default_factory=list)  # (path, reason): error rows
    skipped: Counter[str] = field(default_factory=Counter)  # extension -> files that are not videos
    # (path left out, path kept): another path to a file already listed (a symbolic link, a
    # folder given twice under two names), which would have been annotated twice into one part
    aliases: list[tuple[Path, Path]] = field(default_factory=list)

    def skipped_line(self) -> str:
        """e.g. "skipped 3 files that are not videos (.m4a 1, .txt 2)"; empty when none."""
        total = sum(self.skipped.values())
        if not total:
            return ""
        kinds = ", ".join(f"{ext} {n}" for ext, n in sorted(self.skipped.items()))
        return f"skipped {counted(total, 'file')} that {'are not videos' if total != 1 else 'is not a video'} ({kinds})"


def _problem(path: Path) -> str | None:
    """Why ``path`` cannot be decoded, or ``None`` when it is a readable regular file."""
    try:
        info = os.stat(path)
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            return "symbolic link loop"
        if exc.errno == errno.ENOENT and os.path.islink(path):
            return f"dangling symbolic link (to {os.readlink(path)})"
        return exc.strerror or str(exc)
    if not stat.S_ISREG(info.st_mode):
        return "not a regular file"
    if not os.access(path, os.R_OK):
        return "permission denied"
    return None


def find_videos(paths: tuple[Path, ...] | list[Path], own: tuple[Path, ...] = (),
                listed: tuple[Path, ...] | list[Path] = (), list_name: str = "") -> Discovery:
    """Video files under ``paths``, plus the entries that could not be taken and why.

    A file named explicitly is taken whatever its extension (the user asked for it; if it is not
    a video, the run records why). Folders are walked recursively for known video extensions;
    hidden files and folders are skipped, and each symlinked folder is followed once, so a link
    cycle cannot loop. ``own``: the run's output (its parts folder, its merged file), passed over
    without a word where it lies among the videos (``annotate run . --out results/``), where it
    was counted among the files that are not videos.

    ``listed``: paths read from ``list_name`` (``--files-from``), taken as ``paths`` are, except
    that one that does not exist is a problem (its error row), not the end of the run: a
    manifest of a corpus outlives some of its files.

    Raises:
        ConfigError: a path given does not exist, none of ``listed`` exists (relative paths from
            the wrong folder), or there is nothing to annotate.
    """
    found: dict[Path, None] = {}
    problems: dict[Path, str] = {}
    skipped: Counter[str] = Counter()

    def consider(path: Path) -> None:
        reason = _problem(path)
        if reason is None:
            found[path] = None
        else:
            problems[path] = reason

    def unreadable_folder(exc: OSError) -> None:
        problems[Path(exc.filename).absolute()] = f"cannot list the folder ({exc.strerror or exc})"

    ours = {os.path.realpath(p) for p in own}
    if listed and not any(os.path.lexists(path) for path in listed):
        raise ConfigError(f"--files-from {list_name}: none of its {counted(len(listed), 'path')} exists (the first: "
                          f"{listed[0]}); relative paths are taken from the current folder ({os.getcwd()})")
    for path, from_list in [*((p, False) for p in paths), *((p, True) for p in listed)]:
        if not os.path.lexists(path):
            if not from_list:
                raise ConfigError(f"{path}: no such file or directory")
            problems[path.absolute()] = f"no such file or directory (listed in {list_name})"
            continue
        if not path.is_dir():
            consider(path.absolute())
            continue
        seen_dirs: set[str] = set()
        for root, dirs, files in os.walk(path, followlinks=True, onerror=unreadable_folder):
            real = os.path.realpath(root)  # never raises, unlike Path.resolve on a loop
            if real in seen_dirs:
                dirs[:] = []
                continue
            seen_dirs.add(real)
            dirs[:] = sorted(d for d in dirs if not d.startswith(".") and not _among(root, d, ours))
            for name in files:
                if name.startswith(".") or (name.endswith(".parquet") and _among(root, name, ours)):
                    continue
                suffix = Path(name).suffix.lower()
                if suffix in VIDEO_EXTENSIONS:
                    consider((Path(root) / name).absolute())
                else:
                    skipped[suffix or "(no extension)"] += 1
    if not found and not problems:
        shown = ", ".join([*(str(p) for p in paths), *([f"the paths listed in {list_name}"] if listed else [])])
        raise ConfigError(f"{shown}: no video files found (extensions: {', '.join(sorted(VIDEO_EXTENSIONS))})")
    videos, aliases = _one_path_per_file(found)
    return Discovery(videos, sorted(problems.items()), skipped, aliases=aliases)


def _among(root: str, name: str, real_paths: set[str]) -> bool:
    return bool(real_paths) and os.path.realpath(os.path.join(root, name)) in real_paths


def _one_path_per_file(found: dict[Path, None]) -> tuple[list[Path], list[tuple[Path, Path]]]:
    """The paths of ``found``, one per file (its own path where given, else the first in order),
    and the others with the path kept for each. A file is its device and inode, so symbolic
    links and hard links both count: a video's part is named by its real path
    (annotator.writer.part_key), so two symbolic links to one file were annotated twice into one
    part, and two hard links twice into two parts, the same rows under two names."""
    kept: dict[object, Path] = {}
    identity: dict[Path, object] = {}
    for path in sorted(found):
        identity[path] = ident = _file_identity(path)
        if ident not in kept or (_is_own_path(path) and not _is_own_path(kept[ident])):
            kept[ident] = path
    chosen = set(kept.values())
    aliases = [(path, kept[identity[path]]) for path in sorted(found) if path not in chosen]
    return sorted(chosen), aliases


def _file_identity(path: Path) -> object:
    """(device, inode) of the file ``path`` leads to; its real path if it is gone meanwhile."""
    try:
        info = os.stat(path)
    except OSError:
        return os.path.realpath(path)
    return (info.st_dev, info.st_ino)


def _is_own_path(path: Path) -> bool:
    """Whether ``path`` names its file without passing through a symbolic link."""
    return str(path) == os.path.realpath(path)

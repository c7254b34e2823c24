"""The artifact cache: upstream file → converted torch state dict + ONNX, verified on every load.

Layout under the cache root (``$ANNOTATOR_CACHE``, else ``~/.cache/annotator``)::

    downloads/                      fetched wheels and files (verified by the registry's sha256)
    models/<name>/<digest12>/       model.pt, model.onnx, manifest.json

``manifest.json`` is written last and records the sha256 of each artifact; a directory without
it is an interrupted conversion and is rebuilt. The digest in the path is the upstream file's,
so two different checkpoints given the same name never collide.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from engines.registry import ModelEntry
from engines.saving import os_reason, staged_directory
from engines.sources import FetchError, fetch, inside, pinned, sha256_file

log = logging.getLogger(__name__)

CACHE_ENV = "ANNOTATOR_CACHE"
_MANIFEST = "manifest.json"
#: Bump when a converter or the export changes, so old caches are rebuilt, not trusted.
CONVERSION_VERSION = 2  # 2: Pad nodes folded into their Conv (engines.export.fold_pads_into_convs)


@dataclass(frozen=True)
class Artifacts:
    """Verified artifacts of one model."""

    entry: ModelEntry
    torch: Path
    onnx: Path
    sha256: dict[str, str]  # artifact file name -> hex digest


def cache_root(cache_dir: str | os.PathLike[str] | None = None) -> Path:
    """The cache root: the explicit argument, else ``$ANNOTATOR_CACHE``, else ``~/.cache/annotator``."""
    if cache_dir:
        return Path(cache_dir).expanduser()
    if env := os.environ.get(CACHE_ENV):
        return Path(env).expanduser()
    return Path.home() / ".cache" / "annotator"


def model_dir(entry: ModelEntry, root: Path) -> Path:
    """``<root>/models/<name>/<digest12>``, checked to stay inside ``root``.

    The name may come from a user's model card: validated there too, but a path that would
    leave the cache is refused here as well, whatever produced the entry.

    Raises:
        UnsafePathError: the name or digest is not a plain path component.
    """
    digest = (entry.sha256 or entry.sha256_prefix)[:12]
    return inside(root, "models", entry.name, digest)


def cached(entry: ModelEntry, cache_dir: str | os.PathLike[str] | None = None) -> Artifacts | None:
    """The verified artifacts if a complete conversion is cached, else ``None``."""
    directory = model_dir(entry, cache_root(cache_dir))
    manifest_path = directory / _MANIFEST
    if not manifest_path.is_file():
        return None
    manifest = json.loads(manifest_path.read_text())
    if manifest.get("conversion_version") != CONVERSION_VERSION:
        return None
    hashes: dict[str, str] = manifest["sha256"]
    for filename, expected in hashes.items():
        path = directory / filename
        if not path.is_file() or sha256_file(path) != expected:
            log.warning("%s: missing or corrupt, converting %s again", path, entry.name)
            return None
    return Artifacts(entry, directory / "model.pt", directory / "model.onnx", hashes)


@contextlib.contextmanager
def exclusive(lock_path: Path, doing: str) -> Iterator[None]:
    """The block under an exclusive lock on ``lock_path``: several Ray workers of one node may ask
    for the same artifact at once, and one makes it while the others wait, then reuse it. On a
    shared cache without locks (NFS without lockd) the block runs unlocked, with a warning.

    Raises:
        OSError: ``lock_path`` cannot be created (a read-only or full cache).
    """
    with open(lock_path, "w") as lock:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX)
        except OSError as exc:
            log.warning("%s: cannot lock the model cache (%s); %s without the lock", lock_path.parent,
                        os_reason(exc), doing)
        yield


def resolve(entry: ModelEntry, cache_dir: str | os.PathLike[str] | None = None) -> Artifacts:
    """Verified artifacts of ``entry``, fetching and converting on first use.

    Raises:
        FetchError: the upstream file is unreachable or does not verify.
    """
    if (hit := cached(entry, cache_dir)) is not None:
        return hit
    root = cache_root(cache_dir)
    directory = model_dir(entry, root)
    directory.parent.mkdir(parents=True, exist_ok=True)
    with exclusive(directory.parent / ".lock", "converting"):
        if (hit := cached(entry, cache_dir)) is not None:
            return hit
        try:
            _fetch_and_convert(entry, root, directory)
        except OSError as exc:  # a full or read-only disk: one line, like every FetchError
            raise FetchError(f"{root}: cannot write the model cache ({os_reason(exc)}); free space there, "
                             f"or choose another cache with --cache-dir or ${CACHE_ENV}") from None
    hit = cached(entry, cache_dir)
    if hit is None:
        raise FetchError(f"{directory}: conversion of {entry.name!r} did not verify")
    return hit


def _fetch_and_convert(entry: ModelEntry, root: Path, directory: Path) -> None:
    upstream = fetch(pinned(entry), root / "downloads")
    with staged_directory(directory, ".convert-") as staging:  # a crash leaves no half model
        _convert(entry, upstream, staging)


def _convert(entry: ModelEntry, upstream: Path, out_dir: Path) -> None:
    import torch

    from engines.converters import ConversionError, check_fits, convert
    from engines.export import export_onnx
    from engines.models import build_model
    from engines.saving import write_torch

    log.info("converting %s from %s", entry.name, upstream)
    state_dict = convert(entry.converter, upstream)
    try:
        module = build_model(entry.architecture, **dict(entry.arch_kwargs))
    except (TypeError, ValueError) as exc:  # a card's arch_kwargs the builder does not take
        raise ConversionError(f"{upstream}: cannot build architecture {entry.architecture!r} "
                              f"with {dict(entry.arch_kwargs)} ({_one_line(exc)})") from None
    check_fits(module.state_dict(), state_dict, upstream, entry.architecture)
    try:
        module.load_state_dict(state_dict, strict=True)
    except RuntimeError as exc:  # anything check_fits did not foresee: still one line
        raise ConversionError(f"{upstream}: does not fit architecture {entry.architecture!r} "
                              f"({_one_line(exc)})") from None
    write_torch(module.state_dict(), out_dir / "model.pt")
    try:
        export_onnx(module, entry, out_dir / "model.onnx")
    except (RuntimeError, ValueError, TypeError) as exc:  # e.g. a card's outputs the module lacks
        raise ConversionError(f"{upstream}: ONNX export of {entry.name!r} failed ({_one_line(exc)})") from None
    manifest = {
        "name": entry.name,
        "source": entry.source.describe(),
        "source_sha256": sha256_file(upstream),
        "conversion_version": CONVERSION_VERSION,
        "torch_version": torch.__version__,
        "sha256": {name: sha256_file(out_dir / name) for name in ("model.pt", "model.onnx")},
    }
    (out_dir / _MANIFEST).write_text(json.dumps(manifest, indent=2))


def _one_line(exc: BaseException) -> str:
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    return " ".join(lines[:2])[:300] or type(exc).__name__

"""Files derived on the machine that uses them (the FP16 ONNX, TensorRT engines), verified on load.

The registry's artifacts are verified against the manifest written when they were converted
(:mod:`engines.cache`); files made later from them on a GPU get the same treatment: each is
written with a ``<name>.sha256`` beside it, and a file whose bytes no longer match (a truncated
write, a disk error, an edit) is rebuilt rather than trusted. The engine's file name also
carries the FP16 ONNX's digest, the GPU name and the TensorRT version, so an engine is only
ever loaded for the exact graph, GPU and library it was built with.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable
from pathlib import Path

from engines.sources import sha256_file

log = logging.getLogger(__name__)


def digest_path(path: Path) -> Path:
    return path.with_name(path.name + ".sha256")


def recorded_digest(path: Path) -> str | None:
    try:
        return digest_path(path).read_text().strip() or None
    except OSError:
        return None


def verified(path: Path) -> bool:
    """True when ``path`` exists and its sha256 is the one recorded beside it."""
    recorded = recorded_digest(path)
    return path.is_file() and recorded is not None and sha256_file(path) == recorded


def record_digest(path: Path) -> str:
    """Hash ``path`` and write the digest beside it (atomically); returns the digest."""
    digest = sha256_file(path)
    tmp = digest_path(path).with_name(digest_path(path).name + ".tmp")
    tmp.write_text(digest + "\n")
    os.replace(tmp, digest_path(path))
    return digest


def ensure_verified(path: Path, make: Callable[[Path], None]) -> str:
    """The sha256 of ``path``, made with ``make(path)`` first if it is missing or fails its check.

    The caller holds the lock that keeps two workers from making the same file at once.
    """
    if verified(path):
        return recorded_digest(path)  # type: ignore[return-value]
    if path.exists():
        log.warning("%s: does not match its recorded sha256 (or has none); rebuilding it", path)
        path.unlink()
    make(path)
    return record_digest(path)

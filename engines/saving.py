"""Files written whole or not at all, and OS errors told in the system's words: what a full disk
should give, an OSError naming the file, and no half-written file behind it."""

from __future__ import annotations

import io
import os
import shutil
import tempfile
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any


def os_reason(exc: OSError) -> str:
    """The system's words for an OS error ("No space left on device"): pyarrow's own message
    around the same errno ("Error writing bytes to file. Detail: ...") says it twice."""
    if exc.errno:
        return os.strerror(exc.errno)
    return exc.strerror or type(exc).__name__


def write_whole(path: Path, data: bytes | memoryview) -> None:
    """Write ``data`` to ``path``; on failure (a full disk) remove what was written and raise
    an OSError that names ``path`` (a failed write names no file by itself)."""
    try:
        with open(path, "wb") as fh:
            fh.write(data)
    except OSError as exc:
        Path(path).unlink(missing_ok=True)
        if exc.filename is None:
            raise OSError(exc.errno, exc.strerror, str(path)) from None
        raise


def write_torch(obj: Any, path: Path) -> None:
    """``torch.save`` into memory, then :func:`write_whole`.

    On a full disk torch's own file writer fails with "[enforce fail at inline_container.cc]
    unexpected pos ...", a RuntimeError that names neither the file nor the cause, and leaves
    the file half written; a plain write raises OSError (ENOSPC), which the commands report in
    one line. (The bytes are held once in memory: a state dict, tens of MB.)
    """
    import torch  # here: the CLI imports this module (for os_reason) before torch is needed

    buffer = io.BytesIO()
    torch.save(obj, buffer)
    # The view is released however the write ends: a failed write's traceback keeps this frame,
    # and a BytesIO view still exported in that reference cycle crashed CPython 3.12's garbage
    # collector (gh-111049, gh-77894): `annotate distil` on a full disk printed its error line
    # and then died of SIGSEGV on 3.12.1.
    with buffer.getbuffer() as view:
        write_whole(path, view)


@contextmanager
def staged(paths: Sequence[Path]) -> Iterator[dict[Path, Path]]:
    """Files that are only valid together (a model and the card holding its digests): yields
    ``{final: temporary}``, the block writes each temporary, and when it ends every temporary is
    moved to its final name in the order given, so put the file that vouches for the others
    last. If the block raises (a full disk, a failed check), every temporary is removed and no
    final file is touched: the directory keeps the set it had, whole."""
    temps = {Path(path): Path(path).with_name(Path(path).name + ".tmp") for path in paths}
    try:
        yield temps
    except BaseException:
        for tmp in temps.values():
            tmp.unlink(missing_ok=True)
        raise
    for final, tmp in temps.items():
        os.replace(tmp, final)


@contextmanager
def staged_directory(directory: Path, prefix: str) -> Iterator[Path]:
    """A directory made whole or not at all (a model's converted files, a derived copy): yields
    a private empty one beside ``directory`` (named ``prefix``...), the block fills it, and when
    the block ends it replaces ``directory``. If the block raises, ``directory`` keeps what it had
    and the private one is removed; a process killed midway leaves only that dot-folder."""
    staging = Path(tempfile.mkdtemp(dir=directory.parent, prefix=prefix))
    try:
        yield staging
        if directory.exists():
            shutil.rmtree(directory)
        os.replace(staging, directory)
    finally:
        shutil.rmtree(staging, ignore_errors=True)

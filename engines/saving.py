"""``torch.save`` that fails as a full disk should: an OSError, and no half-written file."""

from __future__ import annotations

import io
from pathlib import Path
from typing import Any

import torch


def write_torch(obj: Any, path: Path) -> None:
    """``torch.save`` into memory, then one plain write of the bytes to ``path``.

    On a full disk torch's own file writer fails with "[enforce fail at inline_container.cc]
    unexpected pos ...", a RuntimeError that names neither the file nor the cause, and leaves
    the file half written; a plain write raises OSError (ENOSPC), which the commands report in
    one line. A file that could not be written whole is removed. (The bytes are held once in
    memory: a state dict, tens of MB.)
    """
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    try:
        with open(path, "wb") as fh:
            fh.write(buffer.getbuffer())
    except OSError as exc:
        Path(path).unlink(missing_ok=True)
        if exc.filename is None:  # a failed write names no file: say which
            raise OSError(exc.errno, exc.strerror, str(path)) from None
        raise

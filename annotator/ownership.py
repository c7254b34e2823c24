"""An output directory annotate owns, and the one run at a time allowed to write into it.

The output belongs to the user. A directory becomes ours when a run creates it (or finds it
empty) and writes a small manifest into it; after that a run touches only the files it names
itself (parts, their temporary files, the manifest, the lock) and refuses a directory that holds
anything else, so ``--overwrite`` or a merge can never delete a file the user put there.

One driver writes an output at a time: it holds an exclusive ``flock`` on a lock file inside the
directory for the whole run (the driver is the only writer, Ray workers only send rows), and a
second run fails at once naming the holder. The lock dies with its process, so a run killed
with ``kill -9`` leaves nothing to clean up.
"""

from __future__ import annotations

import fcntl
import json
import logging
import os
import re
import socket
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from annotator.config import ConfigError
from annotator.wording import listed
from engines.saving import os_reason as reason

log = logging.getLogger(__name__)

MANIFEST_NAME = ".annotator-output.json"
LOCK_NAME = ".annotator.lock"
PROBE_NAME = ".annotator-probe"
#: Every name a run writes into its output directory; anything else is the user's. Parts of a
#: video's segments and the video's segment plan are hidden (a leading dot), so a dataset reader
#: sees only finished videos.
_PART = r"part-[0-9a-f]{16}(?:\.error)?\.parquet"
_SEGMENT = r"\.part-[0-9a-f]{16}\.(?:seg\d{4}\.parquet|plan\.json)"
_PARTS_AND_TEMPS = rf"(?:{_PART}|\.{_PART}\.tmp|{_SEGMENT}|\.{_SEGMENT}\.tmp|{_SEGMENT}\.tmp)"
_OURS = re.compile(rf"^(?:{_PARTS_AND_TEMPS}|{re.escape(MANIFEST_NAME)}|{re.escape(LOCK_NAME)}|{re.escape(PROBE_NAME)})$")
_PARTS = re.compile(rf"^{_PARTS_AND_TEMPS}$")


class OutputBusy(RuntimeError):
    """Another run holds the output; the message names it."""


class OutputWriteError(RuntimeError):
    """The output stopped accepting writes mid-run (a full disk); finished parts are kept."""


@contextmanager
def writing(where: Path, then: str) -> Iterator[None]:
    """A write that fails (a full disk) is one line naming ``where`` and saying what is kept
    (``then``), not a traceback."""
    try:
        yield
    except OSError as exc:
        raise OutputWriteError(f"{where}: cannot write ({reason(exc)}); {then}") from None


def foreign_entries(directory: Path) -> list[str]:
    """Names in ``directory`` that annotate did not write (sorted)."""
    return sorted(e.name for e in os.scandir(directory) if not (_OURS.match(e.name) and e.is_file(follow_symlinks=False)))


def fsync_directory(directory: Path) -> None:
    """Make a rename inside ``directory`` durable (the entry, not only the file's bytes)."""
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class OutputClaim:
    """Claim ``directory`` for this run: check it is ours or empty, lock it, mark it, probe it.

    All checks run before any model loads or any video is read, so a bad ``--out`` costs
    nothing. Use as a context manager; the lock is held until ``__exit__``.

    Raises (from ``__enter__``):
        ConfigError: the path is not a directory, holds files annotate did not write, or
            cannot be created or written (read-only, a file as a parent, a full disk).
        OutputBusy: another run holds it.
    """

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self.created = False
        self._lock_fd: int | None = None

    def __enter__(self) -> OutputClaim:
        directory = self.directory
        if directory.exists() or directory.is_symlink():
            if not directory.is_dir():
                raise ConfigError(f"{directory}: exists and is not a directory")
            self._refuse_foreign()
        else:
            try:
                directory.mkdir(parents=True)
            except OSError as exc:
                raise ConfigError(f"{directory}: cannot create the output directory ({reason(exc)})") from None
            self.created = True
        try:
            self._lock()
            self._refuse_foreign()  # again, now that no other run can be writing here
            if not (directory / MANIFEST_NAME).is_file():
                self._write_manifest()
            self._probe()
        except BaseException:
            self.__exit__(None, None, None)
            raise
        return self

    def __exit__(self, *exc_info: object) -> None:
        if self._lock_fd is not None:
            os.close(self._lock_fd)  # closing releases the flock
            self._lock_fd = None

    def _refuse_foreign(self) -> None:
        try:
            foreign = foreign_entries(self.directory)
        except OSError as exc:
            raise ConfigError(f"{self.directory}: cannot read the output directory ({reason(exc)})") from None
        if foreign:
            raise ConfigError(
                f"{self.directory}: holds files annotate did not write ({listed(foreign)}); "
                "give an empty or new directory as --out"
            )

    def _lock(self) -> None:
        path = self.directory / LOCK_NAME
        try:
            fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as exc:
            raise ConfigError(f"{self.directory}: cannot write to the output directory ({reason(exc)})") from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 4096, 0).decode(errors="replace").strip()
            os.close(fd)
            raise OutputBusy(f"{self.directory}: in use by another annotate run ({_describe_holder(holder)}); "
                             "wait for it to finish or give another --out") from None
        except OSError as exc:
            # Some shared filesystems have no locks: NFS without its lock daemon (ENOLCK), FUSE
            # mounts of object stores (EOPNOTSUPP). Refusing them would refuse a cluster's usual
            # output; the run goes on, and says what it cannot guard against.
            log.warning("%s: cannot lock the output (%s): a second annotate run on it would not be "
                        "stopped, so start only one", self.directory, reason(exc))
        self._lock_fd = fd
        holder = {"pid": os.getpid(), "host": socket.gethostname(), "started": time.strftime("%Y-%m-%d %H:%M:%S")}
        try:
            os.ftruncate(fd, 0)
            os.pwrite(fd, json.dumps(holder).encode(), 0)
        except OSError as exc:
            raise ConfigError(f"{self.directory}: cannot write to the output directory ({reason(exc)})") from None

    def _write_manifest(self) -> None:
        manifest = {"written_by": "video-annotator", "note": "annotate owns this directory: it writes, "
                    "replaces and deletes only its own part-*.parquet files here"}
        self._write_durably(self.directory / MANIFEST_NAME, json.dumps(manifest, indent=2).encode())

    def _probe(self) -> None:
        """Write, flush and remove a small file: a read-only or full disk fails here, not mid-run."""
        probe = self.directory / PROBE_NAME
        self._write_durably(probe, b"\0" * 65536)
        probe.unlink()

    def _write_durably(self, path: Path, data: bytes) -> None:
        tmp = path.with_name(path.name + ".tmp") if path.name != PROBE_NAME else path
        try:
            with open(tmp, "wb") as fh:
                fh.write(data)
                fh.flush()
                os.fsync(fh.fileno())
            if tmp != path:
                os.replace(tmp, path)
        except OSError as exc:
            Path(tmp).unlink(missing_ok=True)
            raise ConfigError(f"{self.directory}: cannot write to the output directory ({reason(exc)})") from None

    def remove_parts(self) -> int:
        """Delete the parts (and temporary parts) of earlier runs, nothing else; how many."""
        removed = 0
        for entry in os.scandir(self.directory):
            if _PARTS.match(entry.name) and entry.is_file(follow_symlinks=False):
                os.unlink(entry.path)
                removed += 1
        return removed

    def dissolve(self) -> None:
        """Remove the directory with the files annotate wrote in it (the single-file output's
        parts, once merged). Anything else found there is left, and so is the directory."""
        for entry in os.scandir(self.directory):
            if _OURS.match(entry.name) and entry.name != LOCK_NAME and entry.is_file(follow_symlinks=False):
                os.unlink(entry.path)
        (self.directory / LOCK_NAME).unlink(missing_ok=True)  # still held: a waiting run fails, then finds no dir
        try:
            self.directory.rmdir()
        except OSError:
            pass  # something appeared that is not ours: leave it


def _describe_holder(raw: str) -> str:
    try:
        holder = json.loads(raw)
        return f"pid {holder['pid']} on {holder['host']}, started {holder['started']}"
    except (ValueError, KeyError, TypeError):
        return "holder unknown"

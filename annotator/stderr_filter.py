"""Keep one known false alarm of Ray's out of the user's terminal, and nothing else.

Ray 2.60's core worker logs, at ERROR level, for every actor of a Ray Data actor pool: "Actor with
class name: 'MapWorker(...)' ... has constructor arguments in the object store and max_restarts
> 0" (ray-project/ray#57733, open). Ray Data always passes its own map transformer and data
context to those actors as object refs, so the line appears whatever the arguments' size; the
risk it names (#53727: a restarted actor whose arguments were freed) does not arise while their
owner, this driver, holds them, which is the whole run. Ray's C++ logger writes ERROR lines to
file descriptor 2 itself, and its only knob (``RAY_BACKEND_LOG_LEVEL``) would silence every real
error with it, from the session's log files too. So :func:`drop_ray_false_alarms` puts a pipe
behind fd 2 and a thread that passes everything through except Ray log lines carrying that
message; the line stays in Ray's own log file (``python-core-driver-*.log``).
"""

from __future__ import annotations

import atexit
import os
import re
import sys
import threading

#: Messages dropped, each a byte string found inside one Ray C++ log line.
FALSE_ALARMS: tuple[bytes, ...] = (
    b"has constructor arguments in the object store and max_restarts > 0",
)

# A Ray C++ log line starts "[2026-11-25 09:47:12,771 E 8702 8702] core_worker.cc:2465: ...".
_HEADER = re.compile(rb"\[\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3} [DIWEF] \d+ \d+\] ")
_SHAPE = b"[0000-00-00 00:00:00,000 E "  # 0: a digit, E: a level letter, else itself
_REST = re.compile(rb"\d* ?\d*\]?")  # what may follow the shape, up to its "] "

_lock = threading.Lock()
_installed = False


def _may_become_header(tail: bytes) -> bool:
    """Whether ``tail`` could still grow into a Ray log-line header (so is worth holding back)."""
    for got, want in zip(tail, _SHAPE):
        if want == ord("0"):
            ok = 48 <= got <= 57
        elif want == ord("E"):
            ok = got in b"DIWEF"
        else:
            ok = got == want
        if not ok:
            return False
    return _REST.fullmatch(tail[len(_SHAPE):]) is not None


def split(data: bytes) -> tuple[bytes, bytes]:
    """``(to write now, to hold back)`` for the bytes read so far.

    Whole Ray log lines that carry a false alarm are dropped, wherever they start (Ray's lines
    can land in the middle of a progress bar's line). Everything else is written at once; only a
    tail that may still become a Ray log line is held, until its newline comes, so a progress
    bar's ``\\r`` updates are never delayed.
    """
    out: list[bytes] = []
    pos = 0
    while (match := _HEADER.search(data, pos)) is not None:
        out.append(data[pos:match.start()])
        end = data.find(b"\n", match.start())
        if end < 0:
            return b"".join(out), data[match.start():]
        line = data[match.start():end + 1]
        if not any(alarm in line for alarm in FALSE_ALARMS):
            out.append(line)
        pos = end + 1
    tail = data[pos:]
    cut = tail.rfind(b"[")
    if cut >= 0 and _may_become_header(tail[cut:]):
        out.append(tail[:cut])
        return b"".join(out), tail[cut:]
    out.append(tail)
    return b"".join(out), b""


def _write_all(fd: int, data: bytes) -> None:
    while data:
        try:
            data = data[os.write(fd, data):]
        except InterruptedError:
            continue
        except OSError:  # the terminal went away (e.g. `| head`): drop, keep draining
            return


def _step_aside(real: int, pipe: tuple[int, int]) -> None:
    """fd 2 back to what it was, if it is still our pipe (a test harness may have moved it)."""
    try:
        if (os.fstat(2).st_dev, os.fstat(2).st_ino) == pipe:
            os.dup2(real, 2)  # drops this process's last write end of the pipe: the relay sees EOF
    except OSError:
        pass


def _relay(read_end: int, real: int, pipe: tuple[int, int]) -> None:
    held = b""
    try:
        while chunk := os.read(read_end, 1 << 16):
            try:
                now, held = split(held + chunk)
            except Exception:
                # A bug here must not cost the user their errors, nor leave fd 2 on a pipe that
                # nobody drains (writers would block once it filled): pass all, then step aside.
                _write_all(real, held + chunk)
                held = b""
                _step_aside(real, pipe)
                while chunk := os.read(read_end, 1 << 16):
                    _write_all(real, chunk)
                return
            _write_all(real, now)
    except OSError:
        pass
    finally:
        _write_all(real, held)
        os.close(read_end)


def _restore(real: int, relay: threading.Thread, pipe: tuple[int, int]) -> None:
    """At exit: fd 2 back to the terminal, then let the relay write what it still has."""
    try:
        sys.stderr.flush()
    except (OSError, ValueError):
        pass
    _step_aside(real, pipe)
    relay.join(timeout=2)  # a child still holding the pipe would keep it open; don't wait on it


def drop_ray_false_alarms() -> None:
    """Filter this process's fd 2 as described above; once per process, later calls do nothing.

    Call it after ``ray.init``: processes started before keep the real stderr, so nothing that
    outlives this process is left writing into the pipe.
    """
    global _installed
    with _lock:
        if _installed:
            return
        _installed = True
    try:
        sys.stderr.flush()
    except (OSError, ValueError):
        pass
    real = os.dup(2)
    read_end, write_end = os.pipe()
    pipe = (os.fstat(write_end).st_dev, os.fstat(write_end).st_ino)
    os.dup2(write_end, 2)
    os.close(write_end)
    relay = threading.Thread(target=_relay, args=(read_end, real, pipe), name="stderr-filter", daemon=True)
    relay.start()
    atexit.register(_restore, real, relay, pipe)

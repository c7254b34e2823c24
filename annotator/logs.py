"""Log lines on stderr, for the driver and for each Ray worker alike (Ray shows a worker's on the
driver's terminal).

Why a module: file names that are not UTF-8 (Linux names are bytes) should read the same in a
log line as in the rows, ``caf\\xe9.mp4``, not as Python's lone surrogates, ``caf\\udce9.mp4``.
"""

from __future__ import annotations

import logging

from annotator.wording import utf8_text

FORMAT = "%(levelname)s %(name)s: %(message)s"


class Utf8Formatter(logging.Formatter):
    """Formats records as :data:`FORMAT` does, with bytes of a name that are not UTF-8 as ``\\xNN``
    (:func:`annotator.wording.utf8_text`)."""

    def format(self, record: logging.LogRecord) -> str:
        return utf8_text(super().format(record))


def log_to_stderr(level: int) -> None:
    """Send this process's log records of ``level`` and above to stderr, one line each."""
    handler = logging.StreamHandler()
    handler.setFormatter(Utf8Formatter(FORMAT))
    logging.basicConfig(level=level, handlers=[handler])

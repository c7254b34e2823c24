"""How a training run shows where it is: a bar over each epoch's steps on a terminal, one line
per epoch everywhere.

Training runs for hours, often as a batch job whose stderr is a file. tqdm's bar redraws itself
with carriage returns, which in such a log is one endless line; and the epoch's results, the
only progress a log can use, were logged at info, shown only with ``-v``. So the bar is drawn
only where stderr is a terminal, and :func:`show_epochs` lets the training commands show their
epoch lines by default.
"""

from __future__ import annotations

import logging
import sys
from collections.abc import Iterable
from typing import TypeVar

from tqdm import tqdm

T = TypeVar("T")

#: The loggers whose info lines are a training run's progress (one per epoch, resume, done).
PROGRESS_LOGGERS = ("training",)


def step_bar(steps: Iterable[T], total: int, desc: str, shown: bool = True) -> tqdm:
    """``steps`` with a bar (left behind by none: the epoch's line says the rest), drawn only
    where ``shown`` and stderr is a terminal; elsewhere tqdm passes the steps through as they are."""
    return tqdm(steps, total=total, desc=desc, leave=False, dynamic_ncols=True,
                disable=not (shown and sys.stderr.isatty()))


def show_epochs(shown: bool = True) -> None:
    """Let the training loops' info lines (one per epoch) through at the default verbosity where
    ``shown``; otherwise (``--no-progress``) leave them to ``-v``, as every other info line."""
    quieter_than_info = logging.getLogger().getEffectiveLevel() > logging.INFO
    for name in PROGRESS_LOGGERS:
        logging.getLogger(name).setLevel(logging.INFO if shown and quieter_than_info else logging.NOTSET)

"""How far a run over many videos is: a bar on a terminal, a status line now and then in a log.

tqdm redraws its bar with carriage returns about ten times a second. On a terminal that is a
bar; in a batch job's log (stderr to a file, ``ray job submit``, a cluster scheduler) it is one
endless line, 4 KB for a 7-second run, hundreds of MB for a week's, and logs were run with
``--no-progress``, which left a week-long run silent until its end. So the bar is drawn only on a
terminal, and otherwise one plain line is written every ``every_s`` seconds: what is done, the
rate, the time left. ``--no-progress`` still turns both off.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable
from typing import TextIO

from tqdm import tqdm

#: Seconds between two status lines where no bar is drawn (``--status-every``).
STATUS_EVERY_S = 60.0
#: How a status line names a count that is not a plain number.
_UNITS = {"fps": "frames/s"}


class RunProgress:
    """Videos done (in fractions: a long video moves it as its rows come) of ``total``.

    Args:
        total: videos in the run, ``initial`` of them done before it started.
        desc: what the bar and the lines are headed with ("annotate").
        shown: any progress output at all (``--no-progress`` turns it off).
        every_s: seconds between status lines where no bar is drawn (0: none).
        bar: draw a bar; by default where ``stream`` (stderr) is a terminal, else status lines.
    """

    def __init__(self, total: int, initial: int, desc: str, shown: bool = True, every_s: float = STATUS_EVERY_S,
                 bar: bool | None = None, stream: TextIO | None = None,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.total, self.done = total, float(initial)
        self.desc, self.every_s, self.clock, self.stream = desc, every_s if shown else 0, clock, stream
        drawn = shown and ((stream or sys.stderr).isatty() if bar is None else bar)
        self.last_line = clock()
        # The time left is reckoned from the first progress on: loading the models and starting
        # Ray (seconds, which would stretch the first lines' estimates) lie before it.
        self.reckoned_from: tuple[float, float] | None = None  # (clock, done) at the first advance
        self.counts: dict[str, object] = {}
        self.bar = tqdm(total=total, initial=initial, unit="video", desc=desc, dynamic_ncols=True, file=stream,
                        bar_format="{l_bar}{bar}| {n:.6g}/{total_fmt} videos [{elapsed}<{remaining}{postfix}]",
                        ) if drawn else None

    def advance(self, videos: float, **counts: object) -> None:
        """Count ``videos`` more done (never past the total: a video's fractions add up to 1 only
        up to float rounding, and tqdm then warns and shows a negative time left); ``counts``
        (frames, faces, failed, fps) are shown beside."""
        step = min(videos, max(self.total - self.done, 0))
        if self.reckoned_from is None:
            self.reckoned_from = (self.clock(), self.done + step)
        self.done += step
        self.counts.update(counts)
        if self.bar is not None:
            self.bar.update(step)
            self.bar.set_postfix(self.counts, refresh=False)
        elif self.every_s and self.clock() - self.last_line >= self.every_s:
            self.last_line = self.clock()
            print(self.status_line(), file=self.stream or sys.stderr, flush=True)

    def status_line(self) -> str:
        """e.g. ``annotate: 1,234/10,000 videos (12.3 %), 345,678 frames, 2,345 faces, 2 failed,
        190.2 frames/s, about 5 h 12 min left``: the counts given to :meth:`advance`, numbers as
        "N name", the rest (the rate, already formatted) as "value unit"."""
        share = self.done / self.total * 100 if self.total else 100.0
        parts = [f"{self.desc}: {int(self.done):,}/{self.total:,} videos ({share:.1f} %)"]
        parts += [f"{value:,} {name}" if isinstance(value, int) else f"{value} {_UNITS.get(name, name)}"
                  for name, value in self.counts.items()]
        if self.reckoned_from is not None and self.done < self.total:
            since, done_then = self.reckoned_from
            if (gained := self.done - done_then) > 0:
                parts.append(f"{duration((self.clock() - since) * (self.total - self.done) / gained)} left")
        return ", ".join(parts)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def duration(seconds: float) -> str:
    """An estimated ``seconds`` as a person reads a time left: "under 1 min", "about 12 min",
    "about 5 h 12 min", "about 2 d 3 h"."""
    minutes = int(seconds // 60)
    if minutes < 1:
        return "under 1 min"
    hours, minutes = divmod(minutes, 60)
    days, hours = divmod(hours, 24)
    if days:
        return f"about {days} d {hours} h"
    return f"about {hours} h {minutes} min" if hours else f"about {minutes} min"

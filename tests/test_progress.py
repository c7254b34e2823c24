"""Status lines where no progress bar is drawn (annotator.progress)."""

from __future__ import annotations

import io

from annotator.progress import RunProgress, duration


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_status_lines_come_every_so_often_with_the_time_left():
    clock, stream = Clock(), io.StringIO()
    progress = RunProgress(1000, 100, "annotate", bar=False, every_s=60, stream=stream, clock=clock)
    progress.advance(1, frames=10, faces=7, failed=0, fps="12.5")  # the estimate is reckoned from here
    clock.now += 59
    progress.advance(1, frames=20, faces=14, failed=1, fps="12.5")
    assert stream.getvalue() == ""  # not a minute yet
    clock.now += 1
    progress.advance(2.5, frames=1234, faces=1000, failed=1, fps="20.6")
    # 3.5 videos in the 60 s since the first advance: the 895.5 left take 4 h 15.9 min
    assert stream.getvalue() == ("annotate: 104/1,000 videos (10.4 %), 1,234 frames, 1,000 faces, 1 failed, "
                                 "20.6 frames/s, about 4 h 15 min left\n")
    clock.now += 30
    progress.advance(1)
    assert stream.getvalue().count("\n") == 1  # the next only a minute after the last


def test_no_status_lines_with_zero_or_with_a_bar():
    clock, stream = Clock(), io.StringIO()
    quiet = RunProgress(10, 0, "annotate", bar=False, every_s=0, stream=stream, clock=clock)
    clock.now += 3600
    quiet.advance(1, frames=5)
    drawn = RunProgress(10, 0, "annotate", bar=True, every_s=1, stream=stream, clock=clock)
    clock.now += 3600
    drawn.advance(1, frames=5)
    drawn.close()
    assert "videos (" not in stream.getvalue()  # no status line, only the bar


def test_times_left_read_as_a_person_says_them():
    assert [duration(s) for s in (0, 59, 60, 3599, 3600 + 12 * 60, 2 * 86400 + 3 * 3600 + 59)] == [
        "under 1 min", "under 1 min", "about 1 min", "about 59 min", "about 1 h 12 min", "about 2 d 3 h"]


def test_off_means_neither_bar_nor_lines_and_a_file_gets_lines():
    """--no-progress (shown=False) silences both; left to decide, a stream that is no terminal
    (a log file) gets status lines, not a bar."""
    clock, stream = Clock(), io.StringIO()
    off = RunProgress(10, 0, "annotate", shown=False, every_s=1, stream=stream, clock=clock)
    clock.now += 5
    off.advance(1, frames=5)
    assert off.bar is None and stream.getvalue() == ""
    logged = RunProgress(10, 0, "annotate", every_s=1, stream=stream, clock=clock)
    clock.now += 5
    logged.advance(1, frames=5)
    assert logged.bar is None and stream.getvalue() == "annotate: 1/10 videos (10.0 %), 5 frames\n"

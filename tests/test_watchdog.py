"""The stall watchdog: a Ray worker with no progress for --stall-timeout ends itself, even inside
a native call that holds the GIL; progress or waiting for the driver keep it alive; and through
a real Ray pool, a video that hangs its worker (a read that never returns) becomes a failed row
while the other videos are annotated."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.compute as pc
import pytest

from annotator.config import ConfigError, RunConfig

REPO = Path(__file__).resolve().parents[1]


def _python(body: str, timeout: float = 60) -> subprocess.CompletedProcess:
    script = "from annotator.watchdog import StallWatchdog\n" + textwrap.dedent(body)
    return subprocess.run([sys.executable, "-c", script], cwd=REPO, capture_output=True, text=True, timeout=timeout)


def test_no_progress_ends_the_process_even_inside_a_call_that_holds_the_gil() -> None:
    start = time.monotonic()
    done = _python("""
        import ctypes
        with StallWatchdog(1.0).watching(lambda: 0):
            ctypes.PyDLL(None).sleep(30)  # libc's sleep, the GIL held throughout: no Python thread runs
        print("finished")
    """)
    assert time.monotonic() - start < 20
    assert done.returncode != 0 and "finished" not in done.stdout
    # faulthandler's C timer (the GIL held, the watchdog's thread cannot run): where it hung, in the log.
    assert "Timeout (0:00:01.5" in done.stderr and "<module>" in done.stderr


def test_a_stall_ends_the_process_with_a_line_naming_the_item_after_the_tracebacks() -> None:
    """A hang that releases the GIL (a read that never returns, as from a hung mount): the
    watchdog's own thread ends the process about the timeout after the last progress."""
    start = time.monotonic()
    done = _python("""
        import time
        counter = [0]
        with StallWatchdog(1.0).watching(lambda: counter[0], "clip.mp4: hung") as watch:
            for _ in range(5):
                time.sleep(0.2)
                counter[0] += 1
            time.sleep(30)
        print("finished")
    """)
    assert 2.0 <= time.monotonic() - start < 10
    assert done.returncode == 1 and "finished" not in done.stdout
    lines = done.stderr.strip().splitlines()
    assert lines[-1] == "clip.mp4: hung" and "<module>" in done.stderr and "Timeout" not in done.stderr


def test_progress_keeps_it_alive_and_it_is_off_once_the_item_is_done() -> None:
    done = _python("""
        import time
        counter = [0]
        with StallWatchdog(1.0).watching(lambda: counter[0]):
            for _ in range(20):  # 4 s of work, progress every 0.2 s
                time.sleep(0.2)
                counter[0] += 1
        time.sleep(2)  # between items: not watched
        print("finished")
    """)
    assert done.returncode == 0 and "finished" in done.stdout, done.stderr


def test_waiting_for_the_driver_is_not_a_stall() -> None:
    done = _python("""
        import time
        watchdog = StallWatchdog(1.0)
        with watchdog.watching(lambda: 0) as watch:
            with watch.paused():
                time.sleep(3)  # Ray's backpressure: the driver has not taken the last table
            time.sleep(0.5)  # less than the timeout after it
        print("finished")
    """)
    assert done.returncode == 0 and "finished" in done.stdout, done.stderr


def test_a_negative_timeout_is_refused_and_zero_turns_it_off(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="--stall-timeout"):
        RunConfig(inputs=(), out=tmp_path / "o.parquet", stall_timeout=-1)
    done = _python("""
        import time
        with StallWatchdog(0).watching(lambda: 0):
            time.sleep(1.5)
        print("finished")
    """)
    assert done.returncode == 0 and "finished" in done.stdout, done.stderr


def test_a_video_that_hangs_its_worker_is_a_failed_row_and_the_others_are_done(carphone: Path, tmp_path: Path) -> None:
    """A named pipe that no one writes: opening it for reading blocks for ever, as a read from a
    hung network mount does. (Discovery never lists one; here it is handed to the pool directly.)"""
    pytest.importorskip("ray")
    from annotator.cluster import release_ray
    from annotator.orchestrate import stream_with_ray
    from annotator.worker import PART_COLUMN, STATUS_COLUMN, WorkItem

    hung = tmp_path / "hung.mp4"
    os.mkfifo(hung)
    config = RunConfig(inputs=(), out=tmp_path / "o.parquet", workers=1, stall_timeout=3)
    items = [WorkItem(hung, "hung"), WorkItem(carphone, "carphone")]
    try:
        tables = pa.concat_tables(list(stream_with_ray(config, items)), promote_options="permissive")
    finally:
        release_ray()
    hung_rows = tables.filter(pc.equal(tables[PART_COLUMN], "hung"))
    assert hung_rows.num_rows == 1 and hung_rows[STATUS_COLUMN][0].as_py() == "failed"
    assert hung_rows["error"][0].as_py() == (f"{hung}: its worker died on it 2 times (no progress for 3 s "
                                             "(--stall-timeout): it hung and was ended); skipped")
    done = tables.filter(pc.equal(tables[PART_COLUMN], "carphone"))
    assert done.filter(pc.is_valid(done["frame_index"])).num_rows == 120


def test_in_process_a_video_that_hangs_stops_the_run_in_one_line_after_the_videos_before_it(
        carphone: Path, tmp_path: Path) -> None:
    """--workers 0 has no worker to replace: a video that hangs (a named pipe nobody writes)
    stops the run with one line naming it, instead of holding it for ever; the tables of the
    video before it were all handed on."""
    hung = tmp_path / "hung.mp4"
    os.mkfifo(hung)
    start = time.monotonic()
    done = subprocess.run([sys.executable, "-c", textwrap.dedent(f"""
        from pathlib import Path
        from annotator.config import RunConfig
        from annotator.orchestrate import stream_in_process
        from annotator.worker import PART_COLUMN, STATUS_COLUMN, WorkItem
        config = RunConfig(inputs=(), out=Path({str(tmp_path / "o.parquet")!r}), workers=0, stall_timeout=3)
        items = [WorkItem(Path({str(carphone)!r}), "carphone"), WorkItem(Path({str(hung)!r}), "hung")]
        for table in stream_in_process(config, items):
            print(table[PART_COLUMN][0].as_py(), table[STATUS_COLUMN][0].as_py(), flush=True)
        print("finished")
    """)], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert time.monotonic() - start < 240
    assert done.returncode == 1 and "finished" not in done.stdout, done.stderr
    assert done.stdout.splitlines()[-1] == "carphone done"  # the video before it: all its tables
    assert done.stderr.strip().splitlines()[-1] == (
        f"{hung}: no progress for 3 s (--stall-timeout); the run stops here (finished videos are kept; "
        "without --workers 0, Ray workers record such a video as failed and go on)")

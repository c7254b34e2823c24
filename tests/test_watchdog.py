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
    assert "Timeout (0:00:01)!" in done.stderr and "<module>" in done.stderr  # where it hung, in the log


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

"""A Ray worker that dies on a video (a native crash on a hostile file, the OOM killer, a lost
node) or freezes (a stopped container, a read stuck in the kernel): the video starts again on a
new worker, and a video that kills its worker every time becomes a failed row while the run
goes on. Workers are killed (SIGKILL) or frozen (SIGSTOP) for real by a watcher that finds the
Ray worker process holding the video open."""

from __future__ import annotations

import dataclasses
import os
import shutil
import signal
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest

pytest.importorskip("ray")

from annotator.config import RunConfig  # noqa: E402
from annotator.run import EXIT_SOME_INPUTS_FAILED, run  # noqa: E402
from annotator.worker import RayVideoWorker  # noqa: E402
from engines.decoders import Sampling  # noqa: E402
from faults import carphone_frames, write_clip  # noqa: E402

#: The test clip's frames (every second one annotated: :func:`_config`).
FRAMES = 1800


def _workers_reading(path: Path) -> Iterator[int]:
    """Pids of Ray video workers that have ``path`` open."""
    target = str(path)
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            if b"RayVideoWorker" not in (entry / "cmdline").read_bytes():
                continue
            if any(os.readlink(fd) == target for fd in (entry / "fd").iterdir()):
                yield int(entry.name)
        except OSError:  # gone meanwhile, or not ours to look at
            continue


@contextmanager
def killing_workers_that_read(path: Path, times: int, after_s: float = 0.3,
                              sig: signal.Signals = signal.SIGKILL) -> Iterator[list[int]]:
    """SIGKILL (or ``sig``; up to ``times`` times) each Ray worker that has held ``path`` open
    ``after_s`` (0: as soon as it opens it)."""
    killed: list[int] = []
    seen: dict[int, float] = {}
    stop = threading.Event()

    def watch() -> None:
        while not stop.is_set() and len(killed) < times:
            now = time.monotonic()
            for pid in _workers_reading(path):
                if now - seen.setdefault(pid, now) >= after_s and pid not in killed:
                    os.kill(pid, sig)
                    killed.append(pid)
            time.sleep(0.01)

    watcher = threading.Thread(target=watch, daemon=True)
    watcher.start()
    try:
        yield killed
    finally:
        stop.set()
        watcher.join()


@pytest.fixture(scope="module")
def clip(carphone: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """:data:`FRAMES` frames of carphone: a video its worker holds open for a second or more, so
    the watcher catches it in the middle (360 frames took a fast machine under 0.5 s, 1,080 frames 1.25 s)."""
    return write_clip(tmp_path_factory.mktemp("clip") / "clip.mp4", carphone_frames(carphone), FRAMES)


@pytest.fixture
def videos(clip: Path, tmp_path: Path) -> Path:
    folder = tmp_path / "videos"
    folder.mkdir()
    for name in ("a.mp4", "b.mp4"):
        shutil.copy(clip, folder / name)
    return folder


def _config(videos: Path, out: Path) -> RunConfig:
    return RunConfig(inputs=(videos,), out=out, workers=1, sampling=Sampling(every_n=2))


def test_a_video_whose_worker_dies_is_annotated_again_on_a_new_one(videos: Path, tmp_path: Path) -> None:
    out = tmp_path / "out.parquet"
    with killing_workers_that_read(videos / "b.mp4", times=1, after_s=0.5) as killed:
        summary = run(_config(videos, out), progress=False)
    assert len(killed) == 1
    assert summary.failed == 0 and summary.frames == 2 * (FRAMES // 2)
    table = pq.read_table(out)
    for name in ("a.mp4", "b.mp4"):
        frames = table.filter(pc.equal(table["video_path"], str(videos / name)))["frame_index"].to_pylist()
        assert frames == list(range(0, FRAMES, 2))  # each frame once, in order: the first try's rows dropped


def test_a_video_that_kills_every_worker_is_a_failed_row_and_the_run_goes_on(videos: Path, tmp_path: Path) -> None:
    out = tmp_path / "out.parquet"
    poison = videos / "a.mp4"
    with killing_workers_that_read(poison, times=5, after_s=0.0) as killed:
        summary = run(_config(videos, out), progress=False)
    assert len(killed) == 2  # tried twice, then given up
    assert summary.failed == 1 and summary.exit_code == EXIT_SOME_INPUTS_FAILED
    table = pq.read_table(out)
    failed = table.filter(pc.equal(table["video_path"], str(poison)))
    assert failed.num_rows == 1 and failed["frame_index"][0].as_py() is None
    assert failed["error"][0].as_py() == (f"{poison}: its worker died on it 2 times (its process crashed or was "
                                          "killed: a native crash, the kernel's OOM killer, or its node lost); skipped")
    assert table.filter(pc.equal(table["video_path"], str(videos / "b.mp4"))).num_rows == FRAMES // 2


def test_a_frozen_worker_is_killed_by_the_driver_and_its_video_annotated_again(
        videos: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """SIGSTOP: the worker's own watchdog cannot fire in a stopped process; the driver's liveness
    checks go unanswered for ``--stall-timeout`` and it kills the worker."""
    out = tmp_path / "out.parquet"
    config = dataclasses.replace(_config(videos, out), stall_timeout=3.0)
    with killing_workers_that_read(videos / "b.mp4", times=1, after_s=0.5, sig=signal.SIGSTOP) as stopped:
        summary = run(config, progress=False)
    assert len(stopped) == 1
    assert summary.failed == 0 and summary.frames == 2 * (FRAMES // 2)
    table = pq.read_table(out)
    frames = table.filter(pc.equal(table["video_path"], str(videos / "b.mp4")))["frame_index"].to_pylist()
    assert frames == list(range(0, FRAMES, 2))
    assert f"{videos / 'b.mp4'}: its worker died (it did not answer for 3 s (--stall-timeout): its process " \
           "was frozen (stopped, or stuck in the kernel on a read) and was killed)" in caplog.text
    with pytest.raises(ProcessLookupError):  # killed, stopped as it was
        for _ in range(100):
            os.kill(stopped[0], 0)
            time.sleep(0.2)


class BrokenEngineWorker(RayVideoWorker):
    """The run's worker, except that the first of them to start has an engine that fails on every
    video after its first batch, as a GPU that errs would (an illegal memory access, an ECC
    error): it raises inside the pipeline, and the worker reports it as it reports any error."""

    marker = ""  # set by the test; the class travels to the workers by value, with it

    def __init__(self, config: RunConfig, threads: int = 0) -> None:
        super().__init__(config, threads)
        try:
            os.close(os.open(self.marker, os.O_CREAT | os.O_EXCL))
        except FileExistsError:
            return
        annotate = self.pipeline.annotate

        def fails_after_one_batch(*args, **kwargs):
            for number, batch in enumerate(annotate(*args, **kwargs)):
                if number == 1:
                    raise RuntimeError("CUDA error: an illegal memory access was encountered")
                yield batch

        self.pipeline.annotate = fails_after_one_batch


def test_a_video_whose_worker_raises_is_annotated_by_another(videos: Path, tmp_path: Path, caplog,
                                                              monkeypatch: pytest.MonkeyPatch) -> None:
    """A worker whose engine fails took a video, failed it in a moment, took the next: on a node
    with a bad GPU, most of a corpus became failed rows. Now a video a worker raised on goes to
    another worker once; its rows are written once, by the worker that finished it."""
    import sys

    import ray

    import annotator.orchestrate as orchestrate

    ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])
    BrokenEngineWorker.marker = str(tmp_path / "broken-engine")
    monkeypatch.setattr("annotator.run.stream_with_ray",
                        lambda config, items: orchestrate.stream_with_ray(config, items, BrokenEngineWorker))
    for name in ("c.mp4", "d.mp4"):
        shutil.copy(videos / "a.mp4", videos / name)
    out = tmp_path / "out.parquet"
    summary = run(dataclasses.replace(_config(videos, out), workers=2), progress=False)
    assert (tmp_path / "broken-engine").exists()
    assert summary.failed == 0 and summary.frames == 4 * (FRAMES // 2)
    table = pq.read_table(out)
    for name in ("a.mp4", "b.mp4", "c.mp4", "d.mp4"):
        frames = table.filter(pc.equal(table["video_path"], str(videos / name)))["frame_index"].to_pylist()
        assert frames == list(range(0, FRAMES, 2))  # each frame once: the rows before the failure dropped
    assert "RuntimeError: CUDA error: an illegal memory access was encountered (on " in caplog.text
    assert "; it goes to another worker" in caplog.text

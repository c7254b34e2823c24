"""annotator.prefetch: one stage on a thread, fed and drained by the caller's, in order, errors and
early stops included; and the pipeline that uses it."""

from __future__ import annotations

import gc
import os
import statistics
import subprocess
import sys
import threading

import pytest

from annotator.prefetch import map_ahead


def test_results_arrive_in_order_and_all() -> None:
    assert list(map_ahead(lambda x: x * x, iter(range(50)), ahead=2)) == [x * x for x in range(50)]


def test_fn_runs_on_its_thread_and_the_source_on_the_callers() -> None:
    threads = {"fn": set(), "source": set()}

    def source():
        for i in range(6):
            threads["source"].add(threading.current_thread().name)
            yield i

    def fn(x: int) -> int:
        threads["fn"].add(threading.current_thread().name)
        return x

    assert list(map_ahead(fn, source())) == list(range(6))
    assert threads == {"fn": {"map-ahead"}, "source": {threading.current_thread().name}}


def test_the_next_items_are_worked_on_while_the_caller_holds_this_one() -> None:
    done = [threading.Event() for _ in range(3)]

    def fn(i: int) -> int:
        done[i].set()
        return i

    results = map_ahead(fn, iter(range(3)), ahead=3)
    assert next(results) == 0
    # The caller has not asked for item 2, yet the thread has worked on it.
    assert done[2].wait(timeout=5)
    assert list(results) == [1, 2]


def test_no_more_than_ahead_items_are_handed_out() -> None:
    read: list[int] = []

    def source():
        for i in range(100):
            read.append(i)
            yield i

    results = map_ahead(lambda x: x, source(), ahead=3)
    assert next(results) == 0
    assert len(read) == 3  # items 0, 1 and 2: one returned, two with the thread
    results.close()


def test_an_error_in_fn_reaches_the_caller_after_the_results_before_it() -> None:
    def fn(x: int) -> int:
        if x == 2:
            raise ValueError("detector broke")
        return x

    results = map_ahead(fn, iter(range(5)))
    assert [next(results), next(results)] == [0, 1]
    with pytest.raises(ValueError, match="detector broke"):
        next(results)


def test_an_error_in_the_source_comes_after_the_results_of_the_items_before_it() -> None:
    def source():
        yield 1
        yield 2
        raise OSError("broken file")

    results = map_ahead(lambda x: x * 10, source(), ahead=3)
    assert next(results) == 10 and next(results) == 20
    with pytest.raises(OSError, match="broken file"):
        next(results)


def test_closing_early_stops_the_thread() -> None:
    before = threading.active_count()
    results = map_ahead(lambda x: x, iter(range(10**9)), ahead=2)
    assert [next(results) for _ in range(3)] == [0, 1, 2]
    results.close()
    assert threading.active_count() == before


def _marked(x: int) -> tuple[int, str]:
    return x, threading.current_thread().name


def test_spare_work_is_done_on_the_thread_when_no_item_waits_for_it() -> None:
    """With one item out at a time, the thread has nothing queued after each: it does the spare
    work of every result itself."""
    results = list(map_ahead(lambda x: x * 10, iter(range(5)), ahead=1, spare=_marked))
    assert results == [(x * 10, "map-ahead") for x in range(5)]


def test_spare_work_is_left_to_the_caller_while_items_wait_for_the_thread() -> None:
    """The thread busy with item 0 while 1 and 2 queue up: item 0 comes back without the spare
    work (the caller's thread, the one ahead, does it)."""
    queued = threading.Event()

    def source():
        yield 0
        yield 1
        queued.set()  # item 1 is with the thread's queue; item 2 is about to be
        yield 2

    def fn(x: int) -> int:
        if x == 0:
            assert queued.wait(timeout=5)
        return x

    results = list(map_ahead(fn, source(), ahead=3, spare=_marked))
    assert results[0] == 0
    assert [r if isinstance(r, int) else r[0] for r in results] == [0, 1, 2]


def test_ahead_must_be_positive() -> None:
    with pytest.raises(ValueError, match="ahead"):
        next(map_ahead(lambda x: x, iter([1]), ahead=0))


def _os_threads() -> int:
    return len(os.listdir("/proc/self/task"))


def _counting_threads(batches, added: list[int]):
    """The batches, noting at each how many OS threads (FFmpeg's included) the process has more
    than just before the first: threads of earlier tests that end meanwhile only lower it."""
    before = _os_threads()
    for batch in batches:
        added.append(_os_threads() - before)
        yield batch


def test_a_worker_chains_its_stages_on_threads_only_with_a_core_to_spare(carphone) -> None:
    """Decode, find faces, and align+score on three threads give the very rows of the stages run
    one after another (both use one intra-op thread), and stopping early leaves no thread behind."""
    from pathlib import Path

    import pyarrow as pa

    from annotator.config import RunConfig
    from annotator.pipeline import VideoPipeline

    config = RunConfig(inputs=(carphone,), out=Path("unused.parquet"), workers=0, device="cpu")
    gc.collect()  # earlier tests' sessions and pools end now, not in the middle of a count
    one = VideoPipeline(config, threads=1)
    assert not one.overlap  # one core: stages one after another
    two = VideoPipeline(config, threads=2)
    assert two.overlap
    serial_added: list[int] = []
    chained_added: list[int] = []
    serial = pa.Table.from_batches(_counting_threads(one.annotate(carphone), serial_added))
    chained = pa.Table.from_batches(_counting_threads(two.annotate(carphone), chained_added))
    assert serial.num_rows == chained.num_rows == 120  # every frame, in order, once
    assert chained.equals(serial)
    # The find thread is the only one added: FFmpeg decodes on the caller's thread (its own
    # threads would take turns with it, 1080p: 110.6-117.5 vs 100.2-109.0 frames/s).
    # Counted over the whole pass (the median of its batches), as FFmpeg's threads would be
    # there at every batch: other threads of the process come and go meanwhile (full CI runs saw
    # earlier tests' 80 threads end during the serial pass, and one thread more for a single
    # batch of the chained one). The serial pass's own threads are counted from zero.
    assert statistics.median(chained_added) <= max(0, statistics.median(serial_added)) + 1, (serial_added, chained_added)
    before = threading.active_count()
    rows = two.annotate(carphone)
    next(rows)
    rows.close()
    assert threading.active_count() == before


def test_faces_are_aligned_and_scored_once_on_whichever_thread_is_free(carphone, monkeypatch) -> None:
    """With decoding the slower of the two threads (large frames), the face thread aligns and
    scores the batches that no decoded batch waits behind; every batch is aligned and scored
    exactly once, and the rows are those of the stages run one after another."""
    import time
    from pathlib import Path

    import pyarrow as pa

    from annotator.config import RunConfig
    from annotator.pipeline import VideoPipeline

    config = RunConfig(inputs=(carphone,), out=Path("unused.parquet"), workers=0, device="cpu", batch_size=8)
    serial = pa.Table.from_batches(VideoPipeline(config, threads=1).annotate(carphone))
    two = VideoPipeline(config, threads=2)
    decode, align, score = two._decode, two.align, two.score
    aligned_on: list[str] = []
    scored_on: list[str] = []

    def slow_decode(*args, **kwargs):
        for batch in decode(*args, **kwargs):
            time.sleep(0.05)  # decoding 1080p H.264 on one core: 8 frames in about 50 ms
            yield batch

    def counted_align(faces):
        aligned_on.append(threading.current_thread().name)
        return align(faces)

    def counted_score(faces):
        scored_on.append(threading.current_thread().name)
        return score(faces)

    monkeypatch.setattr(two, "_decode", slow_decode)
    monkeypatch.setattr(two, "align", counted_align)
    monkeypatch.setattr(two, "score", counted_score)
    chained = pa.Table.from_batches(two.annotate(carphone))
    assert chained.equals(serial)
    assert len(aligned_on) == len(scored_on) == 15  # 120 frames in batches of 8, each aligned and scored once
    assert "map-ahead" in aligned_on and "map-ahead" in scored_on, (aligned_on, scored_on)


def test_a_failure_in_a_chained_stage_reaches_the_caller(carphone, monkeypatch) -> None:
    from pathlib import Path

    from annotator.config import RunConfig
    from annotator.pipeline import VideoPipeline

    config = RunConfig(inputs=(carphone,), out=Path("unused.parquet"), workers=0, device="cpu")
    two = VideoPipeline(config, threads=2)
    calls = []

    def failing(frames, *args):
        calls.append(threading.current_thread().name)
        raise RuntimeError("detector broke")

    monkeypatch.setattr(two, "find", failing)
    before = threading.active_count()
    with pytest.raises(RuntimeError, match="detector broke"):
        list(two.annotate(carphone))
    assert calls == ["map-ahead"]  # it ran on the find thread, and the error came here
    assert threading.active_count() == before


@pytest.mark.skipif(not hasattr(os, "sched_setaffinity") or (os.cpu_count() or 1) < 2, reason="needs 2 CPUs and Linux")
def test_a_local_ray_instance_gets_the_cpus_this_process_may_use() -> None:
    """Under taskset (or a scheduler's cpuset) the local instance is sized to the allowed CPUs,
    not the machine's; otherwise Ray's own count stands."""
    code = "from annotator.cluster import local_cpus; print(local_cpus())"
    pinned = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                            preexec_fn=lambda: os.sched_setaffinity(0, {min(os.sched_getaffinity(0))}))
    assert pinned.stdout.strip() == "1"
    free = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    expected = "None" if len(os.sched_getaffinity(0)) == os.cpu_count() else str(len(os.sched_getaffinity(0)))
    assert free.stdout.strip() == expected

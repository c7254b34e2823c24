"""annotator.prefetch: the next item is made on another thread, in order, errors and early stops included."""

from __future__ import annotations

import os
import subprocess
import sys
import threading

import pytest

from annotator.prefetch import prefetched


def test_items_arrive_in_order_and_all() -> None:
    assert list(prefetched(iter(range(50)), depth=2)) == list(range(50))


def test_the_next_item_is_made_while_the_consumer_holds_this_one() -> None:
    made = [threading.Event() for _ in range(3)]

    def source():
        for i in range(3):
            made[i].set()
            yield i

    items = prefetched(source(), depth=1)
    assert next(items) == 0
    # The consumer has not asked for item 1, yet the producer thread makes it.
    assert made[1].wait(timeout=5)
    assert list(items) == [1, 2]


def test_an_error_in_the_source_reaches_the_consumer_after_the_items_before_it() -> None:
    def source():
        yield 1
        raise ValueError("broken frame")

    items = prefetched(source())
    assert next(items) == 1
    with pytest.raises(ValueError, match="broken frame"):
        next(items)


def test_closing_early_stops_the_thread_and_closes_the_source_on_it() -> None:
    closed_on: list[str] = []

    def endless():
        try:
            i = 0
            while True:
                yield i
                i += 1
        finally:
            closed_on.append(threading.current_thread().name)

    before = threading.active_count()
    items = prefetched(endless(), depth=2)
    assert [next(items) for _ in range(3)] == [0, 1, 2]
    items.close()
    assert closed_on == ["prefetch"]  # closed, by the thread that ran it, before close() returned
    assert threading.active_count() == before


def test_depth_must_be_positive() -> None:
    with pytest.raises(ValueError, match="depth"):
        next(prefetched(iter([1]), depth=0))


def test_a_worker_chains_its_stages_on_threads_only_with_a_core_to_spare(carphone) -> None:
    """Decode, find faces, and align+score on three threads give the very rows of the stages run
    one after another (both use one intra-op thread), and stopping early leaves no thread behind."""
    from pathlib import Path

    import pyarrow as pa

    from annotator.config import RunConfig
    from annotator.pipeline import VideoPipeline

    config = RunConfig(inputs=(carphone,), out=Path("unused.parquet"), workers=0, device="cpu")
    one = VideoPipeline(config, threads=1)
    assert not one.overlap  # one core: stages one after another
    two = VideoPipeline(config, threads=2)
    assert two.overlap
    serial = pa.Table.from_batches(list(one.annotate(carphone)))
    chained = pa.Table.from_batches(list(two.annotate(carphone)))
    assert serial.num_rows == chained.num_rows == 120  # every frame, in order, once
    assert chained.equals(serial)
    before = threading.active_count()
    rows = two.annotate(carphone)
    next(rows)
    rows.close()
    assert threading.active_count() == before


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
    assert calls == ["prefetch"]  # it ran on the find thread, and the error came here
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

"""The driver's watch on the Ray cluster's head (annotator.head_watch), on its own; test_cluster
kills a real head under a real run."""

from __future__ import annotations

import socket
import threading
import time

import pytest

from annotator.head_watch import GcsQuestion, HeadWatch, give_up_after_s


def _watch(ask, give_up_s=0.2, watching=lambda: True) -> tuple[HeadWatch, list[float], threading.Event]:
    lost: list[float] = []
    called = threading.Event()

    def on_lost(silent: float) -> None:
        lost.append(silent)
        called.set()

    watch = HeadWatch(ask, on_lost, give_up_s, watching, every_s=0.02)
    watch.start()
    return watch, lost, called


def test_a_head_that_stops_answering_is_lost_after_the_grace_period() -> None:
    answers = [True] * 5  # answers for a while, then never again
    started = time.monotonic()
    watch, lost, called = _watch(lambda: bool(answers and answers.pop()))
    assert called.wait(5)
    watch.join(5)
    assert len(lost) == 1 and lost[0] >= 0.2 and time.monotonic() - started >= 0.3


def test_a_head_that_answers_is_never_lost_and_the_watch_stops_when_told() -> None:
    closed = threading.Event()
    watch = HeadWatch(lambda: True, lambda silent: pytest.fail("lost"), 0.2, close=closed.set, every_s=0.02)
    watch.start()
    time.sleep(0.5)
    assert watch.is_alive() and not closed.is_set()
    watch.stop()
    watch.join(5)
    assert not watch.is_alive() and closed.is_set()  # what it asks through is closed with it


def test_a_watch_ends_quietly_once_this_process_left_the_cluster() -> None:
    """Ray shut down, or started again elsewhere: the old head's silence is no loss."""
    on_it = threading.Event()
    on_it.set()
    watch, lost, called = _watch(lambda: False, give_up_s=0.3, watching=on_it.is_set)
    on_it.clear()
    watch.join(5)
    assert not watch.is_alive() and lost == []


def test_no_gcs_at_an_address_is_no_answer() -> None:
    with socket.socket() as sock:  # a port nobody listens on (bound, never listening)
        sock.bind(("127.0.0.1", 0))
        ask = GcsQuestion(f"127.0.0.1:{sock.getsockname()[1]}", token=None)
        assert ask() is False
        ask.close()


@pytest.mark.parametrize("setting, expected", [(None, 50.0), ("20", 10.0), ("8", 4.0), ("1", 3.0), ("bad", 50.0)])
def test_the_watch_gives_up_before_ray_does(monkeypatch, setting, expected) -> None:
    """Ray ends the driver itself after RAY_gcs_rpc_server_reconnect_timeout_s (60 s by default)."""
    if setting is None:
        monkeypatch.delenv("RAY_gcs_rpc_server_reconnect_timeout_s", raising=False)
    else:
        monkeypatch.setenv("RAY_gcs_rpc_server_reconnect_timeout_s", setting)
    assert give_up_after_s() == expected


def test_a_run_ending_without_release_leaves_no_grpc_noise(tmp_path) -> None:
    """A run interrupted (Ctrl-C, SIGTERM) ends with Ray up, and Ray's exit hook stops the local
    GCS: the watch's channel, were it still open then, logged gRPC's "Got goaway" after the run's
    last line (seen in CI, in about half the runs). The watch closes it first."""
    import subprocess
    import sys

    script = ("import time\nfrom pathlib import Path\nfrom annotator.config import RunConfig\n"
              "from annotator.cluster import init_ray\n"
              f"init_ray(RunConfig(inputs=(), out=Path({str(tmp_path / 'out')!r})))\n"
              "time.sleep(2.5)  # the watch has asked: its channel is connected\n")
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert "goaway" not in done.stderr.lower(), done.stderr

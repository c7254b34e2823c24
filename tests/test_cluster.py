"""`annotate run --address`: joining an existing Ray cluster (a real head started here)."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pyarrow.dataset as ds
import pytest

RAY = str(Path(sys.executable).with_name("ray"))


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture
def ray_head():
    """A head node in its own process group (``--block``), so stopping it touches nothing else."""
    port = _free_port()
    temp_dir = tempfile.mkdtemp(prefix="rh", dir="/tmp")  # short: Ray's socket paths must fit
    head = subprocess.Popen(
        [RAY, "start", "--head", "--block", "--port", str(port), "--node-ip-address", "127.0.0.1",
         "--num-cpus", "2", "--include-dashboard=false", "--temp-dir", temp_dir],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True,
    )
    address = f"127.0.0.1:{port}"
    env = {**os.environ, "RAY_AUTH_MODE": "token"}
    deadline = time.monotonic() + 60
    while subprocess.run([RAY, "status", "--address", address], env=env, capture_output=True).returncode != 0:
        if time.monotonic() > deadline or head.poll() is not None:
            os.killpg(head.pid, signal.SIGTERM)
            pytest.fail("the Ray head did not come up")
        time.sleep(1)
    yield address
    os.killpg(head.pid, signal.SIGTERM)
    head.wait(timeout=60)
    shutil.rmtree(temp_dir, ignore_errors=True)


def test_run_joins_an_existing_cluster_with_its_token(ray_head, carphone, tmp_path):
    out = tmp_path / "results"
    env = {k: v for k, v in os.environ.items() if k != "RAY_AUTH_MODE"}  # the CLI must turn token mode on
    done = subprocess.run(
        [sys.executable, "-m", "annotator", "run", str(carphone), "--out", str(out), "--address", ray_head,
         "--every-n", "4", "--no-progress"],
        env=env, capture_output=True, text=True, timeout=300,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    assert "1 videos" in done.stdout and "30 frames" in done.stdout
    assert ds.dataset(out, format="parquet").to_table().num_rows == 30


"""File names that are not UTF-8 (Linux names are bytes: Latin-1 names from old archives and
cameras are common in corpora). Before, one such name anywhere in the inputs stopped the whole
run at its start (``'utf-8' codec can't encode character '\\udce9'``); now its video is annotated
like any other, and its path is written with the stray bytes as ``\\xNN``."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pyarrow.compute as pc
import pyarrow.parquet as pq

from annotator.config import RunConfig
from annotator.run import run
from annotator.wording import utf8_text


def _name(raw: bytes) -> str:
    return os.fsdecode(raw)  # how Python carries a name that is not UTF-8: lone surrogates


def test_utf8_text_keeps_valid_text_and_escapes_stray_bytes() -> None:
    assert utf8_text("café/日本.mp4") == "café/日本.mp4"
    assert utf8_text(_name(b"caf\xe9.mp4")) == "caf\\xe9.mp4"


def test_videos_with_names_that_are_not_utf8_are_annotated_and_resumed(carphone: Path, tmp_path: Path) -> None:
    videos = tmp_path / "videos"
    videos.mkdir()
    latin1 = videos / _name(b"caf\xe9.mp4")
    shutil.copy(carphone, latin1)
    shutil.copy(carphone, videos / "ok.mp4")
    (videos / _name(b"broken\xff.mp4")).write_bytes(b"not a video" * 100)
    out = tmp_path / "results"
    config = RunConfig(inputs=(videos,), out=out, workers=0)
    summary = run(config, progress=False)
    assert (summary.videos, summary.failed, summary.frames) == (3, 1, 240)
    table = pq.read_table(out)
    paths = table.group_by("video_path").aggregate([("frame_index", "count")]).to_pylist()
    assert sorted((p["video_path"], p["frame_index_count"]) for p in paths) == [
        (f"{videos}/broken\\xff.mp4", 0), (f"{videos}/caf\\xe9.mp4", 120), (f"{videos}/ok.mp4", 120)]
    errors = table.filter(pc.is_valid(table["error"]))["error"].to_pylist()
    assert errors == [f"{videos}/broken\\xff.mp4: cannot open (Invalid data found when processing input)"]
    again = run(config, progress=False)  # the two done are skipped, the broken one tried again
    assert (again.skipped, again.failed, again.frames) == (2, 1, 0)


def test_the_lines_people_read_name_such_a_file_as_its_rows_do(tmp_path: Path) -> None:
    """``caf\\xe9.mp4`` in the one-line error and in log lines, as in the rows, not ``caf\\udce9.mp4``."""
    import subprocess
    import sys

    missing = os.fsencode(tmp_path) + b"/caf\xe9.mp4"
    done = subprocess.run([sys.executable, "-m", "annotator", "run", missing, "--out", tmp_path / "o.parquet"],
                          capture_output=True)
    assert done.returncode == 2
    assert done.stderr.decode().strip() == f"annotate: error: {tmp_path}/caf\\xe9.mp4: no such file or directory"

    import logging

    from annotator.logs import Utf8Formatter

    record = logging.LogRecord("annotator.run", logging.WARNING, __file__, 1, "%s changed", (_name(b"caf\xe9.mp4"),), None)
    assert Utf8Formatter("%(levelname)s %(message)s").format(record) == "WARNING caf\\xe9.mp4 changed"

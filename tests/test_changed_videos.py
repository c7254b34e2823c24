"""A re-run annotates again a video that changed since its part was written (another size or
modification time: replaced, re-encoded, or still being copied when it was first annotated),
instead of keeping rows of what the file no longer holds; unchanged videos are skipped."""

from __future__ import annotations

import json
import logging
import os
import shutil
from pathlib import Path

import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest

from annotator.config import RunConfig
from annotator.run import run
from annotator.writer import OutputLayout, changed_since, part_key, read_metadata, recorded_stamp, video_stamp
from faults import carphone_frames, write_clip


def _frames(out: Path, video: Path) -> list[int]:
    table = pq.read_table(out)
    return table.filter(pc.equal(table["video_path"], str(video)))["frame_index"].to_pylist()


def test_a_changed_video_is_annotated_again_and_the_others_skipped(carphone: Path, tmp_path: Path,
                                                                   caplog: pytest.LogCaptureFixture) -> None:
    videos = tmp_path / "videos"
    videos.mkdir()
    for name in ("a.mp4", "b.mp4"):
        shutil.copy(carphone, videos / name)
    out = tmp_path / "results"  # a directory output keeps its parts: later runs add to it
    config = RunConfig(inputs=(videos,), out=out, workers=0)
    assert run(config, progress=False).frames == 240
    part_b = OutputLayout(out).part_path(part_key(videos / "b.mp4"))
    assert recorded_stamp(read_metadata(part_b)["video"]) == video_stamp(videos / "b.mp4")

    # b.mp4 is replaced by a shorter recording (written anew: another size and time).
    write_clip(tmp_path / "shorter.mp4", carphone_frames(carphone), 45)
    os.replace(tmp_path / "shorter.mp4", videos / "b.mp4")
    with caplog.at_level(logging.WARNING, logger="annotator.run"):
        summary = run(config, progress=False)
    assert summary.skipped == 1 and summary.frames == 45
    assert f"1 video changed since annotated (size or modification time), annotated again: " \
           f"{videos / 'b.mp4'}" in caplog.text
    assert _frames(out, videos / "b.mp4") == list(range(45))  # the old 120 rows are gone
    assert _frames(out, videos / "a.mp4") == list(range(120))

    # Unchanged since: nothing to do. Touched (same bytes, a new time): done again, as make would.
    assert run(config, progress=False).frames == 0
    stat = (videos / "a.mp4").stat()
    os.utime(videos / "a.mp4", ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))
    assert run(config, progress=False).frames == 120


def test_parts_written_before_stamps_are_kept(carphone: Path, tmp_path: Path) -> None:
    """An output made by an earlier version has no stamps: its videos count as done, as before."""
    videos = tmp_path / "videos"
    videos.mkdir()
    shutil.copy(carphone, videos / "a.mp4")
    out = tmp_path / "results"
    config = RunConfig(inputs=(videos,), out=out, workers=0)
    run(config, progress=False)
    part = OutputLayout(out).part_path(part_key(videos / "a.mp4"))
    table = pq.read_table(part)
    raw = dict(pq.read_metadata(part).metadata)
    facts = json.loads(raw[b"annotator.video"])
    del facts["file_size"], facts["file_mtime_ns"]
    raw[b"annotator.video"] = json.dumps(facts).encode()
    pq.write_table(table.replace_schema_metadata(raw), part)
    os.utime(videos / "a.mp4")  # a new time, which an unstamped part cannot tell
    assert run(config, progress=False).frames == 0


def test_only_a_known_difference_counts_as_a_change() -> None:
    """A file that cannot be read for a moment (a mount's hiccup) must not cost its results, nor
    may results from before stamps were recorded."""
    assert changed_since((10, 5), (11, 5)) and changed_since([10, 5], (10, 6))  # JSON gives lists back
    assert not changed_since((10, 5), (10, 5)) and not changed_since([10, 5], (10, 5))
    assert not changed_since((10, 5), None) and not changed_since(None, (10, 5))

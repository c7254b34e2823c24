"""A re-run into an existing ``--out x.parquet`` adds to it, as one into ``--out DIR`` does: new
videos, videos that failed and videos whose files changed are annotated; the earlier rows of the
others are kept as they were; nothing new leaves the file untouched (annotator.writer.MergedResult)."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest

from annotator.config import ConfigError, RunConfig
from annotator.run import run
from annotator.writer import INVENTORY, METADATA_KEY, PARTS_KEY, OutputLayout, read_metadata, schema_with_metadata
from engines.decoders import Sampling

SORT = [("frame_index", "ascending"), ("face_index", "ascending")]


def _run(videos: Path, out: Path, **kwargs):
    kwargs.setdefault("sampling", Sampling(every_n=10))
    return run(RunConfig(inputs=(videos,), out=out, workers=0, **kwargs), progress=False)


def _rows(out: Path, name: str) -> pa.Table:
    table = pq.read_table(out)
    return table.filter(pc.ends_with(table["video_path"], "/" + name)).sort_by(SORT)


def _same_file(out: Path, before: os.stat_result) -> bool:
    after = out.stat()
    return (after.st_ino, after.st_mtime_ns, after.st_size) == (before.st_ino, before.st_mtime_ns, before.st_size)


@pytest.fixture()
def videos(carphone: Path, tmp_path: Path) -> Path:
    folder = tmp_path / "videos"
    folder.mkdir()
    shutil.copy(carphone, folder / "a.mp4")
    (folder / "broken.mp4").write_bytes(carphone.read_bytes()[:5000])  # cut short: no index
    return folder


def test_new_and_failed_videos_are_added_and_the_earlier_rows_kept(videos: Path, carphone: Path, tmp_path: Path) -> None:
    out = tmp_path / "out.parquet"
    first = _run(videos, out)
    assert first.failed == 1 and first.frames == 12
    a_before = _rows(out, "a.mp4")
    assert _rows(out, "broken.mp4")["error"][0].as_py().endswith("its frames cannot be located")

    # The same failure again: the file is not rewritten.
    stat = out.stat()
    again = _run(videos, out)
    assert again.skipped == 1 and again.failed == 1 and _same_file(out, stat)

    # A new video and the broken one mended: both annotated, a.mp4's rows kept as they were.
    shutil.copy(carphone, videos / "b.mp4")
    shutil.copy(carphone, videos / "broken.mp4")
    third = _run(videos, out)
    assert (third.skipped, third.failed, third.frames) == (1, 0, 24)
    assert _rows(out, "a.mp4").equals(a_before)
    for name in ("b.mp4", "broken.mp4"):
        rows = _rows(out, name)
        assert rows.num_rows == 12 and rows["error"].null_count == 12
        assert rows.drop_columns(["video_path"]).equals(a_before.drop_columns(["video_path"]))  # the same clip
    assert pq.read_table(out).num_rows == 36
    inventory = read_metadata(out)[INVENTORY]
    assert sorted((Path(e["video_path"]).name, e["status"]) for e in inventory) == [
        ("a.mp4", "done"), ("b.mp4", "done"), ("broken.mp4", "done")]
    assert not OutputLayout(out).parts_dir.exists()


def test_a_video_whose_file_changed_is_annotated_again(videos: Path, tmp_path: Path) -> None:
    (videos / "broken.mp4").unlink()
    out = tmp_path / "out.parquet"
    _run(videos, out)
    before = _rows(out, "a.mp4")
    # Replaced by its first 60 frames (another size and time): its old rows must not stay.
    import av

    with av.open(str(videos / "a.mp4")) as src, av.open(str(tmp_path / "short.mp4"), "w") as dst:
        stream = dst.add_stream("libx264", rate=30)
        stream.width, stream.height, stream.pix_fmt = 176, 144, "yuv420p"
        for i, frame in enumerate(src.decode(video=0)):
            if i == 60:
                break
            dst.mux(stream.encode(frame.reformat(format="yuv420p")))
        dst.mux(stream.encode(None))
    shutil.move(tmp_path / "short.mp4", videos / "a.mp4")
    again = _run(videos, out)
    assert again.skipped == 0 and again.frames == 6
    after = _rows(out, "a.mp4")
    assert after["frame_index"].to_pylist() == before["frame_index"].to_pylist()[:6]
    assert pq.read_table(out).num_rows == 6


def test_other_options_are_refused_naming_the_file(videos: Path, tmp_path: Path) -> None:
    out = tmp_path / "out.parquet"
    _run(videos, out)
    stat = out.stat()
    with pytest.raises(ConfigError, match=rf"{out}: holds results made with other models or options \(sampling;"):
        _run(videos, out, sampling=Sampling(every_n=5))
    assert _same_file(out, stat)


def test_a_file_without_an_inventory_needs_overwrite(videos: Path, tmp_path: Path) -> None:
    """A result merged before files listed their videos cannot be added to: one line, --overwrite works."""
    out = tmp_path / "out.parquet"
    _run(videos, out)
    table = pq.read_table(out)
    old = {k: v for k, v in json.loads(table.schema.metadata[METADATA_KEY]).items() if k != INVENTORY}
    pq.write_table(table.replace_schema_metadata(schema_with_metadata(old).metadata), out)
    with pytest.raises(ConfigError, match="did not list its videos.*--overwrite"):
        _run(videos, out)
    redone = _run(videos, out, overwrite=True)
    assert redone.skipped == 0 and redone.frames == 12 and INVENTORY in read_metadata(out)


def test_the_inventory_is_stored_once_outside_arrows_schema(videos: Path, tmp_path: Path) -> None:
    """The run's metadata is also kept in Arrow's schema (base64); the inventory, one entry per
    video, has a footer key of its own, so it is not stored twice: 1,500 videos' merged file
    had a 0.58 MB footer with it in both, 0.26 MB now (about 40 MB against 17 for 100,000)."""
    out = tmp_path / "out.parquet"
    _run(videos, out)
    footer = pq.read_metadata(out).metadata
    assert [Path(e["video_path"]).name for e in json.loads(footer[PARTS_KEY])] == ["a.mp4", "broken.mp4"]
    assert INVENTORY not in json.loads(footer[METADATA_KEY])
    arrow = pq.read_schema(out).metadata  # what Arrow's stored schema holds
    assert PARTS_KEY not in arrow and INVENTORY not in json.loads(arrow[METADATA_KEY])
    assert len(read_metadata(out)[INVENTORY]) == 2


def test_a_file_merged_with_its_inventory_in_the_run_metadata_is_added_to(videos: Path, carphone: Path,
                                                                          tmp_path: Path) -> None:
    """A file merged before the inventory had a key of its own (it was in the run's metadata)
    resumes as before, and is rewritten the new way."""
    (videos / "broken.mp4").unlink()
    out = tmp_path / "out.parquet"
    _run(videos, out)
    table, meta = pq.read_table(out), read_metadata(out)
    pq.write_table(table.replace_schema_metadata(schema_with_metadata(meta).metadata), out)  # the old layout
    assert PARTS_KEY not in pq.read_metadata(out).metadata and INVENTORY in json.loads(
        pq.read_metadata(out).metadata[METADATA_KEY])
    shutil.copy(carphone, videos / "b.mp4")
    again = _run(videos, out)
    assert (again.skipped, again.failed, again.frames) == (1, 0, 12)
    footer = pq.read_metadata(out).metadata
    assert sorted(Path(e["video_path"]).name for e in json.loads(footer[PARTS_KEY])) == ["a.mp4", "b.mp4"]
    assert INVENTORY not in json.loads(footer[METADATA_KEY]) and pq.read_table(out).num_rows == 24


def test_a_parquet_file_annotate_did_not_write_is_refused(videos: Path, tmp_path: Path) -> None:
    out = tmp_path / "theirs.parquet"
    pq.write_table(pa.table({"x": [1, 2]}), out)
    stat = out.stat()
    for overwrite in (False, True):
        with pytest.raises(ConfigError, match="was not written by annotate, or is damaged .*; refusing to replace it"):
            _run(videos, out, overwrite=overwrite)
    assert _same_file(out, stat)


def test_a_result_cut_short_is_refused_in_one_line_and_left_as_it_is(videos: Path, tmp_path: Path) -> None:
    """A merged result damaged since (a copy cut short) is not added to, nor replaced."""
    out = tmp_path / "out.parquet"
    _run(videos, out)
    out.write_bytes(out.read_bytes()[:-100])
    stat = out.stat()
    for overwrite in (False, True):
        with pytest.raises(ConfigError, match=rf"{out}: was not written by annotate, or is damaged \(\w+: .+\); "
                                              "refusing to replace it"):
            _run(videos, out, overwrite=overwrite)
    assert _same_file(out, stat)

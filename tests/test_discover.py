"""Finding videos on disk."""

from __future__ import annotations

import io
import os
from pathlib import Path

import pytest

from annotator.config import ConfigError
from annotator.discover import find_videos
from annotator.file_list import read_file_list


def test_recursive_by_extension_skipping_hidden_and_following_links_once(tmp_path):
    (tmp_path / "a" / "b").mkdir(parents=True)
    (tmp_path / ".hidden").mkdir()
    for rel in ("a/x.mp4", "a/b/y.MKV", "a/notes.txt", "a/.z.mp4", ".hidden/h.mp4"):
        (tmp_path / rel).write_bytes(b"")
    os.symlink(tmp_path / "a", tmp_path / "a" / "b" / "loop")  # a cycle
    found = find_videos([tmp_path])
    assert [p.relative_to(tmp_path).as_posix() for p in found.videos] == ["a/b/y.MKV", "a/x.mp4"]
    assert found.problems == [] and found.skipped_line() == "skipped 1 file that is not a video (.txt 1)"


def test_explicit_files_are_taken_and_deduplicated(tmp_path):
    clip = tmp_path / "clip.bin"
    clip.write_bytes(b"")
    assert find_videos([clip, clip]).videos == [clip.absolute()]


def test_missing_path_and_empty_folder(tmp_path):
    with pytest.raises(ConfigError, match="no such file"):
        find_videos([tmp_path / "nope"])
    with pytest.raises(ConfigError, match="no video files"):
        find_videos([tmp_path])


def test_two_paths_to_one_file_are_one_video(tmp_path):
    """A dataset's split folders often link into the raw one. Each video's part is named by its
    real path, so a file found under two paths was annotated twice into one part (the run said
    "2 videos", the output held one)."""
    raw = tmp_path / "raw"
    raw.mkdir()
    (raw / "a.mp4").write_bytes(b"")
    (raw / "b.mp4").write_bytes(b"")
    (tmp_path / "train").mkdir()
    os.symlink(raw / "a.mp4", tmp_path / "train" / "a.mp4")  # a link to a file
    os.symlink(raw, tmp_path / "everything")  # a link to a folder
    found = find_videos([tmp_path / "train", raw, tmp_path / "everything", raw / "b.mp4"])
    assert found.videos == [raw / "a.mp4", raw / "b.mp4"]  # the files' own paths are kept
    assert found.aliases == [(tmp_path / "everything" / "a.mp4", raw / "a.mp4"),
                             (tmp_path / "everything" / "b.mp4", raw / "b.mp4"),
                             (tmp_path / "train" / "a.mp4", raw / "a.mp4")]


def test_hard_links_to_one_file_are_one_video(tmp_path):
    """A hard link has a real path of its own, so it passed as another video: its part, named by
    that path, held the same rows again under another name. A copy stays a video of its own."""
    (tmp_path / "raw").mkdir()
    (tmp_path / "test").mkdir()
    (tmp_path / "raw" / "a.mp4").write_bytes(b"same bytes")
    (tmp_path / "raw" / "copy.mp4").write_bytes(b"same bytes")
    os.link(tmp_path / "raw" / "a.mp4", tmp_path / "test" / "a.mp4")
    os.symlink(tmp_path / "test" / "a.mp4", tmp_path / "soft.mp4")  # a symbolic link to the hard link
    found = find_videos([tmp_path / "test", tmp_path / "soft.mp4", tmp_path / "raw"])
    assert found.videos == [tmp_path / "raw" / "a.mp4", tmp_path / "raw" / "copy.mp4"]
    assert found.aliases == [(tmp_path / "soft.mp4", tmp_path / "raw" / "a.mp4"),
                             (tmp_path / "test" / "a.mp4", tmp_path / "raw" / "a.mp4")]


def test_a_link_alone_keeps_its_own_path(tmp_path):
    (tmp_path / "raw").mkdir()
    (tmp_path / "raw" / "a.mp4").write_bytes(b"")
    os.symlink(tmp_path / "raw" / "a.mp4", tmp_path / "link.mp4")
    found = find_videos([tmp_path / "link.mp4"])
    assert found.videos == [tmp_path / "link.mp4"] and found.aliases == []


def test_the_runs_own_output_among_the_videos_is_passed_over(tmp_path):
    """``annotate run . --out results/`` in the videos' folder: a re-run counted its own parts
    among "files that are not videos" (10,000 of them for 10,000 videos)."""
    (tmp_path / "a.mp4").write_bytes(b"")
    for own in ("results/part-1.parquet", "all.parquet.parts/part-1.parquet", "all.parquet"):
        (tmp_path / own).parent.mkdir(exist_ok=True)
        (tmp_path / own).write_bytes(b"")
    found = find_videos([tmp_path], own=(tmp_path / "results", tmp_path / "results"))
    assert found.videos == [tmp_path / "a.mp4"]
    # Another run's output is counted as before: it is not this run's.
    assert found.skipped_line() == "skipped 2 files that are not videos (.parquet 2)"
    found = find_videos([tmp_path], own=(tmp_path / "all.parquet.parts", tmp_path / "all.parquet"))
    assert found.skipped_line() == "skipped 1 file that is not a video (.parquet 1)"


def test_listed_paths_that_are_gone_are_problems_not_the_end_of_the_run(tmp_path):
    """--files-from: a manifest outlives some of its files; those become error rows. A path on
    the command line that does not exist still stops the run at once (a typo)."""
    (tmp_path / "a.mp4").write_bytes(b"")
    (tmp_path / "folder").mkdir()
    (tmp_path / "folder" / "b.mkv").write_bytes(b"")
    found = find_videos([], listed=[tmp_path / "a.mp4", tmp_path / "gone.mp4", tmp_path / "folder"],
                        list_name="list.txt")
    assert found.videos == [tmp_path / "a.mp4", tmp_path / "folder" / "b.mkv"]
    assert found.problems == [(tmp_path / "gone.mp4", "no such file or directory (listed in list.txt)")]
    with pytest.raises(ConfigError, match="none of its 2 paths exists .*relative paths are taken from the current"):
        find_videos([], listed=[Path("gone.mp4"), Path("nope/b.mp4")], list_name="list.txt")
    with pytest.raises(ConfigError, match="gone.mp4: no such file"):
        find_videos([tmp_path / "gone.mp4"], listed=[tmp_path / "a.mp4"], list_name="list.txt")


@pytest.mark.parametrize("data, expected", [
    (b"a.mp4\nb c.mp4\n", ["a.mp4", "b c.mp4"]),  # spaces belong to the name
    (b"a.mp4\r\n\r\n  \nb.mp4", ["a.mp4", "b.mp4"]),  # CRLF, blank lines, no final line break
    (b"line\nbreak.mp4\0b.mp4\0", ["line\nbreak.mp4", "b.mp4"]),  # find -print0
    (b"caf\xe9.mp4\n", [os.fsdecode(b"caf\xe9.mp4")]),  # a Latin-1 name survives
])
def test_a_file_list_is_read_as_the_file_system_names_paths(data, expected):
    assert read_file_list(io.BytesIO(data), "list.txt") == tuple(Path(p) for p in expected)


def test_an_empty_file_list_is_refused():
    with pytest.raises(ConfigError, match="list.txt: lists no paths"):
        read_file_list(io.BytesIO(b"\n \n"), "list.txt")

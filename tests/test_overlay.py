"""`annotate overlay` on real runs: frame count and timestamps kept, pixels changed exactly where drawn."""

from __future__ import annotations

import shutil
from fractions import Fraction
from pathlib import Path

import av
import cv2
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest
from click.testing import CliRunner

from annotator.cli import cli
from annotator.config import RunConfig
from annotator.overlay import draw_faces, faces_by_frame
from annotator.run import run
from engines.decoders import Sampling, display_size, sample_aspect
from faults import add_cover_art, carphone_frames, set_display_rotation, write_clip

#: Largest per-channel change an undrawn pixel may show: the RGB -> YUV 4:2:0 -> RGB round trip
#: of a lossless (crf 0) encode rounds, and chroma is shared by 2x2 pixels, which a frame
#: stretched to square pixels (carphone's 128:117, shown 192 wide) no longer lines up with:
#: 13 measured, against 12 unstretched. Drawn pixels change by more than 60.
TOLERANCE = 16
#: Frames whose face rows the derived result leaves out: nothing may be drawn there.
FACELESS = range(50, 60)


@pytest.fixture(scope="module")
def carphone_result(carphone: Path, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("overlay") / "carphone.parquet"
    run(RunConfig(inputs=(carphone,), out=out, workers=0), progress=False)
    return out


@pytest.fixture(scope="module")
def edited_result(carphone_result: Path) -> Path:
    """The real rows minus the faces of frames 50-59, and with valence/arousal set (derived from
    the probabilities: no registered model predicts them yet), so that the bars are drawn too."""
    table = pq.read_table(carphone_result)
    keep = pc.invert(pc.is_in(table["frame_index"], pa.array(list(FACELESS), pa.int64())))
    table = table.filter(keep)
    valence = pc.subtract(table["p_happiness"], table["p_sadness"])
    arousal = pc.subtract(pa.scalar(1.0, pa.float32()), pc.multiply(table["p_neutral"], pa.scalar(2.0, pa.float32())))
    table = table.set_column(table.schema.get_field_index("valence"), table.schema.field("valence"), valence)
    table = table.set_column(table.schema.get_field_index("arousal"), table.schema.field("arousal"), arousal)
    out = carphone_result.with_name("edited.parquet")
    pq.write_table(table, out)
    return out


def _decode(path: Path) -> tuple[list[np.ndarray], list[int], Fraction, str]:
    """RGB frames as shown (square pixels: carphone's 128:117 ones are 192 wide), their pts, the
    stream's time base and codec."""
    with av.open(str(path)) as container:
        stream = container.streams.video[0]
        width, height = display_size(stream.width, stream.height, sample_aspect(stream))
        frames = [(f.to_ndarray(format="rgb24", width=width, height=height), f.pts) for f in container.decode(stream)]
        return [f for f, _ in frames], [p for _, p in frames], stream.time_base, stream.codec_context.name


def _overlay(*args: str) -> str:
    outcome = CliRunner().invoke(cli, ["overlay", *args])
    assert outcome.exit_code == 0, outcome.output
    return outcome.output


def assert_drawn_exactly_there(overlay: np.ndarray, source: np.ndarray, faces) -> None:
    """``overlay`` equals ``source`` (within codec rounding) except where ``faces`` are drawn."""
    expected = draw_faces(source.copy(), faces)
    change = np.abs(expected.astype(int) - source).max(axis=2)
    diff = np.abs(overlay.astype(int) - source).max(axis=2)
    drawn = cv2.dilate((change > 0).astype(np.uint8), np.ones((5, 5), np.uint8)) > 0
    assert diff[~drawn].max(initial=0) <= TOLERANCE, "pixels changed where nothing was drawn"
    strong = change > 60
    assert strong.sum() > 50
    assert (diff[strong] > TOLERANCE).mean() >= 0.9, "a drawn box is missing from the overlay"


def test_overlay_keeps_frames_and_timestamps_and_differs_only_where_drawn(carphone: Path, edited_result: Path,
                                                                         tmp_path: Path):
    out = tmp_path / "overlay.mp4"
    line = _overlay(str(carphone), "--results", str(edited_result), "--out", str(out), "--crf", "0")
    assert "120 frames, 110 with faces drawn" in line
    source, source_pts, source_base, _ = _decode(carphone)
    drawn, drawn_pts, drawn_base, codec = _decode(out)
    assert len(drawn) == len(source) == 120
    assert drawn_pts == source_pts and drawn_base == source_base
    assert codec == "h264" and drawn[0].shape == source[0].shape
    rows = pq.read_table(edited_result)
    faces, _ = faces_by_frame(rows.filter(pc.is_valid(rows["face_index"])))
    with av.open(str(carphone)) as container:
        times = [round(f.time * 1e6) for f in container.decode(video=0)]
    for index, (picture, original) in enumerate(zip(drawn, source)):
        if index in FACELESS:
            assert np.abs(picture.astype(int) - original).max() <= TOLERANCE, f"frame {index} was drawn on"
        else:
            assert_drawn_exactly_there(picture, original, faces[times[index]])
    # The label and the valence/arousal bars sit where the row's box says.
    row = rows.filter(pc.equal(rows["frame_index"], 0))
    x1, y1, x2, y2 = (int(round(row[c][0].as_py())) for c in ("x1", "y1", "x2", "y2"))
    changed = np.abs(drawn[0].astype(int) - source[0]).max(axis=2) > 40
    assert changed[y1 - 1:y1 + 2, x1 + 5:x2 - 5].mean() > 0.5  # the top edge of the box
    assert (changed[y2 + 1:y2 + 6, x1:x2].mean(axis=1) > 0.2).sum() >= 2  # the two bars under it


def test_every_n_and_time_range_keep_source_timestamps(carphone: Path, carphone_result: Path, tmp_path: Path):
    out = tmp_path / "skim.mp4"
    _overlay(str(carphone), "--results", str(carphone_result), "--out", str(out),
             "--every-n", "3", "--start", "1", "--end", "2")
    _, source_pts, time_base, _ = _decode(carphone)
    in_range = [p for p in source_pts if 1 <= p * time_base < 2]
    assert _decode(out)[1] == in_range[::3]


def test_rotated_video_is_drawn_upright(carphone: Path, tmp_path: Path):
    """A phone clip stored sideways with a display matrix: the overlay is the displayed picture."""
    frames = carphone_frames(carphone)[:16]
    sideways = write_clip(tmp_path / "sideways.mp4", [np.ascontiguousarray(np.rot90(f, 1)) for f in frames], 16)
    phone = set_display_rotation(sideways, tmp_path / "phone.mp4", 90)
    result = tmp_path / "phone.parquet"
    run(RunConfig(inputs=(phone,), out=result, workers=0, sampling=Sampling(every_n=4)), progress=False)
    out = tmp_path / "phone_overlay.mp4"
    line = _overlay(str(phone), "--results", str(result), "--out", str(out), "--crf", "0")
    assert "16 frames, 4 with faces drawn" in line
    drawn = _decode(out)[0]
    stored = _decode(sideways)[0]  # the same pixels without the matrix
    table = pq.read_table(result)
    faces, _ = faces_by_frame(table.filter(pc.is_valid(table["face_index"])))
    with av.open(str(phone)) as container:
        times = [round(f.time * 1e6) for f in container.decode(video=0)]
    for index, picture in enumerate(drawn):
        displayed = np.ascontiguousarray(np.rot90(stored[index], -1))  # turned 90 degrees clockwise
        assert picture.shape == (144, 176, 3)
        if index % 4:
            assert np.abs(picture.astype(int) - displayed).max() <= TOLERANCE
        else:
            assert_drawn_exactly_there(picture, displayed, faces[times[index]])


def test_cover_art_is_not_drawn_on(carphone: Path, tmp_path: Path):
    """A file whose embedded cover is stream 0: the overlay is of the film, as annotate run saw it."""
    frames = carphone_frames(carphone)[:12]
    film = add_cover_art(write_clip(tmp_path / "film.mp4", frames, 12), tmp_path / "film_cover.mp4",
                         np.zeros((90, 160, 3), np.uint8))
    result = tmp_path / "film.parquet"
    run(RunConfig(inputs=(film,), out=result, workers=0), progress=False)
    out = tmp_path / "film_overlay.mp4"
    line = _overlay(str(film), "--results", str(result), "--out", str(out), "--crf", "0")
    assert "12 frames, 12 with faces drawn" in line
    assert [picture.shape for picture in _decode(out)[0]] == [(144, 176, 3)] * 12


def test_errors_name_the_file_and_outputs_are_never_clobbered(carphone: Path, carphone_result: Path,
                                                             tmp_path: Path):
    runner = CliRunner()
    stranger = tmp_path / "stranger.mp4"
    write_clip(stranger, carphone_frames(carphone)[:4], 4)
    absent = runner.invoke(cli, ["overlay", str(stranger), "-r", str(carphone_result), "-o", str(tmp_path / "o.mp4")])
    assert absent.exit_code == 1 and f"{stranger}: not in {carphone_result}" in absent.output
    missing = runner.invoke(cli, ["overlay", str(carphone), "-r", str(tmp_path / "none.parquet"),
                                  "-o", str(tmp_path / "o.mp4")])
    assert missing.exit_code == 1 and "none.parquet: no such file" in missing.output
    mine = tmp_path / "mine.mp4"
    mine.write_bytes(b"keep")
    refused = runner.invoke(cli, ["overlay", str(carphone), "-r", str(carphone_result), "-o", str(mine)])
    assert refused.exit_code == 2 and "already exists" in refused.output and mine.read_bytes() == b"keep"
    onto_video = runner.invoke(cli, ["overlay", str(carphone), "-r", str(carphone_result), "-o", str(carphone),
                                     "--overwrite"])
    assert onto_video.exit_code == 2 and "is an input" in onto_video.output
    assert not (tmp_path / "o.mp4").exists() and not list(tmp_path.glob(".*.tmp"))
    # A renamed copy is found by its content id.
    renamed = tmp_path / "renamed.mp4"
    shutil.copy(carphone, renamed)
    assert "120 frames, 120 with faces drawn" in _overlay(str(renamed), "-r", str(carphone_result),
                                                         "-o", str(tmp_path / "r.mp4"))

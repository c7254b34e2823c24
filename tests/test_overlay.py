"""`annotate overlay` on real runs: frame count and timestamps kept, pixels changed exactly where drawn,
also on recordings joined from pieces (timestamps that restart, frames that change size)."""

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
from annotator.overlay import FrameFaces, draw_faces, faces_by_frame
from annotator.run import run
from engines.decoders import Sampling, display_size, sample_aspect
from faults import add_cover_art, carphone_frames, set_display_rotation, write_clip, write_joined_ts

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
    """RGB frames as shown (square pixels: carphone's 128:117 ones are 192 wide; each at its own
    size), their pts, the stream's time base and codec."""
    with av.open(str(path)) as container:
        stream = container.streams.video[0]
        aspect = sample_aspect(stream)
        frames = [(f.to_ndarray(format="rgb24", width=display_size(f.width, f.height, aspect)[0], height=f.height),
                   f.pts) for f in container.decode(stream)]
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
    faces, _ = faces_by_frame(rows)
    for index, (picture, original) in enumerate(zip(drawn, source)):
        if index in FACELESS:
            assert np.abs(picture.astype(int) - original).max() <= TOLERANCE, f"frame {index} was drawn on"
        else:
            assert_drawn_exactly_there(picture, original, faces[index])
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
    faces, _ = faces_by_frame(table)
    for index, picture in enumerate(drawn):
        displayed = np.ascontiguousarray(np.rot90(stored[index], -1))  # turned 90 degrees clockwise
        assert picture.shape == (144, 176, 3)
        if index % 4:
            assert np.abs(picture.astype(int) - displayed).max() <= TOLERANCE
        else:
            assert_drawn_exactly_there(picture, displayed, faces[index])


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


def assert_shows(overlay: np.ndarray, source: np.ndarray, faces) -> None:
    """``overlay`` is ``source`` with exactly ``faces`` drawn on (none: nothing drawn)."""
    if faces:
        assert_drawn_exactly_there(overlay, source, faces)
    else:
        assert np.abs(overlay.astype(int) - source).max() <= TOLERANCE, "drawn on a frame without rows"


#: Frames of each piece of the joined recordings (MPEG-TS at 30 fps: pts 0.067 s to 1.367 s).
PIECE = 40


@pytest.fixture(scope="module")
def pieces(carphone: Path) -> tuple[list[np.ndarray], list[np.ndarray]]:
    """Two pieces whose frames share their pts but not their faces: carphone's first frames, and
    later ones mirrored (the face elsewhere), both at 352x288."""
    frames = carphone_frames(carphone)
    first = [cv2.resize(f, (352, 288)) for f in frames[:PIECE]]
    second = [cv2.resize(np.ascontiguousarray(f[:, ::-1]), (352, 288)) for f in frames[60:60 + PIECE]]
    return first, second


def _annotated(video: Path, sampling: Sampling = Sampling()) -> Path:
    result = video.with_name(f"{video.stem}-{sampling.every_n}.parquet")
    run(RunConfig(inputs=(video,), out=result, workers=0, sampling=sampling), progress=False)
    return result


@pytest.fixture(scope="module")
def joined(pieces, tmp_path_factory) -> Path:
    """``cat a.ts b.ts``: the timestamps start again at the second piece."""
    first, second = pieces
    return write_joined_ts(tmp_path_factory.mktemp("joined") / "joined.ts", [(first, PIECE), (second, PIECE)])


@pytest.fixture(scope="module")
def joined_result(joined: Path) -> Path:
    return _annotated(joined)


def test_joined_recording_restarting_timestamps_is_drawn_frame_by_frame(joined: Path, joined_result: Path,
                                                                         tmp_path: Path):
    """Each frame has its own faces, not those of its twin with the same pts in the other piece,
    and the output's clock goes on after the restart (MP4 refused the restart: FFmpeg error 22)."""
    out = tmp_path / "joined.mp4"
    line = _overlay(str(joined), "--results", str(joined_result), "--out", str(out), "--crf", "0")
    source, source_pts, source_base, _ = _decode(joined)
    drawn, drawn_pts, drawn_base, _ = _decode(out)
    assert len(drawn) == len(source) == 2 * PIECE and drawn_base == source_base
    assert source_pts[PIECE:] == source_pts[:PIECE]  # the restart: every pts is had by two frames
    # The first piece keeps its pts; the second follows it, one frame period (3000 / 90 kHz) apart.
    assert drawn_pts[:PIECE] == source_pts[:PIECE]
    assert np.diff(drawn_pts).tolist() == [3000] * (2 * PIECE - 1)
    faces, _ = faces_by_frame(pq.read_table(joined_result))
    assert f"{2 * PIECE} frames, {len(faces)} with faces drawn" in line
    # Faces in both pieces, and elsewhere in each (the second is mirrored): a twin's would show.
    twins = [index for index in range(PIECE) if faces[index] and faces[index + PIECE]]
    assert len(twins) > PIECE // 2
    assert all(np.abs(np.subtract(faces[index][0].box, faces[index + PIECE][0].box)).max() > 15 for index in twins)
    for index, (picture, original) in enumerate(zip(drawn, source)):
        assert_shows(picture, original, faces[index])


def test_joined_recording_sampled_run_draws_only_its_own_frames(joined: Path, tmp_path: Path):
    """A run of every 3rd frame samples other positions in the second piece (40 is not a multiple
    of 3): a frame the run skipped gets nothing, even where the other piece's frame of the same
    pts has rows, the only ones at that pts."""
    result = _annotated(joined, Sampling(every_n=3))
    faces, frames_at = faces_by_frame(pq.read_table(result))
    assert all(len(frames) == 1 for frames in frames_at.values())  # no pts shared among the rows
    out = tmp_path / "sampled.mp4"
    line = _overlay(str(joined), "--results", str(result), "--out", str(out), "--crf", "0")
    assert f"{2 * PIECE} frames, {len(faces)} with faces drawn" in line
    assert set(faces) <= set(range(0, 2 * PIECE, 3)) and len(faces) > 20
    source = _decode(joined)[0]
    for index, (picture, original) in enumerate(zip(_decode(out)[0], source)):
        assert_shows(picture, original, faces.get(index, []))


def test_joined_recording_time_range_is_its_first_passage(joined: Path, joined_result: Path, tmp_path: Path):
    """--start/--end name a time of each piece: the range is the first piece's, decoded from the
    start (a seek in MPEG-TS lands in whichever piece), each frame with its own faces."""
    out = tmp_path / "range.mp4"
    _overlay(str(joined), "--results", str(joined_result), "--out", str(out), "--crf", "0",
             "--start", "0.5", "--end", "9")
    source, source_pts, time_base, _ = _decode(joined)
    first = [index for index in range(PIECE) if source_pts[index] * time_base >= 0.5]  # 13 to 39
    drawn, drawn_pts, _, _ = _decode(out)
    assert drawn_pts == [source_pts[index] for index in first]
    faces, _ = faces_by_frame(pq.read_table(joined_result))
    for index, picture in zip(first, drawn):
        assert_shows(picture, source[index], faces[index])


def test_only_restarting_timestamps_keep_the_overlay_from_seeking(carphone_result: Path, joined_result: Path):
    """--start seeks unless the rows' pts go back: not where several faces of a frame share one."""
    rows = pq.read_table(carphone_result)
    assert not FrameFaces(pa.concat_tables([rows, rows])).restarts
    assert FrameFaces(pq.read_table(joined_result)).restarts


#: The second piece of the recording that changes size, and how it fits the first's 352x288:
#: scaled by 352/640 to 352x198, centred, black bands of 45 rows above and below.
WIDE, FIT, TOP = (640, 360), (352, 198), 45


def _letterboxed(rgb: np.ndarray) -> np.ndarray:
    boxed = np.zeros((288, 352, 3), np.uint8)
    boxed[TOP:TOP + FIT[1]] = cv2.resize(rgb, FIT, interpolation=cv2.INTER_AREA)
    return boxed


def _yuv420(rgb: np.ndarray) -> np.ndarray:
    """``rgb`` as a lossless H.264 encode gives it back: through YUV 4:2:0 and FFmpeg's rounding.
    A shrunk picture has sharper colour edges than carphone's, which 4:2:0 changes by more than
    TOLERANCE (22 measured), so the letterboxed frames are compared with this, exactly."""
    return av.VideoFrame.from_ndarray(rgb, format="rgb24").reformat(format="yuv420p").to_ndarray(format="rgb24")


def assert_shows_at_its_size(picture: np.ndarray, original: np.ndarray, faces) -> None:
    """``picture`` is ``original`` (352x288, or 640x360 letterboxed) with exactly ``faces`` drawn
    on at its own size, their boxes where the rows say, mapped into the letterbox."""
    if original.shape[1] == 352:
        assert_shows(picture, original, faces)
        return
    expected = _yuv420(_letterboxed(draw_faces(original.copy(), faces)))
    assert np.abs(picture.astype(int) - expected).max() <= 1, "not the frame's own faces, letterboxed"
    bands = np.concatenate([picture[:TOP - 1], picture[TOP + FIT[1] + 1:]])  # a row off: chroma is shared
    assert bands.max() <= 2, "the bands are not black"
    scale = FIT[0] / WIDE[0]
    x1, y1, x2, _ = (round(v * scale) for v in faces[0].box)
    changed = np.abs(picture.astype(int) - _yuv420(_letterboxed(original))).max(axis=2) > 40
    assert changed[TOP + y1 - 1:TOP + y1 + 2, x1 + 5:x2 - 5].any(axis=0).mean() > 0.9  # the box's top edge


def test_joined_recording_changing_size_is_letterboxed_with_each_frames_own_boxes(pieces, tmp_path: Path):
    """352x288 then 640x360, as a recording joined from two renditions: every frame is drawn on
    at its own size, with its own rows' boxes (pixels of that frame), then the wider frames are
    fitted into the first frame's size with black bands, as a player with a fixed window shows them."""
    first, second = pieces
    video = write_joined_ts(tmp_path / "switched.ts",
                            [(first, PIECE), ([cv2.resize(f, WIDE) for f in second], PIECE)])
    result = _annotated(video)
    faces, _ = faces_by_frame(pq.read_table(result))
    # The run's rows of the wide frames are in their own pixels (engines.decoders.pyav, size_changes).
    assert max(face.box[2] for index in range(PIECE, 2 * PIECE) for face in faces[index]) > 352
    out = tmp_path / "switched.mp4"
    line = _overlay(str(video), "--results", str(result), "--out", str(out), "--crf", "0")
    assert f"{2 * PIECE} frames, {len(faces)} with faces drawn" in line
    source = _decode(video)[0]
    drawn = _decode(out)[0]
    assert [picture.shape for picture in drawn] == [(288, 352, 3)] * (2 * PIECE)
    assert [original.shape for original in source[PIECE:]] == [(360, 640, 3)] * PIECE
    for picture, original, index in zip(drawn, source, range(2 * PIECE)):
        assert_shows_at_its_size(picture, original, faces[index])


def test_stream_switching_renditions_time_range_is_seeked_in_mpeg_ts(pieces, tmp_path: Path):
    """A live stream's capture: the size changes but time goes on. --start seeks, which in
    MPEG-TS (no index) lands after the only keyframe before it: the range came out empty or short.
    The range is there whole, each frame with its own faces, found by pts after the seek."""
    first, second = pieces
    video = write_joined_ts(tmp_path / "live.ts", [(first, PIECE), ([cv2.resize(f, WIDE) for f in second], PIECE)],
                            continuous=True)
    result = _annotated(video)
    out = tmp_path / "live.mp4"
    _overlay(str(video), "--results", str(result), "--out", str(out), "--crf", "0", "--start", "1", "--end", "2")
    source, source_pts, time_base, _ = _decode(video)
    in_range = [index for index, pts in enumerate(source_pts) if 1 <= pts * time_base < 2]
    assert in_range[0] < PIECE <= in_range[-1]  # both sizes
    drawn, drawn_pts, _, _ = _decode(out)
    assert drawn_pts == [source_pts[index] for index in in_range]
    faces, _ = faces_by_frame(pq.read_table(result))
    for picture, index in zip(drawn, in_range):
        assert_shows_at_its_size(picture, source[index], faces[index])

"""Non-square pixels: DVD, DV, HDV and SD broadcast store frames squeezed or stretched and tag
them with a sample aspect ratio; a player shows them at their true shape, and so must we.

Before the frames were scaled to square pixels, every face in such a video was detected and
aligned squeezed (to 3/4 of its width at 4:3): on carphone stored at 4:3, top-1 expression
agreement with the square-pixel original was 0.53 and boxes were in stored pixels (median IoU
0.40 with the original's); scaled, 0.86 and 0.99 (the rest is what the squeeze itself loses).
"""

from __future__ import annotations

from fractions import Fraction
from pathlib import Path

import cv2
import numpy as np
import pyarrow.parquet as pq
import pytest
from click.testing import CliRunner

from annotator.cli import cli
from annotator.config import RunConfig
from annotator.run import run
from annotator.schema import BOX_COLUMNS, PROB_COLUMNS
from annotator.writer import read_metadata
from engines.decoders import DecodeReport, Sampling, display_size
from engines.decoders.probe import probe
from engines.decoders.pyav import decode
from faults import carphone_frames, write_anamorphic_clip, write_clip

N = 40


@pytest.fixture(scope="module")
def square(carphone: Path) -> list[np.ndarray]:
    """Carphone at 352x288, square pixels (CIF, as the clip was shot)."""
    return [cv2.resize(f, (352, 288), interpolation=cv2.INTER_CUBIC) for f in carphone_frames(carphone)[:N]]


@pytest.fixture(scope="module")
def clips(square, tmp_path_factory) -> dict[str, Path]:
    folder = tmp_path_factory.mktemp("aspect")
    made = {"square": write_clip(folder / "square.mp4", square, N)}
    for name, aspect in (("wide", Fraction(4, 3)), ("narrow", Fraction(8, 9))):
        made[name] = write_anamorphic_clip(folder / f"{name}.mp4", square, N, aspect)
    return made


def _rows(video: Path, out: Path):
    run(RunConfig(inputs=(video,), out=out, workers=0), progress=False)
    table = pq.read_table(out)
    return (np.stack([table.column(c).to_numpy() for c in BOX_COLUMNS], axis=1),
            np.stack([table.column(c).to_numpy() for c in PROB_COLUMNS], axis=1))


def _iou(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    low, high = np.maximum(a[:, :2], b[:, :2]), np.minimum(a[:, 2:], b[:, 2:])
    inter = np.prod(np.clip(high - low, 0, None), axis=1)
    area = lambda boxes: np.prod(boxes[:, 2:] - boxes[:, :2], axis=1)  # noqa: E731
    return inter / (area(a) + area(b) - inter)


def test_display_size_keeps_the_height_and_stretches_the_width():
    assert display_size(720, 576, 64 / 45) == (1024, 576)  # 16:9 PAL DVD
    assert display_size(720, 480, 8 / 9) == (640, 480)  # 4:3 NTSC DVD
    assert display_size(1440, 1080, 4 / 3) == (1920, 1080)  # HDV
    assert display_size(176, 144, 1.0) == (176, 144)


@pytest.mark.parametrize("name", ["wide", "narrow"])
def test_non_square_pixels_decode_at_their_displayed_shape(clips, square, name):
    assert probe(clips[name]).sample_aspect != 1.0 and probe(clips["square"]).sample_aspect == 1.0
    report = DecodeReport()
    frames = np.concatenate([b.frames.numpy() for b in decode(clips[name], Sampling(), 8, report=report)])
    assert frames.shape == (N, 288, 352, 3) and (report.width, report.height) == (352, 288)
    # The squeeze threw away detail across the width; the picture's shape and content are back.
    assert np.abs(frames.astype(int) - np.stack(square)).mean() < 6


@pytest.mark.parametrize("name", ["wide", "narrow"])
def test_faces_in_non_square_pixels_match_the_square_video(clips, tmp_path, name):
    boxes, probs = _rows(clips["square"], tmp_path / "square.parquet")
    stored_boxes, stored_probs = _rows(clips[name], tmp_path / f"{name}.parquet")
    assert len(stored_boxes) == len(boxes) == N  # one face a frame
    assert np.median(_iou(stored_boxes, boxes)) > 0.95  # measured 0.99; stored pixels gave 0.40 / 0.67
    assert np.abs(stored_probs - probs).mean() < 0.04  # measured 0.020-0.023; squeezed faces 0.064-0.076
    facts = read_metadata(tmp_path / f"{name}.parquet")["videos"]  # the stretch is on record
    stretch = probe(clips[name]).sample_aspect
    assert [(v["width"], v["height"], v["sample_aspect"]) for v in facts] == [(352, 288, stretch)]
    assert read_metadata(tmp_path / "square.parquet")["videos"] == []


def test_the_overlay_of_non_square_pixels_is_square(clips, tmp_path):
    result = tmp_path / "wide.parquet"
    run(RunConfig(inputs=(clips["wide"],), out=result, workers=0), progress=False)
    out = tmp_path / "wide_overlay.mp4"
    outcome = CliRunner().invoke(cli, ["overlay", str(clips["wide"]), "--results", str(result), "--out", str(out)])
    assert outcome.exit_code == 0, outcome.output
    info = probe(out)
    assert (info.width, info.height, info.sample_aspect) == (352, 288, 1.0)

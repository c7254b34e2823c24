"""`annotate report`: built from real runs, checked against pyarrow's own counts, rendered in Chromium."""

from __future__ import annotations

import base64
import re
import shutil
import struct
import xml.etree.ElementTree as ET
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest
from click.testing import CliRunner

from annotator.cli import cli
from annotator.config import RunConfig
from annotator.report.aggregate import _smoothed, aggregate
from annotator.results import open_results
from annotator.run import run
from annotator.schema import PROB_COLUMNS
from annotator.writer import read_metadata
from faults import carphone_frames, write_clip
from headless_chromium import check_page, find_chromium

IMAGE = re.compile(r'<img src="([^"]*)"')


@pytest.fixture(scope="module")
def carphone_result(carphone: Path, tmp_path_factory) -> Path:
    """A real run of the default models on the carphone clip."""
    out = tmp_path_factory.mktemp("report") / "carphone.parquet"
    run(RunConfig(inputs=(carphone,), out=out, workers=0), progress=False)
    return out


@pytest.fixture(scope="module")
def failed_and_expression_only(carphone: Path, tmp_path_factory) -> Path:
    """A real run with the expression-only fer-minixception over a folder holding a broken video."""
    videos = tmp_path_factory.mktemp("videos")
    shutil.copy(carphone, videos / "carphone.mp4")
    (videos / "broken.mp4").write_bytes(b"\x00\x00\x00\x18ftypmp42 this is no video")
    out = videos.parent / "fer.parquet"
    run(RunConfig(inputs=(videos,), out=out, workers=0, scorer="fer-minixception"), progress=False)
    return out


def _report(results: Path, out: Path, *args: str) -> str:
    outcome = CliRunner().invoke(cli, ["report", str(results), "--out", str(out), *args])
    assert outcome.exit_code == 0, outcome.output
    assert "rows" in outcome.output
    return out.read_text(encoding="utf-8")


def _figures(html: str) -> list[ET.Element]:
    """Every figure is an embedded SVG that parses; nothing points outside the page."""
    assert not re.search(r'(?:src|href)="(?!data:|#)', html), "a reference leaves the page"
    roots = []
    for uri in IMAGE.findall(html):
        assert uri.startswith("data:image/svg+xml;base64,")
        root = ET.fromstring(base64.b64decode(uri.split(",", 1)[1]))
        assert root.tag.endswith("svg")
        roots.append(root)
    return roots


def test_report_of_a_real_run_shows_the_run_corpus_and_timeline(carphone_result: Path, tmp_path: Path):
    html = _report(carphone_result, tmp_path / "report.html")
    meta = read_metadata(carphone_result)
    for model in meta["models"]:
        assert model["artifact_sha256"]["model.onnx"] in html  # digests
        assert model["licence"].split(" ")[0] in html
    assert meta["version"] in html and "det_threshold" in html
    # The run's own timing: when it started, how long it took, its frames/s.
    timing = meta["timing"]
    assert timing["frames"] == 120 and timing["seconds"] > 0
    assert f"started {timing['started_utc']}" in html
    assert f"{timing['seconds']:,.1f} s, {120 / timing['seconds']:,.1f} frames/s" in html
    # Counts: 1 video, 120 sampled frames, 120 faces, no failure.
    assert re.search(r"<b>1</b>videos done", html) and re.search(r"<b>120</b>sampled frames", html)
    assert re.search(r"<b>120</b>faces", html) and re.search(r"<b>0</b>failed", html)
    # The default scorer predicts no valence/arousal: the page says so instead of plotting nothing.
    assert "Valence and arousal were not predicted" in html and "student-fer-distilled" in html
    figures = _figures(html)
    assert len(figures) == 5  # expressions, faces/frame, coverage, detector scores, one timeline
    assert 'href="#video-0"' in html and 'id="video-0"' in html
    assert "Failed and damaged videos" not in html


def test_report_lists_the_failed_video_and_the_expression_only_model(failed_and_expression_only: Path,
                                                                    tmp_path: Path):
    table = pq.read_table(failed_and_expression_only)
    errors = table.filter(pc.is_valid(table["error"]))
    assert errors.num_rows == 1 and table.filter(pc.is_valid(table["face_index"]))["valence"].null_count > 0
    html = _report(failed_and_expression_only, tmp_path / "report.html")
    assert re.search(r'<div class="card bad"><b>1</b>failed', html)
    assert "Failed and damaged videos (1)" in html
    message = errors["error"][0].as_py()
    from html import escape

    assert escape(message) in html and "broken.mp4" in message
    assert "Valence and arousal were not predicted" in html and "<code>fer-minixception</code>" in html
    assert len(_figures(html)) == 5


def _with_synthetic_extras(result: Path, out: Path) -> pa.Table:
    """The real rows, plus a second video whose frames hold two faces with valence/arousal set.

    No registered model predicts valence/arousal yet, so the values are derived from the real
    probabilities (happiness minus sadness, 1 minus neutral) to exercise the density and curves.
    """
    table = pq.read_table(result)
    faces = table.filter(pc.is_valid(table["face_index"]))
    second = faces.set_column(faces.schema.get_field_index("video_path"), "video_path",
                              pa.array(["second.mp4"] * faces.num_rows))
    happy, sad, neutral = (second[c].to_numpy() for c in ("p_happiness", "p_sadness", "p_neutral"))
    second = second.set_column(second.schema.get_field_index("valence"), "valence", pa.array(happy - sad, pa.float32()))
    second = second.set_column(second.schema.get_field_index("arousal"), "arousal",
                               pa.array(1 - 2 * neutral, pa.float32()))
    extra = second.set_column(second.schema.get_field_index("face_index"), "face_index",
                              pa.array(np.ones(second.num_rows, np.int32)))
    extra = extra.set_column(extra.schema.get_field_index("track_id"), "track_id",
                             pa.array(np.full(second.num_rows, 7, np.int64)))
    combined = pa.concat_tables([t.cast(table.schema) for t in (table, second, extra)])
    pq.write_table(combined, out, row_group_size=50)  # several batches: partial sums must add up
    return combined


def test_aggregates_match_pyarrow_counts(carphone_result: Path, tmp_path: Path):
    combined = _with_synthetic_extras(carphone_result, tmp_path / "more.parquet")
    results = open_results(tmp_path / "more.parquet")
    corpus = aggregate(results, batch_rows=37)
    assert _same(corpus, aggregate(results))  # the batch size changes nothing
    faces = combined.filter(pc.is_valid(combined["face_index"]))
    assert corpus.rows == combined.num_rows and corpus.faces == faces.num_rows == 360
    assert corpus.frames == 240
    assert corpus.faces_per_frame[:3].tolist() == [0, 120, 120]  # carphone: 1 face, second: 2
    labels = faces["expression"].to_pylist()
    from engines.registry import EXPRESSIONS

    assert corpus.expression_counts.tolist() == [labels.count(e) for e in EXPRESSIONS]
    np.testing.assert_allclose(corpus.mean_probabilities,
                               [pc.mean(faces[c]).as_py() for c in PROB_COLUMNS], rtol=1e-5)
    assert corpus.va_faces == corpus.va_counts.sum() == 240
    assert corpus.score_counts.sum() == 360
    second = next(v for v in corpus.videos if v.path == "second.mp4")
    assert (second.frames, second.faces, second.tracks, second.coverage) == (120, 240, 2, 1.0)
    html = _report(tmp_path / "more.parquet", tmp_path / "more.html")
    assert "Valence and arousal were not predicted" not in html
    assert len(_figures(html)) == 7  # the density chart, and two timelines
    assert 'alt="valence/arousal density"' in html


def test_a_directory_of_parts_reads_each_timeline_from_its_own_part(carphone_result: Path, tmp_path: Path):
    """A directory of parts gives the corpus a single file gives, and each video is known to be in
    its own part: a timeline reads that part, not every file (2,000 parts: 11.4 -> 3.6 s)."""
    combined = _with_synthetic_extras(carphone_result, tmp_path / "more.parquet")
    parts = tmp_path / "parts"
    parts.mkdir()
    schema = pq.read_schema(carphone_result)  # the run's metadata with it: open_results checks it
    for name, video in (("part-00000000000000aa.parquet", "second.mp4"), ("part-00000000000000bb.parquet", None)):
        rows = combined.filter(pc.equal(combined["video_path"], video) if video else
                               pc.not_equal(combined["video_path"], "second.mp4"))
        pq.write_table(rows.replace_schema_metadata(schema.metadata), parts / name, row_group_size=50)
    corpus = aggregate(open_results(parts), batch_rows=1000)
    assert _same(corpus, aggregate(open_results(tmp_path / "more.parquet")))
    first = combined["video_path"][0].as_py()
    assert corpus.files_of == {"second.mp4": {str(parts / "part-00000000000000aa.parquet")},
                               first: {str(parts / "part-00000000000000bb.parquet")}}
    assert len(_figures(_report(parts, tmp_path / "parts.html"))) == 7  # the density chart, and two timelines


def _same(a, b) -> bool:
    return all(np.array_equal(getattr(a, f), getattr(b, f)) for f in
               ("faces_per_frame", "expression_counts", "score_counts", "va_counts")) and a.videos == b.videos


def test_smoothing_bridges_short_gaps_only():
    values = np.array([1.0, np.nan, 3.0, np.nan, np.nan, np.nan, np.nan, 5.0])
    smooth = _smoothed(values, 3)
    assert smooth[1] == pytest.approx(2.0) and np.isnan(smooth[4]) and smooth[0] == pytest.approx(1.0)


def test_smoothing_a_curve_shorter_than_its_window_keeps_its_length():
    smooth = _smoothed(np.array([1.0, np.nan, 3.0]), 15)  # as wide as the curve: its 3 bins
    assert smooth == pytest.approx([1.0, 2.0, 3.0])


def test_report_of_videos_shorter_than_the_smoothing_window(carphone: Path, tmp_path: Path):
    """A one-frame video and a third of a second of video (shorter than --smooth's 0.5 s) get
    their timelines; the report crashed on them."""
    frames = carphone_frames(carphone)
    videos = tmp_path / "videos"
    videos.mkdir()
    write_clip(videos / "one_frame.mp4", frames, 1)
    write_clip(videos / "a_third_of_a_second.mp4", frames, 10)
    out = tmp_path / "short.parquet"
    run(RunConfig(inputs=(videos,), out=out, workers=0), progress=False)
    html = _report(out, tmp_path / "report.html")
    assert "one_frame.mp4" in html and "a_third_of_a_second.mp4" in html
    assert len(_figures(html)) == 6  # the corpus's four charts and a timeline per video


def test_bad_results_and_outputs_are_one_line_errors(carphone_result: Path, tmp_path: Path):
    runner = CliRunner()
    missing = runner.invoke(cli, ["report", str(tmp_path / "nope.parquet"), "--out", str(tmp_path / "r.html")])
    assert missing.exit_code == 1 and "nope.parquet: no such file" in missing.output
    foreign = tmp_path / "foreign.parquet"
    pq.write_table(pa.table({"a": [1]}), foreign)
    bad = runner.invoke(cli, ["report", str(foreign), "--out", str(tmp_path / "r.html")])
    assert bad.exit_code == 1 and "foreign.parquet: not written by annotate run" in bad.output
    existing = tmp_path / "mine.html"
    existing.write_text("keep me")
    refused = runner.invoke(cli, ["report", str(carphone_result), "--out", str(existing)])
    assert refused.exit_code == 2 and "already exists" in refused.output and existing.read_text() == "keep me"
    onto_input = runner.invoke(cli, ["report", str(carphone_result), "--out", str(carphone_result), "--overwrite"])
    assert onto_input.exit_code == 2 and pq.read_metadata(carphone_result).num_rows == 120
    assert not list(tmp_path.glob(".*.tmp"))


CHROMIUM = find_chromium()
needs_chromium = pytest.mark.skipif(CHROMIUM is None, reason="no Chromium on PATH (Debian: apt-get install chromium)")


@needs_chromium
def test_report_renders_in_headless_chromium(failed_and_expression_only: Path, tmp_path: Path):
    page = tmp_path / "report.html"
    _report(failed_and_expression_only, page)
    shot = tmp_path / "report.png"
    check = check_page(page, shot, full_page=True)
    assert check.problems == [], check.problems
    assert check.images == 5 and check.title.startswith("annotate report")
    png = shot.read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n"
    width, height = struct.unpack(">II", png[16:24])
    assert width == 1280 and height > 1500  # the whole page, not only the first screen
    print(f"screenshot: {shot}")


@needs_chromium
def test_the_browser_check_catches_errors(tmp_path: Path):
    """The check above can fail: a script error, console.error, a missing and a remote image."""
    page = tmp_path / "bad.html"
    page.write_text('<!DOCTYPE html><html><body><img src="missing.png" alt="missing">'
                    '<img src="https://example.invalid/x.png" alt="remote">'
                    '<script>console.error("boom"); notAFunction();</script></body></html>')
    check = check_page(page)
    assert check.console_errors == ["console.error: boom"]
    assert any("notAFunction" in e for e in check.exceptions)
    assert check.external_requests == ["https://example.invalid/x.png"]
    assert sorted(check.broken_images) == ["missing", "remote"]
    assert any("missing.png" in e for e in check.log_errors)

"""`annotate bench`: the real command on a real clip, its JSON, table and plot; and its helpers."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest

from annotator.config import DEFAULT_DETECT_EVERY
from benchmarks.ray_scaling import efficiency
from benchmarks.suite import ISOLATED, PIPELINE_NAME, _table, format_tables
from faults import write_clip

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def _annotate(*args: str, timeout: float = 240) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "annotator", *args], capture_output=True, text=True, timeout=timeout)


@pytest.fixture(scope="module")
def quick_bench(tmp_path_factory, carphone_720p):
    """One quick run: the 30-frame 720p carphone clip, ONNX Runtime, batch 8."""
    out = tmp_path_factory.mktemp("bench") / "tmp" / "bench.json"
    proc = _annotate("bench", "--quick", "--video", str(carphone_720p), "--backend", "onnxrt",
                     "--batch-size", "8", "--out", str(out))
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc, json.loads(out.read_text()), out


def test_quick_bench_reports_every_stage_and_the_pipeline(quick_bench, carphone_720p):
    _, report, _ = quick_bench
    assert [r["backend"] for r in report["results"]] == ["onnxrt"]
    (row,) = report["results"]
    assert row["batch_size"] == 8 and row["clip"] == carphone_720p.stem
    for stage in (*ISOLATED, "detect_full"):
        result = row["stages"][stage]
        assert result["fps"] > 0 and result["seconds"] > 0, stage
        assert result["peak_rss_mb"] > 100, stage  # a Python process with torch loaded
    pipeline = row["pipeline"]
    # The same 30 frames everywhere (the clip is shorter than --quick's 48).
    frames = {row["stages"][s]["frames"] for s in ISOLATED} | {pipeline["frames"]}
    assert frames == {30}
    assert row["stages"]["detect_full"]["frames"] == 16
    # One person talking: the tracker finds them in (nearly) every frame, and the isolated detect
    # stage finds exactly the faces the pipeline does (same tracker, same frames).
    assert pipeline["faces"] >= 27
    assert row["stages"]["detect"]["faces"] == pipeline["faces"] == row["stages"]["score"]["faces"]
    assert row["stages"]["detect"]["keyframes"] == pipeline["keyframes"] >= 2
    assert pipeline["faces_per_s"] > 0 and pipeline["peak_rss_mb"] > 100
    # Shares of the pipeline's wall time: one per stage, and they add up to (at most) 1.
    shares = pipeline["stage_share"]
    assert set(shares) == {*PIPELINE_NAME.values(), "other"}
    assert 0.95 <= sum(shares.values()) <= 1.05
    assert shares["detect"] > 0
    # The pipeline runs its stages one after another: it cannot beat its slowest stage.
    slowest = min(ISOLATED, key=lambda s: row["stages"][s]["fps"])
    assert row["slowest_stage"] == slowest
    assert row["ratio"] == pytest.approx(pipeline["fps"] / row["stages"][slowest]["fps"])
    assert 0 < row["ratio"] <= 1.2


def test_quick_bench_records_machine_versions_and_options(quick_bench):
    _, report, _ = quick_bench
    assert report["machine"]["cpu_count"] >= 1 and report["machine"]["cpu_model"]
    for package in ("python", "torch", "onnxruntime", "av", "pyarrow", "ray", "video-annotator"):
        assert report["versions"].get(package), package
    options = report["options"]
    assert options["batch_sizes"] == [8] and options["backends_run"] == ["onnxrt"]
    assert options["quick"] is True and options["threads"] == 1 and options["detect_every"] == DEFAULT_DETECT_EVERY
    assert options["repeats"] == 1  # --quick: one timed pass (3 by default, the median reported)
    assert report["clips"][0]["width"] == 1280 and report["clips"][0]["frames_used"] == 30


def test_quick_bench_prints_the_table_and_draws_the_plot(quick_bench, carphone_720p):
    proc, report, out = quick_bench
    lines = proc.stdout.splitlines()
    header = next(line for line in lines if line.startswith("clip") and "PIPELINE" in line)
    for column in ("decode", "detect", "full-det", "align", "score", "write", "ratio"):
        assert column in header, column
    row = next(line for line in lines if line.startswith(carphone_720p.stem) and "onnxrt" in line)
    assert f"{report['results'][0]['ratio']:.2f}" in row
    # Columns line up: each value ends where its header does.
    assert len(row.rstrip()) == len(header.rstrip())
    plot = out.with_suffix(".png")
    assert plot.read_bytes()[:8] == PNG_SIGNATURE and plot.stat().st_size < 100_000
    assert f"wrote {out}" in proc.stdout


def test_bench_refuses_bad_options_in_one_line(tmp_path):
    missing = _annotate("bench", "--video", str(tmp_path / "nope.mp4"), "--out", str(tmp_path / "b.json"), timeout=60)
    assert missing.returncode == 2 and "nope.mp4" in missing.stderr
    zero = _annotate("bench", "--batch-size", "4,0", timeout=60)
    assert zero.returncode == 2 and "--batch-size" in zero.stderr
    assert not (tmp_path / "b.json").exists()


def test_a_stage_reports_its_median_pass():
    """Three passes of 30, 10 and 20 ms: the 20 ms one is reported, with its own result."""
    import time

    from benchmarks.stage import _timed

    durations = iter([0.03, 0.01, 0.02])

    def one_pass() -> float:
        seconds = next(durations)
        time.sleep(seconds)
        return seconds

    result, seconds, before, peak = _timed(one_pass, repeats=3)
    assert result == 0.02 and 0.02 <= seconds < 0.03
    assert peak >= before > 0


def test_rounds_interleave_the_stage_processes_and_report_medians(monkeypatch, tmp_path):
    """Three rounds: every stage runs once per round (full detection once), round after round;
    each stage reports its median round, and the ratio is the median of the rounds' ratios."""
    from benchmarks import suite

    # frames/s per round: the pipeline and the find-faces stage both hit a slow second round.
    rates = {"decode": [400, 390, 410], "detect": [150, 100, 160], "align": [2000] * 3, "score": [1500] * 3,
             "write": [9000] * 3, "pipeline": [120, 90, 110], "detect_full": [20]}
    calls: list[str] = []

    def fake_stage(name, options):
        fps = rates[name][calls.count(name)]
        calls.append(name)
        result = {"fps": fps, "seconds": 30 / fps, "frames": 30, "faces": 30, "faces_per_s": fps,
                  "backend": options.backend, "batch_size": options.batch_size, "peak_rss_mb": 1.0, "keyframes": 2}
        if name == "pipeline":
            result["stage_s"] = {"decode": 0.01, "detect": 0.1, "align": 0.01, "score": 0.01, "rows": 0.001}
        return result

    monkeypatch.setattr(suite, "run_stage", fake_stage)
    options = suite.BenchOptions(batch_sizes=(8,), backends=("onnxrt",), rounds=3, workdir=tmp_path)
    rows, decode_rows = suite.bench_clip(tmp_path / "clip.mp4", options, "cpu", ["onnxrt"], ["pyav"], lambda line: None)
    one_round = ["detect", "score", "pipeline", "decode", "align", "write"]
    assert calls == ["detect", "detect_full", "score", "pipeline", "decode", "align", "write"] + one_round * 2
    (row,) = rows
    assert row["stages"]["detect"]["fps"] == 150 and row["pipeline"]["fps"] == 110
    assert decode_rows[0]["fps"] == 400
    assert row["round_ratios"] == pytest.approx([120 / 150, 90 / 100, 110 / 160])
    assert row["ratio"] == pytest.approx(0.8)  # not 110 / 150 from the medians of a slow and a fast round


def test_table_aligns_columns():
    text = _table(["clip", "fps"], [["a", "1.5"], ["longer", "100"]], left=1)
    assert text.splitlines() == ["clip    fps", "------  ---", "a       1.5", "longer  100"]


def test_ray_efficiency_is_per_worker_speed_relative_to_the_fewest_workers():
    results = [{"workers": 2, "frames_per_s": 30.0}, {"workers": 1, "frames_per_s": 20.0}]
    efficiency(results)
    assert results[0]["efficiency"] == 0.75 and results[1]["efficiency"] == 1.0


def test_a_steady_rate_too_short_to_tell_is_shown_as_unknown(monkeypatch, tmp_path):
    """A --quick clip leaves 0.1 s of work beyond the start-up, which printed "480 frames/s" and an
    efficiency of 2.45; now the steady rate and efficiency of such a run are unknown, and said so."""
    from benchmarks import ray_scaling

    walls = iter([12.1, 8.1, 7.8, 7.7])  # 1 worker: run, 2-frame start-up; then 2 workers
    monkeypatch.setattr(ray_scaling, "time_run", lambda folder, out, n, args: {
        "workers": n, "frames": 96, "wall_s": next(walls), "frames_per_s": 10.0, "videos_per_s": 0.2})
    monkeypatch.setattr(ray_scaling, "upscale", lambda clip, out, *a, **k: clip)
    clip = tmp_path / "clip.mp4"
    write_clip(clip, [np.zeros((64, 64, 3), np.uint8)], 2)
    results = ray_scaling.scaling(clip, 2, [1, 2], echo=lambda line: None)
    assert [r["steady_frames_per_s"] for r in results] == [24.0, None]
    assert [r["efficiency"] for r in results] == [1.0, None]
    options = {"threads": 1, "device_resolved": "cpu", "detect_every": 20, "scan_every": 300, "det_size": 640,
               "min_face": 32}
    text = format_tables({"date": "today", "machine": {"cpu_model": "cpu", "cpus_usable": 2}, "options": options,
                          "results": [], "ray": [{"copies": 2, "clip": "clip.mp4", "results": results}]})
    assert "too little to tell a steady rate" in text

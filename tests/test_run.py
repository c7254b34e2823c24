"""End to end: `annotate run` on real video, in process and through a real local Ray instance."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow.dataset as ds
import pyarrow.parquet as pq
import pytest

from annotator.config import DEFAULT_SCORER, ConfigError, RunConfig
from annotator.run import RunSummary, run
from annotator.schema import PROB_COLUMNS, SCHEMA
from annotator.writer import OutputLayout, read_metadata
from engines.decoders import Sampling

SORT = [("video_path", "ascending"), ("frame_index", "ascending"), ("face_index", "ascending")]


def _config(inputs, out, **kwargs) -> RunConfig:
    kwargs.setdefault("workers", 0)
    return RunConfig(inputs=tuple(inputs), out=out, **kwargs)


@pytest.fixture(scope="module")
def carphone_table(carphone, tmp_path_factory):
    out = tmp_path_factory.mktemp("run") / "carphone.parquet"
    summary = run(_config([carphone], out), progress=False)
    return summary, pq.read_table(out), out


def test_carphone_every_frame_has_a_row_and_sane_values(carphone_table):
    summary, table, _ = carphone_table
    assert table.schema.equals(SCHEMA, check_metadata=False)
    assert summary.frames == 120 and summary.failed == 0
    frames = table.column("frame_index").to_numpy()
    assert sorted(set(frames.tolist())) == list(range(120))
    pts = table.group_by("frame_index").aggregate([("pts_s", "min")]).sort_by("frame_index").column("pts_s_min").to_numpy()
    assert np.all(np.diff(pts) > 0)
    faces = table.filter(table.column("face_index").is_valid())
    assert len(set(faces.column("frame_index").to_pylist())) >= 0.95 * 120
    x1, y1, x2, y2 = (faces.column(c).to_numpy() for c in ("x1", "y1", "x2", "y2"))
    assert np.all((0 <= x1) & (x1 < x2) & (x2 <= 176) & (0 <= y1) & (y1 < y2) & (y2 <= 144))
    probs = np.stack([faces.column(c).to_numpy() for c in PROB_COLUMNS], axis=1)
    np.testing.assert_allclose(probs.sum(axis=1), 1.0, atol=1e-5)
    labels = np.array(["neutral", "anger", "disgust", "fear", "happiness", "sadness", "surprise"])
    assert faces.column("expression").to_pylist() == labels[probs.argmax(axis=1)].tolist()
    # One person in the clip: the tracker keeps one id for (nearly) the whole clip.
    ids, counts = np.unique(faces.column("track_id").to_numpy(), return_counts=True)
    assert counts.max() >= 0.9 * len(faces)
    # The default student predicts expression only, so valence/arousal are null.
    assert faces.column("valence").null_count == len(faces)


def test_metadata_records_models_hashes_version_and_options(carphone_table):
    _, table, out = carphone_table
    meta = read_metadata(out)
    assert meta["version"] and meta["options"]["det_threshold"] == 0.9
    roles = {m["role"]: m for m in meta["models"]}
    assert roles["detector"]["name"] == "retinaface-mnv2" and roles["scorer"]["name"] == DEFAULT_SCORER
    for model in roles.values():
        assert len(model["artifact_sha256"]["model.onnx"]) == 64 and len(model["source_sha256"]) == 64
    assert set(table.column("model_id").drop_null().to_pylist()) == {roles["scorer"]["id"]}


def test_sample_fps_gives_expected_frames(carphone, tmp_path):
    out = tmp_path / "fps.parquet"
    run(_config([carphone], out, sampling=Sampling(fps=5.0)), progress=False)
    frames = sorted(set(pq.read_table(out).column("frame_index").to_pylist()))
    assert frames == list(range(0, 120, 6))  # 29.97 fps source, 5 per second


def test_folder_with_two_videos_and_a_broken_one(carphone, tmp_path):
    videos = tmp_path / "videos"
    (videos / "nested").mkdir(parents=True)
    shutil.copy(carphone, videos / "one.mp4")
    shutil.copy(carphone, videos / "nested" / "two.mov")
    (videos / "broken.mp4").write_bytes(b"\x00" * 1000)
    out = tmp_path / "results"
    summary = run(_config([videos], out, sampling=Sampling(every_n=10)), progress=False)
    assert summary.videos == 3 and summary.failed == 1
    table = ds.dataset(out, format="parquet").to_table()
    by_video = {p: table.filter(ds.field("video_path") == p) for p in set(table.column("video_path").to_pylist())}
    assert {Path(p).name for p in by_video} == {"one.mp4", "two.mov", "broken.mp4"}
    broken = by_video[str((videos / "broken.mp4").absolute())]
    assert broken.num_rows == 1 and "broken.mp4" in broken.column("error")[0].as_py()
    one, two = (by_video[str((videos / n).absolute())] for n in ("one.mp4", "nested/two.mov"))
    assert one.column("frame_index").to_pylist() == two.column("frame_index").to_pylist()
    assert one.column("video_id")[0].as_py() == two.column("video_id")[0].as_py()  # same content

    # Resume: a finished video is not redone, a failed one is retried.
    first = sorted(p.name for p in OutputLayout(out).parts())
    again = run(_config([videos], out, sampling=Sampling(every_n=10)), progress=False)
    assert again.skipped == 2 and again.failed == 1
    assert sorted(p.name for p in OutputLayout(out).parts()) == first
    # Different options must not be mixed into the same results.
    with pytest.raises(ConfigError, match=r"other models or options \(sampling; pass the same options"):
        run(_config([videos], out, sampling=Sampling(every_n=5)), progress=False)


def test_running_again_into_a_finished_single_file_changes_nothing(carphone_table, carphone):
    _, _, out = carphone_table
    before = out.stat()
    again = run(_config([carphone], out), progress=False)
    assert again.skipped == 1 and again.frames == 0
    assert again.line() == f"{out}: 1 video (1 already done, 0 failed), 0 frames, 0 faces"  # no "0.0 frames/s"
    after = out.stat()
    assert (after.st_ino, after.st_mtime_ns, after.st_size) == (before.st_ino, before.st_mtime_ns, before.st_size)
    assert not OutputLayout(out).parts_dir.exists()


def test_two_ray_workers_equal_one_row_for_row(carphone, tmp_path):
    videos = tmp_path / "videos"
    videos.mkdir()
    for name in ("a.mp4", "b.mp4", "c.mp4"):
        shutil.copy(carphone, videos / name)
    tables = []
    for workers in (1, 2):
        out = tmp_path / f"ray{workers}.parquet"
        summary = run(_config([videos], out, workers=workers, sampling=Sampling(every_n=3)), progress=False)
        assert summary.failed == 0 and summary.frames == 3 * 40
        tables.append(pq.read_table(out).sort_by(SORT))
    assert tables[0].equals(tables[1])
    in_process = tmp_path / "local.parquet"
    run(_config([videos], in_process, sampling=Sampling(every_n=3)), progress=False)
    assert pq.read_table(in_process).sort_by(SORT).equals(tables[0])


def test_the_run_command_stops_ray_once_its_rows_are_written(carphone, tmp_path):
    """The command stops its local Ray instance itself, rather than in Ray's exit hook, which
    first sleeps for late worker logs: a whole short run ended about 1 s sooner (8.6-8.8 → 7.6-8.0 s)."""
    import ray
    from click.testing import CliRunner

    from annotator.cli import cli

    out = tmp_path / "out.parquet"
    result = CliRunner().invoke(cli, ["run", str(carphone), "--out", str(out), "--workers", "1", "--every-n", "10",
                                      "--no-progress"])
    assert result.exit_code == 0, result.output
    assert pq.read_table(out).num_rows == 12
    assert not ray.is_initialized()


def _annotate(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", "from annotator.cli import main; main()", *args],
                          capture_output=True, text=True, timeout=120)


@pytest.mark.parametrize("args, fragment", [
    (["run", "does/not/exist.mp4", "--out", "x.parquet"], "does/not/exist.mp4: no such file"),
    (["run", ".", "--out", "x.parquet", "--device", "tpu"], "'--device'"),
    (["run", ".", "--out", "x.parquet", "--every-n", "0"], "'--every-n'"),
    (["run", ".", "--out", "x.parquet", "--model", "no-such-model"], "unknown model 'no-such-model'"),
    (["run", ".", "--out", "x.parquet", "--every-n", "2", "--sample-fps", "3"], "exclusive"),
    (["run", "--out", "x.parquet"], "give the videos: PATHS (files or folders), or --files-from LIST"),
    (["run", "--out", "x.parquet", "--files-from", "no-such-list.txt"], "'no-such-list.txt'"),
])
def test_cli_bad_input_is_one_line_and_nonzero(args, fragment, tmp_path):
    done = _annotate(*args)
    assert done.returncode == 2
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and fragment in lines[0], done.stderr


def test_files_from_a_list_and_from_standard_input(carphone, tmp_path):
    """A corpus named by a manifest: its videos are annotated as if named on the command line,
    and a listed file that is gone is that path's error row (exit 3), not the end of the run."""
    listing = tmp_path / "list.txt"
    listing.write_text(f"{carphone}\r\n\n{tmp_path / 'gone.mp4'}\n")
    out = tmp_path / "out"
    done = _annotate("run", "--files-from", str(listing), "--out", str(out), "--workers", "0", "--every-n", "10",
                     "--no-progress")
    assert done.returncode == 3, done.stderr
    assert f"{tmp_path / 'gone.mp4'}: no such file or directory (listed in {listing})" in done.stderr
    table = ds.dataset(out).to_table()
    assert sorted(set(table["video_path"].to_pylist())) == sorted([str(carphone), str(tmp_path / "gone.mp4")])
    assert table.filter(ds.field("video_path") == str(carphone)).num_rows == 12
    options = read_metadata(OutputLayout(out).parts()[0])["options"]
    assert options["files_from"] == str(listing) and options["files_listed"] == 2 and options["inputs"] == []

    # find -print0 | annotate run --files-from -: NUL-separated on standard input, through Ray
    # (whose workers get the run's options without its paths)
    piped = subprocess.run([sys.executable, "-c", "from annotator.cli import main; main()", "run", "--files-from", "-",
                            "--out", str(tmp_path / "piped.parquet"), "--workers", "1", "--every-n", "10",
                            "--no-progress"], input=f"{carphone}\0".encode(), capture_output=True, timeout=120)
    assert piped.returncode == 0, piped.stderr
    assert pq.read_table(tmp_path / "piped.parquet").num_rows == 12


def test_a_run_over_many_paths_counts_them_in_its_metadata(tmp_path):
    """Every part's footer carries the run's options: 10,000 paths named one by one were written
    into each of 10,000 parts (twice a part: about 1 MB each)."""
    from annotator.config import INPUTS_RECORDED

    paths = tuple(tmp_path / f"clip-{i:05d}.mp4" for i in range(500))
    options = RunConfig(inputs=paths, out=tmp_path / "out").options_for_metadata()
    assert options["inputs"] == [str(p) for p in paths[:INPUTS_RECORDED]] and options["inputs_count"] == 500
    assert "listed" not in options
    few = RunConfig(inputs=paths[:3], out=tmp_path / "out").options_for_metadata()
    assert few["inputs"] == [str(p) for p in paths[:3]] and "inputs_count" not in few


def test_cli_help_lists_commands_with_examples():
    done = _annotate("--help")
    assert done.returncode == 0
    for command in ("run", "models", "example"):
        assert command in done.stdout
    assert "Examples:" in _annotate("run", "--help").stdout


def test_every_help_page_reads_as_written():
    """Click prints help text as written, with no %-formatting: a "%%" reached the terminal."""
    from click.testing import CliRunner

    from annotator.cli import cli

    runner = CliRunner()
    pages = [runner.invoke(cli, ["--help"]).output]
    for name, command in cli.commands.items():
        pages.append(runner.invoke(cli, [name, "--help"]).output)
        pages += [runner.invoke(cli, [name, sub, "--help"]).output for sub in getattr(command, "commands", {})]
    assert len(pages) > len(cli.commands) and all("Usage:" in page for page in pages)
    assert not [page.splitlines()[0] for page in pages if "%%" in page]


def test_pool_is_sized_to_the_cluster(monkeypatch):
    import ray

    from annotator.orchestrate import pool_size, worker_memory_bytes

    monkeypatch.setattr(ray, "cluster_resources", lambda: {"CPU": 16.0, "memory": 8.0 * 2**30})
    config = _config([Path("v.mp4")], Path("o.parquet"), workers=None, device="cpu")
    assert 1.8 * 2**30 < worker_memory_bytes(config) < 2.5 * 2**30  # defaults: 720p batch 8 peaks at 1.5 GB
    assert pool_size(config, videos=100) == 3  # 8 GB holds 3 such workers on 16 cores
    assert pool_size(config, videos=2) == 2  # never more actors than videos
    # Memory follows the batch: 32 frames per batch need twice as much per worker.
    big_batches = _config([Path("v.mp4")], Path("o.parquet"), workers=None, device="cpu", batch_size=32)
    assert worker_memory_bytes(big_batches) > 2 * worker_memory_bytes(config)
    assert pool_size(big_batches, videos=100) == 1
    monkeypatch.setattr(ray, "cluster_resources", lambda: {"CPU": 2.0, "memory": 20.0 * 2**30})
    assert pool_size(config, videos=100) == 2
    assert pool_size(_config([Path("v.mp4")], Path("o.parquet"), workers=7), videos=100) == 7


def test_a_worker_never_asks_more_cpus_than_one_node_has(monkeypatch):
    """Two 1-CPU nodes and --workers 1: the worker asks 1 CPU, not the cluster's 2, which no node
    could place (the run would wait forever); a dead node's CPUs do not count."""
    import ray

    from annotator.orchestrate import _worker_resources

    config = _config([Path("v.mp4")], Path("o.parquet"), workers=1, device="cpu")
    monkeypatch.setattr(ray, "cluster_resources", lambda: {"CPU": 2.0})
    one_cpu = {"Alive": True, "Resources": {"CPU": 1.0}}
    monkeypatch.setattr(ray, "nodes", lambda: [one_cpu, one_cpu])
    assert _worker_resources(config, 1) == (1.0, 0.0, 1)
    monkeypatch.setattr(ray, "nodes", lambda: [{"Alive": True, "Resources": {"CPU": 2.0}}])
    assert _worker_resources(config, 1) == (2.0, 0.0, 2)  # one 2-core machine: both cores' threads
    monkeypatch.setattr(ray, "nodes", lambda: [one_cpu, {"Alive": False, "Resources": {"CPU": 8.0}}])
    assert _worker_resources(config, 1) == (1.0, 0.0, 1)


def test_the_driver_never_imports_torch():
    """`annotate run`'s driver only orchestrates: importing torch there cost 1.2 s of every run's
    start-up (annotator.temporal did, for the head's card checks, now in annotator.temporal_card)."""
    import subprocess
    import sys

    code = ("import sys, annotator.cli, annotator.run, annotator.orchestrate, annotator.collect, "
            "annotator.commands.run; print(sorted(m for m in ('torch', 'onnxruntime') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip()
    assert out == "[]", out


def test_the_progress_bar_never_passes_its_total():
    # Thirty tenths of videos are 3.0000000000000013 in floats: tqdm would warn "clamping frac"
    # and show a negative time left on the last video of a run.
    import io
    import warnings

    from annotator.progress import RunProgress

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        progress = RunProgress(3, 0, "annotate", bar=True, stream=io.StringIO())
        for _ in range(30):
            progress.advance(0.1, faces=1)
        progress.close()
    assert progress.bar.n == pytest.approx(3) and progress.bar.n <= 3
    assert "-00:00" not in progress.stream.getvalue()


def test_a_run_logged_to_a_file_writes_status_lines_not_a_bar(carphone, tmp_path, capfd):
    """stderr to a file (a batch job, ray job submit): tqdm's carriage-return redraws made one
    endless line (4 KB for a 7-second run); now a plain line every --status-every seconds."""
    for name in "abc":
        shutil.copy(carphone, tmp_path / f"{name}.mp4")
    run(_config([tmp_path], tmp_path / "out", sampling=Sampling(every_n=30)), progress=True, status_every=1e-9)
    err = capfd.readouterr().err
    assert "\r" not in err and "|" not in err  # no bar
    lines = [line for line in err.splitlines() if line.startswith("annotate: ")]
    shape = re.compile(r"annotate: [0-3]/3 videos \(\d+\.\d %\), \d+ frames, \d+ faces, 0 failed, \d+\.\d frames/s"
                       r"(, (under 1 min|about \d+ min) left)?")
    assert lines and all(shape.fullmatch(line) for line in lines), lines
    assert lines[-1].startswith("annotate: 3/3 videos (100.0 %), 12 frames, 12 faces, 0 failed, ")
    assert "left" not in lines[-1] and any("left" in line for line in lines[:-1]), lines

def test_a_summary_line_of_a_large_run_reads_with_thousands_separators() -> None:
    summary = RunSummary(Path("out/"), videos=12_345, skipped=1_001, failed=2, frames=98_765_432, faces=101_234_567,
                         seconds=100.0, damaged=1_500, frames_lost=1)
    assert summary.line() == ("out: 12,345 videos (1,001 already done, 2 failed, 1,500 damaged (1 frame lost)), "
                              "98,765,432 frames, 101,234,567 faces, 987,654.3 frames/s")

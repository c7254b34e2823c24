"""`annotate distil`: harvest a teacher over videos (resumable shards), train a student, export it.

Real data and real models: the carphone clip, re-encoded with per-frame brightness and vertical
contrast changes so a teacher's valence/arousal vary; an ONNX teacher built here whose valence
and arousal are known functions of the crop (described by a SPEC.toml, as a user would bring
one); and the registered FER2013 teacher for the expression-only case.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from pathlib import Path

import av
import numpy as np
import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest
import torch
from click.testing import CliRunner
from torch import nn

from annotator.cli import cli
from annotator.harvest import SHARDS
from training.distil import Corpus, DistilOptions, distil_loss
from training.labels import MISSING
from training.losses import distillation, expr_ce, student_mix
from engines.models.student import build_student

from test_model_spec import FER_LABELS, write_spec  # a sibling module, as faults.py is

FRAMES = 60  # per synthetic video


def _frames(path: Path) -> np.ndarray:
    with av.open(str(path)) as container:
        return np.stack([f.to_ndarray(format="rgb24") for f in container.decode(video=0)])


def _encode(frames: np.ndarray, dst: Path) -> Path:
    with av.open(str(dst), "w") as out:
        stream = out.add_stream("libx264", rate=30)
        stream.width, stream.height, stream.pix_fmt = frames.shape[2], frames.shape[1], "yuv420p"
        stream.options = {"crf": "12", "preset": "veryfast"}
        for frame in frames:
            out.mux(stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")))
        out.mux(stream.encode())
    return dst


@pytest.fixture(scope="module")
def varied_videos(carphone: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Three clips of the carphone face whose brightness and top/bottom contrast change frame by
    frame (each clip covers the whole range, at its own phase), so held-out clips hold values seen."""
    folder = tmp_path_factory.mktemp("varied")
    frames = _frames(carphone).astype(np.float32)
    height = frames.shape[1]
    ramp = (np.arange(height, dtype=np.float32) - height / 2) / height  # -0.5 .. 0.5, top to bottom
    for clip in range(3):
        t = np.arange(FRAMES)
        gain = 0.95 + 0.45 * np.sin(2 * np.pi * t / 23 + clip * 2.1)
        tilt = 0.9 * np.sin(2 * np.pi * t / 17 + clip * 1.3)
        out = frames[clip * 20: clip * 20 + FRAMES] * gain[:, None, None, None]
        out = out * (1 + tilt[:, None, None, None] * ramp[None, :, None, None])
        _encode(out.clip(0, 255).astype(np.uint8), folder / f"clip{clip}.mp4")
    return folder


class KnownVA(nn.Module):
    """Valence from the crop's brightness, arousal from its top-minus-bottom contrast (both
    invariant to a horizontal flip), expression logits from its colour balance and both."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, 3, 112, 112) RGB 0..255
        grey = x.mean(dim=1)
        brightness = grey.mean(dim=(1, 2)) / 255
        contrast = (grey[:, :56].mean(dim=(1, 2)) - grey[:, 56:].mean(dim=(1, 2))) / 255
        valence = 0.9 * torch.tanh(6 * (brightness - 0.45))
        arousal = 0.9 * torch.tanh(8 * (contrast + 0.12))  # the clip's top is darker
        red_green = (x[:, 0].mean(dim=(1, 2)) - x[:, 1].mean(dim=(1, 2))) / 255
        features = torch.stack([valence, arousal, 10 * red_green], dim=1)
        weights = torch.tensor([[3.0, 0, 0], [0, 3.0, 0], [-3.0, 0, 0], [0, -3.0, 0], [0, 0, 1.0],
                                [1.5, 1.5, 0], [0, 0, 0]])
        logits = features @ weights.T
        return torch.cat([logits, valence[:, None], arousal[:, None]], dim=1)


def known_va(x: torch.Tensor) -> np.ndarray:
    return KnownVA()(x)[:, 7:].numpy()


@pytest.fixture(scope="module")
def va_teacher(tmp_path_factory: pytest.TempPathFactory) -> Path:
    directory = tmp_path_factory.mktemp("va-teacher")
    onnx_path = directory / "known_va.onnx"
    torch.onnx.export(KnownVA().eval(), (torch.zeros(1, 3, 112, 112),), str(onnx_path), input_names=["image"],
                      output_names=["out"], dynamic_axes={"image": {0: "batch"}, "out": {0: "batch"}},
                      opset_version=17, dynamo=False)
    return write_spec(directory / "SPEC.toml", {
        "model": {"name": "known-va", "onnx": onnx_path.name, "sha256": hashlib.sha256(onnx_path.read_bytes()).hexdigest(),
                  "licence": "test", "source": "tests/test_distil.py"},
        "input": {"size": 112, "layout": "NCHW", "colour": "RGB", "scale": 1.0, "mean": [0.0, 0.0, 0.0],
                  "std": [1.0, 1.0, 1.0], "template": "arcface", "margin": 1.0, "crop_from": "aligned112"},
        "output.expression": {"name": "out", "slice": [0, 7], "kind": "logits", "labels": FER_LABELS},
        "output.valence": {"name": "out", "index": 7, "range": [-1, 1]},
        "output.arousal": {"name": "out", "index": 8, "range": [-1, 1]},
    })


def _distil(videos: list[Path], teacher: str, out: Path, *extra: str) -> tuple[int, str]:
    result = CliRunner().invoke(cli, ["distil", *map(str, videos), "--teacher", teacher, "--out", str(out),
                                      "--student-backbone", "tiny", "--batch-size", "32", "--no-progress", *extra])
    return result.exit_code, result.output


def _card(out: Path) -> dict:
    return json.loads((out / "model" / "model_card.json").read_text())


def test_synthetic_va_teacher_is_distilled_to_ccc_above_0_9(varied_videos: Path, va_teacher: Path,
                                                            tmp_path: Path) -> None:
    out = tmp_path / "distilled"
    code, output = _distil([varied_videos], str(va_teacher), out, "--workers", "0", "--sample-fps", "30",
                           "--epochs", "24", "--steps-per-epoch", "15")
    assert code == 0, output
    card = _card(out)
    print(json.dumps(card["metrics"], indent=1))
    held = card["metrics"]["held_out"]
    assert card["corpus"]["videos"] == 3 and len(card["corpus"]["held_out_videos"]) == 1
    assert card["corpus"]["faces"] >= 150 and held["faces"] >= 40
    assert card["outputs"] == ["expr_logits", "va"] and card["valence_arousal"].startswith("predicted")
    assert card["teacher"]["name"] == "known-va" and len(card["teacher"]["onnx_sha256"]) == 64
    # The teacher's values really vary on the held-out clip, so a CCC of 0.9 is earned.
    shard = next(p for p in (out / SHARDS).glob("*.parquet")
                 if pq.read_schema(p).metadata[b"distil_video"].decode() in card["corpus"]["held_out_videos"])
    teacher_va = np.array(pq.read_table(shard).column("teacher_va").drop_null().to_pylist())
    assert teacher_va.std(axis=0).min() > 0.15
    assert held["ccc_valence"] >= 0.9 and held["ccc_arousal"] >= 0.9, held
    # The stored targets are the teacher's outputs on the stored crops (exact, not approximated).
    from annotator.harvest import decode_png

    table = pq.read_table(shard).filter(pq.read_table(shard).column("crop_png").is_valid())
    crops = torch.from_numpy(np.stack([decode_png(b) for b in table.column("crop_png").to_pylist()[:8]]))
    stored = np.array(table.column("teacher_va").to_pylist()[:8])
    np.testing.assert_allclose(known_va(crops.permute(0, 3, 1, 2).float()), stored, atol=1e-4)
    # And `annotate run --model OUT/model` loads it and writes valence.
    results = tmp_path / "run.parquet"
    result = CliRunner().invoke(cli, ["run", str(varied_videos / "clip0.mp4"), "--out", str(results),
                                      "--model", str(out / "model"), "--workers", "0", "--no-progress"])
    assert result.exit_code == 0, result.output
    assert pq.read_table(results).column("valence").drop_null().length() > 0


def test_expression_only_teacher_gives_null_va_and_rerun_resumes(carphone: Path, tmp_path: Path,
                                                               monkeypatch: pytest.MonkeyPatch) -> None:
    """fer-minixception over two carphone versions (the real Ray pool, stopped before training);
    a rerun recomputes nothing."""
    import ray

    import training.distil

    ray_up_in_training: list[bool] = []
    train = training.distil.train_student

    def train_and_look(*args, **kwargs):
        ray_up_in_training.append(ray.is_initialized())
        return train(*args, **kwargs)

    monkeypatch.setattr(training.distil, "train_student", train_and_look)
    out = tmp_path / "fer"
    distorted = carphone.with_name("carphone_distorted.mp4")
    code, output = _distil([carphone, distorted], "fer-minixception", out, "--workers", "1", "--sample-fps", "5",
                           "--epochs", "1", "--steps-per-epoch", "3")
    assert code == 0, output
    assert ray_up_in_training == [False]  # the harvest's Ray instance holds nothing through training
    card = _card(out)
    assert card["outputs"] == ["expr_logits"] and card["va"] is None
    assert "null" in card["valence_arousal"] and "fer-minixception" in card["valence_arousal"]
    assert "ccc_valence" not in card["metrics"]["held_out"]
    assert card["corpus"]["faces"] > 20 and 0 <= card["metrics"]["held_out"]["top1_agreement"] <= 1
    results = tmp_path / "run.parquet"
    result = CliRunner().invoke(cli, ["run", str(carphone), "--out", str(results), "--model", str(out / "model"),
                                      "--workers", "0", "--no-progress", "--sample-fps", "5"])
    assert result.exit_code == 0, result.output
    table = pq.read_table(results)
    assert table.column("face_index").drop_null().length() > 0 and table.column("valence").null_count == table.num_rows

    shards = sorted((out / SHARDS).glob("*.parquet"))
    before = {p: p.stat().st_mtime_ns for p in shards}
    trained = (out / "train" / "last.pt").stat().st_mtime_ns
    code, output = _distil([carphone, distorted], "fer-minixception", out, "--workers", "0", "--sample-fps", "5",
                           "--epochs", "1", "--steps-per-epoch", "3")
    assert code == 0, output
    assert "2 videos (2 already done" in output
    assert {p: p.stat().st_mtime_ns for p in shards} == before  # the shards were not recomputed
    assert (out / "train" / "last.pt").stat().st_mtime_ns == trained  # training had finished: not redone
    # Another teacher on the same shards is refused in one line, nothing is overwritten.
    code, output = _distil([carphone], "student-fer-distilled", out, "--workers", "0", "--sample-fps", "5")
    assert code == 2 and "another teacher" in output
    assert {p: p.stat().st_mtime_ns for p in shards} == before


def test_bad_inputs_are_one_line_errors(tmp_path: Path, carphone: Path) -> None:
    code, output = _distil([carphone], "no-such-model", tmp_path / "a", "--workers", "0")
    assert code == 2 and "no-such-model" in output
    (tmp_path / "theirs").mkdir()
    (tmp_path / "theirs" / "notes.txt").write_text("mine")
    code, output = _distil([carphone], "fer-minixception", tmp_path / "theirs", "--workers", "0")
    assert code == 2 and "not written by annotate distil" in output
    assert (tmp_path / "theirs" / "notes.txt").read_text() == "mine"


def test_the_harvest_takes_a_file_list(carphone: Path, tmp_path: Path) -> None:
    """--files-from, as annotate run takes it: the listed videos are harvested, a listed path that
    is gone is reported, not the end of the harvest, and a list of only such paths is refused."""
    from annotator.config import ConfigError, RunConfig
    from annotator.harvest import harvest
    from engines.decoders import Sampling

    config = RunConfig(inputs=(), out=tmp_path / "unused", workers=0, scorer="fer-minixception",
                       sampling=Sampling(every_n=8), listed=(carphone, tmp_path / "gone.mp4"), files_from="list.txt")
    summary = harvest(config, "fer-minixception", tmp_path / "distilled", progress=False)
    assert (summary.videos, summary.frames) == (1, 15)
    assert summary.failed == [f"{tmp_path / 'gone.mp4'}: no such file or directory (listed in list.txt)"]
    gone = dataclasses.replace(config, listed=(tmp_path / "gone.mp4",))
    with pytest.raises(ConfigError, match="list.txt: none of its 1 path exists"):
        harvest(gone, "fer-minixception", tmp_path / "distilled", progress=False)
    code, output = _distil([], "fer-minixception", tmp_path / "b", "--workers", "0")
    assert code == 2 and "--files-from LIST" in output


def test_labels_mix_ground_truth_and_teacher_as_the_paper_does(carphone: Path, tmp_path: Path) -> None:
    """An Aff-Wild2 EXPR file for the clip: labelled faces get 0.6 CE + 0.4 KD, the others KD alone."""
    from training.distil import attach_labels

    labels = tmp_path / "labels" / "EXPR_Set" / "Train_Set"
    labels.mkdir(parents=True)
    # Frames 1..120; the first 60 labelled happiness (4), the rest -1 (no label).
    (labels / f"{carphone.stem}.txt").write_text("Neutral,Anger,Disgust,Fear,Happiness,Sadness,Surprise\n"
                                                 + "4\n" * 60 + "-1\n" * 60)
    n = 8
    rng = np.random.default_rng(0)
    probs = rng.dirichlet(np.ones(7), n).astype(np.float32)
    corpus = Corpus(images=rng.integers(0, 256, (n, 112, 112, 3), dtype=np.uint8), teacher_probs=probs,
                    teacher_va=None, video_key=np.array(["k"] * n), video_path=np.array([str(carphone)] * n),
                    frame_index=np.array([0, 10, 30, 59, 60, 80, 100, 119]), frames=n)
    counts = attach_labels(corpus, tmp_path / "labels")
    assert counts == {"expr": 4, "va": 0}
    assert corpus.expr.tolist() == [4, 4, 4, 4, MISSING, MISSING, MISSING, MISSING]

    torch.manual_seed(0)
    model = build_student("tiny").eval()
    images = torch.from_numpy(corpus.images).permute(0, 3, 1, 2).float()
    expr = torch.from_numpy(corpus.expr)
    logp = torch.from_numpy(np.log(probs))
    options = DistilOptions()
    loss, _ = distil_loss(model, images, expr, torch.full((n, 2), float(MISSING)), logp, None, options)
    logits, _ = model(images)
    kd = distillation(logits, logp, 1.5)
    labelled = expr != MISSING
    expected = 0.5 * 0.6 * expr_ce(logits, expr) + torch.where(labelled, 0.4, 1.0).mul(kd).mean()
    torch.testing.assert_close(loss, expected)
    torch.testing.assert_close(loss, student_mix(expr_ce(logits, expr), kd, labelled, 0.6))
    unlabelled, _ = distil_loss(model, images, torch.full((n,), MISSING), torch.full((n, 2), float(MISSING)),
                                logp, None, options)
    torch.testing.assert_close(unlabelled, kd.mean())  # no label at all: distillation alone at weight 1
    assert not torch.isclose(loss, unlabelled)
    # A file outside EXPR*/VA* folders is a one-line error naming it.
    (tmp_path / "labels" / "stray.txt").write_text("x\n")
    with pytest.raises(ValueError, match="stray.txt: not under an EXPR"):
        attach_labels(corpus, tmp_path / "labels")


def test_a_video_started_again_is_harvested_once_and_one_given_up_not_at_all(carphone: Path, tmp_path: Path,
                                                                            monkeypatch: pytest.MonkeyPatch):
    """A video starts again from its first frame when its worker dies: the shard then holds each
    frame once and the counts are those of one pass (as annotate run's PartCollector does)."""
    from annotator import worker
    from annotator.progress import RunProgress

    monkeypatch.setattr(worker, "TABLE_EVERY_S", 0.0)  # a table per batch: a death between two of them

    from annotator.config import RunConfig
    from annotator.harvest import HarvestPipeline, HarvestSummary, _ShardWriter, _take
    from annotator.orchestrate import stream_in_process, worker_died
    from annotator.worker import WorkItem
    from engines.decoders import Sampling

    config = RunConfig(inputs=(carphone,), out=tmp_path / "unused", workers=0, scorer="fer-minixception",
                       sampling=Sampling(every_n=4), batch_size=8)
    tables = list(stream_in_process(config, [WorkItem(carphone, "k")], HarvestPipeline))
    assert len(tables) >= 3  # several batches of rows, then the closing one

    def harvest(stream: list) -> tuple[HarvestSummary, pq.ParquetFile | None]:
        out = tmp_path / f"shards{len(stream)}"
        out.mkdir()
        writer, summary = _ShardWriter(out, "print"), HarvestSummary(videos=1)
        for table in stream:
            _take(table, writer, {"k": str(carphone)}, summary, RunProgress(1, 0, "harvest", shown=False))
        shard = out / "k.parquet"
        return summary, pq.read_table(shard) if shard.exists() else None

    clean, clean_rows = harvest(tables)
    restarted, rows = harvest(tables[:2] + tables)  # two batches in, the actor died, Ray starts over
    assert clean.frames == 30 and clean.faces == 30
    assert (restarted.frames, restarted.faces) == (clean.frames, clean.faces)
    assert rows.column("frame_index").to_pylist() == clean_rows.column("frame_index").to_pylist()
    # Its worker died on it a second time: the pool's failed row; nothing of it is kept or counted.
    given_up, none = harvest(tables[:2] + [worker_died(WorkItem(carphone, "k"), "its node was lost")])
    assert none is None and (given_up.frames, given_up.faces) == (0, 0)
    assert given_up.failed == [f"{carphone}: its worker died on it 2 times (its node was lost); skipped"]


def test_overwrite_removes_only_what_distil_wrote(tmp_path: Path):
    """--overwrite deletes distil's shards, checkpoints and model files by name; a user's file put
    inside those folders (or beside them) stays, and so does its folder."""
    from annotator.config import ConfigError
    from annotator.distil import MARKER, claim_out

    out = tmp_path / "out"
    claim_out(out, overwrite=False)
    ours = [out / SHARDS / "0123456789abcdef.parquet", out / SHARDS / ".0123456789abcdef.parquet.tmp",
            out / "train" / "last.pt", out / "train" / "best.pt", out / "model" / "student.pt",
            out / "model" / "student.onnx"]
    users = [out / "model" / "my-notes.txt", out / SHARDS / "keep.parquet", out / "results.csv"]
    for path in ours + users:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(b"x")
    (out / "model" / "model_card.json").write_text(json.dumps({"sha256": {"student.pt": "0" * 64}}))
    claim_out(out, overwrite=True)
    assert not any(p.exists() for p in ours) and not (out / "model" / "model_card.json").exists()
    assert all(p.read_bytes() == b"x" for p in users)
    assert not (out / "train").exists() and (out / MARKER).is_file()  # emptied folders of ours go
    # A folder holding someone else's files (no marker) is refused, not adopted.
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "thesis.tex").write_text("mine")
    with pytest.raises(ConfigError, match="not written by annotate distil"):
        claim_out(foreign, overwrite=True)
    assert (foreign / "thesis.tex").read_text() == "mine"


def test_shipped_init_starts_from_the_shipped_student(tmp_path: Path) -> None:
    """``--init shipped`` (the default with the shipped backbone) loads exactly the shipped student:
    on a real face its probabilities equal those of ``student-fer-distilled`` as annotate run loads it."""
    from skimage import data

    from engines.factory import create_scorer
    from training.distil import initial_weights, load_shipped_weights

    assert initial_weights(DistilOptions()) == "shipped"
    assert initial_weights(DistilOptions(backbone="tiny")) == "scratch"
    assert initial_weights(DistilOptions(init="scratch")) == "scratch"
    with pytest.raises(ValueError, match="--init scratch"):
        initial_weights(DistilOptions(backbone="tiny", init="shipped"))
    model = build_student("mobilenetv2-half").eval()
    load_shipped_weights(model)
    face = torch.from_numpy(data.astronaut()[20:220, 150:350].copy()).permute(2, 0, 1)[None].float()
    crop = torch.nn.functional.interpolate(face, size=(112, 112), mode="bilinear", antialias=True)
    with torch.no_grad():
        mine = model(crop)[0].softmax(dim=1).numpy()
    shipped, _ = create_scorer("student-fer-distilled", "torch", "cpu").predict(crop)
    np.testing.assert_allclose(mine, np.asarray(shipped), atol=1e-5)
    assert mine.max() > 0.2  # a real prediction, not a flat one


def test_shipped_init_with_another_backbone_is_refused_before_any_work(tmp_path: Path, carphone: Path) -> None:
    out = tmp_path / "d"
    code, output = _distil([carphone], "fer-minixception", out, "--init", "shipped", "--workers", "0")
    assert code == 2 and "--init scratch" in output and "mobilenetv2-half" in output
    assert not out.exists()


def test_cosine_lr_starts_at_the_base_and_falls_towards_zero():
    """The distil loop's schedule: the base rate at the first epoch, strictly falling, and the last
    epoch still training (a small rate, not 0), whatever the number of epochs."""
    from training.distil import cosine_lr

    for epochs in (1, 3, 20):
        rates = [cosine_lr(1e-3, epoch, epochs) for epoch in range(epochs)]
        assert rates[0] == pytest.approx(1e-3)
        assert all(a > b for a, b in zip(rates, rates[1:]))
        assert 0 < rates[-1] <= 1e-3
    assert cosine_lr(1e-3, 19, 20) < 1e-5


def test_a_video_changed_since_its_harvest_is_harvested_again(carphone: Path, tmp_path: Path) -> None:
    """A shard records its video's size and modification time: replaced since, the video is
    harvested again (and training, whose corpus then differs, starts afresh); unchanged, skipped."""
    import shutil

    from annotator.config import RunConfig
    from annotator.harvest import harvest
    from engines.decoders import Sampling
    from faults import carphone_frames, write_clip

    videos = tmp_path / "videos"
    videos.mkdir()
    shutil.copy(carphone, videos / "a.mp4")
    shutil.copy(carphone, videos / "b.mp4")
    config = RunConfig(inputs=(videos,), out=tmp_path / "unused", workers=0, scorer="fer-minixception",
                       sampling=Sampling(every_n=8))
    out = tmp_path / "distilled"
    first = harvest(config, "fer-minixception", out, progress=False)
    assert (first.skipped, first.frames) == (0, 30)
    shard_a = next(p for p in (out / SHARDS).glob("*.parquet") if str(videos / "a.mp4") in
                   pq.read_table(p).column("video_path").to_pylist())
    written = shard_a.stat().st_mtime_ns
    write_clip(tmp_path / "shorter.mp4", carphone_frames(carphone), 45)
    (tmp_path / "shorter.mp4").replace(videos / "b.mp4")  # b is another recording now
    again = harvest(config, "fer-minixception", out, progress=False)
    assert (again.skipped, again.frames) == (1, 6)  # frames 0, 8, ..., 40 of the new b
    assert shard_a.stat().st_mtime_ns == written
    rows = pq.read_table(out / SHARDS)
    of_b = rows.filter(pc.equal(rows.column("video_path"), str(videos / "b.mp4")))
    assert sorted(of_b.column("frame_index").to_pylist()) == list(range(0, 45, 8))
    assert harvest(config, "fer-minixception", out, progress=False).skipped == 2

"""``train teacher|student``, ``export`` and ``eval`` end to end on release-format fixtures."""

import hashlib
import json
import subprocess
import sys

import numpy as np
import onnxruntime as ort
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from click.testing import CliRunner

from annotator.commands.train import eval_cmd, export, train
from engines.models.student import DeployedStudent
from training import checkpoint
from training.synthetic import write_benchmark

SMOKE = """backbone = "tiny"
epochs = {epochs}
patience = 2
batch_size = 12
steps_per_epoch = 3
num_workers = 0

[data]
affwild2 = "data/affwild2"
affectnet_csv = "data/affectnet/training.csv"
affectnet_images = "data/affectnet/Manually_Annotated_Images"
expw_labels = "data/expw/label/label.lst"
expw_images = "data/expw/image/origin"
afewva = "data/afewva"
"""


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    root = tmp_path_factory.mktemp("cli")
    write_benchmark(root / "data", n_expr=100, n_va=100, n_both=24, n_val=50, n_heldout=50)
    return root


def _config(root, epochs):
    path = root / f"smoke{epochs}.toml"
    path.write_text(SMOKE.format(epochs=epochs))
    return path


def _invoke(command, args):
    result = CliRunner().invoke(command, [str(a) for a in args])
    assert result.exit_code == 0, result.output
    return result


def test_teacher_resumes_then_student_and_export(workspace, caplog):
    out = workspace / "teacher"
    _invoke(train, ["teacher", "--config", _config(workspace, 1), "--out", out])
    assert checkpoint.load(out / "last.pt")["epoch"] == 1
    # A longer schedule continues from epoch 1 instead of starting over.
    with caplog.at_level("INFO"):
        _invoke(train, ["teacher", "--config", _config(workspace, 2), "--out", out])
    assert "resuming" in caplog.text and checkpoint.load(out / "last.pt")["epoch"] == 2
    stamp = (out / "last.pt").stat().st_mtime_ns
    _invoke(train, ["teacher", "--config", _config(workspace, 2), "--out", out])  # finished: nothing redone
    assert (out / "last.pt").stat().st_mtime_ns == stamp

    student_out = workspace / "student"
    _invoke(train, ["student", "--teacher", out / "best.pt", "--config", _config(workspace, 1), "--out", student_out])
    assert (student_out / "best.pt").is_file()

    _invoke(export, [student_out / "best.pt", "--out", workspace / "model"])
    card = json.loads((workspace / "model" / "model_card.json").read_text())
    for name, digest in card["sha256"].items():
        assert hashlib.sha256((workspace / "model" / name).read_bytes()).hexdigest() == digest
    assert card["outputs"] == ["expr_logits", "va"] and card["arch_kwargs"] == {"backbone": "tiny", "with_va": True}
    model = DeployedStudent(checkpoint.load_model(student_out / "best.pt")[0]).eval()
    model.load_state_dict(torch.load(workspace / "model" / "student.pt", weights_only=True))
    images = torch.rand(3, 3, 112, 112) * 255  # batch 3 differs from the export batch: dynamic axis
    session = ort.InferenceSession(str(workspace / "model" / "student.onnx"))
    expr_onnx, va_onnx = session.run(["expr_logits", "va"], {"images": images.numpy()})
    with torch.no_grad():
        expr_torch, va_torch = model(images)
    np.testing.assert_allclose(expr_onnx, expr_torch.numpy(), atol=1e-4)
    np.testing.assert_allclose(va_onnx, va_torch.numpy(), atol=1e-4)


def test_bad_inputs_exit_with_one_line_errors(workspace):
    bad = workspace / "bad.toml"
    bad.write_text('learning_rate = 0.1\n')
    result = CliRunner().invoke(train, ["teacher", "--config", str(bad)])
    assert result.exit_code == 2 and f"{bad}: unknown key 'learning_rate'" in result.output
    result = CliRunner().invoke(train, ["student", "--config", str(_config(workspace, 1))])
    assert result.exit_code == 2 and "exactly one of --teacher" in result.output


def test_eval_scores_a_results_table(workspace):
    aff = workspace / "data" / "affwild2"
    rows = {"video_path": [], "frame_index": [], "face_index": []}
    probs, va = [], []
    expr_file = sorted(aff.glob("EXPR_Set/Validation_Set/*.txt"))[0]
    va_file = aff / "VA_Set" / "Validation_Set" / expr_file.name
    labels = [int(line) for line in expr_file.read_text().splitlines()[1:]]
    values = [[float(v) for v in line.split(",")] for line in va_file.read_text().splitlines()[1:]]
    for frame in range(len(labels) - 1):  # the last annotated frame has no row: an error
        rows["video_path"].append(f"/videos/{expr_file.stem}.mp4")
        rows["frame_index"].append(frame)
        rows["face_index"].append(0)
        probs.append(np.eye(7)[labels[frame]])
        va.append(values[frame])
    probs, va = np.array(probs, np.float32), np.array(va, np.float32)
    columns = {f"p_{n}": probs[:, i] for i, n in enumerate(
        ["neutral", "anger", "disgust", "fear", "happiness", "sadness", "surprise"])}
    table = pa.table({**rows, **columns, "valence": va[:, 0], "arousal": va[:, 1]})
    pq.write_table(table, workspace / "results.parquet")
    result = _invoke(eval_cmd, [workspace / "results.parquet", "--affwild2", aff])
    metrics = json.loads(result.output)
    n = len(labels)
    assert metrics["missing_frames"] == 2 and metrics["expr_frames"] == n
    assert metrics["expr_accuracy"] == pytest.approx((n - 1) / n)
    assert 0.9 < metrics["ccc_valence"] < 1.0  # all exact but one frame predicted as 0.0


def test_student_of_the_external_fer_teacher(workspace):
    """``--external-teacher``: the project's FER2013 scorer supplies expression soft labels."""
    config = workspace / "external.toml"
    config.write_text(SMOKE.format(epochs=1).replace("steps_per_epoch = 3", "steps_per_epoch = 2"))
    out = workspace / "fer-student"
    _invoke(train, ["student", "--external-teacher", "fer-minixception", "--config", config, "--out", out])
    assert checkpoint.load(out / "last.pt")["epoch"] == 1
    # Every model sees the deployment's 112x112 crop: a smaller training crop is a config error.
    small = workspace / "small.toml"
    small.write_text("image_size = 48\n" + SMOKE.format(epochs=1))  # top level, before [data]
    result = CliRunner().invoke(train, ["student", "--external-teacher", "fer-minixception",
                                        "--config", small, "--out", workspace / "x"])
    assert result.exit_code == 2 and "'image_size' must be 112" in result.output


def test_training_in_a_batch_log_is_one_line_per_epoch_without_bar_redraws(workspace):
    """stderr to a file or pipe, as a batch job has it: no tqdm redraws (carriage returns), and the
    epoch lines, the only progress a log can use, shown without ``-v``."""
    out = workspace / "logged"
    run = subprocess.run([sys.executable, "-m", "annotator", "train", "teacher", "--config", str(_config(workspace, 2)),
                          "--out", str(out)], capture_output=True, text=True, cwd=workspace, timeout=600)
    assert run.returncode == 0, run.stderr
    assert "\r" not in run.stderr
    epochs = [line for line in run.stderr.splitlines() if "training.loops: epoch " in line]
    assert [line.split("epoch ")[1].split(":")[0] for line in epochs] == ["1/2", "2/2"], run.stderr
    assert all(line.rstrip().endswith(" s)") and "loss " in line for line in epochs), epochs

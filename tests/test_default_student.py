"""The shipped default student: its provenance, its contract, and the script that built it."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import torch

from annotator.config import DEFAULT_SCORER, RunConfig
from annotator.run import run
from annotator.writer import read_metadata
from engines.decoders import Sampling
from engines.factory import create_scorer
from engines.registry import get_entry
from engines.sources import sha256_file
from training.default_student import collect_faces

WEIGHTS = Path(__file__).resolve().parents[1] / "engines" / "weights" / "student-fer-distilled"


def test_default_scorer_is_the_shipped_student():
    entry = get_entry(DEFAULT_SCORER)
    assert entry.name == "student-fer-distilled" and entry.architecture == "student"
    assert sha256_file(WEIGHTS / "student.pt") == entry.sha256
    card = json.loads((WEIGHTS / "model_card.json").read_text())
    assert card["sha256"]["student.pt"] == entry.sha256
    assert card["outputs"] == ["expr_logits"] and card["va"] is None and not entry.has_va
    assert "no VA targets" in card["training_data"]
    assert 0 < card["metrics"]["top1_agreement_with_teacher_test"] <= 1
    # It sees the crops annotate run cuts (no 1.2x zoom), and its card says so.
    assert card["input"]["preprocessing"]["resize"] is None
    assert card["arch_kwargs"]["backbone"] == "mobilenetv2-half"


def test_the_card_judges_the_student_on_human_labels_against_the_right_baselines():
    """Held-out people's human labels: the student beats the majority class and its teacher,
    and is faster per crop than the teacher (measured by the build, recorded in the card)."""
    metrics = json.loads((WEIGHTS / "model_card.json").read_text())["metrics"]
    test = metrics["human_labelled_test"]
    assert test["faces"] >= 1000 and sum(test["class_counts"].values()) == test["faces"]
    student, teacher, majority = test["student"], test["teacher_fer_minixception"], test["majority_baseline"]
    assert majority["class"] == max(test["class_counts"], key=test["class_counts"].get)
    assert majority["accuracy"] == round(test["class_counts"][majority["class"]] / test["faces"], 4)
    assert student["accuracy"] >= teacher["accuracy"] and student["macro_f1"] > teacher["macro_f1"]
    assert student["macro_f1"] > majority["macro_f1"]
    assert metrics["crops_per_s_onnxrt_cpu_1_thread"] > metrics["teacher_crops_per_s_onnxrt_cpu_1_thread"]


def test_student_agrees_with_its_teacher_on_unseen_people():
    """LFW faces 80-99 were never trained on; the card's number must be reproducible."""
    card = json.loads((WEIGHTS / "model_card.json").read_text())
    faces = [f for f in collect_faces() if f[2] == "test"]
    crops = torch.from_numpy(np.stack([f[0] for f in faces])).permute(0, 3, 1, 2).float()
    student = create_scorer(DEFAULT_SCORER).predict(crops)[0].argmax(axis=1)
    teacher = create_scorer("fer-minixception").predict(crops)[0].argmax(axis=1)
    agreement = float(np.mean(student == teacher))
    assert abs(agreement - card["metrics"]["top1_agreement_with_teacher_test"]) < 0.02
    assert agreement > 1 / 7 + 0.1  # well above chance over 7 classes


def test_run_uses_the_student_and_says_valence_arousal_are_null(carphone, tmp_path):
    out = tmp_path / "student.parquet"
    run(RunConfig(inputs=(carphone,), out=out, workers=0, sampling=Sampling(every_n=30)), progress=False)
    table = pq.read_table(out)
    faces = table.filter(table.column("face_index").is_valid())
    assert len(faces) == 4 and faces.column("valence").null_count == 4
    scorer = next(m for m in read_metadata(out)["models"] if m["role"] == "scorer")
    assert scorer["name"] == "student-fer-distilled" and "null" in scorer["valence_arousal"]
    assert set(faces.column("model_id").to_pylist()) == {scorer["id"]}


def test_collect_faces_splits_real_faces():
    faces = collect_faces()
    splits = {s: sum(f[2] == s for f in faces) for s in ("train", "val", "test")}
    assert splits["test"] == 20 + 2 * 24 and splits["val"] == 10 + 2 * 24 and splits["train"] >= 200
    assert all(f[0].shape == (112, 112, 3) and f[0].dtype == np.uint8 for f in faces)

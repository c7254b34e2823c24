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
from training.datasets.images import FaceDataset
from training.default_student import FunctionMatchingFaces, collect_faces
from training.labels import MISSING, Sample

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


def test_function_matching_augmentation_changes_images_but_keeps_the_contract(tmp_path):
    import cv2

    rng = np.random.default_rng(0)
    samples = []
    for i in range(4):
        path = tmp_path / f"{i}.png"
        cv2.imwrite(str(path), rng.integers(0, 256, (112, 112, 3), dtype=np.uint8))
        samples.append(Sample(path, i, MISSING, MISSING))
    plain = FaceDataset(samples, 134, 112, train=True)
    augmented = FunctionMatchingFaces(samples, 134, 112, train=True)
    torch.manual_seed(0)
    image, expr, va = augmented[1]
    assert image.shape == (3, 112, 112) and image.dtype == torch.float32
    assert 0 <= float(image.min()) and float(image.max()) <= 255 and int(expr) == 1
    torch.manual_seed(0)
    assert not torch.equal(image, plain[1][0])

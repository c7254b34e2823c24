"""Labelled-photo folders (the muxspace/facial_expressions layout): labels, people, splits."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from engines.models.student import BACKBONES, EXPR_CLASSES, build_student
from training.datasets.labelled_photos import person_of, read_labelled_photos, split_of
from training.labels import AnnotationError


def _folder(tmp_path: Path, rows: list[tuple[str, str]]) -> Path:
    (tmp_path / "images").mkdir()
    (tmp_path / "data").mkdir()
    for name, _ in rows:
        Image.fromarray(np.full((250, 200, 3), 128, np.uint8)).save(tmp_path / "images" / name)
    lines = ["user.id,image,emotion", *(f"628,{name},{emotion}" for name, emotion in rows)]
    (tmp_path / "data" / "legend.csv").write_text("\n".join(lines) + "\n")
    return tmp_path


def test_words_map_onto_the_seven_classes_and_contempt_is_dropped(tmp_path):
    rows = [("Ann_Bee_0001.jpg", "happiness"), ("Ann_Bee_0002.jpg", "SAD"), ("Ann_Bee_0003.jpg", "contempt"),
            ("facial-expressions_1.jpg", "surprise"), ("Cy_Dee_0001.jpg", "neutral")]
    splits = read_labelled_photos(_folder(tmp_path, rows))
    samples = [s for split in splits.values() for s in split]
    by_name = {s.image.name: s for s in samples}
    assert set(by_name) == {"Ann_Bee_0001.jpg", "Ann_Bee_0002.jpg", "facial-expressions_1.jpg", "Cy_Dee_0001.jpg"}
    assert by_name["Ann_Bee_0002.jpg"].expr == EXPR_CLASSES.index("sadness")
    assert by_name["facial-expressions_1.jpg"].expr == EXPR_CLASSES.index("surprise")
    # The labelled face is the central one: the box is the photo's central half.
    assert by_name["Cy_Dee_0001.jpg"].box == (50, 62, 150, 188)


def test_every_photo_of_a_person_is_in_one_split():
    assert person_of("George_W_Bush_0012.jpg") == "George_W_Bush"
    assert person_of("facial-expressions_2868588k.jpg") == "facial-expressions_2868588k.jpg"
    people = [f"Person_{i}" for i in range(2000)]
    splits = [split_of(p) for p in people]
    assert splits == [split_of(p) for p in people]  # stable
    share = {s: splits.count(s) / len(people) for s in ("train", "val", "test")}
    assert abs(share["test"] - 0.15) < 0.03 and abs(share["val"] - 0.10) < 0.03


def test_an_unknown_word_or_a_missing_column_is_one_line(tmp_path):
    (tmp_path / "a").mkdir()
    with pytest.raises(AnnotationError, match="unknown expression 'joy'"):
        read_labelled_photos(_folder(tmp_path / "a", [("X_0001.jpg", "joy")]))
    folder = tmp_path / "b"
    folder.mkdir()
    (folder / "data").mkdir()
    (folder / "data" / "legend.csv").write_text("image,label\nx.jpg,happy\n")
    with pytest.raises(AnnotationError, match="missing columns: emotion"):
        read_labelled_photos(folder)


def test_the_half_resolution_backbone_keeps_mobilenetv2s_weights_and_crop():
    half, full = build_student("mobilenetv2-half"), build_student("mobilenetv2")
    assert half.state_dict().keys() == full.state_dict().keys()  # ImageNet --init weights still load
    half.load_state_dict(full.state_dict())
    half.eval(), full.eval()
    crop = torch.rand(2, 3, 112, 112) * 255
    with torch.no_grad():
        # The same network, on the 112 crop averaged down to 56.
        features = half.backbone(crop)
        assert torch.allclose(features, full.backbone(torch.nn.functional.avg_pool2d(crop, 2)))
        assert not torch.allclose(features, full.backbone(crop))
        expr, va = half(crop)
    assert expr.shape == (2, 7) and va.shape == (2, 2, 20)
    assert "mobilenetv2-half" in BACKBONES

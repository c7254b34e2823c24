"""Readers on fixtures in the exact release formats, the stream routing, and the samplers."""

import json
import logging
from dataclasses import replace

import numpy as np
import pytest
import torch
from PIL import Image

from training.datasets.affectnet import read_affectnet
from training.datasets.affwild2 import read_affwild2
from training.datasets.afewva import read_afewva
from training.datasets.expw import read_expw
from training.datasets.alignment import box_landmarks
from training.datasets.images import FaceDataset
from training.labels import MISSING, AnnotationError
from training.samplers import balanced_sampler, expr_weights, stream_weights, va_weights
from training.labels import Sample


def _image(path, size=(40, 30)):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, (200, 100, 50)).save(path)


@pytest.fixture()
def affwild2(tmp_path):
    root = tmp_path / "aw2"
    for frame in (1, 2, 3):  # frame 4 has no crop (the release's detector found no face)
        _image(root / "cropped_aligned" / "v1" / f"{frame:05d}.jpg")
    (root / "EXPR_Set" / "Train_Set").mkdir(parents=True)
    (root / "VA_Set" / "Train_Set").mkdir(parents=True)
    (root / "EXPR_Set" / "Train_Set" / "v1.txt").write_text(
        "Neutral,Anger,Disgust,Fear,Happiness,Sadness,Surprise\n0\n-1\n4\n6\n")
    (root / "VA_Set" / "Train_Set" / "v1.txt").write_text("valence,arousal\n-5,-5\n0.5,-0.5\n0.1,0.2\n0.3,0.3\n")
    return root


def test_affwild2_merges_shared_frames_and_skips_missing_crops(affwild2, caplog):
    with caplog.at_level(logging.WARNING):
        expr, va = read_affwild2(affwild2, "Train_Set")
    frames = affwild2 / "cropped_aligned" / "v1"
    assert [(s.image, s.expr, s.valence, s.arousal) for s in expr] == [
        (frames / "00001.jpg", 0, MISSING, MISSING), (frames / "00003.jpg", 4, 0.1, 0.2)]
    assert [(s.image, s.expr, s.valence, s.arousal) for s in va] == [
        (frames / "00002.jpg", MISSING, 0.5, -0.5), (frames / "00003.jpg", 4, 0.1, 0.2)]
    assert "skipped 1 annotated frames" in caplog.text


def test_affwild2_malformed_line_names_file_and_line(affwild2):
    path = affwild2 / "VA_Set" / "Train_Set" / "v1.txt"
    path.write_text("valence,arousal\n0.1,0.2\n0.1;0.2\n")
    with pytest.raises(AnnotationError, match=rf"^{path}:3: expected 'valence,arousal'"):
        read_affwild2(affwild2, "Train_Set")


def test_affectnet_remaps_and_drops_unusable_rows(tmp_path):
    for name in ("a.jpg", "b.jpg", "c.jpg", "d.jpg"):
        _image(tmp_path / "img" / "1" / name)
    csv_path = tmp_path / "training.csv"
    csv_path.write_text(
        "subDirectory_filePath,face_x,face_y,face_width,face_height,facial_landmarks,expression,valence,arousal\n"
        '1/a.jpg,2,3,20,10,"1.0;2.0",1,0.5,0.25\n'  # happy -> 4
        '1/b.jpg,0,0,40,30,"1.0;2.0",7,-0.5,0.1\n'  # contempt: no class, keeps VA
        '1/c.jpg,0,0,40,30,"1.0;2.0",9,-2,-2\n'  # uncertain without VA: dropped
        '1/d.jpg,0,0,40,30,"1.0;2.0",6,-2,-2\n')  # anger -> 1, no VA
    samples = read_affectnet(csv_path, tmp_path / "img")
    assert [(s.image.name, s.expr, s.valence, s.arousal) for s in samples] == [
        ("a.jpg", 4, 0.5, 0.25), ("b.jpg", MISSING, -0.5, 0.1), ("d.jpg", 1, MISSING, MISSING)]
    assert samples[0].box == (2, 3, 22, 13)


def _affectnet_release_rows(tmp_path) -> list[str]:
    """Rows as the release writes them: hashed file names, 68 unquoted ';'-joined landmarks."""
    landmarks = ";".join(f"{30 + i * 0.37:.2f}" for i in range(136))
    rows = [("689/737db2483489148d783ef278f43f486c0a97e140fc4b6b61b84363ca.jpg", "134,134,899,899", 1,
             "0.785714", "-0.055556"),  # happy -> 4
            ("392/c4db2f9b7e4b422d14b6e038f0cdc3ecee239b55326e9181ee4520f9.JPG", "20,20,173,173", 3,
             "-0.0307", "0.380952"),  # surprise -> 6, upper-case suffix as some release files have
            ("468/21772b68dc8c2a11678c8739eaa9599e2ac1e83c6d4d8aa79fc67f1e.png", "0,0,40,30", 8, "-2", "-2")]
    for name, *_ in rows:
        _image(tmp_path / "img" / name)
    return [f"{name},{box},{landmarks},{code},{valence},{arousal}" for name, box, code, valence, arousal in rows]


@pytest.mark.parametrize("header", [True, False], ids=["training.csv-with-header", "validation.csv-no-header"])
def test_affectnet_reads_the_release_with_or_without_header(tmp_path, header):
    rows = _affectnet_release_rows(tmp_path)
    first = ("subDirectory_filePath,face_x,face_y,face_width,face_height,facial_landmarks,expression,valence,"
             "arousal\n" if header else "")
    csv_path = tmp_path / ("training.csv" if header else "validation.csv")
    csv_path.write_text(first + "\n".join(rows) + "\n")
    samples = read_affectnet(csv_path, tmp_path / "img")
    # The "none" row (code 8, no VA) has no usable label: two of three rows are kept either way.
    assert [(s.image.name[:6], s.expr, s.valence, s.arousal, s.box) for s in samples] == [
        ("737db2", 4, 0.785714, -0.055556, (134, 134, 1033, 1033)),
        ("c4db2f", 6, -0.0307, 0.380952, (20, 20, 193, 193))]
    # A malformed row is reported at its physical line in both forms.
    csv_path.write_text(first + rows[0] + "\n" + rows[1].replace(",3,", ",x,") + "\n")
    with pytest.raises(AnnotationError, match=rf"^{csv_path}:{3 if header else 2}: non-numeric"):
        read_affectnet(csv_path, tmp_path / "img")


def test_affectnet_rejects_a_first_row_that_is_neither_header_nor_data(tmp_path):
    csv_path = tmp_path / "validation.csv"
    csv_path.write_text("path,x,y,w,h,landmarks,expression,valence,arousal\n")  # a foreign header
    with pytest.raises(AnnotationError, match=rf"^{csv_path}:1: missing columns \['subDirectory_filePath'"):
        read_affectnet(csv_path, tmp_path)
    csv_path.write_text("1/a.txt,0,0,4,4,x,1,0,0\n")  # not an image path: not taken for a data row
    with pytest.raises(AnnotationError, match=rf"^{csv_path}:1: missing columns"):
        read_affectnet(csv_path, tmp_path)


def test_affectnet_malformed_row(tmp_path):
    csv_path = tmp_path / "training.csv"
    csv_path.write_text("subDirectory_filePath,face_x,face_y,face_width,face_height,facial_landmarks,expression,"
                        "valence,arousal\n1/a.jpg,0,0,4,4,x,12,0,0\n")
    with pytest.raises(AnnotationError, match=rf"^{csv_path}:2: expression code 12"):
        read_affectnet(csv_path, tmp_path)


def test_expw_remaps_labels_and_counts_missing_images(tmp_path, caplog):
    _image(tmp_path / "origin" / "x.jpg")
    label_list = tmp_path / "label.lst"
    label_list.write_text("x.jpg 0 5 6 30 25 80.1 0\nx.jpg 1 1 2 10 9 50.0 6\ngone.jpg 0 1 1 9 9 70.2 3\n")
    with caplog.at_level(logging.WARNING):
        samples = read_expw(label_list, tmp_path / "origin")
    assert [(s.expr, s.box) for s in samples] == [(1, (6, 5, 30, 25)), (0, (2, 1, 10, 9))]
    assert "skipped 1 samples whose image file is missing" in caplog.text
    label_list.write_text("x.jpg 0 5 6 30 25 80.1 0\nx.jpg 0 5 6 30 25 0\n")
    with pytest.raises(AnnotationError, match=rf"^{label_list}:2: expected 8 fields"):
        read_expw(label_list, tmp_path / "origin")


def test_afewva_scales_to_unit_range_and_boxes_landmarks(tmp_path):
    clip = tmp_path / "001"
    _image(clip / "00000.png", (100, 100))
    landmarks = [[20 + i % 2 * 50, 30 + i % 3 * 20] for i in range(68)]  # box x 20..70, y 30..70
    (clip / "001.json").write_text(json.dumps(
        {"actor": "a", "video_id": "001", "frames": {"00000": {"valence": 5, "arousal": -10, "landmarks": landmarks}}}))
    [sample] = read_afewva(tmp_path)
    assert (sample.expr, sample.valence, sample.arousal) == (MISSING, 0.5, -1.0)
    assert sample.box == (15, 26, 75, 74)  # grown by 10 % of 50 x 40 per side
    # Aligned on the five points of its 68: eye contours' means (36-41, 42-47), nose tip 30, mouth 48, 54.
    points = np.array(landmarks, float)
    expected = [points[36:42].mean(0), points[42:48].mean(0), points[30], points[48], points[54]]
    assert np.allclose(sample.landmarks, expected)
    (clip / "001.json").write_text('{"frames": {\n "00000": {"valence": 11,}}}')
    with pytest.raises(AnnotationError, match=rf"^{clip / '001.json'}:2: invalid JSON"):
        read_afewva(tmp_path)


def test_face_dataset_contract(affwild2):
    expr, _ = read_affwild2(affwild2, "Train_Set")
    with pytest.raises(ValueError, match="no landmarks"):
        FaceDataset(expr, train=True)  # the detector never runs inside a DataLoader worker
    # A face filling the 40x30 image: the template placed in its box, as for an undetected face.
    aligned = [replace(s, landmarks=tuple(map(tuple, box_landmarks((0, 0, 40, 30)).tolist()))) for s in expr]
    image, label, va = FaceDataset(aligned, train=True)[1]
    assert image.shape == (3, 112, 112) and image.dtype == torch.float32
    assert image[:, 56, 56].tolist() == pytest.approx([200, 100, 50], abs=2)  # RGB order, 0..255 scale
    assert int(label) == 4 and va.tolist() == pytest.approx([0.1, 0.2])


def test_inverse_frequency_weights():
    assert expr_weights(np.array([0, 0, 0, 1, MISSING])).tolist() == pytest.approx([1 / 3, 1 / 3, 1 / 3, 1, 0])
    # First two share the 20x20 cell [0, 0.1) x [0, 0.1).
    weights = va_weights(np.array([0.01, 0.02, 0.9, MISSING]), np.array([0.01, 0.09, -0.9, MISSING]))
    assert weights.tolist() == pytest.approx([0.5, 0.5, 1.0, 0.0])
    both = [Sample(image=None, expr=0, valence=0.0, arousal=0.0), Sample(image=None, expr=0, valence=0.5, arousal=0.5)]
    assert stream_weights(both, use_expr=True, use_va=True).tolist() == pytest.approx([1.5, 1.5])


def test_sampler_balances_a_skewed_set():
    labels = np.array([0] * 90 + [1] * 10)
    sampler = balanced_sampler(expr_weights(labels), 20_000, torch.Generator().manual_seed(0))
    share = float(np.mean(labels[list(sampler)] == 1))
    assert share == pytest.approx(0.5, abs=0.02)  # 10 % in the data, half of the draws

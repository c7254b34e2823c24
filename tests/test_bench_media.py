"""The multi-face benchmark clip: real faces of four sizes, its ground truth, and recall scoring."""

from __future__ import annotations

import json
from pathlib import Path

import av
import numpy as np
import pytest

from benchmarks.media import FACES, box_iou, detect_boxes, load_truth, multiface_clip, recall
from engines.factory import create_detector

WIDTH, HEIGHT, FRAMES, FPS = 640, 360, 60, 30


@pytest.fixture(scope="module")
def clip(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return multiface_clip(tmp_path_factory.mktemp("multiface") / "four.mp4", frames=FRAMES, width=WIDTH,
                          height=HEIGHT, fps=FPS)


@pytest.fixture(scope="module")
def decoded(clip: Path) -> np.ndarray:
    with av.open(str(clip)) as container:
        stream = container.streams.video[0]
        assert stream.codec_context.name == "h264" and stream.codec_context.pix_fmt == "yuv420p"
        assert stream.average_rate == FPS
        return np.stack([f.to_ndarray(format="rgb24") for f in container.decode(stream)])


@pytest.fixture(scope="module")
def truth(clip: Path) -> list[list[tuple[str, np.ndarray]]]:
    return load_truth(clip)


def test_clip_decodes_with_pyav(clip: Path, decoded: np.ndarray):
    assert decoded.shape == (FRAMES, HEIGHT, WIDTH, 3)
    assert not list(clip.parent.glob(".*tmp*")), "temporary files left behind"
    # Real pictures, not a flat fill: the background and the faces have texture, and the talking
    # face changes the picture from frame to frame.
    assert decoded[0].std() > 20
    assert np.abs(decoded[1:].astype(int) - decoded[:-1]).mean() > 0.5


def test_truth_has_four_faces_of_increasing_size_inside_the_frame(clip: Path, truth):
    data = json.loads(clip.with_suffix(".json").read_text())
    assert (data["width"], data["height"], data["fps"]) == (WIDTH, HEIGHT, FPS)
    assert len(truth) == FRAMES
    names = [face.name for face in FACES]
    for faces in truth:
        assert [name for name, _ in faces] == names
        boxes = np.stack([box for _, box in faces])
        heights = boxes[:, 3] - boxes[:, 1]
        assert (np.diff(heights) > 0).all() and heights[-1] > 4 * heights[0], heights
        assert (boxes[:, :2] >= 0).all() and (boxes[:, 2] <= WIDTH).all() and (boxes[:, 3] <= HEIGHT).all()
        overlap = box_iou(boxes, boxes) - np.eye(len(boxes))
        assert (overlap == 0).all(), "faces overlap"
    # Nominal heights 48/80/160/320 at 720p, halved here (the carphone's own head moves).
    first = np.stack([box for _, box in truth[0]])
    np.testing.assert_allclose(first[:, 3] - first[:, 1], [24, 40, 80, 160], rtol=0.15)


def test_faces_drift_slowly(truth):
    boxes = np.array([[box for _, box in faces] for faces in truth])  # (frames, faces, 4)
    centres = (boxes[..., :2] + boxes[..., 2:]) / 2
    steps = np.linalg.norm(np.diff(centres, axis=0), axis=2)
    assert steps.max() < 0.01 * WIDTH  # a few pixels per frame at most
    assert (steps.sum(axis=0) > 5).all(), "every face moves"


def test_detector_finds_the_two_biggest_faces(decoded: np.ndarray, truth):
    detector, _ = create_detector("retinaface-mnv2", backend="onnxrt", det_size=1024, threshold=0.9)
    found = detect_boxes(detector, decoded)
    scores = recall(truth, found)
    assert scores[FACES[-1].name] >= 0.95 and scores[FACES[-2].name] >= 0.95, scores
    # The true boxes are where the detector puts them, not merely near: the mapping is right.
    true = [np.stack([box for _, box in faces]) for faces in truth]
    best = np.array([box_iou(t[-2:], f).max(axis=1, initial=0) for f, t in zip(found, true)])
    assert np.median(best) > 0.75, np.median(best, axis=0)
    # Nothing in the background or on a patch's edge looks like a face to it.
    stray = sum(int((box_iou(f, t).max(axis=1, initial=0) < 0.3).sum()) for f, t in zip(found, true))
    assert stray <= FRAMES // 20, stray


def _truth(*boxes_per_frame):
    return [[(name, np.asarray(box, np.float32)) for name, box in frame] for frame in boxes_per_frame]


def test_recall_counts_matches_per_face_and_overall():
    a, b = [0, 0, 10, 10], [20, 20, 30, 30]
    truth = _truth([("a", a), ("b", b)], [("a", a), ("b", b)], [("a", a), ("b", b)])
    found = [
        np.array([[0, 0, 10, 9], [21, 21, 31, 31]]),  # both found (IoU 0.9 and 0.68)
        np.array([[5, 5, 15, 15]]),  # a's IoU is 25/175: not found
        np.zeros((0, 4)),
    ]
    assert recall(truth, found) == pytest.approx({"a": 1 / 3, "b": 1 / 3, "all": 1 / 3, "asked": 1 / 3})
    # "asked": only the faces at least --min-face on their shorter side count (both are 10 px).
    assert recall(truth, found, min_side=10)["asked"] == pytest.approx(1 / 3)
    assert np.isnan(recall(truth, found, min_side=11)["asked"])
    small = _truth([("a", a), ("c", [40, 40, 44, 48])])  # c: 4 px wide, below --min-face 8
    assert recall(small, [np.array([a])], min_side=8) == pytest.approx({"a": 1.0, "c": 0.0, "all": 0.5, "asked": 1.0})
    # Anything with .boxes (the detector's Detections) works too; the IoU bar is a parameter.
    boxed = [type("Found", (), {"boxes": f})() for f in found]
    assert recall(truth, boxed, iou=0.1)["a"] == pytest.approx(2 / 3)
    with pytest.raises(ValueError):
        recall(truth, found[:2])


def test_recall_matches_each_box_once_and_as_many_faces_as_possible():
    # One box over two identical faces finds one of them, not both.
    same = _truth([("a", [0, 0, 10, 10]), ("b", [0, 0, 10, 10])])
    assert recall(same, [np.array([[0, 0, 10, 10]])])["all"] == 0.5
    # f1 fits a best (0.90) but also b (0.74); f2 fits only a (0.54). Greedy by IoU would give
    # f1 to a and leave b unfound; the maximum matching finds both.
    overlapping = _truth([("a", [0, 0, 10, 10]), ("b", [2, 0, 12, 10])])
    found = [np.array([[0.5, 0, 10.5, 10], [-3, 0, 7, 10]])]
    assert recall(overlapping, found) == {"a": 1.0, "b": 1.0, "all": 1.0, "asked": 1.0}


def test_every_face_is_where_the_truth_says_at_720p(tmp_path: Path):
    """At full resolution the detector finds all four faces, the mirrored smallest included."""
    frames = 6
    large = multiface_clip(tmp_path / "large.mp4", frames=frames, width=1280, height=720)
    with av.open(str(large)) as container:
        decoded = np.stack([f.to_ndarray(format="rgb24") for f in container.decode(video=0)])
    truth = load_truth(large)
    heights = [box[3] - box[1] for _, box in truth[0]]
    np.testing.assert_allclose(heights, [face.height_720p for face in FACES], rtol=0.15)
    detector, _ = create_detector("retinaface-mnv2", backend="onnxrt", det_size=1280, threshold=0.9)
    scores = recall(truth, detect_boxes(detector, decoded, batch=2), iou=0.6)
    assert min(scores.values()) >= (frames - 1) / frames, scores
    # The same seed at half the size: every box scales with the frame (the drift is in fractions
    # of the frame; positions are rounded to whole pixels).
    small = load_truth(multiface_clip(tmp_path / "small.mp4", frames=frames, width=640, height=360))
    for s, l in zip(small, truth):
        for (name_s, box_s), (name_l, box_l) in zip(s, l):
            assert name_s == name_l
            np.testing.assert_allclose(box_l, 2 * box_s, atol=3)

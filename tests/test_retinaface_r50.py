"""The plain-torch RetinaFace-ResNet50 against the real upstream network (retinaface-pytorch)."""

import io
import zipfile
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
import torch

from engines.models.retinaface_r50 import RetinaFaceResNet50, convert_upstream, load_upstream_file
from fixtures.formula_weights import formula_weights  # tests/fixtures: the weights the fixture was made with

FIXTURE = Path(__file__).parent / "fixtures" / "retinaface_r50_upstream.npz"


@pytest.fixture(scope="module")
def upstream() -> dict[str, np.ndarray]:
    with np.load(FIXTURE) as z:
        return dict(z)


@pytest.fixture(scope="module")
def model() -> RetinaFaceResNet50:
    net = RetinaFaceResNet50()
    net.load_state_dict(formula_weights(net.state_dict()), strict=True)
    return net.eval()


def test_keys_and_shapes_match_upstream(
    model: RetinaFaceResNet50, upstream: dict[str, np.ndarray]
) -> None:
    ours = model.state_dict()
    assert list(ours) == upstream["keys"].tolist()
    for key, padded in zip(upstream["keys"].tolist(), upstream["shapes"], strict=True):
        assert tuple(ours[key].shape) == tuple(int(d) for d in padded if d >= 0), key


def test_outputs_match_upstream(model: RetinaFaceResNet50, upstream: dict[str, np.ndarray]) -> None:
    # Upstream's forward takes albumentations-normalised input; ours takes the raw 0..255 pixels
    # the fixture normalised, so this also checks the in-module normalisation. Upstream returns
    # class logits; its predict_jsons applies softmax and takes column 1, as our module does.
    with torch.inference_mode():
        boxes, landmarks, scores = model(torch.from_numpy(upstream["pixels"]))
    face_prob = torch.from_numpy(upstream["conf"]).softmax(-1)[..., 1].numpy()
    np.testing.assert_allclose(boxes.numpy(), upstream["loc"], atol=1e-4, rtol=0)
    np.testing.assert_allclose(landmarks.numpy(), upstream["landmarks"], atol=1e-4, rtol=0)
    np.testing.assert_allclose(scores.numpy(), face_prob, atol=1e-4, rtol=0)
    # 64x96 input: (8*12 + 4*6 + 2*3) cells x 2 anchors.
    assert boxes.shape == (1, 252, 4)
    # Non-degenerate outputs, so the comparison above can fail.
    assert face_prob.std() > 0.05


def test_checkpoint_round_trip(model: RetinaFaceResNet50, tmp_path: Path) -> None:
    state = model.state_dict()
    bare = tmp_path / "retinaface_resnet50.pth"
    torch.save(state, bare)
    # The release asset: a zip holding that one torch file.
    release = tmp_path / "retinaface_resnet50_2020-07-20-f168fae3c.zip"
    with zipfile.ZipFile(release, "w") as zf:
        zf.write(bare, bare.name)
    lightning = {"state_dict": {f"model.{k}": v for k, v in state.items()}, "epoch": 3}
    candidates = {
        "bare": convert_upstream(torch.load(bare, weights_only=True)),
        "release zip": load_upstream_file(release),
        "unzipped": load_upstream_file(bare),
        "lightning": convert_upstream(lightning),
    }
    for name, converted in candidates.items():
        fresh = RetinaFaceResNet50()
        fresh.load_state_dict(converted, strict=True)
        for key, tensor in fresh.state_dict().items():
            assert torch.equal(tensor, state[key]), f"{name}: {key}"


def test_convert_rejects_non_tensor() -> None:
    with pytest.raises(ValueError, match="conv1.weight"):
        convert_upstream({"body.conv1.weight": [1.0]})


def test_onnx_matches_torch(model: RetinaFaceResNet50) -> None:
    buf = io.BytesIO()
    names = ["boxes", "landmarks", "scores"]
    torch.onnx.export(
        model,
        (torch.zeros(1, 3, 64, 64),),
        buf,
        opset_version=17,
        input_names=["images"],
        output_names=names,
        dynamic_axes={"images": {0: "batch", 2: "height", 3: "width"}}
        | {n: {0: "batch", 1: "anchors"} for n in names},
        dynamo=False,
    )
    session = ort.InferenceSession(buf.getvalue(), providers=["CPUExecutionProvider"])
    rng = np.random.default_rng(0)
    # A size other than the traced one proves height and width are dynamic.
    images = rng.uniform(0, 255, (2, 3, 96, 64)).astype(np.float32)
    got = session.run(None, {"images": images})
    with torch.inference_mode():
        want = model(torch.from_numpy(images))
    for name, g, w in zip(names, got, want, strict=True):
        assert g.shape == tuple(w.shape), name
        np.testing.assert_allclose(g, w.numpy(), atol=1e-4, rtol=0, err_msg=name)

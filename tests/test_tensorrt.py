"""The TensorRT backend: FP16 engines against the FP32 ONNX Runtime reference, and what runs without TRT.

The engine is built from an FP16 ONNX (a strongly typed network keeps the ONNX's precision), so
the FP16 tolerances below are checked twice: on the GPU against TensorRT (``trt`` tests, skipped
where TensorRT or CUDA is missing), and on any machine against ONNX Runtime running that same
FP16 ONNX on the CPU, which proves the export and the tolerances without a GPU.
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from types import SimpleNamespace

import cv2
import numpy as np
import onnx
import onnxruntime as ort
import pytest
import skimage.data
import torch

from engines.cache import Artifacts, cached, resolve
from engines.registry import ModelEntry, UrlSource, get_entry, list_models
from engines.runtimes import default_backend, load_runtime
from engines.runtimes import tensorrt as trt_runtime
from engines.runtimes.derived import record_digest

# FP16 keeps 11 significant bits (a relative step of 4.9e-4); through the ~50 layers of these
# networks the error grows to about 1 % of an output's magnitude. Measured with ONNX Runtime
# running the FP16 ONNX on the CPU against FP32, on the inputs below: scores 5e-4, FER logits
# 0.026, box deltas 0.05 and landmark deltas up to 0.11 (2 of 25,200 values above 0.1).
PROBABILITY_ATOL = 2e-2  # scores, softmax of logits, valence/arousal in [-1, 1]
# Box/landmark deltas decode as delta * 0.1 * anchor side (sizes: exp(delta * 0.2)), so 0.2 is
# 2 % of an anchor side (0.3 px at the 16 px anchors) and 4 % of a box size; raw logits share it.
REGRESSION_ATOL = 0.2
REGRESSION_RTOL = 2e-2
BOUNDED_OUTPUTS = frozenset({"scores", "va"})
DETECTOR_INPUT = (2, 3, 160, 192)  # two padded frames, sides multiples of 32
SCORER_INPUT = (4, 3, 112, 112)  # four aligned crops

TRT_SKIP = pytest.mark.skipif(
    not trt_runtime.tensorrt_available(),
    reason="needs the TensorRT Python package (not installable from PyPI here) and a CUDA GPU",
)


def _artifacts(entry: ModelEntry) -> Artifacts:
    """Resolved artifacts, or a skip for weights that only a download (no PyPI mirror) provides."""
    if isinstance(entry.source, UrlSource) and cached(entry) is None:
        pytest.skip(f"{entry.name}: weights come from {entry.source.url}, not fetchable offline")
    return resolve(entry)


def _model_input(entry: ModelEntry) -> np.ndarray:
    """float32 NCHW 0..255: a real face in the first sample (so scores are not all ~0), noise after."""
    shape = DETECTOR_INPUT if entry.kind == "detector" else SCORER_INPUT
    batch = np.random.default_rng(0).uniform(0, 255, size=shape).astype(np.float32)
    image = skimage.data.astronaut()  # 512x512 RGB; the face is around rows 30..230, cols 130..330
    if entry.kind == "scorer":
        image = image[30:230, 130:330]
    batch[0] = cv2.resize(image, (shape[3], shape[2]), interpolation=cv2.INTER_AREA).transpose(2, 0, 1)
    return batch


def _softmax(logits: np.ndarray) -> np.ndarray:
    shifted = np.exp(logits - logits.max(axis=-1, keepdims=True))
    return shifted / shifted.sum(axis=-1, keepdims=True)


def _assert_fp16_close(name: str, reference: np.ndarray, fp16: np.ndarray) -> None:
    assert fp16.shape == reference.shape, name
    fp16 = fp16.astype(np.float32)
    if name in BOUNDED_OUTPUTS:
        np.testing.assert_allclose(fp16, reference, atol=PROBABILITY_ATOL, rtol=0, err_msg=name)
        return
    if name.endswith("_logits"):
        np.testing.assert_allclose(_softmax(fp16), _softmax(reference), atol=PROBABILITY_ATOL, rtol=0, err_msg=name)
    np.testing.assert_allclose(fp16, reference, atol=REGRESSION_ATOL, rtol=REGRESSION_RTOL, err_msg=name)


@pytest.mark.trt
@TRT_SKIP
@pytest.mark.parametrize("entry", list_models(), ids=lambda e: e.name)
def test_tensorrt_matches_onnxruntime_within_fp16_tolerance(entry: ModelEntry) -> None:
    artifacts = _artifacts(entry)
    batch = torch.from_numpy(_model_input(entry))
    reference = load_runtime(artifacts, "onnxrt", "cpu")(batch)
    engine = load_runtime(artifacts, "tensorrt", "cuda:0")
    outputs = engine(batch)
    assert tuple(outputs) == entry.outputs
    for name in entry.outputs:
        _assert_fp16_close(name, reference[name].numpy(), outputs[name].cpu().numpy())
    # A second runtime reuses the cached engine file instead of building again.
    built = {path: path.stat().st_mtime_ns for path in artifacts.onnx.parent.glob("model.*.engine")}
    assert built
    load_runtime(artifacts, "tensorrt", "cuda:0")
    assert {path: path.stat().st_mtime_ns for path in artifacts.onnx.parent.glob("model.*.engine")} == built


@pytest.mark.trt
@TRT_SKIP
def test_tensorrt_keeps_outputs_on_the_gpu() -> None:
    artifacts = _artifacts(get_entry("retinaface-mnv2"))
    engine = load_runtime(artifacts, "tensorrt", "cuda:0")
    batch = torch.from_numpy(_model_input(artifacts.entry)).cuda()
    outputs = engine(batch)
    assert all(value.is_cuda and value.dtype == torch.float32 for value in outputs.values())
    assert outputs["scores"].shape[0] == DETECTOR_INPUT[0]


# ---- without TensorRT ----


@pytest.mark.parametrize("entry", list_models(), ids=lambda e: e.name)
def test_fp16_onnx_for_the_engine_agrees_with_fp32(entry: ModelEntry, tmp_path: Path) -> None:
    """The FP16 ONNX that TensorRT builds from, run by ONNX Runtime on the CPU."""
    artifacts = _artifacts(entry)
    fp16_path = tmp_path / "model.fp16.onnx"
    trt_runtime._export_fp16_onnx(artifacts, fp16_path, torch.device("cpu"))
    graph = onnx.load(str(fp16_path)).graph
    (model_input,) = graph.input
    assert model_input.name == "input"
    assert model_input.type.tensor_type.elem_type == onnx.TensorProto.FLOAT16
    dynamic = [d.dim_param for d in model_input.type.tensor_type.shape.dim]
    assert dynamic == (["batch", "", "height", "width"] if entry.kind == "detector" else ["batch", "", "", ""])
    assert tuple(o.name for o in graph.output) == entry.outputs
    batch = _model_input(entry)
    reference = load_runtime(artifacts, "onnxrt", "cpu")(torch.from_numpy(batch))
    session = ort.InferenceSession(str(fp16_path), providers=["CPUExecutionProvider"])
    for name, value in zip(entry.outputs, session.run(list(entry.outputs), {"input": batch.astype(np.float16)})):
        _assert_fp16_close(name, reference[name].numpy(), value)


def test_engine_cache_key_follows_onnx_gpu_and_tensorrt_version(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
) -> None:
    """An engine is valid only for one FP16 ONNX, one GPU model, one TensorRT version and one profile."""
    gpu_name = {"value": "NVIDIA H100 80GB HBM3"}
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: gpu_name["value"])
    artifacts = Artifacts(get_entry("retinaface-mnv2"), tmp_path / "model.pt", tmp_path / "model.onnx", {})
    fp16_onnx = tmp_path / "model.fp16.onnx"  # present and verified, so no export (and no GPU) is needed
    fp16_onnx.write_bytes(b"fp16 graph v1")
    record_digest(fp16_onnx)
    # _engine_path needs only the module's version, the device and the profile; no TensorRT import.
    runtime = object.__new__(trt_runtime.TensorRTRuntime)
    runtime.trt = SimpleNamespace(__version__="10.9.0.34")
    runtime.device = torch.device("cuda:0")
    runtime.shapes = trt_runtime.default_shapes("detector")

    path = runtime._engine_path(artifacts)
    assert path.parent == tmp_path and path.suffix == ".engine"
    digest = hashlib.sha256(b"fp16 graph v1").hexdigest()[:16]
    assert digest in path.name and "NVIDIA_H100_80GB_HBM3" in path.name and "10.9.0.34" in path.name

    keys = {path.name}
    fp16_onnx.write_bytes(b"fp16 graph v2")
    record_digest(fp16_onnx)
    keys.add(runtime._engine_path(artifacts).name)
    gpu_name["value"] = "NVIDIA A100-SXM4-40GB"
    keys.add(runtime._engine_path(artifacts).name)
    runtime.trt = SimpleNamespace(__version__="10.13.0.35")
    keys.add(runtime._engine_path(artifacts).name)
    runtime.shapes = trt_runtime.default_shapes("detector", batch_size=64, det_size=1280)
    keys.add(runtime._engine_path(artifacts).name)
    assert len(keys) == 5


@pytest.mark.parametrize(
    ("has_package", "has_cuda", "expected"),
    [(True, True, True), (False, True, False), (True, False, False)],
)
def test_tensorrt_available_needs_the_package_and_a_gpu(
    monkeypatch: pytest.MonkeyPatch, has_package: bool, has_cuda: bool, expected: bool,
) -> None:
    real_find_spec = trt_runtime.importlib.util.find_spec

    def find_spec(name: str, *args: object):
        if name == "tensorrt":
            return SimpleNamespace(name=name) if has_package else None
        return real_find_spec(name, *args)

    monkeypatch.setattr(trt_runtime.importlib.util, "find_spec", find_spec)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: has_cuda)
    assert trt_runtime.tensorrt_available() is expected


@pytest.mark.parametrize(
    ("device", "trt_available", "expected"),
    [("cpu", True, "onnxrt"), ("cuda:0", True, "tensorrt"), ("cuda", False, "torch")],
)
def test_default_backend_prefers_tensorrt_on_a_gpu(
    monkeypatch: pytest.MonkeyPatch, device: str, trt_available: bool, expected: str,
) -> None:
    monkeypatch.setattr(trt_runtime, "tensorrt_available", lambda: trt_available)
    assert default_backend(device) == expected

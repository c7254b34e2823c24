"""ONNX export of every model, with a dynamic batch axis, checked against torch on the spot.

Detectors also get dynamic height and width, because the detection size is a run option and
the padded frame size follows the video's aspect ratio. The exported graph is run once in ONNX
Runtime and compared with torch before the file is accepted, so a silently wrong export never
reaches the cache.
"""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
import torch
from torch import nn

from engines.registry import ModelEntry

OPSET = 17
#: torch vs ONNX Runtime agreement required at export time (float32 on the CPU).
EXPORT_TOLERANCE = 1e-4
#: Example inputs: a detector sees padded frames (multiples of 32), a scorer aligned crops.
_DETECTOR_EXAMPLE = (1, 3, 160, 160)
_DETECTOR_CHECK = (2, 3, 192, 128)
SCORER_INPUT = (3, 112, 112)


def example_shapes(entry: ModelEntry) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """(tracing shape, checking shape) of the model's single input."""
    if entry.kind == "detector":
        return _DETECTOR_EXAMPLE, _DETECTOR_CHECK
    return (1, *SCORER_INPUT), (3, *SCORER_INPUT)


def export_onnx(module: nn.Module, entry: ModelEntry, path: Path, *, check: bool = True) -> Path:
    """Export ``module`` (eval mode, float32, CPU) to ``path`` and verify it with ONNX Runtime.

    Raises:
        RuntimeError: the exported graph disagrees with torch by more than the tolerance.
    """
    trace_shape, check_shape = example_shapes(entry)
    dynamic = {0: "batch", 2: "height", 3: "width"} if entry.kind == "detector" else {0: "batch"}
    module = module.eval().float().cpu()
    tmp = path.with_name(path.name + ".tmp")
    with warnings.catch_warnings():
        # The TorchScript exporter is deprecated in torch>=2.9 but is the one that handles
        # dynamic spatial axes of these convolutional graphs without a re-trace per size.
        warnings.simplefilter("ignore", DeprecationWarning)
        # Harmless: strided Slice nodes (FPN crops) are left for ONNX Runtime to fold.
        warnings.filterwarnings("ignore", message="Constant folding", category=UserWarning)
        torch.onnx.export(
            module,
            (torch.zeros(trace_shape),),
            str(tmp),
            input_names=["input"],
            output_names=list(entry.outputs),
            dynamic_axes={"input": dynamic, **{name: {0: "batch"} for name in entry.outputs}},
            opset_version=OPSET,
            dynamo=False,
        )
    if check:
        _check_against_torch(module, entry, tmp, check_shape)
    tmp.replace(path)
    return path


def _check_against_torch(module: nn.Module, entry: ModelEntry, onnx_path: Path, shape: tuple[int, ...]) -> None:
    import onnxruntime as ort

    rng = np.random.default_rng(0)
    x = rng.uniform(0, 255, size=shape).astype(np.float32)
    with torch.inference_mode():
        expected = module(torch.from_numpy(x))
    session = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
    actual = session.run(list(entry.outputs), {"input": x})
    for name, ref, got in zip(entry.outputs, expected, actual):
        diff = float(np.max(np.abs(ref.numpy() - got))) if got.size else 0.0
        if diff > EXPORT_TOLERANCE:
            raise RuntimeError(f"{onnx_path}: ONNX output {name!r} differs from torch by {diff:.2e}")

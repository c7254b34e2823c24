"""One small interface over every backend: ``load(artifacts, device) -> Runtime``.

A runtime is called on one float32 NCHW torch tensor and returns the model's outputs by name,
as torch tensors on its :attr:`Runtime.device`. Tensors are the one currency of every stage: on
a CPU a torch tensor and a numpy array share memory, so ONNX Runtime converts at its own edge
for free, and on a GPU the frames never leave the device. The backend is chosen by name here
and nowhere else.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Literal, Protocol

if TYPE_CHECKING:
    import torch

from engines.cache import Artifacts
from engines.runtimes.engine_plan import EngineShapes

Backend = Literal["torch", "onnxrt", "tensorrt"]
BACKENDS: tuple[str, ...] = ("torch", "onnxrt", "tensorrt")


class Runtime(Protocol):
    """A loaded model: ``runtime(batch) -> {output name: tensor}``.

    ``batch`` is float32 (B, C, H, W) on any device (moved to :attr:`device` if it is elsewhere);
    the outputs are float32 tensors on :attr:`device`.
    """

    output_names: tuple[str, ...]
    device: torch.device

    def __call__(self, batch: torch.Tensor) -> dict[str, torch.Tensor]: ...


def default_backend(device: str) -> Backend:
    """TensorRT on a GPU when it is installed, else torch on the GPU; ONNX Runtime on a CPU."""
    if device.startswith("cuda"):
        from engines.runtimes.tensorrt import tensorrt_available

        return "tensorrt" if tensorrt_available() else "torch"
    return "onnxrt"


def load_runtime(artifacts: Artifacts, backend: Backend, device: str = "cpu", threads: int = 0,
                 shapes: EngineShapes | None = None) -> Runtime:
    """Load one model on one backend.

    Args:
        artifacts: verified artifacts from :func:`engines.cache.resolve`.
        backend: ``torch``, ``onnxrt`` or ``tensorrt``.
        device: ``cpu`` or ``cuda[:N]``.
        threads: intra-op threads for CPU backends (0: the library's default).
        shapes: TensorRT's optimisation profile (see :mod:`engines.runtimes.engine_plan`); None:
            sized for annotate's GPU defaults. The other backends take any shape.
    """
    if backend == "torch":
        from engines.runtimes.torch import TorchRuntime

        return TorchRuntime(artifacts, device, threads)
    if backend == "onnxrt":
        from engines.runtimes.onnxrt import OrtRuntime

        return OrtRuntime(artifacts.onnx, artifacts.entry.outputs, device, threads)
    if backend == "tensorrt":
        from engines.runtimes.tensorrt import TensorRTRuntime

        return TensorRTRuntime(artifacts, device, shapes)
    raise ValueError(f"unknown backend {backend!r}; known: {', '.join(BACKENDS)}")

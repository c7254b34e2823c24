"""One small interface over every backend: ``load(artifacts, device) -> Runtime``.

A runtime is called on one float32 NCHW batch and returns the model's outputs by name, as
numpy arrays. The backend is chosen by name here and nowhere else.
"""

from __future__ import annotations

from typing import Literal, Protocol

import numpy as np

from engines.cache import Artifacts

Backend = Literal["torch", "onnxrt", "tensorrt"]
BACKENDS: tuple[str, ...] = ("torch", "onnxrt", "tensorrt")


class Runtime(Protocol):
    """A loaded model: ``runtime(batch) -> {output name: array}``."""

    output_names: tuple[str, ...]

    def __call__(self, batch: np.ndarray) -> dict[str, np.ndarray]: ...


def default_backend(device: str) -> Backend:
    """TensorRT on a GPU when it is installed, else torch on the GPU; ONNX Runtime on a CPU."""
    if device.startswith("cuda"):
        from engines.runtimes.tensorrt import tensorrt_available

        return "tensorrt" if tensorrt_available() else "torch"
    return "onnxrt"


def load_runtime(artifacts: Artifacts, backend: Backend, device: str = "cpu", threads: int = 0) -> Runtime:
    """Load one model on one backend.

    Args:
        artifacts: verified artifacts from :func:`engines.cache.resolve`.
        backend: ``torch``, ``onnxrt`` or ``tensorrt``.
        device: ``cpu`` or ``cuda[:N]``.
        threads: intra-op threads for CPU backends (0: the library's default).
    """
    if backend == "torch":
        from engines.runtimes.torch import TorchRuntime

        return TorchRuntime(artifacts, device, threads)
    if backend == "onnxrt":
        from engines.runtimes.onnxrt import OrtRuntime

        return OrtRuntime(artifacts.onnx, artifacts.entry.outputs, device, threads)
    if backend == "tensorrt":
        from engines.runtimes.tensorrt import TensorRTRuntime

        return TensorRTRuntime(artifacts, device)
    raise ValueError(f"unknown backend {backend!r}; known: {', '.join(BACKENDS)}")

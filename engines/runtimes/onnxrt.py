"""The ONNX Runtime backend: the CPU workhorse (and CUDA where onnxruntime-gpu is installed)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch


class OrtRuntime:
    """An ONNX Runtime session that pickles by path, so Ray can ship it and rebuild it.

    Its inputs and outputs live in host memory (``device`` is the CPU whatever the execution
    provider): a CPU tensor is handed to ONNX Runtime as a numpy view, without a copy.
    """

    def __init__(self, onnx_path: Path, output_names: tuple[str, ...], device: str = "cpu", threads: int = 0) -> None:
        import onnxruntime as ort

        self.onnx_path = Path(onnx_path)
        self.output_names = tuple(output_names)
        self.provider_device = device
        self.device = torch.device("cpu")
        self.threads = threads
        options = ort.SessionOptions()
        if threads:
            options.intra_op_num_threads = threads
        # One Ray worker per core group: spinning idle threads would steal cores from decode.
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        providers = ["CPUExecutionProvider"]
        if device.startswith("cuda"):
            index = int(device.split(":")[1]) if ":" in device else 0
            providers = [("CUDAExecutionProvider", {"device_id": index}), "CPUExecutionProvider"]
        self.session = ort.InferenceSession(str(self.onnx_path), options, providers=providers)
        self.input_name = self.session.get_inputs()[0].name

    def __call__(self, batch: torch.Tensor) -> dict[str, torch.Tensor]:
        feed = {self.input_name: np.ascontiguousarray(batch.detach().to("cpu", torch.float32).numpy())}
        outputs = self.session.run(list(self.output_names), feed)
        return {name: torch.from_numpy(value) for name, value in zip(self.output_names, outputs)}

    def __reduce__(self):
        return (OrtRuntime, (self.onnx_path, self.output_names, self.provider_device, self.threads))

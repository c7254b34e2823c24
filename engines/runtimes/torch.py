"""The torch backend: the reference, and the one training uses."""

from __future__ import annotations

import numpy as np
import torch

from engines.cache import Artifacts
from engines.models import build_model


class TorchRuntime:
    """A deployment module rebuilt from its architecture name and state dict."""

    def __init__(self, artifacts: Artifacts, device: str = "cpu", threads: int = 0) -> None:
        entry = artifacts.entry
        self.output_names = entry.outputs
        self.device = torch.device(device)
        if threads and self.device.type == "cpu":
            torch.set_num_threads(threads)
        module = build_model(entry.architecture, **dict(entry.arch_kwargs))
        state = torch.load(artifacts.torch, map_location="cpu", weights_only=True)
        module.load_state_dict(state, strict=True)
        self.module = module.to(self.device).eval()

    @torch.inference_mode()
    def forward_tensor(self, batch: torch.Tensor) -> dict[str, torch.Tensor]:
        """Run on a tensor already on the device (the GPU path keeps frames there)."""
        outputs = self.module(batch.to(self.device, torch.float32))
        return dict(zip(self.output_names, outputs))

    def __call__(self, batch: np.ndarray) -> dict[str, np.ndarray]:
        outputs = self.forward_tensor(torch.from_numpy(np.ascontiguousarray(batch)))
        return {name: value.float().cpu().numpy() for name, value in outputs.items()}

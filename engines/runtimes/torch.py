"""The torch backend: the reference, and the one training uses."""

from __future__ import annotations

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
    def __call__(self, batch: torch.Tensor) -> dict[str, torch.Tensor]:
        outputs = self.module(batch.to(self.device, torch.float32))
        return {name: value.float() for name, value in zip(self.output_names, outputs)}

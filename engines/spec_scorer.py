"""Running a model described by a spec (:mod:`engines.spec`): crop, tensor ops, runtime, mapping.

A :class:`SpecScorer` has the interface of :class:`engines.factory.Scorer` (``crop``,
``predict``, ``has_va``, ``model_id``), so the pipeline cannot tell them apart:

- ``crop`` tells ``AlignFaces`` which aligned crop to cut (the spec's size and margin, or our
  112 crop when ``crop_from = "aligned112"``), through the project's one warp;
- :func:`preprocess` turns those float RGB 0..255 crops into the model's tensor with tensor ops
  on the crops' device (colour, resize if any, ``x * scale``, ``(x - mean) / std``, layout);
- :func:`map_outputs` turns the model's outputs into our 7 probabilities (Aff-Wild2 order; extra
  classes dropped, the rest renormalised) and valence/arousal in -1..1.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F

from engines.align import CROP_SIZE, CropGeometry
from engines.runtimes.engine_plan import SCORER_MAX_BATCH, EngineShapes, batch_bucket, run_in_chunks
from engines.spec import ModelSpec, check_onnx, load_spec

log = logging.getLogger(__name__)

#: ITU-R BT.601 luma weights (cv2.COLOR_RGB2GRAY's, and our FER teacher's): what "grey" means.
GREY_WEIGHTS = (0.299, 0.587, 0.114)
#: The backends a spec model runs on: it has no torch module, only its ONNX.
SPEC_BACKENDS = ("onnxrt", "tensorrt")


def crop_geometry(spec: ModelSpec) -> CropGeometry:
    """The crop ``AlignFaces`` cuts for this model: straight at its size, or our 112 crop."""
    side = CROP_SIZE if spec.input.crop_from == "aligned112" else spec.input.size
    return CropGeometry(size=side, margin=spec.input.margin)


def preprocess(spec: ModelSpec, crops: torch.Tensor) -> torch.Tensor:
    """The model's input tensor from float32 (N, 3, S, S) RGB 0..255 crops, on their device.

    Colour first (grey is linear, so converting before the resize saves two thirds of it), then
    a bilinear resize without antialiasing (cv2.resize INTER_LINEAR's rule) only when the crop
    is not already the model's size, then scale, mean/std and layout.
    """
    spec_in = spec.input
    x = crops.float()
    if spec_in.colour == "grey":
        weights = torch.tensor(GREY_WEIGHTS, dtype=x.dtype, device=x.device).view(1, 3, 1, 1)
        x = (x * weights).sum(dim=1, keepdim=True)
    elif spec_in.colour == "BGR":
        x = x.flip(1)
    if x.shape[-1] != spec_in.size:
        x = F.interpolate(x, size=(spec_in.size, spec_in.size), mode="bilinear", align_corners=False, antialias=False)
    mean = torch.tensor(spec_in.mean, dtype=x.dtype, device=x.device).view(1, -1, 1, 1)
    std = torch.tensor(spec_in.std, dtype=x.dtype, device=x.device).view(1, -1, 1, 1)
    x = (x * spec_in.scale - mean) / std
    if spec_in.layout == "NHWC":
        x = x.permute(0, 2, 3, 1)
    return x.contiguous()


def map_outputs(spec: ModelSpec, outputs: dict[str, torch.Tensor]) -> tuple[np.ndarray, np.ndarray | None]:
    """(probabilities (N, 7) float32 in Aff-Wild2 order, valence/arousal (N, 2) in -1..1 or None).

    Logits go through a softmax over all of the model's classes; then the 7 classes we report
    are picked by name and renormalised to sum to 1 (so a dropped class such as contempt does
    not leave the row summing to less). Valence and arousal are mapped linearly from the spec's
    range onto -1..1 and clipped there, the range of our columns.
    """
    expression = spec.expression
    raw = outputs[expression.name].float()
    scores = raw.reshape(len(raw), -1)[:, expression.start:expression.end].double()
    probs = torch.softmax(scores, dim=1) if expression.kind == "logits" else scores.clamp(min=0)
    ours = probs[:, list(expression.columns)]
    ours = ours / ours.sum(dim=1, keepdim=True).clamp(min=1e-12)
    va = None
    if spec.valence is not None and spec.arousal is not None:
        columns = []
        for scalar in (spec.valence, spec.arousal):
            value = outputs[scalar.name].float()
            value = value.reshape(len(value), -1)[:, scalar.index].double()
            columns.append(((value - scalar.low) / (scalar.high - scalar.low) * 2 - 1).clamp(-1, 1))
        va = torch.stack(columns, dim=1).cpu().numpy().astype(np.float32)
    return ours.cpu().numpy().astype(np.float32), va


def engine_shapes(spec: ModelSpec, batch_size: int, fixed_batch: int | None) -> EngineShapes:
    """A TensorRT profile for the spec's input, in its layout (faces per call follow the run's batch)."""
    side, channels = spec.input.size, spec.input.channels
    item = (side, side, channels) if spec.input.layout == "NHWC" else (channels, side, side)
    largest = fixed_batch or SCORER_MAX_BATCH
    return EngineShapes(min=(1, *item), opt=(min(batch_bucket(batch_size), largest), *item), max=(largest, *item))


@dataclass
class SpecScorer:
    """A scorer from a spec: the same interface as :class:`engines.factory.Scorer`."""

    spec: ModelSpec
    runtime: Callable[[torch.Tensor], dict[str, torch.Tensor]]
    max_batch: int | None = None  # the ONNX's fixed batch (1), if it has one

    @property
    def crop(self) -> CropGeometry:
        return crop_geometry(self.spec)

    @property
    def has_va(self) -> bool:
        return self.spec.has_va

    @property
    def model_id(self) -> str:
        return self.spec.model_id

    def __call__(self, crops: torch.Tensor) -> dict[str, torch.Tensor]:
        """The model's raw outputs by name, on crops cut to :attr:`crop`."""
        x = preprocess(self.spec, crops)
        if self.max_batch:
            return run_in_chunks(self.runtime, x, self.max_batch)
        return self.runtime(x)

    def predict(self, crops: torch.Tensor) -> tuple[np.ndarray, np.ndarray | None]:
        """(probabilities (N, 7), valence/arousal (N, 2) or None) on the host, for crops cut to :attr:`crop`."""
        if len(crops) == 0:
            return np.zeros((0, 7), np.float32), (np.zeros((0, 2), np.float32) if self.has_va else None)
        return map_outputs(self.spec, self(crops))


def spec_backend(backend: str | None, device: str) -> str:
    """The backend a spec model runs on: TensorRT on a GPU that has it, else ONNX Runtime.

    ``torch`` (asked for, or what ``auto`` means on a GPU without TensorRT) becomes ONNX Runtime,
    the one backend that runs any ONNX; it uses CUDA where onnxruntime-gpu is installed.
    """
    from engines.runtimes.tensorrt import tensorrt_available

    if backend == "tensorrt" or (backend is None and device.startswith("cuda") and tensorrt_available()):
        return "tensorrt"
    if backend == "torch":
        log.info("a spec model has no torch module: running it on ONNX Runtime")
    return "onnxrt"


def create_spec_scorer(path: str | os.PathLike[str], backend: str | None = None, device: str = "cpu",
                       threads: int = 0, cache_dir: str | os.PathLike[str] | None = None, *,
                       batch_size: int = 32) -> SpecScorer:
    """Load the model a spec describes (its ONNX verified against the spec's sha256).

    Raises:
        engines.spec.SpecError: a bad spec, a digest mismatch, or a graph that contradicts the
            spec (one line naming the file and the key).
    """
    spec = load_spec(path)
    fixed_batch, _ = check_onnx(spec)
    if spec_backend(backend, device) == "tensorrt":
        from engines.cache import cache_root
        from engines.runtimes.tensorrt import OnnxFileTensorRTRuntime
        from engines.sources import inside

        import onnx

        graph = onnx.load(str(spec.onnx), load_external_data=False).graph
        initialisers = {init.name for init in graph.initializer}
        input_name = next(i.name for i in graph.input if i.name not in initialisers)
        directory = inside(cache_root(cache_dir), "specs", spec.name, spec.sha256[:12])
        runtime = OnnxFileTensorRTRuntime(spec.onnx, spec.sha256, spec.name, input_name, spec.output_names,
                                          directory, engine_shapes(spec, batch_size, fixed_batch), device)
        return SpecScorer(spec, runtime)
    from engines.runtimes.onnxrt import OrtRuntime

    return SpecScorer(spec, OrtRuntime(spec.onnx, spec.output_names, device, threads), fixed_batch)

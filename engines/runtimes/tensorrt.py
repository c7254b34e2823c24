"""The TensorRT backend: FP16 engines built from the same model, cached on disk.

TensorRT 10+ prefers strongly typed networks (11.x accepts nothing else), where precision comes
from the ONNX itself rather than a builder flag, so the engine is built from an FP16 ONNX
exported from the verified torch artifact on the GPU. Engines are cached next to the model,
keyed by the FP16 ONNX digest, the GPU name, the TensorRT version and the shape profile, since
an engine is only valid for exactly those; both files are sha256-verified on every load
(:mod:`engines.runtimes.derived`). The profile follows the run's batch and detector size, and
calls beyond it are chunked (:mod:`engines.runtimes.engine_plan`).

Nothing here runs without a CUDA GPU and the TensorRT Python package; the import is lazy and the
tests skip with that reason. Written against the TensorRT 10 Python API (``execute_async_v3``,
named I/O tensors).
"""

from __future__ import annotations

import fcntl
import importlib.util
import logging
import os
import warnings
from pathlib import Path

import torch

from engines.cache import Artifacts
from engines.export import OPSET, example_shapes
from engines.models import build_model
from engines.runtimes.derived import ensure_verified
from engines.runtimes.engine_plan import EngineShapes, detector_shapes, run_in_chunks, scorer_shapes

log = logging.getLogger(__name__)

#: The run's batch and detector size when a caller gives no shapes (annotate's GPU defaults).
DEFAULT_BATCH = 32
DEFAULT_DET_SIZE = 640
_WORKSPACE_BYTES = 2 << 30  # 2 GiB of builder scratch: enough for these small networks


def tensorrt_available() -> bool:
    """True when the TensorRT Python package is importable and a CUDA device exists."""
    return importlib.util.find_spec("tensorrt") is not None and torch.cuda.is_available()


def _export_fp16_onnx(artifacts: Artifacts, path: Path, device: torch.device) -> None:
    entry = artifacts.entry
    module = build_model(entry.architecture, **dict(entry.arch_kwargs))
    module.load_state_dict(torch.load(artifacts.torch, map_location="cpu", weights_only=True))
    module = module.to(device).half().eval()
    trace_shape, _ = example_shapes(entry)
    dynamic = {0: "batch", 2: "height", 3: "width"} if entry.kind == "detector" else {0: "batch"}
    tmp = path.with_name(path.name + ".tmp")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        torch.onnx.export(
            module, (torch.zeros(trace_shape, device=device, dtype=torch.float16),), str(tmp),
            input_names=["input"], output_names=list(entry.outputs),
            dynamic_axes={"input": dynamic, **{n: {0: "batch"} for n in entry.outputs}},
            opset_version=OPSET, dynamo=False,
        )
    os.replace(tmp, path)


def default_shapes(kind: str, batch_size: int = DEFAULT_BATCH, det_size: int = DEFAULT_DET_SIZE) -> EngineShapes:
    """The profile of a detector or scorer engine for a run's batch size and detector size."""
    return detector_shapes(batch_size, det_size) if kind == "detector" else scorer_shapes(batch_size)


class TensorRTRuntime:
    """A deserialised engine plus one execution context, fed and read as CUDA tensors."""

    #: The engine's input tensor (our exports name it so; a spec's ONNX names its own).
    input_name = "input"

    def __init__(self, artifacts: Artifacts, device: str = "cuda", shapes: EngineShapes | None = None) -> None:
        self.artifacts = artifacts
        self._open(artifacts.entry.name, artifacts.entry.outputs, artifacts.onnx.parent, device,
                   shapes or default_shapes(artifacts.entry.kind))

    def _open(self, name: str, output_names: tuple[str, ...], directory: Path, device: str,
              shapes: EngineShapes) -> None:
        import tensorrt as trt

        if not torch.cuda.is_available():
            raise RuntimeError("the TensorRT backend needs a CUDA device")
        self.trt = trt
        self.name = name
        self.device = torch.device(device)
        self.output_names = tuple(output_names)
        self.directory = directory
        self.shapes = shapes
        self.logger = trt.Logger(trt.Logger.WARNING)
        # One Ray worker per GPU starts at once on a multi-GPU node: without the lock each one
        # exports and builds into the same ".tmp" names, and a later os.replace finds its file
        # already moved (or a reader hashes a file another worker is still writing). With it,
        # one worker exports and builds and the others wait and reuse, as in engines.cache.
        directory.mkdir(parents=True, exist_ok=True)
        with open(directory / ".tensorrt.lock", "w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            source, engine_path = self._prepare()
            ensure_verified(engine_path, lambda path: self._build(source, path))
        runtime = trt.Runtime(self.logger)
        self.engine = runtime.deserialize_cuda_engine(engine_path.read_bytes())
        if self.engine is None:
            raise RuntimeError(f"{engine_path}: TensorRT could not deserialise the engine")
        self.context = self.engine.create_execution_context()
        self.stream = torch.cuda.Stream(self.device)
        reserved = getattr(self.engine, "device_memory_size_v2", None) or self.engine.device_memory_size
        log.info("%s: TensorRT engine for inputs up to %s reserves %.2f GiB of activations",
                 self.name, "x".join(map(str, self.shapes.max)), reserved / 2**30)

    def _prepare(self) -> tuple[Path, Path]:
        """(the ONNX the engine is built from, the engine's cache file); called under the lock."""
        return self.artifacts.onnx.with_name("model.fp16.onnx"), self._engine_path(self.artifacts)

    def _engine_path(self, artifacts: Artifacts) -> Path:
        """The engine of an FP16 export of the verified torch artifact (strongly typed networks take
        their precision from the graph), exported once; keyed by that export's sha256."""
        fp16_onnx = artifacts.onnx.with_name("model.fp16.onnx")
        digest = ensure_verified(fp16_onnx, lambda path: _export_fp16_onnx(artifacts, path, self.device))
        return self._engine_file(artifacts.onnx.parent, digest)

    def _engine_file(self, directory: Path, digest: str) -> Path:
        """The engine's cache file: source ONNX sha256, GPU name, TensorRT version and profile."""
        gpu = torch.cuda.get_device_name(self.device).replace(" ", "_")
        key = f"{digest[:16]}-{gpu}-trt{self.trt.__version__}-{self.shapes.key}"
        return directory / f"model.{key}.engine"

    def _profile_shapes(self) -> tuple[tuple[int, ...], tuple[int, ...], tuple[int, ...]]:
        return self.shapes.min, self.shapes.opt, self.shapes.max

    def _build(self, source: Path, engine_path: Path) -> None:
        trt = self.trt
        log.info("building a TensorRT engine for %s (once per GPU and version)", self.name)
        builder = trt.Builder(self.logger)
        flags = 1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED)
        network = builder.create_network(flags)
        parser = trt.OnnxParser(network, self.logger)
        if not parser.parse(source.read_bytes()):
            errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
            raise RuntimeError(f"{source}: TensorRT cannot parse the ONNX: {errors}")
        config = builder.create_builder_config()
        config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, _WORKSPACE_BYTES)
        profile = builder.create_optimization_profile()
        profile.set_shape(self.input_name, *self._profile_shapes())
        config.add_optimization_profile(profile)
        serialized = builder.build_serialized_network(network, config)
        if serialized is None:
            raise RuntimeError(f"{source}: TensorRT engine build failed")
        tmp = engine_path.with_name(engine_path.name + ".tmp")
        tmp.write_bytes(bytes(serialized))  # its digest is recorded by ensure_verified
        os.replace(tmp, engine_path)

    def __call__(self, batch: torch.Tensor) -> dict[str, torch.Tensor]:
        """Run on a tensor (moved to the GPU if it is elsewhere); outputs stay on the GPU (float32).

        A batch larger than the profile's is run in chunks of its largest batch.
        """
        self.shapes.check(tuple(batch.shape))
        return run_in_chunks(self._execute, batch, self.shapes.max_batch)

    def _execute(self, batch: torch.Tensor) -> dict[str, torch.Tensor]:
        x = batch.to(self.device, self._input_dtype()).contiguous()
        self.context.set_input_shape(self.input_name, tuple(x.shape))
        self.context.set_tensor_address(self.input_name, x.data_ptr())
        outputs: dict[str, torch.Tensor] = {}
        for name in self.output_names:
            shape = tuple(self.context.get_tensor_shape(name))
            dtype = torch.float16 if self.engine.get_tensor_dtype(name) == self.trt.DataType.HALF else torch.float32
            outputs[name] = torch.empty(shape, dtype=dtype, device=self.device)
            self.context.set_tensor_address(name, outputs[name].data_ptr())
        # The input and output buffers were made on the current stream; order our stream after it.
        self.stream.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(self.stream):
            if not self.context.execute_async_v3(self.stream.cuda_stream):
                raise RuntimeError(f"TensorRT execution failed for {self.name}")
        self.stream.synchronize()
        return {name: value.float() for name, value in outputs.items()}

    def _input_dtype(self) -> torch.dtype:
        return torch.float16 if self.engine.get_tensor_dtype(self.input_name) == self.trt.DataType.HALF else torch.float32


class OnnxFileTensorRTRuntime(TensorRTRuntime):
    """An engine built straight from a user's ONNX file (a model spec), whose digest the spec pins.

    There is no torch module to re-export in FP16, so the engine has the ONNX's own precision
    (FP32 for a float32 export: strongly typed networks take it from the graph). The engine is
    cached in ``directory`` (under the model cache, never beside the user's file).
    """

    def __init__(self, onnx_path: Path, sha256: str, name: str, input_name: str, output_names: tuple[str, ...],
                 directory: Path, shapes: EngineShapes, device: str = "cuda") -> None:
        self.onnx_path, self.sha256, self.input_name = Path(onnx_path), sha256, input_name
        self._open(name, output_names, directory, device, shapes)

    def _prepare(self) -> tuple[Path, Path]:
        from engines.sources import verify

        verify(self.onnx_path, self.sha256)  # the file may have changed since the spec was read
        return self.onnx_path, self._engine_file(self.directory, self.sha256)

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

from engines.onnx_graph import drop_unused_nodes
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
    fold_pads_into_convs(tmp)
    if check:
        _check_against_torch(module, entry, tmp, check_shape)
    tmp.replace(path)
    return path


def fold_pads_into_convs(path: Path) -> int:
    """Fold each constant zero ``Pad`` that feeds a ``Conv`` into that Conv's own ``pads``, in place.

    Why: TF's "SAME" stride-2 layers pad right/bottom only, which torch's Conv2d cannot express,
    so the model pads explicitly and the exporter writes a Pad node (with its pads computed by a
    small constant subgraph it does not fold). ONNX Runtime's fast CPU convolutions keep tensors
    in a blocked layout that a Pad breaks: each Pad cost a reorder out, the copy and a reorder
    back, a quarter of RetinaFace's time (54 -> 41 ms on a 640x384 frame, one thread). An ONNX
    Conv takes asymmetric pads, so the fold is exact (bit-identical outputs here).

    Returns the number of Pad nodes folded.
    """
    import onnx

    model = onnx.load(str(path))
    graph = model.graph
    consumers: dict[str, list] = {}
    for node in graph.node:
        for name in node.input:
            consumers.setdefault(name, []).append(node)
    folded = []
    for pad in (n for n in graph.node if n.op_type == "Pad"):
        users = consumers.get(pad.output[0], [])
        mode = next((a.s for a in pad.attribute if a.name == "mode"), b"constant")
        if len(users) != 1 or users[0].op_type != "Conv" or mode != b"constant" or (len(pad.input) > 2 and pad.input[2]):
            continue
        conv = users[0]
        attrs = {a.name: a for a in conv.attribute}
        if "auto_pad" in attrs and attrs["auto_pad"].s not in (b"", b"NOTSET"):
            continue
        pads = _constant_value(model, pad.input[1])
        if pads is None:
            continue
        half = len(pads) // 2
        begin, end = [int(v) for v in pads[:half]], [int(v) for v in pads[half:]]
        if half < 3 or any(begin[:2]) or any(end[:2]) or min(begin + end) < 0:
            continue  # padding the batch or channel axes, or cropping: not a Conv's job
        current = list(attrs["pads"].ints) if "pads" in attrs else [0] * (2 * (half - 2))
        spatial = [b + c for b, c in zip(begin[2:] + end[2:], current)]
        if "pads" in attrs:
            del attrs["pads"].ints[:]
            attrs["pads"].ints.extend(spatial)
        else:
            conv.attribute.append(onnx.helper.make_attribute("pads", spatial))
        conv.input[0] = pad.input[0]
        folded.append(pad)
    if not folded:
        return 0
    for pad in folded:
        graph.node.remove(pad)
    drop_unused_nodes(graph)
    onnx.checker.check_model(model)
    onnx.save(model, str(path))
    return len(folded)


def _constant_value(model, name: str) -> np.ndarray | None:
    """The value of tensor ``name`` when it depends on initializers and Constant nodes only, else None."""
    import onnx
    from onnx.reference import ReferenceEvaluator

    graph = model.graph
    producer = {output: node for node in graph.node for output in node.output}
    initializers = {init.name: init for init in graph.initializer}
    nodes, used_inits, pending, seen = [], [], [name], set()
    while pending:
        tensor = pending.pop()
        if tensor in seen or not tensor:
            continue
        seen.add(tensor)
        if tensor in initializers:
            used_inits.append(initializers[tensor])
        elif tensor in producer:
            nodes.append(producer[tensor])
            pending.extend(producer[tensor].input)
        else:
            return None  # a graph input: not a constant
    order = {id(node): i for i, node in enumerate(graph.node)}
    nodes = sorted({id(n): n for n in nodes}.values(), key=lambda n: order[id(n)])
    sub = onnx.helper.make_graph(nodes, "constant", [], [onnx.helper.make_tensor_value_info(name, onnx.TensorProto.UNDEFINED, None)],
                                 initializer=used_inits)
    sub_model = onnx.helper.make_model(sub, opset_imports=model.opset_import)
    return np.asarray(ReferenceEvaluator(sub_model).run(None, {})[0])


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

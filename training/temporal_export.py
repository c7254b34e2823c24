"""Export the temporal stage next to its CNN student, recorded in the model directory's card.

Writes into a directory that ``training.export.export_student`` made from the same CNN checkpoint:

- ``temporal_features.onnx``: ``FrameFeatures`` of that CNN, input "crops" float32
  (N, 3, 112, 112) RGB 0..255, output "features" (N, F). ``annotate run --temporal`` scores
  crops with it instead of the per-frame heads (one CNN pass per face either way).
- ``temporal.onnx``: ``DeployedTemporal``, input "features" (N, T, F), outputs "expr_logits"
  (N, T, 7), "va_bins" (N, T, 2, 20), "va" (N, T, 2); N and T dynamic.
- ``temporal.pt``: the ``TemporalNet`` state dict.

The card gains a ``temporal`` object (artifact names, window and stride, feature width, metrics,
the CNN checkpoint's sha256) and the three files' sha256 in its ``sha256`` table, so
``annotator.temporal`` verifies them before use. Every file, the card included, is written to a
temporary name, and all are moved into place together once all are written, the card last: a
failed parity check or a full disk leaves the directory as it was, with no temporary.
"""

from __future__ import annotations

import json
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import torch

from engines.models.temporal import STRIDE, WINDOW, DeployedTemporal, FrameFeatures
from engines.sources import sha256_file
from engines.saving import staged, write_torch, write_whole
from training import checkpoint
from training.export import INPUT_SIDE, OPSET
from training.temporal import load_temporal

MODEL_CARD = "model_card.json"
FEATURES_ONNX = "temporal_features.onnx"
TEMPORAL_ONNX = "temporal.onnx"
TEMPORAL_TORCH = "temporal.pt"
#: torch vs ONNX Runtime agreement demanded before the files are accepted (float32, CPU).
PARITY_TOLERANCE = 1e-4


class TemporalExportError(ValueError):
    """The temporal checkpoint does not belong to the CNN, or the export does not match torch."""


def _onnx(module: torch.nn.Module, example: torch.Tensor, path: Path, input_name: str,
          outputs: tuple[str, ...], dynamic: dict[int, str]) -> None:
    with warnings.catch_warnings():
        # The GRU's initial state is zeros of the input's batch (no h0 input), so another batch
        # size is safe; _check_parity runs the graph at another batch and length to prove it.
        warnings.filterwarnings("ignore", message="Exporting a model to ONNX with a batch_size other than 1")
        warnings.filterwarnings("ignore", category=torch.jit.TracerWarning)
        warnings.simplefilter("ignore", DeprecationWarning)  # the TorchScript exporter, as engines/export.py
        torch.onnx.export(module, (example,), str(path), opset_version=OPSET, input_names=[input_name],
                          output_names=list(outputs),
                          dynamic_axes={input_name: dynamic, **{name: dynamic for name in outputs}},
                          dynamo=False)  # the torch.export exporter needs onnxscript, not a dependency


def _check_parity(module: torch.nn.Module, onnx_path: Path, x: torch.Tensor, outputs: tuple[str, ...]) -> None:
    import onnxruntime as ort

    session = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
    got = session.run(list(outputs), {session.get_inputs()[0].name: x.numpy()})
    with torch.no_grad():
        expected = module(x)
    expected = expected if isinstance(expected, tuple) else (expected,)
    for name, ref, value in zip(outputs, expected, got):
        diff = float(np.max(np.abs(ref.numpy() - value)))
        if diff > PARITY_TOLERANCE:
            raise TemporalExportError(f"{onnx_path}: ONNX output {name!r} differs from torch by {diff:.2e}")


def export_temporal(student_ckpt: Path, temporal_ckpt: Path, out_dir: Path) -> Path:
    """Add the temporal head of ``temporal_ckpt`` to the model directory ``out_dir``.

    Args:
        student_ckpt: the CNN checkpoint ``out_dir`` was exported from (its features feed the GRU).
        temporal_ckpt: ``best.pt`` of ``annotate train temporal`` on that CNN.
        out_dir: a directory with a ``model_card.json`` written by ``export_student``.

    Returns:
        The path of the updated ``model_card.json``.

    Raises:
        TemporalExportError: the GRU was trained on another CNN's features, or ONNX disagrees
            with torch by more than ``PARITY_TOLERANCE``.
    """
    card_path = out_dir / MODEL_CARD
    card: dict[str, Any] = json.loads(card_path.read_text())
    gru, saved = load_temporal(temporal_ckpt)
    meta = saved["temporal"]
    student_digest = sha256_file(student_ckpt)
    if meta.get("student_sha256") != student_digest:
        raise TemporalExportError(f"{temporal_ckpt}: trained on the features of another CNN checkpoint than "
                                  f"{student_ckpt} (sha256 {str(meta.get('student_sha256'))[:12]} vs {student_digest[:12]})")
    net, _ = checkpoint.load_model(student_ckpt)
    features = FrameFeatures(net).eval()
    deployed = DeployedTemporal(gru).eval()
    width = features.out_features

    crops = torch.rand(3, 3, INPUT_SIDE, INPUT_SIDE) * 255
    sequence = torch.randn(3, 20, width) * 2 + 1  # another batch and length than traced: dynamic axes
    features_path, temporal_path, torch_path = (out_dir / name for name in (FEATURES_ONNX, TEMPORAL_ONNX, TEMPORAL_TORCH))
    # All three artifacts and the card that lists their digests appear together, the card last:
    # a failed parity check or a full disk leaves the directory as it was (engines.saving.staged).
    with staged((features_path, temporal_path, torch_path, card_path)) as temps:
        _onnx(features, torch.zeros(2, 3, INPUT_SIDE, INPUT_SIDE), temps[features_path], "crops", ("features",),
              {0: "batch"})
        _check_parity(features, temps[features_path], crops, ("features",))
        _onnx(deployed, torch.zeros(2, WINDOW, width), temps[temporal_path], "features", DeployedTemporal.OUTPUTS,
              {0: "batch", 1: "time"})
        _check_parity(deployed, temps[temporal_path], sequence, DeployedTemporal.OUTPUTS)
        write_torch(gru.state_dict(), temps[torch_path])
        card["temporal"] = {
            "architecture": "bigru-per-task",
            "units": list(meta["units"]),
            "feature_width": width,
            "window": WINDOW,
            "stride": STRIDE,
            "with_va": bool(meta.get("with_va", True)),
            "outputs": list(DeployedTemporal.OUTPUTS),
            "artifacts": {"features_onnx": FEATURES_ONNX, "onnx": TEMPORAL_ONNX, "torch": TEMPORAL_TORCH},
            "student_sha256": student_digest,
            "metrics": saved.get("metrics", {}),
        }
        card["sha256"] = {**card["sha256"], **{path.name: sha256_file(temps[path])
                                               for path in (features_path, temporal_path, torch_path)}}
        write_whole(temps[card_path], (json.dumps(card, indent=2) + "\n").encode())
    return card_path

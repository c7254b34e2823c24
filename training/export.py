"""Export a trained checkpoint as the project's scorer artifacts: ONNX, torch state dict, card.

Outputs in ``out_dir``: ``student.onnx`` (``DeployedStudent``, opset 17, dynamic batch, inputs
"images", outputs "expr_logits" (B, 7) and "va" (B, 2)), ``student.pt`` (the DeployedStudent
state dict) and ``model_card.json`` with the input contract (including ``input.preprocessing``, the crop the
student was trained on, which ``engines.factory`` checks on load) and sha256 of both artifacts. Every
file is written to a temporary name and moved into place, so a crash never leaves a partial one.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from engines.models.student import EXPR_CLASSES, PREPROCESSING, DeployedStudent
from engines.saving import staged, write_torch, write_whole
from engines.sources import sha256_file
from training import checkpoint

OPSET = 17
INPUT_SIDE = int(PREPROCESSING["crop_size"])  # the deployed aligner's 112x112 arcface crop


def export_student(checkpoint_path: Path, out_dir: Path, name: str = "student",
                   training_data: str = "see the training config", with_va: bool = True,
                   extra_metrics: dict[str, Any] | None = None) -> Path:
    """Write the ONNX, torch and model-card artifacts of a ``best.pt``/``last.pt`` checkpoint.

    Args:
        checkpoint_path: a checkpoint written by ``training.loops.fit``.
        out_dir: destination directory (created).
        name: the model name recorded in the card.
        training_data: a short description of the training databases for the card.
        with_va: export the valence/arousal output; False for a student whose VA head had no
            VA target, so the annotator writes null instead of untrained numbers.
        extra_metrics: measurements made outside the loop (agreement, speed) for the card.

    Returns:
        The path of ``model_card.json``.
    """
    net, saved = checkpoint.load_model(checkpoint_path)
    model = DeployedStudent(net, with_va=with_va).eval()
    outputs = ["expr_logits", "va"] if with_va else ["expr_logits"]
    out_dir.mkdir(parents=True, exist_ok=True)
    # Every artifact goes to a temporary name first and all are moved into place only once all
    # are written, the card last: a full disk part way leaves the model before it whole (or
    # none), never a new ONNX beside an old card whose digests no longer match it.
    onnx_path, pt_path, card_path = out_dir / "student.onnx", out_dir / "student.pt", out_dir / "model_card.json"
    with staged((onnx_path, pt_path, card_path)) as temps:
        torch.onnx.export(model, (torch.zeros(2, 3, INPUT_SIDE, INPUT_SIDE),), str(temps[onnx_path]), opset_version=OPSET,
                          input_names=["images"], output_names=outputs,
                          dynamic_axes={"images": {0: "batch"}, **{o: {0: "batch"} for o in outputs}},
                          dynamo=False)  # the torch.export exporter needs onnxscript, not a dependency
        write_torch(model.state_dict(), temps[pt_path])
        card: dict[str, Any] = {
            "name": name,
            "kind": "scorer",
            "architecture": "student",
            "arch_kwargs": {**saved["arch"], "with_va": with_va},
            "input": {"shape": [3, INPUT_SIDE, INPUT_SIDE], "dtype": "float32", "range": [0, 255], "channels": "RGB",
                      "alignment": "5-point similarity, 112x112 arcface template",
                      "preprocessing": PREPROCESSING},
            "outputs": outputs,
            "classes": list(EXPR_CLASSES),
            "va": "expectation over 20 bin centres on [-1,1]" if with_va else None,
            "training_data": training_data,
            "metrics": {**saved.get("metrics", {}), **(extra_metrics or {})},
            "artifacts": {"onnx": onnx_path.name, "torch": pt_path.name},
            "sha256": {onnx_path.name: sha256_file(temps[onnx_path]), pt_path.name: sha256_file(temps[pt_path])},
        }
        write_whole(temps[card_path], (json.dumps(card, indent=2) + "\n").encode())
    return card_path

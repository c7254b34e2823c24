"""The single factory: a model name (or an exported model directory) → a ready detector/scorer.

``create_detector`` and ``create_scorer`` are the only places that combine the registry, the
cache and a runtime, so the CLI, the Ray workers, the benchmarks and training all load models
the same way.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from engines.cache import Artifacts, resolve
from engines.registry import FileSource, ModelEntry, get_entry
from engines.runtimes import Runtime, default_backend, load_runtime

MODEL_CARD = "model_card.json"


def entry_from_model_dir(path: Path) -> ModelEntry:
    """A registry entry for a directory written by ``annotate export`` (it has a model card).

    Raises:
        ValueError: the directory has no readable model card or it lacks a field.
    """
    card_path = path / MODEL_CARD
    try:
        card = json.loads(card_path.read_text())
        torch_file = card["artifacts"]["torch"]
        return ModelEntry(
            name=card["name"],
            kind=card.get("kind", "scorer"),
            architecture=card["architecture"],
            source=FileSource(str((path / torch_file).resolve())),
            sha256=card["sha256"][torch_file],
            converter="state-dict",
            outputs=tuple(card["outputs"]),
            licence=card.get("licence", "see model card"),
            description=card.get("description", f"exported model {card['name']}"),
            has_va="va" in card["outputs"],
            arch_kwargs=tuple(sorted(card.get("arch_kwargs", {}).items())),
            training_data=json.dumps(card.get("training_data", "")),
        )
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise ValueError(f"{card_path}: not a usable model card ({exc})") from None


def lookup(name_or_path: str, kind: str) -> ModelEntry:
    """Registry name, or a path to an exported model directory."""
    if os.sep in name_or_path or Path(name_or_path).is_dir():
        path = Path(name_or_path)
        if not path.is_dir():
            raise ValueError(f"{path}: model directory not found")
        entry = entry_from_model_dir(path)
        if entry.kind != kind:
            raise ValueError(f"{path}: is a {entry.kind}, not a {kind}")
        return entry
    return get_entry(name_or_path, kind=kind)  # type: ignore[arg-type]


def model_id(artifacts: Artifacts) -> str:
    """``name:digest12`` of the ONNX artifact: identifies exactly which weights made a row."""
    return f"{artifacts.entry.name}:{artifacts.sha256['model.onnx'][:12]}"


def _runtime(entry: ModelEntry, backend: str | None, device: str, threads: int, cache_dir) -> tuple[Artifacts, Runtime]:
    artifacts = resolve(entry, cache_dir)
    chosen = backend or default_backend(device)
    return artifacts, load_runtime(artifacts, chosen, device, threads)  # type: ignore[arg-type]


@dataclass
class Scorer:
    """An aligned-crop scorer: 7 expression probabilities (Aff-Wild2 order) and, if any, VA."""

    artifacts: Artifacts
    runtime: Runtime

    @property
    def has_va(self) -> bool:
        return "va" in self.runtime.output_names

    @property
    def model_id(self) -> str:
        return model_id(self.artifacts)

    def __call__(self, crops: np.ndarray) -> dict[str, np.ndarray]:
        """Raw outputs on float32 (B, 3, 112, 112) RGB 0..255 crops (training uses the logits)."""
        return self.runtime(crops)

    def predict(self, crops: np.ndarray) -> tuple[np.ndarray, np.ndarray | None]:
        """(probabilities (N, 7) float32, valence/arousal (N, 2) or None) for uint8 NHWC crops."""
        if len(crops) == 0:
            return np.zeros((0, 7), np.float32), (np.zeros((0, 2), np.float32) if self.has_va else None)
        return self._probabilities(self.runtime(np.ascontiguousarray(crops.transpose(0, 3, 1, 2), dtype=np.float32)))


    def predict_tensor(self, crops) -> tuple[np.ndarray, np.ndarray | None]:
        """:meth:`predict` for torch float32 (N, 3, 112, 112) crops on the runtime's device."""
        if not hasattr(self.runtime, "forward_tensor"):
            return self._probabilities(self.runtime(crops.cpu().numpy()))
        if len(crops) == 0:
            return self.predict(np.zeros((0, 112, 112, 3), np.uint8))
        outputs = self.runtime.forward_tensor(crops)
        return self._probabilities({k: v.float().cpu().numpy() for k, v in outputs.items()})

    def _probabilities(self, outputs: dict[str, np.ndarray]) -> tuple[np.ndarray, np.ndarray | None]:
        logits = outputs["expr_logits"].astype(np.float32)
        exp = np.exp(logits - logits.max(axis=1, keepdims=True))
        probs = exp / exp.sum(axis=1, keepdims=True)
        return probs, (outputs["va"].astype(np.float32) if self.has_va else None)


def create_scorer(name_or_path: str, backend: str | None = None, device: str = "cpu",
                  threads: int = 0, cache_dir: str | os.PathLike[str] | None = None) -> Scorer:
    """Load a scorer by registry name or exported directory, pulling it on first use."""
    entry = lookup(name_or_path, "scorer")
    return Scorer(*_runtime(entry, backend, device, threads, cache_dir))


def create_detector(name_or_path: str, backend: str | None = None, device: str = "cpu", threads: int = 0,
                    cache_dir: str | os.PathLike[str] | None = None, *, det_size: int = 640,
                    threshold: float = 0.9, min_face: float = 0.0):
    """Load a RetinaFace detector by registry name, pulling it on first use.

    Returns:
        (``engines.retinaface.RetinaFaceDetector``, its artifacts).
    """
    from engines.retinaface import RetinaFaceDetector

    entry = lookup(name_or_path, "detector")
    artifacts, runtime = _runtime(entry, backend, device, threads, cache_dir)
    detector = RetinaFaceDetector(runtime, det_size=det_size, threshold=threshold, min_face=min_face)
    return detector, artifacts

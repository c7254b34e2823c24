"""The single factory: a model name (or an exported model directory) → a ready detector/scorer.

``create_detector`` and ``create_scorer`` are the only places that combine the registry, the
cache and a runtime, so the CLI, the Ray workers, the benchmarks and training all load models
the same way. ``create_scorer`` also takes a model spec (``SPEC.toml``, :mod:`engines.spec`): any
ONNX affect model, run by :mod:`engines.spec_scorer` behind the same scorer interface.
"""

from __future__ import annotations

import json
import logging
import os
import re
from dataclasses import dataclass
from typing import TYPE_CHECKING, Union
from pathlib import Path

import numpy as np

from engines.cache import Artifacts, resolve
from engines.registry import FileSource, ModelEntry, get_entry
from engines.sources import plain_name
from engines.runtimes import Runtime, default_backend, load_runtime
from engines.runtimes.engine_plan import EngineShapes, detector_shapes, scorer_shapes
from engines.spec import is_spec

if TYPE_CHECKING:
    import torch

    from engines.align import CropGeometry
    from engines.spec_scorer import SpecScorer

log = logging.getLogger(__name__)

MODEL_CARD = "model_card.json"


def entry_from_model_dir(path: Path) -> ModelEntry:
    """A registry entry for a directory written by ``annotate export`` (it has a model card).

    The directory is untrusted input: its name becomes a cache path and its file names are
    opened, so every name, path and digest taken from the card is checked before use.

    Raises:
        ValueError: the directory has no readable model card, or a field is missing or invalid
            (one line naming the card file and the key).
    """
    card_path = path / MODEL_CARD
    try:
        card = json.loads(card_path.read_text())
    except (OSError, ValueError) as exc:
        raise ValueError(f"{card_path}: not a usable model card ({exc})") from None
    if not isinstance(card, dict):
        raise ValueError(f"{card_path}: not a usable model card (expected a JSON object)")
    return _CardReader(card_path, card).entry(path)


#: Names of models (cache directories): a plain slug, never ``.``/``..`` (must start alphanumeric).
_SLUG = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")
_SHA256 = re.compile(r"[0-9a-f]{64}")
_IDENTIFIER = re.compile(r"[A-Za-z_][A-Za-z0-9_]{0,63}")
_KINDS = ("scorer", "detector")
#: A scorer's outputs: its logits, and optionally valence/arousal (the detector's are in model_table).
_SCORER_OUTPUTS = (("expr_logits",), ("expr_logits", "va"))
_MISSING = object()
_JSON_TYPES = {str: "string", dict: "object", list: "array"}


@dataclass(frozen=True)
class _CardReader:
    """Reads and checks the fields of one model card; every error names the card and the key."""

    card_path: Path
    card: dict

    def fail(self, key: str, why: str) -> ValueError:
        return ValueError(f'{self.card_path}: "{key}" {why}')

    def get(self, key: str, kind: type, default: object = _MISSING) -> object:
        value = self.card.get(key, default)
        if value is _MISSING:
            raise self.fail(key, "is missing")
        if not isinstance(value, kind):
            raise self.fail(key, f"must be a JSON {_JSON_TYPES[kind]}, got {type(value).__name__}")
        return value

    def name(self) -> str:
        name = self.get("name", str)
        if not _SLUG.fullmatch(name):
            raise self.fail("name", f"must be a plain name (letters, digits, . _ -), got {name!r}")
        return name

    def kind(self) -> str:
        kind = self.get("kind", str, "scorer")
        if kind not in _KINDS:
            raise self.fail("kind", f"must be one of {', '.join(_KINDS)}, got {kind!r}")
        return kind

    def architecture(self) -> str:
        from engines.models import ARCHITECTURES

        architecture = self.get("architecture", str)
        if architecture not in ARCHITECTURES:
            known = ", ".join(sorted(ARCHITECTURES))
            raise self.fail("architecture", f"must be one of {known}, got {architecture!r}")
        return architecture

    def artifacts(self, directory: Path) -> dict[str, Path]:
        """Every ``artifacts`` entry: role -> resolved path, each a plain name inside ``directory``."""
        base = directory.resolve()
        paths = {}
        for role, filename in self.get("artifacts", dict).items():
            key = f"artifacts.{role}"
            if not plain_name(filename):
                raise self.fail(key, f"must be a plain file name inside the model directory, got {filename!r}")
            target = (directory / filename).resolve()
            if not target.is_relative_to(base):  # a symlink out of the directory
                raise self.fail(key, f"must stay inside the model directory, but {filename!r} resolves to {target}")
            paths[role] = target
        if "torch" not in paths:
            raise self.fail("artifacts.torch", "is missing")
        if not paths["torch"].is_file():
            raise self.fail("artifacts.torch", f"names {paths['torch'].name!r}, which is not a file in {directory}")
        return paths

    def sha256(self) -> dict[str, str]:
        digests = self.get("sha256", dict)
        for filename, digest in digests.items():
            if not isinstance(digest, str) or not _SHA256.fullmatch(digest):
                raise self.fail(f"sha256.{filename}", f"must be 64 lowercase hex digits, got {digest!r}")
        return digests

    def outputs(self, kind: str) -> tuple[str, ...]:
        """The output names, which must be one of the contracts the runtimes and the annotator read."""
        from engines.model_table import DETECTOR_OUTPUTS

        outputs = tuple(self.get("outputs", list))
        allowed = _SCORER_OUTPUTS if kind == "scorer" else (DETECTOR_OUTPUTS,)
        if outputs not in allowed:
            shown = " or ".join(str(list(o)) for o in allowed)
            raise self.fail("outputs", f"of a {kind} must be {shown}, got {list(outputs)!r}")
        return outputs

    def arch_kwargs(self) -> tuple[tuple[str, object], ...]:
        kwargs = self.get("arch_kwargs", dict, {})
        for key, value in kwargs.items():
            if not _IDENTIFIER.fullmatch(key) or not isinstance(value, (str, int, float, bool, type(None))):
                raise self.fail(f"arch_kwargs.{key}", f"must be an identifier with a plain value, got {value!r}")
        return tuple(sorted(kwargs.items()))

    def check_preprocessing(self, architecture: str) -> None:
        """A student is only usable on the crops ``annotate run`` cuts (``student.PREPROCESSING``).

        A card that records another preprocessing is refused; a card from before the record
        (trained on 1.2x zoomed crops) still loads, with a warning, so old exports keep working.
        """
        if architecture != "student":
            return
        from engines.models.student import PREPROCESSING

        recorded = self.card.get("input", {}).get("preprocessing") if isinstance(self.card.get("input"), dict) else None
        if recorded is None:
            log.warning("%s: no \"input.preprocessing\": exported before training used annotate run's crops "
                        "(it saw faces zoomed 1.2x); re-export a model trained with this version", self.card_path)
            return
        if recorded != PREPROCESSING:
            raise self.fail("input.preprocessing", f"must be {json.dumps(PREPROCESSING)} (what annotate run "
                            f"feeds the scorer), got {json.dumps(recorded)}")

    def entry(self, directory: Path) -> ModelEntry:
        name = self.name()
        kind, architecture = self.kind(), self.architecture()
        self.check_preprocessing(architecture)
        torch_path = self.artifacts(directory)["torch"]
        digests = self.sha256()
        torch_file = self.card["artifacts"]["torch"]
        if torch_file not in digests:
            raise self.fail(f"sha256.{torch_file}", "is missing")
        outputs = self.outputs(kind)
        return ModelEntry(
            name=name,
            kind=kind,  # type: ignore[arg-type]
            architecture=architecture,
            source=FileSource(str(torch_path)),
            sha256=digests[torch_file],
            converter="state-dict",
            outputs=outputs,
            licence=str(self.card.get("licence", "see model card")),
            description=str(self.card.get("description", f"exported model {name}")),
            has_va="va" in outputs,
            arch_kwargs=self.arch_kwargs(),
            training_data=json.dumps(self.card.get("training_data", "")),
        )


def lookup(name_or_path: str, kind: str) -> ModelEntry:
    """Registry name, or a path to an exported model directory.

    Raises:
        ValueError: unknown name, missing directory, invalid model card, or a model of the other
            kind; one line (``annotator.run.lookup_models`` makes it a configuration error).
    """
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


def _runtime(entry: ModelEntry, backend: str | None, device: str, threads: int, cache_dir,
             shapes: EngineShapes | None = None) -> tuple[Artifacts, Runtime]:
    artifacts = resolve(entry, cache_dir)
    chosen = backend or default_backend(device)
    return artifacts, load_runtime(artifacts, chosen, device, threads, shapes)  # type: ignore[arg-type]


@dataclass
class Scorer:
    """An aligned-crop scorer: 7 expression probabilities (Aff-Wild2 order) and, if any, VA."""

    artifacts: Artifacts
    runtime: Runtime

    @property
    def crop(self) -> CropGeometry:
        """Our models all eat the 112x112 crop on the ArcFace template."""
        from engines.align import CropGeometry

        return CropGeometry()

    @property
    def has_va(self) -> bool:
        return "va" in self.runtime.output_names

    @property
    def model_id(self) -> str:
        return model_id(self.artifacts)

    def __call__(self, crops: torch.Tensor) -> dict[str, torch.Tensor]:
        """Raw outputs on float32 (B, 3, 112, 112) RGB 0..255 crops (training uses the logits)."""
        return self.runtime(crops)

    def predict(self, crops: torch.Tensor) -> tuple[np.ndarray, np.ndarray | None]:
        """(probabilities (N, 7) float32, valence/arousal (N, 2) or None) on the host, for float32
        (N, 3, 112, 112) RGB 0..255 crops on any device (``engines.align.align_faces``' output)."""
        if len(crops) == 0:
            return np.zeros((0, 7), np.float32), (np.zeros((0, 2), np.float32) if self.has_va else None)
        import torch

        outputs = self.runtime(crops)
        probs = torch.softmax(outputs["expr_logits"].float(), dim=1).cpu().numpy()
        return probs, (outputs["va"].float().cpu().numpy() if self.has_va else None)


#: What ``create_scorer`` returns: both have ``crop``, ``predict``, ``has_va`` and ``model_id``.
AnyScorer = Union[Scorer, "SpecScorer"]


def create_scorer(name_or_path: str, backend: str | None = None, device: str = "cpu",
                  threads: int = 0, cache_dir: str | os.PathLike[str] | None = None, *,
                  batch_size: int = 32) -> AnyScorer:
    """Load a scorer by registry name, exported directory or spec file, pulling it on first use.

    ``batch_size``: the run's frames per batch, which sizes a TensorRT engine's profile.

    Raises:
        ValueError: unknown name, bad model card, or (``engines.spec.SpecError``) a bad spec.
    """
    if is_spec(name_or_path):
        from engines.spec_scorer import create_spec_scorer

        return create_spec_scorer(name_or_path, backend, device, threads, cache_dir, batch_size=batch_size)
    entry = lookup(name_or_path, "scorer")
    return Scorer(*_runtime(entry, backend, device, threads, cache_dir, scorer_shapes(batch_size)))


def create_detector(name_or_path: str, backend: str | None = None, device: str = "cpu", threads: int = 0,
                    cache_dir: str | os.PathLike[str] | None = None, *, det_size: int = 640,
                    threshold: float = 0.9, min_face: float = 0.0, batch_size: int = 32,
                    largest_side: int | None = None, int8_frames: bool = False):
    """Load a RetinaFace detector by registry name, pulling it on first use.

    ``batch_size`` and ``largest_side`` (the longest side any call will have: a scan's, else
    ``det_size``) size a TensorRT engine's profile to the run. ``int8_frames``: whole frames go
    through an int8 copy of the network (:mod:`engines.int8`, made on first use), crops through
    the float one; only where the backend is ONNX Runtime on a CPU (:func:`int8_applies`).

    Returns:
        (``engines.retinaface.RetinaFaceDetector``, its artifacts).
    """
    from engines.retinaface import RetinaFaceDetector

    entry = lookup(name_or_path, "detector")
    shapes = detector_shapes(batch_size, max(det_size, largest_side or 0))
    artifacts, runtime = _runtime(entry, backend, device, threads, cache_dir, shapes)
    frame_runtime = None
    if int8_frames and int8_applies(backend or default_backend(device), device):
        from engines.int8 import int8_onnx
        from engines.runtimes.onnxrt import OrtRuntime

        frame_runtime = OrtRuntime(int8_onnx(artifacts, cache_dir), entry.outputs, device, threads)
    detector = RetinaFaceDetector(runtime, det_size=det_size, threshold=threshold, min_face=min_face,
                                  frame_runtime=frame_runtime)
    return detector, artifacts


def int8_applies(backend: str, device: str) -> bool:
    """Whether whole frames may take the int8 network: ONNX Runtime on a CPU (a GPU's engines run
    in their own precision, and the torch backend is the reference)."""
    return backend == "onnxrt" and device == "cpu"

"""``annotate models check SPEC.toml``: one real face through a spec model, end to end.

A spec's mistakes rarely fail loudly: BGR for RGB, 0..255 for 0..1 or a wrong label order all
give plausible-looking numbers. Running the model on a known face (scikit-image's astronaut,
a clear smile), found by our RetinaFace and cut exactly as ``annotate run`` cuts it, and
printing the input tensor's statistics next to the prediction makes them visible in a second.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from engines.registry import EXPRESSIONS
from engines.spec import SpecError

#: The face every check uses: shipped inside scikit-image, so it needs no download.
FACE_IMAGE = "skimage.data.astronaut()"


@dataclass(frozen=True)
class CheckReport:
    """What the model saw and said on the check face."""

    name: str
    backend: str
    box: tuple[float, float, float, float]
    face_score: float
    input_shape: tuple[int, ...]
    layout: str
    channel_stats: tuple[tuple[float, float, float, float], ...]  # per channel: min, max, mean, std
    probs: np.ndarray  # (7,) Aff-Wild2 order
    va: np.ndarray | None  # (2,) or None
    dropped: tuple[str, ...]

    @property
    def top(self) -> str:
        return EXPRESSIONS[int(np.argmax(self.probs))]

    def lines(self) -> list[str]:
        """The printed report, one fact per line."""
        x1, y1, x2, y2 = self.box
        out = [f"{self.name}: on {FACE_IMAGE} (face at {x1:.0f},{y1:.0f}-{x2:.0f},{y2:.0f}, detector score "
               f"{self.face_score:.3f}), backend {self.backend}",
               f"input tensor {'x'.join(map(str, self.input_shape))} ({self.layout}), per channel min / max / mean / std:"]
        for i, (low, high, mean, std) in enumerate(self.channel_stats):
            out.append(f"  channel {i}: {low:9.4f} {high:9.4f} {mean:9.4f} {std:9.4f}")
        out.append("probabilities:")
        out += [f"  {name:<10} {p:.4f}" for name, p in zip(EXPRESSIONS, self.probs)]
        if self.dropped:
            out.append(f"  (dropped and renormalised: {', '.join(self.dropped)})")
        if self.va is not None:
            out.append(f"valence {self.va[0]:+.4f}  arousal {self.va[1]:+.4f}")
        else:
            out.append("valence/arousal: not predicted by this model")
        out.append(f"top class: {self.top}")
        return out


def check_on_astronaut(spec_path: str | os.PathLike[str], cache_dir: str | os.PathLike[str] | None = None) -> CheckReport:
    """Detect the astronaut's face, cut it per the spec, run the model on ONNX Runtime (CPU).

    Raises:
        SpecError: a bad spec (one line naming the file and the key).
        engines.sources.FetchError: the detector cannot be fetched.
    """
    from skimage import data

    from engines.factory import create_detector
    from engines.spec_scorer import create_spec_scorer, preprocess

    scorer = create_spec_scorer(spec_path, "onnxrt", "cpu", cache_dir=cache_dir)
    detector, _ = create_detector("retinaface-mnv2", "onnxrt", "cpu", cache_dir=cache_dir)
    frame = torch.from_numpy(np.ascontiguousarray(data.astronaut()))[None]
    faces = detector.detect(frame)[0]
    if len(faces) == 0:  # cannot happen with the shipped detector; kept as a clear message
        raise SpecError(f"{Path(spec_path)}: no face found on {FACE_IMAGE}")
    crops = scorer.crop.crops(frame, np.zeros(1, np.int64), faces.landmarks[:1])
    tensor = preprocess(scorer.spec, crops)
    channels = tensor.permute(0, 3, 1, 2) if scorer.spec.input.layout == "NHWC" else tensor
    stats = tuple((float(c.min()), float(c.max()), float(c.mean()), float(c.std()))
                  for c in channels[0])
    probs, va = scorer.predict(crops)
    return CheckReport(
        name=scorer.spec.name, backend="onnxrt (cpu)", box=tuple(float(v) for v in faces.boxes[0]),
        face_score=float(faces.scores[0]), input_shape=tuple(tensor.shape), layout=scorer.spec.input.layout,
        channel_stats=stats, probs=probs[0], va=None if va is None else va[0], dropped=scorer.spec.expression.dropped,
    )

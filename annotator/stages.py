"""The per-batch stages of the pipeline, each a small callable class: find → align → score → rows.

Each stage takes what the one before it gave and adds its own part, so a batch reads as a chain
(as in Ray Data's batch-inference examples) and a benchmark can time any stage alone. Tensors
stay on the frames' device until the scorer's probabilities come back to the host.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import numpy as np
import pyarrow as pa
import torch

from annotator.schema import frame_rows
from annotator.tracking import FaceTracker
from engines.align import CropGeometry
from engines.decoders import FrameBatch
from engines.factory import AnyScorer


@dataclass(frozen=True)
class FaceBatch:
    """A batch of frames and what the stages have found on it so far (coordinates: frame pixels)."""

    frames: FrameBatch
    video_path: str
    video_id: str
    counts: np.ndarray  # int64 (F,) faces per frame
    boxes: np.ndarray  # float32 (N, 4), frame by frame, each frame's highest score first
    landmarks: np.ndarray  # float32 (N, 5, 2)
    scores: np.ndarray  # float32 (N,)
    track_ids: np.ndarray  # int64 (N,)
    crops: torch.Tensor | None = None  # float32 (N, 3, S, S) RGB 0..255, the frames' device (S: the scorer's crop)
    probs: np.ndarray | None = None  # float32 (N, 7)
    va: np.ndarray | None = None  # float32 (N, 2), or None for an expression-only scorer

    @property
    def frame_of_face(self) -> np.ndarray:
        return np.repeat(np.arange(len(self.counts)), self.counts)


class FindFaces:
    """Frames → faces with track ids (sequential by nature: each frame follows the last's faces)."""

    def __init__(self, tracker: FaceTracker) -> None:
        self.tracker = tracker

    def __call__(self, frames: FrameBatch, video_path: str, video_id: str) -> FaceBatch:
        faces = self.tracker(frames.frames)
        return FaceBatch(
            frames, video_path, video_id,
            counts=np.array([len(f.scores) for f in faces], dtype=np.int64),
            boxes=np.concatenate([f.boxes for f in faces]).reshape(-1, 4),
            landmarks=np.concatenate([f.landmarks for f in faces]).reshape(-1, 5, 2),
            scores=np.concatenate([f.scores for f in faces]).reshape(-1),
            track_ids=np.concatenate([f.track_ids for f in faces]).astype(np.int64),
        )


class AlignFaces:
    """Faces → their crops on the 5-point template, cut as the scorer asks (``scorer.crop``).

    Our models take the 112x112 crop; a spec model may want another size or more context, and
    gets it cut from the frame directly rather than resampled from the 112 crop.
    """

    def __init__(self, geometry: CropGeometry = CropGeometry()) -> None:
        self.geometry = geometry

    def __call__(self, faces: FaceBatch) -> FaceBatch:
        return replace(faces, crops=self.geometry.crops(faces.frames.frames, faces.frame_of_face, faces.landmarks))


class ScoreFaces:
    """Crops → expression probabilities (and valence/arousal), one scorer call per batch."""

    def __init__(self, scorer: AnyScorer) -> None:
        self.scorer = scorer

    def __call__(self, faces: FaceBatch) -> FaceBatch:
        probs, va = self.scorer.predict(faces.crops)
        return replace(faces, probs=probs, va=va)


class BuildRows:
    """Scored faces → the batch's output rows, coordinates in pixels of the video as displayed."""

    def __init__(self, model_id: str) -> None:
        self.model_id = model_id

    def __call__(self, faces: FaceBatch) -> pa.RecordBatch:
        scale = faces.frames.scale  # frames decoded smaller than the video: back to its pixels
        return frame_rows(
            video_path=faces.video_path, video_id=faces.video_id, model_id=self.model_id,
            frame_index=faces.frames.frame_index, pts_s=faces.frames.pts_s, faces_per_frame=faces.counts,
            boxes=faces.boxes * scale, scores=faces.scores, landmarks=faces.landmarks * scale,
            track_ids=faces.track_ids, probs=faces.probs, va=faces.va,
        )

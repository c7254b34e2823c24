"""Decoding and augmentation: a ``Sample`` becomes the crop ``annotate run`` would score.

Every item is the deployment aligner's output (``engines.align``): the 5-point similarity onto
the 112x112 arcface template, float32 (3, 112, 112) RGB 0..255, zero outside the image. The
paper (PAPER.md "Input") resizes its aligned crops to ~134 and crops 112 at random for training
and in the centre for evaluation; here that would be a 1.2x zoom the deployed student never sees.
So evaluation is exactly ``engines.align.align_faces`` (no resize, no crop), and training keeps
the paper's augmentation in the alignment transform instead, centred on the template so that the
face's scale and position do not change on average:

- random translation (PAPER.md section 3.3) of up to ``MAX_SHIFT`` px: the paper's crop slack
  (134 - 112 = 22 px, i.e. +-11 px at 134) measured back at 112 (+-9 px);
- a scale factor uniform on ``1 +- MAX_SCALE``: RetinaFace's landmarks vary this much between
  frames of one face (box size std ~6 %, centre ~3 px on the carphone clip), so the student
  learns to ignore it;
- horizontal flip with probability 0.5.
Pixels stay on 0..255 because the network normalises internally.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

import numpy as np
import torch
from torch.utils.data import Dataset

from engines.align import CROP_SIZE, align_faces, similarity_matrices, warp
from training.datasets.alignment import decode_image
from training.labels import Sample

logger = logging.getLogger(__name__)

MAX_SHIFT = 9.0  # crop pixels
MAX_SCALE = 0.05
FLIP_P = 0.5


def drop_missing_images(samples: list[Sample], source: str) -> list[Sample]:
    """Keep samples whose image exists; log how many were skipped and why."""
    kept = [s for s in samples if s.image.is_file()]
    if len(kept) < len(samples):
        logger.warning("%s: skipped %d samples whose image file is missing", source, len(samples) - len(kept))
    return kept


def jitter_matrix(generator: torch.Generator | None = None) -> np.ndarray:
    """A random similarity of the 112 crop about its centre: scale 1 +- MAX_SCALE, shift +- MAX_SHIFT.

    Returns:
        float64 (3, 3) crop pixels -> crop pixels; uniform draws, so scale 1 and shift 0 on average.
    """
    scale, shift_x, shift_y = (torch.rand(3, generator=generator, dtype=torch.float64) * 2 - 1).tolist()
    s = 1 + scale * MAX_SCALE
    centre = (CROP_SIZE - 1) / 2  # pixel centres run 0..111
    return np.array([[s, 0, (1 - s) * centre + shift_x * MAX_SHIFT],
                     [0, s, (1 - s) * centre + shift_y * MAX_SHIFT],
                     [0, 0, 1]])


def training_crop(frame: torch.Tensor, landmarks: np.ndarray, generator: torch.Generator | None = None) -> torch.Tensor:
    """The aligned crop under a random jitter (then a random flip): float32 (3, 112, 112) 0..255."""
    matrix = jitter_matrix(generator) @ np.vstack([similarity_matrices(landmarks[None])[0], [0, 0, 1]])
    crop = warp(frame[None], np.zeros(1, np.int64), matrix[None, :2].astype(np.float32), CROP_SIZE)[0]
    if torch.rand((), generator=generator) < FLIP_P:
        crop = crop.flip(-1)
    return crop


def evaluation_crop(frame: torch.Tensor, landmarks: np.ndarray) -> torch.Tensor:
    """Exactly the crop ``annotate run``'s align stage cuts: float32 (3, 112, 112) 0..255."""
    return align_faces(frame[None], np.zeros(1, np.int64), landmarks[None])[0]


class FaceDataset(Dataset):
    """Samples with landmarks -> ``(image (3, 112, 112) float32 0..255, expr int64, va (2,) float32)``.

    Jitter and flip draw from torch's RNG, so DataLoader worker seeding makes them reproducible.
    Samples must carry landmarks (``training.datasets.alignment.with_landmarks``), so the
    detector never runs inside a DataLoader worker.
    """

    def __init__(self, samples: Sequence[Sample], train: bool) -> None:
        unaligned = [s.image for s in samples if s.landmarks is None]
        if unaligned:
            raise ValueError(f"{len(unaligned)} samples have no landmarks (first: {unaligned[0]}); "
                             "pass them through training.datasets.alignment.with_landmarks")
        self.samples = samples
        self.train = train

    def __len__(self) -> int:
        return len(self.samples)

    def load(self, index: int) -> torch.Tensor:
        """The decoded image, uint8 (H, W, 3) RGB; a subclass may cache it."""
        return torch.from_numpy(np.ascontiguousarray(decode_image(self.samples[index].image)))

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        sample = self.samples[index]
        landmarks = np.asarray(sample.landmarks, np.float32)
        frame = self.load(index)
        image = training_crop(frame, landmarks) if self.train else evaluation_crop(frame, landmarks)
        labels = torch.tensor([sample.valence, sample.arousal], dtype=torch.float32)
        return image.contiguous(), torch.tensor(sample.expr, dtype=torch.int64), labels

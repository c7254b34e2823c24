"""Decoding and augmentation: a ``Sample`` becomes a float32 (3, crop, crop) RGB tensor in 0..255.

PAPER.md: "resize to ~134 then random crop 112 and horizontal flip" for training, centre crop for
evaluation. Pixels stay on 0..255 because the network normalises internally.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset

from training.labels import Sample

logger = logging.getLogger(__name__)


def drop_missing_images(samples: list[Sample], source: str) -> list[Sample]:
    """Keep samples whose image exists; log how many were skipped and why."""
    kept = [s for s in samples if s.image.is_file()]
    if len(kept) < len(samples):
        logger.warning("%s: skipped %d samples whose image file is missing", source, len(samples) - len(kept))
    return kept


def load_face(sample: Sample, resize: int) -> np.ndarray:
    """Decode, crop to the face box (clamped to the image) and resize to ``resize`` x ``resize``.

    Returns:
        uint8 (resize, resize, 3) RGB.
    """
    with Image.open(sample.image) as image:
        image = image.convert("RGB")
        if sample.box is not None:
            left, top, right, bottom = sample.box
            image = image.crop((max(left, 0), max(top, 0), min(right, image.width), min(bottom, image.height)))
        return np.array(image.resize((resize, resize), Image.Resampling.BILINEAR))


class FaceDataset(Dataset):
    """Samples -> ``(image (3, crop, crop) float32 0..255, expr int64, va (2,) float32)``.

    Random crop and flip draw from torch's RNG, so DataLoader worker seeding makes them
    reproducible.
    """

    def __init__(self, samples: Sequence[Sample], resize: int, crop: int, train: bool) -> None:
        if crop > resize:
            raise ValueError(f"crop {crop} larger than resize {resize}")
        self.samples = samples
        self.resize = resize
        self.crop = crop
        self.train = train

    def __len__(self) -> int:
        return len(self.samples)

    def load(self, index: int) -> torch.Tensor:
        """The resized face as float32 (3, resize, resize); a subclass may cache it."""
        return torch.from_numpy(load_face(self.samples[index], self.resize)).permute(2, 0, 1).float()

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        sample = self.samples[index]
        image = self.load(index)
        slack = self.resize - self.crop
        if self.train:
            top, left = (int(v) for v in torch.randint(0, slack + 1, (2,)))
        else:
            top = left = slack // 2
        image = image[:, top:top + self.crop, left:left + self.crop]
        if self.train and torch.rand(()) < 0.5:
            image = image.flip(-1)
        labels = torch.tensor([sample.valence, sample.arousal], dtype=torch.float32)
        return image.contiguous(), torch.tensor(sample.expr, dtype=torch.int64), labels

"""DataLoaders for the training streams (balanced, with replacement) and for evaluation.

Each epoch draws ``steps_per_epoch`` batches from every non-empty stream, each batch holding an
equal share (``batch_size // streams``) of the step. The sampler generator is seeded from
``(seed, epoch, stream)`` so a resumed run draws exactly the same samples as an uninterrupted one.

Both loaders first give every sample its five landmarks (``training.datasets.alignment``, cached)
so that training and evaluation cut the crop ``annotate run`` cuts.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import torch
from torch.utils.data import DataLoader

from training.config import TrainConfig
from training.datasets.alignment import with_landmarks
from training.datasets.images import FaceDataset
from training.datasets.streams import STREAMS, Streams
from training.labels import Sample
from training.samplers import balanced_sampler, stream_weights

logger = logging.getLogger(__name__)

Batch = tuple[torch.Tensor, torch.Tensor, torch.Tensor]  # images, expr, va
# Which label parts weight each stream (PAPER.md: combined stream uses the sum).
_WEIGHT_PARTS = {"expr": (True, False), "va": (False, True), "combined": (True, True)}


@dataclass(frozen=True)
class TrainStreams:
    """The non-empty training streams with their sampling weights and per-step share."""

    datasets: dict[str, FaceDataset]
    weights: dict[str, np.ndarray]
    per_stream_batch: int
    steps_per_epoch: int
    num_workers: int
    seed: int

    def epoch(self, epoch: int) -> Iterator[dict[str, Batch]]:
        """Yield ``steps_per_epoch`` dicts ``stream name -> batch``."""
        loaders = []
        for index, name in enumerate(self.datasets):
            generator = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch * len(STREAMS) + index)
            sampler = balanced_sampler(self.weights[name], self.steps_per_epoch * self.per_stream_batch, generator)
            loaders.append(DataLoader(self.datasets[name], batch_size=self.per_stream_batch, sampler=sampler,
                                      num_workers=self.num_workers, drop_last=True))
        for batches in zip(*loaders, strict=True):
            yield dict(zip(self.datasets, batches, strict=True))


def make_train_streams(streams: Streams, config: TrainConfig) -> TrainStreams:
    """Wrap the non-empty streams; an epoch defaults to one pass over the largest stream."""
    present = {name: samples for name, samples in streams.train.items() if samples}
    for name in set(STREAMS) - set(present):
        logger.warning("stream %s is empty; training on %s only", name, sorted(present))
    per_stream = config.batch_size // len(present)
    steps = config.steps_per_epoch or max(1, max(len(s) for s in present.values()) // per_stream)
    return TrainStreams(
        datasets={name: FaceDataset(with_landmarks(samples, config.device), train=True)
                  for name, samples in present.items()},
        weights={name: stream_weights(samples, *_WEIGHT_PARTS[name], bins=config.va_bins)
                 for name, samples in present.items()},
        per_stream_batch=per_stream,
        steps_per_epoch=steps,
        num_workers=config.num_workers,
        seed=config.seed,
    )


def make_eval_loader(samples: list[Sample], config: TrainConfig) -> DataLoader:
    """Loader in file order of exactly the deployment crops (no augmentation)."""
    dataset = FaceDataset(with_landmarks(samples, config.device), train=False)
    return DataLoader(dataset, batch_size=config.batch_size, num_workers=config.num_workers)

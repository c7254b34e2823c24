"""Class-balancing weights for sampling with replacement (PAPER.md "Class balance").

EXPR weight = 1 / count of the sample's class; VA weight = 1 / count of the sample's cell in a
20x20 valence-arousal histogram over [-1, 1]; the combined stream sums both. A label that is
missing contributes 0 to the weight.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from torch.utils.data import WeightedRandomSampler

from training.labels import MISSING, Sample


def expr_weights(expr: np.ndarray) -> np.ndarray:
    """1 / class count per sample; 0 where the label is ``MISSING``."""
    weights = np.zeros(len(expr), dtype=np.float64)
    labelled = expr != MISSING
    _, inverse, counts = np.unique(expr[labelled], return_inverse=True, return_counts=True)
    weights[labelled] = 1.0 / counts[inverse]
    return weights


def va_cells(values: np.ndarray, bins: int) -> np.ndarray:
    """Histogram cell index of values on [-1, 1]: ``floor((v + 1) / 2 * bins)``, 1.0 in the last cell."""
    return np.clip(np.floor((values + 1.0) / 2.0 * bins), 0, bins - 1).astype(np.int64)


def va_weights(valence: np.ndarray, arousal: np.ndarray, bins: int = 20) -> np.ndarray:
    """1 / count of the sample's (valence, arousal) histogram cell; 0 where VA is ``MISSING``."""
    weights = np.zeros(len(valence), dtype=np.float64)
    labelled = (valence != MISSING) & (arousal != MISSING)
    cells = va_cells(valence[labelled], bins) * bins + va_cells(arousal[labelled], bins)
    _, inverse, counts = np.unique(cells, return_inverse=True, return_counts=True)
    weights[labelled] = 1.0 / counts[inverse]
    return weights


def stream_weights(samples: Sequence[Sample], use_expr: bool, use_va: bool, bins: int = 20) -> np.ndarray:
    """Per-sample weights of one stream: EXPR part, VA part, or their sum for the combined stream."""
    weights = np.zeros(len(samples), dtype=np.float64)
    if use_expr:
        weights += expr_weights(np.array([s.expr for s in samples]))
    if use_va:
        weights += va_weights(np.array([s.valence for s in samples]), np.array([s.arousal for s in samples]), bins)
    return weights


def balanced_sampler(weights: np.ndarray, num_samples: int, generator: torch.Generator) -> WeightedRandomSampler:
    """Sampler drawing ``num_samples`` indices with replacement in proportion to ``weights``."""
    return WeightedRandomSampler(torch.as_tensor(weights, dtype=torch.double), num_samples,
                                 replacement=True, generator=generator)

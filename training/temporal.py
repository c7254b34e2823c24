"""The temporal stage's training: a bidirectional GRU per task over frozen CNN features.

PAPER.md "Temporal stage" (section 3.4): the trained CNN student, frozen, extracts one feature
per frame; features are grouped into sequences of 32 frames; ``engines.models.temporal.TemporalNet``
predicts EXPR and VA per frame, trained with the CNN's losses (``training.losses``): the teacher on
ground truth alone, the student on 0.6 x ground truth + 0.4 x distillation from that teacher
(frames without a label of a task: distillation alone at weight 1). Batch 16 sequences
(PAPER.md section 4.1), Adam with the config's lr and betas, early stopping on the same
selection score (EXPR score + CCC_V + CCC_A), best checkpoint kept, resumable from ``last.pt``.

Sequence-level augmentation (random translation and horizontal flip of the whole sequence,
section 3.3) meets a frozen CNN: the features of a transformed sequence are the CNN's features of
transformed crops. So each video's features are extracted under ``variants`` fixed transforms
(variant 0 is the plain deployment crop; each other variant one random shift and flip applied to
every frame of the video) once, before training, and each epoch every window draws one variant.
That keeps every window consistently transformed, as in the paper, at the cost of a finite set
of transforms per video instead of a fresh one per window.

Inputs here are :class:`FeatureSequence` arrays, so the same loop trains on Aff-Wild2
(``training.temporal_data``) and on the synthetic benchmark (``training.synthetic_temporal``).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch

from engines.models.temporal import GRU_UNITS, STRIDE, WINDOW, TemporalNet, window_plan
from engines.models.student import va_expectation
from training import checkpoint
from training.config import TrainConfig
from training.labels import MISSING
from training.losses import (distillation, expr_ce, expr_labelled, student_mix, task_total, va_gt_loss,
                             va_labelled)
from training.metrics import abaw_metrics

logger = logging.getLogger(__name__)

#: PAPER.md section 4.1: "16 for the GRU".
PAPER_BATCH = 16
#: Transformed copies of each training video's features (plus the plain one); 4 gives each
#: window a 1-in-5 choice, at 5 feature passes of the frozen CNN over the training frames.
DEFAULT_VARIANTS = 4


@dataclass(frozen=True)
class TemporalConfig:
    """Hyper-parameters of the GRU stage; the shared ones come from the CNN's ``TrainConfig``."""

    window: int = WINDOW
    batch_size: int = PAPER_BATCH
    units: tuple[int, ...] = GRU_UNITS
    variants: int = DEFAULT_VARIANTS
    lr: float = 1e-4
    betas: tuple[float, float] = (0.5, 0.999)
    epochs: int = 40
    patience: int = 5
    temperature: float = 1.5
    alpha: float = 0.6
    steps_per_epoch: int | None = None  # None: every window of the epoch's cover once
    seed: int = 0
    device: str = "cpu"

    @classmethod
    def from_train_config(cls, config: TrainConfig, **overrides: Any) -> TemporalConfig:
        """The optimiser, schedule, distillation and device of a CNN config, GRU values per the paper."""
        shared = {key: getattr(config, key) for key in
                  ("lr", "betas", "epochs", "patience", "temperature", "alpha", "seed", "device")}
        return cls(**{**shared, **overrides})


@dataclass
class FeatureSequence:
    """One video (or track) in frame order: its frozen-CNN features and its labels.

    ``features`` is (V, L, F), V augmentation variants (0 = no augmentation; a validation
    sequence has only that one), float16 or float32 (a memory map for large sets); ``expr`` (L,)
    int64 with ``MISSING``; ``va`` (L, 2) float32 with ``MISSING`` rows.
    """

    name: str
    features: np.ndarray
    expr: np.ndarray
    va: np.ndarray

    def __len__(self) -> int:
        return int(self.features.shape[1])


def feature_statistics(sequences: list[FeatureSequence]) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-dimension mean and std of the plain (variant 0) training features."""
    total, squares, count = 0.0, 0.0, 0
    for sequence in sequences:
        x = np.asarray(sequence.features[0], np.float64)
        total = total + x.sum(axis=0)
        squares = squares + (x ** 2).sum(axis=0)
        count += len(x)
    mean = total / count
    std = np.sqrt(np.maximum(squares / count - mean ** 2, 0.0))
    return torch.tensor(mean, dtype=torch.float32), torch.tensor(std, dtype=torch.float32)


def epoch_windows(sequences: list[FeatureSequence], window: int, rng: np.random.Generator) -> list[tuple[int, int, int, int]]:
    """One epoch's windows ``(sequence, variant, start, length)``, shuffled.

    Each sequence is cut into consecutive windows from a random offset (a sequence shorter than
    a window is one shorter window), so an epoch sees every sequence about once and windows fall
    on different frames each epoch.
    """
    windows = []
    for index, sequence in enumerate(sequences):
        length, variants = len(sequence), sequence.features.shape[0]
        if length <= window:
            windows.append((index, int(rng.integers(variants)), 0, length))
            continue
        for start in range(int(rng.integers(min(window, length - window + 1))), length - window + 1, window):
            windows.append((index, int(rng.integers(variants)), start, window))
    order = rng.permutation(len(windows))
    return [windows[i] for i in order]


def batches(sequences: list[FeatureSequence], windows: list[tuple[int, int, int, int]],
            batch_size: int) -> list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    """Stack windows of equal length into (features (B, T, F), expr (B, T), va (B, T, 2)) batches."""
    by_length: dict[int, list[tuple[int, int, int, int]]] = {}
    for item in windows:
        by_length.setdefault(item[3], []).append(item)
    out = []
    for group in by_length.values():
        for first in range(0, len(group), batch_size):
            chunk = group[first:first + batch_size]
            x = np.stack([np.asarray(sequences[s].features[v, a:a + t], np.float32) for s, v, a, t in chunk])
            expr = np.stack([sequences[s].expr[a:a + t] for s, _, a, t in chunk])
            va = np.stack([sequences[s].va[a:a + t] for s, _, a, t in chunk])
            out.append((torch.from_numpy(x), torch.from_numpy(expr.astype(np.int64)),
                        torch.from_numpy(va.astype(np.float32))))
    order = np.argsort([-len(b[0]) for b in out], kind="stable")  # full windows first
    return [out[i] for i in order]


def _task_term(gt: torch.Tensor | None, logits: torch.Tensor, soft: torch.Tensor | None,
               labelled: torch.Tensor, config: TemporalConfig) -> list[torch.Tensor]:
    """As ``training.loops``: ground truth alone for a teacher, else the student mix."""
    if soft is None:
        return [] if gt is None else [gt]
    return [student_mix(gt, distillation(logits, soft, config.temperature), labelled, config.alpha)]


def sequence_loss(model: TemporalNet, features: torch.Tensor, expr: torch.Tensor, va: torch.Tensor,
                  config: TemporalConfig, teacher: TemporalNet | None = None) -> torch.Tensor:
    """The CNN's loss over every frame of a batch of windows (frames flattened into one batch).

    CCC is a batch statistic, so it runs over all labelled frames of the B x T batch; a task
    with fewer than two labelled frames has no ground-truth term (CCC needs a variance).
    """
    expr_logits, va_logits = model(features)
    expr_logits = expr_logits.reshape(-1, expr_logits.shape[-1])
    va_logits = va_logits.reshape(-1, 2, va_logits.shape[-1])
    expr, va = expr.reshape(-1), va.reshape(-1, 2)
    expr_mask, va_mask = expr_labelled(expr), va_labelled(va)
    expr_gt = expr_ce(expr_logits, expr) if expr_mask.any() else None
    va_gt = va_gt_loss(va_logits, va) if int(va_mask.sum()) >= 2 else None
    soft_expr = soft_va = None
    if teacher is not None:
        with torch.no_grad():
            soft_expr, soft_va = teacher(features)
        soft_expr, soft_va = soft_expr.reshape(expr_logits.shape), soft_va.reshape(va_logits.shape)
    return task_total(_task_term(expr_gt, expr_logits, soft_expr, expr_mask, config),
                      _task_term(va_gt, va_logits, soft_va, va_mask, config))


@torch.no_grad()
def predict_sequence(model: TemporalNet, features: np.ndarray, window: int = WINDOW,
                     stride: int = STRIDE) -> tuple[np.ndarray, np.ndarray]:
    """Per-frame (expr logits (L, 7), va (L, 2)) of one sequence, windowed as ``annotate run`` does."""
    model.eval()
    x = torch.from_numpy(np.asarray(features, np.float32))
    expr_out = np.zeros((len(x), model.expr.out.out_features), np.float32)
    va_out = np.zeros((len(x), 2), np.float32)
    for piece in window_plan(len(x), window, stride):
        expr_logits, va_logits = model(x[None, piece.start:piece.end])
        keep = slice(piece.keep_from - piece.start, piece.keep_to - piece.start)
        expr_out[piece.keep_from:piece.keep_to] = expr_logits[0, keep].numpy()
        va_out[piece.keep_from:piece.keep_to] = va_expectation(va_logits[0, keep]).numpy()
    return expr_out, va_out


def evaluate_temporal(model: TemporalNet, sequences: list[FeatureSequence], window: int = WINDOW) -> dict[str, float]:
    """ABAW2 metrics of the windowed predictions over the labelled frames of every sequence."""
    preds = [predict_sequence(model, s.features[0], window) for s in sequences]
    expr_pred = np.concatenate([p[0].argmax(axis=1) for p in preds])
    va_pred = np.concatenate([p[1] for p in preds])
    expr = np.concatenate([s.expr for s in sequences])
    va = np.concatenate([s.va for s in sequences])
    expr_mask, va_mask = expr != MISSING, (va != MISSING).all(axis=1)
    return abaw_metrics(expr_pred[expr_mask], expr[expr_mask], va_pred[va_mask], va[va_mask])


def build_temporal(in_features: int, train: list[FeatureSequence], config: TemporalConfig) -> TemporalNet:
    """A fresh GRU stage standardised on the training features."""
    checkpoint.seed_everything(config.seed)
    model = TemporalNet(in_features, tuple(config.units))
    model.set_standardisation(*feature_statistics(train))
    return model


def fit_temporal(model: TemporalNet, train: list[FeatureSequence], validation: list[FeatureSequence],
                 config: TemporalConfig, out_dir: Path, meta: dict[str, Any],
                 teacher: TemporalNet | None = None) -> dict[str, float]:
    """Train until ``config.epochs`` or ``config.patience`` epochs without improvement.

    Same contract as ``training.loops.fit``: resumes from ``out_dir/last.pt`` (a finished run
    returns at once), writes ``best.pt`` (``{"temporal": meta, "model", "metrics", "epoch"}``)
    whenever the selection score improves. ``meta`` must rebuild the network
    (``in_features``, ``units``) and names the frozen student it was trained on.

    Returns:
        The validation metrics of the best epoch.
    """
    out_dir.mkdir(parents=True, exist_ok=True)
    device = torch.device(config.device)
    model.to(device)
    if teacher is not None:
        teacher.to(device).eval()
    optimizer = torch.optim.Adam(model.parameters(), lr=config.lr, betas=config.betas)
    state = checkpoint.start(out_dir, model, optimizer, config.seed)
    while state["epoch"] < config.epochs and state["bad_epochs"] < config.patience:
        epoch = state["epoch"]
        rng = np.random.default_rng((config.seed, epoch))  # the same windows after a resume
        steps = batches(train, epoch_windows(train, config.window, rng), config.batch_size)
        if config.steps_per_epoch is not None:
            steps = [steps[i % len(steps)] for i in range(config.steps_per_epoch)]
        model.train()
        total = 0.0
        for features, expr, va in steps:
            loss = sequence_loss(model, features.to(device), expr.to(device), va.to(device), config, teacher)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            total += float(loss.detach())
        metrics = evaluate_temporal(model.cpu(), validation, config.window)
        model.to(device)
        logger.info("temporal epoch %d: loss %.4f, %s", epoch + 1, total / max(len(steps), 1),
                    ", ".join(f"{k} {v:.4f}" for k, v in metrics.items()))
        checkpoint.end_epoch(state, metrics["selection"], metrics, {"temporal": meta}, model, optimizer, out_dir)
    logger.info("temporal stage done after %d epochs; best selection score %.4f", state["epoch"], state["best_score"])
    return state["best_metrics"]


def load_temporal(path: Path) -> tuple[TemporalNet, dict[str, Any]]:
    """Rebuild the GRU stage of a ``best.pt``/``last.pt`` written by :func:`fit_temporal` (eval mode).

    Raises:
        KeyError: the file is not a temporal checkpoint (no ``temporal`` metadata).
    """
    saved = checkpoint.load(path)
    meta = saved["temporal"]
    model = TemporalNet(int(meta["in_features"]), tuple(meta["units"]))
    model.load_state_dict(saved["model"])
    return model.eval(), saved


def with_overrides(config: TemporalConfig, **values: Any) -> TemporalConfig:
    """``config`` with the given non-None values replaced (CLI options that were passed)."""
    return replace(config, **{key: value for key, value in values.items() if value is not None})

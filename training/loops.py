"""Teacher and student training loops with early stopping and resumable checkpoints.

Both roles share one loop: the teacher is trained on ground truth only (``teacher=None``), by
default each stream's own task only (Eq. 7); the student is a fresh network trained on
``alpha`` * ground truth + (1 - alpha) * distillation from a teacher (PAPER.md "Losses"). Every
step draws one batch per stream and runs a separate forward pass per stream, so batch-norm
statistics are per stream.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader

from engines.models.student import MultitaskNet, va_expectation
from training import checkpoint
from training.config import TrainConfig
from training.labels import MISSING
from training.loaders import Batch, TrainStreams
from training.losses import (distillation, expr_ce, expr_labelled, student_mix, task_total, va_gt_loss,
                             va_labelled)
from training.metrics import abaw_metrics
from training.progress import step_bar
from training.teachers import Teacher, soft_labels

logger = logging.getLogger(__name__)

# The task(s) whose ground truth defines each stream (PAPER.md "Data"); any other label a frame of
# the stream carries is a cross-task label of a shared frame.
OWN_TASKS: dict[str, tuple[str, ...]] = {"expr": ("expr",), "va": ("va",), "combined": ("expr", "va")}


def make_optimizer(model: MultitaskNet, config: TrainConfig) -> torch.optim.Optimizer:
    """Adam with the configured lr and betas (paper: 1e-4, (0.5, 0.999))."""
    return torch.optim.Adam(model.parameters(), lr=config.lr, betas=config.betas)


def _term(gt: torch.Tensor | None, logits: torch.Tensor, teacher_logits: torch.Tensor | None,
          labelled: torch.Tensor, config: TrainConfig) -> list[torch.Tensor]:
    """One (stream, task) term: GT alone without soft labels, else the student mix."""
    if teacher_logits is None:
        return [] if gt is None else [gt]
    return [student_mix(gt, distillation(logits, teacher_logits, config.temperature), labelled, config.alpha)]


def own_labels(stream: str, expr: torch.Tensor, va: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The labels of a stream's own task(s); the other task's labels (shared frames) become ``MISSING``.

    The expression stream owns EXPR, the valence-arousal stream VA, the combined stream both.

    Raises:
        ValueError: a stream name outside ``OWN_TASKS``.
    """
    if stream not in OWN_TASKS:
        raise ValueError(f"unknown stream {stream!r}; expected one of {sorted(OWN_TASKS)}")
    tasks = OWN_TASKS[stream]
    return (expr if "expr" in tasks else torch.full_like(expr, MISSING),
            va if "va" in tasks else torch.full_like(va, MISSING))


def step_loss(model: MultitaskNet, batches: dict[str, Batch], teacher: Teacher | None,
              config: TrainConfig) -> tuple[torch.Tensor, dict[str, float]]:
    """Total loss of one step: mean EXPR term over streams + mean VA term over streams.

    ``batches`` maps stream names (``expr``, ``va``, ``combined``) to batches. Cross-task labels of
    shared frames count only where the role's switch allows it (``config.teacher_cross_task``,
    default off as in the paper's Eq. 7; ``config.student_cross_task``, default on): without
    them the teacher has no term for the other task on that stream and the student distils it
    alone at weight 1.
    """
    cross_task = config.student_cross_task if teacher is not None else config.teacher_cross_task
    expr_terms: list[torch.Tensor] = []
    va_terms: list[torch.Tensor] = []
    for stream, (images, expr, va) in batches.items():
        if not cross_task:
            expr, va = own_labels(stream, expr, va)
        expr_logits, va_logits = model(images)
        soft_expr, soft_va = soft_labels(teacher, images) if teacher is not None else (None, None)
        expr_mask, va_mask = expr_labelled(expr), va_labelled(va)
        expr_gt = expr_ce(expr_logits, expr) if expr_mask.any() else None
        va_gt = va_gt_loss(va_logits, va) if va_mask.any() else None
        expr_terms += _term(expr_gt, expr_logits, soft_expr, expr_mask, config)
        va_terms += _term(va_gt, va_logits, soft_va, va_mask, config)
    total = task_total(expr_terms, va_terms)
    parts = {
        "expr": float(torch.stack(expr_terms).mean().detach()) if expr_terms else 0.0,
        "va": float(torch.stack(va_terms).mean().detach()) if va_terms else 0.0,
    }
    return total, parts


def train_epoch(model: MultitaskNet, streams: TrainStreams, optimizer: torch.optim.Optimizer, epoch: int,
                config: TrainConfig, teacher: Teacher | None = None) -> dict[str, float]:
    """One epoch of ``streams.steps_per_epoch`` steps; returns the mean losses."""
    model.train()
    device = torch.device(config.device)
    sums = {"loss": 0.0, "expr": 0.0, "va": 0.0}
    bar = step_bar(streams.epoch(epoch), streams.steps_per_epoch, f"epoch {epoch + 1}/{config.epochs}")
    for step, batches in enumerate(bar, start=1):
        batches = {name: tuple(t.to(device) for t in batch) for name, batch in batches.items()}
        loss, parts = step_loss(model, batches, teacher, config)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        for key, value in (("loss", float(loss.detach())), *parts.items()):
            sums[key] += value
        bar.set_postfix({key: f"{value / step:.3f}" for key, value in sums.items()})
    return {key: value / streams.steps_per_epoch for key, value in sums.items()}


@torch.no_grad()
def predict(model: torch.nn.Module, loader: DataLoader, device: str) -> tuple[np.ndarray, ...]:
    """Predictions and targets over a loader: expr (pred, target), va (pred, target)."""
    model.eval()
    outputs: dict[str, list[np.ndarray]] = {"expr_pred": [], "expr": [], "va_pred": [], "va": []}
    for images, expr, va in loader:
        expr_logits, va_logits = model(images.to(device))
        outputs["expr_pred"].append(expr_logits.argmax(dim=1).cpu().numpy())
        outputs["va_pred"].append(va_expectation(va_logits).cpu().numpy())
        outputs["expr"].append(expr.numpy())
        outputs["va"].append(va.numpy())
    return tuple(np.concatenate(outputs[key]) for key in ("expr_pred", "expr", "va_pred", "va"))


def evaluate(model: MultitaskNet, loader: DataLoader, device: str) -> dict[str, float]:
    """ABAW2 metrics over the labelled frames of each task."""
    expr_pred, expr, va_pred, va = predict(model, loader, device)
    expr_mask = expr != MISSING
    va_mask = (va != MISSING).all(axis=1)
    return abaw_metrics(expr_pred[expr_mask], expr[expr_mask], va_pred[va_mask], va[va_mask])


def fit(model: MultitaskNet, optimizer: torch.optim.Optimizer, streams: TrainStreams, val_loader: DataLoader,
        config: TrainConfig, out_dir: Path, arch: dict[str, str], teacher: Teacher | None = None) -> dict[str, float]:
    """Train until ``config.epochs`` or ``config.patience`` epochs without improvement.

    Resumes from ``out_dir/last.pt`` when it exists (a finished run returns at once; a run
    given more epochs continues where it stopped). Writes
    ``best.pt`` whenever the selection score (EXPR score + CCC_V + CCC_A) improves.

    Returns:
        The validation metrics of the best epoch.
    """
    out_dir.mkdir(parents=True, exist_ok=True)
    state = checkpoint.start(out_dir, model, optimizer, config.seed)
    # Recomputed from the current config, so a resumed run with more epochs continues.
    while state["epoch"] < config.epochs and state["bad_epochs"] < config.patience:
        epoch, started = state["epoch"], time.monotonic()
        losses = train_epoch(model, streams, optimizer, epoch, config, teacher)
        metrics = evaluate(model, val_loader, config.device)
        logger.info("epoch %d/%d: loss %.4f, %s (%.0f s)", epoch + 1, config.epochs, losses["loss"],
                    ", ".join(f"{k} {v:.4f}" for k, v in metrics.items()), time.monotonic() - started)
        checkpoint.end_epoch(state, metrics["selection"], metrics, {"arch": arch}, model, optimizer, out_dir)
    logger.info("done after %d epochs; best selection score %.4f", state["epoch"], state["best_score"])
    return state["best_metrics"]

"""Loss terms of the teacher and the student, as pure functions of tensors (PAPER.md "Losses").

Shapes: ``expr_logits`` (B, 7), ``expr`` (B,) int64 with ``MISSING`` = -2; ``va_logits``
(B, 2, bins), ``va`` (B, 2) float on [-1, 1] with ``MISSING`` rows. Per-sample functions return
(B,) tensors so the student mix can weight labelled and unlabelled frames differently.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from engines.models.student import va_expectation
from training.labels import MISSING

# Keeps 1 - CCC finite for a batch whose prediction and target are both constant.
CCC_EPS = 1e-8


def expr_labelled(expr: torch.Tensor) -> torch.Tensor:
    """(B,) bool: rows with an expression label."""
    return expr != MISSING


def va_labelled(va: torch.Tensor) -> torch.Tensor:
    """(B,) bool: rows with both valence and arousal."""
    return (va != MISSING).all(dim=1)


def expr_ce(expr_logits: torch.Tensor, expr: torch.Tensor) -> torch.Tensor:
    """Mean cross-entropy over the labelled rows (rows with ``MISSING`` are masked out).

    Callers only ask for it when at least one row is labelled.
    """
    mask = expr_labelled(expr)
    return F.cross_entropy(expr_logits[mask], expr[mask])


def digitize_va(va: torch.Tensor, bins: int) -> torch.Tensor:
    """Bin index of values on [-1, 1] in ``bins`` equal bins; 1.0 falls in the last bin."""
    return ((va + 1.0) / 2.0 * bins).floor().clamp(0, bins - 1).long()


def ccc(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Concordance correlation coefficient over the batch, population statistics, differentiable."""
    mean_x, mean_y = x.mean(), y.mean()
    cov = ((x - mean_x) * (y - mean_y)).mean()
    return 2 * cov / (x.var(unbiased=False) + y.var(unbiased=False) + (mean_x - mean_y) ** 2 + CCC_EPS)


def va_gt_loss(va_logits: torch.Tensor, va: torch.Tensor) -> torch.Tensor:
    """Sum over valence and arousal of CE(digitised target) + (1 - CCC(expectation, target)).

    Only rows with VA labels count; the two dimensions are summed, as the upstream code does.
    """
    mask = va_labelled(va)
    logits, target = va_logits[mask], va[mask]
    bins = logits.shape[-1]
    values = va_expectation(logits)
    total = logits.new_zeros(())
    for dim in range(2):
        total = total + F.cross_entropy(logits[:, dim], digitize_va(target[:, dim], bins))
        total = total + 1 - ccc(values[:, dim], target[:, dim])
    return total


def distillation(student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """Per-sample T^2 * KL(softmax(teacher/T) || softmax(student/T)) over the last axis.

    For VA logits (B, 2, bins) each 20-bin distribution is distilled separately and the two
    dimensions are summed, matching ``va_gt_loss``. Returns (B,).
    """
    teacher = F.log_softmax(teacher_logits / temperature, dim=-1)
    student = F.log_softmax(student_logits / temperature, dim=-1)
    kl = (teacher.exp() * (teacher - student)).sum(dim=-1)
    if kl.dim() == 2:
        kl = kl.sum(dim=1)
    return temperature**2 * kl


def student_mix(gt: torch.Tensor | None, kd: torch.Tensor, labelled: torch.Tensor, alpha: float) -> torch.Tensor:
    """One stream's student term for one task: per frame 0.6 GT + 0.4 KD if labelled, else KD.

    The ground-truth loss is a batch quantity (CCC is over the batch), so it enters weighted by
    the labelled fraction: ``(n_l / n) * alpha * gt + mean_i(w_i * kd_i)`` with ``w_i = 1 - alpha``
    for labelled frames and 1 otherwise. A fully labelled stream gives ``alpha*gt + (1-alpha)*kd``,
    an unlabelled one gives ``kd`` alone.

    Args:
        gt: ground-truth loss on the labelled rows, None when no row is labelled.
        kd: (B,) per-frame distillation loss.
        labelled: (B,) bool.
        alpha: ground-truth weight (0.6 in the paper).
    """
    weights = torch.where(labelled, 1.0 - alpha, 1.0).to(kd.dtype)
    term = (weights * kd).mean()
    if gt is not None:
        term = term + labelled.float().mean() * alpha * gt
    return term


def task_total(expr_terms: list[torch.Tensor], va_terms: list[torch.Tensor]) -> torch.Tensor:
    """Mean of the EXPR terms over streams plus mean of the VA terms (a task without terms adds 0)."""
    total = torch.zeros(())
    for terms in (expr_terms, va_terms):
        if terms:
            total = total + torch.stack(terms).mean()
    return total

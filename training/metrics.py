"""ABAW2 evaluation metrics on numpy arrays (PAPER.md "Metrics").

EXPR score = 0.67 * macro-F1 (over the classes present, as scikit-learn computes it) + 0.33 *
accuracy; VA = CCC per dimension with population statistics; model selection = EXPR score +
CCC_valence + CCC_arousal.
"""

from __future__ import annotations

import numpy as np

F1_WEIGHT = 0.67
ACCURACY_WEIGHT = 0.33


def macro_f1(pred: np.ndarray, target: np.ndarray, n_classes: int = 7) -> float:
    """Unweighted mean of per-class F1 over the classes present in ``target`` or ``pred``.

    This is scikit-learn's ``f1_score(y_true, y_pred, average="macro")`` without ``labels=``, as
    the authors' evaluation calls it (``multitask_cnn/utils/model_utils.py::EXPR_metric`` in
    glmanhtu/multitask-abaw-2021): a class that neither occurs nor is predicted is left out
    rather than scored 0. On the
    full Aff-Wild2 validation set every class occurs, so both conventions agree; on a clip or a
    subset that lacks some classes, averaging over all 7 would deflate the score (e.g. 0.036 instead
    of 0.042 on one real clip). Values outside ``0..n_classes-1`` in ``pred`` (``evaluate.NO_EXPR``
    = -1 for a frame without a prediction) are errors for their true class but never a class of
    their own, so a coverage gap lowers recall without adding a phantom class.

    Returns:
        0.0 when no class is present (empty input).
    """
    pred, target = np.asarray(pred), np.asarray(target)
    present = np.union1d(np.unique(target), np.unique(pred))
    classes = present[(present >= 0) & (present < n_classes)]
    scores = []
    for cls in classes:
        tp = np.sum((pred == cls) & (target == cls))
        denominator = np.sum(pred == cls) + np.sum(target == cls)
        scores.append(2.0 * tp / denominator)
    return float(np.mean(scores)) if scores else 0.0


def expr_score(pred: np.ndarray, target: np.ndarray, n_classes: int = 7) -> float:
    """0.67 * macro-F1 + 0.33 * accuracy."""
    accuracy = float(np.mean(pred == target))
    return F1_WEIGHT * macro_f1(pred, target, n_classes) + ACCURACY_WEIGHT * accuracy


def ccc(x: np.ndarray, y: np.ndarray) -> float:
    """Concordance correlation coefficient with population (1/N) statistics.

    Returns 0.0 when both series are constant and equal in mean (0/0: no evidence of agreement).
    """
    x, y = np.asarray(x, np.float64), np.asarray(y, np.float64)
    cov = np.mean((x - x.mean()) * (y - y.mean()))
    denominator = x.var() + y.var() + (x.mean() - y.mean()) ** 2
    return float(2.0 * cov / denominator) if denominator > 0 else 0.0


def abaw_metrics(expr_pred: np.ndarray, expr_target: np.ndarray,
                 va_pred: np.ndarray, va_target: np.ndarray) -> dict[str, float]:
    """EXPR score, its parts, CCC per dimension and the selection score.

    Args:
        expr_pred, expr_target: (N,) class indices of the EXPR-labelled frames (may be empty).
        va_pred, va_target: (M, 2) valence/arousal of the VA-labelled frames (may be empty).

    Returns:
        Keys ``expr_f1, expr_accuracy, expr_score, ccc_valence, ccc_arousal, selection``; a task
        without labelled frames scores 0 so the selection sum stays defined.
    """
    has_expr, has_va = len(expr_target) > 0, len(va_target) > 0
    metrics = {
        "expr_f1": macro_f1(expr_pred, expr_target) if has_expr else 0.0,
        "expr_accuracy": float(np.mean(expr_pred == expr_target)) if has_expr else 0.0,
        "expr_score": expr_score(expr_pred, expr_target) if has_expr else 0.0,
        "ccc_valence": ccc(va_pred[:, 0], va_target[:, 0]) if has_va else 0.0,
        "ccc_arousal": ccc(va_pred[:, 1], va_target[:, 1]) if has_va else 0.0,
    }
    metrics["selection"] = metrics["expr_score"] + metrics["ccc_valence"] + metrics["ccc_arousal"]
    return metrics

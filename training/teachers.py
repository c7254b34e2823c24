"""What the student can learn from: a trained multitask teacher or an external expression model.

``ExpressionTeacher`` is any callable mapping a float32 (B, 3, H, W) RGB batch in 0..255 to
(B, 7) logits in Aff-Wild2 order (e.g. the project's FER2013 scorer behind an adapter). With such
a teacher there are no VA soft labels, so VA distillation is absent.
"""

from __future__ import annotations

from typing import Protocol

import torch

from engines.models.student import MultitaskNet


class ExpressionTeacher(Protocol):
    """Expression-only teacher: (B, 3, H, W) float32 0..255 -> (B, 7) logits, Aff-Wild2 order."""

    def __call__(self, images: torch.Tensor) -> torch.Tensor: ...


Teacher = MultitaskNet | ExpressionTeacher


@torch.no_grad()
def soft_labels(teacher: Teacher, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Teacher logits for a batch: ``(expr (B, 7), va (B, 2, bins) or None)``.

    A ``MultitaskNet`` teacher is expected in eval mode (dropout off, running BN statistics).
    """
    if isinstance(teacher, MultitaskNet):
        return teacher(images)
    return teacher(images), None

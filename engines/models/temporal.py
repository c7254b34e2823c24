"""Temporal stage of the student: frozen CNN features -> a bidirectional GRU per task over windows.

Method: Vu, Beurton-Aimar and Marchand, "Multitask Multi-database Emotion Recognition", ICCV
Workshops 2021, section 3.4 (shared/PAPER.md "Temporal stage"): the trained CNN student, frozen,
gives one feature per frame (its pooled backbone output); a bidirectional GRU per task, 128 then
64 units per direction (the paper's table), reads windows of 32 frames and predicts per frame
EXPR (7 logits) and VA (2 x 20 bin logits).

Contracts:
- ``FrameFeatures``: float32 (N, 3, 112, 112) RGB 0..255 aligned crops -> (N, F) features, F the
  backbone's width (1280 for ``mobilenetv2``, 128 for ``tiny``). It normalises exactly as
  ``MultitaskNet`` does, so the features are the ones the CNN's heads were trained on.
- ``TemporalNet``: (N, T, F) -> ``(expr_logits (N, T, 7), va_logits (N, T, 2, 20))``.
- ``DeployedTemporal``: (N, T, F) -> ``expr_logits`` (N, T, 7), ``va_bins`` (N, T, 2, 20) and
  ``va`` (N, T, 2), the expectation over the bin centres (as ``DeployedStudent``).
- ``window_plan``: which windows a track of L frames is scored in, and which frames each window
  answers for; training evaluation and ``annotate run --temporal`` share it.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from engines.models.student import NUM_EXPR, VA_BINS, MultitaskNet, va_expectation

#: Frames per window (PAPER.md: "features are grouped into sequences of 32 frames").
WINDOW = 32
#: Windows overlap by half: each frame is answered by the window where it sits in the middle half,
#: so (away from a track's ends) it sees at least a quarter window, 8 frames, on both sides. A
#: track's first frames wait for its first full window (31 frames of lookahead), later frames
#: for at most 3/4 of a window (23 frames).
STRIDE = WINDOW // 2
#: GRU units per direction of the two stacked layers (the paper's table: "GRU 128 then 64").
GRU_UNITS = (128, 64)
#: On the features entering the GRU: the CNN heads also regularise with dropout 0.5 (PAPER.md).
INPUT_DROPOUT = 0.5


class FrameFeatures(nn.Module):
    """The frozen CNN student up to its pooled backbone feature (crops -> (N, F))."""

    def __init__(self, net: MultitaskNet) -> None:
        super().__init__()
        self.net = net

    @property
    def out_features(self) -> int:
        return int(self.net.backbone.out_features)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net.backbone((x - self.net.mean) / self.net.std)


class _TaskGRU(nn.Module):
    """One task's stack: BiGRU(128) -> BiGRU(64) -> Linear, applied at every time step."""

    def __init__(self, in_features: int, n_out: int, units: tuple[int, ...]) -> None:
        super().__init__()
        layers, width = [], in_features
        for hidden in units:
            layers.append(nn.GRU(width, hidden, batch_first=True, bidirectional=True))
            width = 2 * hidden
        self.grus = nn.ModuleList(layers)
        self.out = nn.Linear(width, n_out)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for gru in self.grus:
            x, _ = gru(x)
        return self.out(x)


class TemporalNet(nn.Module):
    """Per-task bidirectional GRUs over standardised frame features.

    The features are standardised with the training set's per-dimension mean and std (buffers,
    saved and exported with the weights): a frozen CNN's pooled activations have arbitrary
    scales that a GRU's saturating gates learn slowly from.
    """

    def __init__(self, in_features: int, units: tuple[int, ...] = GRU_UNITS, n_expr: int = NUM_EXPR,
                 va_bins: int = VA_BINS) -> None:
        super().__init__()
        self.in_features = in_features
        self.va_bins = va_bins
        self.register_buffer("feature_mean", torch.zeros(in_features))
        self.register_buffer("feature_std", torch.ones(in_features))
        self.dropout = nn.Dropout(INPUT_DROPOUT)
        self.expr = _TaskGRU(in_features, n_expr, units)
        self.va = _TaskGRU(in_features, 2 * va_bins, units)

    def set_standardisation(self, mean: torch.Tensor, std: torch.Tensor) -> None:
        """Fix the feature statistics (from the training features; std floored to stay finite)."""
        self.feature_mean.copy_(mean)
        self.feature_std.copy_(std.clamp_min(1e-6))

    def forward(self, features: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        x = self.dropout((features - self.feature_mean) / self.feature_std)
        n, t = x.shape[0], x.shape[1]
        return self.expr(x), self.va(x).reshape(n, t, 2, self.va_bins)


class DeployedTemporal(nn.Module):
    """Export contract: (N, T, F) -> expr_logits (N, T, 7), va_bins (N, T, 2, 20), va (N, T, 2)."""

    OUTPUTS = ("expr_logits", "va_bins", "va")

    def __init__(self, net: TemporalNet) -> None:
        super().__init__()
        self.net = net

    def forward(self, features: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        expr_logits, va_bins = self.net(features)
        return expr_logits, va_bins, va_expectation(va_bins)


@dataclass(frozen=True)
class Window:
    """Frames ``[start, end)`` of a track go through the GRU; frames ``[keep_from, keep_to)`` take
    their outputs from this window."""

    start: int
    end: int
    keep_from: int
    keep_to: int


def window_plan(length: int, window: int = WINDOW, stride: int = STRIDE) -> list[Window]:
    """Windows covering a track of ``length`` frames; every frame is kept from exactly one window.

    Full windows start every ``stride`` frames; window k answers for the frames in its middle
    (from ``k * stride + (window - stride) // 2``), the first window also for the frames before
    that. When the last full window does not reach the end, one more window of the last
    ``window`` frames answers for the rest. A track shorter than a window is one window.
    """
    if length <= 0:
        return []
    if length <= window:
        return [Window(0, length, 0, length)]
    margin = (window - stride) // 2
    plan: list[Window] = []
    start = 0
    while start + window <= length:
        keep_from = 0 if start == 0 else start + margin
        plan.append(Window(start, start + window, keep_from, start + margin + stride))
        start += stride
    covered = plan[-1].keep_to
    if plan[-1].end == length:  # the last full window ends the track: it answers for its tail
        plan[-1] = Window(plan[-1].start, length, plan[-1].keep_from, length)
    elif covered < length:
        plan.append(Window(length - window, length, covered, length))
    return plan

"""Multitask student: one shared backbone, an expression head and a valence-arousal head.

Method: Vu, Beurton-Aimar and Marchand, "Multitask Multi-database Emotion Recognition", ICCV
Workshops 2021 (public code: github.com/glmanhtu/multitask-abaw-2021), see shared/PAPER.md.

Contract of the network:
- input: float32 (B, 3, H, W) RGB in 0..255, H = W = 112: exactly ``engines.align.align_faces``'
  crops (5-point similarity onto the arcface template, no resize), at training, evaluation and in
  ``annotate run`` alike (``PREPROCESSING`` is what an exported model card records);
  the module normalises internally with the ImageNet statistics (mean 123.675/116.28/103.53,
  std 58.395/57.12/57.375 on the 0..255 scale) because user-provided ``--init`` backbones are
  almost always ImageNet-pretrained;
- ``MultitaskNet`` returns ``(expr_logits (B, 7), va_logits (B, 2, 20))``: 7 expressions in
  Aff-Wild2 order and, per dimension (valence, arousal), 20 bin logits over [-1, 1];
- ``DeployedStudent`` returns ``(expr_logits (B, 7), va (B, 2))`` where ``va`` is the expectation
  of the bin softmax over the 20 bin *centres* (the upstream code mixed 20 values from
  ``linspace(-1, 1, 20)`` with 21 target edges; centres make values and targets agree).

Backbones are written here in plain torch (no torchvision). ``mobilenetv2`` mirrors the
torchvision MobileNetV2 module layout (``features.N...``) so an ImageNet state dict from there can
be passed to ``--init``; ``tiny`` is a four-block CNN for CPU tests.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn

from engines.align import CROP_SIZE, TEMPLATE_112

logger = logging.getLogger(__name__)

EXPR_CLASSES: tuple[str, ...] = (
    "neutral", "anger", "disgust", "fear", "happiness", "sadness", "surprise",
)
NUM_EXPR = len(EXPR_CLASSES)
# 20 bins per VA dimension on [-1, 1] (PAPER.md "VA"), i.e. bins of width 0.1.
VA_BINS = 20
VA_BIN_CENTRES = torch.linspace(-1 + 1 / VA_BINS, 1 - 1 / VA_BINS, VA_BINS)
# ImageNet RGB statistics on the 0..255 scale (torchvision's 0.485/0.456/0.406 and
# 0.229/0.224/0.225 times 255), matching the pretrained backbones users bring.
INPUT_MEAN = (123.675, 116.28, 103.53)
INPUT_STD = (58.395, 57.12, 57.375)
#: The student's input preprocessing, recorded in every exported model card and checked when a
#: card is loaded (engines.factory): training (training.datasets.images) and ``annotate run`` both
#: feed the aligner's crop as it is. Exports made before this record trained on 1.2x zoomed crops.
PREPROCESSING: dict[str, object] = {
    "aligner": "engines.align.align_faces",
    "landmarks": "5 points: eyes, nose tip, mouth corners (RetinaFace order)",
    "template": [[round(float(v), 4) for v in point] for point in TEMPLATE_112],
    "crop_size": CROP_SIZE,
    "resize": None,
}
# Paper head: BN -> Linear(->128) -> ReLU -> BN -> Dropout(0.5) -> Linear(->n).
HEAD_HIDDEN = 128
HEAD_DROPOUT = 0.5


def va_expectation(va_logits: torch.Tensor) -> torch.Tensor:
    """Valence and arousal as the softmax expectation over the bin centres.

    Args:
        va_logits: (B, 2, 20) bin logits.

    Returns:
        (B, 2) values in [-0.95, 0.95] (the extreme centres), valence first.
    """
    centres = VA_BIN_CENTRES.to(device=va_logits.device, dtype=va_logits.dtype)
    return (va_logits.softmax(dim=-1) * centres).sum(dim=-1)


def _conv_bn_relu6(cin: int, cout: int, kernel: int, stride: int, groups: int = 1) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(cin, cout, kernel, stride, kernel // 2, groups=groups, bias=False),
        nn.BatchNorm2d(cout),
        nn.ReLU6(inplace=True),
    )


class InvertedResidual(nn.Module):
    """MobileNetV2 block: 1x1 expand, 3x3 depthwise, 1x1 linear projection (Sandler et al. 2018)."""

    def __init__(self, cin: int, cout: int, stride: int, expand: int) -> None:
        super().__init__()
        hidden = cin * expand
        layers: list[nn.Module] = []
        if expand != 1:
            layers.append(_conv_bn_relu6(cin, hidden, 1, 1))
        layers += [
            _conv_bn_relu6(hidden, hidden, 3, stride, groups=hidden),
            nn.Conv2d(hidden, cout, 1, bias=False),
            nn.BatchNorm2d(cout),
        ]
        self.conv = nn.Sequential(*layers)
        self.use_residual = stride == 1 and cin == cout

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.conv(x)
        return x + out if self.use_residual else out


class MobileNetV2Features(nn.Module):
    """MobileNetV2 1.0 feature extractor, 2.2 M parameters, 0.08 GFLOPs at 112x112 (4x4 final map)."""

    # (expansion t, channels c, repeats n, first stride s) from the MobileNetV2 paper, Table 2.
    SETTINGS = ((1, 16, 1, 1), (6, 24, 2, 2), (6, 32, 3, 2), (6, 64, 4, 2),
                (6, 96, 3, 1), (6, 160, 3, 2), (6, 320, 1, 1))
    STEM = 32
    out_features = 1280

    def __init__(self) -> None:
        super().__init__()
        layers: list[nn.Module] = [_conv_bn_relu6(3, self.STEM, 3, 2)]
        cin = self.STEM
        for expand, cout, repeats, stride in self.SETTINGS:
            for i in range(repeats):
                layers.append(InvertedResidual(cin, cout, stride if i == 0 else 1, expand))
                cin = cout
        layers.append(_conv_bn_relu6(cin, self.out_features, 1, 1))
        self.features = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.features(x).mean(dim=(2, 3))


class HalfResolutionMobileNetV2Features(MobileNetV2Features):
    """MobileNetV2 1.0 on the aligned crop averaged down 2x (112 -> 56): 4x fewer FLOPs.

    Expressions are legible at 48-64 px (FER2013's faces are 48x48; the FER teacher eats 64x64
    grey), so the full 112 px is spent mostly on skin texture; halving the resolution inside the
    network keeps the one deployment crop (training and ``annotate run`` still feed 112x112) and
    makes the student faster per crop than its teacher on a CPU. Same parameters and state-dict
    keys as ``mobilenetv2``, so ImageNet ``--init`` weights still load.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(nn.functional.avg_pool2d(x, 2))


class TinyFeatures(nn.Module):
    """Four stride-2 conv blocks (16-32-64-128 channels, ~0.1 M parameters) for CPU tests."""

    WIDTHS = (16, 32, 64, 128)
    out_features = WIDTHS[-1]

    def __init__(self) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        cin = 3
        for width in self.WIDTHS:
            layers += [nn.Conv2d(cin, width, 3, 2, 1, bias=False), nn.BatchNorm2d(width), nn.ReLU(inplace=True)]
            cin = width
        self.features = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.features(x).mean(dim=(2, 3))


BACKBONES: dict[str, Callable[[], nn.Module]] = {
    "mobilenetv2": MobileNetV2Features,
    "mobilenetv2-half": HalfResolutionMobileNetV2Features,
    "tiny": TinyFeatures,
}
DEFAULT_BACKBONE = "mobilenetv2"


def _head(in_features: int, n_out: int) -> nn.Sequential:
    return nn.Sequential(
        nn.BatchNorm1d(in_features),
        nn.Linear(in_features, HEAD_HIDDEN),
        nn.ReLU(inplace=True),
        nn.BatchNorm1d(HEAD_HIDDEN),
        nn.Dropout(HEAD_DROPOUT),
        nn.Linear(HEAD_HIDDEN, n_out),
    )


class MultitaskNet(nn.Module):
    """Shared backbone with an EXPR head (7 logits) and a VA head (2 x 20 bin logits)."""

    def __init__(self, backbone: nn.Module, n_expr: int = NUM_EXPR, va_bins: int = VA_BINS) -> None:
        super().__init__()
        self.backbone = backbone
        self.register_buffer("mean", torch.tensor(INPUT_MEAN).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(INPUT_STD).view(1, 3, 1, 1), persistent=False)
        self.expr_head = _head(backbone.out_features, n_expr)
        self.va_head = _head(backbone.out_features, 2 * va_bins)
        self.va_bins = va_bins

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        features = self.backbone((x - self.mean) / self.std)
        va = self.va_head(features).view(-1, 2, self.va_bins)
        return self.expr_head(features), va


class DeployedStudent(nn.Module):
    """Scorer contract: (B,3,112,112) float32 RGB 0..255 -> ("expr_logits" (B,7), "va" (B,2)).

    ``with_va=False`` drops the VA output, for students whose VA head never saw a VA target
    (the default student): an untrained head must not leak numbers into the table.
    """

    def __init__(self, net: MultitaskNet, with_va: bool = True) -> None:
        super().__init__()
        self.net = net
        self.with_va = with_va

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        expr_logits, va_logits = self.net(x)
        if not self.with_va:
            return (expr_logits,)
        return expr_logits, va_expectation(va_logits)


def build_student(backbone: str = DEFAULT_BACKBONE) -> MultitaskNet:
    """Build a randomly initialised multitask network.

    Args:
        backbone: a key of ``BACKBONES`` (``mobilenetv2`` for deployment, ``tiny`` for tests).

    Returns:
        The network; ``{"backbone": backbone}`` is all that is needed to rebuild it.

    Raises:
        ValueError: unknown backbone name (the message lists the known ones).
    """
    if backbone not in BACKBONES:
        raise ValueError(f"unknown backbone {backbone!r}; choose one of {sorted(BACKBONES)}")
    return MultitaskNet(BACKBONES[backbone]())


def load_backbone_weights(net: MultitaskNet, path: Path) -> None:
    """Load user-provided backbone weights (e.g. an ImageNet MobileNetV2 state dict) leniently.

    Keys that do not fit (a classifier, a renamed layer) are logged, not fatal, because a partial
    initialisation is still better than random; shape mismatches still raise.

    Args:
        net: the network whose ``backbone`` receives the weights.
        path: a ``torch.save``-d state dict (loaded with ``weights_only=True``).
    """
    state = torch.load(path, map_location="cpu", weights_only=True)
    result = net.backbone.load_state_dict(state, strict=False)
    logger.info("loaded %s: %d tensors matched", path, len(state) - len(result.unexpected_keys))
    if result.missing_keys:
        logger.warning("%s: %d backbone keys missing: %s", path, len(result.missing_keys), result.missing_keys)
    if result.unexpected_keys:
        logger.warning("%s: %d unexpected keys ignored: %s", path, len(result.unexpected_keys), result.unexpected_keys)

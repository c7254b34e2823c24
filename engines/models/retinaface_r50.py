"""RetinaFace with a ResNet-50 backbone, state-dict compatible with ``retinaface-pytorch``.

Paper: Deng, Guo, Ververas, Kotsia, Zafeiriou, "RetinaFace: Single-shot Multi-level Face
Localisation in the Wild", CVPR 2020 (arXiv:1905.00641).
Upstream: ``retinaface-pytorch==0.0.8`` (https://github.com/ternaus/retinaface, MIT), itself built
on biubug6/Pytorch_Retinaface. Its weights are the release asset
``retinaface_resnet50_2020-07-20-f168fae3c.zip`` (tag 0.01), trained on WIDER FACE.

Why a re-implementation: upstream pins torch 1.9 / torchvision 0.10 and builds its backbone with
torchvision, which cannot be installed beside the project's torch. This module rebuilds the same
network in plain torch with *identical* state-dict keys and shapes (torchvision's ResNet-50 names
under ``body.``, then ``fpn.``, ``ssh1..3.``, ``ClassHead/BboxHead/LandmarkHead.{0,1,2}.conv1x1``),
so the released checkpoint loads with ``strict=True``.

Contract of :class:`RetinaFaceResNet50` (the same as the MobileNetV2 RetinaFace, so one decoder
serves both):
    input   ``images`` float32 ``(B, 3, H, W)``, RGB, 0..255, H and W multiples of 32. Upstream's
            normalisation (albumentations ``Normalize`` defaults: ImageNet mean/std on x / 255)
            is part of the module.
    output  ``(boxes, landmarks, scores)``: ``(B, A, 4)`` and ``(B, A, 10)`` raw regression
            deltas and ``(B, A)`` face probability, where A = sum over strides 8, 16, 32 of
            (H / s) * (W / s) * 2 anchors, ordered level, row, column, anchor size (upstream's
            ``priorbox``: min_sizes [[16, 32], [64, 128], [256, 512]], variances 0.1 / 0.2).
"""

from __future__ import annotations

import io
import zipfile
from collections.abc import Mapping
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

# albumentations.Normalize defaults (ImageNet statistics), applied by upstream to RGB / 255.
_MEAN_RGB = (0.485, 0.456, 0.406)
_STD_RGB = (0.229, 0.224, 0.225)
_MAX_PIXEL = 255.0
# ResNet-50: bottleneck blocks per stage (He et al. 2016, table 1).
_STAGE_BLOCKS = (3, 4, 6, 3)
_EXPANSION = 4
# Upstream: in_channels=256 (stage-2 width before doubling), out_channels=256 for FPN/SSH; taps
# layer2/3/4 give 512, 1024, 2048 channels at strides 8, 16, 32.
_FPN_IN = (512, 1024, 2048)
_FPN_CHANNELS = 256
_ANCHORS_PER_CELL = 2  # two min_sizes per level
# Upstream key prefix when a checkpoint comes from its pytorch-lightning trainer (self.model = ...);
# inference.py strips it with {"model.": ""}.
_LIGHTNING_PREFIX = "model."


def _conv_bn(in_ch: int, out_ch: int, kernel: int, relu: bool) -> nn.Sequential:
    """Upstream ``conv_bn`` / ``conv_bn_no_relu`` / ``conv_bn1X1`` (keys ``.0`` conv, ``.1`` BN).

    Upstream uses LeakyReLU with slope 0 when out_channels > 64, which is a plain ReLU.
    """
    layers: list[nn.Module] = [
        nn.Conv2d(in_ch, out_ch, kernel, 1, kernel // 2, bias=False),
        nn.BatchNorm2d(out_ch),
    ]
    if relu:
        layers.append(nn.ReLU(inplace=True))
    return nn.Sequential(*layers)


class _Bottleneck(nn.Module):
    """torchvision's ResNet v1.5 bottleneck: the stride sits on the 3x3 conv."""

    def __init__(self, in_ch: int, width: int, stride: int) -> None:
        super().__init__()
        out_ch = width * _EXPANSION
        self.conv1 = nn.Conv2d(in_ch, width, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.conv2 = nn.Conv2d(width, width, 3, stride, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(width)
        self.conv3 = nn.Conv2d(width, out_ch, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(out_ch)
        self.downsample: nn.Module | None = None
        if stride != 1 or in_ch != out_ch:
            self.downsample = nn.Sequential(
                nn.Conv2d(in_ch, out_ch, 1, stride, bias=False), nn.BatchNorm2d(out_ch)
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        y = F.relu(self.bn1(self.conv1(x)))
        y = F.relu(self.bn2(self.conv2(y)))
        return F.relu(self.bn3(self.conv3(y)) + identity)


def _stage(in_ch: int, width: int, blocks: int, stride: int) -> nn.Sequential:
    """One ResNet stage; only its first block changes stride and width (torchvision layout)."""
    layers = [_Bottleneck(in_ch, width, stride)]
    layers += [_Bottleneck(width * _EXPANSION, width, 1) for _ in range(blocks - 1)]
    return nn.Sequential(*layers)


class _ResNet50Body(nn.Module):
    """torchvision ``resnet50`` up to ``layer4`` (what IntermediateLayerGetter keeps)."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 64, 7, 2, 3, bias=False)
        self.bn1 = nn.BatchNorm2d(64)
        # Stage widths 64/128/256/512 (x4 out); stage 1 keeps stride 4 from the stem, then x2 each.
        self.layer1 = _stage(64, 64, _STAGE_BLOCKS[0], stride=1)
        self.layer2 = _stage(256, 128, _STAGE_BLOCKS[1], stride=2)
        self.layer3 = _stage(512, 256, _STAGE_BLOCKS[2], stride=2)
        self.layer4 = _stage(1024, 512, _STAGE_BLOCKS[3], stride=2)

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        """Return the layer2, layer3 and layer4 maps (strides 8, 16, 32)."""
        x = F.max_pool2d(F.relu(self.bn1(self.conv1(x))), 3, 2, 1)
        c2 = self.layer2(self.layer1(x))
        c3 = self.layer3(c2)
        return [c2, c3, self.layer4(c3)]


class _FPN(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.output1 = _conv_bn(_FPN_IN[0], _FPN_CHANNELS, 1, relu=True)
        self.output2 = _conv_bn(_FPN_IN[1], _FPN_CHANNELS, 1, relu=True)
        self.output3 = _conv_bn(_FPN_IN[2], _FPN_CHANNELS, 1, relu=True)
        self.merge1 = _conv_bn(_FPN_CHANNELS, _FPN_CHANNELS, 3, relu=True)
        self.merge2 = _conv_bn(_FPN_CHANNELS, _FPN_CHANNELS, 3, relu=True)

    def forward(self, taps: list[torch.Tensor]) -> list[torch.Tensor]:
        out1, out2, out3 = self.output1(taps[0]), self.output2(taps[1]), self.output3(taps[2])
        # Upsample to the lateral's exact size (not x2) so odd map sizes also line up.
        out2 = self.merge2(out2 + F.interpolate(out3, size=out2.shape[-2:], mode="nearest"))
        out1 = self.merge1(out1 + F.interpolate(out2, size=out1.shape[-2:], mode="nearest"))
        return [out1, out2, out3]


class _SSH(nn.Module):
    """Single-stage headless context module; attribute names (``conv7x7_3`` too) are upstream's."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv3X3 = _conv_bn(channels, channels // 2, 3, relu=False)
        self.conv5X5_1 = _conv_bn(channels, channels // 4, 3, relu=True)
        self.conv5X5_2 = _conv_bn(channels // 4, channels // 4, 3, relu=False)
        self.conv7X7_2 = _conv_bn(channels // 4, channels // 4, 3, relu=True)
        self.conv7x7_3 = _conv_bn(channels // 4, channels // 4, 3, relu=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        branch5 = self.conv5X5_1(x)
        out = torch.cat(
            [self.conv3X3(x), self.conv5X5_2(branch5), self.conv7x7_3(self.conv7X7_2(branch5))], 1
        )
        return F.relu(out)


class _Head(nn.Module):
    """One 1x1 conv per level, flattened to (B, H*W*anchors, width) in NHWC order like upstream."""

    def __init__(self, width: int) -> None:
        super().__init__()
        self.width = width
        self.conv1x1 = nn.Conv2d(_FPN_CHANNELS, _ANCHORS_PER_CELL * width, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.conv1x1(x).permute(0, 2, 3, 1)
        return out.reshape(out.shape[0], -1, self.width)


class RetinaFaceResNet50(nn.Module):
    """RetinaFace (ResNet-50, FPN, SSH) returning raw per-anchor heads; see module docstring."""

    def __init__(self) -> None:
        super().__init__()
        self.body = _ResNet50Body()
        self.fpn = _FPN()
        self.ssh1 = _SSH(_FPN_CHANNELS)
        self.ssh2 = _SSH(_FPN_CHANNELS)
        self.ssh3 = _SSH(_FPN_CHANNELS)
        levels = range(len(_FPN_IN))
        self.ClassHead = nn.ModuleList(_Head(2) for _ in levels)
        self.BboxHead = nn.ModuleList(_Head(4) for _ in levels)
        self.LandmarkHead = nn.ModuleList(_Head(10) for _ in levels)
        # Not persistent: upstream's checkpoint has no such keys and must load with strict=True.
        mean = torch.tensor(_MEAN_RGB).view(1, 3, 1, 1) * _MAX_PIXEL
        std = torch.tensor(_STD_RGB).view(1, 3, 1, 1) * _MAX_PIXEL
        self.register_buffer("pixel_mean", mean, persistent=False)
        self.register_buffer("pixel_std", std, persistent=False)

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Run the network on raw pixels.

        Args:
            images: float32 ``(B, 3, H, W)`` RGB in 0..255, H and W multiples of 32.

        Returns:
            ``boxes (B, A, 4)`` and ``landmarks (B, A, 10)`` raw deltas, ``scores (B, A)`` face
            probability.
        """
        x = (images - self.pixel_mean) / self.pixel_std
        fpn = self.fpn(self.body(x))
        features = [self.ssh1(fpn[0]), self.ssh2(fpn[1]), self.ssh3(fpn[2])]
        boxes = torch.cat([h(f) for h, f in zip(self.BboxHead, features, strict=True)], 1)
        landmarks = torch.cat([h(f) for h, f in zip(self.LandmarkHead, features, strict=True)], 1)
        logits = torch.cat([h(f) for h, f in zip(self.ClassHead, features, strict=True)], 1)
        # Column 1 is "face": upstream's predict_jsons takes softmax(conf)[..., 1] as the score.
        return boxes, landmarks, torch.softmax(logits, dim=-1)[..., 1]


def convert_upstream(checkpoint: Mapping[str, object]) -> dict[str, torch.Tensor]:
    """Turn an upstream checkpoint into a :class:`RetinaFaceResNet50` state dict.

    The released file is a bare state dict (upstream's ``get_model`` passes it straight to
    ``load_state_dict``); a checkpoint from upstream's pytorch-lightning trainer wraps it as
    ``{"state_dict": {"model.<key>": ...}}``. Both are accepted.

    Args:
        checkpoint: the object ``torch.load`` returned.

    Returns:
        State dict loadable with ``strict=True``.

    Raises:
        ValueError: the checkpoint holds something other than tensors.
    """
    state = checkpoint.get("state_dict", checkpoint)
    if not isinstance(state, Mapping):
        raise ValueError(f"checkpoint 'state_dict' is a {type(state).__name__}, not a mapping")
    out: dict[str, torch.Tensor] = {}
    for key, value in state.items():
        if not isinstance(value, torch.Tensor):
            raise ValueError(f"checkpoint entry {key!r} is a {type(value).__name__}, not a tensor")
        out[key.removeprefix(_LIGHTNING_PREFIX)] = value
    return out


def load_upstream_file(path: Path) -> dict[str, torch.Tensor]:
    """Read the release asset (or an unzipped copy) and convert it.

    The release ``.zip`` wraps a single torch file, which ``torch.hub.load_url`` unwraps; a torch
    file saved in the zip format is itself a zip, but with many members, so one member means the
    release wrapper.

    Args:
        path: ``retinaface_resnet50_2020-07-20-f168fae3c.zip`` or the file inside it.

    Returns:
        State dict loadable with ``strict=True``.
    """
    if zipfile.is_zipfile(path):
        with zipfile.ZipFile(path) as zf:
            members = [m for m in zf.infolist() if not m.is_dir()]
            if len(members) == 1:
                payload = io.BytesIO(zf.read(members[0]))
                return convert_upstream(torch.load(payload, map_location="cpu", weights_only=True))
    return convert_upstream(torch.load(path, map_location="cpu", weights_only=True))

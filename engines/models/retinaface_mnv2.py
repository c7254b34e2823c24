"""RetinaFace with a MobileNetV2 backbone, rebuilt in torch from a TensorFlow frozen graph.

Paper: Deng, Guo, Ververas, Kotsia, Zafeiriou, "RetinaFace: Single-shot Multi-level Face
Localisation in the Wild", CVPR 2020 (arXiv:1905.00641, 2019).
Upstream weights: the frozen graph ``retinaface/src/frozen_graph.pb`` in the PyPI wheel
``retinaface==1.1.1`` (a peteryuX/retinaface-tf2 model trained on WIDER FACE; the wheel's
metadata says MIT, its licence file is Apache-2.0).

Contract of :class:`RetinaFaceMobileNetV2`:
    input   ``images`` float32 ``(B, 3, H, W)``, RGB, 0..255, H and W multiples of 32. The
            graph's own normalisation (``x / 127.5 - 1``) is part of the module.
    output  ``(boxes, landmarks, scores)``: ``(B, A, 4)`` and ``(B, A, 10)`` raw regression
            deltas and ``(B, A)`` face probability, where A = sum over strides 8, 16, 32 of
            (H / s) * (W / s) * 2 anchors, ordered level, row, column, anchor size. Decoding
            lives in :mod:`engines.retinaface`.

:func:`convert_tf_graph` reads the graph with the protobuf classes shipped in ``tensorboard``,
so converting needs no TensorFlow.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

if TYPE_CHECKING:
    from tensorboard.compat.proto.node_def_pb2 import NodeDef

# Keras MobileNetV2 (alpha 1.0) inverted-residual settings (expansion t, out channels c,
# repeats n, first stride s), Sandler et al. 2018, table 2. The graph stops after block 15
# (block_15_add, 160 channels, stride 32): the 320-channel block 16 is not used by RetinaFace.
_MNV2_SETTINGS: tuple[tuple[int, int, int, int], ...] = (
    (1, 16, 1, 1),
    (6, 24, 2, 2),
    (6, 32, 3, 2),
    (6, 64, 4, 2),
    (6, 96, 3, 1),
    (6, 160, 3, 2),
)
# Backbone outputs fed to the FPN (Keras layer names): strides 8, 16 and 32.
_FPN_TAPS: tuple[int, ...] = (5, 12, 15)
_STEM_CHANNELS = 32
_FPN_CHANNELS = 64
_ANCHORS_PER_CELL = 2  # min_sizes [[16, 32], [64, 128], [256, 512]]: two sizes per level
# Epsilons as stored in the graph's FusedBatchNormV3 nodes (float32 values of 1e-3 and 1.001e-5).
_BACKBONE_BN_EPS = 1e-3
_HEAD_BN_EPS = 1.001e-5
_LEAKY_SLOPE = 0.1  # LeakyRelu alpha in the FPN and SSH (graph attr 0.1)

_TF_PREFIX = "RetinaFaceModel/"


class _ConvBN(nn.Sequential):
    """Bias-free conv + BatchNorm (+ optional activation), the unit every TF block is made of."""

    def __init__(
        self,
        in_ch: int,
        out_ch: int,
        kernel: int,
        eps: float,
        stride: int = 1,
        groups: int = 1,
        act: nn.Module | None = None,
    ) -> None:
        # TF "SAME" with stride 1 is symmetric; stride-2 layers get an explicit right/bottom pad
        # in the graph (Keras ZeroPadding2D ((0, 1), (0, 1))) followed by a VALID conv.
        padding = kernel // 2 if stride == 1 else 0
        layers: list[nn.Module] = [
            nn.Conv2d(in_ch, out_ch, kernel, stride, padding, groups=groups, bias=False),
            nn.BatchNorm2d(out_ch, eps=eps),
        ]
        if act is not None:
            layers.append(act)
        super().__init__(*layers)
        self.stride = stride

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # noqa: D102
        if self.stride == 2:
            x = F.pad(x, (0, 1, 0, 1))
        return super().forward(x)


class _InvertedResidual(nn.Module):
    """MobileNetV2 block: 1x1 expand, 3x3 depthwise, 1x1 linear projection, optional skip."""

    def __init__(self, in_ch: int, out_ch: int, stride: int, expansion: int) -> None:
        super().__init__()
        hidden = in_ch * expansion
        self.expand = (
            _ConvBN(in_ch, hidden, 1, _BACKBONE_BN_EPS, act=nn.ReLU6()) if expansion != 1 else None
        )
        self.depthwise = _ConvBN(
            hidden, hidden, 3, _BACKBONE_BN_EPS, stride=stride, groups=hidden, act=nn.ReLU6()
        )
        self.project = _ConvBN(hidden, out_ch, 1, _BACKBONE_BN_EPS)
        self.residual = stride == 1 and in_ch == out_ch

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # noqa: D102
        y = self.expand(x) if self.expand is not None else x
        y = self.project(self.depthwise(y))
        return x + y if self.residual else y


def _block_specs() -> list[tuple[int, int, int, int]]:
    """(in channels, out channels, stride, expansion) for Keras blocks 0 ("expanded_conv")..15."""
    specs = []
    in_ch = _STEM_CHANNELS
    for expansion, out_ch, repeats, first_stride in _MNV2_SETTINGS:
        for i in range(repeats):
            specs.append((in_ch, out_ch, first_stride if i == 0 else 1, expansion))
            in_ch = out_ch
    return specs


class _MobileNetV2Taps(nn.Module):
    """MobileNetV2 trunk up to block 15, returning the stride 8/16/32 feature maps."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = _ConvBN(3, _STEM_CHANNELS, 3, _BACKBONE_BN_EPS, stride=2, act=nn.ReLU6())
        self.blocks = nn.ModuleList(_InvertedResidual(*spec) for spec in _block_specs())

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:  # noqa: D102
        x = self.stem(x)
        taps = []
        for index, block in enumerate(self.blocks):
            x = block(x)
            if index in _FPN_TAPS:
                taps.append(x)
        return taps


def _leaky() -> nn.Module:
    return nn.LeakyReLU(_LEAKY_SLOPE)


class _FPN(nn.Module):
    """Top-down feature pyramid: 1x1 laterals, nearest 2x upsample + add, 3x3 merge."""

    def __init__(self, in_channels: tuple[int, ...]) -> None:
        super().__init__()
        self.lateral = nn.ModuleList(
            _ConvBN(c, _FPN_CHANNELS, 1, _HEAD_BN_EPS, act=_leaky()) for c in in_channels
        )
        # merge[0] refines stride 8, merge[1] refines stride 16; stride 32 has no merge.
        self.merge = nn.ModuleList(
            _ConvBN(_FPN_CHANNELS, _FPN_CHANNELS, 3, _HEAD_BN_EPS, act=_leaky()) for _ in range(2)
        )

    def forward(self, taps: list[torch.Tensor]) -> list[torch.Tensor]:  # noqa: D102
        p8, p16, p32 = (lateral(t) for lateral, t in zip(self.lateral, taps))
        # TF ResizeNearestNeighbor(half_pixel_centers=True) to the lateral's size. Inputs are
        # multiples of 32, so every step is an exact 2x and picks source row/col floor(i / 2),
        # which is what torch "nearest" computes (and exports as an ONNX Resize).
        p16 = self.merge[1](p16 + F.interpolate(p32, size=p16.shape[-2:], mode="nearest"))
        p8 = self.merge[0](p8 + F.interpolate(p16, size=p8.shape[-2:], mode="nearest"))
        return [p8, p16, p32]


class _SSH(nn.Module):
    """Single Stage Headless context module: 3x3, 5x5 and 7x7 receptive fields concatenated."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        half, quarter = channels // 2, channels // 4
        self.conv3 = _ConvBN(channels, half, 3, _HEAD_BN_EPS)
        self.conv5_1 = _ConvBN(channels, quarter, 3, _HEAD_BN_EPS, act=_leaky())
        self.conv5_2 = _ConvBN(quarter, quarter, 3, _HEAD_BN_EPS)
        self.conv7_2 = _ConvBN(quarter, quarter, 3, _HEAD_BN_EPS, act=_leaky())
        self.conv7_3 = _ConvBN(quarter, quarter, 3, _HEAD_BN_EPS)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # noqa: D102
        c5 = self.conv5_1(x)
        c7 = self.conv7_2(c5)
        return F.relu(torch.cat([self.conv3(x), self.conv5_2(c5), self.conv7_3(c7)], dim=1))


def _flatten_head(x: torch.Tensor, width: int) -> torch.Tensor:
    """NCHW head output -> (B, H*W*anchors, width), in the graph's NHWC reshape order."""
    return x.permute(0, 2, 3, 1).reshape(x.shape[0], -1, width)


class RetinaFaceMobileNetV2(nn.Module):
    """RetinaFace (MobileNetV2, FPN, SSH) returning raw per-anchor heads; see module docstring."""

    def __init__(self) -> None:
        super().__init__()
        specs = _block_specs()
        self.backbone = _MobileNetV2Taps()
        self.fpn = _FPN(tuple(specs[i][1] for i in _FPN_TAPS))
        self.ssh = nn.ModuleList(_SSH(_FPN_CHANNELS) for _ in _FPN_TAPS)
        self.bbox_head = nn.ModuleList(
            nn.Conv2d(_FPN_CHANNELS, _ANCHORS_PER_CELL * 4, 1) for _ in _FPN_TAPS
        )
        self.landmark_head = nn.ModuleList(
            nn.Conv2d(_FPN_CHANNELS, _ANCHORS_PER_CELL * 10, 1) for _ in _FPN_TAPS
        )
        self.class_head = nn.ModuleList(
            nn.Conv2d(_FPN_CHANNELS, _ANCHORS_PER_CELL * 2, 1) for _ in _FPN_TAPS
        )

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Run the network on raw pixels.

        Args:
            images: float32 ``(B, 3, H, W)`` RGB in 0..255, H and W multiples of 32.

        Returns:
            ``boxes (B, A, 4)`` and ``landmarks (B, A, 10)`` raw deltas, ``scores (B, A)`` face
            probability.
        """
        x = images / 127.5 - 1.0  # the graph's own scaling to [-1, 1] (Keras MobileNetV2)
        features = [ssh(f) for ssh, f in zip(self.ssh, self.fpn(self.backbone(x)))]
        boxes = torch.cat([_flatten_head(h(f), 4) for h, f in zip(self.bbox_head, features)], 1)
        landmarks = torch.cat(
            [_flatten_head(h(f), 10) for h, f in zip(self.landmark_head, features)], 1
        )
        logits = torch.cat([_flatten_head(h(f), 2) for h, f in zip(self.class_head, features)], 1)
        # Column 1 is "face": the graph's decoder slices softmax[..., 1] as the score.
        scores = torch.softmax(logits, dim=-1)[..., 1]
        return boxes, landmarks, scores


# ----------------------------------------------------------------------------- conversion


class _GraphWeights:
    """Look-up of weights in a frozen GraphDef by layer scope, following Identity chains."""

    def __init__(self, pb_path: Path) -> None:
        # Imported here: tensorboard's protobuf classes are a pull-time dependency only.
        from tensorboard.compat.proto.graph_pb2 import GraphDef
        from tensorboard.util.tensor_util import make_ndarray

        self._make_ndarray = make_ndarray
        graph = GraphDef()
        try:
            graph.ParseFromString(Path(pb_path).read_bytes())
        except Exception as exc:  # protobuf raises DecodeError, an unrelated type per backend
            raise ValueError(f"{pb_path}: not a TensorFlow GraphDef ({exc})") from exc
        self.path = pb_path
        self.nodes = {node.name: node for node in graph.node}

    def _const(self, name: str) -> np.ndarray:
        node = self.nodes[name.split(":")[0]]
        while node.op == "Identity":
            node = self.nodes[node.input[0]]
        if node.op != "Const":
            raise ValueError(f"{self.path}: {node.name} is a {node.op}, expected a constant")
        return self._make_ndarray(node.attr["value"].tensor)

    def _op(self, scope: str, op: str) -> NodeDef:
        prefix = _TF_PREFIX + scope + "/"
        found = [n for name, n in self.nodes.items() if name.startswith(prefix) and n.op == op]
        if len(found) != 1:
            raise ValueError(
                f"{self.path}: expected one {op} node under {prefix!r}, found {len(found)}"
            )
        return found[0]

    def conv(self, scope: str, depthwise: bool = False) -> torch.Tensor:
        """Kernel of the conv under ``scope`` in torch layout (OIHW, or (C, 1, kh, kw))."""
        node = self._op(scope, "DepthwiseConv2dNative" if depthwise else "Conv2D")
        kernel = self._const(node.input[1])
        # Conv2D: HWIO -> OIHW. Depthwise: H, W, C, multiplier(1) -> C, 1, H, W.
        axes = (2, 3, 0, 1) if depthwise else (3, 2, 0, 1)
        return torch.from_numpy(np.ascontiguousarray(kernel.transpose(axes)))

    def bias(self, scope: str) -> torch.Tensor:
        """Bias of the BiasAdd under ``scope``."""
        return torch.from_numpy(self._const(self._op(scope, "BiasAdd").input[1]).copy())

    def batchnorm(self, scope: str) -> tuple[dict[str, torch.Tensor], float]:
        """BatchNorm2d tensors and the epsilon of the FusedBatchNormV3 under ``scope``."""
        node = self._op(scope, "FusedBatchNormV3")
        # FusedBatchNormV3 inputs: x, scale (gamma), offset (beta), mean, variance.
        keys = ("weight", "bias", "running_mean", "running_var")
        tensors = {
            key: torch.from_numpy(self._const(name).copy())
            for key, name in zip(keys, node.input[1:5])
        }
        tensors["num_batches_tracked"] = torch.tensor(0)
        return tensors, node.attr["epsilon"].f


def _convbn_scopes() -> dict[str, tuple[str, str, bool]]:
    """Torch _ConvBN prefix -> (TF conv scope, TF batch-norm scope, is depthwise)."""
    mnv2 = "MobileNetV2_extrator/"  # sic: the upstream layer name
    scopes = {"backbone.stem": (mnv2 + "Conv1", mnv2 + "bn_Conv1", False)}
    for index, (_, _, _, expansion) in enumerate(_block_specs()):
        keras = "expanded_conv" if index == 0 else f"block_{index}"
        torch_block = f"backbone.blocks.{index}"
        parts = (("depthwise", True), ("project", False))
        if expansion != 1:
            parts = (("expand", False), *parts)
        for part, depthwise in parts:
            tf_scope = mnv2 + f"{keras}_{part}"
            scopes[f"{torch_block}.{part}"] = (tf_scope, tf_scope + "_BN", depthwise)
    # peteryuX names: FPN/ConvBN{,_1,_2} are the stride 8/16/32 laterals, _3/_4 the 16/8 merges.
    fpn = {"lateral.0": "", "lateral.1": "_1", "lateral.2": "_2", "merge.1": "_3", "merge.0": "_4"}
    for name, suffix in fpn.items():
        scopes[f"fpn.{name}"] = (f"FPN/ConvBN{suffix}/conv", f"FPN/ConvBN{suffix}/bn", False)
    ssh_parts = {"conv3": "", "conv5_1": "_1", "conv5_2": "_2", "conv7_2": "_3", "conv7_3": "_4"}
    for level in range(len(_FPN_TAPS)):
        for name, suffix in ssh_parts.items():
            base = f"SSH_{level}/ConvBN{suffix}"
            scopes[f"ssh.{level}.{name}"] = (base + "/conv", base + "/bn", False)
    return scopes


def convert_tf_graph(pb_path: Path) -> dict[str, torch.Tensor]:
    """Build a :class:`RetinaFaceMobileNetV2` state dict from the upstream frozen graph.

    Nothing is folded: every FusedBatchNormV3 becomes a BatchNorm2d, so the torch module
    mirrors the graph layer for layer and parity can be checked per layer if needed.

    Args:
        pb_path: ``frozen_graph.pb`` from the ``retinaface==1.1.1`` wheel.

    Returns:
        State dict whose keys and shapes equal ``RetinaFaceMobileNetV2().state_dict()``.

    Raises:
        ValueError: the file is not a GraphDef, an expected node is missing, or a weight's
            shape or a batch-norm epsilon differs from the module's architecture.
    """
    graph = _GraphWeights(pb_path)
    model = RetinaFaceMobileNetV2()
    expected = model.state_dict()
    modules = dict(model.named_modules())
    state: dict[str, torch.Tensor] = {}
    for prefix, (conv_scope, bn_scope, depthwise) in _convbn_scopes().items():
        state[f"{prefix}.0.weight"] = graph.conv(conv_scope, depthwise)
        bn_tensors, eps = graph.batchnorm(bn_scope)
        module_eps = modules[f"{prefix}.1"].eps
        if not np.isclose(eps, module_eps, rtol=1e-6):
            raise ValueError(f"{pb_path}: {bn_scope} epsilon {eps} != module's {module_eps}")
        state.update({f"{prefix}.1.{k}": v for k, v in bn_tensors.items()})
    heads = {"bbox_head": "BboxHead", "landmark_head": "LandmarkHead", "class_head": "ClassHead"}
    for torch_name, tf_name in heads.items():
        for level in range(len(_FPN_TAPS)):
            scope = f"{tf_name}_{level}"
            state[f"{torch_name}.{level}.weight"] = graph.conv(scope)
            state[f"{torch_name}.{level}.bias"] = graph.bias(scope)
    missing = expected.keys() - state.keys()
    if missing:
        raise ValueError(f"{pb_path}: no weights converted for {sorted(missing)[:5]}")
    for key, tensor in state.items():
        if tensor.shape != expected[key].shape:
            raise ValueError(
                f"{pb_path}: {key} has shape {tuple(tensor.shape)}, "
                f"module expects {tuple(expected[key].shape)}"
            )
    return state

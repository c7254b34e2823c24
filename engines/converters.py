"""Converters: an upstream file → a state dict for the matching architecture in engines.models.

Each converter is named in the registry, so the cache never guesses the format of a file.
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable

import torch

StateDict = dict[str, torch.Tensor]


def _tf_graph(path: Path) -> StateDict:
    from engines.models.retinaface_mnv2 import convert_tf_graph

    return convert_tf_graph(path)


def _keras_h5(path: Path) -> StateDict:
    from engines.models.fer_minixception import convert_keras_h5

    return convert_keras_h5(path)


def _retinaface_pytorch_checkpoint(path: Path) -> StateDict:
    """retinaface-pytorch's release: a zip around one torch file (or that file itself)."""
    from engines.models.retinaface_r50 import load_upstream_file

    return load_upstream_file(path)


def _state_dict(path: Path) -> StateDict:
    """Our own artifacts (exported students): a plain state dict saved with torch.save."""
    return torch.load(path, map_location="cpu", weights_only=True)


CONVERTERS: dict[str, Callable[[Path], StateDict]] = {
    "tf-frozen-graph": _tf_graph,
    "keras-h5": _keras_h5,
    "retinaface-pytorch": _retinaface_pytorch_checkpoint,
    "state-dict": _state_dict,
}


def convert(name: str, path: Path) -> StateDict:
    """Run the named converter on an upstream file."""
    try:
        converter = CONVERTERS[name]
    except KeyError:
        raise ValueError(f"unknown converter {name!r}; known: {', '.join(sorted(CONVERTERS))}") from None
    return converter(path)

"""Converters: an upstream file → a state dict for the matching architecture in engines.models.

Each converter is named in the registry, so the cache never guesses the format of a file.
"""

from __future__ import annotations

import pickle
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Callable

import torch

from engines.sources import FetchError

StateDict = dict[str, torch.Tensor]
#: How torch's weights-only unpickler names a refused global (a class or function to call).
_UNSUPPORTED_GLOBAL = re.compile(r"Unsupported global: GLOBAL ([\w.]+)")


class ConversionError(FetchError):
    """A verified upstream file is not what its converter expects; the message is one line.

    A :class:`FetchError`, so the CLI reports it as one line wherever a model is pulled.
    """


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
    """Our own artifacts (exported students): a plain state dict saved with torch.save.

    The file comes from a user-given model directory, so it is never fully unpickled:
    ``weights_only`` refuses Python objects (which could run code), and that refusal, like a
    file that is not a torch file at all, becomes one line naming the file.
    """
    try:
        loaded = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        # torch's message is many lines of advice to load it unsafely; keep only what it refused.
        if found := _UNSUPPORTED_GLOBAL.search(str(exc)):
            raise ConversionError(f"{path}: not a plain tensor state dict (refused to unpickle: it holds "
                                  f"Python objects, e.g. {found.group(1)})") from None
        raise ConversionError(f"{path}: not a readable torch file (not a plain pickle of tensors)") from None
    except Exception as exc:  # noqa: BLE001 - parsing untrusted bytes fails in many ways (EOFError, IndexError, ...)
        lines = str(exc).strip().splitlines()
        reason = f"{type(exc).__name__}: {lines[0][:200]}" if lines else type(exc).__name__
        raise ConversionError(f"{path}: not a readable torch file ({reason})") from None
    if not isinstance(loaded, Mapping) or not all(
        isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in loaded.items()
    ):
        raise ConversionError(f"{path}: not a plain tensor state dict (expected a mapping of names to tensors, "
                              f"got {type(loaded).__name__})")
    return loaded  # as loaded: an OrderedDict's _metadata (module versions) matters to load_state_dict


def check_fits(expected: Mapping[str, torch.Tensor], given: Mapping[str, torch.Tensor], path: Path,
               architecture: str) -> None:
    """Refuse a state dict whose keys or shapes differ from the architecture's, in one line.

    ``load_state_dict(strict=True)`` would refuse it too, but with a multi-line message listing
    every key; a user who passed the wrong directory needs the file and a short summary.

    Raises:
        ConversionError: missing or unexpected keys, or shape mismatches (counts and a first example).
    """
    missing = [k for k in expected if k not in given]
    unexpected = [k for k in given if k not in expected]
    shapes = [k for k in expected if k in given and tuple(given[k].shape) != tuple(expected[k].shape)]
    problems = []
    if missing:
        problems.append(f"{len(missing)} missing keys, e.g. {missing[0]!r}")
    if unexpected:
        problems.append(f"{len(unexpected)} unexpected keys, e.g. {unexpected[0]!r}")
    if shapes:
        k = shapes[0]
        problems.append(f"{len(shapes)} shape mismatches, e.g. {k!r} {tuple(given[k].shape)} "
                        f"instead of {tuple(expected[k].shape)}")
    if problems:
        raise ConversionError(f"{path}: state dict does not fit architecture {architecture!r} "
                              f"({'; '.join(problems)})")


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

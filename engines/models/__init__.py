"""Torch definitions of every model family, and the one place that builds them by name.

Each family module follows one order: docstring (paper, upstream, licence), constants, pure
functions, ``nn.Module`` classes, the upstream-weight converter. Builders import lazily so that
asking for one family never imports the others.
"""

from __future__ import annotations

from typing import Any, Callable

from torch import nn


def _retinaface_mnv2(**kwargs: Any) -> nn.Module:
    from engines.models.retinaface_mnv2 import RetinaFaceMobileNetV2

    return RetinaFaceMobileNetV2(**kwargs)


def _retinaface_r50(**kwargs: Any) -> nn.Module:
    from engines.models.retinaface_r50 import RetinaFaceResNet50

    return RetinaFaceResNet50(**kwargs)


def _fer_minixception(**kwargs: Any) -> nn.Module:
    from engines.models.fer_minixception import FerScorer

    return FerScorer(**kwargs)


def _student(with_va: bool = True, **kwargs: Any) -> nn.Module:
    from engines.models.student import DeployedStudent, build_student

    return DeployedStudent(build_student(**kwargs), with_va=with_va)


ARCHITECTURES: dict[str, Callable[..., nn.Module]] = {
    "retinaface-mnv2": _retinaface_mnv2,
    "retinaface-r50": _retinaface_r50,
    "fer-minixception": _fer_minixception,
    "student": _student,
}


def build_model(architecture: str, **kwargs: Any) -> nn.Module:
    """A freshly initialised deployment module (eval mode) of the named architecture.

    Raises:
        ValueError: unknown architecture.
    """
    try:
        builder = ARCHITECTURES[architecture]
    except KeyError:
        raise ValueError(
            f"unknown architecture {architecture!r}; known: {', '.join(sorted(ARCHITECTURES))}"
        ) from None
    return builder(**kwargs).eval()

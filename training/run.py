"""Assemble a teacher or student run from a ``TrainConfig``: data, fresh network, optimiser, loop."""

from __future__ import annotations

import logging
from pathlib import Path

from engines.models.student import build_student, load_backbone_weights
from training import checkpoint
from training.config import TrainConfig
from training.datasets.streams import build_streams
from training.loaders import make_eval_loader, make_train_streams
from training.loops import fit, make_optimizer
from training.teachers import Teacher

logger = logging.getLogger(__name__)


def train(config: TrainConfig, out_dir: Path, teacher: Teacher | None = None,
          init: Path | None = None) -> dict[str, float]:
    """Train a fresh network: a teacher when ``teacher`` is None, else a student of ``teacher``.

    Args:
        config: hyper-parameters and dataset paths.
        out_dir: receives ``last.pt`` (resume state) and ``best.pt``.
        teacher: a trained ``MultitaskNet`` (eval mode, on ``config.device``) or an
            ``ExpressionTeacher`` callable.
        init: optional backbone weights for the fresh network.

    Returns:
        Validation metrics of the best epoch.
    """
    streams = build_streams(config.data)
    checkpoint.seed_everything(config.seed)
    arch = {"backbone": config.backbone}
    model = build_student(**arch)
    if init is not None:
        load_backbone_weights(model, init)
    model.to(config.device)
    logger.info("training a %s (%s backbone) into %s", "student" if teacher else "teacher", config.backbone, out_dir)
    return fit(model, make_optimizer(model, config), make_train_streams(streams, config),
               make_eval_loader(streams.validation, config), config, out_dir, arch, teacher)

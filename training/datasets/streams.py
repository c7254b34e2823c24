"""The three training streams and the validation set, assembled from whichever datasets are set.

PAPER.md: (1) expression stream = Aff-Wild2 EXPR frames + ExpW, (2) valence-arousal stream =
Aff-Wild2 VA frames + AFEW-VA, (3) combined stream = AffectNet rows with both labels. AffectNet
rows with only one label (contempt/none codes keep only VA) join the stream of that label.
Validation is the Aff-Wild2 ``Validation_Set`` (the ABAW2 protocol).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

from training.config import DataPaths
from training.datasets.affectnet import read_affectnet
from training.datasets.affwild2 import read_affwild2
from training.datasets.afewva import read_afewva
from training.datasets.expw import read_expw
from training.labels import Sample

logger = logging.getLogger(__name__)

STREAMS = ("expr", "va", "combined")


@dataclass
class Streams:
    """Training samples per stream plus the validation samples (each with whatever labels exist)."""

    train: dict[str, list[Sample]] = field(default_factory=lambda: {name: [] for name in STREAMS})
    validation: list[Sample] = field(default_factory=list)


def build_streams(paths: DataPaths) -> Streams:
    """Read every configured dataset and route its samples to the streams.

    Raises:
        ValueError: no Aff-Wild2 directory (it provides the validation set) or every stream empty.
    """
    if paths.affwild2 is None:
        raise ValueError("the Aff-Wild2 directory is required: its Validation_Set selects the model")
    streams = Streams()
    expr, va = read_affwild2(paths.affwild2, "Train_Set")
    streams.train["expr"] += expr
    streams.train["va"] += va
    val_expr, val_va = read_affwild2(paths.affwild2, "Validation_Set")
    # A shared frame is in both lists; validate on it once.
    streams.validation = list(dict.fromkeys(val_expr + val_va))
    if paths.expw_labels is not None:
        streams.train["expr"] += read_expw(paths.expw_labels, paths.expw_images)
    if paths.afewva is not None:
        streams.train["va"] += read_afewva(paths.afewva)
    if paths.affectnet_csv is not None:
        for sample in read_affectnet(paths.affectnet_csv, paths.affectnet_images):
            name = "combined" if sample.has_expr and sample.has_va else "expr" if sample.has_expr else "va"
            streams.train[name].append(sample)
    for name, samples in streams.train.items():
        logger.info("stream %s: %d samples", name, len(samples))
    if not any(streams.train.values()):
        raise ValueError("every training stream is empty: check the dataset paths")
    return streams

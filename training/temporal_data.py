"""Aff-Wild2 videos as frozen-CNN feature sequences, and the ``annotate train temporal`` run.

The temporal stage trains on videos, so it reads Aff-Wild2 (the only database of the three
streams whose frames form sequences): per video, every annotated frame in frame order, with its
EXPR and VA labels (``MISSING`` where one is absent; a shared video carries both). Frames are
aligned exactly as for the CNN (``training.datasets.alignment``: cached landmarks, the deployment
crop), then the frozen CNN's features are written once to ``<out>/features/<split>.npy`` (float16
memory maps, ~2.5 KB per frame and variant for ``mobilenetv2``), so a resumed or repeated run
reuses them as long as the CNN checkpoint, the variants and the frames are the same.

Augmentation variants (``training.temporal``): variant v > 0 of a video applies one random
translation/scale (``training.datasets.images.jitter_matrix``, the CNN's own range) and, with
probability 0.5, a horizontal flip to every frame of the video; variant 0 is the plain crop.
"""

from __future__ import annotations

import json
import logging
from collections import defaultdict
from pathlib import Path
from typing import Any

import numpy as np
import torch

from engines.align import CROP_SIZE, similarity_matrices, warp
from engines.models.student import MultitaskNet
from engines.models.temporal import FrameFeatures
from engines.sources import sha256_file
from training import checkpoint
from training.config import TrainConfig
from training.datasets.affwild2 import read_affwild2
from training.datasets.alignment import decode_image, with_landmarks
from training.datasets.images import FLIP_P, jitter_matrix
from training.labels import Sample
from training.temporal import FeatureSequence, TemporalConfig, build_temporal, fit_temporal, load_temporal

logger = logging.getLogger(__name__)

_BATCH = 64  # crops per CNN call while extracting features
_INDEX_VERSION = 1


def video_frames(samples: list[Sample]) -> dict[str, list[Sample]]:
    """Samples grouped by video directory, in frame order (a frame in both sets appears once)."""
    videos: dict[str, dict[Path, Sample]] = defaultdict(dict)
    for sample in samples:
        videos[sample.image.parent.name][sample.image] = sample
    return {video: sorted(frames.values(), key=lambda s: int(s.image.stem)) for video, frames in sorted(videos.items())}


def _variant_transform(seed: int, video_index: int, variant: int) -> tuple[np.ndarray, bool]:
    """(3, 3) crop-space jitter and a flip flag, fixed per (video, variant); variant 0: none."""
    if variant == 0:
        return np.eye(3), False
    generator = torch.Generator().manual_seed(seed * 1_000_003 + video_index * 101 + variant)
    jitter = jitter_matrix(generator)
    return jitter, bool(torch.rand((), generator=generator) < FLIP_P)


@torch.no_grad()
def _features(extractor: FrameFeatures, frames: list[Sample], jitter: np.ndarray, flip: bool,
              device: str) -> np.ndarray:
    out = []
    for first in range(0, len(frames), _BATCH):
        chunk = frames[first:first + _BATCH]
        crops = []
        for sample in chunk:
            image = torch.from_numpy(np.ascontiguousarray(decode_image(sample.image)))
            matrix = jitter @ np.vstack([similarity_matrices(np.asarray(sample.landmarks, np.float32)[None])[0], [0, 0, 1]])
            crop = warp(image[None], np.zeros(1, np.int64), matrix[None, :2].astype(np.float32), CROP_SIZE)[0]
            crops.append(crop.flip(-1) if flip else crop)
        out.append(extractor(torch.stack(crops).to(device)).cpu().numpy())
    return np.concatenate(out).astype(np.float16)


def extract_sequences(samples: list[Sample], net: MultitaskNet, variants: int, cache: Path,
                      identity: dict[str, Any], config: TrainConfig) -> list[FeatureSequence]:
    """Feature sequences of every video in ``samples``, cached in ``cache`` (``.npy`` + ``.json``).

    ``identity`` (the CNN's sha256, the variants, the seed) must match the cache's to reuse it.
    """
    videos = video_frames(samples)
    index_path = cache.with_suffix(".json")
    names = list(videos)
    lengths = [len(videos[v]) for v in names]
    key = {"version": _INDEX_VERSION, **identity, "variants": variants, "videos": names, "lengths": lengths}
    if cache.is_file() and index_path.is_file() and json.loads(index_path.read_text()) == key:
        logger.info("reusing the features in %s", cache)
        features = np.load(cache, mmap_mode="r")
    else:
        aligned = video_frames(with_landmarks([s for v in names for s in videos[v]], config.device))
        extractor = FrameFeatures(net).eval().to(config.device)
        cache.parent.mkdir(parents=True, exist_ok=True)
        tmp = cache.with_name(cache.name + ".tmp.npy")
        features = np.lib.format.open_memmap(tmp, mode="w+", dtype=np.float16,
                                             shape=(variants + 1, sum(lengths), extractor.out_features))
        offset = 0
        for video_index, video in enumerate(names):
            frames = aligned[video]
            for variant in range(variants + 1):
                jitter, flip = _variant_transform(config.seed, video_index, variant)
                features[variant, offset:offset + len(frames)] = _features(extractor, frames, jitter, flip, config.device)
            offset += len(frames)
            logger.info("features: %s (%d frames, %d variants)", video, len(frames), variants + 1)
        features.flush()
        del features
        tmp.replace(cache)
        index_path.write_text(json.dumps(key))
        features = np.load(cache, mmap_mode="r")
    sequences, offset = [], 0
    for video, length in zip(names, lengths):
        frames = videos[video]
        expr = np.array([s.expr for s in frames], np.int64)
        va = np.array([[s.valence, s.arousal] for s in frames], np.float32)
        sequences.append(FeatureSequence(video, features[:, offset:offset + length], expr, va))
        offset += length
    return sequences


def train_temporal(config: TrainConfig, student_ckpt: Path, out_dir: Path, temporal: TemporalConfig,
                   teacher_ckpt: Path | None = None) -> dict[str, float]:
    """``annotate train temporal``: the GRU stage on the Aff-Wild2 videos of ``config.data``.

    Without ``teacher_ckpt`` this is the temporal teacher (ground truth only); with the
    ``best.pt`` of such a run it is the temporal student (0.6 GT + 0.4 distillation).

    Raises:
        ValueError: no Aff-Wild2 directory, or a teacher trained on another CNN's features.
    """
    if config.data.affwild2 is None:
        raise ValueError("the temporal stage trains on Aff-Wild2 videos: set data.affwild2 in the config")
    student_digest = sha256_file(student_ckpt)
    teacher = None
    if teacher_ckpt is not None:
        teacher, saved = load_temporal(teacher_ckpt)
        if saved["temporal"].get("student_sha256") != student_digest:
            raise ValueError(f"{teacher_ckpt}: a temporal teacher trained on another CNN than {student_ckpt}")
    net, _ = checkpoint.load_model(student_ckpt)
    identity = {"student_sha256": student_digest, "seed": config.seed}
    train_expr, train_va = read_affwild2(config.data.affwild2, "Train_Set")
    val_expr, val_va = read_affwild2(config.data.affwild2, "Validation_Set")
    train = extract_sequences(train_expr + train_va, net, temporal.variants, out_dir / "features" / "train.npy",
                              identity, config)
    validation = extract_sequences(val_expr + val_va, net, 0, out_dir / "features" / "validation.npy",
                                   identity, config)
    model = build_temporal(net.backbone.out_features, train, temporal)
    meta = {"in_features": net.backbone.out_features, "units": list(temporal.units), "window": temporal.window,
            "student_sha256": student_digest,
            "with_va": bool(train_va) or (teacher is not None),
            "role": "student" if teacher is not None else "teacher"}
    logger.info("temporal %s: %d training videos (%d frames), %d validation videos", meta["role"], len(train),
                sum(len(s) for s in train), len(validation))
    return fit_temporal(model, train, validation, temporal, out_dir, meta, teacher)

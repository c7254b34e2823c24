"""Loop wiring that the formula tests cannot see: teachers, configs."""

from pathlib import Path

import pytest
import torch
from torch import nn

from engines.models.student import build_student
from training.config import ConfigError, TrainConfig, load_config
from training.labels import MISSING
from training.loops import step_loss


class TinyExpressionTeacher(nn.Module):
    """An external, expression-only teacher: images -> 7 logits."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(3, 7)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.fc(images.mean(dim=(2, 3)) / 255)


def _batches():
    torch.manual_seed(0)
    images = torch.rand(4, 3, 48, 48) * 255
    no_va = torch.full((4, 2), float(MISSING))
    return {"expr": (images, torch.tensor([0, 1, 2, 3]), no_va),
            "va": (images.flip(0), torch.full((4,), MISSING), torch.rand(4, 2) * 2 - 1)}


def test_external_teacher_distils_expression_only():
    model = build_student("tiny").eval()  # eval: dropout off so the two calls are comparable
    config = TrainConfig(backbone="tiny")
    _, alone = step_loss(model, _batches(), None, config)
    _, taught = step_loss(model, _batches(), TinyExpressionTeacher(), config)
    assert taught["va"] == pytest.approx(alone["va"])  # no VA soft labels: VA is ground truth only
    assert taught["expr"] != pytest.approx(alone["expr"])  # EXPR gains KD on both streams


def _shared_frames(seed: int = 1):
    """A batch of shared frames: each frame carries both labels."""
    torch.manual_seed(seed)
    return torch.rand(4, 3, 48, 48) * 255, torch.tensor([0, 1, 2, 3]), torch.rand(4, 2) * 2 - 1


def _own_task_only():
    (images, expr, _), (images2, _, va2) = _shared_frames(1), _shared_frames(2)
    no_va, no_expr = torch.full((4, 2), float(MISSING)), torch.full((4,), MISSING)
    return {"expr": (images, expr, no_va), "va": (images2, no_expr, va2)}


def _with_cross_task():
    return {"expr": _shared_frames(1), "va": _shared_frames(2)}


@pytest.mark.parametrize("cross_task", [False, True])
def test_teacher_cross_task_switch(cross_task):
    """Off (paper Eq. 7): the VA labels of shared frames in the EXPR stream (and vice versa) do not count."""
    model = build_student("tiny").eval()
    config = TrainConfig(backbone="tiny", teacher_cross_task=cross_task)
    _, own = step_loss(model, _own_task_only(), None, config)
    _, shared = step_loss(model, _with_cross_task(), None, config)
    if cross_task:  # each task gains a second stream's term, so both means change
        assert shared["expr"] != pytest.approx(own["expr"]) and shared["va"] != pytest.approx(own["va"])
    else:
        assert shared == pytest.approx(own)


@pytest.mark.parametrize("cross_task", [False, True])
def test_student_cross_task_switch(cross_task):
    """On (paper default, "shared labels"): shared frames get the 0.6/0.4 mix on the other task too."""
    model, teacher = build_student("tiny").eval(), build_student("tiny").eval()
    config = TrainConfig(backbone="tiny", student_cross_task=cross_task)
    _, own = step_loss(model, _own_task_only(), teacher, config)
    _, shared = step_loss(model, _with_cross_task(), teacher, config)
    assert (shared == pytest.approx(own)) is not cross_task


def test_combined_stream_keeps_both_labels_without_cross_task():
    """AffectNet's combined stream owns both tasks: the switch never masks it."""
    model = build_student("tiny").eval()
    images, expr, va = _shared_frames()
    _, parts = step_loss(model, {"combined": (images, expr, va)}, None, TrainConfig(backbone="tiny"))
    assert parts["expr"] > 0 and parts["va"] > 0
    with pytest.raises(ValueError, match="unknown stream 'faces'"):
        step_loss(model, {"faces": (images, expr, va)}, None, TrainConfig(backbone="tiny"))


def test_paper_config_holds_the_paper_values():
    config = load_config(Path(__file__).parents[2] / "training" / "configs" / "paper.toml")
    assert (config.lr, config.betas, config.epochs, config.patience) == (1e-4, (0.5, 0.999), 40, 5)
    assert (config.temperature, config.alpha, config.va_bins, config.image_size) == (1.5, 0.6, 20, 112)
    assert config.data.affwild2.name == "Aff-Wild2"
    # 64 per stream, as the authors' train.py runs the paper's "batch size 64" (3 streams).
    assert config.batch_size == 192
    assert (config.teacher_cross_task, config.student_cross_task) == (False, True)


def test_cross_task_switches_take_toml_booleans(tmp_path):
    path = tmp_path / "c.toml"
    path.write_text("teacher_cross_task = true\nstudent_cross_task = false\n")
    config = load_config(path)
    assert (config.teacher_cross_task, config.student_cross_task) == (True, False)
    path.write_text("teacher_cross_task = 1\n")
    with pytest.raises(ConfigError, match="'teacher_cross_task' must be"):
        load_config(path)
    path.write_text("epochs = true\n")
    with pytest.raises(ConfigError, match="'epochs' must be"):
        load_config(path)


@pytest.mark.parametrize(("text", "message"), [
    ("[data]\nimagenet = 'x'\n", "unknown key 'data.imagenet'"),
    ("lr = 'fast'\n", "'lr' must be"),
    ("alpha = 1.5\n", "invalid value for 'alpha'"),
])
def test_config_errors_name_file_and_key(tmp_path, text, message):
    path = tmp_path / "c.toml"
    path.write_text(text)
    with pytest.raises(ConfigError, match=rf"^{path}: .*{message}"):
        load_config(path)

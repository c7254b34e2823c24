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


def test_paper_config_holds_the_paper_values():
    config = load_config(Path(__file__).parents[2] / "training" / "configs" / "paper.toml")
    assert (config.lr, config.betas, config.epochs, config.patience) == (1e-4, (0.5, 0.999), 40, 5)
    assert (config.temperature, config.alpha, config.va_bins, config.image_size) == (1.5, 0.6, 20, 112)
    assert config.data.affwild2.name == "Aff-Wild2"


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

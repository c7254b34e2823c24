"""``annotate train teacher|student|temporal``, ``annotate eval`` and ``annotate export``.

Thin click wrappers over ``training/``: they validate options, build a ``TrainConfig`` and call
the library.
"""

from __future__ import annotations

import json
import logging
import pickle
from pathlib import Path

import click

logger = logging.getLogger(__name__)

EXTERNAL_TEACHERS = ("fer-minixception",)
_FILE = click.Path(exists=True, dir_okay=False, path_type=Path)
_DIR = click.Path(file_okay=False, path_type=Path)


def _config(path: Path):
    from training.config import ConfigError, load_config

    try:
        return load_config(path)
    except ConfigError as error:
        raise click.BadParameter(str(error), param_hint="--config") from None


def _run(config, out: Path, teacher=None, init: Path | None = None) -> None:
    from training.labels import AnnotationError
    from training.run import train as run_training

    try:
        metrics = run_training(config, out, teacher=teacher, init=init)
    except (AnnotationError, ValueError, OSError) as error:
        raise click.ClickException(str(error)) from None
    click.echo(f"best checkpoint: {out / 'best.pt'}")
    click.echo(json.dumps(metrics, indent=2))


def _external_teacher(name: str, image_size: int):
    """Adapt a project scorer to the ``ExpressionTeacher`` protocol (torch in, logits out)."""
    import torch

    from engines.factory import create_scorer

    if image_size != 112:
        raise click.UsageError(f"--external-teacher needs image_size 112 in the config, got {image_size}")
    scorer = create_scorer(name, backend="torch")

    def teacher(images: torch.Tensor) -> torch.Tensor:
        return scorer(images.detach())["expr_logits"].to(images.device)

    return teacher


_config_option = click.option("--config", "config_path", type=_FILE, required=True, help="Training TOML file.")
_init_option = click.option("--init", type=_FILE, default=None, help="Backbone weights (a torch state dict).")


@click.group()
def train() -> None:
    """Train the multitask teacher, then the student that is deployed."""
    from training.progress import show_epochs

    show_epochs()  # one line per epoch, as a batch job's log needs, without -v


@train.command(epilog="""Examples:

  annotate train teacher --config training/configs/paper.toml --out runs/teacher

  annotate train teacher --config smoke.toml --init mobilenetv2_imagenet.pt
""")
@_config_option
@click.option("--out", type=_DIR, default=Path("runs/teacher"), show_default=True, help="Run directory.")
@_init_option
def teacher(config_path: Path, out: Path, init: Path | None) -> None:
    """Train a teacher on ground-truth labels only. Re-running resumes from OUT/last.pt."""
    _run(_config(config_path), out, init=init)


@train.command(epilog="""Examples:

  annotate train student --teacher runs/teacher/best.pt --config training/configs/paper.toml

  annotate train student --external-teacher fer-minixception --config paper.toml --out runs/fer-student
""")
@click.option("--teacher", "teacher_ckpt", type=_FILE, default=None, help="Teacher checkpoint (best.pt).")
@click.option("--external-teacher", type=click.Choice(EXTERNAL_TEACHERS), default=None,
              help="An expression-only scorer as teacher (no VA distillation).")
@_config_option
@click.option("--out", type=_DIR, default=Path("runs/student"), show_default=True, help="Run directory.")
@_init_option
def student(teacher_ckpt: Path | None, external_teacher: str | None, config_path: Path, out: Path,
            init: Path | None) -> None:
    """Train a fresh student on 0.6 x ground truth + 0.4 x the teacher's soft labels."""
    if (teacher_ckpt is None) == (external_teacher is None):
        raise click.UsageError("give exactly one of --teacher and --external-teacher")
    config = _config(config_path)
    if external_teacher is not None:
        teacher_model = _external_teacher(external_teacher, config.image_size)
    else:
        from training.checkpoint import load_model

        try:
            teacher_model = load_model(teacher_ckpt)[0].to(config.device)
        except (KeyError, RuntimeError, pickle.UnpicklingError) as error:
            raise click.ClickException(f"{teacher_ckpt}: not a teacher checkpoint ({error})") from None
    _run(config, out, teacher=teacher_model, init=init)


@train.command(epilog="""Examples:

  annotate train temporal --student runs/student/best.pt --config training/configs/paper.toml --out runs/temporal-teacher

  annotate train temporal --student runs/student/best.pt --teacher runs/temporal-teacher/best.pt --config paper.toml
""")
@click.option("--student", "student_ckpt", type=_FILE, required=True,
              help="The trained CNN student (best.pt); frozen, it gives the GRU one feature per frame.")
@click.option("--teacher", "teacher_ckpt", type=_FILE, default=None,
              help="A temporal teacher (best.pt of this command without --teacher): train the temporal student.")
@_config_option
@click.option("--out", type=_DIR, default=Path("runs/temporal"), show_default=True, help="Run directory.")
@click.option("--epochs", type=click.IntRange(min=1), default=None, help="[default: the config's epochs]")
@click.option("--variants", type=click.IntRange(min=0), default=None,
              help="Sequence-level augmentations precomputed per video.  [default: 4]")
def temporal(student_ckpt: Path, teacher_ckpt: Path | None, config_path: Path, out: Path, epochs: int | None,
             variants: int | None) -> None:
    """Train the temporal stage (bidirectional GRU over 32-frame windows of frozen CNN features).

    PAPER.md, temporal stage: without --teacher, a teacher on ground truth; with it, a student
    on 0.6 x ground truth + 0.4 x the teacher's soft labels. Aff-Wild2 videos only (the other
    databases are still images). Features are cached in OUT/features; re-running resumes.
    """
    from training.labels import AnnotationError
    from training.temporal import TemporalConfig, with_overrides
    from training.temporal_data import train_temporal

    config = _config(config_path)
    settings = with_overrides(TemporalConfig.from_train_config(config), epochs=epochs, variants=variants)
    try:
        metrics = train_temporal(config, student_ckpt, out, settings, teacher_ckpt)
    except (AnnotationError, ValueError, OSError, KeyError, pickle.UnpicklingError) as error:
        raise click.ClickException(str(error)) from None
    click.echo(f"best checkpoint: {out / 'best.pt'}")
    click.echo(json.dumps(metrics, indent=2))


@click.command("eval", epilog="""Examples:

  annotate eval results.parquet --affwild2 data/Aff-Wild2
""")
@click.argument("results", type=_FILE)
@click.option("--affwild2", type=click.Path(exists=True, file_okay=False, path_type=Path), required=True,
              help="Directory with EXPR_Set/ and VA_Set/.")
def eval_cmd(results: Path, affwild2: Path) -> None:
    """ABAW2 metrics (EXPR score, CCC valence/arousal) of a results table on Aff-Wild2 labels."""
    from training.evaluate import evaluate_table
    from training.labels import AnnotationError

    try:
        metrics = evaluate_table(results, affwild2)
    except (AnnotationError, ValueError, OSError) as error:
        raise click.ClickException(str(error)) from None
    click.echo(json.dumps(metrics, indent=2))


@click.command(epilog="""Examples:

  annotate export runs/student/best.pt --out models/student

  annotate export runs/student/best.pt --temporal runs/temporal/best.pt --out models/student-gru
""")
@click.argument("ckpt", type=_FILE)
@click.option("--out", type=_DIR, required=True, help="Directory for student.onnx, student.pt, model_card.json.")
@click.option("--temporal", "temporal_ckpt", type=_FILE, default=None,
              help="Also export this temporal stage (best.pt of 'annotate train temporal' on CKPT), for "
                   "'annotate run --temporal'.")
def export(ckpt: Path, out: Path, temporal_ckpt: Path | None) -> None:
    """Export a trained checkpoint as ONNX + torch artifacts with a model card."""
    from training.export import export_student

    try:
        card = export_student(ckpt, out)
    except (KeyError, RuntimeError, pickle.UnpicklingError) as error:
        raise click.ClickException(f"{ckpt}: not a training checkpoint ({error})") from None
    if temporal_ckpt is not None:
        from training.temporal_export import TemporalExportError, export_temporal

        try:
            card = export_temporal(ckpt, temporal_ckpt, out)
        except TemporalExportError as error:
            raise click.ClickException(str(error)) from None
        except (KeyError, RuntimeError, pickle.UnpicklingError) as error:
            raise click.ClickException(f"{temporal_ckpt}: not a temporal checkpoint ({error})") from None
    click.echo(f"wrote {card}")

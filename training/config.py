"""Training configuration: a frozen dataclass read from a small TOML file.

Defaults are the paper's values (PAPER.md "Losses"/"Optimiser"); ``configs/paper.toml`` restates
them with comments and ``configs/smoke.toml`` shrinks them for a CPU. Relative dataset paths are
resolved against the TOML file's directory so a config can travel with its data.

Preprocessing is not configurable: every image is the deployment aligner's 112x112 crop
(``training.datasets.images``). ``image_size`` must therefore be 112, and ``resize_size`` (the
paper's resize-to-134-then-crop, a zoom ``annotate run`` never applies) is accepted from older
TOML files and ignored with a warning.
"""

from __future__ import annotations

import dataclasses
import logging
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any


logger = logging.getLogger(__name__)

#: ``engines.align.CROP_SIZE``, the side of the crop ``annotate run`` scores (not imported here:
#: reading a config must not import torch; a test checks the two agree).
DEPLOYED_CROP = 112
#: Keys older configs may hold that no longer mean anything: key -> why it is ignored.
_IGNORED = {"resize_size": "training and evaluation use the deployment's aligned 112x112 crop with no "
                           "resize (the paper's 134 -> 112 crop would zoom faces 1.2x against annotate run)"}


class ConfigError(ValueError):
    """A config file problem; the message is one line naming the file and the key."""


@dataclass(frozen=True)
class DataPaths:
    """Dataset locations; ``None`` means the dataset is not used."""

    affwild2: Path | None = None  # holds cropped_aligned/, EXPR_Set/, VA_Set/
    affectnet_csv: Path | None = None
    affectnet_images: Path | None = None
    expw_labels: Path | None = None  # label.lst
    expw_images: Path | None = None  # the "origin" image directory
    afewva: Path | None = None  # one sub-directory per clip


@dataclass(frozen=True)
class TrainConfig:
    """Everything a teacher or student run needs besides the data itself."""

    backbone: str = "mobilenetv2"
    lr: float = 1e-4
    betas: tuple[float, float] = (0.5, 0.999)
    epochs: int = 40
    patience: int = 5
    temperature: float = 1.5
    alpha: float = 0.6  # ground-truth weight of the student mix; 1 - alpha goes to distillation
    # Cross-task labels of shared frames (an Aff-Wild2 frame in both EXPR_Set and VA_Set carries a VA
    # label in the EXPR stream and vice versa). The paper's teacher (Eq. 7) learns from each
    # stream's own task only; its student uses them ("shared labels", Tables 1-2: EXPR 0.525 vs
    # 0.513 without). Turn ``student_cross_task`` off for the "no shared labels" row.
    teacher_cross_task: bool = False
    student_cross_task: bool = True
    batch_size: int = 96  # split equally over the three streams
    steps_per_epoch: int | None = None  # None: one pass over the largest stream
    image_size: int = DEPLOYED_CROP  # fixed: the deployment aligner's crop side
    va_bins: int = 20
    num_workers: int = 4
    seed: int = 0
    device: str = "cpu"
    data: DataPaths = field(default_factory=DataPaths)


_PAIRS = {"betas"}
# TOML value types per key; TOML writes 1e-4 as a float but 1 as an int, so floats accept ints.
_TYPES: dict[str, type | tuple[type, ...]] = {
    "backbone": str, "lr": (int, float), "betas": tuple, "epochs": int, "patience": int,
    "temperature": (int, float), "alpha": (int, float), "batch_size": int, "steps_per_epoch": int,
    "image_size": int, "va_bins": int, "num_workers": int, "seed": int,
    "device": str, "teacher_cross_task": bool, "student_cross_task": bool,
}


def _check_keys(table: dict[str, Any], cls: type, path: Path, prefix: str = "") -> None:
    known = {f.name for f in dataclasses.fields(cls)}
    for key in table:
        if key not in known:
            raise ConfigError(f"{path}: unknown key '{prefix}{key}'")


def load_config(path: Path) -> TrainConfig:
    """Parse a TOML file into a ``TrainConfig``; absent keys keep the paper's defaults.

    Raises:
        ConfigError: unreadable TOML, unknown key, or an invalid value (one line, names the file).
    """
    try:
        table = tomllib.loads(path.read_text())
    except (OSError, tomllib.TOMLDecodeError) as error:
        raise ConfigError(f"{path}: {error}") from None
    for key in _IGNORED.keys() & table.keys():
        logger.warning("%s: '%s' is ignored: %s", path, key, _IGNORED[key])
        del table[key]
    _check_keys(table, TrainConfig, path)
    data_table = table.pop("data", {})
    _check_keys(data_table, DataPaths, path, "data.")
    data = DataPaths(**{key: (path.parent / value).resolve() for key, value in data_table.items()})
    values = {key: tuple(value) if key in _PAIRS else value for key, value in table.items()}
    for key, value in values.items():
        # bool is a subclass of int: only a bool key takes true/false.
        if not isinstance(value, _TYPES[key]) or (isinstance(value, bool) and _TYPES[key] is not bool):
            raise ConfigError(f"{path}: '{key}' must be {_TYPES[key]}, got {value!r}")
    config = TrainConfig(data=data, **values)
    _validate(config, path)
    return config


def _validate(config: TrainConfig, path: Path) -> None:
    checks = {
        "lr": config.lr > 0,
        "epochs": config.epochs >= 1,
        "patience": config.patience >= 1,
        "temperature": config.temperature > 0,
        "alpha": 0 <= config.alpha <= 1,
        "batch_size": config.batch_size >= 6,  # at least 2 per stream: batch BN and CCC need 2
        "betas": len(config.betas) == 2 and all(0 <= b < 1 for b in config.betas),
    }
    if config.image_size != DEPLOYED_CROP:
        raise ConfigError(f"{path}: 'image_size' must be {DEPLOYED_CROP}, the crop annotate run scores "
                          f"(engines.align), got {config.image_size}")
    for key, ok in checks.items():
        if not ok:
            raise ConfigError(f"{path}: invalid value for '{key}': {getattr(config, key)!r}")
    pairs = (("affectnet_csv", "affectnet_images"), ("expw_labels", "expw_images"))
    for first, second in pairs:
        if (getattr(config.data, first) is None) != (getattr(config.data, second) is None):
            raise ConfigError(f"{path}: 'data.{first}' and 'data.{second}' must be set together")

"""``annotate distil`` as a library call: harvest (Ray, resumable shards) → train → export → card.

``OUT`` holds ``shards/`` (phase 1, one Parquet per video), ``train/`` (phase 2's checkpoints,
resumed by a rerun) and ``model/`` (what ``annotate run --model OUT/model`` loads), plus
``distil.json``, the marker that says the folder is ours (``--overwrite`` removes only these).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import re
import time
from dataclasses import dataclass, replace
from pathlib import Path

from annotator.cluster import release_ray
from annotator.config import ConfigError, RunConfig
from annotator.harvest import SHARDS, HarvestSummary, harvest
from annotator.ownership import writing
from annotator.progress import STATUS_EVERY_S
from engines.saving import staged, write_whole
from training.distil import DistilOptions

MARKER = "distil.json"


@dataclass(frozen=True)
class DistilSummary:
    """What a distil run did; the CLI prints it and derives the exit code."""

    harvest: HarvestSummary
    model_dir: Path
    card: dict

    def line(self) -> str:
        metrics = self.card["metrics"]
        held = metrics["held_out"]
        va = (f", CCC V {held['ccc_valence']:.3f} A {held['ccc_arousal']:.3f}" if "ccc_valence" in held else "")
        speed = metrics["speed_crops_per_s_cpu_1_thread"]
        return (f"{self.model_dir}: held-out agreement with the teacher {held['top1_agreement']:.3f}{va} "
                f"({held['faces']} faces), on the distilled faces {metrics['distilled_on']['top1_agreement']:.3f}; "
                f"{speed['student']:.0f} vs {speed['teacher']:.0f} crops/s (student vs teacher, 1 thread)")


#: The files distil writes in its folders, by name (a user's file beside them is never removed).
_SHARD_NAME = re.compile(r"^\.?[0-9a-f]{16}\.parquet(\.tmp)?$")
_TRAIN_NAMES = {"last.pt", "best.pt", "last.pt.tmp", "best.pt.tmp"}
_MODEL_NAMES = {"model_card.json", "student.pt", "student.onnx"}


def _written_by_us(out: Path) -> list[Path]:
    """The files ``annotate distil`` wrote under ``out``: shards, checkpoints, the exported model."""
    found = [p for p in (out / SHARDS).glob("*") if p.is_file() and _SHARD_NAME.match(p.name)]
    found += [out / "train" / name for name in _TRAIN_NAMES if (out / "train" / name).is_file()]
    model = out / "model"
    names = set(_MODEL_NAMES)
    with contextlib.suppress(OSError, ValueError):  # the card names any further artifacts it wrote
        names |= set(json.loads((model / "model_card.json").read_text()).get("sha256", {}))
    found += [model / name for name in names if "/" not in name and (model / name).is_file()]
    return found


def claim_out(out: Path, overwrite: bool) -> None:
    """``OUT`` must be new, empty or ours (it holds the marker); --overwrite removes our parts only.

    Raises:
        ConfigError: ``OUT`` is a file, or a folder with other content.
    """
    if out.exists() and not out.is_dir():
        raise ConfigError(f"{out}: exists and is not a directory")
    if out.is_dir() and any(out.iterdir()) and not (out / MARKER).is_file():
        raise ConfigError(f"{out}: not empty and not written by annotate distil (choose another --out)")
    if overwrite:
        for path in _written_by_us(out):
            path.unlink(missing_ok=True)
        for name in (SHARDS, "train", "model"):
            with contextlib.suppress(OSError):  # kept when it holds anything else (the user's)
                (out / name).rmdir()
    out.mkdir(parents=True, exist_ok=True)
    (out / MARKER).write_text(json.dumps({"written_by": "annotate distil"}) + "\n")


def teacher_record(config: RunConfig) -> dict[str, object]:
    """The teacher's name, id and digests (as ``annotate run`` records a scorer), pulled if needed."""
    from annotator.run import run_metadata

    return next(m for m in run_metadata(config)["models"] if m["role"] == "scorer")


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def distil(config: RunConfig, labels: Path | None, options: DistilOptions, progress: bool = True,
           status_every: float = STATUS_EVERY_S) -> DistilSummary:
    """Distil ``config.scorer`` (the teacher) into a student on the videos of ``config.inputs``.

    Raises:
        ConfigError: bad teacher, inputs or OUT; raised before any work.
        ValueError: too few faces to train on, or malformed --labels.
    """
    from annotator.run import lookup_models
    from training.distil import (attach_labels, initial_weights, load_corpus, scorer_metrics, split_videos,
                                 train_student)
    from training.export import export_student

    out = config.out
    lookup_models(config)  # an unknown teacher or a bad spec: one line, before anything is written
    if labels is not None and not labels.is_dir():
        raise ConfigError(f"{labels}: --labels is not a directory")
    try:
        init = initial_weights(options)  # --init shipped with another backbone: one line, before any work
    except ValueError as exc:
        raise ConfigError(str(exc)) from None
    claim_out(out, config.overwrite)
    teacher = teacher_record(config)
    summary = harvest(config, str(teacher["id"]), out, progress, status_every)
    release_ray()  # the harvest was its last use: training runs in this process
    corpus = load_corpus(out)
    label_counts = attach_labels(corpus, labels) if labels is not None else {"expr": 0, "va": 0}
    started = time.perf_counter()
    kept = "the harvested faces and the last finished epoch are kept, re-run to resume"
    with writing(out, kept):  # a full disk: one line, and the re-run starts from the last epoch
        train_student(corpus, out / "train", replace(options, progress=progress), config.cache_dir)
    train_seconds = time.perf_counter() - started
    with_va = corpus.teacher_va is not None
    training_videos, held_videos = split_videos(corpus)
    model_dir = out / "model"
    name = f"distilled-{teacher['name']}"[:64]
    training_data = (f"{len(corpus)} faces of {len(corpus.videos)} unlabelled videos, targets: {teacher['name']}'s "
                     f"outputs (T^2 KL at T={options.temperature})"
                     + (f", mixed {options.alpha}/{1 - options.alpha:.1f} with {label_counts} labelled faces"
                        if any(label_counts.values()) else ""))
    with writing(out, kept):
        card_path = export_student(out / "train" / "last.pt", model_dir, name=name, training_data=training_data,
                                   with_va=with_va)
    card = json.loads(card_path.read_text())
    card["description"] = f"student ({options.backbone}) distilled from {teacher['name']} by annotate distil"
    card["valence_arousal"] = ("predicted: distilled from the teacher's valence/arousal through the 20-bin heads"
                               if with_va else f"null: the teacher {teacher['name']} predicts no valence/arousal")
    card["teacher"] = {key: teacher.get(key) for key in ("name", "id", "source", "spec", "spec_sha256", "onnx_sha256",
                                                         "artifact_sha256", "source_sha256", "licence")
                       if teacher.get(key) is not None}
    card["corpus"] = {"videos": len(corpus.videos), "frames": corpus.frames, "faces": len(corpus),
                      "training_videos": training_videos, "held_out_videos": held_videos,
                      "sampling": {"every_n": config.sampling.every_n, "fps": config.sampling.fps},
                      "labelled_faces": label_counts}
    card["training"] = {"backbone": options.backbone, "init": init, "temperature": options.temperature, "alpha": options.alpha,
                        "epochs": options.epochs, "lr": options.lr,
                        "lr_schedule": "cosine to 0 over the epochs; the last epoch is the student",
                        "seconds": round(train_seconds, 1)}
    card["metrics"] = {**card["metrics"], **scorer_metrics(model_dir, corpus, config.scorer, config.cache_dir)}
    with writing(out, kept), staged([card_path]) as temps:  # a full disk: the exported card stays as it was
        write_whole(temps[card_path], (json.dumps(card, indent=2) + "\n").encode())
    return DistilSummary(summary, model_dir, card)

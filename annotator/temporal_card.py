"""The temporal head's record in a model directory's card: read, checked, verified by sha256.

Apart from :mod:`annotator.temporal` (which runs the head and needs torch) because the driver
checks ``--temporal`` and writes the head's record into the run's metadata before any work, and
the driver never imports torch: that import alone was 1.2 s of every run's start-up.
"""

from __future__ import annotations

import json
from pathlib import Path

from engines.sources import plain_name, sha256_file

MODEL_CARD = "model_card.json"
_ROLES = ("features_onnx", "onnx")


class NoTemporalHead(ValueError):
    """The model has no temporal head; the message is one line naming the model."""


def temporal_card(model: str) -> dict:
    """The ``temporal`` object of a model directory's card, its artifact names checked.

    Raises:
        NoTemporalHead: ``model`` is not a directory, has no card, or its card has no head.
    """
    card_path = Path(model) / MODEL_CARD
    hint = "export one with 'annotate export CKPT --temporal TEMPORAL_CKPT --out DIR'"
    if not card_path.is_file():
        raise NoTemporalHead(f"--temporal needs a model directory with a temporal head; {model!r} is not one ({hint})")
    try:
        card = json.loads(card_path.read_text())
    except (OSError, ValueError) as exc:
        raise NoTemporalHead(f"{card_path}: not a usable model card ({exc})") from None
    head = card.get("temporal") if isinstance(card, dict) else None
    if not isinstance(head, dict):
        raise NoTemporalHead(f"{card_path}: the model has no temporal head ({hint})")
    artifacts = head.get("artifacts")
    digests = card.get("sha256")
    if not isinstance(artifacts, dict) or not isinstance(digests, dict):
        raise NoTemporalHead(f'{card_path}: "temporal.artifacts" and "sha256" must be JSON objects')
    for role in _ROLES:
        name = artifacts.get(role)
        if not plain_name(name) or not isinstance(digests.get(name), str):
            raise NoTemporalHead(f'{card_path}: "temporal.artifacts.{role}" must name a file listed in "sha256"')
    window, stride = head.get("window"), head.get("stride")
    if not (isinstance(window, int) and isinstance(stride, int) and 2 <= window <= 4096 and 1 <= stride <= window):
        raise NoTemporalHead(f'{card_path}: "temporal.window" and "temporal.stride" must be integers, '
                             f"1 <= stride <= window, got {window!r} and {stride!r}")
    return head | {"sha256": {artifacts[r]: digests[artifacts[r]] for r in _ROLES}}


def verified_temporal_card(model: str) -> dict:
    """:func:`temporal_card` after checking each artifact's sha256 against the card.

    Raises:
        NoTemporalHead: no head, or an artifact missing or not matching its digest.
    """
    head = temporal_card(model)
    for name, digest in head["sha256"].items():
        path = Path(model) / name
        if not path.is_file() or sha256_file(path) != digest:
            raise NoTemporalHead(f"{path}: missing or does not match the sha256 in its model card")
    return head


def head_model_id(head: dict) -> str:
    return f"temporal:{head['sha256'][head['artifacts']['onnx']][:12]}"


def temporal_record(model: str) -> dict[str, object]:
    """What the run's Parquet metadata says about the head (verified, not loaded)."""
    head = verified_temporal_card(model)
    return {"role": "temporal", "id": head_model_id(head), "artifact_sha256": head["sha256"],
            "window": head.get("window"), "stride": head.get("stride"),
            "valence_arousal": "predicted" if head.get("with_va", True) else "not predicted by this model",
            "description": "frozen CNN features -> bidirectional GRU per task over windows of each face "
                           "track (PAPER.md, temporal stage)"}

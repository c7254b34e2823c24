"""A model spec: a small TOML file that lets ``annotate`` run any ONNX affect model.

The spec says everything that would otherwise have to be guessed from the graph (the habit
EXAMPLES.md warns against): how to cut and normalise the face, which output holds which
numbers, what the classes are called, and where the weights come from. Its format is
documented in the README ("Use a better model: any ONNX model by spec"). Parsing is strict and
every problem is one line naming the file and the key, e.g.
``model.toml: [input] mean: expected 3 numbers, got 2``.

This module only reads and checks the text (and, in :func:`check_onnx`, the ONNX graph's
declared inputs and outputs); running the model is :mod:`engines.spec_scorer`.
"""

from __future__ import annotations

import hashlib
import math
import re
import tomllib
from dataclasses import dataclass
from pathlib import Path

from engines.registry import EXPRESSIONS

#: Names a model may give each of our 7 classes (compared lower-case). Anything else is an extra
#: class (contempt, "other", ...): dropped, and the remaining probabilities renormalised.
LABEL_ALIASES: dict[str, tuple[str, ...]] = {
    "neutral": ("neutral", "neutrality", "calm"),
    "anger": ("anger", "angry"),
    "disgust": ("disgust", "disgusted"),
    "fear": ("fear", "fearful", "afraid", "scared"),
    "happiness": ("happiness", "happy", "joy"),
    "sadness": ("sadness", "sad"),
    "surprise": ("surprise", "surprised"),
}
_CANONICAL = {alias: name for name, aliases in LABEL_ALIASES.items() for alias in aliases}
#: Layouts, colour orders, templates and crop modes a spec may name.
LAYOUTS = ("NCHW", "NHWC")
COLOURS = ("RGB", "BGR", "grey")
TEMPLATES = ("arcface",)
#: ``frame``: warp the frame straight to the model's size (one interpolation). ``aligned112``:
#: cut our 112x112 aligned crop, then resize it bilinearly to ``size`` — what a model trained on
#: resized 112 crops (our own FER teacher) saw.
CROP_MODES = ("frame", "aligned112")
_SHA256 = re.compile(r"[0-9a-f]{64}")
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")  # becomes a cache directory name
_FRACTION = re.compile(r"\s*([0-9.]+)\s*/\s*([0-9.]+)\s*")
_MAX_SIZE = 1024  # a face crop larger than this is a mistake in the spec, not a model


class SpecError(ValueError):
    """A spec that cannot be used; the message is one line naming the file and the key."""


@dataclass(frozen=True)
class InputSpec:
    """How the face becomes the model's input tensor (applied in this order after the crop:
    colour, then ``x * scale``, then ``(x - mean) / std`` per channel, then the layout)."""

    size: int
    layout: str
    colour: str
    scale: float
    mean: tuple[float, ...]
    std: tuple[float, ...]
    template: str = "arcface"
    margin: float = 1.0
    crop_from: str = "frame"

    @property
    def channels(self) -> int:
        return 1 if self.colour == "grey" else 3


@dataclass(frozen=True)
class ExpressionOutput:
    """Which numbers are the expression scores, and which of our classes each one is."""

    name: str
    start: int
    end: int
    kind: str  # "logits" | "probabilities"
    labels: tuple[str, ...]
    sliced: bool = False  # False: the output holds exactly the labelled values

    @property
    def columns(self) -> tuple[int, ...]:
        """For each of our 7 classes (Aff-Wild2 order), its index in the sliced output."""
        canonical = [_CANONICAL.get(label.lower()) for label in self.labels]
        return tuple(canonical.index(name) for name in EXPRESSIONS)

    @property
    def dropped(self) -> tuple[str, ...]:
        """The model's labels that are none of our 7 classes."""
        return tuple(label for label in self.labels if label.lower() not in _CANONICAL)


@dataclass(frozen=True)
class ScalarOutput:
    """One number per face (valence or arousal): output ``name`` at ``index`` of its last axis,
    mapped linearly from ``low..high`` onto -1..1."""

    name: str
    index: int
    low: float
    high: float


@dataclass(frozen=True)
class ModelSpec:
    """A parsed, checked spec. ``onnx`` is absolute; both digests are full hex sha256."""

    path: Path
    name: str
    onnx: Path
    sha256: str
    spec_sha256: str
    licence: str
    source: str
    input: InputSpec
    expression: ExpressionOutput
    valence: ScalarOutput | None = None
    arousal: ScalarOutput | None = None

    @property
    def has_va(self) -> bool:
        return self.valence is not None

    @property
    def output_names(self) -> tuple[str, ...]:
        """The ONNX outputs the scorer reads, each once, in first-use order."""
        names = [self.expression.name] + [o.name for o in (self.valence, self.arousal) if o is not None]
        return tuple(dict.fromkeys(names))

    @property
    def model_id(self) -> str:
        """``name:onnx12/spec12``: the weights and the preprocessing that made a row (a changed
        margin or mean changes the numbers, so it changes the id and a resumed run's fingerprint)."""
        return f"{self.name}:{self.sha256[:12]}/{self.spec_sha256[:12]}"


def is_spec(name_or_path: str) -> bool:
    """Whether ``--model`` names a spec file rather than a registry name or model directory."""
    return str(name_or_path).lower().endswith(".toml")


class _Reader:
    """Typed access to one table of the TOML; every failure names the file and the key."""

    def __init__(self, path: Path, table: dict, where: str) -> None:
        self.path, self.table, self.where = path, table, where

    def fail(self, key: str, why: str) -> SpecError:
        return SpecError(f"{self.path}: {self.where} {key}: {why}")

    def has(self, key: str) -> bool:
        return key in self.table

    def string(self, key: str, default: str | None = None, choices: tuple[str, ...] = ()) -> str:
        value = self._get(key, default)
        if not isinstance(value, str) or not value.strip():
            raise self.fail(key, f"expected a non-empty string, got {value!r}")
        if choices and value not in choices:
            raise self.fail(key, f"must be one of {', '.join(repr(c) for c in choices)}, got {value!r}")
        return value

    def number(self, key: str, default: float | None = None, *, positive: bool = False) -> float:
        value = self._get(key, default)
        if isinstance(value, str) and (match := _FRACTION.fullmatch(value)):  # "1/255"
            top, bottom = float(match[1]), float(match[2])
            value = top / bottom if bottom else math.inf
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            raise self.fail(key, f"expected a finite number, got {value!r}")
        if positive and value <= 0:
            raise self.fail(key, f"must be > 0, got {value!r}")
        return float(value)

    def integer(self, key: str, default: int | None = None, low: int = 0, high: int | None = None) -> int:
        value = self._get(key, default)
        if isinstance(value, bool) or not isinstance(value, int):
            raise self.fail(key, f"expected an integer, got {value!r}")
        if value < low or (high is not None and value > high):
            raise self.fail(key, f"must be in [{low}, {high if high is not None else '∞'}], got {value}")
        return value

    def numbers(self, key: str, count: int, default: list | None = None) -> tuple[float, ...]:
        value = self._get(key, default)
        if not isinstance(value, list) or not all(
                isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) for v in value):
            raise self.fail(key, f"expected a list of {count} numbers, got {value!r}")
        if len(value) != count:
            raise self.fail(key, f"expected {count} number{'s' * (count != 1)}, got {len(value)}")
        return tuple(float(v) for v in value)

    def strings(self, key: str) -> tuple[str, ...]:
        value = self._get(key, None)
        if not isinstance(value, list) or not value or not all(isinstance(v, str) and v.strip() for v in value):
            raise self.fail(key, f"expected a non-empty list of names, got {value!r}")
        return tuple(value)

    def unknown_keys(self, known: tuple[str, ...]) -> None:
        for key in self.table:
            if key not in known:
                raise self.fail(key, f"unknown key (known: {', '.join(known)})")

    def _get(self, key: str, default: object) -> object:
        if key in self.table:
            return self.table[key]
        if default is None:
            raise self.fail(key, "is missing")
        return default


def _table(path: Path, doc: dict, dotted: str, required: bool = True) -> dict | None:
    node: object = doc
    for part in dotted.split("."):
        node = node.get(part) if isinstance(node, dict) else None
    if node is None:
        if required:
            raise SpecError(f"{path}: [{dotted}]: table is missing")
        return None
    if not isinstance(node, dict):
        raise SpecError(f"{path}: [{dotted}]: expected a table, got {type(node).__name__}")
    return node


def load_spec(path: str | Path) -> ModelSpec:
    """Read and check a spec; the ONNX file's digest is verified against ``[model] sha256``.

    Raises:
        SpecError: unreadable file, bad TOML, a missing, unknown or invalid key, a missing ONNX
            file or a digest mismatch (one line naming the file and the key).
    """
    path = Path(path)
    try:
        text = path.read_bytes()
        doc = tomllib.loads(text.decode("utf-8"))
    except OSError as exc:
        raise SpecError(f"{path}: cannot read the spec ({exc.strerror or exc})") from None
    except (UnicodeDecodeError, tomllib.TOMLDecodeError) as exc:
        raise SpecError(f"{path}: not valid TOML ({exc})") from None
    for key in doc:
        if key not in ("model", "input", "output"):
            raise SpecError(f"{path}: [{key}]: unknown table (known: [model], [input], [output.*])")
    model = _Reader(path, _table(path, doc, "model"), "[model]")
    model.unknown_keys(("name", "onnx", "sha256", "licence", "source"))
    name = model.string("name")
    if not _NAME.fullmatch(name):
        raise model.fail("name", f"must be a plain name (letters, digits, . _ -, at most 64), got {name!r}")
    onnx = _onnx_path(path, model)
    sha256 = model.string("sha256").lower()
    if not _SHA256.fullmatch(sha256):
        raise model.fail("sha256", f"expected 64 hex digits, got {sha256!r}")
    spec = ModelSpec(
        path=path, name=name, onnx=onnx, sha256=sha256, spec_sha256=hashlib.sha256(text).hexdigest(),
        licence=model.string("licence"), source=model.string("source"),
        input=_input(path, doc), expression=_expression(path, doc),
        valence=_scalar(path, doc, "valence"), arousal=_scalar(path, doc, "arousal"),
    )
    if (spec.valence is None) != (spec.arousal is None):
        missing = "arousal" if spec.arousal is None else "valence"
        raise SpecError(f"{path}: [output.{missing}]: table is missing (give both valence and arousal, or neither)")
    outputs = _table(path, doc, "output")
    for key in outputs:
        if key not in ("expression", "valence", "arousal"):
            raise SpecError(f"{path}: [output.{key}]: unknown table (known: expression, valence, arousal)")
    _verify_digest(spec, model)
    return spec


def _onnx_path(path: Path, model: _Reader) -> Path:
    relative = model.string("onnx")
    onnx = (path.parent / relative).resolve()
    if not onnx.is_file():
        raise model.fail("onnx", f"{relative!r} is not a file (looked at {onnx})")
    return onnx


def _verify_digest(spec: ModelSpec, model: _Reader) -> None:
    from engines.sources import sha256_file

    actual = sha256_file(spec.onnx)
    if actual != spec.sha256:
        raise model.fail("sha256", f"{spec.onnx.name} has sha256 {actual}, not the {spec.sha256} the spec pins "
                                   "(a different or damaged file; if you replaced it on purpose, update the digest)")


def _input(path: Path, doc: dict) -> InputSpec:
    read = _Reader(path, _table(path, doc, "input"), "[input]")
    read.unknown_keys(("size", "layout", "colour", "scale", "mean", "std", "template", "margin", "crop_from"))
    colour = read.string("colour", choices=COLOURS)
    channels = 1 if colour == "grey" else 3
    std = read.numbers("std", channels, [1.0] * channels)
    for i, value in enumerate(std):
        if value == 0:
            raise read.fail("std", f"entry {i} is 0 (a division by zero)")
    return InputSpec(
        size=read.integer("size", low=8, high=_MAX_SIZE),
        layout=read.string("layout", "NCHW", LAYOUTS),
        colour=colour,
        scale=read.number("scale", positive=True),
        mean=read.numbers("mean", channels, [0.0] * channels),
        std=std,
        template=read.string("template", "arcface", TEMPLATES),
        margin=_margin(read),
        crop_from=read.string("crop_from", "frame", CROP_MODES),
    )


def _margin(read: _Reader) -> float:
    margin = read.number("margin", 1.0, positive=True)
    if not 0.5 <= margin <= 4.0:  # outside this the face is cut off, or a speck in the crop
        raise read.fail("margin", f"must be in [0.5, 4], got {margin}")
    return margin


def _expression(path: Path, doc: dict) -> ExpressionOutput:
    read = _Reader(path, _table(path, doc, "output.expression"), "[output.expression]")
    read.unknown_keys(("name", "slice", "kind", "labels"))
    labels = read.strings("labels")
    lowered = [label.lower() for label in labels]
    if len(set(lowered)) != len(lowered):
        repeated = sorted({label for label in lowered if lowered.count(label) > 1})
        raise read.fail("labels", f"names repeat: {', '.join(repeated)}")
    canonical = [_CANONICAL.get(label) for label in lowered]
    for ours in EXPRESSIONS:
        hits = [labels[i] for i, c in enumerate(canonical) if c == ours]
        if not hits:
            raise read.fail("labels", f"no label for {ours} (accepted names: {', '.join(LABEL_ALIASES[ours])})")
        if len(hits) > 1:
            raise read.fail("labels", f"{' and '.join(hits)} both mean {ours}")
    start, end = 0, len(labels)
    if read.has("slice"):
        bounds = read.numbers("slice", 2)
        if not all(b.is_integer() for b in bounds) or not 0 <= bounds[0] < bounds[1]:
            raise read.fail("slice", f"expected [start, end] with 0 <= start < end, got {read.table['slice']!r}")
        start, end = int(bounds[0]), int(bounds[1])
        if end - start != len(labels):
            raise read.fail("slice", f"[{start}, {end}] holds {end - start} values but labels names {len(labels)}")
    return ExpressionOutput(name=read.string("name"), start=start, end=end,
                            kind=read.string("kind", choices=("logits", "probabilities")), labels=labels,
                            sliced=read.has("slice"))


def _scalar(path: Path, doc: dict, which: str) -> ScalarOutput | None:
    table = _table(path, doc, f"output.{which}", required=False)
    if table is None:
        return None
    read = _Reader(path, table, f"[output.{which}]")
    read.unknown_keys(("name", "index", "range"))
    low, high = read.numbers("range", 2, [-1.0, 1.0])
    if not low < high:
        raise read.fail("range", f"expected [low, high] with low < high, got {[low, high]}")
    return ScalarOutput(name=read.string("name"), index=read.integer("index", 0), low=low, high=high)


def check_onnx(spec: ModelSpec) -> tuple[int | None, tuple[int | str | None, ...]]:
    """Check the spec against the graph's declared input and outputs, before anything runs.

    Returns:
        (the input's fixed batch size, or None when the batch axis is dynamic; the input shape).

    Raises:
        SpecError: one line naming the key the graph contradicts (an output name it lacks, an
            input size or layout it does not take, a slice past the end of an output).
    """
    import onnx

    where = f"{spec.path}:"
    try:
        graph = onnx.load(str(spec.onnx), load_external_data=False).graph
    except Exception as exc:  # noqa: BLE001 - onnx raises DecodeError, ValueError, OSError...
        raise SpecError(f"{where} [model] onnx: {spec.onnx.name} is not a readable ONNX model ({exc})") from None
    initialisers = {init.name for init in graph.initializer}
    inputs = [i for i in graph.input if i.name not in initialisers]
    if len(inputs) != 1:
        raise SpecError(f"{where} [model] onnx: the model must take one input tensor, it takes {len(inputs)}")
    shape = _dims(inputs[0])
    if inputs[0].type.tensor_type.elem_type != onnx.TensorProto.FLOAT:
        raise SpecError(f"{where} [model] onnx: the input must be float32 "
                        f"({onnx.TensorProto.DataType.Name(inputs[0].type.tensor_type.elem_type)} given)")
    if len(shape) != 4:
        raise SpecError(f"{where} [input] layout: the ONNX input has {len(shape)} axes, not the 4 of {spec.input.layout}")
    size, channels = spec.input.size, spec.input.channels
    expected = (size, size, channels) if spec.input.layout == "NHWC" else (channels, size, size)
    for declared, wanted, key in zip(shape[1:], expected, _axis_keys(spec.input.layout)):
        if isinstance(declared, int) and declared != wanted:
            raise SpecError(f"{where} [input] {key}: the ONNX input is {_shape_text(shape)} "
                            f"({spec.input.layout}); the spec implies {_shape_text((shape[0], *expected))}")
    outputs = {o.name: _dims(o) for o in graph.output}
    expression = spec.expression
    _check_output(where, "[output.expression]", expression.name, expression.end, outputs)
    values = outputs[expression.name][-1] if outputs[expression.name] else None
    if not expression.sliced and isinstance(values, int) and values != len(expression.labels):
        raise SpecError(f"{where} [output.expression] labels: output {expression.name!r} has {values} values per "
                        f"face but labels names {len(expression.labels)} (give slice = [start, end])")
    for which, scalar in (("valence", spec.valence), ("arousal", spec.arousal)):
        if scalar is not None:
            _check_output(where, f"[output.{which}]", scalar.name, scalar.index + 1, outputs)
    batch = shape[0] if isinstance(shape[0], int) and shape[0] > 0 else None
    if batch not in (None, 1):
        raise SpecError(f"{where} [model] onnx: the input's batch axis is fixed at {batch}; export it with a "
                        "dynamic batch axis (or batch 1)")
    return batch, shape


def _axis_keys(layout: str) -> tuple[str, str, str]:
    return ("size", "size", "colour") if layout == "NHWC" else ("colour", "size", "size")


def _dims(value) -> tuple[int | str | None, ...]:
    dims = value.type.tensor_type.shape.dim
    return tuple(d.dim_value if d.HasField("dim_value") else (d.dim_param or None) for d in dims)


def _shape_text(shape: tuple) -> str:
    return "x".join(str(d) if isinstance(d, int) else "?" for d in shape)


def _check_output(where: str, table: str, name: str, needed: int, outputs: dict) -> None:
    if name not in outputs:
        raise SpecError(f"{where} {table} name: the ONNX has no output {name!r} (it has: {', '.join(outputs)})")
    last = outputs[name][-1] if outputs[name] else 1
    if isinstance(last, int) and last < needed:
        key = "index" if table in ("[output.valence]", "[output.arousal]") else "slice"
        raise SpecError(f"{where} {table} {key}: output {name!r} has {last} values per face, the spec needs {needed}")

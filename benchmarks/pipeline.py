"""Kept as an alias: ``python -m benchmarks.pipeline ARGS`` is ``annotate bench ARGS``.

The one-worker pipeline benchmark that lived here grew into ``annotate bench`` (see
:mod:`benchmarks.suite`): every stage alone and the whole pipeline, per clip, backend and batch
size, with JSON and a plot.

    python -m benchmarks.pipeline --quick --backend onnxrt
"""

from __future__ import annotations

from benchmarks.media import carphone_path  # noqa: F401  (its old home; scripts imported it from here)
from benchmarks.suite import main

if __name__ == "__main__":
    main()

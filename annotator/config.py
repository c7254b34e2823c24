"""The run configuration: one frozen value built by the CLI (or by code) and passed down.

Nothing below the CLI imports click; validation lives here so a library caller gets the same
one-line errors as a command-line user, before any work starts.
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from engines.decoders import Sampling

Device = Literal["auto", "cpu", "cuda"]
DecoderName = Literal["auto", "pyav", "dali"]
BackendName = Literal["auto", "torch", "onnxrt", "tensorrt"]

DEFAULT_DETECTOR = "retinaface-mnv2"
#: A new face must score this on a full frame (a tracked one keeps down to engines.refind.TRACK_THRESHOLD).
DEFAULT_DET_THRESHOLD = 0.9
#: The detector input's long side on a keyframe (see engines.retinaface.detector_side).
DEFAULT_DET_SIZE = 640
#: The shipped student (training/default_student.py); expression only, so valence/arousal are null.
DEFAULT_SCORER = "student-fer-distilled"


#: Faces smaller than this (shorter box side, video pixels) are dropped; the detector is sized so
#: that such a face is still 32 of its pixels where the --det-size cap allows (see engines.retinaface.detector_side).
DEFAULT_MIN_FACE = 32.0
#: Full-frame detection on every K-th sampled frame; tracked faces are re-found in between. 20 (a
#: new face is found within 0.67 s at 30 fps) reaches 150 frames/s at 720p on two cores with the
#: same recall and expression agreement as 15 (benchmarks/README.md, Earlier numbers).
DEFAULT_DETECT_EVERY = 20
#: One keyframe in this many sampled frames (the first included) is a scan at up to twice
#: --det-size, where the faces --min-face asks for and the cap hides are found. At 720p a scan
#: costs 4x a keyframe (164 vs 42 ms on one core): every 300 frames (10 s at 30 fps) that is
#: ~0.5 ms a frame, 4 %; a small face there from the start is found at once, one that appears
#: later within 10 s (README, Speed and recall).
DEFAULT_SCAN_EVERY = 300
#: A scan looks at the frame this many times larger than --det-size at most (1280 at the default
#: 640: a 720p frame at full size; 1080p at two thirds, so faces from 48 px).
SCAN_SIZE_FACTOR = 2
#: Seconds without progress after which a Ray worker ends itself (annotator.watchdog): no single
#: step takes near this long (one batch's inference, one frame's decoding, one seek, hashing
#: 16 MiB of the file), while frames decoded count as progress however sparse the sampling.
DEFAULT_STALL_TIMEOUT_S = 600.0


#: More pipelines than this on one GPU only queue on its NVDEC engines (7 on an H100, the most of any).
MAX_PIPELINES_PER_GPU = 16


def usable_cores() -> int:
    """The CPUs this process may run on: its affinity mask where the OS has one (``taskset``, a
    batch scheduler's cpuset), which ``os.cpu_count()`` ignores."""
    try:
        return len(os.sched_getaffinity(0)) or 1
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


class ConfigError(ValueError):
    """An option value that cannot work; the message is one line naming the option."""


#: --out names that ask for a file of another format: annotate writes Parquet only, and would take
#: such a name for a directory of parts (``--out results.csv`` made a directory named so).
_OTHER_FORMATS = frozenset({".csv", ".tsv", ".txt", ".json", ".jsonl", ".ndjson", ".xlsx", ".xls", ".ods",
                            ".feather", ".arrow", ".ipc", ".orc", ".avro", ".h5", ".hdf5", ".hdf", ".pkl",
                            ".pickle", ".npy", ".npz", ".mat", ".db", ".sqlite", ".duckdb"})
#: Other spellings of a Parquet file's suffix, which would also have made a directory.
_PARQUET_SPELLINGS = frozenset({".pq", ".parq", ".parquet"})


def check_out_name(out: Path) -> None:
    """Refuse an ``--out`` whose name asks for what annotate would not write (an existing
    directory of that name, an earlier run's output, is left to the ownership check).

    Raises:
        ConfigError: the name ends in another table format's suffix, or spells Parquet's
            otherwise than ``.parquet``.
    """
    suffix = out.suffix
    if out.is_dir() or suffix == ".parquet":
        return
    if suffix.lower() in _OTHER_FORMATS:
        raise ConfigError(f"--out {out}: annotate writes Parquet, not {suffix}; give a .parquet file or a "
                          f"directory (pandas.read_parquet(...).to_csv(...) converts the result)")
    if suffix.lower() in _PARQUET_SPELLINGS:
        raise ConfigError(f"--out {out}: a single result file is named *.parquet (another name is taken "
                          f"for a directory of parts); give {out.with_suffix('.parquet')}")


#: Input paths a run's metadata lists; past this many it gives their count (options_for_metadata).
INPUTS_RECORDED = 20


@dataclass(frozen=True)
class RunConfig:
    """Everything one ``annotate run`` needs; see ``annotate run --help`` for each field."""

    inputs: tuple[Path, ...]
    out: Path
    sampling: Sampling = field(default_factory=Sampling)
    batch_size: int | None = None  # None: sized to the device, see resolved_batch_size
    workers: int | None = None  # None: sized to the Ray cluster; 0: in this process, no Ray
    address: str | None = None
    device: Device = "auto"
    decoder: DecoderName = "auto"
    deinterlace: bool = True  # interlaced frames made progressive (engines.decoders.deinterlace)
    backend: BackendName = "auto"
    detector: str = DEFAULT_DETECTOR
    scorer: str = DEFAULT_SCORER
    det_threshold: float = DEFAULT_DET_THRESHOLD
    det_size: int = DEFAULT_DET_SIZE
    min_face: float = DEFAULT_MIN_FACE
    detect_every: int = DEFAULT_DETECT_EVERY
    scan_every: int = DEFAULT_SCAN_EVERY  # 0: never scan beyond --det-size
    # Keyframes' full-frame detection through an int8 copy of the detector, where the backend is
    # ONNX Runtime on a CPU (engines.int8); faces are re-found and aligned by the float network.
    int8_keyframes: bool = True
    cache_dir: Path | None = None
    overwrite: bool = False
    pipelines_per_gpu: int | None = None  # None: one per NVDEC engine of the GPU, where known
    temporal: bool = False  # the scorer directory's CNN + GRU head over each face track (annotator.temporal)
    # A Ray worker with no progress this long ends (annotator.watchdog); one frozen is killed (actor_pool).
    stall_timeout: float = DEFAULT_STALL_TIMEOUT_S
    # Paths read from --files-from (annotator.file_list), and the list's name ("-": standard input).
    # Unlike ``inputs``, a listed path that does not exist is that path's error row, not a usage error.
    listed: tuple[Path, ...] = ()
    files_from: str | None = None


    def __post_init__(self) -> None:
        if self.batch_size is not None and self.batch_size < 1:
            raise ConfigError(f"--batch-size must be >= 1, got {self.batch_size}")
        if self.workers is not None and self.workers < 0:
            raise ConfigError(f"--workers must be >= 0, got {self.workers}")
        if not 0.0 < self.det_threshold < 1.0:
            raise ConfigError(f"--det-threshold must be in (0, 1), got {self.det_threshold}")
        if self.det_size < 32 or self.det_size > 4096:
            raise ConfigError(f"--det-size must be in [32, 4096], got {self.det_size}")
        if self.min_face < 0:
            raise ConfigError(f"--min-face must be >= 0, got {self.min_face}")
        if self.detect_every < 1:
            raise ConfigError(f"--detect-every must be >= 1, got {self.detect_every}")
        if self.scan_every < 0:
            raise ConfigError(f"--scan-every must be >= 0, got {self.scan_every}")
        if not self.stall_timeout >= 0:
            raise ConfigError(f"--stall-timeout must be >= 0 seconds, got {self.stall_timeout}")
        if self.pipelines_per_gpu is not None and not 1 <= self.pipelines_per_gpu <= MAX_PIPELINES_PER_GPU:
            raise ConfigError(f"--pipelines-per-gpu must be in [1, {MAX_PIPELINES_PER_GPU}], got {self.pipelines_per_gpu}")
        # --decoder dali is allowed without a GPU: DALI's CPU reader takes VP8/VP9/MJPEG and every
        # other file goes to PyAV (engines.decoders.routed), so the DALI graph runs everywhere.

    @property
    def scan_size(self) -> int:
        """Cap on the long side a scan sees (--det-size when scans are off)."""
        return self.det_size * SCAN_SIZE_FACTOR if self.scan_every else self.det_size

    def resolved_device(self) -> str:
        """``cuda`` or ``cpu``: ``auto`` picks the GPU when torch sees one."""
        if self.device != "auto":
            return self.device
        import torch

        return "cuda" if torch.cuda.is_available() else "cpu"

    def resolved_backend(self) -> str:
        from engines.runtimes import default_backend

        return default_backend(self.resolved_device()) if self.backend == "auto" else self.backend

    def resolved_decoder(self) -> str:
        if self.decoder != "auto":
            return self.decoder
        if self.resolved_device() == "cuda":
            import importlib.util

            if importlib.util.find_spec("nvidia.dali") is not None:
                return "dali"
        return "pyav"

    def resolved_batch_size(self) -> int:
        """Frames per detector batch: explicit, else 32 on a GPU and 8 on a CPU.

        On a CPU, batches beyond 8 frames buy no speed (measured: 21-23 frames/s for 4..32 at
        720p, det-size 640) but cost memory: a 32-frame batch at 640 peaks at 5 GB RSS and a
        3.5 s first-batch warm-up, 8 frames at 1.4 GB and none. A GPU needs the larger batch
        to fill its cores.
        """
        if self.batch_size is not None:
            return self.batch_size
        return 32 if self.resolved_device() == "cuda" else 8

    def options_for_metadata(self) -> dict[str, object]:
        """The run's options as plain JSON values, for the Parquet file metadata."""
        values = dataclasses.asdict(self)
        # Every part's footer carries these options: a run over 10,000 paths named one by one
        # would write them all into each of its 10,000 parts (twice a part: about 1 MB each), so
        # past a few the paths are counted, not listed (the rows name each video anyway).
        values["inputs"] = [str(p) for p in self.inputs[:INPUTS_RECORDED]]
        if len(self.inputs) > INPUTS_RECORDED:
            values["inputs_count"] = len(self.inputs)
        del values["listed"]
        if self.files_from is not None:
            values["files_listed"] = len(self.listed)
        values["out"] = str(self.out)
        values["cache_dir"] = str(self.cache_dir) if self.cache_dir else None
        return values

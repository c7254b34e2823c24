"""The decoder a worker calls: probe each file once, decode it with DALI where DALI can, else PyAV.

``--decoder auto`` on a GPU and ``--decoder dali`` anywhere go through here. A file DALI cannot
read (a codec the GPU's NVDEC lacks, 10-bit or 4:2:2 video, an unusual container) goes to PyAV,
and so does one DALI fails on before it yields a frame; each such choice is logged with its
reason, so no file becomes a failed row only because of the decoder picked for the run.
"""

from __future__ import annotations

import dataclasses
import functools
import importlib.util
import logging
from collections.abc import Iterator
from pathlib import Path

import av

from engines.decoders import DecodeError, DecodeReport, FrameBatch, Sampling
from engines.decoders.choice import DecoderChoice, choose_decoder
from engines.decoders.probe import probe
from engines.decoders.segments import Segment, shown_times

log = logging.getLogger(__name__)


def dali_installed() -> bool:
    """Whether ``nvidia.dali`` can be imported (without importing it)."""
    return importlib.util.find_spec("nvidia") is not None and importlib.util.find_spec("nvidia.dali") is not None


def _reset(report: DecodeReport) -> None:
    for field in dataclasses.fields(report):
        setattr(report, field.name, field.default)


class RoutedDecoder:
    """``decoder(path, sampling, batch_size, report=..., segment=...)`` with a per-file choice.

    Holds at most one DALI pipeline per backend and batch size, fed file after file.

    Args:
        requested: ``--decoder``: ``auto``, ``pyav`` or ``dali``.
        device: this worker's device, ``cpu`` or ``cuda[:N]``.
        threads: FFmpeg threads for PyAV (0: one per core).
        convert_threads: threads of PyAV's RGB conversion (None: ``threads``).
        gpu_name: the CUDA device's name, for its NVDEC's codecs (None: asked from torch).
        deinterlace: make interlaced frames progressive (PyAV's bwdif; DALI cannot, so interlaced
            files go to PyAV).
    """

    def __init__(self, requested: str, device: str, threads: int = 0, gpu_name: str | None = None,
                 convert_threads: int | None = None, deinterlace: bool = True) -> None:
        from engines.decoders import pyav

        self.requested = requested
        self.device = device
        self.device_id = int(device.split(":")[1]) if ":" in device else None
        if device.startswith("cuda") and gpu_name is None:
            import torch

            gpu_name = torch.cuda.get_device_name(self.device_id) if torch.cuda.is_available() else None
        self.gpu_name = gpu_name
        self.deinterlace = deinterlace
        self._pyav = functools.partial(pyav.decode, threads=threads, convert_threads=convert_threads,
                                       deinterlace=deinterlace)
        self._dali: dict[tuple[str, int], object] = {}
        self.last_choice: DecoderChoice | None = None  # of the latest file: for logs, benchmarks, tests

    def __call__(self, path: str | Path, sampling: Sampling, batch_size: int, *,
                 report: DecodeReport | None = None, segment: Segment | None = None) -> Iterator[FrameBatch]:
        report = report if report is not None else DecodeReport()
        if segment is not None:  # only PyAV seeks
            self.last_choice = DecoderChoice("pyav", "a segment of a long video")
            return self._pyav(path, sampling, batch_size, report=report, segment=segment)
        if self.requested == "pyav" or (self.requested == "auto" and not self.device.startswith("cuda")):
            self.last_choice = DecoderChoice("pyav", "--decoder pyav" if self.requested == "pyav" else "no GPU")
            return self._pyav(path, sampling, batch_size, report=report)
        return self._routed(Path(path), sampling, batch_size, report)

    def _routed(self, path: Path, sampling: Sampling, batch_size: int, report: DecodeReport) -> Iterator[FrameBatch]:
        info = probe(path)
        choice = choose_decoder(info, self.requested, self.device, self.gpu_name, dali_installed(),
                                deinterlace=self.deinterlace)
        self.last_choice = choice
        if choice.kind == "pyav":
            log.info("%s: decoded by PyAV: %s", path, choice.reason)
            yield from self._pyav(path, sampling, batch_size, report=report)
            return
        log.debug("%s: decoded by DALI: %s", path, choice.reason)
        batches = self._dali_decoder(choice.kind, batch_size).decode(path, sampling, report=report, info=info)
        last: FrameBatch | None = None
        try:
            for last in batches:
                yield last
        except (DecodeError, RuntimeError) as exc:
            reason = str(exc).removeprefix(f"{path}: ")
            if last is None:
                self.last_choice = DecoderChoice("pyav", f"DALI failed before the first frame ({reason})")
                log.warning("%s: decoded by PyAV: %s", path, self.last_choice.reason)
                _reset(report)
                yield from self._pyav(path, sampling, batch_size, report=report)
            else:
                yield from self._pyav_after(path, sampling, batch_size, report, int(last.frame_index[-1]) + 1, reason)

    def _pyav_after(self, path: Path, sampling: Sampling, batch_size: int, report: DecodeReport,
                    resume: int, reason: str) -> Iterator[FrameBatch]:
        """The frames from ``resume`` on, by PyAV, after DALI failed there (a damaged stretch of a
        file NVDEC rejects, where FFmpeg skips the damaged packets and goes on).

        The rest is decoded as a segment from that frame (a seek to the keyframe before it), so
        the rows so far stay and no frame comes twice; ``report`` then counts the whole file: the
        frames DALI handed on, and what PyAV found in the rest (damage, a cut-short end). A file
        that can no longer be read keeps what DALI handed on, and the rest is reported lost.
        """
        self.last_choice = DecoderChoice("pyav", f"DALI stopped at frame {resume}: {reason}; PyAV decoded the rest")
        log.warning("%s: %s", path, self.last_choice.reason)
        try:
            times, time_base = shown_times(path)
        except (av.error.FFmpegError, OSError, DecodeError):  # gone or unreadable since DALI opened it
            report.stopped_early = reason  # what DALI handed on stays; the rest is lost
            report.frames_lost = max(report.frames_lost, report.frames_expected - resume)
            return
        if resume >= len(times):  # DALI failed past the last frame: nothing is left to decode
            return
        rest = Segment(0, 1, times[resume], None, resume, previous_s=times[resume - 1] * time_base,
                       video_start_s=times[0] * time_base)
        # DALI's report holds no damage (it raises instead) and PyAV's sets the same size,
        # orientation and streams; only the counts are the whole file's, not the rest's.
        expected = report.frames_expected
        try:
            for batch in self._pyav(path, sampling, batch_size, report=report, segment=rest):
                report.frames_expected = expected
                yield batch
        except DecodeError:  # no frame after the failure decodes: the file is damaged from there on
            report.stopped_early = report.stopped_early or reason
            report.frames_lost = max(report.frames_lost, len(times) - resume)
            if report.first_bad_s is None:
                report.first_bad_s = times[resume] * time_base
        report.frames_decoded += resume
        report.frames_expected = expected

    def _dali_decoder(self, kind: str, batch_size: int):
        from engines.decoders.dali import DaliVideoDecoder

        key = (kind, batch_size)
        if key not in self._dali:
            device = "gpu" if kind == "dali-gpu" else "cpu"
            self._dali[key] = DaliVideoDecoder(device, batch_size, self.device_id if device == "gpu" else None)
        return self._dali[key]

"""The GPU path's logic, on a machine without a GPU: engine profiles, chunking, verified engine
files, the per-file decoder choice, device resolution in a Ray worker, pipelines per GPU, and the
one-line refusal of ``--device cuda`` where there is no GPU.

What needs a GPU itself (building a TensorRT engine, NVDEC) is in tests/test_tensorrt.py and
tests/test_dali_decoder.py and skips there with its reason.
"""

from __future__ import annotations

import fractions
import importlib.util
import logging
import os
import subprocess
import sys
import types
from pathlib import Path
from types import SimpleNamespace

import av
import numpy as np
import pytest
import torch

from annotator.config import RunConfig
from annotator.orchestrate import accelerator_type, check_gpus, gpu_pipelines, gpu_pool_size
from annotator.worker import worker_device
from engines.cache import Artifacts
from engines.decoders import DecodeReport, Sampling
from engines.decoders import pyav as pyav_decoder
from engines.decoders.choice import DecoderChoice, choose_decoder, gpu_family, pipelines_per_gpu
from engines.decoders.probe import StreamInfo, probe
from engines.registry import get_entry
from engines.runtimes import derived
from engines.runtimes import engine_plan as plan
from engines.runtimes import tensorrt as trt_runtime

HAS_DALI = importlib.util.find_spec("nvidia") is not None and importlib.util.find_spec("nvidia.dali") is not None
GIB = 2**30


# ---- 1. engine profiles follow the run ----


@pytest.mark.parametrize(
    ("batch", "det_size", "opt", "max_"),
    [
        (32, 640, (32, 3, 384, 640), (32, 3, 640, 640)),  # the GPU defaults
        (24, 640, (24, 3, 384, 640), (32, 3, 640, 640)),  # bucket: 24 shares the 32 engine
        (8, 1000, (8, 3, 576, 1024), (8, 3, 1024, 1024)),  # sides padded to 32
        (256, 1280, (27, 3, 736, 1280), (27, 3, 1280, 1280)),  # the budget cuts the batch
        (32, 4096, (2, 3, 2304, 4096), (2, 3, 4096, 4096)),  # --det-size 4096 still builds
    ],
)
def test_detector_profile_is_the_runs_shape(batch: int, det_size: int, opt: tuple, max_: tuple) -> None:
    shapes = plan.detector_shapes(batch, det_size)
    assert shapes.opt == opt and shapes.max == max_ and shapes.min == (1, 3, 32, 32)
    assert plan.activation_bytes("detector", shapes) <= plan.DETECTOR_ACTIVATION_BUDGET


def test_the_old_fixed_profile_would_not_fit_a_24_gb_gpu() -> None:
    old = plan.EngineShapes((1, 3, 32, 32), (16, 3, 640, 640), (256, 3, 1280, 1280))
    assert plan.activation_bytes("detector", old) > 24 * GIB
    assert plan.activation_bytes("detector", plan.detector_shapes(32, 640)) < 2 * GIB


def test_scorer_profile_and_engine_keys() -> None:
    assert plan.scorer_shapes(32).opt == (32, 3, 112, 112)
    assert plan.scorer_shapes(1000).max == (plan.SCORER_MAX_BATCH, 3, 112, 112)
    keys = {plan.detector_shapes(b, s).key for b, s in [(32, 640), (24, 640), (32, 1280), (64, 640)]}
    assert len(keys) == 4  # 24 and 32 share max 32 but not opt; each profile is its own engine


def test_actor_memory_estimate_and_fractional_gpus() -> None:
    import ray

    from annotator.orchestrate import _worker_resources

    memory = plan.actor_memory(32, 640)
    assert 1 * GIB < memory.total < 4 * GIB  # defaults: 32 frames of 1080p, a 640 detector
    assert plan.actor_memory(32, 1280).total > memory.total
    assert "GiB per actor" in memory.describe()
    config = RunConfig(inputs=(Path("v.mp4"),), out=Path("o.parquet"), device="cuda", workers=None)
    resources = {"CPU": 16.0, "GPU": 1.0, "accelerator_type:H100": 1.0}
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(ray, "cluster_resources", lambda: resources)
        assert _worker_resources(config, 7) == (1.0, 1 / 7, 0)


# ---- 2. every engine call fits the profile ----


class FakeEngine:
    """Stands in for an engine whose profile allows ``limit`` inputs: larger batches fail."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.calls: list[int] = []

    def __call__(self, batch: torch.Tensor) -> dict[str, torch.Tensor]:
        if len(batch) > self.limit:
            raise RuntimeError(f"batch {len(batch)} exceeds the profile's {self.limit}")
        self.calls.append(len(batch))
        return {"scores": batch.sum(dim=(1, 2, 3)), "boxes": batch[:, :1, 0, :2]}


def test_calls_are_chunked_to_the_profile() -> None:
    batch = torch.arange(10 * 3 * 4 * 4, dtype=torch.float32).reshape(10, 3, 4, 4)
    engine = FakeEngine(limit=3)
    with pytest.raises(RuntimeError):
        engine(batch)
    out = plan.run_in_chunks(engine, batch, 3)
    assert engine.calls == [3, 3, 3, 1]
    whole = FakeEngine(limit=100)(batch)
    assert all(torch.equal(out[name], whole[name]) for name in whole)


def test_tensorrt_runtime_chunks_and_refuses_a_side_beyond_its_profile() -> None:
    runtime = object.__new__(trt_runtime.TensorRTRuntime)  # no TensorRT here: only its __call__
    runtime.shapes = plan.detector_shapes(4, 128)
    runtime._execute = engine = FakeEngine(limit=4)
    crops = torch.zeros(11, 3, 128, 128)  # the crops of 11 tracked faces
    assert runtime(crops)["scores"].shape == (11,)
    assert engine.calls == [4, 4, 3]
    with pytest.raises(ValueError, match=r"^input 1x3x160x128 is outside the engine's profile \(32x32 to 128x128\)"):
        runtime(torch.zeros(1, 3, 160, 128))


# ---- 10. derived files are verified on load ----


def test_derived_file_is_rebuilt_when_its_bytes_change(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    made: list[Path] = []

    def make(path: Path) -> None:
        made.append(path)
        path.write_bytes(b"engine bytes")

    target = tmp_path / "model.x.engine"
    digest = derived.ensure_verified(target, make)
    assert derived.ensure_verified(target, make) == digest and len(made) == 1  # reused, not rebuilt
    target.write_bytes(b"engine bytes, truncated or edited")
    with caplog.at_level(logging.WARNING):
        assert derived.ensure_verified(target, make) == digest
    assert len(made) == 2 and "does not match its recorded sha256" in caplog.text
    derived.digest_path(target).unlink()  # a file with no recorded digest is not trusted either
    derived.ensure_verified(target, make)
    assert len(made) == 3


def test_fp16_onnx_is_re_exported_when_it_fails_its_check(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    exports: list[Path] = []
    monkeypatch.setattr(trt_runtime, "_export_fp16_onnx",
                        lambda artifacts, path, device: (exports.append(path), path.write_bytes(b"fp16 graph"))[0])
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "NVIDIA L4")
    artifacts = Artifacts(get_entry("retinaface-mnv2"), tmp_path / "model.pt", tmp_path / "model.onnx", {})
    runtime = object.__new__(trt_runtime.TensorRTRuntime)
    runtime.trt, runtime.device = SimpleNamespace(__version__="10.9.0.34"), torch.device("cuda:0")
    runtime.shapes = plan.detector_shapes(32, 640)
    first = runtime._engine_path(artifacts)
    assert runtime._engine_path(artifacts) == first and len(exports) == 1
    (tmp_path / "model.fp16.onnx").write_bytes(b"tampered")
    assert runtime._engine_path(artifacts) == first and len(exports) == 2
    assert plan.detector_shapes(32, 640).key in first.name and "NVIDIA_L4" in first.name


# ---- 3. the decoder of each file ----


def _write_clip(path: Path, codec: str, pix_fmt: str = "yuv420p", frames: int = 4, size: tuple[int, int] = (64, 48)) -> Path:
    """A tiny clip whose frame i is grey 20 * i."""
    width, height = size
    with av.open(str(path), "w") as container:
        stream = container.add_stream(codec, rate=25)
        stream.width, stream.height, stream.pix_fmt = width, height, pix_fmt
        stream.codec_context.time_base = fractions.Fraction(1, 25)
        for i in range(frames):
            frame = av.VideoFrame.from_ndarray(np.full((height, width, 3), 20 * i, np.uint8), format="rgb24")
            frame.pts = i
            container.mux(stream.encode(frame))
        container.mux(stream.encode())
    return path


AV1_ENCODER = next((name for name in ("libsvtav1", "libaom-av1", "librav1e") if name in av.codecs_available), None)


@pytest.fixture(scope="module")
def clips(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    folder = tmp_path_factory.mktemp("codecs")
    made = {
        "h264": _write_clip(folder / "h264.mp4", "libx264"),
        "mpeg4": _write_clip(folder / "mpeg4.mp4", "mpeg4"),
        "vp9": _write_clip(folder / "vp9.webm", "libvpx-vp9"),
        "mjpeg": _write_clip(folder / "mjpeg.avi", "mjpeg", "yuvj420p"),
        "h264_10bit": _write_clip(folder / "h264_10bit.mp4", "libx264", "yuv420p10le"),
        "mpeg2": _write_clip(folder / "mpeg2.mpg", "mpeg2video"),
    }
    if AV1_ENCODER:
        made["av1"] = _write_clip(folder / "av1.mkv", AV1_ENCODER)
    return made


def test_probe_names_codecs_canonically(clips: dict[str, Path]) -> None:
    if "av1" not in clips:
        pytest.skip("this PyAV's FFmpeg has no AV1 encoder to make the clip")
    assert probe(clips["av1"]).codec == "av1"  # PyAV's decoder is libdav1d; the codec is av1
    assert {name: probe(path).codec for name, path in clips.items() if name != "h264_10bit"} == {
        "h264": "h264", "mpeg4": "mpeg4", "vp9": "vp9", "mjpeg": "mjpeg", "mpeg2": "mpeg2video", "av1": "av1"}
    info = probe(clips["h264_10bit"])
    assert info.bit_depth == 10 and info.profile == "High 10"


# kind per clip for: (device, GPU, --decoder)
CHOICES = {
    ("cuda", "NVIDIA H100 80GB HBM3", "auto"): {
        "h264": "dali-gpu", "mpeg4": "dali-gpu", "vp9": "dali-gpu", "mjpeg": "dali-gpu", "av1": "pyav",
        "h264_10bit": "pyav", "mpeg2": "pyav"},
    ("cuda", "NVIDIA L4", "auto"): {
        "h264": "dali-gpu", "mpeg4": "dali-gpu", "vp9": "dali-gpu", "mjpeg": "dali-gpu", "av1": "dali-gpu",
        "h264_10bit": "pyav", "mpeg2": "pyav"},
    ("cpu", None, "dali"): {
        "h264": "pyav", "mpeg4": "pyav", "vp9": "dali-cpu", "mjpeg": "dali-cpu", "av1": "pyav",
        "h264_10bit": "pyav", "mpeg2": "pyav"},
    ("cpu", None, "auto"): dict.fromkeys(("h264", "mpeg4", "vp9", "mjpeg", "av1", "h264_10bit", "mpeg2"), "pyav"),
    ("cuda", "NVIDIA H100 80GB HBM3", "pyav"): dict.fromkeys(
        ("h264", "mpeg4", "vp9", "mjpeg", "av1", "h264_10bit", "mpeg2"), "pyav"),
}


@pytest.mark.parametrize("where", list(CHOICES), ids=lambda w: f"{w[0]}-{w[1] or 'nogpu'}-{w[2]}")
def test_each_file_gets_the_decoder_that_can_read_it(clips: dict[str, Path], where: tuple) -> None:
    device, gpu, requested = where
    for name, path in clips.items():
        choice = choose_decoder(probe(path), requested, device, gpu, dali_installed=True)
        assert choice.kind == CHOICES[where][name], (name, choice)
        assert choice.reason and "\n" not in choice.reason


def test_decoder_choice_reasons_name_the_cause(clips: dict[str, Path]) -> None:
    h100 = "NVIDIA H100 80GB HBM3"
    if "av1" in clips:
        assert "has no av1 decoder" in choose_decoder(probe(clips["av1"]), "auto", "cuda", h100, True).reason
    assert "10-bit" in choose_decoder(probe(clips["h264_10bit"]), "auto", "cuda", h100, True).reason
    assert "no mpeg2video decoder" in choose_decoder(probe(clips["mpeg2"]), "auto", "cuda", h100, True).reason
    assert choose_decoder(probe(clips["h264"]), "auto", "cuda", h100, False).reason.startswith("NVIDIA DALI is not installed")
    odd = StreamInfo(Path("x.ts"), "h264", "High", "yuv420p", 8, "mpegts", 64, 48)
    assert "container mpegts" in choose_decoder(odd, "auto", "cuda", h100, True).reason
    dvd = StreamInfo(Path("dvd.mkv"), "h264", "High", "yuv420p", 8, "matroska,webm", 720, 576, sample_aspect=64 / 45)
    assert choose_decoder(dvd, "auto", "cuda", h100, True) == DecoderChoice(
        "pyav", "non-square pixels (sample aspect 1.42): PyAV shows them square, DALI decodes them as stored")
    hlg = StreamInfo(Path("phone.mov"), "hevc", "Main", "yuv420p", 8, "mov,mp4,m4a,3gp,3g2,mj2", 1920, 1080,
                     hdr="HLG BT.2020 mapped to SDR BT.709")  # 8-bit HLG: DALI could decode it, but not map it
    assert choose_decoder(hlg, "auto", "cuda", h100, True) == DecoderChoice(
        "pyav", "HDR: PyAV shows it as SDR (HLG BT.2020 mapped to SDR BT.709), DALI cannot")


@pytest.mark.parametrize(("name", "family"), [
    ("NVIDIA H100 80GB HBM3", "H100"), ("H100", "H100"), ("NVIDIA L40S", "L40S"), ("NVIDIA L4", "L4"),
    ("A10G", "A10G"), ("NVIDIA A100-SXM4-40GB", "A100"), ("Tesla T4", "T4"), ("NVIDIA GeForce RTX 4090", None), (None, None)])
def test_gpu_family(name: str | None, family: str | None) -> None:
    assert gpu_family(name) == family


@pytest.mark.skipif(not HAS_DALI, reason="NVIDIA DALI not installed (pip install nvidia-dali-cuda120; .[test] has it on x86-64 Linux)")
def test_dali_on_a_cpu_reads_vp9_and_mjpeg_and_hands_the_rest_to_pyav(clips: dict[str, Path]) -> None:
    from engines.decoders.routed import RoutedDecoder

    decoder = RoutedDecoder("dali", "cpu")
    for name in ("vp9", "h264", "mjpeg", "mpeg4", "vp9"):
        report = DecodeReport()
        batches = list(decoder(clips[name], Sampling(), 3, report=report))
        reference = list(pyav_decoder.decode(clips[name], Sampling(), 3))
        assert decoder.last_choice.kind == ("dali-cpu" if name in ("vp9", "mjpeg") else "pyav"), name
        assert [b.frame_index.tolist() for b in batches] == [b.frame_index.tolist() for b in reference]
        frames = torch.cat([b.frames for b in batches]).numpy().astype(np.int16)
        assert np.abs(frames - torch.cat([b.frames for b in reference]).numpy()).mean() < 3.0
        assert report.frames_decoded == 4 and (report.width, report.height) == (64, 48)
    (pipeline,) = decoder._dali.values()
    assert pipeline.files_fed == 3  # one DALI pipeline, fed three files in turn


@pytest.mark.skipif(not HAS_DALI, reason="NVIDIA DALI not installed (pip install nvidia-dali-cuda120; .[test] has it on x86-64 Linux)")
def test_a_file_dali_fails_on_falls_back_to_pyav(clips: dict[str, Path], monkeypatch: pytest.MonkeyPatch,
                                                  caplog: pytest.LogCaptureFixture) -> None:
    from engines.decoders import choice as choice_module
    from engines.decoders import routed

    # Send H.264 to DALI's CPU reader, which cannot decode it: a real DALI failure.
    monkeypatch.setattr(routed, "choose_decoder", lambda *args, **kw: choice_module.DecoderChoice("dali-cpu", "test"))
    decoder = routed.RoutedDecoder("dali", "cpu")
    with caplog.at_level(logging.WARNING):
        batches = list(decoder(clips["h264"], Sampling(), 8))
    assert [b.frame_index.tolist() for b in batches] == [[0, 1, 2, 3]]
    assert decoder.last_choice.kind == "pyav" and "DALI failed before the first frame" in decoder.last_choice.reason
    assert str(clips["h264"]) in caplog.text
    # The pipeline was reset after the failure and decodes the next file correctly.
    assert [b.frame_index.tolist() for b in decoder(clips["vp9"], Sampling(), 8)] == [[0, 1, 2, 3]]


# ---- 4. the DALI version floor ----


@pytest.mark.parametrize(("version", "ok"), [("1.40.0", False), ("1.43.0", False), ("1.44.0", True), ("2.4.0", True)])
def test_dali_older_than_the_floor_fails_in_one_line(monkeypatch: pytest.MonkeyPatch, version: str, ok: bool) -> None:
    from engines.decoders import dali as dali_decoder

    nvidia = types.ModuleType("nvidia")
    nvidia.dali = types.ModuleType("nvidia.dali")
    nvidia.dali.__version__ = version
    monkeypatch.setitem(sys.modules, "nvidia", nvidia)
    monkeypatch.setitem(sys.modules, "nvidia.dali", nvidia.dali)
    if ok:
        assert dali_decoder.require_dali() is nvidia.dali
        return
    with pytest.raises(RuntimeError) as err:
        dali_decoder.require_dali()
    assert str(err.value).startswith(f"NVIDIA DALI {version} is older than 1.44") and "\n" not in str(err.value)


# ---- 5. device resolution in a worker ----


@pytest.mark.parametrize(("requested", "ids", "visible", "expected"), [
    ("auto", [], None, ("cpu", None)),
    ("cpu", [0], "0", ("cpu", None)),
    ("auto", [3], "3", ("cuda", 0)),  # Ray hid the other GPUs: the assigned one is index 0
    ("cuda", ["2"], "1,2", ("cuda", 1)),
    ("auto", [2], None, ("cuda", 2)),  # RAY_EXPERIMENTAL_NOSET_CUDA_VISIBLE_DEVICES: the id is the index
])
def test_worker_device_follows_what_ray_assigned(requested: str, ids: list, visible: str | None, expected: tuple) -> None:
    assert worker_device(requested, ids, visible) == expected


def test_cuda_worker_without_a_gpu_is_one_line() -> None:
    with pytest.raises(RuntimeError, match="^--device cuda, but Ray assigned this worker no GPU"):
        worker_device("cuda", [], None)


@pytest.fixture(scope="module")
def ray_with_a_logical_gpu():
    """A real local Ray instance that declares one GPU (Ray schedules it; nothing uses CUDA)."""
    import secrets

    imported_before = "ray" in sys.modules
    os.environ.setdefault("RAY_AUTH_MODE", "token")
    os.environ.setdefault("RAY_AUTH_TOKEN", secrets.token_hex(32))  # never ~/.ray/auth_token
    import ray

    if ray.is_initialized():
        ray.shutdown()
    if imported_before:  # Ray read its auth mode at import: read it again (as annotator.cluster.init_ray)
        ray._raylet.Config.initialize("")
        ray._raylet.AuthenticationTokenLoader.instance().reset_cache()
    ray.init(address="local", num_cpus=2, num_gpus=1, include_dashboard=False, logging_level=logging.WARNING)
    yield ray
    ray.shutdown()


def test_device_is_resolved_in_each_ray_worker(ray_with_a_logical_gpu) -> None:
    ray = ray_with_a_logical_gpu

    @ray.remote
    def resolve(requested: str) -> tuple[str, int | None]:
        return worker_device(requested, ray.get_gpu_ids(), os.environ.get("CUDA_VISIBLE_DEVICES"))

    # A driver with no GPU (this machine) gets GPU workers where Ray gives them a GPU, and seven
    # pipelines share it at 1/7 each.
    on_gpu = [resolve.options(num_gpus=1 / 7).remote("auto") for _ in range(7)]
    assert ray.get(on_gpu) == [("cuda", 0)] * 7
    assert ray.get(resolve.options(num_gpus=0).remote("auto")) == ("cpu", None)
    with pytest.raises(ray.exceptions.RayTaskError, match="Ray assigned this worker no GPU"):
        ray.get(resolve.options(num_gpus=0).remote("cuda"))


# ---- 6. pipelines per GPU ----


@pytest.mark.parametrize(("accelerator", "requested", "actor_gib", "expected"), [
    ("H100", None, 2.0, 7),  # one per NVDEC engine
    ("A100", None, 2.0, 5),
    ("A100", None, 12.0, 3),  # memory caps it: 3 x 12 GiB of 40
    ("L4", None, 9.0, 2),
    ("RTX 4090", None, 2.0, 1),  # unknown NVDEC count: one
    (None, None, 2.0, 1),
    ("H100", 3, 2.0, 3),  # --pipelines-per-gpu wins
])
def test_pipelines_per_gpu(accelerator: str | None, requested: int | None, actor_gib: float, expected: int) -> None:
    assert pipelines_per_gpu(accelerator, requested, int(actor_gib * GIB)) == expected


def test_gpu_pool_arithmetic() -> None:
    resources = {"CPU": 64.0, "GPU": 8.0, "accelerator_type:H100": 8.0}
    config = RunConfig(inputs=(Path("v.mp4"),), out=Path("o.parquet"), device="cuda")
    assert accelerator_type(resources) == "H100"
    assert accelerator_type({"GPU": 2.0, "accelerator_type:H100": 1.0, "accelerator_type:L4": 1.0}) is None
    assert gpu_pipelines(config, resources) == 7
    assert gpu_pool_size(resources["GPU"], 7) == 56
    assert gpu_pipelines(RunConfig(inputs=(Path("v.mp4"),), out=Path("o.parquet"), device="cuda",
                                   pipelines_per_gpu=2), resources) == 2


# ---- 8/9. devices and decoders the machine cannot serve ----


def test_cuda_on_a_cluster_without_gpus_is_a_config_error() -> None:
    from annotator.config import ConfigError

    local = RunConfig(inputs=(Path("v.mp4"),), out=Path("o.parquet"), device="cuda")
    with pytest.raises(ConfigError, match="^--device cuda: this machine has no GPU"):
        check_gpus(local, 0)
    remote = RunConfig(inputs=(Path("v.mp4"),), out=Path("o.parquet"), device="cuda", address="10.0.0.1:6379")
    with pytest.raises(ConfigError, match=r"^--device cuda: the Ray cluster at 10\.0\.0\.1:6379 has no GPU"):
        check_gpus(remote, 0)
    check_gpus(remote, 8)
    check_gpus(RunConfig(inputs=(Path("v.mp4"),), out=Path("o.parquet"), device="auto"), 0)


def test_dali_decoder_is_allowed_without_a_gpu() -> None:
    config = RunConfig(inputs=(Path("v.mp4"),), out=Path("o.parquet"), device="cpu", decoder="dali")
    assert config.decoder == "dali"


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal on a machine without a GPU")
@pytest.mark.parametrize("workers", [["--workers", "0"], []], ids=["in-process", "local-ray"])
def test_device_cuda_without_a_gpu_fails_at_once_in_one_line(carphone: Path, tmp_path: Path, workers: list[str]) -> None:
    done = subprocess.run(
        [sys.executable, "-c", "from annotator.cli import main; main()", "run", str(carphone),
         "--out", str(tmp_path / "out.parquet"), "--device", "cuda", "--no-progress", *workers],
        capture_output=True, text=True, timeout=120,  # before the fix: still waiting after 2 minutes
    )
    lines = [line for line in done.stderr.splitlines() if line.startswith("annotate: error:")]
    assert done.returncode == 2, done.stderr[-2000:]
    assert len(lines) == 1 and "--device cuda:" in lines[0] and "no" in lines[0] and "GPU" in lines[0]
    assert not (tmp_path / "out.parquet").exists() and not (tmp_path / "out.parts").exists()


# ---- 7. no full-batch float copy on the GPU ----


def test_gpu_resize_converts_a_few_frames_at_a_time(monkeypatch: pytest.MonkeyPatch) -> None:
    import torch.nn.functional as F

    from engines import retinaface

    frames = torch.randint(0, 256, (10, 3, 90, 160), dtype=torch.uint8)
    reference = F.interpolate(frames.float(), size=(45, 80), mode="bilinear", antialias=True, align_corners=False)
    seen: list[int] = []
    real = F.interpolate

    def counting(x, *args, **kwargs):
        seen.append(len(x))
        return real(x, *args, **kwargs)

    monkeypatch.setattr(retinaface.F, "interpolate", counting)
    out = torch.zeros(10, 3, 45, 80)
    # float32 here (the CPU has no half-precision antialiased resize); CUDA runs it in float16.
    retinaface.resize_in_chunks(frames, out, torch.float32, chunk_bytes=3 * 90 * 160 * 4 * 3)
    assert seen == [3, 3, 3, 1]
    assert torch.equal(out, reference)


def test_a_scanning_run_sizes_the_detector_engine_for_its_scans(monkeypatch) -> None:
    """A scan is one frame at twice --det-size (1280x736 at 720p): the engine's profile must admit
    it, or the first keyframe of every video would be refused on a GPU."""
    from annotator import pipeline

    config = RunConfig(inputs=(Path("v.mp4"),), out=Path("o.parquet"), device="cpu", workers=0)
    scan = (1, 3, 736, 1280)
    with pytest.raises(ValueError, match="outside the engine's profile"):
        plan.detector_shapes(32, config.det_size).check(scan)
    plan.detector_shapes(32, config.scan_size).check(scan)  # the profile the pipeline asks for
    asked = {}

    def capture(*args, **kwargs):
        asked.update(kwargs)
        raise RuntimeError("captured")

    monkeypatch.setattr(pipeline, "create_detector", capture)
    with pytest.raises(RuntimeError, match="captured"):
        pipeline.VideoPipeline(config, threads=1)
    assert asked["largest_side"] == config.scan_size == 2 * config.det_size
    no_scans = RunConfig(inputs=(Path("v.mp4"),), out=Path("o.parquet"), device="cpu", workers=0, scan_every=0)
    assert no_scans.scan_size == no_scans.det_size

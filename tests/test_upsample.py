"""Transposed convolutions along time (ops/upsample.py): overlap-add streams exactly.

Oracle: the untouched offline model. E1 for every class of kernel, stride, padding, output_padding,
dilation and groups, with time on each spatial axis of 1D/2D/3D layouts and inputs of every kind of
warm-up and rate; time on the batch axis is frame-local, on the channel axis refused; values at
rates above 1 step in whole frames and are delayed at joins like any other; E3 over 10^4 frames of
an audio U-Net; E4 for both U-Net examples.
"""
import os
import re
import sys
from types import SimpleNamespace

import pytest
import sympy
import torch
import torch.nn.functional as F
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st
from torch import nn

import cocompile
from cocompile.export import check_artifact
from cocompile.inspect import count_flops
from cocompile.ops.delay import delay_frames
from cocompile.ops.window import frame_positions

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "examples"))

CONV = {1: nn.Conv1d, 2: nn.Conv2d, 3: nn.Conv3d}
UP = {1: nn.ConvTranspose1d, 2: nn.ConvTranspose2d, 3: nn.ConvTranspose3d}
LEADS = ("none", "conv", "strided", "pad", "up")   # what feeds the op: warm-up 0 / > 0 / rate 1/2 / < 0 / rate 2


def per_axis(nd: int, t: int, along_time, other) -> tuple:
    return tuple(along_time if i == t else other for i in range(nd))


class UpNet(nn.Module):
    """A lead-in that sets the input's warm-up and rate, the transposed conv under test (`up`:
    kernel, stride, padding, output_padding, dilation, groups along time; `other`: kernel,
    stride, padding, output_padding on the other axes), then a ReLU."""

    def __init__(self, nd: int, t: int, lead: str, up: tuple, other: tuple):
        super().__init__()
        self.nd, self.t, self.lead = nd, t, lead
        k, s, p, op, d, g = up
        ok, os_, op_, oop = other
        self.conv = {"conv": CONV[nd](2, 2, per_axis(nd, t, 3, 1), padding=per_axis(nd, t, 1, 0)),
                     "strided": CONV[nd](2, 2, per_axis(nd, t, 3, 1), per_axis(nd, t, 2, 1), per_axis(nd, t, 1, 0)),
                     "up": UP[nd](2, 2, per_axis(nd, t, 2, 1), per_axis(nd, t, 2, 1))}.get(lead, nn.Identity())
        self.up = UP[nd](2, 4, per_axis(nd, t, k, ok), per_axis(nd, t, s, os_), per_axis(nd, t, p, op_),
                         per_axis(nd, t, op, oop), groups=g, dilation=per_axis(nd, t, d, 1))

    def forward(self, x):
        if self.lead == "pad":
            x = F.pad(x, [0, 0] * (self.nd - 1 - self.t) + [2, 0])
        return torch.relu(self.up(self.conv(x)))


@st.composite
def upsamplers(draw):
    """(model, clip, time_dim) for a random transposed conv and lead-in, its output non-empty."""
    nd, lead = draw(st.integers(1, 3)), draw(st.sampled_from(LEADS))
    t = draw(st.integers(0, nd - 1))
    k, s, d = draw(st.integers(1, 5)), draw(st.integers(1, 3)), draw(st.sampled_from([1, 2]))
    p, op = draw(st.integers(0, d * (k - 1) + 1)), draw(st.integers(0, max(s, d) - 1))
    other = draw(st.sampled_from([(1, 1, 0, 0), (3, 1, 1, 0), (3, 2, 1, 1)]))
    length = draw(st.sampled_from([6, 8, 10]))
    frames = {"pad": length + 2, "strided": (length + 1) // 2, "up": 2 * length}.get(lead, length)
    assume((frames - 1) * s - 2 * p + d * (k - 1) + op + 1 >= 1)
    torch.manual_seed(draw(st.integers(0, 3)))
    model = UpNet(nd, t, lead, (k, s, p, op, d, draw(st.sampled_from([1, 2]))), other).eval()
    shape = [2, 2] + [3] * nd
    shape[2 + t] = length
    return model, torch.randn(shape), 2 + t


def assert_exact(got, ref):
    assert got.shape == ref.shape
    assert float((got - ref).abs().max()) <= 1e-4 * max(1.0, float(ref.abs().max()))


@settings(max_examples=int(os.environ.get("COCOMPILE_UPSAMPLE_EXAMPLES", "25")), deadline=None,
          derandomize=bool(os.environ.get("CI")), suppress_health_check=list(HealthCheck), print_blob=True)
@given(upsamplers())
def test_transposed_convs_stream_exactly(case):
    model, clip, time_dim = case
    co = cocompile.compile(model, clip[:1], time_dim=time_dim, trace=False, verify=False)
    with torch.no_grad():
        assert_exact(co.forward_steps(clip), model(clip))
    assert not co.approximate


def test_traced_step_and_convolution_with_transposed_flag():
    """The traced step, and aten.convolution(transposed=True) as a decomposed export gives it."""
    torch.manual_seed(0)
    model = UpNet(2, 1, "conv", (4, 2, 1, 0, 1, 2), (3, 2, 1, 1)).eval()
    clip = torch.randn(2, 2, 3, 8)
    co = cocompile.compile(model, clip[:1], time_dim=3)
    with torch.no_grad():
        assert_exact(co.forward_steps(clip), model(clip))
    program = torch.export.export(model, (clip[:1],)).run_decompositions()
    assert any(n.target is torch.ops.aten.convolution.default and n.args[6] for n in program.graph.nodes)
    co = cocompile.compile(program, clip[:1], time_dim=3, trace=False)
    with torch.no_grad():
        assert_exact(co.forward_steps(clip), model(clip))


class TimeInBatch(nn.Module):
    """Frames folded into the batch: the transposed conv upsamples each frame's own axis."""

    def __init__(self):
        super().__init__()
        self.up = nn.ConvTranspose1d(3, 4, 3, stride=2)

    def forward(self, x):                              # (N, C, T) -> (N*T, C, 1) -> (N, 12, T)
        n, c, t = x.shape
        y = self.up(x.permute(0, 2, 1).reshape(n * t, c, 1))
        return y.reshape(n, t, -1).permute(0, 2, 1)


def test_time_on_the_batch_axis_is_frame_local():
    torch.manual_seed(1)
    model, clip = TimeInBatch().eval(), torch.randn(2, 3, 6)
    co = cocompile.compile(model, clip[:1])
    assert co.delay == 0 and [s.name for s in co.specs] == ["state.frames"]
    with torch.no_grad():
        assert_exact(co.forward_steps(clip), model(clip))


def test_time_on_the_channel_axis_is_refused():
    model = nn.ConvTranspose1d(6, 4, 3).eval()         # (N, T=6, L): time as channels
    with pytest.raises(cocompile.CompileError, match="transposed convolution over an axis that holds time as channels"):
        cocompile.compile(model, torch.randn(1, 6, 5), time_dim=1)


def test_frame_positions_at_rates_above_and_below_one():
    ctx = SimpleNamespace(frames=torch.tensor([4, 8]), memo={})
    assert frame_positions(ctx, sympy.Integer(2), 3, 2).tolist() == [[8, 9, 10], [16, 17, 18]]
    assert frame_positions(ctx, sympy.Rational(1, 4), 1, 4).tolist() == [[1], [1], [2], [2]]


class TwoUpsamplers(nn.Module):
    """Two branches at rate 2 with different warm-ups, joined: the earlier one is delayed."""

    def __init__(self):
        super().__init__()
        self.a = nn.ConvTranspose1d(3, 4, 2, stride=2)                  # warm-up 0
        self.b = nn.ConvTranspose1d(3, 4, 6, stride=2, padding=2)       # warm-up 2
        self.c = nn.Conv1d(4, 4, 3, stride=2, padding=1)                # back to rate 1

    def forward(self, x):
        return self.c(torch.relu(self.a(x) + self.b(x)))


def test_joins_at_rate_two_are_delayed_and_steps_of_any_multiple_agree():
    torch.manual_seed(2)
    model, clip = TwoUpsamplers().eval(), torch.randn(2, 3, 12)
    for c in (1, 3):
        co = cocompile.compile(model, clip[:1], step_frames=c, trace=False)
        assert co.step_frames == c
        delays = [n.args[1] for n in co.program.gm.graph.nodes if n.target is delay_frames]
        assert delays == [2]                         # a's frames wait for b's (2 frames at rate 2)
        with torch.no_grad():
            assert_exact(co.forward_steps(clip), model(clip))


def tiny_unet():
    import unet_audio
    return unet_audio.build("small", widths=(4, 6, 8, 8)), unet_audio.example_input("small")


def test_unet_steps_whole_frames_at_every_rate_and_counts_transposed_flops():
    model, clip = tiny_unet()
    co = cocompile.compile(model, clip)
    assert co.step_frames == 8                       # rates 1/2, 1/4, 1/8 and back
    step, offline = count_flops(co)
    ups = [n.name for n in co.program.gm.graph.nodes if n.target is torch.ops.aten.conv_transpose1d.default]
    assert len(ups) == 3
    for name in ups:                                 # each step does its share of the clip's work
        assert step[name] > 0 and step[name] * co.clip_length == offline[name] * co.step_frames


@torch.no_grad()
def test_unet_stream_of_10k_frames_matches_the_model_on_the_stream():
    """E3: per-frame outputs of a 10^4-frame stream are the model's on the whole stream, shifted by
    the reported delay, with no drift from its first frames to its last."""
    model, clip = tiny_unet()
    co = cocompile.compile(model, clip)
    stream = torch.randn(2, clip.shape[1], 10_000) * 3 + 1
    state, frames = co.initial_state(2), []
    for chunk in stream.split(co.step_frames, dim=2):
        y, state = co.step(chunk, state)
        frames.append(y)
    got = torch.cat(frames, 2)[:, :, co.delay:]
    ref = model(stream)[:, :, :got.shape[2]]
    assert got.shape[2] == 10_000 - co.delay
    bound = 1e-4 * max(1.0, float(ref.abs().max()))
    head, tail = (got - ref)[:, :, :1000].abs().max(), (got - ref)[:, :, -1000:].abs().max()
    assert head <= bound and tail <= bound, (head, tail)


@pytest.mark.parametrize("name", ["unet_audio", "video_unet"])
def test_unet_artifacts_reproduce_the_step(name, tmp_path):
    """E4: ONNX, TorchScript and torch.export artifacts of each example at its small size."""
    example = __import__(name)
    model, clip = example.build("small"), example.example_input("small")
    co = cocompile.compile(model, clip, time_dim=example.TIME_DIM)
    for suffix in (".onnx", ".pt", ".pt2"):
        report = check_artifact(co, co.export(tmp_path / f"{name}{suffix}"))
        assert report.passed and report.steps == 3 * co.clip_length, str(report)


def test_layers_doc_examples_run():
    """The code of docs/layers.md's sections on transposed convolutions and ceil_mode pooling runs
    as written (compile checks E1 on each example clip)."""
    root = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")
    page = open(os.path.join(root, "docs", "layers.md")).read()
    mine = page.split("## Transposed convolutions along time")[1].split("## Normalisation over time")[0]
    blocks = re.findall(r"```python\n(.*?)```", mine, re.S)
    assert len(blocks) == 2
    for code in blocks:
        exec(compile(code, "docs/layers.md", "exec"), {})

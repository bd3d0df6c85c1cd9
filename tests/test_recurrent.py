"""Recurrent layers (nn.RNN / nn.GRU / nn.LSTM, and loops of their cells) stream exactly.

Oracle: the untouched offline model. E1 (step through the clip, flush) for every configuration,
fixed and random; E3 on a stream of 10^4 frames (per-frame outputs equal the model on the whole
stream, shifted by the delay, with no drift); E4 for every artifact format; bidirectional layers
are refused by name.
"""
from __future__ import annotations

import functools
import math
import os
import sys

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch import nn
from torch.utils import _pytree as pytree

import cocompile
from cocompile.export import E4_RTOL, check_artifact

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "examples"))
import crnn  # noqa: E402
import kws_lstm  # noqa: E402

EXAMPLES = int(os.environ.get("COCOMPILE_RNN_EXAMPLES", "30"))
LAYERS = {"rnn_tanh": (nn.RNN, {"nonlinearity": "tanh"}), "rnn_relu": (nn.RNN, {"nonlinearity": "relu"}),
          "gru": (nn.GRU, {}), "lstm": (nn.LSTM, {})}


class Net(nn.Module):
    """(N, C, T) frames -> [padded Conv1d] -> recurrent layer -> the outputs `spec` names:
    "y" (every frame, in the layer's layout), "last" (the newest frame), "h" (h_n, and c_n).

    spec: kind, layers, batch_first, bias, proj (LSTM), start ("zeros": no hx; "learned": a
    parameter expanded over the batch; "constant": a fixed buffer), pad (0: no conv), outputs."""

    def __init__(self, spec, channels=3, hidden=5):
        super().__init__()
        self.spec = spec
        cls, kw = LAYERS[spec["kind"]]
        if spec["kind"] == "lstm" and spec["proj"]:
            kw = {**kw, "proj_size": spec["proj"]}
        p = spec["pad"]
        self.conv = nn.Conv1d(channels, channels, 2 * p + 1, padding=p) if p else None
        self.rnn = cls(channels, hidden, num_layers=spec["layers"], batch_first=spec["batch_first"],
                       bias=spec["bias"], **kw)
        sizes = [(spec["layers"], 1, self.rnn.proj_size or hidden if spec["kind"] == "lstm" else hidden)]
        if spec["kind"] == "lstm":
            sizes.append((spec["layers"], 1, hidden))
        starts = [torch.randn(s) for s in sizes]
        if spec["start"] == "learned":
            self.h0 = nn.ParameterList(starts)
        elif spec["start"] == "constant":
            for i, s in enumerate(starts):
                self.register_buffer(f"s{i}", s)

    def _start(self, batch):
        starts = {"learned": list(getattr(self, "h0", [])),
                  "constant": [b for name, b in self.named_buffers() if name.startswith("s")]}.get(
                      self.spec["start"])
        if not starts:
            return None
        hx = [s.expand(-1, batch, -1).contiguous() for s in starts]
        return tuple(hx) if self.spec["kind"] == "lstm" else hx[0]

    def forward(self, x):
        z = (torch.relu(self.conv(x)) if self.conv is not None else x).transpose(1, 2)   # (N, T, C)
        if not self.spec["batch_first"]:
            z = z.transpose(0, 1)
        y, h = self.rnn(z, self._start(x.shape[0]))
        pick = {"y": y, "last": y[:, -1] if self.spec["batch_first"] else y[-1], "h": h}
        return tuple(pick[o] for o in self.spec["outputs"])


def _spec(**kw):
    base = dict(kind="gru", layers=1, batch_first=True, bias=True, proj=0, start="zeros", pad=0,
                outputs=("y", "last", "h"))
    return {**base, **kw}


def _check_e1(spec, T=6, batch=2, report=True):
    """Compile, and compare stepping + flush with the model on a random clip (E1), output by output;
    with `report`, verify() must claim and pass E1 too."""
    torch.manual_seed(0)
    model = Net(spec).eval()
    clip = torch.randn(batch, 3, T)
    co = cocompile.compile(model, clip[:1], trace=False, verify=False)     # verified here
    if report:
        r = cocompile.verify(model, co, clip, sliding_steps=0)
        assert r.passed and all(c.claimed for c in r.checks if c.name == "E1"), f"{spec}\n{r}"
    assert not co.approximate
    with torch.no_grad():
        ref, got = pytree.tree_leaves(model(clip)), pytree.tree_leaves(co.forward_steps(clip))
    for a, b in zip(ref, got, strict=True):
        assert a.shape == b.shape and (a - b).abs().max() <= 1e-4 * max(1.0, float(a.abs().max()))
    return co


FIXED = [
    _spec(kind="rnn_tanh", pad=1),
    _spec(kind="rnn_relu", layers=2, batch_first=False, bias=False, start="learned"),
    _spec(kind="gru", layers=3, start="learned", pad=2),
    _spec(kind="gru", batch_first=False, start="constant", outputs=("y",)),
    _spec(kind="lstm", layers=2, proj=2, start="learned", pad=1),
    _spec(kind="lstm", layers=3, batch_first=False, bias=False, outputs=("last", "h")),
]


@pytest.mark.parametrize("spec", FIXED, ids=lambda s: f"{s['kind']}-{s['layers']}-{s['start']}")
def test_recurrent_layers_reproduce_the_clip(spec):
    co = _check_e1(spec)
    assert not co.exact_sliding and co.receptive_field == math.inf
    per_layer = {s.name: s.shape for s in co.specs}
    hidden = spec["proj"] or 5
    assert per_layer["state.rnn.h"] == (spec["layers"], hidden)
    if spec["kind"] == "lstm":
        assert per_layer["state.rnn.c"] == (spec["layers"], 5)


@settings(max_examples=EXAMPLES, deadline=None, derandomize=bool(os.environ.get("CI")),
          suppress_health_check=list(HealthCheck), print_blob=True)
@given(st.fixed_dictionaries({
    "kind": st.sampled_from(sorted(LAYERS)), "layers": st.integers(1, 3), "batch_first": st.booleans(),
    "bias": st.booleans(), "proj": st.sampled_from([0, 2]), "start": st.sampled_from(["zeros", "learned", "constant"]),
    "pad": st.integers(0, 2),
    "outputs": st.lists(st.sampled_from(["y", "last", "h"]), min_size=1, max_size=3, unique=True).map(tuple)}),
    st.integers(2, 7))
def test_random_recurrent_configurations_are_exact(spec, T):
    _check_e1(spec, T, report=False)


def test_metadata_says_recurrent_and_unbounded():
    co = _check_e1(_spec(pad=1, outputs=("y", "h")))
    meta = co.metadata()
    assert [o["exactness"] for o in meta["outputs"]] == ["recurrent"] * 2
    assert meta["receptive_field"] is None and meta["exact_sliding"] is False
    assert all(o["receptive_field"] is None for o in meta["outputs"])
    assert [s["name"] for s in meta["states"]] == ["state.frames", "state.conv", "state.rnn.h"]


def test_bidirectional_is_refused_naming_the_layer():
    model = Net(_spec(kind="lstm")).eval()
    model.rnn = nn.LSTM(3, 5, batch_first=True, bidirectional=True)
    with pytest.raises(cocompile.CompileError) as err:
        cocompile.compile(model, torch.randn(1, 3, 6))
    msg = str(err.value)
    assert "bidirectional" in msg and "rnn (LSTM)" in msg and "future frame" in msg


# -- loops of cells ----------------------------------------------------------------------------------
class GRUCellLoop(nn.Module):
    """Padded conv, then h_t = GRUCell(x[:, t], h_{t-1}) from zeros; per-frame outputs."""

    def __init__(self):
        super().__init__()
        self.conv, self.cell = nn.Conv1d(3, 4, 3, padding=1), nn.GRUCell(4, 5)

    def forward(self, x):
        z = self.conv(x).transpose(1, 2)
        h, hs = torch.zeros(x.shape[0], 5), []
        for t in range(z.shape[1]):
            h = self.cell(z[:, t], h)
            hs.append(h)
        return torch.stack(hs, 1)


class LSTMCellLoop(nn.Module):
    """LSTMCell over the frames from a learned start; the last h and c."""

    def __init__(self):
        super().__init__()
        self.cell = nn.LSTMCell(3, 4)
        self.h0, self.c0 = nn.Parameter(torch.randn(4)), nn.Parameter(torch.randn(4))

    def forward(self, x):
        h, c = self.h0.expand(x.shape[0], 4), self.c0.expand(x.shape[0], 4)
        for xt in x.unbind(2):
            h, c = self.cell(xt, (h, c))
        return h, c


@pytest.mark.parametrize("cls", [GRUCellLoop, LSTMCellLoop])
def test_cell_loops_compile_and_reproduce_the_clip(cls):
    torch.manual_seed(1)
    model, clip = cls().eval(), torch.randn(2, 3, 5)
    co = cocompile.compile(model, clip[:1], trace=False)
    assert any(s.name.startswith("state.cell.h") for s in co.specs)      # one recurrent state
    assert cocompile.verify(model, co, clip, sliding_steps=0).passed


# -- a long stream, and artifacts ------------------------------------------------------------------
def tiny_crnn():
    """The CRNN example at a tiny width (2-layer GRU behind padded convs and a stride of 2)."""
    return crnn.randomize(crnn.CRNN(frames=16, mels=8, widths=(2, 3, 3), freq_pool=2, hidden=4, layers=2,
                                    classes=2), seed=3)


@torch.no_grad()
def test_crnn_streams_10k_frames_like_the_model_on_the_stream():
    model, N = tiny_crnn(), 10_000
    co = cocompile.compile(model, torch.randn(1, 1, 16, 8), step_frames=8)    # 1250 steps
    stream = torch.randn(1, 1, N, 8, generator=torch.Generator().manual_seed(0))
    state, frames = co.initial_state(1), []
    for chunk in stream.split(co.step_frames, dim=2):
        y, state = co.step(chunk, state)
        frames.append(y)
    info = co.out_infos[0]
    skip = int(co.delay * info.rate)        # the delay in output frames (at half the input rate)
    assert skip == info.warmup > 0
    got, ref = torch.cat(frames, 1)[:, skip:], model(stream)
    assert got.shape[1] == ref.shape[1] - skip
    err = (got - ref[:, :got.shape[1]]).abs().amax(dim=(0, 2))
    bound = 1e-4 * max(1.0, float(ref.abs().max()))
    assert float(err.max()) <= bound
    start, end = float(err[:500].max()), float(err[-500:].max())
    assert end <= max(start, 1e-7), (start, end)         # no drift (1e-7: float32 rounding at unit scale)


@functools.cache
def _compiled(name):
    if name == "crnn":
        return cocompile.compile(tiny_crnn(), torch.randn(1, 1, 8, 8))
    return cocompile.compile(kws_lstm.build("small"), kws_lstm.example_input("small"), time_dim=1)


@pytest.mark.parametrize("name", ["crnn", "kws_lstm"])
@pytest.mark.parametrize("suffix", [".onnx", ".pt", ".pt2"])
def test_artifacts_reproduce_the_continual_model(name, suffix, tmp_path):
    co = _compiled(name)
    e4 = check_artifact(co, co.export(tmp_path / f"{name}{suffix}"))
    assert e4.passed and e4.error <= E4_RTOL, str(e4)

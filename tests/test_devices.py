"""Every device (docs/precision.md, "Devices"): a model that lives on a device compiles and steps
there, and nothing of the step is created elsewhere.

Without a GPU the tests use torch's "meta" device: tensors with shapes, dtypes and a device but
no data, on which every op runs (and any op that mixes a meta tensor with a CPU tensor made by a
rule fails, or returns a CPU tensor that the assertions catch).
"""
from __future__ import annotations

import importlib
import os

import pytest
import torch
import torch.nn as nn
from torch.utils import _pytree as pytree

import cocompile
from cocompile import ContinualModel
from cocompile.ops import window

META = torch.device("meta")


class ConvNet(nn.Module):
    """Padded temporal convs (window states), BatchNorm, a residual join (a delay), a max pool
    (padding with -inf), per-frame and clip outputs (a clip window)."""

    def __init__(self, c: int = 8):
        super().__init__()
        self.conv = nn.Conv1d(c, c, 3, padding=1)
        self.bn = nn.BatchNorm1d(c)
        self.pool = nn.MaxPool1d(3, stride=1, padding=1)
        self.head = nn.Conv1d(c, 3, 1)

    def forward(self, x):                                   # (N, C, T)
        h = self.pool(x + self.bn(self.conv(x)))
        return self.head(h), h.mean(2)


class AttentionNet(ConvNet):
    """ConvNet, then attention over frames in a causal band (its mask is built in the step from
    the frame counter)."""

    def __init__(self, c: int = 8, band: int = 3):
        super().__init__(c)
        self.attn = nn.MultiheadAttention(c, 2, batch_first=True)
        self.linear = nn.Linear(c, 3)
        self.band = band

    def forward(self, x):                                   # (N, C, T)
        h = x + self.bn(self.conv(x))
        t = h.size(2)
        pos = torch.arange(t, device=x.device)
        lag = pos[:, None] - pos[None, :]
        tokens = h.transpose(1, 2)
        a, _ = self.attn(tokens, tokens, tokens, attn_mask=(lag < 0) | (lag >= self.band),
                         need_weights=False)
        return self.linear(a), self.linear(a.mean(1))


def on(device, *values) -> set:
    """Devices of every tensor in `values` (pytrees), as a set."""
    return {t.device for t in pytree.tree_leaves(values) if isinstance(t, torch.Tensor)}


def step_everything(co, batch: int = 2):
    """Two steps and a flush from co.initial_state: (outputs, states) of all of them."""
    state, outs = co.initial_state(batch), []
    for _ in range(2):
        x = torch.randn(batch, 8, co.step_frames, device=co.device)
        y, state = co.step(x, state)
        outs.append(y)
    outs.append(co.flush(state))
    return outs, state


@pytest.fixture(scope="module")
def meta_co():
    """A model compiled on the device itself (no data there: compile cannot check E1, and ops
    whose analysis reads constant values, such as attention masks, need a real device)."""
    model = ConvNet().eval().to(META)
    return cocompile.compile(model, torch.randn(1, 8, 6, device=META), time_dim=2, verify=False)


def check_on_meta(co) -> None:
    """Everything of `co` and of its steps is on the meta device."""
    assert co.device == META
    assert on(META, list(co.program.buffers())) == {META}      # constants and weights
    outs, state = step_everything(co)
    assert on(META, state) == {META} and on(META, outs) == {META}
    assert state[0].dtype == torch.int64                        # the frame counter


def test_compiling_a_model_on_a_device_keeps_everything_there(meta_co):
    check_on_meta(meta_co)


def test_initial_state_follows_the_model_or_the_device_asked(meta_co):
    assert on(META, meta_co.initial_state(3)) == {META}
    assert on(META, meta_co.initial_state(3, device="cpu")) == {torch.device("cpu")}
    state = meta_co.initial_state(1, dtype=torch.float64)
    assert state[0].dtype == torch.int64 and {s.dtype for s in state[1:]} == {torch.float64}


def test_to_moves_the_compiled_model_and_the_states_made_after():
    torch.manual_seed(0)
    model = AttentionNet().eval()
    co = cocompile.compile(model, torch.randn(1, 8, 6), time_dim=2)
    co(torch.randn(1, 8, co.step_frames))                         # a running stream on the CPU
    co.to(META)
    assert co.device == META and on(META, list(co.program.buffers())) == {META}
    assert on(META, co._state) == {META}                           # the running stream moved too
    outs, state = step_everything(co)                              # graphs traced again on meta
    assert on(META, state, outs) == {META}
    with pytest.raises(cocompile.CompileError, match="chunk on cpu, the model on meta"):
        co.step(torch.randn(1, 8, co.step_frames), co.initial_state(1))


@pytest.mark.parametrize("regression", ["state", "rule"])
def test_a_tensor_made_on_the_default_device_is_caught(meta_co, monkeypatch, regression):
    """check_on_meta has teeth: states made without device= (as initial_state once did), or a
    rule's positions made on the default device, fail it (an error, or a tensor off the device)."""
    if regression == "state":
        monkeypatch.setattr(ContinualModel, "initial_state", lambda self, batch_size=1: tuple(
            torch.zeros((batch_size, *s.shape), dtype=s.dtype) for s in self.specs))
    else:
        real = torch.arange
        monkeypatch.setattr(window.torch, "arange", lambda *a, **k: real(*a, **{**k, "device": "cpu"}))
    meta_co._step_fn.graphs.clear()                  # trace the step again with the regression
    try:
        with pytest.raises(Exception):               # noqa: B017 - any failure shows the regression
            check_on_meta(meta_co)
    finally:
        meta_co._step_fn.graphs.clear()


def test_cuda_graph_refuses_a_model_off_cuda(meta_co):
    with pytest.raises(cocompile.CompileError, match="CUDA") as err:
        meta_co.cuda_graph(2)
    assert "co.to('cuda')" in err.value.hint


def test_gpu_check_says_there_is_no_gpu_and_exits_cleanly(monkeypatch, capsys):
    """`python examples/gpu_check.py` on a machine without CUDA: a clear line, no error."""
    monkeypatch.syspath_prepend(os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "examples"))
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    gpu_check = importlib.import_module("gpu_check")
    assert gpu_check.main([]) is None                 # returns: no SystemExit, no traceback
    assert "no CUDA device" in capsys.readouterr().out

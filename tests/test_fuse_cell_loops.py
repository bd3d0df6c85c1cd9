"""passes/fuse_cell_loops.py: an unrolled loop of RNN cells over the frames becomes one recurrent
layer. The graph still computes the model (the untouched model is the oracle), the cells are gone,
running the pass again changes nothing; a loop it does not recognise is refused with the reason
and how to write it."""
from __future__ import annotations

import pytest
import torch
from torch import nn

import cocompile
from cocompile.capture import capture
from cocompile.passes.fuse_cell_loops import fuse_cell_loops

aten = torch.ops.aten
torch.manual_seed(0)


class GRULoop(nn.Module):
    """x (N, T, F): h_t = cell(x[:, t], h_{t-1}) from zeros; all h_t stacked along `axis`, one
    middle h_t read on its own, and the last one."""

    def __init__(self, axis=1):
        super().__init__()
        self.cell, self.axis = nn.GRUCell(4, 6), axis

    def forward(self, x):
        h, hs = torch.zeros(x.shape[0], 6), []
        for t in range(x.shape[1]):
            h = self.cell(x[:, t], h)
            hs.append(h)
        return torch.stack(hs, self.axis), hs[2] * 2, h


class LSTMLoop(nn.Module):
    """Time-major (T, N, F) through unbind; no biases; returns the last h and c."""

    def __init__(self):
        super().__init__()
        self.cell = nn.LSTMCell(4, 5, bias=False)

    def forward(self, x):
        h = c = torch.zeros(x.shape[0], 5)
        for xt in x.transpose(0, 1).unbind(0):
            h, c = self.cell(xt, (h, c))
        return h, c


class RNNLoop(nn.Module):
    """ReLU cell from a learned start state, outputs stacked time-first."""

    def __init__(self):
        super().__init__()
        self.cell, self.h0 = nn.RNNCell(4, 5, nonlinearity="relu"), nn.Parameter(torch.randn(5))

    def forward(self, x):
        h, hs = self.h0.expand(x.shape[0], 5), []
        for xt in x.unbind(1):
            h = self.cell(xt, h)
            hs.append(h)
        return torch.stack(hs, 0)


def _fused(model, T=6):
    """(captured graph after the pass, how many loops it fused, the captured program)."""
    cap = capture(model.eval(), torch.randn(1, T, 4), 1)
    n = fuse_cell_loops(cap.gm, cap.input_name)
    cap.gm.graph.lint()
    return cap, n


def _run(cap, x):
    args = [x if n.name == cap.input_name else cap.consts[n.name]
            for n in cap.gm.graph.nodes if n.op == "placeholder"]
    return cap.gm(*args)


@pytest.mark.parametrize("model, layer", [(GRULoop(1), aten.gru.input), (GRULoop(2), aten.gru.input),
                                          (LSTMLoop(), aten.lstm.input), (RNNLoop(), aten.rnn_relu.input)])
def test_loop_becomes_one_layer_computing_the_same(model, layer):
    cap, n = _fused(model)
    targets = [node.target for node in cap.gm.graph.nodes if node.op == "call_function"]
    assert n == 1 and targets.count(layer) == 1
    assert not any(str(t).endswith("_cell.default") for t in targets)
    x = torch.randn(3, 6, 4)
    with torch.no_grad():
        for got, ref in zip(_run(cap, x), torch.utils._pytree.tree_leaves(model(x))):
            torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-6)
    assert fuse_cell_loops(cap.gm, cap.input_name) == 0          # a fixpoint


def test_fused_layer_is_named_after_the_cell():
    cap, _ = _fused(GRULoop())
    layer = next(n for n in cap.gm.graph.nodes if n.target is aten.gru.input)
    assert list(layer.meta["nn_module_stack"].values())[-1][0] == "cell"


class Backwards(GRULoop):
    def forward(self, x):
        h = torch.zeros(x.shape[0], 6)
        for t in reversed(range(x.shape[1])):
            h = self.cell(x[:, t], h)
        return h


class TwoCells(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.b = nn.GRUCell(4, 6), nn.GRUCell(4, 6)

    def forward(self, x):
        h = torch.zeros(x.shape[0], 6)
        for t in range(x.shape[1]):
            h = (self.a if t % 2 else self.b)(x[:, t], h)
        return h


class StartFromFrames(GRULoop):
    def forward(self, x):
        h = torch.tanh(x.mean(1)).repeat(1, 2)[:, :6]
        for t in range(x.shape[1]):
            h = self.cell(x[:, t], h)
        return h


@pytest.mark.parametrize("model, why", [(Backwards(), "not every frame from the first in order"),
                                        (TwoCells(), "do not share one set of weights"),
                                        (StartFromFrames(), "start state is computed from the frames")])
def test_unrecognised_loop_is_refused_naming_the_cell(model, why):
    with pytest.raises(cocompile.CompileError) as err:
        cocompile.compile(model.eval(), torch.randn(1, 6, 4), time_dim=1)
    msg = str(err.value)
    assert "aten.gru_cell.default" in msg and "not recognised" in msg and why in msg
    assert "nn.GRU" in msg and "x[:, t]" in msg


def test_one_cell_on_the_newest_frame_is_left_alone():
    """Not a loop: a clip value of the newest frame, streamed as such."""
    class Newest(GRULoop):
        def forward(self, x):
            return self.cell(x[:, -1], torch.zeros(x.shape[0], 6))
    model = Newest().eval()
    cap, n = _fused(model)
    assert n == 0 and any(node.target is aten.gru_cell.default for node in cap.gm.graph.nodes)
    clip = torch.randn(2, 6, 4)
    co = cocompile.compile(model, clip, time_dim=1)
    assert cocompile.verify(model, co, clip).passed


def test_cell_on_a_value_that_carries_time_is_refused_by_the_analysis():
    """Frames folded into the batch of one cell call: not a loop the pass sees; the analysis names
    the cell and says how to write a recurrence."""
    class Folded(GRULoop):
        def forward(self, x):
            return self.cell(x.flatten(0, 1), torch.zeros(x.shape[0] * x.shape[1], 6))
    with pytest.raises(cocompile.CompileError) as err:
        cocompile.compile(Folded().eval(), torch.randn(1, 6, 4), time_dim=1)
    msg = str(err.value)
    assert "aten.gru_cell.default" in msg and "carries time" in msg and "nn.GRU" in msg

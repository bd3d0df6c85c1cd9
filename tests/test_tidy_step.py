"""passes/tidy_step.py on traced graphs. Oracle: the graph before the pass, on random inputs."""
from __future__ import annotations

import torch
from torch import nn
from torch.fx.experimental.proxy_tensor import make_fx

from cocompile.passes.tidy_step import tidy_step

aten = torch.ops.aten


class Wasteful(nn.Module):
    """What traced steps hold: a constant permuted and reshaped at every call, views that return
    their input, `h + 0` before an in-place op, and one `+ 0` whose input is read again."""

    def __init__(self):
        super().__init__()
        self.register_buffer("A", torch.randn(3, 4, 5))

    def forward(self, x, s):
        a = self.A.permute(2, 1, 0).reshape(5, 12)            # constants only: folded
        h = x.narrow(1, 0, x.shape[1]).reshape(x.shape) @ a    # whole-axis narrow, same-shape reshape
        h = (h + 0).relu_()                                    # h is read nowhere else: h stands for it
        keep = s + 0                                           # s is an input: kept
        other = h + 0                                          # h is read again below: kept
        w = x @ a
        view = w.t()                                           # a view of w, which is read again
        shared = (view + 0).relu_()                            # kept: relu_ would change w
        return h.permute(0, 1) + other, keep.relu_(), s, shared, w


def _traced():
    module = Wasteful()
    x, s = torch.randn(2, 5), torch.randn(3)
    return module, make_fx(module, pre_dispatch=True)(x, s), (x, s)


def _count(gm, op):
    return sum(n.target is op for n in gm.graph.nodes)


def test_tidy_keeps_values_and_drops_what_returns_its_input():
    torch.manual_seed(0)
    module, gm, _ = _traced()
    before = {op: _count(gm, op) for op in (aten.permute.default, aten.narrow.default, aten.add.Tensor)}
    removed = tidy_step(gm)
    assert removed >= 5 and tidy_step(gm) == 0                 # a second run removes nothing
    assert _count(gm, aten.narrow.default) == 0 and before[aten.narrow.default] == 1
    assert _count(gm, aten.permute.default) == 0             # the constant's and the identity one
    assert _count(gm, aten.add.Tensor) == before[aten.add.Tensor] - 1   # only (h + 0) went
    assert not any(n.op == "call_function" and all(a.op == "get_attr" for a in n.all_input_nodes)
                   and n.all_input_nodes for n in gm.graph.nodes)
    for _ in range(3):
        x, s = torch.randn(2, 5), torch.randn(3)
        want = module(x, s.clone())
        s_in = s.clone()
        got = gm(x, s_in)
        for a, b in zip(got, want):
            torch.testing.assert_close(a, b)
        torch.testing.assert_close(s_in, s)                    # the input was not mutated


def test_random_ops_on_constants_are_not_folded():
    """A random op on constants stays in the graph, to draw anew at each step."""
    class Random(nn.Module):
        def __init__(self):
            super().__init__()
            self.register_buffer("w", torch.ones(4))

        def forward(self, x):
            return x + torch.rand_like(self.w)

    gm = make_fx(Random(), pre_dispatch=True)(torch.randn(4))
    tidy_step(gm)
    out1, out2 = gm(torch.zeros(4)), gm(torch.zeros(4))
    assert not torch.equal(out1, out2)

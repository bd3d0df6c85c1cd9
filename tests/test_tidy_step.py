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


class Repeats(nn.Module):
    """What attention steps hold: a band mask rebuilt from `arange` and the frame counter in
    every layer, the counter's arithmetic at rate 1 (x * 1 // 1 - 0), heads split and merged by
    view chains around a size-1 axis, a float copy of the mask filled in place and never read,
    and a channels-last product's output put back around a ReLU."""

    def __init__(self):
        super().__init__()
        self.w = nn.Linear(8, 8)

    def forward(self, x, frames):
        outs = []
        for _ in range(2):                                      # two layers, one mask
            pos = (frames * 1 // 1 - 0)[:, None] + torch.arange(4)[None, :]
            band = torch.arange(4)[:, None] - torch.arange(4)[None, :]
            mask = (pos >= 2) & (band >= 0)
            torch.zeros_like(mask, dtype=torch.float).masked_fill_(mask, float("-inf"))
            h = self.w(x).reshape(1, 2, 4).transpose(0, 1).reshape(2, 1, 4)      # (1, 8) -> heads
            outs.append(h.sum() + mask.float().sum())
        y = torch.relu(x.view(1, 2, 4).permute(0, 2, 1)).permute(0, 2, 1)
        return outs[0] + outs[1], y, frames + 1


def test_tidy_folds_sizes_merges_repeats_collapses_views():
    torch.manual_seed(1)
    module = Repeats()
    x, frames = torch.randn(1, 8), torch.tensor([3])
    gm = make_fx(module, pre_dispatch=True)(x, frames)
    ops = {op: _count(gm, op) for op in (aten.arange.default, aten.ge.Scalar, aten.mul.Tensor,
                                         aten.floor_divide.default, aten.transpose.int,
                                         aten.permute.default, aten.masked_fill_.Scalar)}
    assert all(ops.values()), ops
    removed = tidy_step(gm)
    assert removed > 0 and tidy_step(gm) == 0
    for op in (aten.arange.default, aten.mul.Tensor, aten.floor_divide.default, aten.transpose.int,
               aten.permute.default, aten.masked_fill_.Scalar, aten.zeros_like.default):
        assert _count(gm, op) == 0, op
    assert _count(gm, aten.ge.Scalar) == 1                        # the mask is built once
    assert _count(gm, aten.linear.default) == 1                    # the same Linear of x, once
    assert not any(n.target is aten.view.default and n.args[0].target is aten.view.default
                   for n in gm.graph.nodes if n.op == "call_function")
    for f in (torch.tensor([0]), torch.tensor([3]), torch.tensor([7])):
        x = torch.randn(1, 8)
        for a, b in zip(gm(x, f), module(x, f)):
            torch.testing.assert_close(a, b)


def test_tidy_keeps_what_an_in_place_op_writes():
    """A constant that an in-place op writes stays an op (a folded buffer would be changed for
    the next step), and `x * 1` stays where its result is written in place."""
    class Writes(nn.Module):
        def forward(self, x):
            m = torch.arange(3).float().add_(1)                  # written: not a constant
            y = (x * 1).relu_()                                  # x * 1 written: kept
            return x + m, y

    gm = make_fx(Writes(), pre_dispatch=True)(torch.randn(3))
    tidy_step(gm)
    assert _count(gm, aten.arange.default) == 1 and _count(gm, aten.mul.Tensor) == 1
    x = torch.randn(3)
    for _ in range(2):
        x_in = x.clone()
        for a, b in zip(gm(x_in), Writes()(x)):
            torch.testing.assert_close(a, b)
        torch.testing.assert_close(x_in, x)                      # the input was not written


class Projections(nn.Module):
    """An attention layer's query/key/value projections of one input, a product of that input
    without bias, and one of another input."""

    def __init__(self):
        super().__init__()
        self.q, self.k, self.v = nn.Linear(6, 4), nn.Linear(6, 4), nn.Linear(6, 2)
        self.plain, self.other = nn.Linear(6, 3, bias=False), nn.Linear(5, 3)

    def forward(self, x, y):
        q, k, v = self.q(x), self.k(x), self.v(x)
        heads = q.view(2, 2, 2)                  # a view of a product that becomes a slice
        return heads.relu(), k * v.sum(-1, keepdim=True), self.plain(x), self.other(y)


def test_products_of_one_input_become_one_product():
    torch.manual_seed(0)
    module = Projections().eval()
    x, y = torch.randn(2, 6), torch.randn(2, 5)
    with torch.no_grad():
        gm = make_fx(module)(x, y)
        assert _count(gm, aten.linear.default) == 0      # make_fx decomposes: trace the step's way
    gm = make_fx(module, pre_dispatch=True)(x, y)
    assert _count(gm, aten.linear.default) == 5
    before = {n.target for n in gm.graph.nodes if n.op == "get_attr"}
    tidy_step(gm)
    assert _count(gm, aten.linear.default) == 3            # q, k and v are one; the others stay
    assert tidy_step(gm) == 0
    weights = sorted(tuple(getattr(gm, n.args[1].target).shape) for n in gm.graph.nodes
                     if n.target is aten.linear.default)
    assert weights == [(3, 5), (3, 6), (10, 6)]
    read = {n.target for n in gm.graph.nodes if n.op == "get_attr"}
    assert len(before - read) == 6 and not any(hasattr(gm, t) for t in before - read)   # not kept twice
    with torch.no_grad():
        for _ in range(3):
            x, y = torch.randn(2, 6), torch.randn(2, 5)
            for a, b in zip(gm(x, y), module(x, y)):
                torch.testing.assert_close(a, b)

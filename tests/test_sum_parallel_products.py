"""passes/sum_parallel_products.py: summed parallel products become one product. Oracle: the
captured graph before the pass (and the untouched module), on random inputs; a second run of the
pass changes nothing."""
from __future__ import annotations

import torch
from torch import nn

import cocompile
from cocompile.capture import capture
from cocompile.inputs import Inputs
from cocompile.passes.fold_constants import fold_constants
from cocompile.passes.sum_parallel_products import sum_parallel_products

aten = torch.ops.aten


def run(cap, *xs):
    given = dict(zip(cap.input_names, xs))
    return cap.gm(*[given[n.name] if n.name in given else cap.consts[n.name]
                    for n in cap.gm.graph.nodes if n.op == "placeholder"])


def captured(model, example, time_dim):
    """The captured graph as the pipeline hands it to the pass: constant-only values (A[k])
    folded."""
    cap = capture(model, example, Inputs.describe(model, example, time_dim))
    fold_constants(cap.gm, cap.consts, cap.input_names)
    return cap


def count(gm, *ops) -> int:
    return sum(n.target in ops for n in gm.graph.nodes)


class Subsets(nn.Module):
    """2s-AGCN's graph conv: per subset, the joints mixed by a matmul after a view, then a 1x1
    conv of its own; summed from `y = 0`, then a residual that must stay apart."""

    def __init__(self, cin=4, cout=6, joints=5, subsets=3):
        super().__init__()
        self.register_buffer("A", torch.rand(subsets, joints, joints))
        self.convs = nn.ModuleList(nn.Conv2d(cin, cout, 1) for _ in range(subsets))
        self.down = nn.Conv2d(cin, cout, 1)

    def forward(self, x):
        N, C, T, V = x.shape
        y = 0
        for k, conv in enumerate(self.convs):
            y = y + conv(torch.matmul(x.view(N, C * T, V), self.A[k]).view(N, C, T, V))
        return torch.relu(y) + self.down(x)


class Branches(nn.Module):
    """Linears and convs of one input, summed with a number; a Linear of another input stays."""

    def __init__(self):
        super().__init__()
        self.a, self.b, self.c = nn.Linear(8, 5), nn.Linear(8, 5, bias=False), nn.Linear(8, 5)
        self.p, self.q = nn.Conv1d(8, 4, 3, padding=1), nn.Conv1d(8, 4, 3, padding=1)

    def forward(self, x, h):
        s = x.transpose(1, 2)
        return self.a(x) + 1.5 + self.b(x) + self.c(h), self.p(s) + self.q(s)


def test_per_subset_products_become_one_and_keep_the_function():
    torch.manual_seed(0)
    model = Subsets().eval()
    x = torch.randn(3, 4, 6, 5)
    cap = captured(model, x[:1], 2)
    before = run(cap, x)[0]
    convs, mms = count(cap.gm, aten.conv2d.default), count(cap.gm, aten.matmul.default)
    assert (convs, mms) == (4, 3)
    assert sum_parallel_products(cap.gm, cap.consts) == 3        # three terms and `0` become one
    cap.gm.graph.lint()
    # one product over the stacked subsets (plus the residual's conv); no matmul per subset
    assert count(cap.gm, aten.conv2d.default) == 2 and count(cap.gm, aten.matmul.default) == 0
    assert count(cap.gm, aten.einsum.default) == 1
    got = run(cap, x)[0]
    torch.testing.assert_close(got, before, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(got, model(x), rtol=1e-5, atol=1e-5)
    assert sum_parallel_products(cap.gm, cap.consts) == 0        # idempotent


def test_linears_and_convs_of_one_input_sum_their_weights():
    torch.manual_seed(1)
    model = Branches().eval()
    x, h = torch.randn(2, 7, 8), torch.randn(2, 7, 8)
    cap = captured(model, (x[:1], h[:1]), (1, 1))
    before = run(cap, x, h)
    assert sum_parallel_products(cap.gm, cap.consts) == 2
    assert count(cap.gm, aten.linear.default) == 2                # a + b as one, c apart
    assert count(cap.gm, aten.conv1d.default) == 1
    for got, ref, orig in zip(run(cap, x, h), before, model(x, h)):
        torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(got, orig, rtol=1e-5, atol=1e-5)
    assert sum_parallel_products(cap.gm, cap.consts) == 0


def test_compiled_per_subset_model_streams_exactly():
    """Through the whole pipeline (the products stacked, then stepped frame by frame): E1."""
    torch.manual_seed(2)
    model = Subsets().eval()
    clip = torch.randn(2, 4, 8, 5)
    co = cocompile.compile(model, clip[:1], time_dim=2)
    assert count(co.program.gm, aten.matmul.default) == 0
    assert cocompile.verify(model, co, clip).passed

"""passes/commute_graph_products.py: a 1x1 conv and a product over joints run in the cheaper
order. Oracle: the captured graph before the pass (and the untouched module) on random inputs;
a second run changes nothing."""
from __future__ import annotations

import torch
from torch import nn

from cocompile.passes.commute_graph_products import commute_graph_products
from cocompile.passes.graph_products import match
from test_sum_parallel_products import captured, count, run

aten = torch.ops.aten


class ConvFirst(nn.Module):
    """ST-GCN's graph conv: a 1x1 conv to K*C' channels, then einsum over (subset, joint). From 2
    input channels to 128 the product is far cheaper on the 2 (joints first)."""

    def __init__(self, cin=2, cout=128, joints=25, subsets=3):
        super().__init__()
        self.register_buffer("A", torch.rand(subsets, joints, joints))
        self.conv = nn.Conv2d(cin, cout * subsets, 1)

    def forward(self, x):
        y = self.conv(x)
        n, kc, t, v = y.shape
        y = y.view(n, self.A.size(0), kc // self.A.size(0), t, v)
        return torch.einsum("nkctv,kvw->nctw", y, self.A)


class JointsFirst(nn.Module):
    """One subset written 2s-AGCN's way, joints first, from 16 channels to 4: the product is
    cheaper on the conv's 4 (conv first)."""

    def __init__(self, cin=16, cout=4, joints=6):
        super().__init__()
        self.register_buffer("A", torch.rand(joints, joints))
        self.conv = nn.Conv2d(cin, cout, 1)

    def forward(self, x):
        N, C, T, V = x.shape
        return self.conv(torch.matmul(x.view(N, C * T, V), self.A).view(N, C, T, V))


def _order(cap) -> str:
    out = next(n for n in cap.gm.graph.nodes if n.op == "output").args[0][0]
    return match(out, cap.consts).order


def test_conv_first_becomes_joints_first_where_the_input_is_narrow():
    torch.manual_seed(0)
    model = ConvFirst().eval()
    x = torch.randn(2, 2, 4, 25)
    cap = captured(model, x[:1], 2)
    before = run(cap, x)[0]
    assert _order(cap) == "conv"
    assert commute_graph_products(cap.gm, cap.consts) == 1
    cap.gm.graph.lint()
    assert _order(cap) == "joints"
    conv = next(n for n in cap.gm.graph.nodes if n.target is aten.conv2d.default)
    assert conv.meta["val"].shape[1] == 128 and conv.args[0].meta["val"].shape[1] == 3 * 2
    torch.testing.assert_close(run(cap, x)[0], before, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(run(cap, x)[0], model(x), rtol=1e-5, atol=1e-5)
    assert commute_graph_products(cap.gm, cap.consts) == 0


def test_joints_first_becomes_conv_first_where_the_output_is_narrow():
    torch.manual_seed(1)
    model = JointsFirst().eval()
    x = torch.randn(2, 16, 4, 6)
    cap = captured(model, x[:1], 2)
    before = run(cap, x)[0]
    assert count(cap.gm, aten.matmul.default) == 1
    assert commute_graph_products(cap.gm, cap.consts) == 1
    assert _order(cap) == "conv" and count(cap.gm, aten.matmul.default) == 0
    torch.testing.assert_close(run(cap, x)[0], before, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(run(cap, x)[0], model(x), rtol=1e-5, atol=1e-5)
    assert commute_graph_products(cap.gm, cap.consts) == 0

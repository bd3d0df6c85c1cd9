"""The rewrites and the analysis that prepare attention over time, each on its own: the graph still
computes the model (the untouched model is the oracle), running a rewrite again changes nothing,
and the analysis leaves the record it promises."""
from __future__ import annotations

import math

import torch
from torch import nn

from cocompile.capture import capture
from cocompile.passes.demand import analyse_demand
from cocompile.passes.fold_constants import fold_constants
from cocompile.passes.fold_positions import fold_positions
from cocompile.passes.fuse_attention import fuse_attention
from cocompile.passes.split_projections import split_projections
from cocompile.passes.time_axis import TimeAnalysis
from cocompile.timeinfo import DEMAND, NEWEST

aten = torch.ops.aten
torch.manual_seed(0)


class Block(nn.Module):
    """Position table + one post-norm encoder layer + a newest-token head."""

    def __init__(self, d=32, n=8, written_out=False):
        super().__init__()
        self.pos = nn.Parameter(torch.randn(1, n, d))
        self.layer = nn.TransformerEncoderLayer(d, 4, 2 * d, dropout=0.0, batch_first=True)
        self.qkv, self.written_out = nn.Linear(d, 3 * d), written_out
        self.out = nn.Linear(d, 3)

    def forward(self, x):
        x = x + self.pos
        if self.written_out:
            q, k, v = self.qkv(x).chunk(3, -1)
            x = ((q @ k.transpose(-2, -1)) / math.sqrt(q.size(-1))).softmax(-1) @ v
        return self.out(self.layer(x)[:, -1])


def _run(cap, x):
    args = [x if n.name == cap.input_name else cap.consts[n.name]
            for n in cap.gm.graph.nodes if n.op == "placeholder"]
    return cap.gm(*args)[0]


def _targets(cap):
    return [n.target for n in cap.gm.graph.nodes if n.op == "call_function"]


def _check(rewrite, model, expect_changes=True):
    model.eval()
    x = torch.randn(3, 8, 32)
    cap = capture(model, torch.randn(1, 8, 32), 1)
    changed = rewrite(cap)
    assert (changed > 0) == expect_changes
    cap.gm.graph.lint()
    with torch.no_grad():
        torch.testing.assert_close(_run(cap, x), model(x), rtol=1e-5, atol=1e-5)
    assert rewrite(cap) == 0                    # a fixpoint
    return cap


def test_fuse_attention_makes_one_attention_op():
    cap = _check(lambda c: fuse_attention(c.gm), Block(written_out=True))
    assert _targets(cap).count(aten.scaled_dot_product_attention.default) == 2
    assert aten.softmax.int not in _targets(cap)


def test_split_projections_gives_one_linear_per_q_k_v():
    cap = _check(lambda c: split_projections(c.gm), Block())
    assert aten.unflatten.int not in _targets(cap)
    assert _targets(cap).count(aten.linear.default) == 3 + 1 + 2 + 1   # q/k/v, out, ffn, head


def test_fold_positions_moves_the_table_behind_the_linears():
    def rewrite(c):
        split_projections(c.gm)
        return fold_positions(c.gm, c.input_name)
    cap = _check(rewrite, Block())
    # the q/k/v Linears read tokens without the table: it reaches them as its own Linear
    adds = [n for n in cap.gm.graph.nodes if n.target is aten.add.Tensor
            and all(a.target is aten.linear.default for a in n.args)]
    assert len(adds) == 3


def test_fold_constants_computes_weight_only_values_once():
    def rewrite(c):
        split_projections(c.gm)
        fold_positions(c.gm, c.input_name)
        return fold_constants(c.gm, c.consts, c.input_name)
    cap = _check(rewrite, Block())
    # no op left that reads constants only
    consts = {n for n in cap.gm.graph.nodes if n.op == "placeholder" and n.name != cap.input_name}
    assert not [n for n in cap.gm.graph.nodes
                if n.op == "call_function" and n.all_input_nodes and set(n.all_input_nodes) <= consts]
    assert set(cap.consts) == {n.name for n in consts}


def test_demand_marks_what_only_the_newest_token_reaches():
    model = Block().eval()
    cap = capture(model, torch.randn(1, 8, 32), 1)
    split_projections(cap.gm)
    TimeAnalysis(cap.gm, {cap.input_name: 1}, 8, False, cap.consts).run()
    analyse_demand(cap.gm)
    nodes = {n.name: n for n in cap.gm.graph.nodes}
    attention = next(n for n in nodes.values() if n.target is aten.scaled_dot_product_attention.default)
    q, k, v = attention.args[:3]
    assert attention.meta[DEMAND] == NEWEST and q.meta[DEMAND] == NEWEST
    assert k.meta[DEMAND] != NEWEST and v.meta[DEMAND] != NEWEST
    # the residual path reads the newest token only too; the position table's join all tokens
    head = next(n for n in nodes.values() if n.target is aten.select.int and n.args[2] == -1)
    assert head.args[0].meta[DEMAND] == NEWEST

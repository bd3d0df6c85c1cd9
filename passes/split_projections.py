"""Rewrite: a packed query/key/value projection becomes three projections.

`nn.MultiheadAttention` projects self-attention inputs with one Linear of 3*E outputs and picks
q, k and v out of it. When the outputs read only the newest query (single-output attention) while
every key and value of the window is read, the packed Linear would still compute the queries of
the whole window; three Linears over slices of the weight let the query be computed for the
newest frame only.

Invariant left behind: no `linear -> unflatten(-1, [3, E]) -> ... -> select(0, i)` chain (torch's
packed in-projection) remains; each `select(0, i)` is now `linear(x, W[iE:(i+1)E], b[iE:(i+1)E])`,
the same values up to float rounding.
"""
from __future__ import annotations

import torch
from torch import fx

from cocompile.passes.graph_edit import inherit

aten = torch.ops.aten
_CHAIN = (aten.unsqueeze.default, aten.transpose.int, aten.squeeze.dim, aten.contiguous.default)


def split_projections(gm: fx.GraphModule) -> int:
    """Split every packed in-projection; returns how many were split."""
    done = 0
    for node in list(gm.graph.nodes):
        picks = _packed(node)
        if picks is None:
            continue
        x, w, b = (list(node.args) + [None])[:3]
        size = node.args[1].meta["val"].shape[0] // 3
        for i, pick in picks:
            with gm.graph.inserting_before(pick):
                wi = _slice(gm, w, i, size)
                bi = _slice(gm, b, i, size) if b is not None else None
                lin = gm.graph.call_function(aten.linear.default, (x, wi, bi))
            pick.replace_all_uses_with(inherit(lin, pick, source=node))
        done += 1
    gm.graph.eliminate_dead_code()
    gm.graph.lint()
    gm.recompile()
    return done


def _packed(node) -> list | None:
    """[(i, select node)] if `node` is the Linear of a packed in-projection, else None."""
    if node.target is not aten.linear.default or len(node.users) != 1:
        return None
    u = next(iter(node.users))
    if u.target is not aten.unflatten.int or list(u.args[2])[:1] != [3]:
        return None
    for target in _CHAIN:
        if len(u.users) != 1 or next(iter(u.users)).target is not target:
            return None
        u = next(iter(u.users))
    picks = [(p.args[2], p) for p in u.users]
    if not picks or any(p.target is not aten.select.int or p.args[1] != 0 for _, p in picks):
        return None
    return picks


def _slice(gm, param, i: int, size: int):
    s = gm.graph.call_function(aten.slice.Tensor, (param, 0, i * size, (i + 1) * size))
    s.meta["val"] = torch.empty((size, *param.meta["val"].shape[1:]), dtype=param.meta["val"].dtype,
                                device="meta")
    return s

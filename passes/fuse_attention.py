"""Rewrite: attention written out as matrix products and a softmax becomes one attention op.

Hand-written attention (`(q @ k.transpose(-2, -1)) / sqrt(d)`, softmax, `@ v`) and
`nn.MultiheadAttention` with `need_weights=True` (scaled q, `bmm`, softmax, `bmm`) reach the graph
as separate ops whose intermediate (query x key scores) carries time on two axes. Fused into
`scaled_dot_product_attention`, they get the same step forms as torch's own attention
(single-output, causal, window):

    softmax((q*a) @ k^T * b + M) @ v  ==  sdpa(q, k, v, attn_mask=M, scale=a*b)

Invariant left behind: no `matmul/bmm -> [scale] -> [mask] -> softmax(-1) -> [dropout] ->
matmul/bmm` chain whose intermediates have no other reader remains. Values are unchanged up to
float rounding; chains whose scores or weights are read elsewhere are left as they are (and
refused later, with a message that names the reason).
"""
from __future__ import annotations

import torch
from torch import fx

from cocompile.passes.graph_edit import inherit

aten = torch.ops.aten
_MATMUL = (aten.matmul.default, aten.bmm.default)
_SOFTMAX = (aten.softmax.int, aten._softmax.default)


def fuse_attention(gm: fx.GraphModule) -> int:
    """Fuse every matching chain; returns how many were fused."""
    fused = 0
    for sm in [n for n in gm.graph.nodes if n.target in _SOFTMAX]:
        match = _match(sm)
        if match is None:
            continue
        q, k, v, mask, scale, out = match
        with gm.graph.inserting_before(out):
            if mask is not None and mask[1]:          # masked_fill(True -> -inf): attend where False
                mask = (gm.graph.call_function(aten.logical_not.default, (mask[0],)), False)
                mask[0].meta["val"] = mask[0].args[0].meta["val"]
            att = gm.graph.call_function(aten.scaled_dot_product_attention.default, (q, k, v),
                                         {"attn_mask": mask[0] if mask else None, "scale": scale})
        out.replace_all_uses_with(inherit(att, out))
        fused += 1
    gm.graph.eliminate_dead_code()
    gm.graph.lint()
    gm.recompile()
    return fused


def _only_user(node):
    return next(iter(node.users)) if len(node.users) == 1 else None


def _match(sm):
    """(q, k, v, (mask, is_fill) or None, scale, final matmul) for one softmax, or None."""
    dim = sm.args[1]
    if dim not in (-1, sm.args[0].meta["val"].dim() - 1) or (
            sm.target is aten.softmax.int and len(sm.args) > 2 and sm.args[2] is not None):
        return None
    out = _only_user(sm)
    if out is not None and out.target is aten.dropout.default:
        out = _only_user(out)
    if out is None or out.target not in _MATMUL or out.args[0] not in (sm, *sm.users):
        return None
    v, scale, mask, node = out.args[1], 1.0, None, sm.args[0]
    while node.target not in _MATMUL + (aten.baddbmm.default,):   # back over scaling, masking
        if len(node.users) != 1:
            return None
        if node.target in (aten.div.Tensor, aten.mul.Tensor) and isinstance(node.args[1], float):
            scale *= 1 / node.args[1] if node.target is aten.div.Tensor else node.args[1]
        elif node.target is aten.add.Tensor and isinstance(node.args[1], fx.Node) and mask is None:
            mask = (node.args[1], False)
        elif node.target is aten.masked_fill.Scalar and node.args[2] == float("-inf") and mask is None:
            mask = (node.args[1], True)
        else:
            return None
        node = node.args[0]
    if len(node.users) != 1:
        return None
    if node.target is aten.baddbmm.default:     # baddbmm(M, q, k^T) = M + q @ k^T
        if mask is not None or scale != 1.0 or node.kwargs:
            return None
        mask, node = (node.args[0], False), node
        q, kt = node.args[1:3]
    else:
        q, kt = node.args[:2]
    k = _untransposed(kt)
    if k is None:
        return None
    if q.target is aten.mul.Tensor and isinstance(q.args[1], float) and len(q.users) == 1:
        scale, q = scale * q.args[1], q.args[0]
    return q, k, v, mask, scale, out


def _untransposed(kt):
    """k for k^T written as transpose(k, -2, -1) (or the same permute), else None."""
    nd = kt.meta["val"].dim()
    if kt.target is aten.transpose.int and {a % nd for a in kt.args[1:3]} == {nd - 2, nd - 1}:
        return kt.args[0]
    if kt.target is aten.permute.default:
        perm = [p % nd for p in kt.args[1]]
        if perm == list(range(nd - 2)) + [nd - 1, nd - 2]:
            return kt.args[0]
    return None


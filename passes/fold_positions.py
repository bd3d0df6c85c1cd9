"""Rewrite: a position encoding added before a Linear is folded through it.

Tokens plus a per-position constant (`x + pe`) change every step as the window slides, so what
reads them is computed on the whole window. A Linear is affine, though:

    linear(L(x + pe), W, b) = linear(L(x), W, b) + linear(L(pe), W)

with L a chain of layout ops (transpose, permute, contiguous, dropout in eval). The first term
is per token (computed once per frame and cached), the second a constant per position, added
to the cached window each step: post-norm Transformer layers keep their cached key/value
projections. A non-linear op first (pre-norm LayerNorm) is left alone: that path is recomputed
over the window, which `cocompile inspect` reports.

Invariant left behind: no Linear reads `x + pe` through layout ops only, where `pe` is computed
from constants and `x` from the input; the values are the same up to float rounding.
"""
from __future__ import annotations

import torch
from torch import fx

from cocompile.passes.graph_edit import inherit

aten = torch.ops.aten
_LAYOUT = (aten.transpose.int, aten.permute.default, aten.contiguous.default, aten.clone.default,
           aten.dropout.default, aten.alias.default)


def fold_positions(gm: fx.GraphModule, input_names) -> int:
    """Fold every constant addend through the Linears after it; returns how many were folded."""
    const = _constant_nodes(gm, input_names)
    folded = 0
    for add in [n for n in gm.graph.nodes if n.target is aten.add.Tensor and not n.kwargs]:
        a, b = add.args[:2]
        if not (isinstance(a, fx.Node) and isinstance(b, fx.Node)) or (a in const) == (b in const):
            continue
        x, pe = (a, b) if b in const else (b, a)
        copies = {add: (x, pe)}
        for lin, path in _linears_after(add):
            _fold(gm, lin, path, copies)
            folded += 1
    gm.graph.eliminate_dead_code()
    gm.graph.lint()
    gm.recompile()
    return folded


def _constant_nodes(gm, input_names) -> set:
    """Nodes whose value does not depend on the model input (parameters, buffers, tables)."""
    input_names = {input_names} if isinstance(input_names, str) else set(input_names)
    varying = set()
    for n in gm.graph.nodes:
        if (n.op == "placeholder" and n.name in input_names) or any(a in varying for a in n.all_input_nodes):
            varying.add(n)
    return {n for n in gm.graph.nodes if n not in varying and n.op != "output"}


def _linears_after(add) -> list:
    """[(linear, [layout nodes from add to it])] reached from `add` through layout ops only."""
    found, todo = [], [(add, [])]
    while todo:
        node, path = todo.pop()
        for u in node.users:
            if u.target is aten.linear.default and u.args[0] is node:
                found.append((u, path))
            elif u.target in _LAYOUT and u.args[0] is node:
                todo.append((u, path + [u]))
    return found


def _fold(gm, lin, path, copies) -> None:
    """linear(L(x + pe)) -> linear(L(x)) + linear(L(pe)) without bias."""
    with gm.graph.inserting_before(lin):
        for node in path:
            if node not in copies:
                x, pe = copies[node.args[0]]
                copies[node] = (_copy(gm, node, x, node.meta["val"]),
                                _copy(gm, node, pe, _meta_of(node, pe)))
        x, pe = copies[lin.args[0]]
        w, b = lin.args[1], (lin.args[2] if len(lin.args) > 2 else None)
        per_token = gm.graph.call_function(aten.linear.default, (x, w, b))
        per_position = gm.graph.call_function(aten.linear.default, (pe, w))
        out = gm.graph.call_function(aten.add.Tensor, (per_token, per_position))
    inherit(per_position, lin, val=torch.nn.functional.linear(_meta(pe), _meta(w)))
    inherit(per_token, lin)
    inherit(out, lin)
    lin.replace_all_uses_with(out)


def _copy(gm, node, arg, val):
    c = gm.graph.call_function(node.target, (arg, *node.args[1:]), dict(node.kwargs))
    return inherit(c, node, val=val)


def _meta_of(node, arg):
    """The value `node`'s op gives on `arg`, as a meta tensor (shapes only)."""
    return node.target(_meta(arg), *node.args[1:], **node.kwargs)


def _meta(node) -> torch.Tensor:
    val = node.meta["val"]
    return torch.empty(val.shape, dtype=val.dtype, device="meta")

"""Rewrite: fold each eval BatchNorm into the convolution that feeds it; the others become an
affine map.

Invariant left behind: no `batch_norm` reads a convolution that has no other user and constant
weights; that convolution carries the folded weight W·γ/√(σ²+ε) and bias (b−μ)·γ/√(σ²+ε)+β as new
constants (a transposed convolution too: its weight is scaled per output channel, which is its
axis 1 within each group). Likewise no `batch_norm` reads a graph product (a 1x1 conv and
products over joints, passes/graph_products.py: ST-GCN's graph conv, 2s-AGCN's summed subsets):
the scale goes into the product's weight per output channel, the shift into the bias it adds
after (one add instead of BatchNorm's multiply and add). Every other eval BatchNorm with constant statistics is `x * scale + shift`, two
pointwise ops with per-channel constants computed here once: they keep the layout of whatever
feeds them (a channels-last step stays channels-last, and exporters' layout optimisers move
transposes through them), where batch_norm wants its channels on axis 1. The graph computes the
same function up to float rounding.
"""
from __future__ import annotations

from dataclasses import replace

import torch
from torch import fx

from cocompile.ops.schema import bind
from cocompile.passes.graph_edit import const
from cocompile.passes.graph_products import finish_rewrite, match, write

aten = torch.ops.aten
TRANSPOSED = (aten.conv_transpose1d.default, aten.conv_transpose2d.input, aten.conv_transpose3d.input)
CONVS = (aten.conv1d.default, aten.conv2d.default, aten.conv3d.default, aten.convolution.default) + TRANSPOSED


def _new_const(gm: fx.GraphModule, consts: dict, name: str, value: torch.Tensor, like: fx.Node) -> fx.Node:
    """A new constant placeholder (before the first non-placeholder node) holding `value`."""
    first = next(n for n in gm.graph.nodes if n.op != "placeholder")
    with gm.graph.inserting_before(first):
        node = gm.graph.placeholder(name)
    node.meta["val"] = like.meta["val"]
    consts[node.name] = value
    return node


def _scale_shift(b: dict, consts: dict):
    """(scale, shift) per channel of an eval batch_norm (bound arguments `b`) whose statistics and
    affine parameters are constants: bn(x) = x * scale + shift. None otherwise."""
    stats = [const(b[k], consts) if b[k] is not None else None
             for k in ("weight", "bias", "running_mean", "running_var")]
    if b["training"] or stats[2] is None or stats[3] is None or any(
            b[k] is not None and s is None for k, s in zip(("weight", "bias"), stats[:2])):
        return None
    gamma, beta, mean, var = stats
    scale = torch.rsqrt(var + b["eps"]) * (gamma if gamma is not None else 1)
    return scale, (beta if beta is not None else 0) - mean * scale


def _scaled(weight: torch.Tensor, scale: torch.Tensor, transposed: bool, groups: int) -> torch.Tensor:
    """The weight with each output channel's filter times its scale. A convolution's weight holds
    output channels on axis 0; a transposed convolution's is (Cin, Cout/groups, ...), output
    channel o of group i being (i*Cin/groups + any input channel, o - i*Cout/groups)."""
    if not transposed:
        return weight * scale.view((-1,) + (1,) * (weight.dim() - 1))
    w = weight.unflatten(0, (groups, -1))                       # (groups, Cin/g, Cout/g, ...)
    return (w * scale.view(groups, 1, -1, *[1] * (weight.dim() - 2))).flatten(0, 1)


def _as_affine(gm: fx.GraphModule, consts: dict, bn: fx.Node) -> int:
    """Replace an eval batch_norm with constant statistics by x * scale + shift (1 if done)."""
    b = bind(bn.target, bn.args, bn.kwargs)
    affine = _scale_shift(b, consts)
    if affine is None:
        return 0
    scale, shift = affine
    x, dims = bn.args[0], bn.meta["val"].dim()
    view = (-1,) + (1,) * (dims - 2)
    with gm.graph.inserting_before(bn):
        s = _new_const(gm, consts, f"{b['running_var'].name}_scale", scale.view(view), b["running_var"])
        t = _new_const(gm, consts, f"{b['running_mean'].name}_shift", shift.view(view), b["running_mean"])
        s.meta["val"], t.meta["val"] = _fake(scale.view(view), x), _fake(shift.view(view), x)
        mul = gm.graph.call_function(aten.mul.Tensor, (x, s))
        add = gm.graph.call_function(aten.add.Tensor, (mul, t))
    mul.meta.update(bn.meta)
    add.meta.update(bn.meta)
    bn.replace_all_uses_with(add)
    gm.graph.erase_node(bn)
    return 1


def _fake(value: torch.Tensor, like: fx.Node):
    """A fake tensor of `value`'s shape in the fake mode of `like`'s value (for node.meta)."""
    mode = like.meta["val"].fake_mode
    return mode.from_tensor(value)


def fold_batchnorm(gm: fx.GraphModule, consts: dict) -> int:
    """Fold every eligible conv -> batch_norm pair, make the other eval BatchNorms affine; returns
    how many batch_norms were rewritten."""
    folded = 0
    for bn in list(gm.graph.nodes):
        if bn.target is not aten.batch_norm.default:
            continue
        conv = bn.args[0]
        if _into_product(gm, consts, bn):
            folded += 1
            continue
        if not isinstance(conv, fx.Node) or conv.target not in CONVS or len(conv.users) != 1:
            folded += _as_affine(gm, consts, bn)
            continue
        b = bind(bn.target, bn.args, bn.kwargs)
        c = bind(conv.target, conv.args, conv.kwargs)
        weight, bias = const(c["weight"], consts), const(c.get("bias"), consts)
        affine = _scale_shift(b, consts)
        if affine is None or b["weight"] is None or b["bias"] is None \
                or weight is None or (c.get("bias") is not None and bias is None):
            folded += _as_affine(gm, consts, bn)
            continue
        scale, shift = affine
        transposed = conv.target in TRANSPOSED or bool(c.get("transposed"))
        new_w = _new_const(gm, consts, f"{c['weight'].name}_bnfold",
                           _scaled(weight, scale, transposed, int(c["groups"])), c["weight"])
        new_b = _new_const(gm, consts, f"{b['bias'].name}_bnfold",
                           (bias * scale if bias is not None else 0) + shift, b["bias"])
        args = list(conv.args)
        args[1] = new_w
        if len(args) > 2:
            args[2] = new_b
        else:
            args.append(new_b)
        conv.args = tuple(args)
        bn.replace_all_uses_with(conv)
        gm.graph.erase_node(bn)
        folded += 1
    finish_rewrite(gm, consts)
    return folded


def _into_product(gm: fx.GraphModule, consts: dict, bn: fx.Node) -> bool:
    """Fold an eval batch_norm into the graph product it alone reads, written back in the
    product's order: bn(W x A + b) = (W·scale) x A + (b·scale + shift), per output channel."""
    src = bn.args[0]
    gp = match(src, consts) if isinstance(src, fx.Node) and len(src.users) == 1 else None
    affine = _scale_shift(bind(bn.target, bn.args, bn.kwargs), consts) if gp is not None else None
    if affine is None:
        return False
    scale, shift = affine
    bias = (gp.bias if gp.bias is not None else 0) * scale[:, None] + shift[:, None]
    write(gm, consts, replace(gp, weight=gp.weight * scale[:, None], bias=bias, root=bn), gp.order)
    gm.graph.erase_node(bn)
    return True

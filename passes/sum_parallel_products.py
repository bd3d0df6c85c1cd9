"""Rewrite: parallel linear ops whose results are summed become one product.

Models often write one linear map as a sum of several. 2s-AGCN-style graph convs sum, per
partition subset, a product of the features with A_k and a 1x1 conv of its own,
sum_k conv_k(x @ A_k); multi-branch blocks sum Linears or convs of one input. Each term costs
its own dispatches, a pass over the input and a product too thin to run at speed; one product
over the stacked subsets, or one op with the weights summed, reads the input once.

Invariant left behind: no sum (a tree of `add`s whose inner adds have one reader) has two terms,
each read by nothing else, that are graph products of one value (passes/graph_products.py), or
Linears / convolutions of one input with constant weights and the same other arguments. Those
terms are one op: the products' subsets stacked (written in the cheaper order, biases added),
the Linears' and convolutions' weights and biases summed (W1 x + W2 x = (W1 + W2) x). Numbers
added in the sum stay, once, as their total. Values are unchanged up to float rounding.
"""
from __future__ import annotations

import dataclasses
import functools

import torch
from torch import fx

from cocompile.ops.schema import bind
from cocompile.passes.graph_edit import const
from cocompile.passes.graph_products import CONVS, call, emit, finish_rewrite, match, new_const

aten = torch.ops.aten
LINEAR_OPS = (aten.linear.default, aten.convolution.default, *CONVS)


def sum_parallel_products(gm: fx.GraphModule, consts: dict) -> int:
    """Merge the parallel terms of every sum; returns how many terms went."""
    merged = 0
    for node in list(gm.graph.nodes):
        if _is_add(node) and node.users and not _inner(node):
            merged += _merge(gm, consts, node)
    if merged:
        finish_rewrite(gm, consts)
    return merged


def _is_add(node) -> bool:
    return (isinstance(node, fx.Node) and node.op == "call_function" and node.target is aten.add.Tensor
            and len(node.args) == 2 and not node.kwargs)


def _inner(node) -> bool:
    """An add whose one reader is an add: part of that add's sum."""
    return len(node.users) == 1 and _is_add(next(iter(node.users)))


def _terms(node) -> list:
    """The terms of the sum rooted at `node`: values (nodes) and numbers."""
    out = []
    for a in node.args:
        out += _terms(a) if _is_add(a) and len(a.users) == 1 else [a]
    return out


def _merge(gm, consts, root) -> int:
    """Rewrite one sum whose terms include parallel products; returns how many terms went."""
    terms = _terms(root)
    groups: dict = {}
    for t in terms:
        key, item = _kind(t, consts)
        groups.setdefault(key, []).append(item)
    parallel = [g for k, g in groups.items() if k is not None and len(g) > 1]
    if not parallel:
        return 0
    kept = [item for k, g in groups.items() if k is None or len(g) == 1 for item in g]
    with gm.graph.inserting_before(root):
        new = [_one(gm, consts, g, root) for g in parallel]
        new += [t.root if hasattr(t, "root") else t for t in kept if not isinstance(t, (int, float))]
        total = sum(t for t in kept if isinstance(t, (int, float)))
        out = functools.reduce(lambda a, b: call(gm, aten.add.Tensor, (a, b), root), new)
        if total:
            out = call(gm, aten.add.Tensor, (out, total), root)
    root.replace_all_uses_with(out)
    return len(terms) - len(new) - bool(total)


def _kind(term, consts):
    """(group key, item): terms with one key merge. A graph product groups by its input, a
    Linear or convolution by its op, input and other arguments; anything else by None."""
    if not isinstance(term, fx.Node) or len(term.users) != 1:
        return None, term
    gp = match(term, consts)
    if gp is not None:
        return ("product", gp.x, tuple(gp.adjacency.shape[1:])), gp
    if term.op == "call_function" and term.target in LINEAR_OPS:
        b = bind(term.target, term.args, term.kwargs)
        w = const(b["weight"], consts)
        if w is not None and (b.get("bias") is None or const(b["bias"], consts) is not None):
            rest = tuple((k, str(v)) for k, v in b.items() if k not in ("input", "weight", "bias"))
            return ("linear", term.target, b["input"], tuple(w.shape), rest), term
    return None, term


def _one(gm, consts, group: list, root) -> fx.Node:
    """One op for a group of parallel terms (inserted before `root`)."""
    if not isinstance(group[0], fx.Node):                  # graph products: subsets stacked
        gp = functools.reduce(lambda a, b: a.plus(b), group)
        gp = dataclasses.replace(gp, root=root)
        return emit(gm, consts, gp, gp.cheaper)
    b = [bind(t.target, t.args, t.kwargs) for t in group]
    weight = sum(const(x["weight"], consts) for x in b)
    biases = [const(x["bias"], consts) for x in b if x.get("bias") is not None]
    args = dict(b[0], weight=new_const(gm, consts, "weight", weight, root))
    if biases:
        args["bias"] = new_const(gm, consts, "bias", sum(biases), root)
    target = group[0].target
    return call(gm, target, tuple(args[a.name] for a in target._schema.arguments if a.name in args), root)

"""Analysis: which frames of each value the outputs read — only the newest, or all of them.

Invariant left behind: node.meta["cocompile.demand"] is "newest" for every value of which the
model's outputs read only the positions that the current step produces (through per-position ops
down to `x[:, -1]`, or as the queries of an attention read that way), and "all" for every other
value; node.meta["cocompile.reads"] maps each input of a node to what the node reads of it. It runs backwards over the graph annotated by the time analysis; the analysis run after it
uses the demand to pick single-output attention and to cut windows to their newest frames.

    >>> analyse_demand(gm)   # gm annotated by TimeAnalysis
    >>> [n.meta["cocompile.demand"] for n in gm.graph.nodes if n.op == "call_function"]
"""
from __future__ import annotations

import operator

import torch
from torch import fx

from cocompile.ops.delay import delay_frames
from cocompile.ops.registry import rule_for
from cocompile.ops.window import WindowRule
from cocompile.timeinfo import ALL, DEMAND, META, NEWEST, READS, TIME, WINDOW, TimeInfo

aten = torch.ops.aten
_POSITIONS = (TIME, WINDOW)


def analyse_demand(gm: fx.GraphModule) -> None:
    for node in reversed(gm.graph.nodes):
        if node.op in ("output", "placeholder"):
            continue
        wants = [_wanted(user, node) for user in node.users]
        node.meta[DEMAND] = NEWEST if wants and all(w == NEWEST for w in wants) else ALL
        for user in node.users:
            user.meta.setdefault(READS, {})[node] = _wanted(user, node)


def _info(node) -> TimeInfo | None:
    info = node.meta.get(META)
    info = info[0] if isinstance(info, tuple) else info
    return info if isinstance(info, TimeInfo) else None


def _wanted(user: fx.Node, arg: fx.Node) -> str:
    """What `user` reads of `arg`: NEWEST (only the step's positions) or ALL."""
    x, out = _info(arg), _info(user)
    if user.op != "call_function" or x is None or x.kind not in _POSITIONS:
        return ALL
    mine = user.meta.get(DEMAND, ALL)
    if user.target is operator.getitem:
        return mine
    if user.target is aten.select.int and _selects_last(user, x):
        return NEWEST
    if user.target is aten.scaled_dot_product_attention.default:
        # only the queries are per position; every key and value of the window is read
        return mine if user.args[0] is arg and arg not in user.args[1:] else ALL
    if out is None or out.kind not in _POSITIONS or (out.length, out.rate) != (x.length, x.rate):
        return ALL                                  # a reduction over time, a stride, ...
    rule = rule_for(user.target)
    if user.target is delay_frames or (isinstance(rule, WindowRule)
                                       and rule.window(user, x.dim) is not None):
        return ALL                                  # reads older frames
    return mine


def _selects_last(node, x: TimeInfo) -> bool:
    ndim = node.args[0].meta["val"].dim()
    return (not x.merged and node.args[1] % ndim == x.dim
            and node.args[2] % x.length == x.length - 1)

"""Rewrite: values computed from constants only are computed once, at compile time.

A step runs every op of the graph, so an op on weights alone (a weight slice, a position table
projected by a Linear, an adjacency times its learned importance, an attention mask built from
`arange`) would be recomputed at every step. This pass evaluates each such value that a
frame-dependent op reads and makes it a constant of the step program.

Invariant left behind: every op that reads a constant-only value reads a constant placeholder;
placeholders that nothing reads any more are gone (with their tensors). Values are unchanged.
"""
from __future__ import annotations

import torch
from torch import fx

from cocompile.passes.fold_batchnorm import _new_const


def fold_constants(gm: fx.GraphModule, consts: dict, input_names) -> int:
    """Fold every constant-only value that a frame-dependent op reads; returns how many."""
    input_names = {input_names} if isinstance(input_names, str) else set(input_names)
    varying, values, folded = set(), {}, 0
    for n in gm.graph.nodes:
        if n.op == "placeholder":
            if n.name in input_names:
                varying.add(n)
            else:
                values[n] = consts.get(n.name)
        elif n.op == "call_function":
            if any(a in varying or values.get(a) is None for a in n.all_input_nodes):
                varying.add(n)
                continue
            args, kwargs = fx.node.map_arg((n.args, n.kwargs), lambda a: values[a])
            try:
                values[n] = n.target(*args, **kwargs)
            except Exception:  # noqa: BLE001 - leave it to run at each step
                varying.add(n)
    for n in list(values):
        if n.op == "call_function" and isinstance(values[n], torch.Tensor) \
                and any(u in varying for u in n.users):
            n.replace_all_uses_with(_new_const(gm, consts, f"{n.name}_const", values[n].detach(), n))
            folded += 1
    gm.graph.eliminate_dead_code()
    for n in list(gm.graph.nodes):
        if n.op == "placeholder" and n.name not in input_names and not n.users:
            consts.pop(n.name, None)
            gm.graph.erase_node(n)
    gm.graph.lint()
    gm.recompile()
    return folded

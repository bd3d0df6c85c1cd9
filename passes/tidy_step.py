"""Rewrite of a traced step graph (ATen ops): ops whose result is already at hand are not run.

A traced step runs each of its ops at every step, and each costs a dispatch whatever it computes.
Tracing leaves ops that compute nothing new: ops on the step's constants alone (a weight permuted
and reshaped for a matrix product), views that return their input's shape unchanged (a narrow
over a whole axis, a reshape to the same shape, an identity permute), and additions of the
constant 0 (a residual branch that is `lambda x: 0`).

Invariant left behind: no op reads only constants; no view op keeps its input's shape from offset
0; no `x + 0` whose x (and what x is a view of) has no other reader. Values, and which values
alias which, are unchanged: a dropped view is replaced by its input, which has the same shape,
strides and offset; `x + 0` is replaced by x only where nothing else reads x's memory, so an
in-place op after it mutates nothing else.
"""
from __future__ import annotations

import operator

import torch
from torch import fx

aten = torch.ops.aten

# views that return their input as is when the result has the input's shape (from offset 0)
SAME_SHAPE_VIEWS = {aten.view.default, aten.reshape.default, aten._unsafe_view.default,
                    aten.expand.default, aten.flatten.using_ints, aten.unflatten.int,
                    aten.contiguous.default, aten.alias.default}
RANGE_VIEWS = {aten.narrow.default: 2, aten.slice.Tensor: 2}     # op: position of its start


def tidy_step(gm: fx.GraphModule) -> int:
    """Fold constant-only ops into constants and drop ops that return their input; returns how
    many ops were removed (running it again removes none)."""
    removed = _fold_constants(gm) + _drop_identities(gm)
    if removed:
        gm.graph.eliminate_dead_code()
        gm.graph.lint()
        gm.recompile()
    return removed


def _fold_constants(gm: fx.GraphModule) -> int:
    """Each op that reads only constants (get_attr) becomes a constant itself."""
    values, folded = {}, 0
    for n in list(gm.graph.nodes):
        if n.op == "get_attr":
            values[n] = operator.attrgetter(n.target)(gm)
            continue
        if (n.op != "call_function" or not isinstance(n.target, torch._ops.OpOverload)
                or not n.all_input_nodes or any(a not in values for a in n.all_input_nodes)
                or n.target._schema.is_mutable or torch.Tag.nondeterministic_seeded in n.target.tags):
            continue
        args, kwargs = fx.node.map_arg((n.args, n.kwargs), lambda a: values[a])
        value = n.target(*args, **kwargs)
        if not isinstance(value, torch.Tensor):
            continue
        name = f"_folded_{n.name}"
        gm.register_buffer(name, value.contiguous() if value.is_contiguous() else value.clone())
        with gm.graph.inserting_before(n):
            const = gm.graph.get_attr(name)
        const.meta = dict(n.meta)
        n.replace_all_uses_with(const)
        values[const] = getattr(gm, name)
        folded += 1
    return folded


def _drop_identities(gm: fx.GraphModule) -> int:
    dropped = 0
    for n in list(gm.graph.nodes):
        x = n.args[0] if n.op == "call_function" and n.args else None
        if isinstance(x, fx.Node) and _returns_input(n, x):
            n.replace_all_uses_with(x)
            dropped += 1
    return dropped


def _returns_input(n: fx.Node, x: fx.Node) -> bool:
    out, inp = n.meta.get("val"), x.meta.get("val")
    if not isinstance(out, torch.Tensor) or not isinstance(inp, torch.Tensor):
        return False
    same = out.shape == inp.shape and out.dtype == inp.dtype and out.stride() == inp.stride()
    if n.target in SAME_SHAPE_VIEWS:
        return same
    if n.target in RANGE_VIEWS:
        i = RANGE_VIEWS[n.target]
        return same and (n.args[i] if len(n.args) > i else 0) in (0, None)
    if n.target is aten.permute.default:
        return list(n.args[1]) == list(range(len(n.args[1])))
    if n.target is aten.add.Tensor and len(n.args) == 2 and not n.kwargs:
        # x + 0 is a new tensor; x may stand for it only where nothing else reads x's memory
        return n.args[1] == 0 and not isinstance(n.args[1], bool) and same and _read_once(x)
    return False


def _read_once(x: fx.Node) -> bool:
    """x owns memory that nothing but its one reader sees: x, and every value it is a view of,
    has one user, up to an op that returns a fresh tensor."""
    while True:
        if x.op != "call_function" or len(x.users) != 1 or not isinstance(x.target, torch._ops.OpOverload):
            return False
        returns = x.target._schema.returns
        if not returns or returns[0].alias_info is None:
            return True
        x = x.args[0]
        if not isinstance(x, fx.Node):
            return False

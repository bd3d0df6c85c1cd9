"""Analysis aid: the captured graph's shapes at a second clip length, to tell which axes hold time.

At the example's clip length some values cannot show where time is: a value with a single frame
(three temporal strides of 2 on an 8-frame clip) has several axes of size 1, and a view can put
time on any of them; an adaptive pool to one frame of a one-frame value is both frame-local and a
reduction over the clip. Where the time analysis meets such a doubt, compile() captures the model
again at another clip length and runs the same rewrites; the axes whose size changed between the
two captures are the ones that hold time.

Invariant: `grown(node)` is the set of axes of the node's value (or, for tuple values, a tuple of
sets) whose size differs between the two captures, or None for a node the second capture does
not have (the model's code took another path, or a later rewrite made the node).

>>> probe = ShapeProbe.between(first_gm, second_gm)
>>> probe.grown(conv_node)
{2}
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import fx

from cocompile.errors import Refusal
from cocompile.timeinfo import TIME, WINDOW, TimeInfo


def _shape(val) -> tuple | None:
    """Sizes of a value (None for what is not a tensor); sizes in the batch symbol are taken at a
    batch of 7 streams, so that an axis merging time with the batch shows its growth too."""
    if not isinstance(val, torch.Tensor):
        return None
    return tuple(int(s.node.expr.subs({b: 7 for b in s.node.expr.free_symbols}))
                 if isinstance(s, torch.SymInt) else int(s) for s in val.shape)


def _shapes(node: fx.Node):
    val = node.meta.get("val")
    if isinstance(val, (tuple, list)):
        return tuple(_shape(v) for v in val)
    return _shape(val)


def _signature(node: fx.Node) -> tuple:
    """The op and the names of the values it reads: equal in both captures where they agree."""
    names = []
    fx.node.map_arg((node.args, node.kwargs), lambda a: names.append(a.name))
    return (str(node.target), tuple(names))


def _grown(a, b) -> set | None:
    if a is None or b is None or len(a) != len(b):
        return None
    return {k for k, (x, y) in enumerate(zip(a, b)) if x != y}


@dataclass(frozen=True)
class ShapeProbe:
    """Shapes at the first and the second clip length, by node name (with the node's target, so
    that a node a later rewrite made under a reused name is not mistaken for the captured one)."""

    first: dict
    second: dict
    lengths: tuple[int, int]       # frames of the fastest input in the two captures

    @classmethod
    def between(cls, first: fx.GraphModule, second: fx.GraphModule, lengths: tuple[int, int]):
        def table(gm):
            return {n.name: (_signature(n), _shapes(n)) for n in gm.graph.nodes if n.op == "call_function"}
        return cls(table(first), table(second), lengths)

    def grown(self, node: fx.Node):
        a, b = self.first.get(node.name), self.second.get(node.name)
        if a is None or b is None or not a[0] == b[0] == _signature(node):
            return None            # not the same op on the same values: the graphs differ here
        if isinstance(a[1], tuple) and a[1] and isinstance(a[1][0], tuple):
            if not isinstance(b[1], tuple) or len(a[1]) != len(b[1]):
                return None
            return tuple(_grown(x, y) for x, y in zip(a[1], b[1]))
        return _grown(a[1], b[1])

    def check(self, node: fx.Node, info) -> None:
        """Refuse when the analysis put time on an axis that does not grow with the clip, or a
        per-frame value has another axis that grows (time is elsewhere)."""
        grown = self.grown(node)
        if grown is None:
            return
        pairs = zip(info, grown) if isinstance(info, tuple) and isinstance(grown, tuple) else [(info, grown)]
        for i, g in pairs:
            if not isinstance(i, TimeInfo) or g is None or i.kind not in (TIME, WINDOW):
                continue
            if i.dim not in g or (i.kind == TIME and g - {i.dim}):
                first, second = self.lengths
                raise Refusal(f"the example clip cannot show which axis of this value holds time: "
                              f"the analysis of the {first}-frame clip put it on axis {i.dim}, but "
                              f"captured at {second} frames the value grows on axes {sorted(g)}",
                              "compile with a longer example clip, so that 2 or more frames reach "
                              "every op")

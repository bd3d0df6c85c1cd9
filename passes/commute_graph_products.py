"""Rewrite: a 1x1 convolution and a product with constant matrices over joints run in the
order with fewer multiply-adds.

A conv over channels and a product over the last axis (a skeleton's joints) commute:
conv(x @ A) = conv(x) @ A, with a bias carried through A. The product then runs on the conv's
input channels or on its output channels; ST-GCN writes the conv first, 2s-AGCN the product.
Per frame, the product costs K*C*V*W multiply-adds on C channels (plus the copy that stacks its
K subsets into the conv's channels) and K*C'*V*W on C', so whichever side is narrower goes
first (passes/graph_products.py reads the forms and writes them back).

Invariant left behind: every graph product (passes/graph_products.match) is written in its
cheaper order (GraphProduct.cheaper; a tie puts the conv first). Values are unchanged up to
float rounding.
"""
from __future__ import annotations

from torch import fx

from cocompile.passes.graph_products import finish_rewrite, match, write


def commute_graph_products(gm: fx.GraphModule, consts: dict) -> int:
    """Rewrite every graph product written in its dearer order; returns how many."""
    moved = 0
    # readers before what they read: a product with its bias add is seen whole, before its parts
    for node in reversed(list(gm.graph.nodes)):
        if node.op != "call_function" or not node.users:
            continue
        gp = match(node, consts)
        if gp is not None and gp.order != gp.cheaper:
            write(gm, consts, gp, gp.cheaper)
            moved += 1
    if moved:
        finish_rewrite(gm, consts)
    return moved

"""Rewrite: insert frame FIFOs (`delay_frames`) where the temporal analysis asked for them.

Invariant left behind: every join's time inputs are streamed with equal warm-up, and no op that
cannot absorb explicit zero padding reads a value with negative warm-up. The offline meaning of the
graph is unchanged (a delay is the identity on the clip), and re-running the analysis asks for
no further delay.
"""
from __future__ import annotations

from torch import fx

from cocompile.ops.delay import delay_frames
from cocompile.timeinfo import META


def insert_delays(gm: fx.GraphModule, requirements: dict) -> int:
    """Insert one delay per (node, input) requirement; returns how many were inserted."""
    for (node, arg), warmup in requirements.items():
        frames = warmup - arg.meta[META].warmup
        with gm.graph.inserting_before(node):
            d = gm.graph.create_node("call_function", delay_frames, (arg, frames),
                                     name=f"{node.name}_delay")
        d.meta.update(val=arg.meta["val"], nn_module_stack=node.meta.get("nn_module_stack", {}),
                      stack_trace=node.meta.get("stack_trace"))
        node.replace_input_with(arg, d)
    gm.graph.lint()
    gm.recompile()
    return len(requirements)

"""Rewrite: insert `window_frames` / `newest_frames` where streamed frames meet whole windows.

Invariant left behind: no op other than attention reads both streamed frames and a whole window;
each such meeting asked for by the time analysis became a conversion node (a window of the frames,
or the newest frames of the window). The offline meaning is unchanged (both are the identity on
the clip), and re-running the analysis asks for no further conversion.
"""
from __future__ import annotations

from torch import fx

from cocompile.ops.convert import newest_frames, window_frames
from cocompile.passes.graph_edit import inherit


def insert_windows(gm: fx.GraphModule, conversions: dict) -> int:
    """One conversion node per (node, input) the analysis asked for; returns how many."""
    made = {}
    for (node, arg), how in conversions.items():
        fn = window_frames if how == "window" else newest_frames
        if (arg, how) not in made:                  # one window of a value serves every reader
            with gm.graph.inserting_after(arg):
                c = gm.graph.create_node("call_function", fn, (arg,), name=f"{arg.name}_{how}")
            made[(arg, how)] = inherit(c, arg, source=node)
        node.replace_input_with(arg, made[(arg, how)])
    gm.graph.lint()
    gm.recompile()
    return len(conversions)

"""Analysis: the state tensors of the step graph, named after the user's modules.

Invariant left behind: every stateful node has node.meta["cocompile.state"] = {key: StateSpec},
names are unique and readable (`state.blocks.2.conv_a`, `state.head.pool.clip`,
`state.blocks.3.delay`), and `assign_states` returns them in graph order after the frame counter.
"""
from __future__ import annotations

import torch
from torch import fx

from cocompile.errors import Refusal, error_at, module_path
from cocompile.ops.delay import delay_frames
from cocompile.ops.registry import StateSpec, rule_for
from cocompile.timeinfo import STATE_META, steps_by_rule

FRAMES = StateSpec("state.frames", (), torch.int64,
                   "input frames consumed so far by this stream (positions the start padding)")


def per_stream(shape) -> tuple[tuple[int, ...], int]:
    """(shape without the stream axis, fold) from a captured shape whose axis 0 is k*batch."""
    lead, rest = shape[0], tuple(int(s) for s in shape[1:])
    if isinstance(lead, int) or getattr(lead, "is_Integer", False):
        return rest, 1                              # batch fixed at capture: axis 0 is the batch
    fold = lead / next(iter(lead.free_symbols))
    if not fold.is_Integer:
        raise Refusal(f"axis 0 of a state has size {lead}, not a multiple of the batch",
                      "keep the batch (times a constant) on axis 0")
    return ((int(fold),) + rest if fold > 1 else rest), int(fold)


def assign_states(gm: fx.GraphModule, an) -> list[StateSpec]:
    """Collect and name the states of every node (`an` is the finished TimeAnalysis)."""
    specs, used = [FRAMES], {FRAMES.name}
    for node in gm.graph.nodes:
        rule = rule_for(node.target) if node.op == "call_function" else None
        if not steps_by_rule(node, rule):
            continue
        an._rule, an._node = rule, node
        try:
            wanted = rule.states(node, an)
            for key, (shape, dtype, doc) in wanted.items():
                wanted[key] = (per_stream(shape), dtype, doc)
        except Refusal as r:
            raise error_at(node, r.reason, r.hint) from None
        finally:
            an._rule = None
        base = module_path(node) or node.name.removesuffix("_delay")
        if node.target is delay_frames:
            base += ".delay"
        named = {}
        for key, (shape, dtype, doc) in wanted.items():
            name = f"state.{base}" + ("" if key in ("window", "fifo") else f".{key}")
            stem, i = name, 1
            while name in used:
                name, i = f"{stem}.{i}", i + 1
            used.add(name)
            named[key] = StateSpec(name, shape[0], dtype, doc, fold=shape[1])
            specs.append(named[key])
        if named:
            node.meta[STATE_META] = named
    return specs

"""Delay buffers (frame FIFOs) that line up the inputs of joins.

`delay_frames(x, frames)` is the identity on the offline clip, so a graph with delays inserted still
computes the model; its streaming form outputs each frame `frames` steps-worth of frames later. Its
zero state is the start of the stream, so a delay also materialises pending zero padding.
"""
from __future__ import annotations

import torch

from ..errors import Refusal
from .frames import cat_frames, frames_shape, merge_time, split_time
from .registry import OpRule, register_op


def delay_frames(x: torch.Tensor, frames: int) -> torch.Tensor:
    """Offline meaning of a delay: none (the clip is already aligned)."""
    return x


@register_op(delay_frames)
class Delay(OpRule):
    absorbs_zero_prefix = True

    def time(self, node, an):
        x = an.info(node.args[0])
        return x.replace(warmup=x.warmup + node.args[1])

    def states(self, node, an):
        x = an.info(node.args[0])
        if not isinstance(x.outer, int):
            raise Refusal("frames must be delayed where time is merged with the batch axis",
                          "keep the batch axis separate from time around joins of branches")
        return {"fifo": (frames_shape(node.args[0], x, node.args[1]), node.args[0].meta["val"].dtype,
                         f"{node.args[1]} frames delayed to line up a join")}

    def step(self, node, args, kwargs, ctx):
        info, frames = ctx.info(node.args[0]), node.args[1]
        xu, t = split_time(args[0], info, ctx.batch)
        fu, _ = split_time(ctx.state(node, "fifo"), info, ctx.batch)
        buf = cat_frames(fu, xu, t)
        n = xu.shape[t] if ctx.mode == "step" else ctx.info(node).flush_frames(ctx.clip_length)
        if ctx.mode == "step":
            ctx.set_state(node, "fifo", merge_time(buf.narrow(t, n, frames), info))
        return merge_time(buf.narrow(t, 0, n), info)

"""Delay buffers (frame FIFOs) that line up the inputs of joins.

`delay_frames(x, frames)` is the identity on the offline clip, so a graph with delays inserted still
computes the model; its streaming form outputs each frame `frames` steps-worth of frames later. Its
zero state is the start of the stream, so a delay also materialises pending zero padding.
In a channels-last step (node.meta["cocompile.rows"], see passes/choose_forms.rows_delays) the FIFO
holds its frames as rows, (N, *other axes, frames, C).
"""
from __future__ import annotations

import torch

from ..errors import Refusal
from .conv_forms import ROWS_META, from_rows, rows_shape, to_rows
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
        shape, doc = frames_shape(node.args[0], x, node.args[1]), f"{node.args[1]} frames delayed to line up a join"
        if node.meta.get(ROWS_META):
            shape, doc = rows_shape(shape, x.dim), doc + ", as rows (N, ..., frames, C)"
        return {"fifo": (shape, node.args[0].meta["val"].dtype, doc)}

    def step(self, node, args, kwargs, ctx):
        info, frames = ctx.info(node.args[0]), node.args[1]
        flush = ctx.info(node).flush_frames(ctx.clip_length) if ctx.mode == "flush" else None
        if node.meta.get(ROWS_META):                 # (never merged with other axes)
            out, fifo = _fifo(ctx.state(node, "fifo"), to_rows(args[0], info.dim), -2, frames, flush)
            if ctx.mode == "step":
                ctx.set_state(node, "fifo", fifo)
            return from_rows(out, info.dim)
        xu, t = split_time(args[0], info, ctx.batch)
        fu, _ = split_time(ctx.state(node, "fifo"), info, ctx.batch)
        out, fifo = _fifo(fu, xu, t, frames, flush)
        if ctx.mode == "step":
            ctx.set_state(node, "fifo", merge_time(fifo, info))
        return merge_time(out, info)


def _fifo(fifo: torch.Tensor, x: torch.Tensor, t: int, frames: int, flush: int | None):
    """(the frames that leave: the first n of fifo + x, the FIFO after them) on axis t, where n is
    x's frame count (when flushing: `flush` frames, and no FIFO after). When x has no more frames
    than the FIFO, the leaving frames are read from the FIFO and only the kept ones are
    concatenated: a backend that copies every slice (onnxruntime) then writes 2·frames frames per
    step instead of 2·(frames + n)."""
    if flush is not None:                        # (no FIFO after the flush)
        return cat_frames(fifo, x, t).narrow(t, 0, flush), None
    n = x.shape[t]
    if n <= frames:
        return fifo.narrow(t, 0, n), cat_frames(fifo.narrow(t, n, frames - n), x, t)
    buf = cat_frames(fifo, x, t)
    return buf.narrow(t, 0, n), buf.narrow(t, n, frames)

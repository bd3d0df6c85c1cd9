"""Conversions between streamed frames and whole-window values.

`window_frames(x)` and `newest_frames(x)` are the identity on the offline clip, so a graph with them
inserted still computes the model. Streaming, `window_frames` turns a per-frame value into its
window (the last L frames, kept in the state: the key/value cache of attention, or the token
window a position encoding is added to), and `newest_frames` keeps only the frames of the current
step of a window value, for consumers that the demand analysis found read nothing older.
"""
from __future__ import annotations

import torch

from ..errors import Refusal
from ..timeinfo import TIME, WINDOW
from .clip import ClipWindow
from .frames import merge_time, split_time
from .registry import OpRule, register_op


def window_frames(x: torch.Tensor) -> torch.Tensor:
    """Offline meaning: none (the clip is its own window)."""
    return x


def newest_frames(x: torch.Tensor) -> torch.Tensor:
    """Offline meaning: none (the outputs read only the last frames of it anyway)."""
    return x


def newest(ctx, info, x: torch.Tensor) -> torch.Tensor:
    """The frames of the current step of a window value `x` (all frames missing in the flush)."""
    n = (info.frames_per_step(ctx.step_frames) if ctx.mode == "step"
         else max(info.replace(kind=TIME).flush_frames(ctx.clip_length), 0))
    xu, t = split_time(x, info, ctx.batch)
    return merge_time(xu.narrow(t, xu.shape[t] - n, n), info)


@register_op(window_frames)
class WindowFrames(OpRule):
    def time(self, node, an):
        x = an.info(node.args[0])
        if x.kind != TIME:
            raise Refusal("internal: window_frames of a value without frames", "report this")
        return ClipWindow.window(an, node.args[0])

    def states(self, node, an):
        return ClipWindow.states(node.args[0], an.info(node.args[0]), "window")

    def step(self, node, args, kwargs, ctx):
        return ClipWindow.frames(ctx, node, node.args[0], args[0], "window")


@register_op(newest_frames)
class NewestFrames(OpRule):
    reads_windows = True

    def time(self, node, an):
        x = an.info(node.args[0])
        if x.kind != WINDOW:
            raise Refusal("internal: newest_frames of a value that is not a window", "report this")
        return x.replace(kind=TIME, ready=0)

    def step(self, node, args, kwargs, ctx):
        return newest(ctx, ctx.info(node.args[0]), args[0])

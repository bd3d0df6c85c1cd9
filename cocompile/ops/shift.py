"""Zero padding and slicing along time: they shift the stream rather than filter it.

`F.pad(x, (p, q))` along time puts p zero frames before the clip: the stream does not produce them,
they become negative warm-up that the consumer's zero state absorbs (or a delay materialises), and
the q frames after the clip are emitted by the flush. `x[:, :, a:]` drops a frames (positive
warm-up); `x[:, :, a::s]` is a stride-s window of one frame.
"""
from __future__ import annotations

import torch

from ..errors import Refusal
from .registry import OpRule, register_op
from .schema import bind, call
from .window import Window, WindowRule, zero_padding_frames

aten = torch.ops.aten


@register_op(aten.constant_pad_nd.default, aten.pad.default)
class ConstantPad(OpRule):
    """Zero padding along time only shifts the stream: the left pad becomes negative warm-up (zeros
    that the consumer's zero state absorbs), the right pad is emitted at the flush."""

    absorbs_zero_prefix = True

    @staticmethod
    def _time_pad(pads, ndim, d):
        j = ndim - 1 - d                  # pads list the last axis first
        return (pads[2 * j], pads[2 * j + 1]) if 2 * j + 1 < len(pads) else (0, 0)

    def time(self, node, an):
        x = an.info(node.args[0])
        a = bind(node.target, node.args, node.kwargs)
        left, right = self._time_pad(list(a["pad"]), node.args[0].meta["val"].dim(), x.dim)
        if (left, right) == (0, 0):
            return an.aligned(node.args[0], max(x.warmup, 0))
        if a.get("mode", "constant") != "constant":
            raise Refusal(f"{a['mode']} padding along time reads frames the stream has not seen "
                          "(or the clip's far end)", "pad time with zeros (mode='constant')")
        if x.merged or (a.get("value") or 0) != 0:
            raise Refusal("padding along time with a non-zero value (or along a merged axis)",
                          "pad time with zeros, e.g. F.pad(x, (...), value=0)")
        out = x.replace(length=x.length + left + right, warmup=x.warmup - left,
                        padded=x.padded or left > 0 or right > 0)
        if out.flush_frames(an.clip_length) < 0:
            raise Refusal("cropping frames off the end along time is non-causal",
                          "do not crop the end of the time axis")
        return out

    def step(self, node, args, kwargs, ctx):
        x, x_info = args[0], ctx.info(node.args[0])
        d = x_info.dim
        a = bind(node.target, args, kwargs)
        pads = list(a["pad"])
        j = x.dim() - 1 - d
        if 2 * j + 1 < len(pads):
            pads[2 * j] = pads[2 * j + 1] = 0
        a["pad"] = pads
        y = call(node.target, a) if any(pads) else x
        if x_info.warmup > 0 and ctx.info(node).warmup < x_info.warmup:
            # the input's warm-up frames stand where this padding's zeros belong: zero them
            y = zero_padding_frames(ctx, x_info, y, d)
        if ctx.mode == "flush":                  # the right padding, then what is still missing
            missing = ctx.info(node).flush_frames(ctx.clip_length)
            shape = list(y.shape)
            shape[d] = max(missing - y.shape[d], 0)
            y = torch.cat([y, y.new_zeros(shape)], d).narrow(d, 0, missing)
        return y


@register_op(aten.slice.Tensor)
class Slice(WindowRule):
    """Slicing along time: `x[:, a:]` shifts the stream, `x[:, a::s]` is a stride-s window of one
    frame; slicing other axes is frame-local."""

    zero_preserving = True

    def window(self, node, d):
        x, dim, start, end, step = (list(node.args) + [0, None, None, 1][len(node.args) - 1:])[:5]
        ndim, size = x.meta["val"].dim(), int(x.meta["val"].shape[d]) if d is not None else 0
        if dim % ndim != d:
            return None
        start = 0 if start is None else (start + size if start < 0 else start)
        end = size if end is None else (end + size if end < 0 else end)
        if start == 0 and step == 1 and end >= size:
            return None
        return Window(1, step, 1, -start, 0)

    def covers_clip(self, node, x, win):
        return False

    def run(self, node, args, buf, d):
        if d is None:
            return aten.slice.Tensor(buf, *args[1:])
        return aten.slice.Tensor(buf, d, 0, buf.shape[d], self.window(node, d).stride)

"""Transposed convolution along time (upsampling): overlap-add, with the pending tail as state.

Offline, a transposed convolution with kernel K, dilation dd (extent E = dd*(K-1)+1), stride s,
padding p and output_padding op adds the K taps of input frame t to the "full" positions
u = t*s + k*dd (k < K); the output is the full sequence, extended by op positions that receive only
the bias, cropped by p at both ends: y[i] = full[i + p].

Streaming form, after m input frames (streamed frame j = offline frame j - w, w the warm-up):

  * a step runs the transposed conv on its n frames with no temporal padding, output_padding or
    bias, which gives (n-1)*s + E positions starting at full position m*s, and adds them to the
    pending partial sums of the state;
  * positions below (m+n)*s are then final, but one may still be cropped away by the right
    padding if the clip ends there, so h = max(0, p - (E-s) - op) of them are held back: a step
    emits the n*s positions [m*s - h, (m+n)*s - h) and keeps the next max(E-s, 0) + h as state
    (its zero initial value: positions nothing has reached yet);
  * the output runs at s times the input's rate; its warm-up is s*w + p + h (the p cropped
    positions, the h held back);
  * the input's frames before its offline frame 0 (w > 0) are zeroed as they arrive: offline they
    do not exist, and their taps would spill into real frames;
  * the flush runs the input's missing frames through the same overlap-add and emits the pending
    tail and the positions that receive no tap (output_padding), with the bias: s*f +
    max(E-s-p+op, 0) frames, never negative (f: the input's own missing frames).

An input with explicit zero padding still pending (negative warm-up) is delayed first (a delay's
zero state materialises it), so the positions above always start at the stream's frame 0.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ..errors import Refusal
from ..timeinfo import META, TimeInfo
from .frames import frames_shape, meta_shape
from .registry import register_op
from .schema import bind
from .window import Window, WindowRule, out_shape, zero_padding_frames

aten = torch.ops.aten


@dataclass(frozen=True)
class Upsampling:
    """A transposed convolution along one axis (see the module docstring for h and the tail)."""

    kernel: int
    stride: int = 1
    dilation: int = 1
    padding: int = 0
    output_padding: int = 0

    @property
    def extent(self) -> int:
        return self.dilation * (self.kernel - 1) + 1

    @property
    def hold(self) -> int:
        """h: final positions held back, since the right padding may still crop them."""
        return max(0, self.padding - (self.extent - self.stride) - self.output_padding)

    @property
    def tail(self) -> int:
        """Positions kept as state after a step's emitted frames."""
        return max(self.extent - self.stride, 0) + self.hold


def transposed_args(node, args=None, kwargs=None) -> dict:
    """Arguments of a transposed convolution (conv_transposeNd, or aten.convolution with
    transposed=True) by name, each int-list argument one entry per spatial axis."""
    a = bind(node.target, node.args if args is None else args, node.kwargs if kwargs is None else kwargs)
    n = node.args[1].meta["val"].dim() - 2
    for key in ("stride", "padding", "output_padding", "dilation"):
        values = list(a[key])
        a[key] = values * n if len(values) == 1 else values
    return a


@register_op(aten.conv_transpose1d.default, aten.conv_transpose2d.input, aten.conv_transpose3d.input)
class TransposedConv(WindowRule):
    """Transposed convolution: time on a spatial axis upsamples by overlap-add; time on the batch
    axis is frame-local; time on the channel axis is refused. aten.convolution with
    transposed=True is handed over here by the Convolution rule."""

    absorbs_zero_prefix = False      # pending zero padding is materialised by a delay first

    def upsampling(self, node, d: int) -> Upsampling | None:
        """The op along axis d, or None when it is frame-local there."""
        if d == 0:
            return None
        if d == 1:
            raise Refusal("a transposed convolution over an axis that holds time as channels mixes frames",
                          "pass time_dim= the axis that is time, and keep it out of the channel axis")
        a, j = transposed_args(node), d - 2
        return Upsampling(int(node.args[1].meta["val"].shape[d]), int(a["stride"][j]), int(a["dilation"][j]),
                          int(a["padding"][j]), int(a["output_padding"][j]))

    def window(self, node, d):
        """Kernel, stride, padding and dilation along time, as the layer table shows them."""
        up = self.upsampling(node, d)
        if up is None:
            return None
        return Window(up.kernel, up.stride, up.dilation, up.padding, up.padding)

    def _up(self, node, x: TimeInfo) -> Upsampling | None:
        return None if self._window(node, x) is None else self.upsampling(node, x.dim)

    # -- analysis ------------------------------------------------------------------------------
    def time(self, node, an):
        x = an.info(node.args[0])
        up = self._up(node, x)
        if up is None:
            return x
        edges = up.extent != up.stride or up.padding or up.output_padding   # partial sums at the ends
        out = x.replace(length=out_shape(node)[x.dim], rate=x.rate * up.stride,
                        warmup=up.stride * x.warmup + up.padding + up.hold,
                        rf=int(x.rf + (-(-up.extent // up.stride) - 1) / x.rate),
                        padded=x.padded or bool(edges))
        # flush = s*f + (E-s-p+op) + h = s*f + max(E-s-p+op, 0), f >= 0 the input's own flush
        assert out.flush_frames(an.clip_length) >= 0, (out, up)
        return out

    def states(self, node, an):
        x = an.info(node.args[0])
        up = self._up(node, x)
        if up is None or up.tail == 0:
            return {}
        out = node.meta[META]
        return {"window": (frames_shape(node, out, up.tail), node.meta["val"].dtype,
                           f"partial sums of the next {up.tail} output frames (no bias)")}

    # -- step ----------------------------------------------------------------------------------
    def step(self, node, args, kwargs, ctx):
        x_info = ctx.info(node.args[0])
        up = self._up(node, x_info)
        if up is None:
            return self.run(node, args, args[0], None)
        d, x = x_info.dim, args[0]
        if x_info.warmup > 0:
            x = zero_padding_frames(ctx, x_info, x, d)
        if ctx.mode == "step":
            emit = x.shape[d] * up.stride
        else:
            emit = ctx.info(node).flush_frames(ctx.clip_length)
        acc = ctx.state(node, "window") if up.tail else None
        if x.shape[d]:
            acc = _add_at(acc, self.run(node, args, x, d), up.hold, d)
        if acc is None:                              # flush with nothing pending: bias only
            acc = x.new_zeros(meta_shape(node, ctx.batch, 0, ctx.info(node)))   # x's dtype and device
        acc = _pad_to(acc, emit + (up.tail if ctx.mode == "step" else 0), d)
        if ctx.mode == "step" and up.tail:
            ctx.set_state(node, "window", acc.narrow(d, emit, up.tail))
        out = acc.narrow(d, 0, emit)
        bias = transposed_args(node, args, kwargs)["bias"]
        return out if bias is None else out + bias.view([1, -1] + [1] * (out.dim() - 2))

    def run(self, node, args, buf, d):
        """The transposed conv of `buf`; along time axis d without padding, output_padding or bias
        (d None: as captured)."""
        a = transposed_args(node, args, {})
        bias = a["bias"]
        if d is not None:
            a["padding"][d - 2] = a["output_padding"][d - 2] = 0
            bias = None
        return aten.convolution.default(buf, a["weight"], bias, a["stride"], a["padding"], a["dilation"], True,
                                        a["output_padding"], a["groups"])


def _add_at(acc, z: torch.Tensor, offset: int, t: int) -> torch.Tensor:
    """acc (or nothing) plus z placed `offset` positions in along axis t; as long as the longer."""
    if acc is None:
        return _pad_axis(z, t, offset, 0)
    n, m = acc.shape[t], z.shape[t]
    if n <= offset:                                  # no overlap
        return torch.cat([_pad_axis(acc, t, 0, offset - n), z], t)
    both = min(n - offset, m)
    parts = [acc.narrow(t, 0, offset), acc.narrow(t, offset, both) + z.narrow(t, 0, both),
             acc.narrow(t, offset + both, n - offset - both), z.narrow(t, both, m - both)]
    return torch.cat([p for p in parts if p.shape[t]], t)


def _pad_to(x: torch.Tensor, n: int, t: int) -> torch.Tensor:
    """x with zero positions appended along t up to length n (never cut)."""
    return _pad_axis(x, t, 0, n - x.shape[t]) if x.shape[t] < n else x


def _pad_axis(x: torch.Tensor, t: int, before: int, after: int) -> torch.Tensor:
    if not (before or after):
        return x
    return F.pad(x, [0, 0] * (x.dim() - 1 - t) + [before, after])

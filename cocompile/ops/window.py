"""Temporal window ops: convolution and avg/max pooling along time (padding and slicing along
time, which reuse this machinery, are in shift.py).

Streaming form of a window op with kernel extent e = dilation*(kernel-1)+1, stride s and left
padding p, reading a stream whose offline frame 0 is streamed frame w (the input's warm-up):

  * the op keeps S frames of its input and runs with no temporal padding on [state | chunk];
  * S is the one value in [e-s, e-1] with S = p-w (mod s): a chunk of n frames (n a multiple
    of s) then yields exactly n/s outputs, and window starts stay on the offline grid;
  * the zero state stands for the start padding; the first (S-(p-w))/s outputs are warm-up.
    S < 0 (windows with gaps, e < s) means the first -S frames of each chunk are skipped.
  * at the end of the clip (flush) the op appends its own right padding and emits the offline
    frames still missing.

p-w > e-1 would ask for outputs made only of padding before the first frame arrives; the input
is then delayed until p-w = e-1 (a delay's zero state materialises those padding frames).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from ..errors import Refusal
from ..timeinfo import META, TimeInfo
from .clip import ClipWindow
from .conv_forms import (ROWS_FORMS, ConvGeometry, channels_first_mm, fold, fold_rows, form_of, from_rows, partial,
                         partial_rows, prepare, rows_shape, time_pointwise, to_rows)
from .frames import cat_frames, frames_shape, last_frames, stream_axis
from .registry import OpRule, register_op, rule_for
from .schema import bind, call

aten = torch.ops.aten


@dataclass(frozen=True)
class Window:
    kernel: int
    stride: int = 1
    dilation: int = 1
    left: int = 0
    right: int = 0

    @property
    def extent(self) -> int:
        return self.dilation * (self.kernel - 1) + 1


@dataclass(frozen=True)
class Plan:
    warmup_in: int      # warm-up the input must have (>= its own; a delay is inserted if more)
    state: int          # S: input frames kept between steps (< 0: frames skipped per chunk)
    warmup_out: int


def plan(win: Window, warmup_in: int) -> Plan:
    """Solve the streaming alignment of one window op (see module docstring)."""
    p = win.left - warmup_in
    if p > win.extent - 1:                       # pure-padding outputs: delay the input instead
        warmup_in, p = win.left - (win.extent - 1), win.extent - 1
    lo = win.extent - win.stride
    state = lo + (p - lo) % win.stride          # S = p (mod s), S in [e-s, e-1]
    return Plan(warmup_in, state, (state - p) // win.stride)


class WindowRule(OpRule):
    """Shared analysis and step form; subclasses say where time is and how to run the op."""

    absorbs_zero_prefix = True
    zero_preserving = False   # when frame-local: maps zero frames to zero frames

    def window(self, node, d: int) -> Window | None:
        """The op's window along axis d, or None when the op is frame-local along d."""
        raise NotImplementedError

    def run(self, node, args, buf: torch.Tensor, d: int | None):
        """Run the op on `buf` with no temporal padding (d is None: run it as captured)."""
        raise NotImplementedError

    def run_step(self, node, args, buf: torch.Tensor, d: int, ctx):
        """`run` inside a step, where a rule may use a faster form of the same sums."""
        return self.run(node, args, buf, d)

    def pad_value(self, node) -> float:
        """What the op's own padding holds."""
        return 0.0

    def counted_padding(self, node, win: Window) -> int | None:
        """Where the op divides by the frames its window covers (average pooling): how many
        padding frames at each end the divisor counts (0: only real frames). None: no divisor."""
        return None

    def separable(self, node, x: TimeInfo):
        """(axes, op) when this clip reduction is `op` over time and `axes`, which can then be
        reduced per frame before buffering (a window of one value per frame); else None."""
        return None

    def covers_clip(self, node, x: TimeInfo, win: Window) -> bool:
        """A window over the whole clip that yields one frame is a clip reduction."""
        return (out_shape(node)[x.dim] == 1 and x.length > 1
                and win.extent >= x.length + win.left + win.right)

    # -- analysis ------------------------------------------------------------------------------
    def time(self, node, an):
        x = an.info(node.args[0])
        win = self._window(node, x)
        if win is None:                          # frame-local along time
            floor = x.warmup if self.zero_preserving else max(x.warmup, 0)
            return self._wrap(node, an.aligned(node.args[0], floor))
        if self.covers_clip(node, x, win):
            return self._wrap(node, ClipWindow.time(an, node.args[0]))
        p = plan(win, x.warmup)
        x = an.aligned(node.args[0], p.warmup_in)
        length = out_shape(node)[x.dim]
        # more windows than fit the padded clip (ceil_mode): the last one ends past it, as if padded
        past_end = length > (x.length + win.left + win.right - win.extent) // win.stride + 1
        out = x.replace(length=length, rate=x.rate / win.stride,
                        warmup=p.warmup_out, rf=int(x.rf + (win.extent - 1) / x.rate),
                        padded=x.padded or win.left > 0 or win.right > 0 or x.warmup < 0 or past_end)
        if out.flush_frames(an.clip_length) < 0:
            raise Refusal("this op drops frames at the end of the clip, which needs to know where the "
                          "clip ends (non-causal)", "do not crop frames off the end along time")
        return self._wrap(node, out)

    def _window(self, node, x: TimeInfo) -> Window | None:
        win = self.window(node, x.dim)
        if win is not None and x.merged:
            raise Refusal("a temporal window op reads an axis that merges time with other axes",
                          "keep time on an axis of its own for convolutions, pooling and slicing")
        return win

    def _wrap(self, node, info):
        return (info, None) if _is_tuple(node) else info

    def states(self, node, an):
        x = an.info(node.args[0])
        win = self._window(node, x)
        if win is None:
            return {}
        if self.covers_clip(node, x, win):
            pre = self.separable(node, x)
            return ClipWindow.states(node.args[0], x, reduced=pre[0] if pre else ())
        p = plan(win, x.warmup)
        if p.state <= 0:
            return {}
        return {"window": (frames_shape(node.args[0], x, p.state), node.args[0].meta["val"].dtype,
                           f"last {p.state} input frames of the temporal window")}

    # -- step ----------------------------------------------------------------------------------
    def step(self, node, args, kwargs, ctx):
        x_info, out_info = ctx.info(node.args[0]), _main(ctx.info(node))
        win = self._window(node, x_info)
        if win is None:
            return self.run(node, args, args[0], None)
        if out_info.kind == "clip":
            pre = self.separable(node, x_info)
            if pre is None:
                return ClipWindow.step(ctx, node, node.args[0], args[0],
                                       lambda w: self.run(node, args, w, None))
            dims, op = pre
            w = ClipWindow.frames(ctx, node, node.args[0], args[0],
                                  pre=lambda t: op(t, list(dims), True))
            # over every pooled axis, as the clip does (the others have size 1 by now), which
            # also keeps the reduced axes trailing where onnxruntime reduces fastest
            return op(w, sorted([x_info.dim, *dims]), True)
        d, p, x = x_info.dim, plan(win, x_info.warmup), args[0]
        if win.left > 0 and x_info.warmup > 0:
            # the input's warm-up frames (streamed before its offline frame 0) may come to stand
            # where this op's zero padding belongs: zero them as they arrive, so that the state,
            # like its zero initial value, only ever holds padding or real frames
            x = zero_padding_frames(ctx, x_info, x, d)
        if p.state > 0:
            buf = cat_frames(ctx.state(node, "window"), x, d)
        else:                                   # windows with gaps: skip -S frames of each chunk
            buf = x.narrow(d, min(-p.state, x.shape[d]), max(x.shape[d] + p.state, 0))
        if ctx.mode == "step":
            if p.state > 0:
                ctx.set_state(node, "window", last_frames(buf, d, p.state))
            return self._masked(node, args, buf, d, p, x_info, ctx, win)
        # flush: append this op's own end padding, emit the offline frames still missing
        missing = out_info.flush_frames(ctx.clip_length)
        need = (max(missing, 1) - 1) * win.stride + win.extent
        if buf.shape[d] < need:
            shape = list(buf.shape)
            shape[d] = need - buf.shape[d]
            buf = torch.cat([buf, buf.new_full(shape, self.pad_value(node))], d)
        out = self._masked(node, args, buf.narrow(d, 0, need), d, p, x_info, ctx, win)
        if isinstance(out, tuple):
            return (out[0].narrow(d, 0, missing),) + tuple(out[1:])
        return out.narrow(d, 0, missing)

    def _masked(self, node, args, buf, d, p, x_info, ctx, win):
        """Run on `buf` with the op's own padding frames holding what its padding holds: zero
        (the zero state, and zero_padding_frames) needs nothing more; max pooling's -inf and the
        divisor of averages are placed from the stream position. The divisor leaves out what
        the op does not count: padding without count_include_pad, and in the flush the frames
        past the end padding that a ceil_mode window reaches."""
        fill, margin = self.pad_value(node), self.counted_padding(node, win)
        divide = margin == 0 or (margin is not None and ctx.mode == "flush")
        if not (divide or (fill != 0.0 and win.left > 0)):
            return self.run_step(node, args, buf, d, ctx)   # (the flush appends its own right padding)
        rows, n = buf.shape[0], buf.shape[d]
        view = [rows] + [1] * (buf.dim() - 1)
        view[d] = n
        if fill != 0.0:
            buf = torch.where(padding_frames(ctx, x_info, -p.state, n, rows, view), fill, buf)
        out = self.run(node, args, buf, d)
        if divide:                               # the step ran without time padding: k frames
            uncounted = padding_frames(ctx, x_info, -p.state, n, rows, margin=margin)
            real = (~uncounted).to(buf.dtype).unfold(1, win.kernel, win.stride).sum(-1)
            view[d] = real.shape[1]
            out = out * (win.kernel / real).view(view)
        return out


def zero_padding_frames(ctx, x_info: TimeInfo, x: torch.Tensor, d: int) -> torch.Tensor:
    """`x` (a chunk of the value `x_info`) with its frames before offline frame 0 set to zero."""
    view = [x.shape[0]] + [1] * (x.dim() - 1)
    view[d] = x.shape[d]
    pad = padding_frames(ctx, x_info, 0, x.shape[d], x.shape[0], view)
    return torch.where(pad, 0.0, x)      # not a product: warm-up frames may hold inf


def padding_frames(ctx, x_info: TimeInfo, offset: int, n: int, rows: int, view=None,
                   margin: int = 0) -> torch.Tensor:
    """[rows, n] mask (or the same viewed as `view`) of the frames of a buffer that come more than
    `margin` frames before the value's offline frame 0 (or, in the flush, after its last); the
    buffer starts `offset` frames after the chunk's first. rows = batch * k where the model folds
    k rows per stream into axis 0."""
    pos = frame_positions(ctx, x_info.rate, n, rows, view)
    shift = offset - x_info.warmup                   # the mask is pos + shift < 0, compared as is
    pad = pos < -shift - margin
    return pad | (pos >= x_info.length - shift + margin) if ctx.mode == "flush" else pad


def frame_positions(ctx, rate, n: int, rows: int, view=None) -> torch.Tensor:
    """Positions, at `rate`, of the chunk's n frames for each of `rows` rows, shaped [rows, n] or
    `view`. Built once per step and shape, so that every mask of the step costs one comparison
    (each op is a node of the traced step)."""
    key = (rate.p, rate.q, n, str(rows), str(view))         # (sizes may be symbolic: str)
    memo = ctx.memo
    if key in memo:
        return memo[key]
    first = ctx.frames
    if rate.p != 1:
        first = first * rate.p
    if rate.q != 1:
        first = first // rate.q
    pos = first[:, None] if n == 1 else first[:, None] + torch.arange(n, device=first.device)[None, :]
    fold = rows // pos.shape[0]
    if fold > 1:
        pos = pos[:, None, :].expand(-1, fold, -1).flatten(0, 1)
    memo[key] = pos = pos.view(view) if view else pos
    return pos


def out_shape(node) -> list:
    val = node.meta["val"]
    val = val[0] if isinstance(val, (tuple, list)) else val
    return [s for s in val.shape]


def _main(info):
    return info[0] if isinstance(info, tuple) else info


def _is_tuple(node) -> bool:
    return isinstance(node.meta.get("val"), (tuple, list))


def _entry(values, j: int, default: int) -> int:
    """Entry j of an int-list argument that torch broadcasts from one value."""
    if not values:
        return default
    return int(values[j] if len(values) > 1 else values[0])


def _with(values, j: int, v, n: int) -> list:
    """Copy of an int-list argument (length 1 or n) with entry j set to v."""
    vals = list(values) if len(values) > 1 else list(values) * n
    vals[j] = v
    return vals


@register_op(aten.convolution.default, aten.conv1d.default, aten.conv2d.default, aten.conv3d.default,
             aten.conv1d.padding, aten.conv2d.padding, aten.conv3d.padding)
class Convolution(WindowRule):
    """conv1d/2d/3d: time on a spatial axis is a window; time on the batch axis is frame-local.
    Every form runs as aten.convolution with numeric padding."""

    def conv_args(self, node, args=None, kwargs=None) -> dict:
        a = bind(node.target, node.args if args is None else args, node.kwargs if kwargs is None else kwargs)
        n = node.args[1].meta["val"].dim() - 2
        a.setdefault("transposed", False)
        a.setdefault("output_padding", [0] * n)
        if isinstance(a["padding"], str):
            a["padding"] = _same_padding(a["padding"], node, n, a["dilation"])
        return a

    def transposed(self, node) -> bool:
        """aten.convolution with transposed=True: an upsampling, handed over to its own rule."""
        return bool(self.conv_args(node)["transposed"])

    def window(self, node, d):
        a = self.conv_args(node)
        if a["transposed"]:
            return _upsampling_rule().window(node, d)
        if d == 0:
            return None
        if d == 1:
            raise Refusal("convolution over an axis that holds time as channels mixes frames",
                          "pass time_dim= the axis that is time, and keep it out of the channel axis")
        j, kernel = d - 2, int(node.args[1].meta["val"].shape[d])
        pad = _entry(a["padding"], j, 0)
        return Window(kernel, _entry(a["stride"], j, 1), _entry(a["dilation"], j, 1), pad, pad)

    def covers_clip(self, node, x, win):
        return False     # pools whose kernel is the clip reduce it; a conv keeps its window

    # -- step forms (conv_forms.py; passes/choose_forms.py picks one per node) -----------------
    def geometry(self, node, d: int, frames: int = 0, state: int = 0) -> ConvGeometry:
        """The convolution along time axis d as conv_forms sees it."""
        a, w = self.conv_args(node), node.args[1].meta["val"]
        win, n = self.window(node, d), w.dim() - 2
        others = [j for j in range(n) if j != d - 2]
        pointwise = int(a["groups"]) == 1 and all(
            int(w.shape[2 + j]) == 1 and _entry(a["stride"], j, 1) == 1 and _entry(a["padding"], j, 0) == 0
            for j in others)
        return ConvGeometry(d, win.kernel, win.dilation, win.stride, int(a["groups"]),
                            int(w.shape[1]) * int(a["groups"]), int(w.shape[0]), frames, state, pointwise,
                            win.left)

    def time(self, node, an):
        if self.transposed(node):
            return _upsampling_rule().time(node, an)
        return super().time(node, an)

    def states(self, node, an):
        if self.transposed(node):
            return _upsampling_rule().states(node, an)
        form, d = form_of(node).name, an.info(node.args[0]).dim
        if form.startswith("partial"):
            out, g = _main(node.meta[META]), self.geometry(node, d)
            spec = (frames_shape(node, out, g.extent - 1), node.meta["val"].dtype,
                    f"partial sums of the next {g.extent - 1} output frames (no bias)")
        else:
            spec = super().states(node, an).get("window")
        if spec is None:
            return {}
        if form in ROWS_FORMS:
            spec = (rows_shape(spec[0], d), spec[1], spec[2] + ", as rows (frames, channels last)")
        return {"window": spec}

    def step(self, node, args, kwargs, ctx):
        if self.transposed(node):
            return _upsampling_rule().step(node, args, kwargs, ctx)
        x_info = ctx.info(node.args[0])
        form = form_of(node).name
        if self._window(node, x_info) is None:
            return super().step(node, args, kwargs, ctx)
        if form in ROWS_FORMS:
            if ctx.mode == "step":
                return self._step_rows(node, args, x_info, ctx)
            # the flush (rare) runs on the state turned back into the graph's layout
            ctx = _StateAs(ctx, node, lambda t: from_rows(t, x_info.dim))
        if not form.startswith("partial"):
            return super().step(node, args, kwargs, ctx)
        # partial sums: the new frames' tap outputs go into the pending output frames
        d, x, g = x_info.dim, args[0], self.geometry(node, x_info.dim)
        if self.window(node, d).left > 0 and x_info.warmup > 0:
            x = zero_padding_frames(ctx, x_info, x, d)      # as in WindowRule.step
        a = self.conv_args(node, args, {})
        emit = x.shape[d] if ctx.mode == "step" else _main(ctx.info(node)).flush_frames(ctx.clip_length)
        weight = self._weight(node, a, ctx, g)
        out, sums = partial(x, ctx.state(node, "window"), weight, a["bias"], a, g, emit)
        if ctx.mode == "step":
            ctx.set_state(node, "window", sums)
        return out

    def _step_rows(self, node, args, x_info: TimeInfo, ctx):
        """fold-mm and partial-mm, with the state kept as rows (conv_forms.to_rows)."""
        d, x = x_info.dim, args[0]
        g, win = self.geometry(node, d), self.window(node, d)
        if win.left > 0 and x_info.warmup > 0:
            x = zero_padding_frames(ctx, x_info, x, d)       # as in WindowRule.step
        a = self.conv_args(node, args, {})
        weight, rows = self._weight(node, a, ctx, g), to_rows(x, d)
        t = rows.dim() - 2
        if form_of(node).name == "partial-mm":
            out, sums = partial_rows(rows, ctx.state(node, "window"), weight, a["bias"], g, rows.shape[t])
            ctx.set_state(node, "window", sums)
            return from_rows(out, d)
        p = plan(win, x_info.warmup)
        if p.state > 0:
            buf = cat_frames(ctx.state(node, "window"), rows, t)
            ctx.set_state(node, "window", last_frames(buf, t, p.state))
        else:                                   # windows with gaps: skip -S frames of the chunk
            buf = rows.narrow(t, -p.state, rows.shape[t] + p.state)
        return from_rows(fold_rows(buf, weight, a["bias"], g), d)

    def run_step(self, node, args, buf, d, ctx):
        g, form = self.geometry(node, d), form_of(node).name
        if form == "mm":
            a = self.conv_args(node, args, {})
            w = self._weight(node, a, ctx, g)
            if ctx.portable:
                return channels_first_mm(buf, w, a["bias"])
            return time_pointwise(buf, w, a["bias"], a, d)
        if form != "fold" or buf.shape[d] - g.extent >= g.stride:
            return self.run(node, args, buf, d)
        # one output frame: its taps folded into the channels of a conv with one axis less
        a = self.conv_args(node, args, {})
        return fold(buf, self._weight(node, a, ctx, g), a["bias"], a, g)

    def _weight(self, node, a, ctx, g):
        """The weight prepared for the node's form: once at compile time when it is constant
        (a buffer of the graph module), else from the captured weight in the step."""
        form = form_of(node)
        if form.weight is not None:
            return getattr(ctx.module, form.weight)
        return prepare(form.name, a["weight"], g)

    def run(self, node, args, buf, d):
        a = self.conv_args(node, args, {})
        a["input"] = buf
        if d is not None:
            n = buf.dim() - 2
            a["padding"] = _with(a["padding"], d - 2, 0, n)
            dil = _entry(a["dilation"], d - 2, 1)
            kernel = int(node.args[1].meta["val"].shape[d])
            if dil > 1 and buf.shape[d] == dil * (kernel - 1) + 1:
                # one output frame: its taps are every dil-th buffered frame; an undilated conv
                # over them is the same sum and avoids CPU's slow dilated-convolution path
                a["input"] = aten.slice.Tensor(buf, d, 0, buf.shape[d], dil)
                a["dilation"] = _with(a["dilation"], d - 2, 1, n)
        return aten.convolution.default(a["input"], a["weight"], a["bias"], a["stride"], a["padding"],
                                        a["dilation"], a["transposed"], a["output_padding"], a["groups"])


def _upsampling_rule():
    """The rule of transposed convolutions (ops/upsample.py, which builds on this module)."""
    return rule_for(aten.conv_transpose1d.default)


class _StateAs:
    """A step context whose state of `node` reads through `convert` (the flush of rows forms)."""

    def __init__(self, ctx, node, convert):
        self._ctx, self._node, self._convert = ctx, node, convert

    def __getattr__(self, name):
        return getattr(self._ctx, name)

    def state(self, node, key):
        t = self._ctx.state(node, key)
        return self._convert(t) if node is self._node else t


def _same_padding(mode: str, node, n: int, dilation) -> list:
    """Numeric padding of padding='valid'/'same' (symmetric only; torch pads 'same' with even
    extents more on the right, which a per-axis padding cannot say)."""
    if mode == "valid":
        return [0] * n
    kernel = list(node.args[1].meta["val"].shape[2:])
    ext = [_entry(dilation, j, 1) * (int(kernel[j]) - 1) for j in range(n)]
    if any(e % 2 for e in ext):
        raise Refusal("padding='same' with an even kernel extent pads unevenly",
                      "use an odd kernel, or explicit F.pad + padding=0")
    return [e // 2 for e in ext]


class Pool(WindowRule):
    """avg/max pooling: the last len(kernel) axes are pooled."""

    def arg(self, node, name):
        return bind(node.target, node.args, node.kwargs).get(name)

    def window(self, node, d):
        kernel = list(self.arg(node, "kernel_size"))
        j = d - (node.args[0].meta["val"].dim() - len(kernel))
        if j < 0:
            return None
        stride = list(self.arg(node, "stride") or []) or kernel
        dil = list(self.arg(node, "dilation") or [1])
        pad = _entry(self.arg(node, "padding"), j, 0)
        return Window(_entry(kernel, j, 1), _entry(stride, j, 1), _entry(dil, j, 1), pad, pad)

    def separable(self, node, x):
        """Pooling whose kernel covers every pooled axis whole, without padding, is a mean (max)
        over them: the axes other than time are reduced per frame."""
        shape, kernel = list(node.args[0].meta["val"].shape), list(self.arg(node, "kernel_size"))
        pooled = list(range(len(shape) - len(kernel), len(shape)))
        whole = all(_entry(kernel, j, 1) == shape[a] for j, a in enumerate(pooled))
        if (not whole or _is_tuple(node) or x.merged or x.dim not in pooled
                or stream_axis(node.args[0])
                or any(self.arg(node, "padding") or [0]) or self.arg(node, "divisor_override")
                or any(d != 1 for d in (self.arg(node, "dilation") or [1]))):
            return None
        others = tuple(a for a in pooled if a != x.dim)
        return (others, self.reduce) if others else None

    def run(self, node, args, buf, d):
        values = bind(node.target, args, {})
        values["self"] = buf
        nk = len(values["kernel_size"])
        # full-length lists: exporters copy one-element lists literally (ONNX wants one per axis)
        values["stride"] = list(values["stride"]) or list(values["kernel_size"])
        for key in ("stride", "padding", "dilation"):
            if key in values and len(values[key]) == 1:
                values[key] = list(values[key]) * nk
        if d is None:
            return call(node.target, values)
        values["padding"] = _with(values["padding"], d - (buf.dim() - nk), 0, nk)
        out = call(node.target, values)
        if not values.get("ceil_mode"):
            return out
        # ceil_mode may add a window that runs past the buffer: only whole windows are final
        # here (the flush pads the buffer so that its last, partial window is whole)
        win = self.window(node, d)
        whole = (buf.shape[d] - win.extent) // win.stride + 1
        if isinstance(out, tuple):
            return tuple(o.narrow(d, 0, whole) for o in out)
        return out.narrow(d, 0, whole)


@register_op(aten.avg_pool1d.default, aten.avg_pool2d.default, aten.avg_pool3d.default)
class AvgPool(Pool):
    reduce = aten.mean.dim

    def counted_padding(self, node, win):
        """torch divides by the frames a window covers, counting the padding (not the frames a
        ceil_mode window reaches past it) with count_include_pad, else only real frames."""
        if self.arg(node, "divisor_override") is not None:
            return None
        return win.left if self.arg(node, "count_include_pad") else 0

    def frame_mean(self, node, x):
        """A pool over exactly the clip's frames (no padding along time, no divisor override):
        on one frame, the same pool with kernel and stride 1 along time."""
        win = self._window(node, x)
        if (win is None or _is_tuple(node) or not self.covers_clip(node, x, win) or win.left or win.right
                or win.extent != x.length or win.dilation != 1 or self.arg(node, "divisor_override")):
            return None
        kernel = list(self.arg(node, "kernel_size"))
        j = x.dim - (node.args[0].meta["val"].dim() - len(kernel))

        def one(frame, args, kwargs):
            values = bind(node.target, args, kwargs)
            values["self"] = frame
            values["kernel_size"] = _with(kernel, j, 1, len(kernel))
            values["stride"] = _with(list(values["stride"]) or kernel, j, 1, len(kernel))
            return call(node.target, values)
        return one


@register_op(aten.max_pool1d.default, aten.max_pool2d.default, aten.max_pool3d.default,
             aten.max_pool2d_with_indices.default, aten.max_pool3d_with_indices.default)
class MaxPool(Pool):
    reduce = aten.amax.default

    def pad_value(self, node):
        return float("-inf")

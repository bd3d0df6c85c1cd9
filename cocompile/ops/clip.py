"""Clip reductions: ops that consume the whole time axis (mean/sum/amax over time, pooling whose
kernel is the clip, adaptive pooling to one frame, selecting a frame).

Streaming form: the op keeps the last L frames of its input (L = the input's offline length) and
runs unchanged on that window every step. After the flush the window holds exactly the offline
frames, so the result equals the offline one (E1); without padding, it equals the model on the last
T input frames (E2). Nothing is accumulated across steps, so nothing drifts (E3).
"""
from __future__ import annotations

import math
import weakref

import torch

from ..errors import Refusal
from ..timeinfo import CLIP, META, WINDOW, TimeInfo
from .frames import cat_frames, frames_shape, last_frames, merge_time, split_time, stream_axis, symbolic_shape
from .registry import OpRule, register_op
from .schema import bind

aten = torch.ops.aten


class ClipWindow:
    """The sliding window over the last L frames of one input (shared by every clip reduction,
    and by attention over time, whose keys and values it caches)."""

    @staticmethod
    def time(an, arg) -> TimeInfo:
        w = ClipWindow.window(an, arg)
        return TimeInfo(CLIP, ready=w.ready, rf=w.rf, padded=w.padded, approx=w.approx,
                        horizon=w.horizon, recurrent=w.recurrent)

    @staticmethod
    def window(an, arg) -> TimeInfo:
        """The input as a window value: all its L offline frames, re-formed every step."""
        x = an.info(arg)
        if x.merged and not isinstance(x.outer, int):
            raise Refusal("a reduction over time reads an axis that merges time with the batch",
                          "keep the batch axis separate from time before reducing over time")
        return x.replace(kind=WINDOW, ready=math.ceil((x.warmup + x.length) / x.rate),
                         rf=int(x.rf + (x.length - 1) / x.rate))

    @staticmethod
    def states(arg, x: TimeInfo, key: str = "clip", frames: int | None = None,
               reduced: tuple = ()) -> dict:
        n = x.length if frames is None else frames
        shape = list(frames_shape(arg, x, n, stream_axis(arg)))
        for a in reduced:                        # reduced per frame before buffering: size 1
            shape[a] = 1
        return {key: (tuple(shape), arg.meta["val"].dtype,
                      f"last {n} frames of {arg.name}, read as a whole each step")}

    @staticmethod
    def frames(ctx, node, arg, x, key: str = "clip", frames: int | None = None, pre=None):
        """The last L frames of `arg` after this step's chunk `x` (the state is updated); L is
        the value's clip length unless `frames` says fewer are read. `pre` reduces each chunk
        over axes other than time (keeping them) before it is buffered."""
        info, axis = ctx.info(arg), stream_axis(arg)
        x = x if pre is None else pre(x)
        xu, t = split_time(x, info, ctx.batch)
        wu, _ = split_time(ctx.state(node, key).movedim(0, axis), info, ctx.batch)
        n = info.length if frames is None else frames
        window = merge_time(last_frames(cat_frames(wu, xu, t), t, n), info)
        if ctx.mode == "step":
            ctx.set_state(node, key, window.movedim(axis, 0))   # states keep the stream first
        return window

    @staticmethod
    def step(ctx, node, arg, x, run):
        return run(ClipWindow.frames(ctx, node, arg, x))


def _same_op(node):
    """`frame_mean`'s one-frame form of an op that already averages a one-frame chunk as wanted."""
    return lambda frame, args, kwargs: node.target(frame, *args[1:], **kwargs)


SEPARABLE = {aten.mean.dim: aten.mean.dim, aten.sum.dim_IntList: aten.sum.dim_IntList,
             aten.amax.default: aten.amax.default, aten.amin.default: aten.amin.default}


@register_op(aten.mean.dim, aten.sum.dim_IntList, aten.amax.default, aten.amin.default,
             aten.logsumexp.default, aten.any.dims, aten.var.correction, aten.std.correction,
             aten.max.dim, aten.min.dim, aten.argmax.default, aten.argmin.default,
             aten.prod.dim_int, aten.any.dim, aten.all.dim, aten.mean.default, aten.sum.default,
             aten.max.default, aten.min.default)
class Reduction(OpRule):
    """An op over some axes ("dim" in its schema; none given: all); over time it is a clip
    reduction, otherwise frame-local."""

    def axes(self, node) -> list[int] | None:
        dims = bind(node.target, node.args, node.kwargs).get("dim")
        if dims is None or dims == []:
            return None
        return [dims] if isinstance(dims, int) else list(dims)

    def keepdim(self, node) -> bool:
        return bool(bind(node.target, node.args, node.kwargs).get("keepdim", False))

    def _over_time(self, node, x: TimeInfo) -> bool:
        axes, ndim = self.axes(node), node.args[0].meta["val"].dim()
        return axes is None or x.dim in [a % ndim for a in axes]

    def time(self, node, an):
        x = an.info(node.args[0])
        if self._over_time(node, x):
            out = ClipWindow.time(an, node.args[0])
        else:
            ndim = node.args[0].meta["val"].dim()
            gone = 0 if self.keepdim(node) else sum(a % ndim < x.dim for a in self.axes(node))
            out = x.moved(x.dim - gone)
        return (out, out) if isinstance(node.meta["val"], (tuple, list)) else out   # (values, indices)

    def _pre(self, node, x: TimeInfo) -> tuple:
        """Axes other than time that a mean/sum/amax/amin over time and them can reduce per
        frame, before buffering (mean of means over equal counts is the mean): the window then
        holds one value per frame instead of a whole frame."""
        axes, ndim = self.axes(node), node.args[0].meta["val"].dim()
        if node.target not in SEPARABLE or axes is None or x.merged or stream_axis(node.args[0]):
            return ()
        return tuple(sorted({a % ndim for a in axes} - {x.dim}))

    def states(self, node, an):
        x = an.info(node.args[0])
        if not self._over_time(node, x):
            return {}
        return ClipWindow.states(node.args[0], x, reduced=self._pre(node, x))

    def frame_mean(self, node, x):
        if node.target is aten.mean.dim and self._over_time(node, x) and not x.merged:
            return _same_op(node)
        return None

    def step(self, node, args, kwargs, ctx):
        x = ctx.info(node.args[0])
        if not self._over_time(node, x):
            return node.target(*args, **kwargs)
        dims, op = self._pre(node, x), SEPARABLE.get(node.target)
        pre = (lambda t: op(t, list(dims), True)) if dims else None
        w = ClipWindow.frames(ctx, node, node.args[0], args[0], pre=pre)
        return node.target(w, *args[1:], **kwargs)     # over size-1 axes: the identity


@register_op(aten.select.int)
class Select(Reduction):
    """Picking one frame out of the clip (`x[:, -1]`) keeps only the frames from it to the end
    (one, for the newest); other axes are frame-local."""

    def axes(self, node):
        return [node.args[1]]

    def _keep(self, node, x: TimeInfo) -> int | None:
        return None if x.merged else x.length - node.args[2] % x.length

    def time(self, node, an):
        out = super().time(node, an)
        x = an.info(node.args[0])
        keep = self._keep(node, x) if self._over_time(node, x) else None
        return out if keep is None else out.replace(rf=int(x.rf + (keep - 1) / x.rate))

    def states(self, node, an):
        x = an.info(node.args[0])
        if not self._over_time(node, x):
            return {}
        return ClipWindow.states(node.args[0], x, frames=self._keep(node, x))

    def step(self, node, args, kwargs, ctx):
        x = ctx.info(node.args[0])
        if not self._over_time(node, x):
            return node.target(*args, **kwargs)
        keep = self._keep(node, x)
        w = ClipWindow.frames(ctx, node, node.args[0], args[0], frames=keep)
        return aten.select.int(w, args[1], args[2] if keep is None else 0)


@register_op(aten.index_select.default)
class IndexSelect(Reduction):
    def axes(self, node):
        return [node.args[1]]

    def time(self, node, an):
        x = an.info(node.args[0])
        return ClipWindow.time(an, node.args[0]) if self._over_time(node, x) else x

    def step(self, node, args, kwargs, ctx):
        if not self._over_time(node, ctx.info(node.args[0])):
            return node.target(*args, **kwargs)
        return ClipWindow.step(ctx, node, node.args[0], args[0],
                               lambda w: node.target(w, *args[1:]))


class AdaptivePool(OpRule):
    """Adaptive pooling: to one frame along time it is a clip reduction; keeping every frame it is
    frame-local; any other output length depends on the clip length and is refused."""

    def _time_out(self, node, x):
        sizes = list(node.args[1])
        j = x.dim - (node.args[0].meta["val"].dim() - len(sizes))
        return None if j < 0 else sizes[j]

    def time(self, node, an):
        x = an.info(node.args[0])
        n = self._time_out(node, x)
        if n == x.length == 1 and not x.merged:
            # pooling one frame to one: frame-local, or the reduction of longer clips to one frame
            an.doubt("adaptive pooling of a single frame")
            grown = an.grown(node)
            if grown is not None and x.dim not in (grown[0] if isinstance(grown, tuple) else grown):
                return self._wrap(node, ClipWindow.time(an, node.args[0]))
        if n is None or (n == x.length and not x.merged):
            out = an.aligned(node.args[0], max(x.warmup, 0))
        elif n == 1:
            out = ClipWindow.time(an, node.args[0])
        else:
            raise Refusal(f"adaptive pooling of {x.length} frames to {n} depends on the clip length",
                          "pool to 1 frame (a clip reduction) or use a fixed kernel and stride")
        return self._wrap(node, out)

    @staticmethod
    def _wrap(node, out):
        return (out, None) if isinstance(node.meta["val"], (tuple, list)) else out

    @staticmethod
    def _reduces(node) -> bool:
        """Whether the analysis made this pool a reduction over the clip (not frame-local)."""
        info = node.meta[META]
        return (info[0] if isinstance(info, tuple) else info).kind == CLIP

    def states(self, node, an):
        return ClipWindow.states(node.args[0], an.info(node.args[0])) if self._reduces(node) else {}

    def frame_mean(self, node, x):
        if node.target in AVERAGES and self._reduces(node) and not x.merged:
            return _same_op(node)
        return None

    def step(self, node, args, kwargs, ctx):
        if self._reduces(node):
            return ClipWindow.step(ctx, node, node.args[0], args[0], lambda w: node.target(w, *args[1:]))
        return node.target(*args, **kwargs)


AVERAGES = (aten._adaptive_avg_pool2d.default, aten._adaptive_avg_pool3d.default,
            aten.adaptive_avg_pool1d.default, aten.adaptive_avg_pool2d.default,
            aten.adaptive_avg_pool3d.default)
register_op(*AVERAGES, aten.adaptive_max_pool1d.default, aten.adaptive_max_pool2d.default,
            aten.adaptive_max_pool3d.default)(AdaptivePool)


# -- affine ops moved before a mean over the clip (passes/hoist_affine_tail.py) ---------------------
class AffineTail(torch.nn.Module):
    """`ops(mean(x))` where `mean` averages every frame of x and `ops` (an fx graph of the captured
    ops that followed it: reshapes, means over other axes, convs, linears, constant scales and
    shifts) is affine, so that it equals the mean over frames of `ops(mean(frame))`."""

    def __init__(self, mean, one_frame, ops: torch.fx.GraphModule, describe: str):
        super().__init__()
        self.mean, self.one_frame, self.ops, self.describe = mean, one_frame, ops, describe

    def forward(self, x, *ext):
        """Offline meaning: the captured ops in their order."""
        return self.ops(self.mean(x), *ext)

    def per_frame(self, frame, ext):
        return self.ops(self.one_frame(frame), *ext)


# name -> AffineTail, for running a graph as a plain function (the offline FLOP count); the graph
# that reads one holds it as a submodule of that name, which keeps it alive, and the step rules
# fetch it there (names are unique in the process)
TAILS: "weakref.WeakValueDictionary[str, AffineTail]" = weakref.WeakValueDictionary()


def mean_of_tail(x: torch.Tensor, tail: str, *ext) -> torch.Tensor:
    """The graph node of the AffineTail that the graph holds as submodule `tail`; `ext` are the
    values its ops read besides the mean (constants)."""
    return TAILS[tail](x, *ext)


@register_op(mean_of_tail)
class MeanOfTail(OpRule):
    """Streaming form: the ops run on each new frame's own mean (same shape as the clip's mean),
    and the window keeps their result for the last L frames, less the ops' value at a zero frame
    (the linear part); the output is its mean over them plus that value.
    Exact like any clip reduction (E1/E2: the window holds the offline frames; E3: nothing is
    accumulated), and smaller when the ops map a frame to fewer values (a classifier's scores
    instead of the pooled features)."""

    def time(self, node, an):
        return ClipWindow.time(an, node.args[0])

    def states(self, node, an):
        x, shape = an.info(node.args[0]), symbolic_shape(node)
        tail = an.gm.get_submodule(node.args[1])
        return {"clip": ((shape[0], x.length, *shape[1:]), node.meta["val"].dtype,
                         f"the ops {tail.describe} on each of the last {x.length} frames of "
                         f"{node.args[0].name} (less their value at a zero frame); averaged each "
                         "step")}

    def step(self, node, args, kwargs, ctx):
        x, tail, ext = args[0], ctx.module.get_submodule(args[1]), args[2:]
        info = ctx.info(node.args[0])
        state = ctx.state(node, "clip")
        # the ops' value at a zero frame (their constant part) is kept out of the window, so that
        # its zero state still stands for frames of zeros, as the window of the mean's input does
        # (approximate mode reads the window before it is full)
        zero = tail.per_frame(x.new_zeros([1 if a == info.dim else n for a, n in enumerate(x.shape)]), ext)
        frames = [tail.per_frame(x.narrow(info.dim, i, 1), ext) - zero for i in range(x.shape[info.dim])]
        new = torch.stack(frames, 1) if frames else state[:, :0]
        window = last_frames(cat_frames(state, new, 1), 1, info.length)
        if ctx.mode == "step":
            ctx.set_state(node, "clip", window)
        return window.mean(1) + zero

"""Normalisations: batch norm, group norm, instance norm, layer norm, RMS norm.

A norm whose reduced axes leave time out is frame-local. One whose reduced axes include time makes
every frame depend on the whole clip: refused, or with `approximate=True` computed from statistics
over a causal window of the last L frames of its input (L = the input's clip length):

  * per frame (and group) the mean and the variance over the other reduced axes (RMS norm: the
    mean square) enter a window state of the last L frames (`mean`, `var`): small, and re-formed
    each step, so nothing is accumulated across steps and nothing drifts (E3);
  * the real frames of the window (not the zero state at a stream's start, not warm-up frames:
    their positions come from the frame counter) combine as equal-sized parts do: the mean is
    the mean of the means, the variance the mean of the variances plus the mean squared deviation
    of the means from it;
  * the step's frames are normalised with these statistics (the frames of one step share them)
    and get the op's affine as offline.
At the flush the window holds exactly the clip, so the frames normalised there use the offline
statistics; frames of earlier steps saw only the frames up to their step: the approximation.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from ..errors import Refusal
from ..timeinfo import TimeInfo
from .frames import cat_frames, last_frames, stream_axis, symbolic_shape
from .registry import OpRule, register_op
from .schema import bind
from .window import frame_positions

aten = torch.ops.aten


@dataclass(frozen=True)
class Layout:
    """The input as the norm reduces it: with `groups`, channels (axis 1) viewed as (groups,
    channels per group); `time` and the `other` reduced axes, and the `stream` axis, in that view."""

    groups: int
    time: int
    other: tuple[int, ...]
    stream: int


class Norm(OpRule):
    """x normalised over `reduced(node, ndim)` axes (mean, biased variance, eps), then an affine.
    Subclasses name the axes, the groups and the affine; this class decides frame-local / refused
    / causal window, and runs the window form."""

    what = "norm"

    def args(self, node, args=None, kwargs=None) -> dict:
        return bind(node.target, node.args if args is None else args,
                    node.kwargs if kwargs is None else kwargs)

    def reduced(self, node, ndim: int) -> set[int]:
        raise NotImplementedError

    def groups(self, node) -> int:
        """Groups of channels normalised apart (0: channels are not split)."""
        return 0

    def affine(self, node, a: dict, y: torch.Tensor, ctx, info: TimeInfo) -> torch.Tensor:
        """y * weight + bias over the channel axis (None: left out)."""
        shape = [-1] + [1] * (y.dim() - 2)
        if a.get("weight") is not None:
            y = y * a["weight"].view(shape)
        return y if a.get("bias") is None else y + a["bias"].view(shape)

    def check(self, node, x: TimeInfo) -> None:
        """Refuse time on the channel axis: per-channel statistics or weights would then be
        per clip position."""
        if x.dim == 1:
            raise Refusal(f"{self.what} treats axis 1 as channels, which holds time here, so each "
                          "clip position would be normalised differently (time-position "
                          "parameters)", "keep time out of the channel axis (e.g. view as (N, C, T), "
                          "not (N, T, C) or (N, C*T))")

    def over_time(self, node, x: TimeInfo) -> bool:
        return x.is_time and x.dim in self.reduced(node, node.args[0].meta["val"].dim())

    # -- analysis ------------------------------------------------------------------------------
    def time(self, node, an):
        x = an.info(node.args[0])
        self.check(node, x)
        if not self.over_time(node, x):
            return _outputs(node, x)
        self._check_window(node, x, an.approximate)
        # the window reaches L-1 frames back; the output is marked approximate
        return _outputs(node, x.replace(approx=True, rf=int(x.rf + (x.length - 1) / x.rate)))

    def _check_window(self, node, x: TimeInfo, approximate: bool) -> None:
        arg = node.args[0]
        if stream_axis(arg) in self.reduced(node, arg.meta["val"].dim()):
            raise Refusal(f"{self.what} normalises over the batch axis, so each stream's output "
                          "would depend on the other streams",
                          "use running statistics (BatchNorm with track_running_stats=True) or "
                          "a norm per sample (GroupNorm, LayerNorm)")
        if not approximate:
            raise Refusal(f"{self.what} over axes that include time: every frame's output depends "
                          "on the whole clip",
                          f"compile with approximate=True for statistics over a causal window of "
                          f"the last {x.length} frames (reported as approximate), or normalise per "
                          "frame (over channels or features only)")
        if x.merged:
            raise Refusal(f"{self.what} over an axis that merges time with other axes",
                          "keep time on an axis of its own before the norm")

    def layout(self, node, x: TimeInfo) -> Layout:
        ndim, g = node.args[0].meta["val"].dim(), self.groups(node)
        into = (lambda a: a + 1 if a >= 2 else a) if g else (lambda a: a)
        # with groups, the channel axis is reduced within a group: axis 2 of the view
        other = {into(a) for a in self.reduced(node, ndim) - {x.dim} - ({1} if g else set())}
        other |= {2} if g else set()
        shape = self.view_shape(node, g)
        return Layout(g, into(x.dim), tuple(sorted(a for a in other if shape[a] != 1)),
                      into(stream_axis(node.args[0])))

    def view_shape(self, node, groups: int) -> list:
        shape = list(symbolic_shape(node.args[0]))
        if groups:
            shape[1:2] = [groups, shape[1] // groups]
        return shape

    def states(self, node, an):
        x = an.info(node.args[0])
        if not self.over_time(node, x):
            return {}
        lay = self.layout(node, x)
        shape = self.view_shape(node, lay.groups)
        for a in lay.other:
            shape[a] = 1
        shape[lay.time] = x.length
        shape.insert(0, shape.pop(lay.stream))       # states keep the stream first
        dtype, name = node.args[0].meta["val"].dtype, node.args[0].name
        return {key: (tuple(shape), dtype, f"{_STATS[key]} of each of the last {x.length} frames of "
                      f"{name} over the {self.what}'s other axes; combined each step")
                for key in self.keys(lay)}

    def keys(self, lay: Layout) -> tuple[str, ...]:
        """The per-frame statistics kept; one value per frame (no other axis) has no variance."""
        return ("mean", "var") if lay.other else ("mean",)

    # -- step ----------------------------------------------------------------------------------
    def step(self, node, args, kwargs, ctx):
        info = ctx.info(node.args[0])
        if not self.over_time(node, info):
            return self.frame_local(node, args, kwargs)
        a, lay, x = self.args(node, args, kwargs), self.layout(node, info), args[0]
        xv = x.unflatten(1, (lay.groups, -1)) if lay.groups else x
        y = self.normalise(ctx, node, xv, lay, info, self.eps(a, x))
        y = self.affine(node, a, y.flatten(1, 2) if lay.groups else y, ctx, info)
        return _outputs(node, y, y.new_zeros(0))

    def eps(self, a: dict, x: torch.Tensor) -> float:
        return a["eps"]

    def normalise(self, ctx, node, xv, lay: Layout, info: TimeInfo, eps: float) -> torch.Tensor:
        """xv less the window's mean, over its standard deviation."""
        m = xv.mean(lay.other, keepdim=True) if lay.other else xv
        mw, vw = _window(ctx, node, "mean", m, lay, info), None
        if lay.other:
            vw = _window(ctx, node, "var", (xv - m).square().mean(lay.other, keepdim=True), lay, info)
        real, k = _real(ctx, info, mw, lay, xv.shape[lay.time])
        mean = _mean(mw, real, k, lay.time)
        # equal counts per frame: Var[x] = E[v] + E[(m - E[x])^2] over the frames
        dev = (mw - mean).square()
        var = _mean(dev if vw is None else vw + dev, real, k, lay.time)
        return (xv - mean) * torch.rsqrt(var + eps)

    def frame_local(self, node, args, kwargs):
        return node.target(*args, **kwargs)


_STATS = {"mean": "mean", "var": "variance", "square": "mean square"}


def _outputs(node, x, rest=None):
    """The op's output: x, or a tuple led by x whose other entries (statistics) are `rest`."""
    val = node.meta["val"]
    return (x,) + (rest,) * (len(val) - 1) if isinstance(val, (tuple, list)) else x


def _window(ctx, node, key: str, new: torch.Tensor, lay: Layout, info: TimeInfo) -> torch.Tensor:
    """The per-frame statistic `key` of the last L frames, this step's included (state updated)."""
    state = ctx.state(node, key)
    state = state.movedim(0, lay.stream) if lay.stream else state
    w = last_frames(cat_frames(state, new, lay.time), lay.time, info.length)
    if ctx.mode == "step":
        ctx.set_state(node, key, w.movedim(lay.stream, 0) if lay.stream else w)
    return w


def _real(ctx, info: TimeInfo, w: torch.Tensor, lay: Layout, chunk: int):
    """(mask, count) of the window's frames that are offline frames of the value (not the zero
    state, not warm-up), shaped to broadcast against the window `w`, whose last `chunk` frames
    are the step's. The count is at least 1, so that warm-up outputs stay finite."""
    view = [1] * w.dim()
    view[lay.stream], view[lay.time] = w.shape[lay.stream], w.shape[lay.time]
    pos = frame_positions(ctx, info.rate, w.shape[lay.time], w.shape[lay.stream], view)
    real = pos >= info.warmup + w.shape[lay.time] - chunk    # positions count from the chunk's first
    return real, real.sum(lay.time, keepdim=True).clamp_min(1)


def _mean(w: torch.Tensor, real: torch.Tensor, k: torch.Tensor, t: int) -> torch.Tensor:
    """Mean of the window's real frames (k of them) along t; the others may hold anything."""
    return torch.where(real, w, 0.0).sum(t, keepdim=True) / k


@register_op(aten._native_batch_norm_legit_no_training.default, aten.batch_norm.default,
             aten._native_batch_norm_legit.default, aten._native_batch_norm_legit.no_stats,
             aten.native_batch_norm.default)
class BatchNorm(Norm):
    """Eval batch norm (running statistics): frame-local. With batch statistics (training=True:
    BatchNorm(track_running_stats=False), or an instance norm decomposed into one over
    (1, N*C, ...)) it reduces every axis but the channels."""

    what = "batch norm with batch statistics"

    def reduced(self, node, ndim):
        return set(range(ndim)) - {1} if self.args(node).get("training") else set()

    def check(self, node, x):
        if x.dim == 1:
            raise Refusal("batch norm over channels that hold time normalises each clip position "
                          "differently (time-position parameters)",
                          "keep time out of the channel axis (e.g. view as (N, C, T) not (N, C*T))")


@register_op(aten.instance_norm.default)
class InstanceNorm(Norm):
    """Per sample and channel over the spatial axes (running statistics instead: frame-local)."""

    what = "instance norm"

    def reduced(self, node, ndim):
        return set(range(2, ndim)) if self.args(node)["use_input_stats"] else set()


@register_op(aten.group_norm.default, aten.native_group_norm.default)
class GroupNorm(Norm):
    """Per sample and group of channels over the group's channels and the spatial axes."""

    what = "group norm"

    def reduced(self, node, ndim):
        return set(range(1, ndim))

    def groups(self, node):
        a = self.args(node)
        return a["num_groups"] if "num_groups" in a else a["group"]

    def frame_local(self, node, args, kwargs):
        """As group_norm: native_group_norm's sizes were captured for the whole clip."""
        a = self.args(node, args, kwargs)
        y = aten.group_norm(args[0], self.groups(node), a["weight"], a["bias"], a["eps"])
        return _outputs(node, y, y.new_zeros(0))


@register_op(aten.layer_norm.default, aten.native_layer_norm.default)
class LayerNorm(Norm):
    """Over the trailing `normalized_shape` axes, with an elementwise affine of that shape."""

    what = "layer norm"

    def reduced(self, node, ndim):
        return set(range(ndim - len(self.args(node)["normalized_shape"]), ndim))

    def check(self, node, x):
        a = self.args(node)
        if (self.over_time(node, x) and stream_axis(node.args[0]) != 0
                and (a.get("weight") is not None or a.get("bias") is not None)):
            raise Refusal("layer norm with an affine over time on a value whose batch is not axis 0",
                          "keep the batch on axis 0")

    def affine(self, node, a, y, ctx, info):
        """Weight and bias indexed by time (normalized_shape includes it): each frame takes the
        entry of its place among the window's real frames (its offline frame until the window is
        full, as offline at the flush; its place among the last L frames after)."""
        w, b = a.get("weight"), a.get("bias")
        if w is None and b is None:
            return y
        j = info.dim - (y.dim() - len(a["normalized_shape"]))
        at = _window_places(ctx, info, y.shape[info.dim], y.shape[0])
        if w is not None:
            y = y * _at(w, j, at, y.dim())
        return y if b is None else y + _at(b, j, at, y.dim())


def _window_places(ctx, info: TimeInfo, n: int, rows: int) -> torch.Tensor:
    """[rows, n]: the place of each of the step's n frames among the window's real frames."""
    pos = frame_positions(ctx, info.rate, n, rows) - info.warmup      # offline frame
    first = (pos[:, -1:] - (info.length - 1)).clamp_min(0)           # the window's first real one
    return (pos - first).clamp(0, info.length - 1)                    # (warm-up frames: place 0)


def _at(p: torch.Tensor, j: int, at: torch.Tensor, ndim: int) -> torch.Tensor:
    """The parameter `p` (time on its axis j) at places `at` [rows, n], shaped to broadcast
    against the chunk (ndim axes, rows on axis 0, the parameter's axes trailing)."""
    picked = p.movedim(j, 0)[at].movedim(1, 1 + j)                  # [rows, *p with n on j]
    return picked.view([at.shape[0]] + [1] * (ndim - p.dim() - 1) + list(picked.shape[1:]))


@register_op(aten.rms_norm.default)
class RmsNorm(LayerNorm):
    """x over the root mean square of the trailing `normalized_shape` axes (no centring), with an
    elementwise weight; eps None: the dtype's machine epsilon."""

    what = "rms norm"

    def eps(self, a, x):
        return torch.finfo(x.dtype).eps if a["eps"] is None else a["eps"]

    def keys(self, lay):
        return ("square",)

    def normalise(self, ctx, node, xv, lay, info, eps):
        sq = xv.square()
        w = _window(ctx, node, "square", sq.mean(lay.other, keepdim=True) if lay.other else sq, lay, info)
        real, k = _real(ctx, info, w, lay, xv.shape[lay.time])
        return xv * torch.rsqrt(_mean(w, real, k, lay.time) + eps)

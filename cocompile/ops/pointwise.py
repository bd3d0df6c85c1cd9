"""Pointwise ops and joins (add, mul, sub, where, cat, stack, ...).

A join lines its time inputs up frame by frame: each input is delayed to the largest warm-up among
them (a FIFO whose zero state is the start of the stream). Inputs at different rates are an error.
A constant with one entry per clip frame cannot be streamed (time-position constant). A clip-level
value broadcast back onto frames (squeeze-excitation) is non-causal: refused, or with
`approximate=True` the causal window of the last T frames stands in for the clip.
"""
from __future__ import annotations

import torch

from ..errors import Refusal
from ..timeinfo import CLIP, TimeInfo
from .registry import OpRule, register_op

aten = torch.ops.aten


def join(an, node, args: list, out_dim_of, contracted=()) -> TimeInfo:
    """TimeInfo of a join's output; `out_dim_of(arg, info)` maps an input's time axis to the output.
    `contracted` operands (of a matrix product) are not broadcast, so only their kind matters."""
    infos = [(a, an.info(a)) for a in args]
    times = [(a, i) for a, i in infos if i.is_time]
    first = times[0][1]
    dims = {out_dim_of(a, i) for a, i in times}
    if len(dims) > 1 or any((i.outer, i.inner, i.length) != (first.outer, first.inner, first.length)
                            for _, i in times):
        if all(i.length == 1 for _, i in times):
            raise Refusal("a single frame of the example clip reaches this join, so the views before "
                          "it cannot tell its time axis from their other axes of size 1 (the "
                          "branches place it on different axes)",
                          "compile with a longer example clip, so that 2 or more frames reach every op")
        raise Refusal("the inputs of this join carry time on different axes or with different "
                      "lengths", "make both branches produce the same frames in the same layout")
    if len({i.rate for _, i in times}) > 1:
        rates = ", ".join(str(i.rate) for _, i in times)          # 1/2 downsampled, 2 upsampled
        raise Refusal(f"the inputs of this join run at different frame rates ({rates} frames per "
                      "input frame)",
                      "give both branches the same cumulative temporal stride")
    k = dims.pop()
    positional = [a for a, i in infos if not i.is_time and a not in contracted
                  and _size_at(a, node, k) != 1]
    if positional:
        return _by_position(an, node, times, positional, k)
    clips = [i for _, i in infos if i.kind == CLIP]
    if clips and not an.approximate:
        raise Refusal("a value reduced over the whole clip is broadcast back onto its frames "
                      "(e.g. squeeze-excitation); each frame would depend on future frames",
                      "compile with approximate=True to use a causal window of the last T frames "
                      "(reported as approximate), or remove the clip-level gating")
    warmup = max(i.warmup for _, i in times)
    for a, _ in times:
        an.aligned(a, warmup)
    return first.replace(dim=k, warmup=warmup, rf=max(i.rf for _, i in times + [(None, c) for c in clips]),
                         padded=any(i.padded for _, i in infos), approx=bool(clips) or any(i.approx for _, i in infos),
                         horizon=max(i.horizon for _, i in infos),
                         recurrent=any(i.recurrent for _, i in infos))


def _by_position(an, node, times, positional, k) -> TimeInfo:
    """A constant with one entry per clip position (a position encoding), or a per-step value
    that kept its positions, is combined with the frames: each frame's term changes as the window
    slides, so the join (and what follows) is computed on the whole window each step, from cached
    frames. Exact for the sliding window (E2)."""
    first = times[0][1]
    entries = first.outer * first.length * first.inner       # time may be merged (T*H*W tokens)
    if any(_size_at(a, node, k) != entries for a in positional):
        raise Refusal("a constant indexed along the time axis does not have one entry per frame "
                      "of the clip (time-position constant)",
                      "make the constant the same for every frame, or one entry per clip frame")
    windows = [an.convert(a, "window") for a, _ in times]
    return windows[0].replace(dim=k, ready=max(w.ready for w in windows),
                              rf=max(w.rf for w in windows),
                              padded=any(w.padded for w in windows),
                              recurrent=any(w.recurrent for w in windows))


def _size_at(arg, node, k: int) -> int:
    """Size of a non-time operand along output axis k after broadcasting (1 if it has no such axis)."""
    if not isinstance(arg, torch.fx.Node) or not isinstance(arg.meta.get("val"), torch.Tensor):
        return 1
    shape = arg.meta["val"].shape
    j = k - (node.meta["val"].dim() - len(shape))
    return 1 if j < 0 else int(shape[j])


def _broadcast_dim(node):
    def out_dim(arg, info):
        return info.dim + node.meta["val"].dim() - arg.meta["val"].dim()
    return out_dim


def _tensor_args(node):
    return [a for a in list(node.args) + list(node.kwargs.values()) if isinstance(a, torch.fx.Node)]


@register_op("pointwise", aten.where.self, aten.hardswish.default, aten.hardsigmoid.default,
             aten.relu.default, aten.masked_fill.Tensor,
             # in place on a fresh tensor (nn.MultiheadAttention's key padding mask)
             aten.masked_fill_.Scalar, aten.masked_fill_.Tensor)
class Pointwise(OpRule):
    def time(self, node, an):
        return join(an, node, _tensor_args(node), _broadcast_dim(node))


@register_op(aten.cat.default)
class Cat(OpRule):
    def time(self, node, an):
        tensors = list(node.args[0])
        dim = (node.args[1] if len(node.args) > 1 else 0) % node.meta["val"].dim()
        out = join(an, node, tensors, lambda a, i: i.dim)
        if dim == out.dim:
            raise Refusal("concatenation along the time axis",
                          "concatenate along channels instead (for a class token prepended to the "
                          "tokens: classify the newest token or pool over the tokens)")
        return out


@register_op(aten.stack.default)
class Stack(OpRule):
    def time(self, node, an):
        tensors = list(node.args[0])
        dim = (node.args[1] if len(node.args) > 1 else 0) % node.meta["val"].dim()
        return join(an, node, tensors, lambda a, i: i.dim + (dim <= i.dim))

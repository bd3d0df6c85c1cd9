"""Layout ops: they move the time axis (or merge it with other axes) but never mix frames.

A view may merge time with its neighbours (ST-GCN: `view(N, C*T, V)`) and split it out again; the
record keeps `outer`/`inner` so the step can rewrite the size that carries T to the step's frames.
"""
from __future__ import annotations

import sympy
import torch

from ..errors import Refusal
from ..timeinfo import TimeInfo
from .frames import eval_size, meta_shape, symbolic_shape
from .registry import OpRule, register_op

aten = torch.ops.aten


def _prod(xs):
    out = sympy.Integer(1)
    for x in xs:
        out = out * x
    return out


def _integer(e) -> bool:
    e = sympy.simplify(e)
    return bool(e.is_integer) and bool(e.is_positive)


def time_axes(in_shape: list, x: TimeInfo, out_shape: list) -> list[tuple]:
    """Every axis a view from in_shape to out_shape can put time on (row-major, so a frame occupies
    a contiguous block of `stride` entries in the flat order): (merged, axis, outer, inner), the
    unmerged and leftmost first. Several when sizes repeat (a one-frame axis among other 1s)."""
    stride = _prod(in_shape[x.dim + 1:]) * x.inner
    found = []
    for k in range(len(out_shape)):
        inner = sympy.simplify(stride / _prod(out_shape[k + 1:]))
        if not _integer(inner):
            continue
        outer = sympy.simplify(sympy.sympify(out_shape[k]) / (inner * x.length))
        if _integer(outer):
            found.append((outer != 1 or inner != 1, k, outer, inner))
    return sorted(found, key=lambda f: f[:2])


def locate_time(in_shape: list, x: TimeInfo, out_shape: list, grown: set | None = None) -> TimeInfo:
    """Where time lands after a view; `grown`, the output axes that grow with the clip (from a
    second capture), picks among several candidates."""
    found = time_axes(in_shape, x, out_shape)
    if grown is not None:
        found = [f for f in found if f[1] in grown] or found
    if not found:
        raise Refusal(f"this reshape splits the time axis ({x.length} frames) across axes",
                      "reshape so that time stays one axis, possibly merged with its neighbours")
    _, k, outer, inner = found[0]
    # either may hold the batch symbol (time merged with the batch, as attention's heads do)
    return x.replace(dim=k, outer=int(outer) if outer.is_Integer else outer,
                     inner=int(inner) if inner.is_Integer else inner)


class Layout(OpRule):
    """Base for ops that only move axes; explicit zero frames pass through them."""

    absorbs_zero_prefix = True


@register_op(aten.view.default, aten._unsafe_view.default, aten.reshape.default,
             aten.flatten.using_ints, aten.unflatten.int)
class View(Layout):
    def time(self, node, an):
        x, shapes = an.info(node.args[0]), (symbolic_shape(node.args[0]), symbolic_shape(node))
        if len(time_axes(shapes[0], x, shapes[1])) > 1:
            an.doubt("a view can put time on more than one axis of equal size")
        return locate_time(*shapes[:1], x, shapes[1], an.grown(node))

    def step(self, node, args, kwargs, ctx):
        x, x_info, out = args[0], ctx.info(node.args[0]), ctx.info(node)
        frames = x.shape[x_info.dim] // (eval_size(x_info.outer, ctx.batch)
                                         * eval_size(x_info.inner, ctx.batch))
        return aten.reshape.default(x, meta_shape(node, ctx.batch, frames, out))


@register_op(aten.permute.default)
class Permute(Layout):
    def time(self, node, an):
        x = an.info(node.args[0])
        perm = [p % len(node.args[1]) for p in node.args[1]]
        return x.moved(perm.index(x.dim))


@register_op(aten.movedim.int)
class Movedim(Layout):
    """x.movedim(source, destination): one axis moved, the others keep their order."""

    def time(self, node, an):
        x = an.info(node.args[0])
        ndim = node.args[0].meta["val"].dim()
        source, destination = node.args[1] % ndim, node.args[2] % ndim
        order = [d for d in range(ndim) if d != source]
        order.insert(destination, source)           # order[new axis] = old axis
        return x.moved(order.index(x.dim))


@register_op(aten.transpose.int)
class Transpose(Layout):
    def time(self, node, an):
        x = an.info(node.args[0])
        ndim = node.args[0].meta["val"].dim()
        a, b = node.args[1] % ndim, node.args[2] % ndim
        return x.moved({a: b, b: a}.get(x.dim, x.dim))


@register_op(aten.unsqueeze.default)
class Unsqueeze(Layout):
    def time(self, node, an):
        x = an.info(node.args[0])
        k = node.args[1] % node.meta["val"].dim()
        return x.moved(x.dim + (k <= x.dim))


@register_op(aten.squeeze.dims, aten.squeeze.dim, aten.squeeze.default)
class Squeeze(Layout):
    def _gone(self, node) -> list[int]:
        shape = node.args[0].meta["val"].shape
        dims = node.args[1] if len(node.args) > 1 else range(len(shape))
        dims = [dims] if isinstance(dims, int) else dims
        return sorted({d % len(shape) for d in dims if shape[d] == 1})

    def time(self, node, an):
        x = an.info(node.args[0])
        gone = self._gone(node)
        if x.dim in gone:
            raise Refusal("squeezing away the time axis (1 frame in the clip) mixes frames per step",
                          "reduce over time (mean/amax) instead of squeezing it")
        return x.moved(x.dim - sum(g < x.dim for g in gone))

    def step(self, node, args, kwargs, ctx):
        return aten.squeeze.dims(args[0], self._gone(node))


@register_op(aten.expand.default)
class Expand(Layout):
    def time(self, node, an):
        x = an.info(node.args[0])
        return x.moved(x.dim + node.meta["val"].dim() - node.args[0].meta["val"].dim())

    def step(self, node, args, kwargs, ctx):
        sizes = list(args[1])
        sizes[ctx.info(node).dim] = -1
        return aten.expand.default(args[0], sizes)


@register_op(aten.clone.default, aten._to_copy.default, aten.alias.default, aten.detach.default,
             aten.zeros_like.default, aten.ones_like.default, aten.full_like.default,
             aten.empty_like.default, aten.lift_fresh_copy.default, aten.contiguous.default,
             aten.dropout.default, aten.feature_dropout.default, aten.alpha_dropout.default)
class SameLayout(Layout):
    def time(self, node, an):
        return an.info(node.args[0])


@register_op(aten.split_with_sizes.default, aten.split.Tensor, aten.unbind.int, aten.chunk.default)
class Split(Layout):
    def time(self, node, an):
        x = an.info(node.args[0])
        dim = node.args[2] if len(node.args) > 2 else node.kwargs.get("dim", 0)
        if node.target is aten.unbind.int:
            dim = node.args[1] if len(node.args) > 1 else 0
        dim %= node.args[0].meta["val"].dim()
        if dim == x.dim:
            raise Refusal("splitting along time needs the whole clip", "split along another axis")
        if node.target is aten.unbind.int:
            x = x.moved(x.dim - (dim < x.dim))
        return tuple(x for _ in node.meta["val"])


@register_op(aten.repeat.default)
class Repeat(Layout):
    def time(self, node, an):
        x = an.info(node.args[0])
        reps = list(node.args[1])
        lead = len(reps) - node.args[0].meta["val"].dim()
        if reps[x.dim + lead] != 1:
            raise Refusal("repeating along time", "repeat along another axis")
        return x.moved(x.dim + lead)


@register_op(aten.flip.default, aten.roll.default)
class Flip(Layout):
    def time(self, node, an):
        x = an.info(node.args[0])
        dims = node.args[1] if node.target is aten.flip.default else node.args[2]
        ndim = node.args[0].meta["val"].dim()
        if x.dim in [d % ndim for d in dims]:
            raise Refusal("reversing or rolling time needs future frames (non-causal)",
                          "flip/roll other axes only")
        return x


@register_op(aten.index.Tensor)
class Index(Layout):
    """Advanced indexing of axes after time (e.g. picking joints) is frame-local."""

    def time(self, node, an):
        x = an.info(node.args[0])
        idx = list(node.args[1])
        used = [i for i, v in enumerate(idx) if v is not None]
        if any(not an.info(v).kind == "static" for v in idx if v is not None):
            raise Refusal("indexing with indices computed from the input", "index with constants")
        if not used or min(used) <= x.dim:
            raise Refusal("advanced indexing of the time axis or of an axis before it",
                          "index axes after time, or use slicing/select")
        return x

"""Matrix products and normalisations: frame-local as long as they do not mix frames, that is, as
long as time is neither contracted (Linear across time) nor normalised over."""
from __future__ import annotations

import torch

from ..errors import Refusal
from ..timeinfo import TimeInfo
from .pointwise import join
from .registry import OpRule, register_op

aten = torch.ops.aten

_MIX = ("a matrix product contracts over an axis that holds time, so every output mixes frames "
        "(e.g. a Linear over flattened time x features)")
_MIX_FIX = ("reduce over time first (mean or pooling), or apply the layer per frame with time kept "
            "on its own axis")


class MatMul(OpRule):
    """out[..., m, n] = sum_k a[..., m, k] b[..., k, n]; `lead` batch axes come first."""

    lead = 0

    def time(self, node, an):
        a, b = self.operands(node)
        ia, ib = an.info(a), an.info(b)
        if ia.is_time and ib.is_time and ia.dim >= self.lead:
            raise Refusal("both operands of a matrix product carry time (attention over time mixes "
                          "frames)", "attention over time is not supported by this compiler yet")
        out_dim = {}
        for arg, info, free in ((a, ia, self.lead), (b, ib, self.lead + 1)):
            if not info.is_time:
                continue
            if info.dim < self.lead:                  # batch axis of a bmm: frame-local
                out_dim[arg] = info.dim
            elif info.dim == free:                    # rows of a, columns of b
                out_dim[arg] = self.lead + (arg is b)
            else:
                raise Refusal(_MIX, _MIX_FIX)
        # a non-time operand is contracted, not broadcast along time
        args = [x for x in node.args if isinstance(x, torch.fx.Node)]
        fixed = [x for x in (a, b) if x not in out_dim]
        return join(an, node, args, lambda arg, info: out_dim.get(arg, info.dim), contracted=fixed)

    def operands(self, node):
        return node.args[0], node.args[1]


@register_op(aten.mm.default)
class Mm(MatMul):
    pass


@register_op(aten.addmm.default)
class AddMm(MatMul):
    def operands(self, node):
        return node.args[1], node.args[2]


@register_op(aten.bmm.default)
class Bmm(MatMul):
    lead = 1


@register_op(aten._native_batch_norm_legit_no_training.default)
class BatchNorm(OpRule):
    def time(self, node, an):
        x = an.info(node.args[0])
        if x.dim == 1:
            raise Refusal("batch norm over channels that hold time normalises each clip position "
                          "differently (time-position parameters)",
                          "keep time out of the channel axis (e.g. view as (N, C, T) not (N, C*T))")
        return (x, None, None)


@register_op(aten.native_layer_norm.default)
class LayerNorm(OpRule):
    def time(self, node, an):
        x = an.info(node.args[0])
        if x.dim >= node.args[0].meta["val"].dim() - len(node.args[1]):
            raise Refusal("layer norm over an axis that holds time mixes frames",
                          "normalise over feature axes only")
        return (x, None, None)


@register_op(aten.native_group_norm.default)
class GroupNorm(OpRule):
    def time(self, node, an):
        x = an.info(node.args[0])
        if x.dim >= 1:
            raise Refusal("group norm normalises over the spatial axes, which include time here, "
                          "so every frame depends on the whole clip",
                          "use BatchNorm or a per-frame norm (e.g. fold time into the batch first)")
        return (x, None, None)


@register_op(aten._softmax.default, aten._log_softmax.default, aten.cumsum.default)
class AlongAxis(OpRule):
    """Ops that mix values along one axis: fine unless that axis is time."""

    def time(self, node, an):
        x = an.info(node.args[0])
        if node.args[1] % node.args[0].meta["val"].dim() == x.dim:
            raise Refusal(f"{node.target} along time mixes frames", "apply it along another axis")
        return x

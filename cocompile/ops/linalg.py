"""Matrix products: frame-local as long as they do not mix frames, that is, as long as time is not
contracted (Linear across time). Normalisations are in norms.py."""
from __future__ import annotations

import torch

from ..errors import Refusal
from .pointwise import join
from .registry import OpRule, register_op

aten = torch.ops.aten

_MIX = ("a matrix product contracts over an axis that holds time, so every output mixes frames "
        "(e.g. a Linear over flattened time x features)")
_ATTN_FIX = ("if this is attention, compute it with F.scaled_dot_product_attention, or keep the "
             "attention weights unread outside it (nn.MultiheadAttention(need_weights=False)), "
             "so that cocompile can recognise it and stream it")
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
                          "frames)", _ATTN_FIX)
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


@register_op(aten.linear.default)
class Linear(OpRule):
    """y = x W^T + b over the last axis: frame-local unless time is (merged into) that axis."""

    def time(self, node, an):
        x = an.info(node.args[0])
        if x.dim == node.args[0].meta["val"].dim() - 1:
            raise Refusal(_MIX, _MIX_FIX)
        args = [a for a in node.args if isinstance(a, torch.fx.Node)]
        return join(an, node, args, lambda arg, info: info.dim, contracted=args[1:2])


@register_op(aten.matmul.default)
class BroadcastMatMul(OpRule):
    """a[..., m, k] @ b[..., k, n] with broadcast batch axes."""

    def time(self, node, an):
        a, b = node.args[:2]
        ia, ib = an.info(a), an.info(b)
        na, nb, nout = a.meta["val"].dim(), b.meta["val"].dim(), node.meta["val"].dim()
        if min(na, nb) < 2:
            raise Refusal("matrix-vector product with time", "use explicit 2-D operands")
        out_dim = {}
        for arg, info, n, free in ((a, ia, na, na - 2), (b, ib, nb, nb - 1)):
            if not info.is_time:
                continue
            if info.dim < n - 2:                       # broadcast batch axis: frame-local
                out_dim[arg] = info.dim + nout - n
            elif info.dim == free:                     # rows of a, columns of b
                out_dim[arg] = nout - 2 if arg is a else nout - 1
            else:
                raise Refusal(_MIX, _MIX_FIX)
        if len(out_dim) == 2 and len(set(out_dim.values())) > 1:
            raise Refusal("both operands of a matrix product carry time (attention over time mixes "
                          "frames)", _ATTN_FIX)
        fixed = [x for x in (a, b) if x not in out_dim]
        return join(an, node, [a, b], lambda arg, info: out_dim[arg], contracted=fixed)


@register_op(aten.einsum.default)
class Einsum(OpRule):
    """Frame-local when the time letter survives to the output; contracting it mixes frames."""

    def time(self, node, an):
        eq, operands = node.args[0].replace(" ", ""), list(node.args[1])
        if "..." in eq or "->" not in eq:
            if any(an.info(o).is_time for o in operands):
                raise Refusal("einsum with '...' or an implicit output on a time-carrying operand",
                              "write the einsum with explicit letters and '->'")
        ins, out = eq.split("->")
        letters = ins.split(",")
        times = {letters[i][an.info(o).dim] for i, o in enumerate(operands) if an.info(o).is_time}
        if len(times) > 1:
            raise Refusal("einsum operands carry time on different letters (attention over time)",
                          _ATTN_FIX)
        letter = times.pop()
        if letter not in out:
            raise Refusal(_MIX, _MIX_FIX)
        for i, o in enumerate(operands):
            if not an.info(o).is_time and letter in letters[i]:
                raise Refusal("a constant operand of the einsum is indexed by time "
                              "(time-position constant)", "make it the same for every frame")
        fixed = [o for o in operands if not an.info(o).is_time]
        return join(an, node, operands, lambda arg, info: out.index(letter), contracted=fixed)

    def step(self, node, args, kwargs, ctx):
        """A frame-local einsum of a chunk with one fixed operand (ST-GCN's graph conv mixing
        joints with the adjacency) as one matrix product laid out after the chunk's memory
        (einsum_by_matmul), or, in portable steps (ONNX), where every permute is a copy, as a
        batched product over x's axes as they are (einsum_by_batched_matmul); anything else as
        captured."""
        eq, operands = args[0].replace(" ", ""), list(args[1])
        if len(operands) == 2 and "..." not in eq and "->" in eq:
            timed = [ctx.info(o).is_time for o in node.args[1]]
            if timed.count(True) == 1:
                i = timed.index(True)
                (lx, lw), lo = eq.split("->")[0].split(","), eq.split("->")[1]
                if i == 1:
                    lx, lw = lw, lx
                by_matmul = einsum_by_batched_matmul if ctx.portable else einsum_by_matmul
                out = by_matmul(lx, lw, lo, operands[i], operands[1 - i])
                if out is not None:
                    return out
        return node.target(*args, **kwargs)


def einsum_by_matmul(lx: str, lw: str, lo: str, x: torch.Tensor, w: torch.Tensor):
    """einsum(f"{lx},{lw}->{lo}", x, w) as one matrix product over x's memory order, or None
    where the equation is not a plain contraction (batch letters, letters summed inside one
    operand, repeated letters).

    x's axes are read in memory order (largest stride first): when they run [free..., summed...,
    free...], x is viewed, without a copy, as (L, S, R), and the product is w as (Fw, S) times
    it: (L, Fw, R), already in the memory order the output keeps (for the rows of a channels-last
    chunk, (N, V*K, C) against the adjacency: rows again). Otherwise x is copied once to (L, S)."""
    if not _plain_contraction(lx, lw, lo):
        return None
    summed = [c for c in lx if c in lw and c not in lo]
    size = dict(zip(lx, x.shape)) | dict(zip(lw, w.shape))
    order = sorted((c for c in lx if size[c] > 1), key=lambda c: -x.stride(lx.index(c)))
    first = next((j for j, c in enumerate(order) if c in summed), len(order))
    run = first + sum(1 for c in order if c in summed)
    if all(c in summed for c in order[first:run]):          # [free | summed | free] in memory
        lead, trail = order[:first], order[run:]
        summed = [c for c in order if c in summed] + [c for c in summed if size[c] == 1]
    else:
        lead, trail = [c for c in order if c not in summed], []
    lead = [c for c in lx if c not in summed and c not in trail and c not in lead] + lead  # size-1 axes
    wf = [c for c in lw if c not in summed]
    xm = x.permute([lx.index(c) for c in lead + summed + trail])
    wm = w.permute([lw.index(c) for c in wf + summed]).reshape(_prod(wf, size), _prod(summed, size))
    if trail:
        y = torch.matmul(wm, xm.reshape(_prod(lead, size), _prod(summed, size), _prod(trail, size)))
    else:
        y = aten.linear(xm.reshape(_prod(lead, size), _prod(summed, size)), wm)
    y = y.view([size[c] for c in lead + wf + trail])
    return y.permute([(lead + wf + trail).index(c) for c in lo])


def einsum_by_batched_matmul(lx: str, lw: str, lo: str, x: torch.Tensor, w: torch.Tensor):
    """einsum(f"{lx},{lw}->{lo}", x, w) without moving x's axes, or None where x's last letter is
    not summed with w (or the equation is not a plain contraction).

    x is viewed as [*batch, M, s]: s its last letter, M the run of free letters before it, batch
    the rest. w becomes [*(size of each batch letter it shares, else 1), s, Fw], so one
    broadcasting matmul gives [*batch, M, Fw]; the summed batch letters are then reduced. For
    ST-GCN's 'nkctv,kvw->nctw' on NCHW: (n, k, c*t, v) @ (k, v, w), summed over k: already nctw."""
    if not _plain_contraction(lx, lw, lo):
        return None
    summed = [c for c in lx if c in lw and c not in lo]
    if not summed or lx[-1] not in summed:
        return None
    size = dict(zip(lx, x.shape)) | dict(zip(lw, w.shape))
    m = len(lx) - 1
    while m > 0 and lx[m - 1] not in summed:
        m -= 1
    batch, rows, s = lx[:m], lx[m:-1], lx[-1]
    wf = [c for c in lw if c not in summed]
    wm = w.permute([lw.index(c) for c in [c for c in batch if c in summed] + [s] + wf])
    wm = wm.reshape([size[c] if c in summed else 1 for c in batch] + [size[s], _prod(wf, size)])
    y = torch.matmul(x.reshape([size[c] for c in batch] + [_prod(rows, size), size[s]]), wm)
    sums = [j for j, c in enumerate(batch) if c in summed]
    if sums:
        y = y.sum(sums)
    kept = [c for c in batch if c not in summed] + list(rows) + wf
    y = y.reshape([size[c] for c in kept])
    return y.permute([kept.index(c) for c in lo])


def _plain_contraction(lx: str, lw: str, lo: str) -> bool:
    """No repeated letter, no letter in both operands and the output (batch), none summed inside
    one operand."""
    return not (len(set(lx)) < len(lx) or len(set(lw)) < len(lw) or set(lx) & set(lw) & set(lo)
                or set(lx) - set(lw) - set(lo) or set(lw) - set(lx) - set(lo))


def _prod(letters, size) -> int:
    n = 1
    for c in letters:
        n *= size[c]
    return n


@register_op(aten._softmax.default, aten._log_softmax.default, aten.cumsum.default,
             aten.softmax.int, aten.log_softmax.int)
class AlongAxis(OpRule):
    """Ops that mix values along one axis: fine unless that axis is time."""

    def time(self, node, an):
        x = an.info(node.args[0])
        if node.args[1] % node.args[0].meta["val"].dim() == x.dim:
            raise Refusal(f"{node.target} along time mixes frames", "apply it along another axis")
        return x

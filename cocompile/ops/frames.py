"""Frame-level tensor helpers shared by the step forms: time axes merged with other axes, batch-
dependent sizes, and the shapes of state tensors."""
from __future__ import annotations

import sympy
import torch

from ..errors import Refusal
from ..timeinfo import TimeInfo


def eval_size(expr, batch):
    """Evaluate a size expression of the captured graph (an int, or sympy in the batch symbol) at
    the step's batch size, which may itself be symbolic while the step is being exported."""
    if isinstance(expr, int):
        return expr
    if expr.is_Integer:
        return int(expr)
    if expr.is_Symbol:
        return batch
    if expr.is_Add:
        return sum((eval_size(a, batch) for a in expr.args[1:]), eval_size(expr.args[0], batch))
    if expr.is_Mul:
        out = 1
        for a in expr.args:
            out = out * eval_size(a, batch)
        return out
    if type(expr).__name__ == "FloorDiv":
        return eval_size(expr.args[0], batch) // eval_size(expr.args[1], batch)
    raise NotImplementedError(f"size expression {expr}")


def split_time(x: torch.Tensor, info: TimeInfo, batch) -> tuple[torch.Tensor, int]:
    """View `x` with its frames on an axis of their own: (tensor, time axis)."""
    d = info.dim
    if not info.merged:
        return x, d
    outer = eval_size(info.outer, batch)
    inner = eval_size(info.inner, batch)
    frames = x.shape[d] // (outer * inner)
    return x.unflatten(d, (outer, frames, inner)), d + 1


def merge_time(xu: torch.Tensor, info: TimeInfo) -> torch.Tensor:
    """Inverse of split_time."""
    return xu.flatten(info.dim, info.dim + 2) if info.merged else xu


def cat_frames(buf: torch.Tensor, x: torch.Tensor, t: int) -> torch.Tensor:
    return torch.cat([buf, x], t) if buf.shape[t] else x


def last_frames(x: torch.Tensor, t: int, n: int) -> torch.Tensor:
    return x.narrow(t, x.shape[t] - n, n)


def stream_axis(node: torch.fx.Node) -> int:
    """The axis of `node`'s value that holds the batch (0 unless a layout moved it, e.g. the
    (T, N, E) layout of attention's projections)."""
    shape = symbolic_shape(node)
    if not shape or not isinstance(shape[0], int):
        return 0
    return next((i for i, s in enumerate(shape) if not isinstance(s, int)), 0)


def frames_shape(node: torch.fx.Node, info: TimeInfo, frames: int, axis: int = 0) -> tuple:
    """Shape of `frames` frames of the value `node` (a state's shape), with the stream `axis`
    moved first. Axis 0 then holds the batch symbol, or a multiple of it where the model folds
    e.g. persons into the batch."""
    shape = list(symbolic_shape(node))
    if any(isinstance(e, sympy.Expr) and not e.is_Integer for e in (info.outer, info.inner)):
        raise Refusal("time is merged with the batch axis here, so a per-stream state cannot be kept",
                      "keep batch and time on separate axes around temporal ops")
    shape[info.dim] = int(info.outer) * frames * int(info.inner)
    shape.insert(0, shape.pop(axis))
    if any(not isinstance(s, int) for s in shape[1:]):
        raise Refusal(f"a state would need a batch-dependent shape {shape}",
                      "keep the batch on axis 0 and out of other axes")
    return tuple(shape)


def symbolic_shape(node) -> list:
    """Shape of a node's value: ints, or sympy expressions where it depends on the batch size."""
    return [int(s.node.expr) if isinstance(s, torch.SymInt) and s.node.expr.is_Integer
            else (s.node.expr if isinstance(s, torch.SymInt) else int(s)) for s in node.meta["val"].shape]


def meta_shape(node, batch, time_frames: int | None = None, info: TimeInfo | None = None) -> list:
    """Shape of `node`'s value at the step's batch size; with `info`, time axis set to `time_frames`."""
    shape = [eval_size(s, batch) for s in symbolic_shape(node)]
    if info is not None:
        shape[info.dim] = eval_size(info.outer, batch) * time_frames * eval_size(info.inner, batch)
    return shape

"""Registry of per-op rules: how an op moves the time axis, and its continual (step) form.

A rule is looked up by the fx node's target (an ATen OpOverload, or one of cocompile's own
functions such as `delay_frames`). Ops tagged pointwise by ATen share one rule. An op with no rule
is fine on values that do not carry time; on a time-carrying value it is a CompileError that names it.

Register a rule for your own op::

    @cocompile.register_op(torch.ops.mylib.smooth.default)
    class Smooth(cocompile.OpRule):
        def time(self, node, an):
            return an.info(node.args[0])   # frame-local: time passes through unchanged
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from ..timeinfo import TimeInfo

RULES: dict[object, "OpRule"] = {}


@dataclass(frozen=True)
class StateSpec:
    """One state tensor: shape without the (dynamic) batch dim, dtype, and what it holds.
    fold > 1: the graph keeps this value with `fold` rows per stream on axis 0 (e.g. persons folded
    into the batch); the state stores them as its own axis 1 so that axis 0 is the stream."""

    name: str
    shape: tuple[int, ...]
    dtype: torch.dtype
    doc: str
    init: str = "zeros"
    fold: int = 1


class OpRule:
    """Knowledge about one op. Subclasses override what differs from a frame-local op.

    time(node, an)              -> TimeInfo of the output (tuple for tuple outputs); raise
                                   errors.Refusal(reason, hint) when the op cannot be continual.
    states(node, an)            -> {key: (shape without batch, dtype, doc)} kept between steps.
    step(node, args, kwargs, ctx) -> the output for one step (ctx.mode "step") or for the
                                   end-of-clip flush (ctx.mode "flush").
    """

    absorbs_zero_prefix = False   # may take inputs whose warm-up is negative (explicit zero padding)

    def time(self, node: torch.fx.Node, an) -> TimeInfo:
        raise NotImplementedError

    def states(self, node: torch.fx.Node, an) -> dict:
        return {}

    def step(self, node: torch.fx.Node, args, kwargs, ctx):
        return node.target(*args, **kwargs)

    def frame_mean(self, node: torch.fx.Node, x: TimeInfo):
        """When the op is the mean over every frame of its input `x` (a clip reduction that the
        affine ops after it commute with): `one(frame, args, kwargs)`, the same op on a
        one-frame chunk, whose value has the shape of the op's output. Else None."""
        return None


def register_op(*targets):
    """Class decorator: register one instance of the rule for each target op.

    >>> @register_op(torch.ops.aten.relu.default)
    ... class Relu(OpRule): ...
    """
    def wrap(cls):
        rule = cls()
        for t in targets:
            RULES[t] = rule
        return cls
    return wrap


def rule_for(target) -> OpRule | None:
    """The rule of `target`; ATen ops tagged pointwise fall back to the shared pointwise rule."""
    rule = RULES.get(target)
    if rule is None and isinstance(target, torch._ops.OpOverload) and torch.Tag.pointwise in target.tags:
        rule = RULES.get("pointwise")
    return rule

"""Temporal analysis: every node gets one TimeInfo under node.meta["cocompile.time"].

Invariant left behind: each value's time axis (which dim, merged with what), offline length, rate,
warm-up, receptive field and padding are known exactly; `requirements` lists every edge whose input
must be delayed so that the inputs of a join are frame-aligned (or so that explicit zero padding is
materialised before an op that cannot absorb it). After `insert_delays`, re-running this analysis
yields no requirements (a fixpoint).
"""
from __future__ import annotations

import operator
from dataclasses import dataclass, field

import sympy
import torch
from torch import fx

from cocompile.errors import NoRule, Refusal, error_at
from cocompile.ops.registry import OpRule, rule_for
from cocompile.timeinfo import META, STATIC_INFO, TIME, TimeInfo, reads_time, static_like


def tensor_args(node: fx.Node) -> list[fx.Node]:
    """Nodes among the args of `node` (lists flattened), in order, without repeats."""
    seen: list[fx.Node] = []
    fx.node.map_arg((node.args, node.kwargs), lambda n: seen.append(n) if n not in seen else None)
    return seen


@dataclass
class TimeAnalysis:
    """Propagates TimeInfo through the graph in topological order (an interpreter over meta, not
    values). Rules see this object as `an` and use `info`, `aligned`, `shape` and the fields."""

    gm: fx.GraphModule
    inputs: dict            # placeholder name -> time dim
    clip_length: int
    approximate: bool = False
    requirements: dict = field(default_factory=dict)   # (node, arg) -> warm-up the arg must have
    _rule: OpRule | None = None
    _node: fx.Node | None = None

    def run(self) -> dict:
        for node in self.gm.graph.nodes:
            self._node = node
            try:
                node.meta[META] = getattr(self, f"_{node.op}")(node)
            except Refusal as r:
                raise error_at(node, r.reason, r.hint, isinstance(r, NoRule)) from None
        return self.requirements

    # -- what rules call -------------------------------------------------------------------------
    def info(self, arg) -> TimeInfo:
        """TimeInfo of an argument. Time inputs with explicit zero padding still pending are
        materialised (delayed to warm-up 0) unless the current rule absorbs them."""
        if not isinstance(arg, fx.Node):
            return STATIC_INFO
        info = arg.meta[META]
        if isinstance(info, TimeInfo) and info.is_time and info.warmup < 0 and not (
                self._rule and self._rule.absorbs_zero_prefix):
            return self.aligned(arg, 0)
        return info

    def aligned(self, arg: fx.Node, warmup: int) -> TimeInfo:
        """Ask for `arg` delayed to `warmup` frames; returns its TimeInfo as it will be then."""
        info = arg.meta[META]
        if warmup > info.warmup:
            key = (self._node, arg)
            self.requirements[key] = max(warmup, self.requirements.get(key, warmup))
            return info.replace(warmup=warmup)
        return info

    # -- dispatch on node.op ---------------------------------------------------------------------
    def _placeholder(self, node):
        if node.name not in self.inputs:
            return STATIC_INFO
        dim = self.inputs[node.name]
        return TimeInfo(TIME, dim=dim, length=self.clip_length)

    def _get_attr(self, node):
        return STATIC_INFO

    def _call_function(self, node):
        if node.target is operator.getitem:
            src, idx = node.args
            info = src.meta[META]
            if isinstance(info, tuple):
                if info[idx] is None:
                    raise Refusal(f"output {idx} of {src.target} is not available along time",
                                  "use only the op's main output")
                return info[idx]
            return info
        if not isinstance(node.meta.get("val"), (torch.Tensor, tuple, list)):
            return STATIC_INFO          # symbolic sizes and other scalars: batch-only arithmetic
        if not reads_time(node):
            # no frames flow in: the op runs as captured on constants or clip-level values
            infos = [a.meta[META] for a in tensor_args(node)]
            return static_like(*[i for i in infos if isinstance(i, TimeInfo)])
        rule = rule_for(node.target)
        if rule is None:
            raise NoRule(f"no continual rule for {node.target} on a value that carries time",
                          "rewrite the model with supported ops, or register a rule with "
                          "cocompile.register_op (see cocompile.ops.registry)")
        self._rule = rule
        try:
            return rule.time(node, self)
        finally:
            self._rule = None

    def _call_module(self, node):
        raise Refusal("unexpected call_module in an exported graph")

    def _output(self, node):
        outs = []
        for arg in node.args[0]:
            info = self.info(arg) if isinstance(arg, fx.Node) else STATIC_INFO
            outs.append(info)
        return tuple(outs)


def default_step_frames(gm: fx.GraphModule) -> int:
    """Smallest step for which every op emits whole frames: lcm of the rates' denominators."""
    dens = [1]
    for node in gm.graph.nodes:
        infos = node.meta.get(META)
        for info in infos if isinstance(infos, tuple) else (infos,):
            if isinstance(info, TimeInfo) and info.is_time:
                dens.append(int(sympy.fraction(info.rate)[1]))
    return int(sympy.ilcm(*dens)) if len(dens) > 1 else 1



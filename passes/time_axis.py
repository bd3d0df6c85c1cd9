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
from cocompile.ops.clip import ClipWindow
from cocompile.ops.registry import OpRule, rule_for
from cocompile.timeinfo import (CLIP, META, NEWEST, READS, STATIC_INFO, TIME, WINDOW,
                                TimeInfo, static_like)


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
    inputs: dict            # placeholder name -> InputSpec (or its time axis, for one input)
    clip_length: int
    approximate: bool = False
    consts: dict = field(default_factory=dict)          # placeholder name -> tensor
    requirements: dict = field(default_factory=dict)   # (node, arg) -> warm-up the arg must have
    conversions: dict = field(default_factory=dict)    # (node, arg) -> "window" | "newest"
    probe: "ShapeProbe | None" = None   # the graph's shapes at a second clip length (see `doubt`)
    doubts: dict = field(default_factory=dict)         # node -> why its time axis is in doubt
    _rule: OpRule | None = None
    _node: fx.Node | None = None
    _seen_as: dict = field(default_factory=dict)        # arg -> TimeInfo while a rule runs

    def run(self) -> dict:
        for node in self.gm.graph.nodes:
            self._node, self._seen_as = node, {}
            try:
                node.meta[META] = info = getattr(self, f"_{node.op}")(node)
                self._check(node, info)
            except Refusal as r:
                raise error_at(node, r.reason, r.hint, isinstance(r, NoRule)) from None
        return self.requirements

    def _check(self, node, info) -> None:
        """Values of one frame leave their time axis in doubt (any axis of size 1 could hold it);
        with a probe, every value's time axis is checked against the axes that grew."""
        for i in info if isinstance(info, tuple) else (info,):
            if isinstance(i, TimeInfo) and i.kind in (TIME, WINDOW) and i.length == 1:
                self.doubt(f"a single frame of the example clip reaches {node.name}")
        if self.probe is not None and node.op == "call_function":
            self.probe.check(node, info)

    # -- what rules call -------------------------------------------------------------------------
    def doubt(self, why: str) -> None:
        """The example clip's shapes allow more than one time axis for the current node (`why`);
        compile() then captures the model at a second clip length and analyses again with the
        probe, which tells the axes that grow with the clip (see `grown`)."""
        self.doubts.setdefault(self._node, why)

    def grown(self, node) -> set | None:
        """Axes of `node`'s value whose size changes with the clip length, or None without a probe."""
        return None if self.probe is None else self.probe.grown(node)

    def info(self, arg) -> TimeInfo:
        """TimeInfo of an argument. Time inputs with explicit zero padding still pending are
        materialised (delayed to warm-up 0) unless the current rule absorbs them."""
        if not isinstance(arg, fx.Node):
            return STATIC_INFO
        if arg in self._seen_as:
            return self._seen_as[arg]
        info = arg.meta[META]
        if isinstance(info, TimeInfo) and info.is_time and info.warmup < 0 and not (
                self._rule and self._rule.absorbs_zero_prefix):
            return self.aligned(arg, 0)
        return info

    def aligned(self, arg: fx.Node, warmup: int) -> TimeInfo:
        """Ask for `arg` delayed to `warmup` frames; returns its TimeInfo as it will be then."""
        info = self._seen_as.get(arg, arg.meta[META])
        if warmup > info.warmup:
            key = (self._node, arg)
            self.requirements[key] = max(warmup, self.requirements.get(key, warmup))
            return info.replace(warmup=warmup)
        return info

    def convert(self, arg: fx.Node, how: str) -> TimeInfo:
        """Ask for `arg` as its window ("window") or cut to the step's frames ("newest")."""
        self.conversions[(self._node, arg)] = how
        info = arg.meta[META]
        if how == "newest":
            return info.replace(kind=TIME, ready=0)
        return ClipWindow.window(self, arg)

    def static_value(self, node: fx.Node, memo: dict | None = None):
        """The value of a node computed from constants only (e.g. an attention mask), or None
        when it depends on the input or on its batch size."""
        memo = {} if memo is None else memo
        if node not in memo:
            memo[node] = None
            if node.op == "placeholder":
                memo[node] = self.consts.get(node.name)
            elif node.op == "call_function":
                missing = []

                def value(a):
                    v = self.static_value(a, memo)
                    if v is None:
                        missing.append(a)
                    return v
                args, kwargs = fx.node.map_arg((node.args, node.kwargs), value)
                if not missing:
                    try:
                        memo[node] = node.target(*args, **kwargs)
                    except Exception:  # noqa: BLE001 - e.g. an op on the batch size
                        memo[node] = None
        return memo[node]

    # -- dispatch on node.op ---------------------------------------------------------------------
    def _placeholder(self, node):
        spec = self.inputs.get(node.name)
        if isinstance(spec, int):                   # one input: its time axis
            return TimeInfo(TIME, dim=spec, length=self.clip_length)
        if spec is None or not spec.is_time:        # constants, and side inputs without time
            return STATIC_INFO
        return TimeInfo(TIME, dim=spec.time_dim, length=spec.length, rate=spec.rate)

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
        rule = rule_for(node.target)
        if not getattr(rule, "reads_windows", False) and WINDOW in self._kinds(node):
            self._meet(node)            # cut windows read only at the newest frames; or
            if WINDOW in self._kinds(node):   # frames meet windows: the frames become windows
                return self._on_windows(node, rule)
        if not self._kinds(node) & {TIME, WINDOW}:
            # no frames flow in: the op runs as captured on constants or clip-level values
            infos = [a.meta[META] for a in tensor_args(node)]
            return static_like(*[i for i in infos if isinstance(i, TimeInfo)])
        if rule is None:
            raise NoRule(f"no continual rule for {node.target} on a value that carries time",
                          "rewrite the model with supported ops, or register a rule with "
                          "cocompile.register_op (see cocompile.ops.registry)")
        self._rule = rule
        try:
            return rule.time(node, self)
        finally:
            self._rule = None

    def _meet(self, node):
        """Streamed frames and a whole window meet in `node`: windows of which it reads only the
        newest frames are cut to them; if windows remain, the frames become windows."""
        reads = node.meta.get(READS, {})
        for a in tensor_args(node):
            if self._kind(a) == WINDOW and reads.get(a) == NEWEST:
                self._seen_as[a] = self.convert(a, "newest")
        if WINDOW in self._kinds(node):
            for a in tensor_args(node):
                if self._kind(a) == TIME:
                    self._seen_as[a] = self.convert(a, "window")

    def _kind(self, a) -> str | None:
        info = self._seen_as.get(a, a.meta.get(META))
        return info.kind if isinstance(info, TimeInfo) else None

    def _kinds(self, node) -> set:
        return {self._kind(a) for a in tensor_args(node)} - {None}

    def _on_windows(self, node, rule):
        """An op on whole windows runs as captured; its rule (run as if the windows were streamed
        frames) says where the positions go. Without a rule, or if it refuses, the positions are
        lost (a clip value): still exact, only later single-output forms are not possible."""
        infos = {a: self._seen_as.get(a, a.meta.get(META)) for a in tensor_args(node)}
        windows = {a: i for a, i in infos.items() if isinstance(i, TimeInfo) and i.kind == WINDOW}
        saved = dict(self.requirements), dict(self.conversions)
        self._seen_as.update({a: i.replace(kind=TIME) for a, i in windows.items()})
        try:
            out = rule.time(node, self) if rule is not None else None
        except Refusal:
            out = None
        finally:
            self.requirements, self.conversions = saved
        return _as_window(out, list(windows.values()))

    def _call_module(self, node):
        raise Refusal("unexpected call_module in an exported graph")

    def _output(self, node):
        outs = []
        for arg in node.args[0]:
            info = self.info(arg) if isinstance(arg, fx.Node) else STATIC_INFO
            outs.append(info)
        return tuple(outs)


def _as_window(out, windows: list) -> TimeInfo | tuple:
    """The rule's answer for streamed frames, read back as whole windows (or a clip value)."""
    if isinstance(out, tuple):
        return tuple(None if o is None else _as_window(o, windows) for o in out)
    # an op on whole windows reads nothing outside them: its receptive field is theirs
    common = dict(ready=max(w.ready for w in windows), padded=any(w.padded for w in windows),
                  approx=any(w.approx for w in windows), horizon=max(w.horizon for w in windows),
                  recurrent=any(w.recurrent for w in windows))
    rf = max(w.rf for w in windows)
    if isinstance(out, TimeInfo) and out.kind in (TIME, WINDOW):
        return out.replace(kind=WINDOW, rf=rf, **common)
    return TimeInfo(CLIP, rf=rf, **common)


def default_step_frames(gm: fx.GraphModule) -> int:
    """Smallest step for which every op emits whole frames: lcm of the rates' denominators."""
    dens = [1]
    for node in gm.graph.nodes:
        infos = node.meta.get(META)
        for info in infos if isinstance(infos, tuple) else (infos,):
            if isinstance(info, TimeInfo) and info.is_time:
                dens.append(int(sympy.fraction(info.rate)[1]))
    return int(sympy.ilcm(*dens)) if len(dens) > 1 else 1



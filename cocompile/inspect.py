"""inspect(): a per-layer report of what the compiler made of each temporal op."""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import fx
from torch.utils.flop_counter import FlopCounterMode

from .errors import module_path, op_name
from .model import ContinualModel
from .ops.attention import MODE as ATTENTION_META
from .ops.conv_forms import FORM_META
from .ops.convert import window_frames
from .ops.registry import rule_for
from .ops.window import WindowRule
from .step import StepInterpreter
from .timeinfo import META, STATE_META, WINDOW, TimeInfo


_WINDOW_FORMS = ("single", "rerun", "cache", "recomp")


def _attention_form(form: str) -> bool:
    return form in _WINDOW_FORMS or form.startswith("causal")


@dataclass(frozen=True)
class Layer:
    """One row: a node that keeps state, reads a temporal window, or does arithmetic."""

    module: str
    op: str
    window: str          # kernel/stride/padding/dilation along time ("clip" for clip reductions)
    form: str            # step form of a temporal conv (window / fold / partial; see conv_forms)
    lag: int             # input frames this value trails the stream (per-frame) or needs (clip)
    rf: int | float      # receptive field in input frames (math.inf behind a recurrent layer)
    state_bytes: int     # per stream
    flops_step: int
    flops_clip: int


@dataclass(frozen=True)
class Inspection:
    layers: list[Layer]
    step_frames: int
    clip_length: int

    @property
    def flops_step(self) -> int:
        return sum(r.flops_step for r in self.layers)

    @property
    def flops_clip(self) -> int:
        return sum(r.flops_clip for r in self.layers)

    @property
    def state_bytes(self) -> int:
        return sum(r.state_bytes for r in self.layers)

    def __str__(self) -> str:
        head = f"{'module':<28}{'op':<26}{'k/s/p/d (time)':<16}{'form':<9}{'lag':>5}{'rf':>5}" \
               f"{'state B':>11}{'FLOPs/step':>15}{'FLOPs/clip':>19}"
        rows = [head, "-" * len(head)]
        for r in self.layers:
            rows.append(f"{r.module[:27]:<28}{r.op[:25]:<26}{r.window:<16}{r.form:<9}{r.lag:>5}{r.rf:>5}"
                        f"{r.state_bytes:>11,}{r.flops_step:>15,}{r.flops_clip:>19,}")
        ideal = self.flops_clip * self.step_frames / self.clip_length
        rows.append("-" * len(head))
        rows.append(f"total: {self.flops_step:,} FLOPs per step of {self.step_frames} "
                    f"frame{'s' * (self.step_frames != 1)} vs "
                    f"{self.flops_clip:,} per clip of {self.clip_length} "
                    f"(ideal {ideal:,.0f}; step/ideal {self.flops_step / ideal if ideal else 0:.3f}); "
                    f"state {self.state_bytes:,} bytes per stream")
        if any(r.form and not _attention_form(r.form) for r in self.layers):
            rows.append("form: how a temporal conv steps (window: conv over buffered input frames; fold: "
                        "taps folded into channels; partial: partial sums kept; -mm: as a matrix product over rows; "
                        "mm: a kernel of ones as one matrix product; overlap: transposed conv, partial sums of its next "
                        "frames kept; *: forced)")
        if any(_attention_form(r.form) for r in self.layers):
            rows.append("attention over time: single (newest queries against cached keys/values), "
                        "causalW (key/value cache of a W-frame causal band), rerun (re-run over the "
                        "window from cached projections); cache: frames kept as a window; recomp: "
                        "re-run over the whole window each step")
        return "\n".join(rows)


class _Counting:
    """Mixin for fx interpreters: FLOPs of every node (torch.utils.flop_counter)."""

    def run_node(self, node):
        with FlopCounterMode(display=False) as counter:
            out = super().run_node(node)
        self.flops[node.name] = counter.get_total_flops()
        return out


class _ClipCounter(_Counting, fx.Interpreter):
    def __init__(self, gm):
        super().__init__(gm)
        self.flops = {}


class _StepCounter(_Counting, StepInterpreter):
    def __init__(self, *args):
        super().__init__(*args)
        self.flops = {}


@torch.no_grad()
def count_flops(co: ContinualModel, batch_size: int = 1) -> tuple[dict, dict]:
    """FLOPs per node for one step (from the zero state) and for the offline clip."""
    prog = co.program
    clip = co.example_inputs(batch_size, frames=co.clip_length)
    offline = _ClipCounter(prog.gm)
    offline.run(*prog._args(*clip))
    state = co.initial_state(batch_size)
    named = {s.name: t for s, t in zip(co.specs[1:], state[1:])}
    step = _StepCounter(prog.gm, "step", named, state[0], co.clip_length)
    step.run(*prog._args(*co.inputs.window(clip, 0, co.step_frames)))
    return step.flops, offline.flops


def _window(node) -> str:
    rule = rule_for(node.target)
    x = node.args[0].meta.get(META) if node.args and isinstance(node.args[0], fx.Node) else None
    out = node.meta.get(META)
    out = out[0] if isinstance(out, tuple) else out
    if isinstance(out, TimeInfo) and out.kind == "clip" and isinstance(x, TimeInfo) and x.is_time:
        return f"clip ({x.length})"
    if isinstance(rule, WindowRule) and isinstance(x, TimeInfo) and x.is_time:
        w = rule.window(node, x.dim)
        if w is not None:
            return f"{w.kernel}/{w.stride}/{w.left}/{w.dilation}"
    if op_name(node) == "delay_frames":
        return f"delay {node.args[1]}"
    return ""


def _form(node) -> str:
    """The step form of a temporal conv, as chosen (measured, cached, forced) by choose_forms; of
    an attention over time (single / causal / window); `recomp` for an op re-run on the whole
    window every step (after attention whose every output is read, or a position table)."""
    attention = node.meta.get(ATTENTION_META)
    if attention is not None:
        return {"single-output": "single", "window": "rerun"}[attention.kind] if attention.kind != "causal" \
            else f"causal{attention.band}"
    if node.target is window_frames:
        return "cache"
    info = node.meta.get(META)
    if isinstance(info, TimeInfo) and info.kind == WINDOW:
        return "recomp"
    form = node.meta.get(FORM_META)
    return "" if form is None else form.name + ("*" if form.how == "forced" else "")


def inspect(co: ContinualModel) -> Inspection:
    """Per-layer table of a compiled model: temporal window, lag, receptive field, state, FLOPs.

    >>> print(cocompile.inspect(co))
    """
    step, clip = count_flops(co)
    rows = []
    for node in co.program.gm.graph.nodes:
        if node.op != "call_function":
            continue
        info = node.meta.get(META)
        info = info[0] if isinstance(info, tuple) else info
        states = node.meta.get(STATE_META, {}).values()
        state_bytes = sum(math.prod(s.shape) * s.dtype.itemsize for s in states)
        window = _window(node)
        if not (window or state_bytes or step.get(node.name) or clip.get(node.name)):
            continue
        lag = info.lag() if isinstance(info, TimeInfo) else 0
        rf = info.receptive_field if isinstance(info, TimeInfo) else 0    # inf: recurrent
        rows.append(Layer(module_path(node) or "<top>", op_name(node), window, _form(node), lag, rf,
                          state_bytes, int(step.get(node.name, 0)), int(clip.get(node.name, 0))))
    return Inspection(rows, co.step_frames, co.clip_length)

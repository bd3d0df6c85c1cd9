"""The step program: the captured graph run frame-chunk by frame-chunk with explicit state.

`StepProgram.forward(x_chunk, frames, *states) -> (*outputs, frames + c, *next_states)` interprets
the annotated graph with each node's step rule (JAX-style: the transformation is an interpreter).
It is then traced by torch.export into a plain ATen step graph for speed and for the artifacts.
`StepProgram.flush(states)` runs the same graph once more in flush mode: every temporal op is fed
its own end-of-clip padding and emits the offline frames still missing.
"""
from __future__ import annotations

import torch
from torch import fx

from .ops.frames import meta_shape
from .ops.registry import StateSpec, rule_for
from .timeinfo import META, STATE_META, TimeInfo, steps_by_rule


class StepInterpreter(fx.Interpreter):
    """Runs one step (or the flush). Rules see it as `ctx`: mode, batch, frames, step_frames,
    clip_length, info(node), state(node, key), set_state(node, key, value)."""

    def __init__(self, gm, mode: str, states: dict, frames: torch.Tensor, clip_length: int):
        super().__init__(gm, garbage_collect_values=True)
        self.mode, self.states, self.frames, self.clip_length = mode, states, frames, clip_length
        self.next_states: dict = {}
        self.batch = frames.shape[0]

    # -- what rules call -------------------------------------------------------------------------
    @property
    def step_frames(self) -> int:
        return self.module.meta["cocompile.step_frames"]

    def info(self, node):
        return node.meta[META]

    def state(self, node, key):
        spec = node.meta[STATE_META][key]
        t = self.states[spec.name]
        return t.flatten(0, 1) if spec.fold > 1 else t

    def set_state(self, node, key, value):
        spec = node.meta[STATE_META][key]
        self.next_states[spec.name] = value.unflatten(0, (-1, spec.fold)) if spec.fold > 1 else value

    # -- dispatch ------------------------------------------------------------------------------------
    def run_node(self, node):
        if node.op != "call_function":
            return super().run_node(node)
        info = node.meta.get(META)
        if (self.mode == "flush" and isinstance(info, TimeInfo) and info.is_time
                and info.flush_frames(self.clip_length) == 0):
            return self._no_frames(node, info)
        args, kwargs = self.fetch_args_kwargs_from_env(node)
        rule = rule_for(node.target)
        if not steps_by_rule(node, rule):
            return node.target(*args, **kwargs)
        return rule.step(node, args, kwargs, self)

    def _no_frames(self, node, info):
        """Flush output of a value with no missing frames: an empty chunk of the right shape."""
        val = node.meta["val"]
        return torch.zeros(meta_shape(node, self.batch, 0, info), dtype=val.dtype)


class StepProgram(torch.nn.Module):
    """nn.Module form of one step, with the model's parameters as buffers."""

    def __init__(self, gm: fx.GraphModule, consts: dict, input_name: str, specs: list[StateSpec],
                 step_frames: int, clip_length: int):
        super().__init__()
        self.gm, self.specs = gm, specs
        self.step_frames, self.clip_length = step_frames, clip_length
        self.order = [n.name for n in gm.graph.nodes if n.op == "placeholder"]
        self.input_name = input_name
        for name, t in consts.items():
            self.register_buffer(name, t.detach().clone(), persistent=True)

    def _args(self, x):
        return [x if name == self.input_name else getattr(self, name) for name in self.order]

    def forward(self, x, frames, *states):
        named = {s.name: t for s, t in zip(self.specs[1:], states)}
        it = StepInterpreter(self.gm, "step", named, frames, self.clip_length)
        outs = it.run(*self._args(x))
        nxt = [it.next_states[s.name] for s in self.specs[1:]]
        return (*outs, frames + self.step_frames, *nxt)

    def flush(self, x_empty, frames, *states):
        """Outputs still missing at the end of a clip (per-frame: the rest; clip-level: final)."""
        named = {s.name: t for s, t in zip(self.specs[1:], states)}
        it = StepInterpreter(self.gm, "flush", named, frames, self.clip_length)
        return it.run(*self._args(x_empty))

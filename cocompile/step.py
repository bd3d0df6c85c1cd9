"""The step program: the captured graph run frame-chunk by frame-chunk with explicit state.

`StepProgram.forward(x_chunk, frames, *states) -> (*outputs, frames + c, *next_states)` interprets
the annotated graph with each node's step rule (JAX-style: the transformation is an interpreter).
`TracedStep` runs it as a plain ATen graph traced per batch size on the first step of that size
(make_fx on fake tensors: no arithmetic, no symbolic shapes); the artifacts torch.export it with a
dynamic batch when they are written (cocompile.export).
`StepProgram.flush(states)` runs the same graph once more in flush mode: every temporal op is fed
its own end-of-clip padding and emits the offline frames still missing.
"""
from __future__ import annotations

import warnings

import torch
from torch import fx
from torch.fx.experimental.proxy_tensor import make_fx
from torch.utils import _pytree as pytree
from torch.utils._python_dispatch import _disable_current_modes

from cocompile.passes.tidy_step import tidy_step

from .errors import CompileError
from .ops.frames import meta_shape
from .ops.registry import StateSpec, rule_for
from .timeinfo import META, STATE_META, TimeInfo, steps_by_rule


class StepInterpreter(fx.Interpreter):
    """Runs one step (or the flush). Rules see it as `ctx`: mode, batch, frames, step_frames,
    clip_length, portable, info(node), state(node, key), set_state(node, key, value), and memo, a
    dict where rules keep values built once per step (e.g. frame positions for masks).
    portable: the step is being written for a runtime that runs every permute as a copy (ONNX),
    so stateless ops keep the captured layout (1x1 convs as W @ x on NCHW, einsums over the
    chunk's axes as they are) rather than a channels-last matrix product."""

    def __init__(self, gm, mode: str, states: dict, frames: torch.Tensor, clip_length: int,
                 portable: bool = False):
        super().__init__(gm, garbage_collect_values=True)
        self.mode, self.states, self.frames, self.clip_length = mode, states, frames, clip_length
        self.portable = portable
        self.next_states: dict = {}
        self.memo: dict = {}
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
        """Flush output of a value with no missing frames: an empty chunk of the right shape, on
        the step's device, floating in its inputs' dtype (the model may be converted since capture)."""
        dtype = node.meta["val"].dtype
        if dtype.is_floating_point:
            given = pytree.tree_leaves(self.fetch_args_kwargs_from_env(node))
            dtype = next((t.dtype for t in given if isinstance(t, torch.Tensor) and t.is_floating_point()),
                         dtype)
        return torch.zeros(meta_shape(node, self.batch, 0, info), dtype=dtype, device=self.frames.device)


class StepProgram(torch.nn.Module):
    """nn.Module form of one step, with the model's parameters as buffers:
    forward(*inputs, frames, *states) -> (*outputs, frames + step_frames, *next_states), one
    input per model input leaf (time inputs with their frames of the step, side inputs whole),
    each in the user's layout: input i has its batch axis at `batch_dims[i]` and is moved
    batch-first for the graph (see cocompile.capture); states are batch-first; outputs keep the
    model's own layout."""

    def __init__(self, gm: fx.GraphModule, consts: dict, input_names: list[str], specs: list[StateSpec],
                 step_frames: int, clip_length: int, batch_dims: list[int] | None = None):
        super().__init__()
        self.gm, self.specs = gm, specs
        self.step_frames, self.clip_length = step_frames, clip_length
        self.order = [n.name for n in gm.graph.nodes if n.op == "placeholder"]
        self.input_names = list(input_names)
        self.batch_dims = list(batch_dims or [0] * len(self.input_names))
        self.portable = False          # see StepInterpreter; set while an ONNX artifact is written
        for name, t in consts.items():
            self.register_buffer(name, t.detach().clone(), persistent=True)

    @property
    def input_name(self) -> str:
        return self.input_names[0]

    def batch_of(self, args) -> int:
        """Streams in (*inputs, ...): the first input's batch axis."""
        return args[0].shape[self.batch_dims[0]]

    def _args(self, *xs):
        """The graph's placeholders in order: the inputs batch-first, then the constants."""
        xs = [x.movedim(b, 0) if b else x for x, b in zip(xs, self.batch_dims)]
        given = dict(zip(self.input_names, xs))
        return [given[name] if name in given else getattr(self, name) for name in self.order]

    def forward(self, *args):
        xs, frames, states = self._split(args)
        named = {s.name: t for s, t in zip(self.specs[1:], states)}
        it = StepInterpreter(self.gm, "step", named, frames, self.clip_length, self.portable)
        outs = it.run(*self._args(*xs))
        nxt = [it.next_states[s.name] for s in self.specs[1:]]
        return (*outs, frames + self.step_frames, *nxt)

    def flush(self, *args):
        """Outputs still missing at the end of a clip (per-frame: the rest; clip-level: final);
        time inputs come with no frames, side inputs as in the steps."""
        xs, frames, states = self._split(args)
        named = {s.name: t for s, t in zip(self.specs[1:], states)}
        it = StepInterpreter(self.gm, "flush", named, frames, self.clip_length, self.portable)
        return it.run(*self._args(*xs))

    def _split(self, args):
        n = len(self.input_names)
        return args[:n], args[n], args[n + 1:]


class TracedStep:
    """`program`'s step as plain ATen graphs, one per signature of (*inputs, *state) (in practice one per
    batch size), each traced on its first call. Tracing interprets the graph once on fake tensors
    with concrete shapes (make_fx), a fraction of the time of a torch.export with a symbolic batch;
    pre-dispatch keeps the ops torch.export would (conv3d, linear), so the graph runs what the
    interpreter runs, minus its per-node Python.

    >>> step = TracedStep(program)
    >>> outs = step(x_chunk, *state)          # traces for x_chunk's batch of streams, then runs
    """

    def __init__(self, program: StepProgram):
        self.program = program
        self.graphs: dict = {}

    def __call__(self, *args):
        key = tuple((t.shape, t.dtype) for t in args)
        graph = self.graphs.get(key)
        if graph is None:
            graph = self.graphs[key] = self._trace(args)
        return graph(*args)

    def _trace(self, args):
        """The traced graph for arguments shaped like (*inputs, *state), or the interpreter if it
        cannot be traced (it computes the same step, only slower)."""
        n = len(self.program.input_names)
        _check_state(self.program.specs, args[n:], self.program.batch_of(args))
        # outer dispatch modes (e.g. a FLOP counter around co.step) must see the run, not the trace
        try:
            with _disable_current_modes(), torch.no_grad():
                gm = make_fx(self.program, tracing_mode="fake", _allow_non_fake_inputs=True,
                             pre_dispatch=True)(*args)
                tidy_step(gm)
                return gm
        except Exception as err:  # noqa: BLE001 - the interpreter still computes the same step
            warnings.warn(f"the step program could not be traced ({str(err).strip().splitlines()[0]}); "
                          "stepping runs the graph interpreter", stacklevel=4)
            return self.program


def _check_state(specs: list[StateSpec], state: tuple, batch: int) -> None:
    """A graph traced for a wrong state would compute garbage silently: name the first misfit."""
    hint = f"start from co.initial_state({batch}) and pass back the state each step returns"
    if len(state) != len(specs):
        raise CompileError(f"expected {len(specs)} state tensors, got {len(state)}", hint=hint)
    for spec, t in zip(specs, state):
        want = (batch, *spec.shape)
        if tuple(t.shape) != want or t.dtype != spec.dtype:
            raise CompileError(f"state {spec.name} must be {spec.dtype} of shape {want} for {batch} "
                               f"stream(s), got {t.dtype} of shape {tuple(t.shape)}", hint=hint)

"""ContinualModel: the eager continual form of a compiled model."""
from __future__ import annotations

import dataclasses

import torch
from torch.utils import _pytree as pytree

from .errors import CompileError
from .inputs import Inputs
from .timeinfo import TIME, TimeInfo


class ContinualModel(torch.nn.Module):
    """Reads `step_frames` frames per call and keeps explicit state between calls.

    Inputs come in the structure of the example input (a tensor, a tuple of positional inputs,
    a list such as `[slow, fast]`): per step, each time input brings its share of `step_frames`
    frames of the fastest input, side inputs come whole (see cocompile.inputs). Every chunk keeps
    the example's layout, its batch axis where `batch_dim` put it (a time-major input takes
    (step_frames, N, F) chunks); outputs keep the model's own layout, output i's batch axis
    `out_batch_dims[i]` (None: it has none, e.g. a value reduced over the batch).

    >>> co = cocompile.compile(model, torch.randn(1, 3, 16, 32, 32))
    >>> y = co.forward_steps(clip)                 # == model(clip)            (E1)
    >>> state = co.initial_state(batch_size=2)
    >>> y, state = co.step(clip[:, :, :co.step_frames], state)
    """

    def __init__(self, program, step_fn, out_spec, out_infos: list[TimeInfo], inputs: Inputs,
                 example, approximate: bool, out_batch_dims: list | None = None):
        super().__init__()
        self.program, self._step_fn = program, step_fn
        self.out_spec, self.out_infos = out_spec, out_infos
        self.out_batch_dims = list(out_batch_dims) if out_batch_dims is not None else [0] * len(out_infos)
        self.specs = program.specs
        self.step_frames, self.clip_length = program.step_frames, program.clip_length
        self.inputs = inputs
        self._fastest = main = next(s for s in inputs.specs if s.is_time and s.rate == 1)
        self.time_dim, self.batch_dim, self.frame_shape = main.time_dim, main.batch_dim, main.frame_shape()
        leaves = inputs.leaves(example)
        self.dtype, self.device = main.dtype, leaves[0].device   # follow co.to(...), see _apply
        # side inputs' example values (one stream's), for exports and random test steps
        self._sides = {s.name: t.narrow(s.batch_dim, 0, 1).clone()
                       for t, s in zip(leaves, inputs.specs) if not s.is_time}
        self.approximate = any(i.approx for i in out_infos)
        # E2 holds exactly: no temporal zero padding, no recurrence over the whole stream
        self.exact_sliding = not any(i.padded or i.recurrent for i in out_infos)
        self.delay = max([i.lag() for i in out_infos if i.kind == TIME] + [0])
        # input frames an output depends on; math.inf (unbounded) behind a recurrent layer
        self.receptive_field = max([i.receptive_field for i in out_infos if i.kind != "static"] + [1])
        self.deviation = None     # approximate models: E1 deviation measured by compile()
        self._state = None
        self._frames_seen = 0

    # -- explicit form ---------------------------------------------------------------------------------
    def initial_state(self, batch_size: int = 1, device=None, dtype=None) -> tuple[torch.Tensor, ...]:
        """All-zero state (the zero state is the start-of-clip padding) and a zero frame counter
        (int64), on `device` (default: where the model is, `co.device`); `dtype`, if given, for
        the floating states instead of their own (the model's dtype).

        >>> co.to("cuda").initial_state(2)[1].device
        device(type='cuda', index=0)
        """
        device = self.device if device is None else device
        return tuple(torch.zeros((batch_size, *s.shape), device=device,
                                 dtype=dtype if dtype is not None and s.dtype.is_floating_point else s.dtype)
                     for s in self.specs)

    def step(self, x_chunk, state: tuple) -> tuple:
        """One step: `step_frames` frames in (each input its share; side inputs whole), (outputs,
        next state) out. Outputs include warm-up frames; `valid_from` says which are valid."""
        leaves = self._leaves(x_chunk, exact=True)
        flat = self._step_fn(*leaves, *state)
        n = len(self.out_infos)
        return pytree.tree_unflatten(list(flat[:n]), self.out_spec), tuple(flat[n:])

    def flush(self, state: tuple, inputs=None):
        """Outputs still missing after a whole clip: per-frame outputs' last frames (from each
        op's own end padding), clip-level outputs' final values. A model with side inputs takes
        them from `inputs` (the last chunk, or the clip, in the model's input structure)."""
        batch, device = state[0].shape[0], state[0].device
        given = None if inputs is None else self.inputs.leaves(inputs)
        if given is None and self._sides:
            raise CompileError("flush needs the side inputs (" + ", ".join(self._sides) + ")",
                               hint="pass co.flush(state, inputs) with the last chunk or the clip")
        leaves = [torch.zeros(s.chunk_shape(batch, 0), dtype=self.dtype, device=device) if s.is_time
                  else given[i] for i, s in enumerate(self.inputs.specs)]
        with torch.no_grad():
            flat = self.program.flush(*leaves, *state)
        return pytree.tree_unflatten(list(flat), self.out_spec)

    def example_inputs(self, batch: int = 1, generator=None, frames: int | None = None) -> list[torch.Tensor]:
        """Random frames for one step of `batch` streams (or `frames` frames of the fastest input),
        per input in pytree order, with the example's side inputs: what exports trace and
        artifact checks step with."""
        frames = self.step_frames if frames is None else frames
        return [torch.randn(s.chunk_shape(batch, frames), generator=generator)
                .to(self.dtype).to(self.device) if s.is_time
                else self._sides[s.name].expand(s.chunk_shape(batch, 0)).clone()
                for s in self.inputs.specs]

    # -- artifacts -------------------------------------------------------------------------------------
    def export(self, path, quantize: str | None = None, calibration=None):
        """Write the step to `path` (.onnx, .pt TorchScript, .pt2 torch.export) with explicit state
        in/out and the metadata of `metadata()`; returns the path. quantize="int8" writes an ONNX
        step quantized on `calibration` (a list of clips, or a number of random clips), marked
        approximate with its measured deviation (cocompile.quantize).

        >>> co.export("co_model.onnx")
        'co_model.onnx'
        >>> co.export("co_int8.onnx", quantize="int8", calibration=[clip1, clip2, clip3])
        'co_int8.onnx'
        """
        from .export import export
        return export(self, path, quantize, calibration)

    def metadata(self) -> dict:
        """The JSON description every artifact carries: step size, inputs, outputs with their
        warm-up and exactness, states with shape/dtype/init (see cocompile.metadata)."""
        from .metadata import metadata
        return metadata(self)

    # -- device and dtype ------------------------------------------------------------------------------
    def _apply(self, fn, recurse=True):
        """`co.to(device)`, `co.half()`, ...: nn.Module moves the program's buffers; the input and
        the states made after (initial_state) follow, as does a running stream's state. Traced
        step graphs hold the old buffers, so they are traced again on the next step."""
        super()._apply(fn, recurse)
        probe = fn(torch.empty(0, dtype=self.dtype, device=self.device))
        self.dtype, self.device = probe.dtype, probe.device
        self.specs[:] = [dataclasses.replace(s, dtype=fn(torch.empty(0, dtype=s.dtype)).dtype)
                         for s in self.specs]
        if self._state is not None:
            self._state = tuple(fn(t) for t in self._state)
        self._sides = {k: fn(t) if t.is_floating_point() else t.to(self.device) for k, t in self._sides.items()}
        getattr(self._step_fn, "graphs", {}).clear()
        self.__dict__.pop("_exported", None)          # cocompile.export's exported programs
        self.__dict__.pop("_inductor", None)          # co.compiled()'s steps hold the old weights
        return self

    def compiled(self, mode: str = "default"):
        """The step compiled by Inductor (torch.compile with the weights frozen into the code,
        static shapes, compiled on the first step of each batch size; `mode` one of torch.compile's
        modes); `.step(x_chunk, state)` as `co.step`. Kept on the model per mode (cocompile.aoti).

        >>> fast = co.compiled()
        >>> y, state = fast.step(x_chunk, co.initial_state(1))
        """
        from .aoti import compiled_step
        return compiled_step(self, mode)

    def cuda_graph(self, batch_size: int = 1):
        """The step for `batch_size` streams captured as a CUDA graph (static shapes, static input
        and state buffers): one replay per step, no per-op launch. Needs the model on a CUDA device.

        >>> step = co.to("cuda").cuda_graph(batch_size=16)
        >>> y = step(x_chunk)                 # like co.step(x_chunk, state); keeps the state
        """
        from .cuda_graph import GraphedStep
        return GraphedStep(self, batch_size)

    # -- stateful form ---------------------------------------------------------------------------------
    def reset(self) -> None:
        self._state, self._frames_seen = None, 0

    def forward(self, x_chunk):
        """Stateful step over a chunk of a multiple of `step_frames` frames. Per-frame outputs come
        back as their valid frames (None before the first), clip-level outputs as the value over
        the last clip (None until enough frames were seen)."""
        leaves = self._leaves(x_chunk, exact=False)
        if self._state is None:
            self._state = self.initial_state(self.inputs.batch_size(leaves))
        pieces = []
        for chunk in self.inputs.steps(leaves, self.step_frames):
            before = self._frames_seen
            outs, self._state = self.step(self.inputs.unflatten(chunk), self._state)
            self._frames_seen += self.step_frames
            pieces.append(self._valid(pytree.tree_leaves(outs), before))
        leaves = [self._join([p[i] for p in pieces], info) for i, info in enumerate(self.out_infos)]
        return pytree.tree_unflatten(leaves, self.out_spec)

    def forward_steps(self, clip, flush: bool = True):
        """Step through `clip` from a fresh state; with flush, returns exactly what model(clip)
        returns (E1): per-frame outputs frame for frame, clip-level outputs at the final step."""
        leaves = self._leaves(clip, exact=False)
        frames = self._frames(leaves)
        if flush and frames != self.clip_length:
            raise CompileError(f"flush reproduces the model on clips of the compiled length "
                               f"{self.clip_length}, got {frames} frames",
                               hint="pass flush=False to stream a longer input")
        state, steps = self.initial_state(self.inputs.batch_size(leaves)), []
        with torch.no_grad():
            for chunk in self.inputs.steps(leaves, self.step_frames):
                outs, state = self.step(self.inputs.unflatten(chunk), state)
                steps.append(pytree.tree_leaves(outs))
        final = pytree.tree_leaves(self.flush(state, clip)) if flush else steps[-1]
        leaves = []
        for i, info in enumerate(self.out_infos):
            if info.kind != TIME:
                leaves.append(final[i])
                continue
            frames = torch.cat([s[i] for s in steps] + ([final[i]] if flush else []), info.dim)
            leaves.append(frames.narrow(info.dim, info.warmup, frames.shape[info.dim] - info.warmup))
        return pytree.tree_unflatten(leaves, self.out_spec)

    # -- helpers -------------------------------------------------------------------------------------------
    def _valid(self, leaves, frames_before):
        """Per output: its valid part of this step (None if nothing is valid yet)."""
        out = []
        for leaf, info in zip(leaves, self.out_infos):
            if info.kind == TIME:
                skip = max(info.warmup - info.streamed(frames_before), 0)
                n = leaf.shape[info.dim]
                out.append(leaf.narrow(info.dim, skip, n - skip) if skip < n else None)
            elif info.per_step:
                out.append(leaf if frames_before + self.step_frames >= info.ready else None)
            else:
                out.append(leaf)
        return out

    @staticmethod
    def _join(parts, info):
        if info.kind != TIME:
            return parts[-1]
        parts = [p for p in parts if p is not None]
        return torch.cat(parts, info.dim) if parts else None

    def _chunk_shape(self, batch, frames):
        """Shape of `frames` frames of the fastest input (the only input of most models)."""
        return self._fastest.chunk_shape(batch, frames)

    def _frames(self, leaves) -> int:
        """Frames of the fastest input that `leaves` (checked) hold."""
        s, t = next((s, t) for s, t in zip(self.inputs.specs, leaves) if s.is_time)
        return int(t.shape[s.time_dim] / s.rate)

    def _leaves(self, x, exact: bool) -> list:
        """The input leaves of a chunk (or clip) `x`, each checked against its input."""
        if self.inputs.single:
            if not isinstance(x, torch.Tensor):
                raise CompileError(f"expected a tensor chunk, got {type(x).__name__}")
            leaves = [x]
        else:
            leaves = self.inputs.leaves(x, "chunk")
        steps = {self._check_leaf(t, s, exact) for t, s in zip(leaves, self.inputs.specs)} - {None}
        batches = {t.shape[s.batch_dim] if t.dim() > s.batch_dim else 0 for t, s in zip(leaves, self.inputs.specs)}
        if len(steps) > 1 or len(batches) > 1:
            shares = ", ".join(f"{s.frames(self.step_frames)} of {s.name}" for s in self.inputs.time)
            raise CompileError(f"the inputs of this chunk hold different numbers of steps ({shares} "
                               "frames make one step) or different batch sizes",
                               hint="give every time input the same number of steps, and every "
                                    "input the same batch size")
        return leaves

    def _check_leaf(self, x, spec, exact: bool) -> int | None:
        """Checks one input of a chunk; returns the steps it holds (None for a side input)."""
        name = "" if self.inputs.single else f" {spec.name}"
        if not isinstance(x, torch.Tensor):
            raise CompileError(f"input{name} must be a tensor, got {type(x).__name__}")
        share = spec.frames(self.step_frames)
        want = spec.chunk_shape(x.shape[spec.batch_dim] if x.dim() > spec.batch_dim else 0, 0)
        t = x.shape[spec.time_dim] if spec.is_time and x.dim() > spec.time_dim else None
        if spec.is_time:
            want[spec.time_dim] = t
        if list(x.shape) != want or (spec.is_time and (t or 0) <= 0):
            shown = spec.chunk_shape("N", 0)
            if spec.is_time:
                shown[spec.time_dim] = "T"
            raise CompileError(f"chunk{name} of shape {tuple(x.shape)} does not fit "
                               f"{'frames' if spec.is_time else 'the side input'} of shape "
                               f"({', '.join(map(str, shown))})",
                               hint=f"pass {share} frame{'s' * (share != 1)} on axis {spec.time_dim}, "
                                    f"the streams on axis {spec.batch_dim}" if spec.is_time
                                    else "pass it as in the example")
        dtype = self.dtype if spec.dtype.is_floating_point else spec.dtype
        if x.dtype != dtype:
            raise CompileError(f"chunk{name} dtype {x.dtype} differs from the compiled {dtype}",
                               hint=f"convert with x.to({dtype})")
        if x.device.type != self.device.type:
            raise CompileError(f"chunk{name} on {x.device}, the model on {self.device}",
                               hint="move the chunk with x.to(co.device), or the model with co.to(device)")
        if not spec.is_time:
            return None
        if (exact and t != share) or t % share:
            raise CompileError(f"a step takes {share} frame{'s' * (share != 1)} of input{name} (or a "
                               f"multiple, through __call__), got {t}", hint="buffer frames into whole steps")
        return t // share

"""ContinualModel: the eager continual form of a compiled model (docs/design.md, "Public API")."""
from __future__ import annotations

import torch
from torch.utils import _pytree as pytree

from .errors import CompileError
from .timeinfo import TIME, TimeInfo


class ContinualModel(torch.nn.Module):
    """Reads `step_frames` frames per call and keeps explicit state between calls.

    >>> co = cocompile.compile(model, torch.randn(1, 3, 16, 32, 32))
    >>> y = co.forward_steps(clip)                 # == model(clip)            (E1)
    >>> state = co.initial_state(batch_size=2)
    >>> y, state = co.step(clip[:, :, :co.step_frames], state)
    """

    def __init__(self, program, step_fn, out_spec, out_infos: list[TimeInfo], example: torch.Tensor,
                 time_dim: int, approximate: bool):
        super().__init__()
        self.program, self._step_fn = program, step_fn
        self.out_spec, self.out_infos = out_spec, out_infos
        self.specs = program.specs
        self.step_frames, self.clip_length = program.step_frames, program.clip_length
        self.time_dim = time_dim
        self.frame_shape = tuple(s for i, s in enumerate(example.shape) if i not in (0, time_dim))
        self.dtype = example.dtype
        self.approximate = any(i.approx for i in out_infos)
        # E2 holds exactly: no temporal zero padding, no recurrence over the whole stream
        self.exact_sliding = not any(i.padded or i.recurrent for i in out_infos)
        self.delay = max([i.lag() for i in out_infos if i.kind == TIME] + [0])
        # input frames an output depends on; math.inf (unbounded) behind a recurrent layer
        self.receptive_field = max([i.receptive_field for i in out_infos if i.kind != "static"] + [1])
        self._state = None
        self._frames_seen = 0

    # -- explicit form ---------------------------------------------------------------------------------
    def initial_state(self, batch_size: int = 1) -> tuple[torch.Tensor, ...]:
        """All-zero state (the zero state is the start-of-clip padding) and a zero frame counter."""
        return tuple(torch.zeros((batch_size, *s.shape), dtype=s.dtype) for s in self.specs)

    def step(self, x_chunk: torch.Tensor, state: tuple) -> tuple:
        """One step: `step_frames` frames in, (outputs, next state) out. Outputs include warm-up
        frames; `valid_from` says which are valid."""
        self._check_chunk(x_chunk, exact=True)
        flat = self._step_fn(x_chunk, *state)
        n = len(self.out_infos)
        return pytree.tree_unflatten(list(flat[:n]), self.out_spec), tuple(flat[n:])

    def flush(self, state: tuple):
        """Outputs still missing after a whole clip: per-frame outputs' last frames (from each
        op's own end padding), clip-level outputs' final values."""
        x = torch.zeros(self._chunk_shape(state[0].shape[0], 0), dtype=self.dtype)
        with torch.no_grad():
            flat = self.program.flush(x, *state)
        return pytree.tree_unflatten(list(flat), self.out_spec)

    # -- artifacts -------------------------------------------------------------------------------------
    def export(self, path):
        """Write the step to `path` (.onnx, .pt TorchScript, .pt2 torch.export) with explicit state
        in/out and the metadata of `metadata()`; returns the path.

        >>> co.export("co_model.onnx")
        'co_model.onnx'
        """
        from .export import export
        return export(self, path)

    def metadata(self) -> dict:
        """The JSON description every artifact carries: step size, inputs, outputs with their
        warm-up and exactness, states with shape/dtype/init (see cocompile.metadata)."""
        from .metadata import metadata
        return metadata(self)

    # -- stateful form ---------------------------------------------------------------------------------
    def reset(self) -> None:
        self._state, self._frames_seen = None, 0

    def forward(self, x_chunk: torch.Tensor):
        """Stateful step over a chunk of a multiple of `step_frames` frames. Per-frame outputs come
        back as their valid frames (None before the first), clip-level outputs as the value over
        the last clip (None until enough frames were seen)."""
        self._check_chunk(x_chunk, exact=False)
        if self._state is None:
            self._state = self.initial_state(x_chunk.shape[0])
        pieces = []
        for chunk in x_chunk.split(self.step_frames, dim=self.time_dim):
            before = self._frames_seen
            outs, self._state = self.step(chunk, self._state)
            self._frames_seen += self.step_frames
            pieces.append(self._valid(pytree.tree_leaves(outs), before))
        leaves = [self._join([p[i] for p in pieces], info) for i, info in enumerate(self.out_infos)]
        return pytree.tree_unflatten(leaves, self.out_spec)

    def forward_steps(self, clip: torch.Tensor, flush: bool = True):
        """Step through `clip` from a fresh state; with flush, returns exactly what model(clip)
        returns (E1): per-frame outputs frame for frame, clip-level outputs at the final step."""
        self._check_chunk(clip, exact=False)
        if flush and clip.shape[self.time_dim] != self.clip_length:
            raise CompileError(f"flush reproduces the model on clips of the compiled length "
                               f"{self.clip_length}, got {clip.shape[self.time_dim]} frames",
                               hint="pass flush=False to stream a longer input")
        state, steps = self.initial_state(clip.shape[0]), []
        with torch.no_grad():
            for chunk in clip.split(self.step_frames, dim=self.time_dim):
                outs, state = self.step(chunk, state)
                steps.append(pytree.tree_leaves(outs))
        final = pytree.tree_leaves(self.flush(state)) if flush else steps[-1]
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
        shape = [batch, *self.frame_shape]
        shape.insert(self.time_dim, frames)
        return shape

    def _check_chunk(self, x, exact: bool):
        if not isinstance(x, torch.Tensor):
            raise CompileError(f"expected a tensor chunk, got {type(x).__name__}")
        t = x.shape[self.time_dim] if x.dim() > self.time_dim else -1
        want = self._chunk_shape(x.shape[0] if x.dim() else 0, t)
        if list(x.shape) != want or t <= 0:
            raise CompileError(f"chunk of shape {tuple(x.shape)} does not fit frames of shape "
                               f"{tuple(self._chunk_shape('N', 'T'))}",
                               hint=f"pass (N, ...) with {self.step_frames} frames on axis {self.time_dim}")
        if (exact and t != self.step_frames) or t % self.step_frames:
            raise CompileError(f"a step takes {self.step_frames} frames (or a multiple, through "
                               f"__call__), got {t}", hint="buffer frames into whole steps")
        if x.dtype != self.dtype:
            raise CompileError(f"chunk dtype {x.dtype} differs from the compiled {self.dtype}",
                               hint=f"convert with x.to({self.dtype})")

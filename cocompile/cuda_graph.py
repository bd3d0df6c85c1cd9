"""A continual model's step captured as a CUDA graph: one replay per step instead of one kernel
launch per op, which is most of a small step's time on a GPU.

A step's shapes are static for a given number of streams, so the whole step (and the copy of the
next state into the state buffers) is captured once on static buffers; a call copies the new
frames into the input buffer and replays the graph. The state lives in the graph's buffers.

>>> step = co.to("cuda").cuda_graph(batch_size=16)
>>> for chunk in chunks:                 # (16, ...) with co.step_frames frames each
...     y = step(chunk)                  # the outputs of co.step(chunk, state), state kept inside
>>> step.reset()                         # every stream back to the zero state
"""
from __future__ import annotations

import torch
from torch.utils import _pytree as pytree

from .errors import CompileError, first_line

WARMUP = 3       # eager steps on a side stream before capture (kernel choice, allocator pools)


class GraphedStep:
    """`co.step` for `batch_size` streams replayed from one captured CUDA graph."""

    def __init__(self, co, batch_size: int = 1):
        if co.device.type != "cuda" or not torch.cuda.is_available():
            raise CompileError(f"a CUDA graph replays the step on a CUDA device; the model is on "
                               f"{co.device}" + ("" if torch.cuda.is_available() else
                                                 " and torch sees no CUDA device"),
                               hint="move the model first: co.to('cuda').cuda_graph(batch_size)")
        self.co, self.batch_size = co, batch_size
        self.inputs = [t.zero_() for t in co.example_inputs(batch_size)]
        self.state = co.initial_state(batch_size)
        self.graph = torch.cuda.CUDAGraph()
        self._capture()

    def _capture(self) -> None:
        co, n = self.co, len(self.co.out_infos)
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.no_grad(), torch.cuda.stream(side):
            for _ in range(WARMUP):
                co._step_fn(*self.inputs, *self.state)
        torch.cuda.current_stream().wait_stream(side)
        try:
            with torch.no_grad(), torch.cuda.graph(self.graph):
                flat = co._step_fn(*self.inputs, *self.state)
                for buf, new in zip(self.state, flat[n:]):  # the next state becomes the state
                    buf.copy_(new)
        except RuntimeError as err:   # e.g. an op that synchronises with the host
            raise CompileError(f"the step cannot be captured as a CUDA graph: {first_line(err)}",
                               hint="step with co.step (eager) instead") from None
        self.outputs = list(flat[:n])
        self.reset()                  # the warm-up and the capture advanced the state

    def __call__(self, x_chunk):
        """One step of every stream: the outputs (including warm-up frames, as co.step returns
        them), fresh tensors that the next call does not overwrite."""
        leaves = self.co._leaves(x_chunk, exact=True)
        for buf, x in zip(self.inputs, leaves):
            buf.copy_(x)
        self.graph.replay()
        return pytree.tree_unflatten([t.clone() for t in self.outputs], self.co.out_spec)

    def reset(self) -> None:
        """Every stream back to the zero state (the start of a clip)."""
        for t in self.state:
            t.zero_()

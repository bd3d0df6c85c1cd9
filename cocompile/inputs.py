"""The model's inputs: which carry time and at what rate, which are side inputs, and their names.

`example_input` is one tensor, a tuple of positional inputs, or any pytree of tensors the model
takes (a list `[slow, fast]`); `time_dim` is an int for every input or the same structure with
None for side inputs (sequence lengths, an embedding, a mask: constant along time, passed with
every step). `batch_dim` names each input's batch axis the same way (an int for every input, or
the same structure; side inputs have one too), 0 by default: time-major (T, N, F) frames take
time_dim=0, batch_dim=1. Specs describe the inputs in the user's layout; `batch_first()` gives
the layout the captured graph takes (each batch axis moved to 0, the other axes in order).
Each time input's rate is its clip length over the longest one's (a Slow pathway of
4 frames beside a Fast one of 16: rate 1/4); a step brings `step_frames` frames of the fastest
input and each slower input's share of them.

>>> inputs = Inputs.describe(model, [slow, fast], time_dim=2)
>>> [(s.name, s.rate) for s in inputs.specs]
[('x.0', 1/4), ('x.1', 1)]
"""
from __future__ import annotations

import dataclasses
import inspect
from dataclasses import dataclass

import sympy
import torch
from torch.utils import _pytree as pytree

from .errors import CompileError


@dataclass(frozen=True)
class InputSpec:
    """One input tensor: name, time axis (None: side input), frames in the example clip, rate
    (frames per frame of the fastest input), example shape without the batch axis, dtype, and
    the batch axis. Axes count in the user's layout, the batch axis included."""

    name: str
    time_dim: int | None
    length: int
    rate: sympy.Rational
    shape: tuple
    dtype: torch.dtype
    batch_dim: int = 0

    @property
    def is_time(self) -> bool:
        return self.time_dim is not None

    def frames(self, fastest: int) -> int:
        """This input's frames for `fastest` frames of the fastest input."""
        return int(self.rate * fastest)

    def chunk_shape(self, batch, fastest: int) -> list:
        """Shape of a chunk of `fastest` frames (of the fastest input), or of a side input."""
        shape = list(self.shape)
        shape.insert(self.batch_dim, batch)
        if self.is_time:
            shape[self.time_dim] = self.frames(fastest)
        return shape

    def frame_shape(self) -> tuple:
        """One frame (time and batch axes left out); a side input's shape without the batch."""
        return tuple(s for i, s in enumerate(self.chunk_shape(None, 0))
                     if i not in (self.time_dim, self.batch_dim))

    def batch_first(self) -> "InputSpec":
        """This input with its batch axis moved to 0 (x.movedim(batch_dim, 0)), the layout the
        captured graph takes; `shape` is unchanged (the other axes keep their order)."""
        if not self.is_time:
            return dataclasses.replace(self, batch_dim=0)
        return dataclasses.replace(self, time_dim=self.time_dim + (self.time_dim < self.batch_dim),
                                   batch_dim=0)


@dataclass(frozen=True)
class Inputs:
    """Every input leaf of the model's arguments, in pytree order, and the structure they form."""

    specs: tuple[InputSpec, ...]
    tree: pytree.TreeSpec          # structure of example_input
    positional: bool               # example_input was a tuple of positional arguments

    @classmethod
    def describe(cls, model, example, time_dim, batch_dim=0) -> "Inputs":
        """Check and describe `example` (see the module docstring); CompileError with the fix."""
        leaves, tree = pytree.tree_flatten(example)
        _check_leaves(example, leaves)
        names = _names(model, example)
        batches = [_batch_axis(t, b, name) for t, b, name in
                   zip(leaves, _per_leaf(batch_dim, "batch_dim", example, tree), names)]
        dims = [_time_axis(t, d, name, b) for t, d, name, b in
                zip(leaves, _per_leaf(time_dim, "time_dim", example, tree), names, batches)]
        lengths = [t.shape[d] for t, d in zip(leaves, dims) if d is not None]
        if not lengths:
            raise CompileError("no input carries time (every time_dim is None)",
                               hint="give the axis that indexes frames of at least one input")
        longest = max(lengths)
        specs = []
        for t, d, name, b in zip(leaves, dims, names, batches):
            n = t.shape[d] if d is not None else 0
            if d is not None and longest % n:
                raise CompileError(f"input {name} has {n} frames and the longest input {longest}: not "
                                   "an integer rate (every input must have 1/k of the longest's frames)",
                                   hint=f"give {name} a divisor of {longest} frames, e.g. "
                                        f"{_divisor_near(longest, n)}")
            shape = tuple(s for i, s in enumerate(t.shape) if i != b)
            specs.append(InputSpec(name, d, n, sympy.Rational(n, longest) if d is not None else
                                   sympy.Integer(0), shape, t.dtype, b))
        return cls(tuple(specs), tree, isinstance(example, tuple))

    # -- the structure ------------------------------------------------------------------------------
    @property
    def clip_length(self) -> int:
        """Frames of the fastest input in the example clip."""
        return max(s.length for s in self.specs)

    @property
    def time(self) -> list[InputSpec]:
        return [s for s in self.specs if s.is_time]

    @property
    def single(self) -> bool:
        return len(self.specs) == 1 and self.tree.num_leaves == 1 and not self.positional

    def batch_size(self, leaves: list) -> int:
        """Streams in `leaves` (inputs of example_input's structure): the first one's batch axis."""
        return leaves[0].shape[self.specs[0].batch_dim]

    def args(self, value) -> tuple:
        """The positional arguments model(*args) takes for a value of example_input's structure."""
        return value if self.positional else (value,)

    def leaves(self, value, what: str = "input") -> list:
        """The leaves of `value`, which must have example_input's structure."""
        leaves, tree = pytree.tree_flatten(value)
        if tree != self.tree:
            raise CompileError(f"the {what} has the structure {tree_text(value)}; the model was "
                               f"compiled for {self.describe_tree()}",
                               hint="pass the inputs in the structure of the example input, "
                                    f"one entry per input ({', '.join(s.name for s in self.specs)})")
        return leaves

    def unflatten(self, leaves):
        return pytree.tree_unflatten(list(leaves), self.tree)

    def describe_tree(self) -> str:
        return tree_text(self.unflatten([s.name for s in self.specs]))

    def steps(self, leaves: list, step_frames: int) -> list[list]:
        """Per step of `step_frames` fastest frames, each input's chunk (side inputs whole)."""
        n = max(t.shape[s.time_dim] // s.frames(step_frames) for t, s in zip(leaves, self.specs)
                if s.is_time)
        return [[t.narrow(s.time_dim, k * s.frames(step_frames), s.frames(step_frames))
                 if s.is_time else t for t, s in zip(leaves, self.specs)] for k in range(n)]

    def window(self, leaves: list, start: int, frames: int) -> list:
        """Each time input's frames [start, start + frames) in fastest-input frames."""
        return [t.narrow(s.time_dim, s.frames(start), s.frames(frames)) if s.is_time else t
                for t, s in zip(leaves, self.specs)]


def tree_text(value) -> str:
    """A short picture of a pytree of tensors: `[tensor(1, 3, 4, 64, 64), tensor(...)]`."""
    leaves, tree = pytree.tree_flatten(value)
    shown = [f"tensor{tuple(t.shape)}" if isinstance(t, torch.Tensor) else
             (t if isinstance(t, str) else type(t).__name__) for t in leaves]
    text = str(pytree.tree_unflatten(shown, tree))
    return text.replace("'", "")


def _check_leaves(example, leaves) -> None:
    if not leaves or not all(isinstance(t, torch.Tensor) for t in leaves):
        kinds = sorted({type(t).__name__ for t in leaves if not isinstance(t, torch.Tensor)})
        raise CompileError(f"example_input must be a tensor, a tuple of tensors (positional inputs) "
                           f"or a list/dict of tensors (got {type(example).__name__}"
                           + (f" holding {', '.join(kinds)}" if kinds else "") + ")",
                           hint="pass the clip tensor, e.g. torch.randn(1, 3, 16, 112, 112), or the "
                                "inputs the model takes")


def _per_leaf(dims, what: str, example, tree) -> list:
    """`dims` (one value, or example_input's structure) as one value per input leaf."""
    flat = pytree._broadcast_to_and_flatten(dims, tree)
    if flat is None or len(flat) != tree.num_leaves:
        side = " with None for inputs that carry no time" if what == "time_dim" else \
            " (side inputs have a batch axis too)"
        raise CompileError(f"{what}={dims!r} does not match the structure of example_input "
                           f"({tree_text(example)})",
                           hint=f"pass one int for every input, or the same structure as example_input{side}")
    return flat


def _batch_axis(t: torch.Tensor, b, name: str) -> int:
    if not isinstance(b, int) or isinstance(b, bool):
        raise CompileError(f"batch_dim for input {name} is {b!r}, not an axis",
                           hint="an int axis: the one that indexes independent streams (default 0)")
    if not -t.dim() <= b < t.dim():
        raise CompileError(f"batch_dim={b} is not an axis of input {name} of shape {tuple(t.shape)}",
                           hint="pass batch_dim= the axis that indexes streams, e.g. 1 for "
                                "time-major (T, N, F) frames")
    return b % t.dim()


def _time_axis(t: torch.Tensor, d, name: str, batch: int = 0) -> int | None:
    if d is None:
        return None
    if not isinstance(d, int) or isinstance(d, bool):
        raise CompileError(f"time_dim for input {name} is {d!r}, not an axis",
                           hint="an int axis, or None for an input without time")
    ndim = t.dim()
    if not -ndim <= d < ndim:
        raise CompileError(f"time_dim={d} is not an axis of input {name} of shape {tuple(t.shape)}",
                           hint="pass time_dim= the axis that indexes frames, e.g. 2 for (N, C, T, H, W)")
    if d % ndim == batch:
        example = ("time_dim=0, batch_dim=1 for time-major (T, N, F) frames" if batch == 0 else
                   "batch_dim=0 if the streams are on axis 0, or time_dim= another axis")
        raise CompileError(f"time_dim={d} is not an axis of input {name} of shape {tuple(t.shape)} "
                           f"that can carry time: it is the batch axis (batch_dim={batch})",
                           hint=f"time and batch must be different axes: {example}")
    if not t.is_floating_point():
        raise CompileError(f"input {name} has dtype {t.dtype}; continual steps need floating point "
                           "frames", hint=f"pass {name}.float(), or time_dim None if it carries no time")
    return d % ndim


def _names(model, example) -> list[str]:
    """`x` for a single tensor; else per leaf the forward() argument's name (or its position) and
    the leaf's path inside it: `x.0`, `x.1`, `lengths`, `feats.audio`."""
    args = example if isinstance(example, tuple) else (example,)
    params = _params(model)
    if not isinstance(example, tuple) and isinstance(example, torch.Tensor):
        return ["x"]
    names, rest = [], _var_positional(model)
    for i, arg in enumerate(args):
        base = params[i] if i < len(params) else (f"{rest}.{i - len(params)}" if rest else f"x{i}")
        for path, _ in pytree.tree_flatten_with_path(arg)[0]:
            names.append(".".join([base, *(_key(k) for k in path)]))
    return names


def _params(model) -> list[str]:
    forward = getattr(model, "forward", None)
    try:
        sig = inspect.signature(forward)
    except (TypeError, ValueError):
        return []
    return [p.name for p in sig.parameters.values()
            if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]


def _var_positional(model) -> str | None:
    """The name of forward()'s *args parameter, if it has one."""
    try:
        sig = inspect.signature(getattr(model, "forward", None))
    except (TypeError, ValueError):
        return None
    return next((p.name for p in sig.parameters.values() if p.kind == p.VAR_POSITIONAL), None)


def _key(k) -> str:
    for attr in ("idx", "key", "name"):
        if hasattr(k, attr):
            return str(getattr(k, attr))
    return str(k)


def _divisor_near(longest: int, n: int) -> int:
    return min((d for d in range(1, longest + 1) if longest % d == 0), key=lambda d: abs(d - n))

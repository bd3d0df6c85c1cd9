"""`Session`: one ONNX artifact of cocompile in onnxruntime, driven by its own metadata.

numpy and onnxruntime only: nothing here (or anywhere in cocompile.runtime) imports torch.

>>> sess = Session("co_model.onnx")
>>> state = sess.initial_state(batch=2)
>>> outputs, state = sess.step(x_chunk, state)      # x_chunk: sess.batched_shape(2)

Each input and output has its batch axis where the metadata's "batch_axis" says (0 unless the
model was compiled with batch_dim, e.g. 1 for time-major (T, N, F) frames); states are
batch-first.

An artifact of a model with several inputs (e.g. SlowFast's `[slow, fast]`, or frames and a side
input) takes one array per input, in `sess.inputs` order (a list, or a dict by name).
"""
from __future__ import annotations

import json
from dataclasses import dataclass

import numpy as np
import onnxruntime as ort

KEY = "cocompile"
FORMAT_VERSIONS = (1,)


@dataclass(frozen=True)
class InputInfo:
    """One model input: its chunk per step (time inputs: `frames_per_step` frames on `time_axis`;
    side inputs, time_axis None, whole), and one frame's shape."""

    name: str
    shape: tuple            # chunk shape without the batch axis
    dtype: np.dtype
    time_axis: int | None   # with the batch axis counted
    frames_per_step: int
    batch_axis: int = 0     # where the streams are stacked

    @classmethod
    def from_meta(cls, d: dict) -> "InputInfo":
        axis = d.get("batch_axis", 0)
        shape = tuple(s for i, s in enumerate(d["shape"]) if i != axis)
        return cls(d["name"], shape, np.dtype(d["dtype"]), d.get("time_axis"),
                   d.get("frames_per_step", 0), axis)

    @property
    def is_time(self) -> bool:
        return self.time_axis is not None

    @property
    def frame_shape(self) -> tuple:
        return tuple(s for i, s in enumerate(self.batched_shape(1))
                     if i not in (self.time_axis, self.batch_axis))

    def batched_shape(self, batch) -> tuple:
        """The chunk's shape for `batch` streams (`batch` on the batch axis)."""
        shape = list(self.shape)
        shape.insert(self.batch_axis, batch)
        return tuple(shape)

    def batch_of(self, x: np.ndarray) -> int:
        return x.shape[self.batch_axis]

    def check(self, x, batch: int | None = None) -> None:
        """x must be an array of shape batched_shape(streams) and this input's dtype."""
        expected = f"({', '.join(map(str, self.batched_shape('batch')))}) {self.dtype}"
        if not isinstance(x, np.ndarray):
            raise ValueError(f"{self.name} must be a numpy array of shape {expected}, got {type(x).__name__}")
        if (x.ndim != len(self.shape) + 1 or x.shape != self.batched_shape(x.shape[self.batch_axis])
                or not x.shape[self.batch_axis]):
            frames = (f" ({self.frames_per_step} frame{'s' * (self.frames_per_step != 1)} on axis "
                      f"{self.time_axis})" if self.is_time else "")
            raise ValueError(f"{self.name} has shape {x.shape}, expected {expected}{frames}")
        if x.dtype != self.dtype:
            raise ValueError(f"{self.name} has dtype {x.dtype}, expected {self.dtype} (convert with x.astype)")
        if batch is not None and self.batch_of(x) != batch:
            raise ValueError(f"{self.name} holds {self.batch_of(x)} streams, the other inputs {batch}")


@dataclass(frozen=True)
class OutputInfo:
    """When one output is valid (see cocompile.metadata): kind, time axis, rate and warm-up."""

    name: str
    kind: str               # "time", "clip", "window" or "static"
    time_axis: int | None   # with the batch axis counted
    rate: tuple[int, int]   # output frames per input frame, as (num, den)
    warmup: int             # streamed frames of this output before its first valid one
    ready: int              # clip/window outputs: input frames needed before the value is valid
    batch_axis: int | None = 0   # where the streams are stacked; None: the output has no batch axis

    @classmethod
    def from_meta(cls, d: dict) -> "OutputInfo":
        return cls(d["name"], d["kind"], d.get("time_axis"), (d.get("rate_num", 1), d.get("rate_den", 1)),
                   d.get("warmup", 0), d.get("ready", 0), d.get("batch_axis", 0))

    def stream(self, value: np.ndarray, row: int) -> np.ndarray:
        """Stream `row` of a batched `value`, its batch axis kept (of size 1)."""
        return np.take(value, [row], axis=self.batch_axis)

    def valid_part(self, value: np.ndarray, frames_before: int, step_frames: int):
        """The valid part of this step's `value` (one stream, batch axis kept), or None."""
        if self.kind == "time":
            streamed = frames_before * self.rate[0] // self.rate[1]
            skip = max(self.warmup - streamed, 0)
            n = value.shape[self.time_axis]
            if skip >= n:
                return None
            return value if skip == 0 else np.take(value, np.arange(skip, n), axis=self.time_axis)
        if self.kind in ("clip", "window"):
            return value if frames_before + step_frames >= self.ready else None
        return value


class Session:
    """An ONNX artifact: `step(x, state) -> (outputs, state)` with checked inputs.

    meta           the artifact's JSON metadata (dict)
    inputs         the model's inputs (InputInfo), in the order step() takes them
    step_frames    frames per step (of the fastest input)
    chunk_shape, frame_shape, time_axis, batch_axis, dtype: those of the first input that runs at
                   the full frame rate (`x` for a model of one input); chunk_shape leaves the
                   batch axis out (batched_shape(n) has it)
    """

    def __init__(self, path: str, threads: int | None = None, providers=None):
        opts = ort.SessionOptions()
        if threads:
            opts.intra_op_num_threads, opts.inter_op_num_threads = threads, 1
        self.path = path
        self._sess = ort.InferenceSession(path, opts, providers=providers or ["CPUExecutionProvider"])
        self.meta = _read_meta(self._sess, path)
        self.inputs = [InputInfo.from_meta(d) for d in self.meta["inputs"]]
        self.step_frames = self.meta["step_frames"]
        main = next(i for i in self.inputs if i.frames_per_step == self.step_frames)
        self.input_name, self.time_axis, self.dtype = main.name, main.time_axis, main.dtype
        self.chunk_shape, self.frame_shape, self.batch_axis = main.shape, main.frame_shape, main.batch_axis
        self.batched_shape = main.batched_shape
        self.states = self.meta["states"]
        self.fixed_batch = self.meta.get("batch")      # None: any batch size
        self.outputs = [OutputInfo.from_meta(o) for o in self.meta["outputs"]]
        self.input_names = [i.name for i in self.inputs] + [s["name"] for s in self.states]
        self.output_names = [o.name for o in self.outputs] + [s["output"] for s in self.states]
        self._check_graph()

    # -- explicit state -----------------------------------------------------------------------------
    def initial_state(self, batch: int | None = None) -> tuple[np.ndarray, ...]:
        """The zero state of `batch` fresh streams (every state's init is "zeros"); by default one
        stream, or the batch size the artifact is fixed to."""
        batch = batch or self.fixed_batch or 1
        return tuple(np.zeros((batch, *s["shape"][1:]), dtype=s["dtype"]) for s in self.states)

    def step(self, x, state: tuple) -> tuple[tuple, tuple]:
        """One step of `step_frames` frames for a batch: (outputs incl. warm-up, next state). x is
        the chunk, or for a model of several inputs one array per input (a list in `inputs`
        order, or a dict by name)."""
        xs = self.arrays(x)
        self.check_inputs(xs)
        self.check_state(state, self.inputs[0].batch_of(xs[0]))
        flat = self.run([*xs, *state])
        n = len(self.outputs)
        return tuple(flat[:n]), tuple(flat[n:])

    def arrays(self, x) -> list:
        """The step's input arrays in `inputs` order, from an array (one input), a list or a dict."""
        if len(self.inputs) == 1 and isinstance(x, np.ndarray):
            return [x]
        if isinstance(x, dict):
            missing = [i.name for i in self.inputs if i.name not in x]
            if missing or len(x) != len(self.inputs):
                raise ValueError(f"inputs {sorted(x)} do not match the model's "
                                 f"{[i.name for i in self.inputs]}")
            return [x[i.name] for i in self.inputs]
        if not isinstance(x, (list, tuple)) or len(x) != len(self.inputs):
            got = f"{len(x)} arrays" if isinstance(x, (list, tuple)) else type(x).__name__
            raise ValueError(f"the model takes {len(self.inputs)} inputs "
                             f"({', '.join(i.name for i in self.inputs)}), got {got}")
        return list(x)

    def run(self, arrays: list) -> list[np.ndarray]:
        """Raw call: x and the states in, outputs and next states out (no checks)."""
        return self._sess.run(self.output_names, dict(zip(self.input_names, arrays)))

    # -- checks ---------------------------------------------------------------------------------------
    def check_chunk(self, x) -> None:
        """x must be an array of shape batched_shape(batch) and dtype `dtype`."""
        self.check_inputs([x] if len(self.inputs) == 1 else [x, *[None] * (len(self.inputs) - 1)])

    def check_inputs(self, xs: list) -> None:
        """Each array fits its input (None: not checked), all with one batch size."""
        batch = None
        for info, x in zip(self.inputs, xs):
            if x is not None:
                info.check(x, batch)
                batch = info.batch_of(x)
        if self.fixed_batch and batch is not None and batch != self.fixed_batch:
            raise ValueError(f"this artifact serves exactly {self.fixed_batch} streams per call "
                             f"(the model pins its batch size), got a batch of {batch}")

    def check_state(self, state, batch: int) -> None:
        """state must hold one array per state tensor, each (batch, *shape) of its dtype."""
        if len(state) != len(self.states):
            raise ValueError(f"state has {len(state)} arrays, expected {len(self.states)} "
                             "(use initial_state(batch))")
        for value, spec in zip(state, self.states):
            want = (batch, *spec["shape"][1:])
            if not isinstance(value, np.ndarray) or value.shape != want or value.dtype != spec["dtype"]:
                got = (value.shape, value.dtype) if isinstance(value, np.ndarray) else type(value).__name__
                raise ValueError(f"{spec['name']} is {got}, expected shape {want} dtype {spec['dtype']}")

    def _check_graph(self) -> None:
        have = [i.name for i in self._sess.get_inputs()]
        if have != self.input_names:
            raise ValueError(f"{self.path}: graph inputs {have} do not match the metadata {self.input_names}")

    # -- streams ------------------------------------------------------------------------------------
    def streams(self, n: int):
        """`n` independent streams served in one batched call; see `Streams`."""
        from .streams import Streams
        return Streams(self, n)

    def stream(self):
        """One stream fed frame by frame; see `Stream`."""
        from .streams import Stream
        return Stream(self)


def _read_meta(sess, path: str) -> dict:
    text = sess.get_modelmeta().custom_metadata_map.get(KEY)
    if text is None:
        raise ValueError(f"{path} has no metadata_props['{KEY}']: not an artifact written by cocompile")
    meta = json.loads(text)
    if meta.get("format_version") not in FORMAT_VERSIONS:
        raise ValueError(f"{path}: metadata format_version {meta.get('format_version')} is not one of "
                         f"{FORMAT_VERSIONS}; upgrade cocompile.runtime")
    return meta

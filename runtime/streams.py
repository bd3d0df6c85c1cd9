"""Many independent streams, fed one frame at a time, served by one batched session call.

Each stream buffers its frames until a whole step (`step_frames`) is there; the streams whose step
is complete run together in one call, their state rows gathered and scattered back. A stream's
validity is read from its own frame counter (the `state.frames` state), so resetting one stream
restarts its warm-up without touching the others.

A model of several inputs is fed one entry per input (a list in `session.inputs` order, or a dict
by name): a time input's entry is one new frame per stream, or None when that input has no frame
now (a slower input gets a frame every few pushes); a side input's entry is its value per stream,
kept until it is given again. Each input is buffered at its own rate; a stream steps once every
time input holds its frames of the step.

>>> streams = Session("co_model.onnx").streams(4)
>>> for frames in camera_frames():                 # (4, *frame_shape): one new frame per stream
...     for i, y in enumerate(streams.push(frames)):
...         if y is not None:
...             handle(i, y)
>>> streams.reset(2)                               # stream 2 starts over; 0, 1, 3 carry on
"""
from __future__ import annotations

import numpy as np


class Streams:
    """`n` streams of one Session. `push(frames)` returns, per stream, its newly valid outputs
    (None while nothing is valid): the output itself for a one-output model, else a tuple with
    None for outputs still warming up. Values have no batch axis (removed from where the
    metadata's "batch_axis" says): per-frame outputs hold their valid frames on `time_axis`, one
    less if the batch axis came before it. Frames are pushed per stream, without batch or time
    axis, whatever the artifact's layout: each step stacks them along its time and batch axes.
    An output without a batch axis (null: the model reduced or merged its batch) cannot be
    split into streams, so such an artifact is refused here (Session.step serves it)."""

    def __init__(self, session, n: int):
        if n < 1:
            raise ValueError(f"need at least one stream, got {n}")
        if session.fixed_batch and n != session.fixed_batch:
            raise ValueError(f"this artifact serves exactly {session.fixed_batch} streams (the model "
                             f"pins its batch size), asked for {n}")
        mixed = [o.name for o in session.outputs if o.batch_axis is None and o.kind != "static"]
        if mixed:
            raise ValueError(f"output(s) {', '.join(mixed)} have no batch axis (the model reduces or "
                             "merges its streams there), so they cannot be split per stream; step "
                             "the batch with Session.step")
        self.session, self.n = session, n
        self.state = list(session.initial_state(n))
        # per input: its frames of the coming step (time inputs) or its value (side inputs)
        self._buf = [np.zeros((n, i.frames_per_step, *i.frame_shape) if i.is_time else (n, *i.shape),
                              dtype=i.dtype) for i in session.inputs]
        self._fill = np.zeros((len(session.inputs), n), dtype=np.int64)     # side inputs: 1 once set
        self._need = np.array([i.frames_per_step if i.is_time else 1 for i in session.inputs])
        self._counter = [s["name"] for s in session.states].index(session.meta["frame_counter"])

    def push(self, frames, streams=None) -> list:
        """Append one frame to each stream (or to each of `streams`, in that order); run a step for
        every stream whose buffers are full. Returns one entry per stream of the pool (n)."""
        ids = np.arange(self.n) if streams is None else np.asarray(streams, dtype=np.int64)
        if len(np.unique(ids)) != len(ids) or (len(ids) and not 0 <= ids.min() <= ids.max() < self.n):
            raise ValueError(f"streams must be distinct indices in [0, {self.n}), got {ids.tolist()}")
        entries = self._entries(frames)
        for k, (info, value) in enumerate(zip(self.session.inputs, entries)):
            if value is not None:
                self._take(k, info, value, ids)
        ready = np.flatnonzero((self._fill >= self._need[:, None]).all(0))
        results = [None] * self.n
        if len(ready):
            for i, value in zip(ready, self._step(ready)):
                results[i] = value
        return results

    def reset(self, stream: int) -> None:
        """Start stream `stream` over (zero state, empty buffers; side inputs are kept); the
        other streams are untouched."""
        if not 0 <= stream < self.n:
            raise ValueError(f"stream {stream} is not in [0, {self.n})")
        for s in self.state:
            s[stream] = 0
        for k, info in enumerate(self.session.inputs):
            if info.is_time:
                self._fill[k, stream] = 0

    @property
    def frames_seen(self) -> np.ndarray:
        """Input frames each stream has stepped through since its start or reset."""
        return self.state[self._counter].copy()

    # -- internals -----------------------------------------------------------------------------------
    def _entries(self, frames) -> list:
        """One entry per input from what push() was given."""
        inputs = self.session.inputs
        if len(inputs) == 1:
            return [frames]
        if isinstance(frames, dict):
            unknown = set(frames) - {i.name for i in inputs}
            if unknown:
                raise ValueError(f"no inputs named {sorted(unknown)}; the model's are "
                                 f"{[i.name for i in inputs]}")
            return [frames.get(i.name) for i in inputs]
        if not isinstance(frames, (list, tuple)) or len(frames) != len(inputs):
            raise ValueError(f"push one entry per input ({', '.join(i.name for i in inputs)}; None "
                             "for an input without a frame now), as a list or a dict")
        return list(frames)

    def _take(self, k: int, info, value, ids) -> None:
        """Buffer a time input's new frame (or set a side input) for the streams `ids`."""
        want = (len(ids), *(info.frame_shape if info.is_time else info.shape))
        if not isinstance(value, np.ndarray) or value.shape != want:
            got = value.shape if isinstance(value, np.ndarray) else type(value).__name__
            what = "one frame" if info.is_time else "its value"
            raise ValueError(f"{info.name} is {got}, expected shape {want} ({what} per stream) dtype {info.dtype}")
        if value.dtype != info.dtype:
            raise ValueError(f"{info.name} has dtype {value.dtype}, expected {info.dtype} (convert with .astype)")
        if not info.is_time:
            self._buf[k][ids], self._fill[k, ids] = value, 1
            return
        full = ids[self._fill[k, ids] >= info.frames_per_step]
        if len(full):
            raise ValueError(f"{info.name} already holds its {info.frames_per_step} frame(s) of the "
                             f"step for streams {full.tolist()}: push the other inputs' frames first")
        self._buf[k][ids, self._fill[k, ids]] = value
        self._fill[k, ids] += 1

    def _step(self, ready: np.ndarray) -> list:
        """One batched step for the `ready` streams; per stream, its valid outputs. A fixed-batch
        artifact steps every stream and keeps the old state of those not ready."""
        sess = self.session
        rows = np.arange(self.n) if sess.fixed_batch else ready
        whole = len(rows) == self.n
        xs = [np.ascontiguousarray(_layout(b if whole else b[rows], i)) for i, b in zip(sess.inputs, self._buf)]
        state = self.state if whole else [s[rows] for s in self.state]
        before = state[self._counter].copy()
        outs, nxt = sess.step(xs if len(xs) > 1 else xs[0], tuple(state))
        keep = np.isin(rows, ready)
        for s, new in zip(self.state, nxt):
            if whole and keep.all():
                s[...] = new
            else:
                s[rows[keep]] = new[keep]
        for k, info in enumerate(sess.inputs):
            if info.is_time:
                self._fill[k, ready] = 0
        return [self._valid(outs, row, int(before[row])) for row in np.flatnonzero(keep)]

    def _valid(self, outs, row: int, frames_before: int):
        """Valid outputs of one stream (batch row `row`) after a step that began at frames_before."""
        c = self.session.step_frames
        parts = []
        for info, value in zip(self.session.outputs, outs):
            if info.batch_axis is None:           # a static output: the same for every stream
                parts.append(info.valid_part(value, frames_before, c))
                continue
            part = info.valid_part(info.stream(value, row), frames_before, c)
            parts.append(None if part is None else np.take(part, 0, axis=info.batch_axis))
        if all(p is None for p in parts):
            return None
        return parts[0] if len(parts) == 1 else tuple(parts)


def _layout(buffered: np.ndarray, info) -> np.ndarray:
    """A buffer of (streams, frames, *frame) (time input) or (streams, *shape) (side input) in the
    input's layout: streams on its batch axis, frames on its time axis."""
    if not info.is_time:
        return np.moveaxis(buffered, 0, info.batch_axis)
    return np.moveaxis(buffered, (0, 1), (info.batch_axis, info.time_axis))


class Stream:
    """A single stream: `push(frame)` with one frame of shape `frame_shape` (a model of several
    inputs: one entry per input, each one frame, None or a side input's value, without the batch
    axis); returns its newly valid outputs (as `Streams.push` does for one stream) or None.

    >>> stream = Session("co_model.onnx").stream()
    >>> ys = [y for f in frames if (y := stream.push(f)) is not None]
    """

    def __init__(self, session):
        self._pool = Streams(session, 1)
        self.session = session

    def push(self, frame):
        inputs = self.session.inputs
        if len(inputs) == 1:
            if not isinstance(frame, np.ndarray) or frame.shape != tuple(self.session.frame_shape):
                got = frame.shape if isinstance(frame, np.ndarray) else type(frame).__name__
                raise ValueError(f"frame is {got}, expected shape {tuple(self.session.frame_shape)} "
                                 f"dtype {self.session.dtype}")
            return self._pool.push(frame[None])[0]
        entries = self._pool._entries(frame)
        return self._pool.push([None if e is None else np.asarray(e)[None] for e in entries])[0]

    def reset(self) -> None:
        self._pool.reset(0)

    @property
    def frames_seen(self) -> int:
        return int(self._pool.frames_seen[0])

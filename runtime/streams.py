"""Many independent streams, fed one frame at a time, served by one batched session call.

Each stream buffers its frames until a whole step (`step_frames`) is there; the streams whose step
is complete run together in one call, their state rows gathered and scattered back. A stream's
validity is read from its own frame counter (the `state.frames` state), so resetting one stream
restarts its warm-up without touching the others.

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
    None for outputs still warming up. Values have no batch axis: per-frame outputs hold their
    valid frames on `time_axis - 1`."""

    def __init__(self, session, n: int):
        if n < 1:
            raise ValueError(f"need at least one stream, got {n}")
        if session.fixed_batch and n != session.fixed_batch:
            raise ValueError(f"this artifact serves exactly {session.fixed_batch} streams (the model "
                             f"pins its batch size), asked for {n}")
        self.session, self.n = session, n
        self.state = list(session.initial_state(n))
        c = session.step_frames
        self._buf = np.zeros((n, c, *session.frame_shape), dtype=session.dtype)
        self._fill = np.zeros(n, dtype=np.int64)
        self._counter = [s["name"] for s in session.states].index(session.meta["frame_counter"])

    def push(self, frames: np.ndarray, streams=None) -> list:
        """Append one frame to each stream (or to each of `streams`, in that order); run a step for
        every stream whose buffer is full. Returns one entry per stream of the pool (n)."""
        ids = np.arange(self.n) if streams is None else np.asarray(streams, dtype=np.int64)
        self._check_frames(frames, len(ids))
        if len(np.unique(ids)) != len(ids) or (len(ids) and not 0 <= ids.min() <= ids.max() < self.n):
            raise ValueError(f"streams must be distinct indices in [0, {self.n}), got {ids.tolist()}")
        self._buf[ids, self._fill[ids]] = frames
        self._fill[ids] += 1
        ready = np.flatnonzero(self._fill == self.session.step_frames)
        results = [None] * self.n
        if len(ready):
            for i, value in zip(ready, self._step(ready)):
                results[i] = value
        return results

    def reset(self, stream: int) -> None:
        """Start stream `stream` over (zero state, empty buffer); the other streams are untouched."""
        if not 0 <= stream < self.n:
            raise ValueError(f"stream {stream} is not in [0, {self.n})")
        for s in self.state:
            s[stream] = 0
        self._fill[stream] = 0

    @property
    def frames_seen(self) -> np.ndarray:
        """Input frames each stream has stepped through since its start or reset."""
        return self.state[self._counter].copy()

    # -- internals -----------------------------------------------------------------------------------
    def _step(self, ready: np.ndarray) -> list:
        """One batched step for the `ready` streams; per stream, its valid outputs. A fixed-batch
        artifact steps every stream and keeps the old state of those not ready."""
        sess = self.session
        rows = np.arange(self.n) if sess.fixed_batch else ready
        whole = len(rows) == self.n
        chunk = np.moveaxis(self._buf if whole else self._buf[rows], 1, sess.time_axis)
        state = self.state if whole else [s[rows] for s in self.state]
        before = state[self._counter].copy()
        outs, nxt = sess.step(np.ascontiguousarray(chunk), tuple(state))
        keep = np.isin(rows, ready)
        for s, new in zip(self.state, nxt):
            if whole and keep.all():
                s[...] = new
            else:
                s[rows[keep]] = new[keep]
        self._fill[ready] = 0
        return [self._valid(outs, row, int(before[row])) for row in np.flatnonzero(keep)]

    def _valid(self, outs, row: int, frames_before: int):
        """Valid outputs of one stream (batch row `row`) after a step that began at frames_before."""
        c = self.session.step_frames
        parts = []
        for info, value in zip(self.session.outputs, outs):
            part = info.valid_part(value[row:row + 1], frames_before, c)
            parts.append(None if part is None else part[0])
        if all(p is None for p in parts):
            return None
        return parts[0] if len(parts) == 1 else tuple(parts)

    def _check_frames(self, frames, k: int) -> None:
        sess = self.session
        want = (k, *sess.frame_shape)
        if not isinstance(frames, np.ndarray) or frames.shape != want:
            got = frames.shape if isinstance(frames, np.ndarray) else type(frames).__name__
            raise ValueError(f"frames are {got}, expected shape {want} (one frame of shape "
                             f"{tuple(sess.frame_shape)} per stream) dtype {sess.dtype}")
        if frames.dtype != sess.dtype:
            raise ValueError(f"frames have dtype {frames.dtype}, expected {sess.dtype} (convert with .astype)")


class Stream:
    """A single stream: `push(frame)` with one frame of shape `frame_shape`; returns its newly
    valid outputs (as `Streams.push` does for one stream) or None.

    >>> stream = Session("co_model.onnx").stream()
    >>> ys = [y for f in frames if (y := stream.push(f)) is not None]
    """

    def __init__(self, session):
        self._pool = Streams(session, 1)
        self.session = session

    def push(self, frame: np.ndarray):
        if not isinstance(frame, np.ndarray) or frame.shape != tuple(self.session.frame_shape):
            got = frame.shape if isinstance(frame, np.ndarray) else type(frame).__name__
            raise ValueError(f"frame is {got}, expected shape {tuple(self.session.frame_shape)} "
                             f"dtype {self.session.dtype}")
        return self._pool.push(frame[None])[0]

    def reset(self) -> None:
        self._pool.reset(0)

    @property
    def frames_seen(self) -> int:
        return int(self._pool.frames_seen[0])

"""The one record the temporal analysis attaches to every value: how it relates to input time."""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

import sympy
from torch.fx.node import map_arg

META = "cocompile.time"        # node.meta key of a node's TimeInfo (a tuple of them for tuple outputs)
STATE_META = "cocompile.state"  # node.meta key of the StateSpecs a stateful node keeps
DEMAND = "cocompile.demand"     # node.meta key: which frames of the value the outputs read
READS = "cocompile.reads"       # node.meta key: {input: which of its frames the node reads}

TIME, CLIP, WINDOW, STATIC = "time", "clip", "window", "static"
NEWEST, ALL = "newest", "all"   # demand: only the frames of the current step, or every frame


@dataclass(frozen=True)
class TimeInfo:
    """How one value relates to the time axis of the model input.

    kind    "time": has frames along `dim`; "clip": derived from a reduction over time, one value per
            step (a sliding window of the clip); "window": the value over the whole sliding window,
            every position along `dim` re-formed each step (what attention over time produces);
            "static": does not depend on the input's frames.
    dim     axis that holds time. Time may be merged with other axes into it: the axis has
            `outer * length * inner` entries, frame t occupying entries `o*length*inner + t*inner + i`.
    length  frames of this value in the offline clip.
    rate    frames of this value per input frame (1/cumulative temporal stride), exact.
    warmup  streamed frames of this value that come before offline frame 0 (from the zero state).
            Negative: the first -warmup offline frames are zeros that the stream never produces
            (explicit zero padding); a consumer either absorbs them into its zero state or a
            delay materialises them.
    rf      receptive field in input frames.
    ready   clip and window values: input frames that must have been streamed before the value
            is valid.
    padded  depends on temporal zero padding (so sliding-window reuse is not exact, E2).
    approx  depends on a causal approximation of a non-causal op (a clip reduction
            broadcast onto frames, a norm over time).
    horizon > 0: depends on attention whose reach grows with the clip (a causal mask over the
            whole clip); the stream keeps the last `horizon` frames of keys, so it equals the
            model for the first `horizon` frames and is bounded to that window after.
    recurrent  depends on a recurrence over every frame since the stream started (an RNN's
            hidden state): its receptive field is unbounded (`rf` counts only the frames that
            reach the recurrence), and sliding windows differ from fresh clips (no E2).

    >>> TimeInfo(TIME, dim=2, length=16).moved(3).dim
    3
    """

    kind: str
    dim: int | None = None
    outer: object = 1
    inner: int = 1
    length: int = 0
    rate: sympy.Rational = sympy.Integer(1)
    warmup: int = 0
    rf: int = 1
    ready: int = 0
    padded: bool = False
    approx: bool = False
    horizon: int = 0
    recurrent: bool = False

    @property
    def is_time(self) -> bool:
        return self.kind == TIME

    @property
    def is_window(self) -> bool:
        return self.kind == WINDOW

    @property
    def per_step(self) -> bool:
        """One value per step (clip or window), valid once `ready` input frames were streamed."""
        return self.kind in (CLIP, WINDOW)

    @property
    def merged(self) -> bool:
        return self.outer != 1 or self.inner != 1

    @property
    def receptive_field(self) -> int | float:
        """Input frames one value depends on: `rf`, or math.inf for a recurrent value."""
        return math.inf if self.recurrent else self.rf

    def moved(self, dim: int) -> "TimeInfo":
        return dataclasses.replace(self, dim=dim)

    def replace(self, **changes) -> "TimeInfo":
        return dataclasses.replace(self, **changes)

    def frames_per_step(self, step_frames: int) -> int:
        """Frames of this value produced by one step of `step_frames` input frames."""
        n = self.rate * step_frames
        assert n.is_integer, (self, step_frames)
        return int(n)

    def streamed(self, clip_frames: int) -> int:
        """Frames of this value the stream has produced after `clip_frames` input frames."""
        return int(self.rate * clip_frames)

    def flush_frames(self, clip_length: int) -> int:
        """Offline frames still missing after streaming a whole clip: what the flush must produce."""
        return self.length - (self.streamed(clip_length) - self.warmup)

    def lag(self) -> int:
        """Input frames by which this value's offline frames trail the stream (per-frame values),
        or input frames needed before it is valid (clip values)."""
        if self.per_step:
            return int(self.ready)
        return int(sympy.ceiling(self.warmup / self.rate)) if self.kind == TIME else 0


STATIC_INFO = TimeInfo(STATIC)


def static_like(*infos: TimeInfo) -> TimeInfo:
    """Kind of a value computed from non-time inputs only: clip if any input is clip, else static."""
    clips = [i for i in infos if i is not None and i.per_step]
    if not clips:
        return STATIC_INFO
    return TimeInfo(CLIP, ready=max(c.ready for c in clips), rf=max(c.rf for c in clips),
                    padded=any(c.padded for c in clips), approx=any(c.approx for c in clips),
                    horizon=max(c.horizon for c in clips), recurrent=any(c.recurrent for c in clips))


def reads_time(node, kinds=(TIME,)) -> bool:
    """Whether any argument of the fx node `node` carries frames (or is of one of `kinds`)."""
    found = []
    map_arg((node.args, node.kwargs), lambda a: found.append(
        isinstance(a.meta.get(META), TimeInfo) and a.meta[META].kind in kinds))
    return any(found)


def steps_by_rule(node, rule) -> bool:
    """Whether `node` runs its rule's step form; otherwise it runs as captured (on constants,
    clip values, or whole windows, where the captured op is already what the step needs)."""
    if rule is None:
        return False
    return reads_time(node, (TIME, WINDOW) if getattr(rule, "reads_windows", False) else (TIME,))

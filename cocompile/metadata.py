"""The self-description every artifact carries (docs/design.md, "Artifacts"), as one JSON document.

A consumer needs nothing else to drive an artifact: input and state names, shapes, dtypes and
initial values, the time axis, how many frames a step takes, and when each output becomes valid.

Validity rule (the same one `ContinualModel` and `cocompile.runtime` apply):

* per-frame output ("kind": "time"): a step emits `frames_per_step` frames along `time_axis`;
  counting every emitted frame of the stream from 0, frame j is valid when j >= `warmup`
  (valid frame j is offline frame j - warmup);
* clip output ("kind": "clip"): valid after a step once `ready` input frames were consumed
  (including that step's);
* window output ("kind": "window"): the output over the whole sliding window (all `clip_frames`
  positions along `time_axis`, e.g. a Transformer encoder's tokens), valid like a clip output;
* "exactness": "exact", "padded" (temporal zero padding: sliding windows differ from fresh
  clips), "bounded" (causal attention over the whole clip: the stream keeps the last `horizon`
  frames, equal to the model for the first `horizon` frames and bounded to them after),
  "recurrent" (behind an RNN/GRU/LSTM: equal to the model on the whole stream; its
  "receptive_field" is null, unbounded), or "approximate";
* "static" outputs do not depend on the frames and are always valid.

"batch" is null when the artifact serves any number of streams at once (the usual case), or the
one batch size it serves when the model pinned it (e.g. a reshape to a literal batch size).
Shapes hold that value on the batch axis. Every input and output names its "batch_axis": where
the streams are stacked (the user's batch_dim for inputs, e.g. 1 for time-major (T, N, F)
frames; for outputs, where the model's output has it, e.g. 1 for an LSTM's (T, N, H) output or
its h_n). An output's "batch_axis" is null when it has none (the batch reduced away or merged
with another axis): it cannot be split into streams. States are batch-first.

>>> meta = metadata(co)
>>> meta["step_frames"], [s["name"] for s in meta["states"]][:2]
(2, ['state.frames', 'state.c1'])
"""
from __future__ import annotations

import json
import math

import torch
from torch.utils import _pytree as pytree

from .timeinfo import TIME, WINDOW

FORMAT = "cocompile.continual"
FORMAT_VERSION = 1
KEY = "cocompile"              # ONNX metadata_props key; `cocompile.json` in .pt / .pt2 archives
EXTRA_FILE = "cocompile.json"
INPUT_NAME = "x"

EXACTNESS = {
    "exact": "every valid value equals the offline model: per-frame outputs frame for frame on the "
             "whole stream (E3), clip outputs on the last clip_length input frames (E2)",
    "padded": "clip output that depends on temporal zero padding: at a clip's end it equals the "
              "offline model only after the end-of-clip flush (ContinualModel.flush, not part of "
              "the artifact); sliding windows deviate",
    "approximate": "depends on a causal approximation of a non-causal op (a clip reduction "
                   "broadcast onto frames, a norm over time)",
    "recurrent": "depends on a recurrent layer's hidden state, which carries every frame since the "
                 "stream started (receptive field unbounded): per-frame outputs equal the model on "
                 "the whole stream (E3); clip outputs equal the model on the clip at the clip's end, "
                 "after the end-of-clip flush; sliding windows differ",
}


def next_state_name(name: str) -> str:
    """`state.blocks.2.conv_a` -> `next_state.blocks.2.conv_a`."""
    return "next_state." + name.removeprefix("state.")


def output_names(co) -> list[str]:
    """`y` for a single output, `y.0`, `y.1`, ... for several (the model's outputs, flattened)."""
    n = len(co.out_infos)
    return ["y"] if n == 1 else [f"y.{i}" for i in range(n)]


def input_names(co) -> list[str]:
    """The model's inputs (`x`, or `x.0`, `x.1`, `lengths`, ... for several), then every state's
    name in step order."""
    return [s.name for s in co.inputs.specs] + [s.name for s in co.specs]


def all_output_names(co) -> list[str]:
    """The model's outputs, then every state's next-state name in step order."""
    return output_names(co) + [next_state_name(s.name) for s in co.specs]


def dtype_name(dtype: torch.dtype) -> str:
    """`torch.float32` -> `float32` (numpy's spelling)."""
    return str(dtype).removeprefix("torch.")


def compiled_batch(co) -> int | None:
    """None when the step serves any batch size; the one it serves when the model pinned it."""
    prog = co.program
    node = next(n for n in prog.gm.graph.nodes if n.op == "placeholder" and n.name in prog.input_names)
    size = node.meta["val"].shape[0]
    return size if isinstance(size, int) else None


def _exactness(info) -> str:
    if info.approx:
        return "approximate"
    if info.horizon:
        return "bounded"
    if info.recurrent:
        return "recurrent"
    return "padded" if info.per_step and info.padded else "exact"


def _valid_from_step(info, step_frames: int) -> int:
    """Index of the first step (from the zero state) that returns a valid value of this output."""
    if info.kind == TIME:
        return max(int(info.warmup) // info.frames_per_step(step_frames), 0)
    if info.per_step:
        return max(-(-int(info.ready) // step_frames) - 1, 0)
    return 0


def _output(name: str, info, shape, step_frames: int, batch: int | None, axis: int | None) -> dict:
    shape = list(shape)
    if axis is not None:
        shape[axis] = batch
    entry = {"name": name, "kind": info.kind, "shape": shape, "batch_axis": axis,
             "exactness": _exactness(info), "delay": int(info.lag()),
             "valid_from_step": _valid_from_step(info, step_frames)}
    if info.kind == TIME:
        entry.update(time_axis=info.dim, rate=str(info.rate), rate_num=int(info.rate.p),
                     rate_den=int(info.rate.q), frames_per_step=info.frames_per_step(step_frames),
                     warmup=int(info.warmup), receptive_field=_frames(info.receptive_field),
                     clip_frames=int(info.length))
    elif info.per_step:
        entry.update(ready=int(info.ready), receptive_field=_frames(info.receptive_field))
        if info.kind == WINDOW:
            entry.update(time_axis=info.dim, clip_frames=int(info.length))
    if info.horizon:
        entry.update(horizon=int(info.horizon))
    return entry


def _frames(n) -> int | None:
    """A frame count for JSON: null when unbounded (math.inf, behind a recurrent layer)."""
    return None if n == math.inf else int(n)


def _input(spec, co, batch: int | None) -> dict:
    """One model input: its chunk of a step; time inputs with their rate (frames per frame of
    the fastest input) and frames per step, side inputs ("time_axis": null) passed whole."""
    dtype = co.dtype if spec.dtype.is_floating_point else spec.dtype
    entry = {"name": spec.name, "shape": spec.chunk_shape(batch, co.step_frames),
             "dtype": dtype_name(dtype), "batch_axis": spec.batch_dim, "time_axis": spec.time_dim}
    if spec.is_time:
        entry.update(rate=str(spec.rate), rate_num=int(spec.rate.p), rate_den=int(spec.rate.q),
                     frames_per_step=spec.frames(co.step_frames), clip_frames=int(spec.length))
    return entry


def _state(spec, batch: int | None) -> dict:
    return {"name": spec.name, "output": next_state_name(spec.name), "shape": [batch, *spec.shape],
            "dtype": dtype_name(spec.dtype), "init": spec.init, "doc": spec.doc}


def _output_shapes(co, batch: int) -> list[tuple]:
    """Shapes of one step's outputs (from running one step on the zero state)."""
    xs = [torch.zeros_like(t) for t in co.example_inputs(batch)]
    with torch.no_grad():
        outs, _ = co.step(co.inputs.unflatten(xs), co.initial_state(batch))
    return [tuple(t.shape) for t in pytree.tree_leaves(outs)]


def cocompile_version() -> str:
    from . import __version__
    return __version__


def metadata(co) -> dict:
    """The JSON-ready description of a ContinualModel's step (see the module docstring)."""
    batch = compiled_batch(co)
    shapes = _output_shapes(co, batch or 1)
    outputs = [_output(n, i, s, co.step_frames, batch, b)
               for n, i, s, b in zip(output_names(co), co.out_infos, shapes, co.out_batch_dims)]
    return {
        "format": FORMAT, "format_version": FORMAT_VERSION,
        "versions": {"cocompile": cocompile_version(), "torch": torch.__version__},
        "step_frames": int(co.step_frames), "clip_length": int(co.clip_length),
        "delay": int(co.delay), "receptive_field": _frames(co.receptive_field),
        "approximate": co.approximate, "exact_sliding": co.exact_sliding,
        "inputs": [_input(s, co, batch) for s in co.inputs.specs],
        "input_structure": pytree.treespec_dumps(co.inputs.tree),
        "outputs": outputs,
        "batch": batch,
        "states": [_state(s, batch) for s in co.specs],
        "frame_counter": co.specs[0].name,
        "output_structure": pytree.treespec_dumps(co.out_spec),
        "exactness_classes": EXACTNESS,
    }


def dumps(co) -> str:
    """`metadata(co)` as a JSON string."""
    return json.dumps(metadata(co), indent=1)

"""int8 ONNX artifacts: the float step, quantized statically with onnxruntime.quantization.

    co.export("co_model.onnx", quantize="int8", calibration=clips)   # clips, or N random clips
    cocompile MODEL --out co_model.onnx --quantize int8 [--calibration N | --calibration clips.pt]

1. The float step is written as ONNX as usual (cocompile.export.write_onnx).
2. Calibration steps the FLOAT continual model through the calibration clips, one after the other
   as one stream from the zero state; the inputs of each step (its frames and the state it was
   given) are one calibration sample, so the state inputs are calibrated on the values a real
   stream puts there, in its warm-up and in its steady state, not on zeros.
3. `quantize_static` in QDQ format: int8 weights per output channel, uint8 activations (the
   u8s8 kernels of onnxruntime's CPU provider), MinMax ranges. What stays float (KEEP_FLOAT,
   chosen by measurement, docs/precision.md): every tensor at the step boundary, i.e. the state
   inputs and next-state outputs and the ops that read or write them (a frame stored in a buffer
   keeps its float value however many steps it stays there, instead of being rounded again at
   every step), Softmax and the normalisations, and anything not float (the int64 frame counter).
4. The deviation from the float step (the eager continual model) is measured on a stream of 3·T
   steps of random frames at the calibration clips' scale, from the zero state, and recorded in
   the metadata under "quantization" (nothing else of the metadata changes): the artifact is
   approximate, not E4-exact.

>>> co.export("co_int8.onnx", quantize="int8", calibration=8)
'co_int8.onnx'
>>> json.loads(onnx.load("co_int8.onnx").metadata_props[0].value)["quantization"]["deviation"]
0.012
"""
from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import math
import os
import tempfile
from dataclasses import dataclass

import numpy as np
import torch
from torch.utils import _pytree as pytree

from . import metadata as md
from .errors import CompileError

@dataclass(frozen=True)
class Recipe:
    """How the step is quantized. The default is the measured choice (docs/precision.md); the
    fields exist to measure the alternatives.

    boundary      keep the step boundary float: the ops that read a state input or write an output
                  (next states and the model's outputs, which stay float anyway)
    float_ops     op types whose tensors stay float
    activations   "uint8" (onnxruntime's u8s8 kernels) or "int8"
    reduce_range  7-bit weights: avoids the u8s8 saturation of AVX2 without VNNI
    """

    boundary: bool = True
    float_ops: tuple[str, ...] = ("Softmax", "LayerNormalization", "ReduceMean", "Sqrt", "Div",
                                  "Pow", "Exp", "Sigmoid")
    activations: str = "uint8"
    reduce_range: bool = False


def write_quantized(co, path: str, quantize: str, calibration, recipe: Recipe = Recipe()) -> str:
    """Write `co`'s step to `path` as a statically quantized int8 ONNX model (see the module
    docstring and Recipe)."""
    from .export import write_onnx

    clips = _check(co, path, quantize, calibration)
    with tempfile.TemporaryDirectory() as tmp, _quiet():
        named = os.path.join(tmp, "float.onnx")
        write_onnx(co, named)
        _name_nodes(named)
        _quantize_static(named, path, SteppingReader(co, clips), recipe)
    dev = max(stream_deviation(co, path, 3 * co.clip_length, _scale(co, clips)))
    _finish(co, path, dict(dtype="int8", format="QDQ", weights="int8 per output channel",
                           approximate=True, deviation=dev, deviation_steps=3 * co.clip_length,
                           calibration_clips=len(clips), **dataclasses.asdict(recipe)))
    return path


def _check(co, path: str, quantize: str, calibration) -> list:
    """The calibration clips (each in the model's input structure), or a CompileError."""
    if quantize != "int8":
        raise CompileError(f"quantize={quantize!r} is not supported", hint='use quantize="int8"')
    if os.path.splitext(path)[1].lower() != ".onnx":
        raise CompileError(f"int8 artifacts are ONNX models; cannot write {path!r}",
                           hint="export to a path ending in .onnx")
    if isinstance(calibration, bool) or calibration is None:
        raise CompileError("quantize='int8' needs calibration clips",
                           hint="pass calibration=[clip, ...] (clips like the example input) or "
                                "calibration=N for N random clips")
    if isinstance(calibration, int):
        if calibration < 1:
            raise CompileError(f"calibration={calibration}: need at least one clip")
        g = torch.Generator().manual_seed(0)
        return [co.inputs.unflatten(random_clip(co, g)) for _ in range(calibration)]
    clips = list(calibration) if isinstance(calibration, (list, tuple)) else None
    if not clips:
        raise CompileError(f"calibration must be a list of clips or a number of random clips, got "
                           f"{type(calibration).__name__}", hint="pass calibration=[clip, ...] or N")
    for clip in clips:
        co.inputs.leaves(clip, "calibration clip")        # the structure, or a CompileError
    return clips


def random_clip(co, generator) -> list[torch.Tensor]:
    """Leaves of one random clip of the compiled length (standard normal frames, batch 1)."""
    return [torch.randn(s.chunk_shape(1, co.clip_length), generator=generator).to(co.dtype)
            if s.is_time else co._sides[s.name].clone() for s in co.inputs.specs]


def quantize_clip(model, co, clip, path: str, calibration: list, recipe: Recipe = Recipe()) -> str:
    """The OFFLINE model on whole clips (`clip`'s shape), as ONNX quantized the same way (QDQ,
    calibrated on the `calibration` clips, the recipe's float ops and float outputs): the int8
    clip that `cocompile bench --dtype int8` times the int8 step against."""
    from .export import _quiet as quiet_export

    with tempfile.TemporaryDirectory() as tmp, _quiet():
        named = os.path.join(tmp, "clip.onnx")
        with quiet_export():
            torch.onnx.export(model, tuple(co.inputs.args(clip)), named, dynamo=True,
                              external_data=False, verbose=False)
        _name_nodes(named)
        names = [i.name for i in _input_values(named)]
        feeds = iter([{n: t.detach().cpu().numpy() for n, t in zip(names, co.inputs.leaves(c))}
                      for c in calibration])
        reader = type("Clips", (), {"get_next": lambda self: next(feeds, None)})()
        _quantize_static(named, path, reader, recipe)
    return path


def _quantize_static(named: str, path: str, reader, recipe: Recipe) -> None:
    """onnxruntime's static QDQ quantization of the float model at `named` (its nodes named) into
    `path`: int8 weights per output channel, the recipe's activations, its float ops left float."""
    from onnxruntime.quantization import QuantFormat, QuantType, quantize_static

    activations = QuantType.QUInt8 if recipe.activations == "uint8" else QuantType.QInt8
    quantize_static(named, path, reader, quant_format=QuantFormat.QDQ, per_channel=True,
                    reduce_range=recipe.reduce_range, activation_type=activations,
                    weight_type=QuantType.QInt8, nodes_to_exclude=float_nodes(named, recipe))


def _input_values(path: str) -> list:
    import onnx

    graph = onnx.load(path).graph
    inits = {i.name for i in graph.initializer}
    return [i for i in graph.input if i.name not in inits]


# -- calibration ------------------------------------------------------------------------------------
class SteppingReader:
    """onnxruntime CalibrationDataReader: the feeds of every step of the float continual model
    through the clips, played one after the other as one stream from the zero state (frames and
    the state that step was given). The first clip's steps see the warm-up, the later ones the
    steady state a live stream settles in (clip windows full of real frames), which a stream
    restarted at every clip would show only at its last step."""

    def __init__(self, co, clips: list):
        self.co, self.clips = co, clips
        self.names = md.input_names(co)
        self._feeds = self._steps()

    def _steps(self):
        co, state = self.co, None
        for clip in self.clips:
            leaves = [t.to(co.device) for t in co.inputs.leaves(clip, "calibration clip")]
            state = co.initial_state(co.inputs.batch_size(leaves)) if state is None else state
            for chunk in co.inputs.steps(leaves, co.step_frames):
                yield {n: t.detach().cpu().numpy() for n, t in zip(self.names, (*chunk, *state))}
                with torch.no_grad():
                    _, state = co.step(co.inputs.unflatten(chunk), state)

    def get_next(self) -> dict | None:
        return next(self._feeds, None)

    def rewind(self) -> None:
        self._feeds = self._steps()


# -- what stays float --------------------------------------------------------------------------------
def float_nodes(path: str, recipe: Recipe) -> list[str]:
    """Names of the nodes whose tensors stay float: the recipe's float op types and, with its
    `boundary`, every node that reads a state input or writes a graph output."""
    import onnx

    graph = onnx.load(path).graph
    states = {i.name for i in graph.input if i.name.startswith("state.")}
    outputs = {o.name for o in graph.output}
    keep = []
    for node in graph.node:
        at_boundary = recipe.boundary and (states & set(node.input) or outputs & set(node.output))
        if node.op_type in recipe.float_ops or at_boundary:
            keep.append(node.name)
    return keep


def _name_nodes(path: str) -> None:
    """Give every node of the model at `path` a unique name (exclusion lists go by name)."""
    import onnx

    model = onnx.load(path)
    seen = set()
    for i, node in enumerate(model.graph.node):
        if not node.name or node.name in seen:
            node.name = f"{node.op_type}_{i}"
        seen.add(node.name)
    onnx.save(model, path)


@contextlib.contextmanager
def _quiet():
    """onnxruntime.quantization logs a warning per call (pre-processing advice) on the root logger."""
    logger = logging.getLogger()
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        logger.setLevel(level)


# -- deviation ----------------------------------------------------------------------------------------
def _scale(co, clips: list) -> tuple[float, float]:
    """(mean, std) of the calibration clips' time inputs: the scale of the measurement stream."""
    values = torch.cat([t.double().flatten() for clip in clips
                        for t, s in zip(co.inputs.leaves(clip), co.inputs.specs) if s.is_time])
    return float(values.mean()), float(values.std())


def stream_deviation(co, path: str, steps: int, scale=(0.0, 1.0), seed: int = 0,
                     reference: str | None = None) -> list[float]:
    """Per step, the largest relative deviation max|q - f| / max(1, max|f|) over the outputs, of
    the artifact at `path` (q) from the float step (f: `co.step`, or the float ONNX artifact
    `reference` where given, faster on long streams), both from the zero state on the same stream
    of random frames ~ N(mean, std) for `scale` = (mean, std), one stream, each on its own state."""
    quant = onnx_step(co, path)
    ref = onnx_step(co, reference) if reference else None
    g, n = torch.Generator().manual_seed(seed), len(co.out_infos)
    q_state = f_state = [t.cpu().numpy() for t in co.initial_state(1)]
    if not ref:
        f_state = co.initial_state(1)
    out = []
    for _ in range(steps):
        leaves = [x * scale[1] + scale[0] if s.is_time else x
                  for x, s in zip(co.example_inputs(1, g), co.inputs.specs)]
        feed = [x.cpu().numpy() for x in leaves]
        q_out, q_state = quant(feed, q_state)
        if ref:
            f_out, f_state = ref(feed, f_state)
        else:
            with torch.no_grad():
                f_out, f_state = co.step(co.inputs.unflatten(leaves), f_state)
            f_out = [t.cpu().numpy() for t in pytree.tree_leaves(f_out)]
        out.append(max(_rel(a, b) for a, b in zip(q_out, f_out)))
    return out


def onnx_step(co, path: str, threads: int = 1):
    """`step(inputs, state) -> (outputs, next state)` (numpy lists) of an ONNX artifact of `co`
    in onnxruntime, on `threads` threads."""
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.intra_op_num_threads, opts.inter_op_num_threads = threads, 1
    sess = ort.InferenceSession(path, opts, providers=["CPUExecutionProvider"])
    names, outs, n = md.input_names(co), md.all_output_names(co), len(co.out_infos)

    def step(inputs: list, state: list):
        got = sess.run(outs, dict(zip(names, [*inputs, *state])))
        return got[:n], got[n:]
    return step


def _rel(got: np.ndarray, ref: np.ndarray) -> float:
    if got.shape != ref.shape:
        return math.inf
    if not ref.size:
        return 0.0
    ref = ref.astype(np.float64)
    return float(np.abs(got.astype(np.float64) - ref).max() / max(1.0, np.abs(ref).max()))


def _finish(co, path: str, quantization: dict) -> None:
    """The metadata of the float step plus the "quantization" entry; checked like any artifact."""
    import onnx

    model = onnx.load(path)
    meta = md.metadata(co) | {"quantization": quantization}
    onnx.helper.set_model_props(model, {md.KEY: json.dumps(meta, indent=1)})
    model.producer_name, model.producer_version = "cocompile", md.cocompile_version()
    try:
        onnx.checker.check_model(model, full_check=True)
    except Exception as err:  # noqa: BLE001 - ValidationError, InferenceError
        raise CompileError(f"the quantized ONNX model fails onnx.checker: {err}") from None
    onnx.save(model, path)

"""A Triton Inference Server model repository for an ONNX artifact: the sequence batcher keeps each
stream's state (implicit state management), one state entry per state tensor, zero initial state,
and a START control input that zeroes the state at the start of a sequence.

    repo/NAME/config.pbtxt
    repo/NAME/1/model.onnx      the artifact with a START input; state.frames as [batch, 1]

Triton batches requests along axis 0 of every input and output (max_batch_size > 0). An artifact
whose inputs or outputs have their batch axis elsewhere (compiled with batch_dim, e.g.
time-major (T, N, F) frames, or an LSTM's (T, N, H) output) gets a Transpose at the model's
boundary, so the Triton model takes and returns them batch-first ((N, T, F): its config and
metadata say so) and Triton's sequence batching works unchanged. An output without a batch axis
cannot be batched and is refused.

>>> write_repository("co_model.onnx", "triton_repo")      # then: tritonserver --model-repository triton_repo
"""
from __future__ import annotations

import json
import os

import onnx
from onnx import TensorProto, helper

from .errors import CompileError

START = "START"
_TYPES = {TensorProto.FLOAT: "TYPE_FP32", TensorProto.INT64: "TYPE_INT64", TensorProto.DOUBLE: "TYPE_FP64",
          TensorProto.FLOAT16: "TYPE_FP16", TensorProto.INT32: "TYPE_INT32", TensorProto.BOOL: "TYPE_BOOL"}


def _dims(value: onnx.ValueInfoProto) -> list[int]:
    """Shape without the batch axis (Triton adds it back with max_batch_size)."""
    return [d.dim_value for d in value.type.tensor_type.shape.dim[1:]]


def _dtype(value: onnx.ValueInfoProto) -> int:
    return value.type.tensor_type.elem_type


def _rank1_to_column(graph: onnx.GraphProto, name: str, is_input: bool) -> None:
    """Triton batches tensors of shape [batch, dims...] with non-empty dims: carry a per-stream
    scalar (the frame counter) as [batch, 1] at the model's boundary."""
    io = graph.input if is_input else graph.output
    value = next(v for v in io if v.name == name)
    inner = f"{name}.flat"
    if is_input:
        for node in graph.node:
            node.input[:] = [inner if i == name else i for i in node.input]
        graph.node.insert(0, helper.make_node("Reshape", [name, "cocompile.minus_one"], [inner]))
    else:
        for node in graph.node:         # the producer and any reader of the value
            node.output[:] = [inner if o == name else o for o in node.output]
            node.input[:] = [inner if i == name else i for i in node.input]
        graph.node.append(helper.make_node("Reshape", [inner, "cocompile.column"], [name]))
    value.type.tensor_type.shape.dim.add().dim_value = 1


def _zero_on_start(graph: onnx.GraphProto, name: str, rank: int, dtype: int) -> None:
    """state <- state * (1 - START): a stream's state restarts from zero when its sequence starts."""
    masked, keep = f"{name}.kept", f"{name}.keep"
    for node in graph.node:
        node.input[:] = [masked if i == name else i for i in node.input]
    shape = helper.make_tensor(f"{name}.keep_shape", TensorProto.INT64, [rank], [-1] + [1] * (rank - 1))
    graph.initializer.append(shape)
    nodes = [helper.make_node("Reshape", ["cocompile.keep", shape.name], [keep + ".f"])]
    nodes.append(helper.make_node("Cast", [keep + ".f"], [keep], to=dtype))
    nodes.append(helper.make_node("Mul", [name, keep], [masked]))
    for n in reversed(nodes):
        graph.node.insert(0, n)


def _batch_first_boundary(graph: onnx.GraphProto, meta: dict) -> None:
    """Moves every model input's and output's batch axis to 0 at the graph's boundary (a
    Transpose inside), and says so in `meta`; refuses an output without a batch axis."""
    for entry in meta["outputs"]:
        if entry.get("batch_axis", 0) is None:
            raise CompileError(f"output {entry['name']} has no batch axis (the model reduces or merges "
                               "its streams there), and Triton batches every output along axis 0",
                               hint="return the output per stream (keep its batch axis), or serve "
                                    "the ONNX artifact with cocompile.runtime.Session")
    for entry, is_input in [(e, True) for e in meta["inputs"]] + [(e, False) for e in meta["outputs"]]:
        b = entry.get("batch_axis", 0)
        if b:
            _move_batch(graph, entry["name"], b, is_input)
            _batch_first_entry(entry, b)


def _move_batch(graph: onnx.GraphProto, name: str, b: int, is_input: bool) -> None:
    """Graph input `name` taken batch-first (a Transpose back to its layout inside), or graph
    output `name` given batch-first (a Transpose after the value)."""
    io = graph.input if is_input else graph.output
    value = next(v for v in io if v.name == name)
    dims = value.type.tensor_type.shape.dim
    rank, inner = len(dims), f"{name}.with_batch_axis_{b}"
    to_first = [b, *range(b), *range(b + 1, rank)]
    moved = [onnx.TensorShapeProto.Dimension() for _ in range(rank)]
    for i, axis in enumerate(to_first):
        moved[i].CopyFrom(dims[axis])
    del dims[:]
    dims.extend(moved)
    if is_input:
        for node in graph.node:
            node.input[:] = [inner if i == name else i for i in node.input]
        back = [*range(1, b + 1), 0, *range(b + 1, rank)]
        graph.node.insert(0, helper.make_node("Transpose", [name], [inner], perm=back))
    else:
        for node in graph.node:         # the producer and any reader of the value
            node.output[:] = [inner if o == name else o for o in node.output]
            node.input[:] = [inner if i == name else i for i in node.input]
        graph.node.append(helper.make_node("Transpose", [inner], [name], perm=to_first))


def _batch_first_entry(entry: dict, b: int) -> None:
    """A metadata entry (input or output) whose batch axis `b` moved to 0."""
    shape = entry["shape"]
    entry["shape"] = [shape[b], *shape[:b], *shape[b + 1:]]
    if entry.get("time_axis") is not None:
        entry["time_axis"] += entry["time_axis"] < b
    entry["batch_axis"] = 0


def triton_model(artifact: str) -> tuple[onnx.ModelProto, dict]:
    """The artifact with a START control input and column-shaped per-stream scalars."""
    model = onnx.load(artifact)
    meta = json.loads({p.key: p.value for p in model.metadata_props}["cocompile"])
    g = model.graph
    _batch_first_boundary(g, meta)
    onnx.helper.set_model_props(model, {**{p.key: p.value for p in model.metadata_props},
                                         "cocompile": json.dumps(meta, indent=1)})
    g.initializer.extend([helper.make_tensor("cocompile.minus_one", TensorProto.INT64, [1], [-1]),
                          helper.make_tensor("cocompile.column", TensorProto.INT64, [2], [-1, 1]),
                          helper.make_tensor("cocompile.one", TensorProto.FLOAT, [], [1.0])])
    states = [s["name"] for s in meta["states"]]
    for name in states:
        value = next(v for v in g.input if v.name == name)
        if len(value.type.tensor_type.shape.dim) == 1:
            _rank1_to_column(g, name, True)
            _rank1_to_column(g, "next_" + name, False)
    for name in states:
        value = next(v for v in g.input if v.name == name)
        _zero_on_start(g, name, len(value.type.tensor_type.shape.dim), _dtype(value))
    g.node.insert(0, helper.make_node("Sub", ["cocompile.one", START], ["cocompile.keep"]))
    start = helper.make_tensor_value_info(START, TensorProto.FLOAT, ["batch", 1])
    g.input.append(start)
    onnx.checker.check_model(model, full_check=True)
    return model, meta


def config_text(model: onnx.ModelProto, meta: dict, name: str, max_batch_size: int) -> str:
    """config.pbtxt: inputs and outputs of the step, the sequence batcher and its states."""
    g = model.graph
    states = {s["name"] for s in meta["states"]}

    def tensor(v):
        return f'{{ name: "{v.name}" data_type: {_TYPES[_dtype(v)]} dims: {_dims(v)} }}'

    inputs = [tensor(v) for v in g.input if v.name not in states and v.name != START]
    outputs = [tensor(v) for v in g.output if v.name.removeprefix("next_") not in states]
    entries = []
    for v in g.input:
        if v.name in states:
            t, d = _TYPES[_dtype(v)], _dims(v)
            entries.append(f'    {{ input_name: "{v.name}" output_name: "next_{v.name}" data_type: {t} '
                           f'dims: {d} initial_state: {{ data_type: {t} dims: {d} zero_data: true '
                           f'name: "zeros" }} }}')
    return "\n".join([
        f'name: "{name}"', 'backend: "onnxruntime"', f"max_batch_size: {max_batch_size}",
        "input [ " + ", ".join(inputs) + " ]", "output [ " + ", ".join(outputs) + " ]",
        "sequence_batching {", "  max_sequence_idle_microseconds: 60000000",
        f'  control_input [ {{ name: "{START}" control [ {{ kind: CONTROL_SEQUENCE_START '
        "fp32_false_true: [ 0, 1 ] } ] } ]",
        "  state [", ",\n".join(entries), "  ]", "}",
        "instance_group [ { kind: KIND_CPU count: 1 } ]", ""])


def write_repository(artifact: str, repo: str, name: str | None = None, max_batch_size: int = 64) -> str:
    """Write repo/name/{config.pbtxt, 1/model.onnx} for an ONNX artifact; returns the model folder."""
    name = name or os.path.splitext(os.path.basename(artifact))[0]
    model, meta = triton_model(artifact)
    folder = os.path.join(repo, name)
    os.makedirs(os.path.join(folder, "1"), exist_ok=True)
    onnx.save(model, os.path.join(folder, "1", "model.onnx"))
    with open(os.path.join(folder, "config.pbtxt"), "w") as f:
        f.write(config_text(model, meta, name, max_batch_size))
    return folder

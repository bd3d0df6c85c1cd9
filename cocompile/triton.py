"""A Triton Inference Server model repository for an ONNX artifact: the sequence batcher keeps each
stream's state (implicit state management), one state entry per state tensor, zero initial state,
and a START control input that zeroes the state at the start of a sequence.

    repo/NAME/config.pbtxt
    repo/NAME/1/model.onnx      the artifact with a START input; state.frames as [batch, 1]

>>> write_repository("co_model.onnx", "triton_repo")      # then: tritonserver --model-repository triton_repo
"""
from __future__ import annotations

import json
import os

import onnx
from onnx import TensorProto, helper

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
        for node in graph.node:
            node.output[:] = [inner if o == name else o for o in node.output]
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


def triton_model(artifact: str) -> tuple[onnx.ModelProto, dict]:
    """The artifact with a START control input and column-shaped per-stream scalars."""
    model = onnx.load(artifact)
    meta = json.loads({p.key: p.value for p in model.metadata_props}["cocompile"])
    g = model.graph
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

"""cocompile/onnx_transposes.py. Oracle: onnxruntime on the graph before the rewrite."""
from __future__ import annotations

import numpy as np
import onnx
import onnx_graphsurgeon as gs
import onnxruntime as ort
from onnx import TensorProto, helper, numpy_helper

from cocompile.onnx_transposes import sink_transposes

ROWS_TO_NCHW, NCHW_TO_ROWS = [0, 3, 2, 1], [0, 3, 2, 1]      # (b, V, T, C) <-> (b, C, T, V)
RNG = np.random.default_rng(0)


def _f32(name, shape):
    return numpy_helper.from_array(RNG.standard_normal(shape).astype(np.float32), name)


def _model(nodes, inputs: dict, outputs: dict, consts=()):
    graph = helper.make_graph(
        nodes, "g", [helper.make_tensor_value_info(n, t, s) for n, (t, s) in inputs.items()],
        [helper.make_tensor_value_info(n, TensorProto.FLOAT, s) for n, s in outputs.items()],
        initializer=list(consts))
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    return onnx.shape_inference.infer_shapes(model)


def _rewrite(model):
    out = gs.export_onnx(sink_transposes(gs.import_onnx(model)))
    onnx.checker.check_model(out, full_check=True)
    return out


def _run(model, feeds):
    sess = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return sess.run(None, feeds)


def _ops(model) -> list[str]:
    return [n.op_type for n in model.graph.node]


def _block():
    """A product's rows read as NCHW, BatchNorm's affine (per-channel constants of rank 3), ReLU,
    a frame mask (batch, 1, 1, 1), and back to rows for the next product; plus a residual add of
    two NCHW views of rows and the result read both as rows and as an output."""
    nodes = [
        helper.make_node("Transpose", ["r"], ["n1"], perm=ROWS_TO_NCHW),
        helper.make_node("Mul", ["n1", "scale"], ["n2"]),
        helper.make_node("Add", ["n2", "shift"], ["n3"]),
        helper.make_node("Relu", ["n3"], ["n4"]),
        helper.make_node("Where", ["mask", "zero", "n4"], ["n5"]),
        helper.make_node("Transpose", ["n5"], ["rows"], perm=NCHW_TO_ROWS),
        helper.make_node("Transpose", ["r"], ["a"], perm=ROWS_TO_NCHW),
        helper.make_node("Transpose", ["s"], ["b"], perm=ROWS_TO_NCHW),
        helper.make_node("Add", ["a", "b"], ["sum"]),
        helper.make_node("Relu", ["sum"], ["y"]),
        helper.make_node("Transpose", ["y"], ["y_rows"], perm=NCHW_TO_ROWS),
    ]
    inputs = {"r": (TensorProto.FLOAT, ["batch", 5, 1, 4]), "s": (TensorProto.FLOAT, ["batch", 5, 1, 4]),
              "mask": (TensorProto.BOOL, ["batch", 1, 1, 1])}
    outputs = {"rows": ["batch", 5, 1, 4], "y": ["batch", 4, 1, 5], "y_rows": ["batch", 5, 1, 4]}
    consts = [_f32("scale", (4, 1, 1)), _f32("shift", (4, 1, 1)),
              numpy_helper.from_array(np.zeros((), np.float32), "zero")]
    return _model(nodes, inputs, outputs, consts)


def _feeds(batch):
    return {"r": RNG.standard_normal((batch, 5, 1, 4)).astype(np.float32),
            "s": RNG.standard_normal((batch, 5, 1, 4)).astype(np.float32),
            "mask": RNG.random((batch, 1, 1, 1)) < 0.5}


def test_transposes_sink_through_elementwise_ops_and_cancel():
    model = _block()
    out = _rewrite(model)
    # the mask chain cancels; the residual's two Transposes become one, which the output y keeps
    assert _ops(model).count("Transpose") == 5 and _ops(out).count("Transpose") == 1
    producer = {o: n.op_type for n in out.graph.node for o in n.output}
    assert producer["y"] == "Transpose" and producer["rows"] == "Where" and producer["y_rows"] == "Relu"
    for batch in (1, 3):
        feeds = _feeds(batch)
        for a, b in zip(_run(model, feeds), _run(out, feeds)):
            np.testing.assert_array_equal(a, b)
    assert _ops(_rewrite(out)) == _ops(out)       # nothing left to do


def test_a_transpose_stays_where_sinking_gains_nothing():
    """Only an output reads the op after it, an op broadcasts to a larger value, or the other
    input has another layout: the graph is returned as it was."""
    nodes = [
        helper.make_node("Transpose", ["r"], ["n1"], perm=ROWS_TO_NCHW),
        helper.make_node("Relu", ["n1"], ["y1"]),
        helper.make_node("Transpose", ["r"], ["n2"], perm=ROWS_TO_NCHW),
        helper.make_node("Add", ["n2", "wide"], ["y2"]),                  # (b, 4, 1, 5) + (1, 4, 3, 5)
        helper.make_node("Transpose", ["r"], ["n3"], perm=ROWS_TO_NCHW),
        helper.make_node("Transpose", ["q"], ["n4"], perm=[0, 2, 1, 3]),
        helper.make_node("Add", ["n3", "n4"], ["n5"]),
        helper.make_node("Transpose", ["n5"], ["y3"], perm=NCHW_TO_ROWS),
    ]
    inputs = {"r": (TensorProto.FLOAT, ["batch", 5, 1, 4]), "q": (TensorProto.FLOAT, ["batch", 1, 4, 5])}
    outputs = {"y1": ["batch", 4, 1, 5], "y2": ["batch", 4, 3, 5], "y3": ["batch", 5, 1, 4]}
    model = _model(nodes, inputs, outputs, [_f32("wide", (1, 4, 3, 5))])
    graph = gs.import_onnx(model)
    assert sink_transposes(graph) is graph

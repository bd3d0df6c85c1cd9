"""cocompile/onnx_reshapes.py. Oracle: onnxruntime on the graph before the rewrites."""
from __future__ import annotations

import numpy as np
import onnx
import pytest
import onnx_graphsurgeon as gs
import onnxruntime as ort
from onnx import TensorProto, helper

from cocompile.onnx_reshapes import tidy_reshapes


def _const(name, values):
    return helper.make_tensor(name, TensorProto.INT64, [len(values)], values)


def _model():
    """x (batch, 6, 4): one chain whose transposes cancel (rows read as NCHW and regrouped, as a
    channels-last product's output is), one whose transpose moves data, and a chain end that is
    also read by another node."""
    nodes = [
        # cancels: (b, 6, 4) -> (b, 2, 3, 4) -> perm (0, 3, 2, 1) -> perm back -> (b, 24)
        helper.make_node("Reshape", ["x", "s1"], ["a1"], allowzero=1),
        helper.make_node("Transpose", ["a1"], ["a2"], perm=[0, 3, 2, 1]),
        helper.make_node("Transpose", ["a2"], ["a3"], perm=[0, 3, 2, 1]),
        helper.make_node("Reshape", ["a3", "s2"], ["a4"]),
        helper.make_node("Relu", ["a4"], ["y1"]),
        # moves data: (b, 6, 4) -> perm (0, 2, 1) -> (b, 24)
        helper.make_node("Transpose", ["x"], ["b1"], perm=[0, 2, 1]),
        helper.make_node("Reshape", ["b1", "s2"], ["b2"]),
        helper.make_node("Relu", ["b2"], ["y2"]),
        # an intermediate that is an output too
        helper.make_node("Reshape", ["x", "s1"], ["c1"]),
        helper.make_node("Transpose", ["c1"], ["y3"], perm=[0, 1, 3, 2]),
        helper.make_node("Transpose", ["y3"], ["c3"], perm=[0, 1, 3, 2]),
        helper.make_node("Reshape", ["c3", "s2"], ["y4"]),
    ]
    shapes = {"y1": ["batch", 24], "y2": ["batch", 24], "y3": ["batch", 2, 4, 3], "y4": ["batch", 24]}
    outs = [helper.make_tensor_value_info(n, TensorProto.FLOAT, s) for n, s in shapes.items()]
    graph = helper.make_graph(nodes, "chains", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 6, 4])],
                              outs, initializer=[_const("s1", [-1, 2, 3, 4]), _const("s2", [-1, 24])])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def _run(model, x):
    sess = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return sess.run(None, {"x": x})


def _state_model(name, nodes, outputs, consts, also_read, read):
    """A step's state update: inputs state (b, 2, 3, 4) and x (b, 2, 1, 4), the persons folded into
    the batch by the constants fold / fold_x and unfolded by unfold. The value `read` has a second
    reader where `also_read` is "node" (a sum of it, an output more) or "output" (it is an output
    itself)."""
    if also_read == "node":
        nodes = nodes + [helper.make_node("ReduceSum", [read, "one"], [f"{read}_sum"], keepdims=0)]
        outputs = outputs + [helper.make_tensor_value_info(f"{read}_sum", TensorProto.FLOAT, [None, 4])]
    elif also_read == "output":
        outputs = outputs + [helper.make_tensor_value_info(read, TensorProto.FLOAT, [None, 3, 4])]
    inputs = [helper.make_tensor_value_info("state", TensorProto.FLOAT, ["batch", 2, 3, 4]),
              helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 2, 1, 4])]
    folds = {"fold": [-1, 3, 4], "fold_x": [-1, 1, 4], "unfold": [-1, 2, 3, 4], "one": [1]}
    graph = helper.make_graph(nodes, name, inputs, outputs,
                              initializer=[_const(k, v) for k, v in {**folds, **consts}.items()])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def _assert_same_outputs(model, out):
    for batch in (1, 3):
        rng = np.random.default_rng(batch)
        feeds = {"state": rng.standard_normal((batch, 2, 3, 4)).astype(np.float32),
                 "x": rng.standard_normal((batch, 2, 1, 4)).astype(np.float32)}
        want = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, feeds)
        got = ort.InferenceSession(out.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, feeds)
        for a, b in zip(want, got):
            np.testing.assert_array_equal(a, b)


def test_chains_that_keep_the_order_become_one_reshape():
    model = _model()
    graph = gs.import_onnx(model)
    assert tidy_reshapes(graph, "batch") == 2
    out = gs.export_onnx(graph)
    onnx.checker.check_model(out, full_check=True)
    ops = [n.op_type for n in out.graph.node]
    assert ops.count("Transpose") == 2       # the data-moving one, and y3's (an output)
    for batch in (1, 3, 5):
        x = np.random.default_rng(batch).standard_normal((batch, 6, 4)).astype(np.float32)
        for a, b in zip(_run(model, x), _run(out, x)):
            np.testing.assert_array_equal(a, b)
    again = gs.import_onnx(out)
    assert tidy_reshapes(again, "batch") == 0


def test_a_fixed_batch_gets_a_fixed_shape():
    model = _model()
    model.graph.input[0].type.tensor_type.shape.dim[0].dim_value = 2
    graph = gs.import_onnx(model)
    assert tidy_reshapes(graph, 2) == 2
    x = np.random.default_rng(0).standard_normal((2, 6, 4)).astype(np.float32)
    for a, b in zip(_run(model, x), _run(gs.export_onnx(graph), x)):
        np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize("also_read", [False, "node", "output"])
def test_a_state_is_sliced_straight_into_its_output(also_read):
    """cat(state, new frame) along time, the oldest frame dropped (Slice), the persons folded into
    the batch unfolded again (Reshape into the output): the Reshape moves before the Slice. Where
    the window is also read (a clip mean over it, or an output), that reader gets the output
    folded back."""
    nodes = [
        helper.make_node("Reshape", ["state", "fold"], ["s1"]),          # (b, 2, 3, 4) -> (2b, 3, 4)
        helper.make_node("Reshape", ["x", "fold_x"], ["x1"]),            # (b, 2, 1, 4) -> (2b, 1, 4)
        helper.make_node("Concat", ["s1", "x1"], ["buf"], axis=1),       # (2b, 4, 4)
        helper.make_node("ReduceSum", ["buf", "one"], ["y"], keepdims=0),
        helper.make_node("Slice", ["buf", "starts", "ends", "axes"], ["kept"]),
        helper.make_node("Reshape", ["kept", "unfold"], ["next_state"]),  # (2b, 3, 4) -> (b, 2, 3, 4)
    ]
    outputs = [helper.make_tensor_value_info("y", TensorProto.FLOAT, [None, 4]),
               helper.make_tensor_value_info("next_state", TensorProto.FLOAT, ["batch", 2, 3, 4])]
    model = _state_model("state", nodes, outputs, {"starts": [1], "ends": [4], "axes": [1]}, also_read, "kept")
    g = gs.import_onnx(model)
    assert tidy_reshapes(g, "batch") == 1
    out = gs.export_onnx(g)
    onnx.checker.check_model(out, full_check=True)
    producer = {o: n.op_type for n in out.graph.node for o in n.output}
    assert producer["next_state"] == "Slice"
    _assert_same_outputs(model, out)


@pytest.mark.parametrize("also_read", [False, "node", "output"])
def test_a_fifo_is_concatenated_straight_into_its_output(also_read):
    """A delay's step: the leaving frame sliced from the state, the kept frames (another Slice)
    and the new frame concatenated, the persons unfolded again (Reshape into the output). The
    Reshape moves above the Concat and on above the kept frames' Slice; a Concat that something
    else also reads (a node, or as an output) stays as it is."""
    nodes = [
        helper.make_node("Reshape", ["state", "fold"], ["s1"]),           # (b, 2, 3, 4) -> (2b, 3, 4)
        helper.make_node("Reshape", ["x", "fold_x"], ["x1"]),             # (b, 2, 1, 4) -> (2b, 1, 4)
        helper.make_node("Slice", ["s1", "zero", "one", "axes"], ["y"]),  # the leaving frame
        helper.make_node("Slice", ["s1", "one", "three", "axes"], ["kept"]),
        helper.make_node("Concat", ["kept", "x1"], ["fifo"], axis=1),     # (2b, 3, 4)
        helper.make_node("Reshape", ["fifo", "unfold"], ["next_state"]),  # -> (b, 2, 3, 4)
    ]
    outputs = [helper.make_tensor_value_info("y", TensorProto.FLOAT, [None, 1, 4]),
               helper.make_tensor_value_info("next_state", TensorProto.FLOAT, ["batch", 2, 3, 4])]
    model = _state_model("fifo", nodes, outputs, {"zero": [0], "three": [3], "axes": [1]}, also_read, "fifo")
    g = gs.import_onnx(model)
    assert tidy_reshapes(g, "batch") == (0 if also_read else 2)      # the Concat, then the Slice
    out = gs.export_onnx(g)
    onnx.checker.check_model(out, full_check=True)
    made_by = {o: n for n in out.graph.node for o in n.output}
    assert made_by["next_state"].op_type == ("Reshape" if also_read else "Concat")
    if not also_read:              # kept frames: a Slice of the state (read through free Reshapes)
        kept = made_by[made_by["next_state"].input[0]]
        assert kept.op_type == "Slice" and made_by[kept.input[0]].op_type == "Reshape"
    _assert_same_outputs(model, out)

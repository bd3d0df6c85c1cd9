"""ONNX rewrite: Transposes sunk through the elementwise ops after them, where they meet and cancel.

A channels-last step (ST-GCN: every conv a matrix product over rows (N, V, T, C)) keeps its
elementwise ops (BatchNorm's affine, ReLU, warm-up masks, the residual add) on the captured NCHW
values, which the eager step reads as views of the rows. The ONNX exporter writes each of those
views as a Transpose, a copy in onnxruntime: back to NCHW after every product, back to rows before
the next one. An elementwise op gives the same elements in any layout, so

    Transpose(x, p) -> Relu              becomes   Relu(x) -> Transpose(p)
    Add(Transpose(a, p), Transpose(b, p))  becomes   Add(a, b) -> Transpose(p)
    Mul(Transpose(x, p), constant c)     becomes   Mul(x, c') -> Transpose(p)   (c' = c laid out as x)

and a Transpose that arrives at another one composes with it: two that undo each other vanish,
and what is left (a permutation that moves only size-1 axes) becomes a Reshape in the reshape pass
that runs next (onnx_reshapes). A Transpose sinks through an op only when the op's other inputs
are constants, Transposes with the same permutation, or values with at most one axis that is not 1
(the frame masks, reshaped), and when the op's output keeps its input's shape, so no Transpose
lands on a larger value. The graph is kept as it was if the rewrite would leave more Transposes.
"""
from __future__ import annotations

import numpy as np

# ops that compute each output element from the elements at the same position of their inputs
# (numpy broadcasting), whatever the layout
ELEMENTWISE = frozenset({
    "Abs", "Add", "And", "Ceil", "Clip", "Cos", "Div", "Elu", "Equal", "Erf", "Exp", "Floor", "Gelu",
    "Greater", "GreaterOrEqual", "HardSigmoid", "HardSwish", "LeakyRelu", "Less", "LessOrEqual", "Log",
    "Max", "Min", "Mul", "Neg", "Not", "Or", "Pow", "Reciprocal", "Relu", "Round", "Sigmoid", "Sign",
    "Sin", "Softplus", "Sqrt", "Sub", "Tanh", "Where", "Xor"})


def sink_transposes(graph):
    """`graph` (onnx_graphsurgeon) with its Transposes sunk and cancelled: a rewritten copy, or
    `graph` itself where the rewrite leaves no fewer Transposes."""
    trial, masks = graph.copy(), {}
    while True:
        moved = sum(_sink(trial, t, masks) for t in _transposes(trial))
        moved += sum(_compose(trial, t) for t in _transposes(trial))
        if not moved:
            break
        trial.cleanup()
    if _count(trial) >= _count(graph):
        return graph
    return trial.toposort()


def _count(graph) -> int:
    return sum(n.op == "Transpose" for n in graph.nodes)


def _transposes(graph) -> list:
    return [n for n in graph.nodes if n.op == "Transpose" and n.outputs and n.inputs]


def _perm(node) -> list[int]:
    rank = len(node.inputs[0].shape) if node.inputs[0].shape is not None else None
    perm = node.attrs.get("perm")
    if perm is None:
        return list(range(rank))[::-1] if rank is not None else None
    return [int(p) for p in perm]


def _sink(graph, t, masks: dict) -> int:
    """Move `t` below each elementwise op that reads it and takes it; returns how many. `masks`
    keeps the Reshapes of small inputs already laid out, {(name, shape): value}."""
    perm, y = _perm(t), t.outputs[0]
    if perm is None or y.shape is None:
        return 0
    moved = 0
    for op in list(y.outputs):
        inputs = _inputs_below(op, t, perm) if op.op in ELEMENTWISE and len(op.outputs) == 1 else None
        if inputs is None:
            continue
        _move_below(graph, op, inputs, perm, masks)
        moved += 1
    return moved


def _inputs_below(op, t, perm):
    """`op`'s inputs rewritten for the layout under `t`, or None where `t` cannot sink through."""
    import onnx_graphsurgeon as gs

    y, x = t.outputs[0], t.inputs[0]
    rank, inverse = len(perm), list(np.argsort(perm))
    out = op.outputs[0]
    if out.shape is None or len(out.shape) != rank or any(not _same(a, b) for a, b in zip(out.shape, y.shape)):
        return None                             # broadcasting makes the output larger (or unknown)
    new = []
    for i, value in enumerate(op.inputs):
        if value is y:
            new.append(x)
        elif value.name == "":                  # an omitted optional input
            new.append(value)
        elif isinstance(value, gs.Constant):
            c = np.asarray(value.values)
            if c.ndim > rank or any(n != 1 and n != d for n, d in zip(c.shape[::-1], y.shape[::-1])):
                return None                     # (it would broadcast y to a larger value)
            laid = c.reshape((1,) * (rank - c.ndim) + c.shape).transpose(inverse)
            new.append(value if c.ndim == 0 else gs.Constant(f"{out.name}_in{i}_relaid", np.ascontiguousarray(laid)))
        elif _is_transpose(value, perm):
            new.append(value.inputs[0].inputs[0])
        elif value.shape is not None and len(value.shape) == 0:
            new.append(value)                   # a scalar broadcasts in any layout
        else:
            shape = _relaid_shape(value.shape, rank, inverse)
            if shape is None:
                return None
            new.append(("reshape", value, shape))
    return new


def _same(a, b) -> bool:
    """Two axis sizes of the op's input and output: equal, or both symbolic (the batch, named
    differently inside the graph and at its outputs)."""
    if isinstance(a, int) or isinstance(b, int):
        return a == b
    return a not in (None, "") and b not in (None, "")


def _is_transpose(value, perm) -> bool:
    producer = value.inputs[0] if len(value.inputs) == 1 else None
    return producer is not None and producer.op == "Transpose" and _perm(producer) == perm


def _relaid_shape(shape, rank: int, inverse: list[int]):
    """The Reshape target that lays a value of `shape` (at most one axis not 1) out under the
    Transpose, or None. The one axis may be symbolic (-1 in the target)."""
    if shape is None or len(shape) != rank:
        return None
    big = [i for i, d in enumerate(shape) if d != 1]
    if len(big) > 1:
        return None
    relaid = [shape[a] for a in inverse]
    return [-1 if d != 1 and not isinstance(d, int) else d for d in relaid]


def _move_below(graph, op, inputs, perm, masks: dict) -> None:
    """op(inputs under the Transpose) -> Transpose(perm) -> op's old output."""
    import onnx_graphsurgeon as gs

    out = op.outputs[0]
    ready = []
    for value in inputs:
        if isinstance(value, tuple):            # ("reshape", value, shape): a mask laid out
            _, v, shape = value
            key = (v.name, tuple(shape))
            if key not in masks:
                name = f"{v.name}_relaid_{len(masks)}"
                masks[key] = gs.Variable(name, dtype=v.dtype)
                target = gs.Constant(f"{name}_shape", np.array(shape, dtype=np.int64))
                graph.nodes.append(gs.Node("Reshape", inputs=[v, target], outputs=[masks[key]], name=name))
            value = masks[key]
        ready.append(value)
    inverse = list(np.argsort(perm))
    below = gs.Variable(f"{out.name}_unpermuted", dtype=out.dtype,
                        shape=[out.shape[a] for a in inverse] if out.shape is not None else None)
    op.inputs, op.outputs = ready, [below]
    graph.nodes.append(gs.Node("Transpose", attrs={"perm": list(perm)}, inputs=[below], outputs=[out],
                               name=f"{out.name}_permute"))


def _compose(graph, t) -> int:
    """A Transpose of a Transpose becomes one (or none where they cancel); returns 1 if changed."""
    mid = t.inputs[0]
    if len(mid.inputs) != 1 or mid.inputs[0].op != "Transpose":
        return 0
    first = mid.inputs[0]
    p1, p2 = _perm(first), _perm(t)
    if p1 is None or p2 is None:
        return 0
    perm, out, src = [p1[k] for k in p2], t.outputs[0], first.inputs[0]
    if perm != list(range(len(perm))):
        t.attrs["perm"], t.inputs = perm, [src]
        return 1
    if out not in graph.outputs:                 # they cancel: out's readers read src
        _replace(out, src)
    elif src.inputs and src not in graph.outputs:     # src becomes the graph output itself
        _replace(src, out)
        producer = src.inputs[0]
        producer.outputs = [out if v is src else v for v in producer.outputs]
    else:
        t.op, t.attrs, t.inputs = "Identity", {}, [src]
        return 1
    t.outputs = []
    return 1


def _replace(old, new) -> None:
    """Every node that reads `old` reads `new` instead."""
    for user in list(old.outputs):
        user.inputs = [new if v is old else v for v in user.inputs]

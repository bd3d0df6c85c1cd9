"""ONNX rewrite: a chain of Reshape and Transpose nodes that leaves row-major data in its order
becomes one Reshape.

The eager step changes layouts with views, which cost nothing (a channels-last matrix product's
output read as NCHW, then regrouped for the next product). The ONNX exporter writes every permute
as a Transpose, a copy, and onnxruntime's transpose optimizer does not move a Transpose across a
Reshape, so chains like Reshape, Transpose, Reshape, Transpose, Reshape stay. Where the chain's
permutes cancel, its output holds its input's elements in the same order: one Reshape.

Which chains cancel is decided on concrete shapes: the chain is replayed on numbered elements at two
batch sizes (shapes from ONNX shape inference with the batch fixed); the new Reshape's shape has
-1 on the one axis that follows the batch.
"""
from __future__ import annotations

import numpy as np

BATCHES = (2, 3)


def collapse_reshape_chains(graph, model, batch) -> int:
    """Rewrite `graph` (onnx_graphsurgeon, the graph of `model`) in place; `batch` is the name of
    the batch axis, or the fixed batch size. Returns how many chains became one Reshape."""
    import onnx_graphsurgeon as gs

    chains = []
    for node in graph.nodes:
        if not _is_link(node) or _feeds_a_link(node):
            continue
        chain, src = [node], node.inputs[0]
        while len(src.inputs) == 1 and _is_link(src.inputs[0]):
            chain.insert(0, src.inputs[0])
            src = chain[0].inputs[0]
        if len(chain) > 1 and any(n.op == "Transpose" for n in chain):
            chains.append((chain, src))
    if not chains:
        return 0
    shapes = [_concrete_shapes(model, b) for b in ((batch,) if isinstance(batch, int) else BATCHES)]
    count = 0
    for chain, src in chains:
        node = chain[-1]
        final = _collapsed_shape(chain, [s.get(src.name) for s in shapes])
        if final is None:
            continue
        out = node.outputs[0]
        node.outputs = []
        shape = gs.Constant(f"{out.name}_collapsed_shape", np.array(final, dtype=np.int64))
        graph.nodes.append(gs.Node("Reshape", inputs=[src, shape], outputs=[out],
                                   name=f"{out.name}_collapsed"))
        count += 1
    if count:
        graph.cleanup().toposort()
    return count


def _is_link(node) -> bool:
    """A Transpose, or a Reshape to a constant shape."""
    import onnx_graphsurgeon as gs

    return node.op == "Transpose" or (node.op == "Reshape" and isinstance(node.inputs[1], gs.Constant))


def _feeds_a_link(node) -> bool:
    users = node.outputs[0].outputs
    return len(users) == 1 and _is_link(users[0]) and users[0].inputs[0] is node.outputs[0]


def _collapsed_shape(chain, src_shapes):
    """The one Reshape's shape, or None where the chain moves elements (or shapes are unknown)."""
    finals = []
    for shape in src_shapes:
        if shape is None or any(d is None or d <= 0 for d in shape):
            return None
        a = np.arange(int(np.prod(shape))).reshape(shape)
        for n in chain:
            if n.op == "Transpose":
                a = a.transpose(n.attrs.get("perm") or list(range(a.ndim))[::-1])
            else:
                keep = not n.attrs.get("allowzero", 0)     # 0 copies the input's axis
                target = [a.shape[i] if d == 0 and keep else int(d) for i, d in enumerate(n.inputs[1].values)]
                a = a.reshape(target)
        if not np.array_equal(a.reshape(-1), np.arange(a.size)):
            return None
        finals.append(list(a.shape))
    final = [d if all(f[i] == d for f in finals) else -1 for i, d in enumerate(finals[0])]
    return final if final.count(-1) <= 1 else None


def _concrete_shapes(model, batch: int) -> dict:
    """{value name: shape} by ONNX shape inference with every symbolic input/output axis = batch."""
    import onnx

    m = onnx.ModelProto()
    m.CopyFrom(model)                  # (without the weights: inference needs their shapes only)
    del m.graph.value_info[:]
    weights = [t for t in m.graph.initializer if t.data_type != onnx.TensorProto.INT64]
    for t in weights:
        m.graph.input.append(onnx.helper.make_tensor_value_info(t.name, t.data_type, list(t.dims)))
        m.graph.initializer.remove(t)
    for value in [*m.graph.input, *m.graph.output]:
        for d in value.type.tensor_type.shape.dim:
            if d.dim_param:
                d.dim_value = batch          # (setting the value clears the name: a oneof)
    try:
        m = onnx.shape_inference.infer_shapes(m, data_prop=True)
    except Exception:  # noqa: BLE001 - no shapes: no chain is rewritten
        return {}
    return {v.name: [d.dim_value if d.HasField("dim_value") else None
                     for d in v.type.tensor_type.shape.dim]
            for v in [*m.graph.value_info, *m.graph.input, *m.graph.output]}

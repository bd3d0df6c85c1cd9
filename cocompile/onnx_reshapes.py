"""ONNX rewrites of the reshapes the exporter writes for views that cost nothing in eager.

1. A chain of Reshape and Transpose nodes (or a lone Transpose) that leaves row-major data in its
   order becomes one Reshape (collapse_reshape_chains).
2. A Reshape that splits axis 0 after a Slice along another axis goes before the Slice
   (reshape_before_slice): a state whose persons the model folds into the batch is sliced (the
   window drops its oldest frame) and then unfolded into the state's own shape; onnxruntime
   copies a Reshape into a graph output, so the state was copied once more. Reshaped first, the
   Reshape reads an intermediate (no copy) and the Slice writes the output; other readers of the
   sliced value (the mean over a clip window) read the output folded back by a Reshape.
3. Likewise a Reshape that splits axis 0 after a Concat along another axis goes before each of the
   Concat's inputs (reshape_before_concat): a delay's FIFO is its kept frames and the new ones
   concatenated into the state output. Rewrites 2 and 3 repeat until neither applies, so a Reshape
   moved above a Concat goes on above the Slice that feeds it, up to the state input's own Reshape
   (two Reshapes in a row: no copy).

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


def tidy_reshapes(graph, batch) -> int:
    """The rewrites on `graph` (onnx_graphsurgeon), in place, until no Reshape moves; `batch` is
    the name of the batch axis, or the fixed batch size. Returns how many places changed."""
    total = 0
    while True:
        shapes = _Shapes(graph, batch)
        collapsed = collapse_reshape_chains(graph, shapes)
        moved = reshape_before_slice(graph, shapes) + reshape_before_concat(graph, shapes)
        count = collapsed + moved
        if count:
            graph.cleanup().toposort()
        total += count
        if not moved:
            return total


class _Shapes:
    """Concrete shapes of the graph's values at each batch size of BATCHES (or the fixed one),
    inferred on first use (before either rewrite changes the graph; both keep value names)."""

    def __init__(self, graph, batch):
        self.graph, self.batches, self._by_batch = graph, (batch,) if isinstance(batch, int) else BATCHES, None

    def of(self, name: str) -> list:
        if self._by_batch is None:
            import onnx_graphsurgeon as gs

            model = gs.export_onnx(self.graph)
            self._by_batch = [_concrete_shapes(model, b) for b in self.batches]
        return [s.get(name) for s in self._by_batch]


def collapse_reshape_chains(graph, shapes: _Shapes) -> int:
    """Returns how many chains became one Reshape."""
    import onnx_graphsurgeon as gs

    chains = []
    for node in graph.nodes:
        if not _is_link(node) or _feeds_a_link(node):
            continue
        chain, src = [node], node.inputs[0]
        while len(src.inputs) == 1 and _is_link(src.inputs[0]):
            chain.insert(0, src.inputs[0])
            src = chain[0].inputs[0]
        if any(n.op == "Transpose" for n in chain):       # (a lone Transpose may move size-1 axes only)
            chains.append((chain, src))
    count = 0
    for chain, src in chains:
        node = chain[-1]
        final = _collapsed_shape(chain, shapes.of(src.name))
        if final is None:
            continue
        out = node.outputs[0]
        node.outputs = []
        shape = gs.Constant(f"{out.name}_collapsed_shape", np.array(final, dtype=np.int64))
        graph.nodes.append(gs.Node("Reshape", inputs=[src, shape], outputs=[out],
                                   name=f"{out.name}_collapsed"))
        count += 1
    return count


def reshape_before_slice(graph, shapes: _Shapes) -> int:
    """Returns how many Reshape-after-Slice pairs were swapped."""
    import onnx_graphsurgeon as gs

    count = 0
    for node in list(graph.nodes):
        sl = node.inputs[0].inputs[0] if node.op == "Reshape" and node.inputs[0].inputs else None
        if sl is None or sl.op != "Slice" or not _is_link(node):
            continue
        read_too = any(n is not node for n in sl.outputs[0].outputs) or sl.outputs[0] in graph.outputs
        if read_too and node.outputs[0] not in graph.outputs:
            continue                # (the Slice's value is needed anyway: nothing to gain)
        consts = [t.values if isinstance(t, gs.Constant) else None for t in sl.inputs[1:]]
        if any(c is None for c in consts) or len(consts) < 3:
            continue
        src, out = sl.inputs[0], node.outputs[0]
        src_shapes = shapes.of(src.name)
        if not src_shapes[0]:
            continue
        axes = [int(a) % len(src_shapes[0]) for a in consts[2]]
        target = [int(d) for d in node.inputs[1].values]
        before = _split_first_axis(target, src_shapes, shapes.of(sl.outputs[0].name), axes)
        if before is None:
            continue
        shape = gs.Constant(f"{out.name}_unsliced_shape", np.array(before, dtype=np.int64))
        folded = gs.Variable(f"{out.name}_unsliced", dtype=src.dtype)
        moved = [gs.Constant(f"{out.name}_slice_axes", np.array([a + 1 for a in axes], dtype=np.int64))]
        sliced = sl.outputs[0]
        node.outputs, sl.outputs = [], []
        graph.nodes.append(gs.Node("Reshape", inputs=[src, shape], outputs=[folded],
                                   name=f"{out.name}_unsliced"))
        graph.nodes.append(gs.Node("Slice", inputs=[folded, *sl.inputs[1:3], *moved, *sl.inputs[4:]],
                                   outputs=[out], name=f"{out.name}_slice"))
        if read_too:                # other readers get the output folded back (a Reshape of it)
            fold = np.array([-1, *shapes.of(sliced.name)[0][1:]], dtype=np.int64)
            merged = gs.Constant(f"{out.name}_folded_shape", fold)
            graph.nodes.append(gs.Node("Reshape", inputs=[out, merged], outputs=[sliced],
                                       name=f"{out.name}_folded"))
        count += 1
    return count


def reshape_before_concat(graph, shapes: _Shapes) -> int:
    """Returns how many Reshape-after-Concat pairs became Reshapes before the Concat."""
    import onnx_graphsurgeon as gs

    count = 0
    for node in list(graph.nodes):
        cat = node.inputs[0].inputs[0] if node.op == "Reshape" and node.inputs[0].inputs else None
        if cat is None or cat.op != "Concat" or not _is_link(node):
            continue
        out, joined = node.outputs[0], cat.outputs[0]
        if len(joined.outputs) != 1 or joined in graph.outputs or not shapes.of(joined.name)[0]:
            continue                # (the Concat's value is needed anyway, or its shape is unknown)
        axis = cat.attrs["axis"] % len(shapes.of(joined.name)[0])
        target = [int(d) for d in node.inputs[1].values]
        befores = [_split_first_axis(target, shapes.of(x.name), shapes.of(joined.name), [axis])
                   for x in cat.inputs]
        if any(b is None for b in befores):
            continue
        inputs = []
        for i, (x, before) in enumerate(zip(cat.inputs, befores)):
            shape = gs.Constant(f"{out.name}_in{i}_shape", np.array(before, dtype=np.int64))
            inputs.append(gs.Variable(f"{out.name}_in{i}", dtype=x.dtype))
            graph.nodes.append(gs.Node("Reshape", inputs=[x, shape], outputs=[inputs[-1]],
                                       name=f"{out.name}_in{i}"))
        node.outputs, cat.outputs = [], []
        graph.nodes.append(gs.Node("Concat", inputs=inputs, outputs=[out], attrs={"axis": axis + 1},
                                   name=f"{out.name}_concat"))
        count += 1
    return count


def _split_first_axis(target, src_shapes, sliced_shapes, axes):
    """The shape that splits axis 0 of the Slice's input as `target` splits the Slice's output, or
    None where `target` does anything else (or a slice axis is 0, or shapes are unknown)."""
    if not target or min(axes) < 1:
        return None
    for src, sliced in zip(src_shapes, sliced_shapes):
        if src is None or sliced is None or None in src or None in sliced:
            return None
        if len(target) != len(sliced) + 1 or any(t > 0 and t != d for t, d in zip(target[2:], sliced[1:])):
            return None
        if target[1] <= 0 or sliced[0] % target[1] or (target[0] > 0 and target[0] * target[1] != sliced[0]):
            return None
    src = src_shapes[0]
    if any(len(s) != len(src) or s[1:] != src[1:] for s in src_shapes):   # axes past 0 must be fixed
        return None
    return [target[0], target[1], *src[1:]]


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

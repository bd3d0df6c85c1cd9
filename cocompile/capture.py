"""Capture: torch.export at the example clip length, in eval mode, with a dynamic batch axis.

The captured graph takes every input batch-first: an input whose batch axis the user put
elsewhere (batch_dim, e.g. time-major (T, N, F) frames) is exported in the user's layout, then its
placeholder takes the batch-first layout and a permute back to the user's layout feeds the model's
ops. Outputs stay in the model's own layout; `Captured.out_batch_dims` says where each one's
batch axis is."""
from __future__ import annotations

import inspect
import warnings
from dataclasses import dataclass

import torch
from torch import fx
from torch.export import Dim, export
from torch.utils import _pytree as pytree

from .errors import CompileError, first_line
from .inputs import Inputs
from .ops.recurrent import shapes_only


@dataclass
class Captured:
    gm: fx.GraphModule            # core-ATen graph; parameters and buffers are placeholders
    consts: dict                  # placeholder name -> tensor (parameters, buffers, constants)
    input_names: list[str]        # placeholders of the model's inputs, in pytree order
    out_spec: pytree.TreeSpec     # structure of model(clip)
    dynamic_batch: bool
    out_batch_dims: list          # per output leaf: its batch axis, None where it has none

    @property
    def input_name(self) -> str:
        """The placeholder of the first input (the clip, for a model of one input)."""
        return self.input_names[0]


def capture(model, example, inputs, decompose: bool = False) -> Captured:
    """torch.export the model on the example clip; batch stays dynamic where the model allows.
    The graph is torch.export's ATen IR (conv3d, batch_norm, linear, ... stay whole); with
    `decompose`, the core-ATen decomposition of it (slower to make, more ops have rules)."""
    if isinstance(inputs, int):                   # one time axis for every input
        inputs = Inputs.describe(model, example, inputs)
    if isinstance(model, torch.export.ExportedProgram):
        from .loading import plain_module
        model = plain_module(model)               # an inference graph without the export's guards
    if model.training:
        warnings.warn("the model is in training mode; cocompile compiles it in eval mode "
                      "(BatchNorm uses running statistics, dropout is off)", stacklevel=3)
    modes = {m: m.training for m in model.modules()}
    try:
        model.eval()
    except NotImplementedError:                   # ExportedProgram.module(): already inference
        pass
    try:
        with shapes_only():             # RNNs' fake values from shapes, not frame by frame
            ep, dynamic = _export(model, inputs.args(example), [s.batch_dim for s in inputs.specs])
    finally:
        for m, mode in modes.items():
            m.training = mode
    if decompose:
        ep = ep.run_decompositions()
    _drop_eval_dropout(ep.graph_module.graph)
    _explicit_squeeze(ep.graph_module.graph)
    ep.graph_module.graph.eliminate_dead_code()     # e.g. unused max-pool indices
    sig = ep.graph_signature
    consts, user = {}, []
    for spec in sig.input_specs:
        if spec.kind.name == "USER_INPUT":
            user.append(spec.arg.name)
        elif spec.target in ep.state_dict:
            consts[spec.arg.name] = ep.state_dict[spec.target]
        else:
            consts[spec.arg.name] = ep.constants[spec.target]
    _batch_first_inputs(ep.graph_module.graph, user, [s.batch_dim for s in inputs.specs])
    ep.graph_module.recompile()
    outs = _output_batch_dims(ep.graph_module.graph, user)
    return Captured(ep.graph_module, consts, user, ep.call_spec.out_spec, dynamic, outs)


def _batch_first_inputs(graph: fx.Graph, names: list[str], batch_dims: list[int]) -> None:
    """Each input placeholder whose batch axis is b != 0 takes x.movedim(b, 0) instead, and a
    permute (the inverse move) gives the model's ops the layout they were captured with."""
    nodes = {n.name: n for n in graph.nodes if n.op == "placeholder"}
    for name, b in zip(names, batch_dims):
        node = nodes[name]
        if b == 0:
            continue
        val = node.meta["val"]
        node.meta["val"] = val.movedim(b, 0)
        if not node.users:
            continue
        order = [*range(1, b + 1), 0, *range(b + 1, val.dim())]    # batch-first -> user layout
        with graph.inserting_after(node):
            back = graph.call_function(torch.ops.aten.permute.default, (node, order))
        node.replace_all_uses_with(back, delete_user_cb=lambda user: user is not back)
        back.meta.update(val=val, stack_trace=node.meta.get("stack_trace"))


def _output_batch_dims(graph: fx.Graph, names: list[str]) -> list:
    """Per output leaf, the axis that holds the batch: the axis whose size is the batch symbol
    (the first such); None for an output without one (batch merged with another axis, reduced
    away, or not depending on the inputs). With a fixed batch: the first axis of its size."""
    first = next(n for n in graph.nodes if n.op == "placeholder" and n.name == names[0])
    batch = first.meta["val"].shape[0]
    key = batch.node.expr if isinstance(batch, torch.SymInt) else batch
    output = next(n for n in graph.nodes if n.op == "output")
    dims = []
    for arg in pytree.tree_leaves(output.args[0]):
        val = arg.meta.get("val") if isinstance(arg, fx.Node) else None
        sizes = [s.node.expr if isinstance(s, torch.SymInt) else s
                 for s in (val.shape if isinstance(val, torch.Tensor) else ())]
        dims.append(next((d for d, s in enumerate(sizes) if s == key), None))
    return dims


_DROPOUTS = {getattr(torch.ops.aten, name).default for name in (
    "dropout", "dropout_", "feature_dropout", "feature_dropout_", "alpha_dropout", "alpha_dropout_",
    "feature_alpha_dropout", "feature_alpha_dropout_")}


def _drop_eval_dropout(graph: fx.Graph) -> None:
    """Dropout in eval mode (train=False) is the identity: its input takes its place. Saves an op
    per step, and the in-place form (nn.Dropout(inplace=True)) would otherwise lack a rule and
    cost the decomposed retry (a second export)."""
    for node in list(graph.nodes):
        if node.op == "call_function" and node.target in _DROPOUTS and node.args[2:3] == (False,):
            node.replace_all_uses_with(node.args[0])
            graph.erase_node(node)


def _explicit_squeeze(graph: fx.Graph) -> None:
    """`x.squeeze()` names the axes of size 1 in the captured shapes (never the batch, which the
    capture keeps symbolic): on a batch of one stream the step would otherwise squeeze it too."""
    for node in graph.nodes:
        if node.op == "call_function" and node.target is torch.ops.aten.squeeze.default:
            shape = node.args[0].meta["val"].shape
            node.target = torch.ops.aten.squeeze.dims
            node.args = (node.args[0], [d for d, s in enumerate(shape) if isinstance(s, int) and s == 1])


def _export(model, args: tuple, batch_dims: list[int]):
    """torch.export on `args` with the batch axis (`batch_dims`, per input leaf) dynamic; a batch
    of one is widened to two so that export does not specialise it. Falls back to a fixed batch."""
    leaves, tree = pytree.tree_flatten(args)
    wide = pytree.tree_unflatten([_widened(t, b) for t, b in zip(leaves, batch_dims)], tree)
    batch = Dim("batch")
    dims = pytree.tree_unflatten([{b: batch} for b in batch_dims], tree)
    try:
        with warnings.catch_warnings():     # RNNs cache their weights as attributes during export
            warnings.filterwarnings("ignore", message=".*were assigned during export")
            return export(model, wide, dynamic_shapes=_by_parameter(model, dims)), True
    except Exception as dyn_err:  # noqa: BLE001 - retry with a fixed batch, report the first reason
        try:
            ep = export(model, args)
        except Exception as err:  # noqa: BLE001
            raise _capture_error(err, args) from None
        warnings.warn("the batch size is fixed to the example's "
                      f"({leaves[0].shape[batch_dims[0]]}): {str(dyn_err).strip().splitlines()[0]}",
                      stacklevel=3)
        return ep, False


def _widened(t: torch.Tensor, b: int) -> torch.Tensor:
    """`t` with a batch (axis b) of 2 if it has 1."""
    if t.shape[b] > 1:
        return t
    return t.expand(*t.shape[:b], 2, *t.shape[b + 1:]).clone()


def _by_parameter(model, dims: tuple):
    """dynamic_shapes `dims` (one per argument) in the structure of forward()'s parameters (a
    *args parameter takes one entry for all it collects)."""
    try:
        bound = inspect.signature(model.forward).bind(*dims)
    except (TypeError, ValueError, AttributeError):
        return dims
    return dict(bound.arguments)


def _capture_error(err: Exception, args) -> CompileError:
    reason = first_line(err)
    shapes = ", ".join(str(tuple(t.shape)) for t in pytree.tree_leaves(args))
    if "size" in reason and ("ernel" in reason or "too small" in reason):
        return CompileError(f"the example clip ({shapes}) is shorter than the model's receptive "
                            f"field: {reason}", hint="pass an example clip with at least as many frames "
                            "as one output needs (the clip length the model is meant for)")
    return CompileError(f"torch.export could not capture the model: {reason}",
                        hint="make forward() exportable (no data-dependent Python control flow on "
                             "tensor values; see torch.export's documentation)")

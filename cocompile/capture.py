"""Capture: torch.export at the example clip length, in eval mode, with a dynamic batch axis."""
from __future__ import annotations

import inspect
import warnings
from dataclasses import dataclass

import torch
from torch import fx
from torch.export import Dim, export
from torch.utils import _pytree as pytree

from .errors import CompileError
from .inputs import Inputs
from .ops.recurrent import shapes_only


@dataclass
class Captured:
    gm: fx.GraphModule            # core-ATen graph; parameters and buffers are placeholders
    consts: dict                  # placeholder name -> tensor (parameters, buffers, constants)
    input_names: list[str]        # placeholders of the model's inputs, in pytree order
    out_spec: pytree.TreeSpec     # structure of model(clip)
    dynamic_batch: bool

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
            ep, dynamic = _export(model, inputs.args(example))
    finally:
        for m, mode in modes.items():
            m.training = mode
    if decompose:
        ep = ep.run_decompositions()
    _drop_eval_dropout(ep.graph_module.graph)
    _explicit_squeeze(ep.graph_module.graph)
    ep.graph_module.graph.eliminate_dead_code()     # e.g. unused max-pool indices
    ep.graph_module.recompile()
    sig = ep.graph_signature
    consts, user = {}, []
    for spec in sig.input_specs:
        if spec.kind.name == "USER_INPUT":
            user.append(spec.arg.name)
        elif spec.target in ep.state_dict:
            consts[spec.arg.name] = ep.state_dict[spec.target]
        else:
            consts[spec.arg.name] = ep.constants[spec.target]
    return Captured(ep.graph_module, consts, user, ep.call_spec.out_spec, dynamic)


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


def _export(model, args: tuple):
    """torch.export on `args` with the batch axis (axis 0 of every input) dynamic; a batch of one
    is widened to two so that export does not specialise it. Falls back to a fixed batch."""
    wide = pytree.tree_map(lambda t: t if t.shape[0] > 1 else t.expand(2, *t.shape[1:]).clone(), args)
    batch = Dim("batch")
    try:
        with warnings.catch_warnings():     # RNNs cache their weights as attributes during export
            warnings.filterwarnings("ignore", message=".*were assigned during export")
            return export(model, wide, dynamic_shapes=_batch_dims(model, args, batch)), True
    except Exception as dyn_err:  # noqa: BLE001 - retry with a fixed batch, report the first reason
        try:
            ep = export(model, args)
        except Exception as err:  # noqa: BLE001
            raise _capture_error(err, args) from None
        warnings.warn("the batch size is fixed to the example's "
                      f"({_batch(args)}): {str(dyn_err).strip().splitlines()[0]}", stacklevel=3)
        return ep, False


def _batch_dims(model, args: tuple, batch):
    """dynamic_shapes with axis 0 of every input the batch, in the structure of forward()'s
    parameters (a *args parameter takes one entry for all it collects)."""
    dims = pytree.tree_map(lambda t: {0: batch}, args)
    try:
        bound = inspect.signature(model.forward).bind(*dims)
    except (TypeError, ValueError, AttributeError):
        return dims
    return dict(bound.arguments)


def _batch(args) -> int:
    return pytree.tree_leaves(args)[0].shape[0]


def _capture_error(err: Exception, args) -> CompileError:
    reason = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
    shapes = ", ".join(str(tuple(t.shape)) for t in pytree.tree_leaves(args))
    if "size" in reason and ("ernel" in reason or "too small" in reason):
        return CompileError(f"the example clip ({shapes}) is shorter than the model's receptive "
                            f"field: {reason}", hint="pass an example clip with at least as many frames "
                            "as one output needs (the clip length the model is meant for)")
    return CompileError(f"torch.export could not capture the model: {reason}",
                        hint="make forward() exportable (no data-dependent Python control flow on "
                             "tensor values; see torch.export's documentation)")

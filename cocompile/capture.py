"""Capture: torch.export at the example clip length, in eval mode, with a dynamic batch axis."""
from __future__ import annotations

import warnings
from dataclasses import dataclass

import torch
from torch import fx
from torch.export import Dim, export
from torch.utils import _pytree as pytree

from .errors import CompileError
from .ops.recurrent import shapes_only


@dataclass
class Captured:
    gm: fx.GraphModule            # core-ATen graph; parameters and buffers are placeholders
    consts: dict                  # placeholder name -> tensor (parameters, buffers, constants)
    input_name: str               # placeholder of the clip
    out_spec: pytree.TreeSpec     # structure of model(clip)
    dynamic_batch: bool


def check_example(example, time_dim: int) -> None:
    """Refuse inputs the compiler cannot stream, with the fix."""
    if not isinstance(example, torch.Tensor):
        raise CompileError(f"example_input must be one tensor (got {type(example).__name__})",
                           hint="pass the clip tensor, e.g. torch.randn(1, 3, 16, 112, 112)")
    if not example.is_floating_point():
        raise CompileError(f"example_input has dtype {example.dtype}; continual steps need floating "
                           "point frames", hint="pass example.float()")
    ndim = example.dim()
    if not -ndim <= time_dim < ndim or time_dim % ndim == 0:
        raise CompileError(f"time_dim={time_dim} is not an axis of the example of shape "
                           f"{tuple(example.shape)} (axis 0 is the batch)",
                           hint="pass time_dim= the axis that indexes frames, e.g. 2 for (N, C, T, H, W)")


def capture(model, example: torch.Tensor, time_dim: int,
            decompose: bool = False) -> Captured:
    """torch.export the model on the example clip; batch stays dynamic where the model allows.
    The graph is torch.export's ATen IR (conv3d, batch_norm, linear, ... stay whole); with
    `decompose`, the core-ATen decomposition of it (slower to make, more ops have rules)."""
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
            ep, dynamic = _export(model, example)
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
    return Captured(ep.graph_module, consts, user[0], ep.call_spec.out_spec, dynamic)


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


def _export(model, example):
    clip = example if example.shape[0] > 1 else example.expand(2, *example.shape[1:]).clone()
    try:
        return export(model, (clip,), dynamic_shapes=({0: Dim("batch")},)), True
    except Exception as dyn_err:  # noqa: BLE001 - retry with a fixed batch, report the first reason
        try:
            ep = export(model, (example,))
        except Exception as err:  # noqa: BLE001
            reason = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
            if "size" in reason and ("ernel" in reason or "too small" in reason):
                raise CompileError(f"the example clip ({example.shape[1:]}) is shorter than the "
                                   f"model's receptive field: {reason}",
                                   hint="pass an example clip with at least as many frames as one "
                                        "output needs (the clip length the model is meant for)") from None
            raise CompileError(f"torch.export could not capture the model: {reason}",
                               hint="make forward() exportable (no data-dependent Python control "
                                    "flow on tensor values; see torch.export's documentation)") from None
        warnings.warn("the batch size is fixed to the example's "
                      f"({example.shape[0]}): {str(dyn_err).strip().splitlines()[0]}", stacklevel=3)
        return ep, False

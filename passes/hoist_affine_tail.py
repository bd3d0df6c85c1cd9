"""Rewrite: affine ops after a mean over the clip run per frame, before the mean.

A mean over every frame of a value (mean over time, a pool whose kernel is the clip, adaptive
average pooling to one frame) is a clip reduction: the step keeps the value's last L frames and
averages them. When a chain of affine ops follows it (reshapes, means over other axes, 1x1 convs,
linears, constant scales and shifts: a classifier head), then ops(mean_t m_t) = mean_t ops(m_t),
where m_t is the mean of frame t alone. The chain then runs on each new frame and the window keeps
its result, which for a classifier is the class scores (ST-GCN: 60 per frame instead of
2 persons x 256 features), less the chain's value at a zero frame, which is added back after the
mean: the window's zero state then still stands for frames of zeros, also where approximate mode
reads the window before it is full (a squeeze-excitation gate).

Invariant left behind: each rewritten chain is one `mean_of_tail` node reading the mean's input
(and the constants the chain read), with the chain as a graph submodule; the offline meaning is
unchanged (up to float rounding: the ops run before the mean). A chain is moved only when its
value per frame is smaller than what the mean's window keeps per frame.
"""
from __future__ import annotations

import itertools
import math

import torch
from torch import fx

from cocompile.errors import Refusal
from cocompile.ops.clip import TAILS, AffineTail, mean_of_tail
from cocompile.ops.frames import stream_axis, symbolic_shape
from cocompile.ops.registry import rule_for
from cocompile.passes.assign_states import per_stream
from cocompile.passes.graph_edit import inherit
from cocompile.timeinfo import CLIP, META, STATIC, TimeInfo

aten = torch.ops.aten
_ids = itertools.count()

# ops affine in their first argument (shape changes, selections, means and sums over axes,
# scalar scales and shifts, division by a constant)
LINEAR_IN_FIRST = {
    aten.view.default, aten._unsafe_view.default, aten.reshape.default, aten.permute.default,
    aten.transpose.int, aten.t.default, aten.squeeze.dim, aten.squeeze.dims, aten.squeeze.default,
    aten.unsqueeze.default, aten.flatten.using_ints, aten.clone.default, aten.alias.default,
    aten.contiguous.default, aten.expand.default, aten.select.int, aten.slice.Tensor,
    aten.mean.dim, aten.sum.dim_IntList, aten.neg.default, aten.div.Tensor, aten.div.Scalar,
    aten.add.Scalar, aten.sub.Scalar, aten.mul.Scalar,
}
# ops affine in each tensor argument when the others are constants (products, sums, convolutions)
AFFINE_IN_EACH = {
    aten.add.Tensor, aten.sub.Tensor, aten.mul.Tensor, aten.linear.default, aten.addmm.default,
    aten.mm.default, aten.matmul.default, aten.bmm.default, aten.einsum.default,
    aten.convolution.default, aten.conv1d.default, aten.conv2d.default, aten.conv3d.default,
}


def hoist_affine_tails(gm: fx.GraphModule) -> int:
    """Rewrite every mean over the clip followed by affine ops that shrink it; returns how many.
    Needs the TimeInfo of a finished analysis on every node."""
    done = 0
    for node in list(gm.graph.nodes):
        one = _frame_mean(node)
        if one is None:
            continue
        chain = _affine_chain(node)
        if chain and _moved_is_smaller(node, chain[-1]):
            _rewrite(gm, node, chain, one, f"cocompile_tail_{next(_ids)}")
            done += 1
    if done:
        gm.graph.lint()
        gm.recompile()
    return done


def _frame_mean(node: fx.Node):
    """The one-frame form of `node` when it is a mean over every frame of a plain stream."""
    if node.op != "call_function" or len(node.users) != 1 or not isinstance(node.meta.get(META), TimeInfo):
        return None
    rule, x = rule_for(node.target), node.args[0] if node.args else None
    info = x.meta.get(META) if isinstance(x, fx.Node) else None
    if rule is None or not isinstance(info, TimeInfo) or not info.is_time or stream_axis(x):
        return None
    if any(isinstance(a, fx.Node) for a in (*node.args[1:], *node.kwargs.values())):
        return None
    return rule.frame_mean(node, info)


def _affine_chain(mean: fx.Node) -> list[fx.Node]:
    """The longest chain of single-user ops after `mean` that are affine in the value before them
    and read nothing else that depends on the input; ends at a value with the batch on axis 0."""
    chain, value = [], mean
    while len(value.users) == 1:
        user = next(iter(value.users))
        if user.op != "call_function" or not _affine_in(user, value):
            break
        chain.append(user)
        value = user
    while chain and not _batch_first(chain[-1]):
        chain.pop()
    return chain


def _affine_in(node: fx.Node, value: fx.Node) -> bool:
    args = [*node.args, *node.kwargs.values()]
    flat = []
    fx.node.map_arg(args, flat.append)
    if flat.count(value) != 1 or isinstance(node.meta.get("val"), (tuple, list)):
        return False
    if any(a is not value and not _static(a) for a in flat):
        return False
    if node.target in AFFINE_IN_EACH:
        return True
    return node.target in LINEAR_IN_FIRST and node.args[0] is value


def _static(node: fx.Node) -> bool:
    info = node.meta.get(META)
    return info is None or (isinstance(info, TimeInfo) and info.kind == STATIC)


def _batch_first(node: fx.Node) -> bool:
    val = node.meta.get("val")
    if not isinstance(val, torch.Tensor) or val.dim() == 0 or node.meta[META].kind != CLIP:
        return False
    lead = symbolic_shape(node)[0]
    return not isinstance(lead, int) and all(isinstance(s, int) for s in symbolic_shape(node)[1:])


def _values_per_stream(shape) -> int:
    """Values per stream of a value of `shape` (axis 0 holds the batch, or a multiple of it)."""
    return math.prod(per_stream(shape)[0])


def _moved_is_smaller(mean: fx.Node, last: fx.Node) -> bool:
    """Whether `last` keeps fewer values per stream than the mean's clip window keeps per frame
    (False where either cannot be kept per stream: nothing is moved, and assign_states reports
    why at that node)."""
    try:
        spec = rule_for(mean.target).states(mean, _Infos())
        window = _values_per_stream(next(iter(spec.values()))[0]) / mean.args[0].meta[META].length
        return _values_per_stream(symbolic_shape(last)) < window
    except Refusal:
        return False


class _Infos:
    """What a rule's `states` reads of the analysis here: the annotated TimeInfo as is."""

    @staticmethod
    def info(arg):
        return arg.meta[META]


def _rewrite(gm: fx.GraphModule, mean: fx.Node, chain: list[fx.Node], one, name: str) -> None:
    """Replace mean -> chain by one mean_of_tail node reading the mean's input."""
    inside = {mean, *chain}
    ext = []
    for node in chain:
        fx.node.map_arg((node.args, node.kwargs),
                        lambda a: ext.append(a) if a not in inside and a not in ext else None)
    sub = fx.Graph()
    env = {mean: sub.placeholder("mean")}
    for i, a in enumerate(ext):
        env[a] = sub.placeholder(f"ext_{i}")
    for node in chain:
        env[node] = sub.node_copy(node, lambda a: env[a])
    sub.output(env[chain[-1]])
    ops = fx.GraphModule(torch.nn.Module(), sub)
    target, m_args, m_kwargs = mean.target, mean.args, mean.kwargs
    tail = AffineTail(lambda x: target(x, *m_args[1:], **m_kwargs),
                      lambda frame: one(frame, (frame, *m_args[1:]), m_kwargs), ops,
                      f"after {mean.name} ({' -> '.join(n.name for n in chain)})")
    gm.add_submodule(name, tail)
    TAILS[name] = tail
    last = chain[-1]
    with gm.graph.inserting_after(last):
        new = gm.graph.create_node("call_function", mean_of_tail, (mean.args[0], name, *ext),
                                   name=f"{mean.name}_tail")
    inherit(new, last, source=mean)
    last.replace_all_uses_with(new)
    for node in reversed([mean, *chain]):
        gm.graph.erase_node(node)

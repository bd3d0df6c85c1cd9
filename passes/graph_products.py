"""What the graph-product rewrites share: a 1x1 convolution over channels and products with
constant matrices over the last axis (a skeleton's joints), in any of the ways models write
them, read as one record, and written back in either order.

    y[n, o, ..., w] = sum_k sum_c sum_v W[k, o, c] x[n, c, ..., v] A[k, v, w]  + bias[o, w]

K subsets (ST-GCN's spatial partitions), W (K, C', C), A (K, V, W), bias (C', W) or None. The
convolution mixes channels and A mixes joints, so the two commute, and the K subsets are one
product whichever goes first:

    "conv"    conv of x with the K*C' filters stacked, viewed (N, K, C', ..., V), einsum over
              (k, v) with A: ST-GCN's own graph conv. The einsum runs on C' channels.
    "joints"  einsum of x with A to (N, K, C, ..., W), flattened to K*C channels, one conv with
              W laid out (C', K*C): 2s-AGCN's order, its K convs as one. The einsum runs on C.

Read forms (`match`): either of the above, with a bias added after; a 1x1 conv of
`matmul(x.view(N, -1, V), A).view(N, C, ..., W)`, of `x @ A` or of `einsum(x, A)` (one subset).
The two orders compute the same sums in another order (float rounding only).
"""
from __future__ import annotations

from dataclasses import dataclass, replace

import torch
from torch import fx

from cocompile.ops.schema import bind
from cocompile.passes.graph_edit import const, inherit

aten = torch.ops.aten
CONVS = {aten.conv1d.default: 3, aten.conv2d.default: 4, aten.conv3d.default: 5}   # op: rank
RESHAPES = (aten.view.default, aten.reshape.default, aten._unsafe_view.default)
MID = "abdefghijl"                      # einsum letters of the axes between channels and joints
OP_COST = 1 << 16       # one more dispatched op, in multiply-adds: a few microseconds of a CPU core


@dataclass(frozen=True)
class GraphProduct:
    """One product, read from `root` (the node whose value it is): `nodes` are the ops it
    replaces, `order` the one it is written in now ("conv" or "joints")."""

    x: fx.Node
    weight: torch.Tensor             # (K, C', C)
    adjacency: torch.Tensor          # (K, V, W)
    bias: torch.Tensor | None        # (C', W)
    order: str
    root: fx.Node
    nodes: tuple = ()

    def cost(self, order: str) -> int:
        """Multiply-adds and values written per frame of one stream (middle axes of size 1),
        in `order`; "joints" is also charged the two copies that lay its stacked values out
        for the conv (into its channel order, and channels-last or ONNX's layout), at
        OP_COST each."""
        (k, co, c), (_, v, w) = self.weight.shape, self.adjacency.shape
        if order == "conv":
            return k * co * c * v + k * co * v * w + k * co * v + co * w
        return k * c * v * w + k * co * c * w + k * c * w + co * w + 2 * OP_COST

    @property
    def cheaper(self) -> str:
        """The order with the lower cost; a tie keeps the conv first."""
        return "joints" if self.cost("joints") < self.cost("conv") else "conv"

    def plus(self, other: "GraphProduct") -> "GraphProduct":
        """The sum of two products of the same value: their subsets stacked, biases added."""
        bias = other.bias if self.bias is None else self.bias if other.bias is None else self.bias + other.bias
        return replace(self, weight=torch.cat([self.weight, other.weight]), bias=bias,
                       adjacency=torch.cat([self.adjacency, other.adjacency]),
                       nodes=self.nodes + other.nodes)


# -- reading ---------------------------------------------------------------------------------------
def match(node, consts: dict) -> GraphProduct | None:
    """`node` read as a GraphProduct (a bias added after it included), or None. Ops between
    x and `node` must have no other reader."""
    base, bias = node, None
    if node.op == "call_function" and node.target is aten.add.Tensor and len(node.args) == 2 and not node.kwargs:
        bias = _bias(node.args[1], consts, node)
        base = node.args[0] if bias is not None else node
    gp = _conv_first(base, consts) or _joints_first(base, consts)
    if gp is None or any(len(n.users) != 1 for n in gp.nodes if n is not node):
        return None
    if bias is not None:
        gp = replace(gp, bias=bias if gp.bias is None else gp.bias + bias, nodes=gp.nodes + (base,))
    return replace(gp, root=node)


def _conv_first(node, consts) -> GraphProduct | None:
    """einsum('nkc..v,kvw->nc..w', conv(x).unflatten(1, (K, C')), A), or with no k."""
    parsed = _einsum(node, consts)
    if parsed is None:
        return None
    y, A, eq = parsed
    lx, lo = eq
    split = y
    if len(lx) == len(lo) + 1:                        # K subsets: the conv's channels split
        if y.op != "call_function" or y.target not in RESHAPES + (aten.unflatten.int,):
            return None
        split, K = y.args[0], A.shape[0]
        if not _splits_channels(split, y, K):
            return None
    elif len(lx) != len(lo) or A.shape[0] != 1:
        return None
    conv = _conv(split, consts)
    if conv is None or len(lx) != conv[0].meta["val"].dim() + (split is not y):
        return None
    x, W, b = conv
    K = A.shape[0]
    W = W.unflatten(0, (K, -1))
    bias = None if b is None else torch.einsum("kc,kw->cw", b.view(K, -1), A.sum(1))
    return GraphProduct(x, W, A, bias, "conv", node, tuple(dict.fromkeys((node, y, split))))


def _joints_first(node, consts) -> GraphProduct | None:
    """conv(einsum('nc..v,kvw->nkc..w', x, A).flatten(1, 2)), or a conv of one product of x
    with A over its last axis written as a matmul or an einsum."""
    conv = _conv(node, consts)
    if conv is None:
        return None
    y, W, b = conv
    prod = _joint_product(y, consts)
    if prod is not None:                              # one subset
        x, A, nodes = prod
        return GraphProduct(x, W[None], A[None], _column(b, A.shape[-1]), "joints", node, (node, *nodes))
    if y.op != "call_function" or y.target not in RESHAPES + (aten.flatten.using_ints,):
        return None
    parsed = _einsum(y.args[0], consts)
    if parsed is None:
        return None
    x, A, (lx, lo) = parsed
    K, C = A.shape[0], x.meta["val"].shape[1]
    if len(lo) != len(lx) + 1 or not _splits_channels(y, y.args[0], K):
        return None
    W = W.unflatten(1, (K, C)).movedim(1, 0)          # (C', K*C) -> (K, C', C)
    return GraphProduct(x, W, A, _column(b, A.shape[-1]), "joints", node, (node, y, y.args[0]))


def _column(b, w: int):
    """A conv's bias (C',) as the (C', W) bias of a product."""
    return None if b is None else b[:, None].expand(-1, w).clone()


def _einsum(node, consts):
    """(x, A as (K, V, W), (x's letters, output letters)) for an einsum of a value with a
    constant over x's last axis, in the form the module docstring names, else None."""
    if node.op != "call_function" or node.target is not aten.einsum.default or len(node.args[1]) != 2:
        return None
    x, a = node.args[1]
    A = const(a, consts)
    eq = node.args[0].replace(" ", "")
    if A is None or const(x, consts) is not None or "->" not in eq or "..." in eq:
        return None
    (lx, la), lo = eq.split("->")[0].split(","), eq.split("->")[1]
    if len(la) == 2:                                  # one subset: 'vw'
        A, la = A[None], "#" + la
    if len(la) != 3 or len(set(lx)) != len(lx) or len(set(la)) != 3 or lx[-1] not in la:
        return None
    v, w = lx[-1], next((c for c in la if c in lo and c not in lx), None)
    k = next((c for c in la if c not in (v, w)), None)
    if w is None or k is None or len(set(lx + la)) != len(lx) + 2 - (k in lx):
        return None
    A = A.permute(la.index(k), la.index(v), la.index(w))             # as (K, V, W)
    if k in lx:                                       # conv first: x 'nkc..v' -> 'nc..w'
        ok = lx[1] == k and lo == lx[0] + lx[2:-1] + w
    else:                                             # joints first: 'nc..v' -> 'nkc..w' (or no k)
        ok = lo == lx[0] + (k if k != "#" else "") + lx[1:-1] + w
    return (x, A, (lx, lo)) if ok else None


def _splits_channels(whole, split, K: int) -> bool:
    """split is `whole` with axis 1 cut into (K, rest) (or, reversed, merged from it)."""
    a, b = whole.meta["val"].shape, split.meta["val"].shape
    if len(a) > len(b):
        a, b = b, a
    return (len(b) == len(a) + 1 and str(a[0]) == str(b[0]) and b[1] == K
            and a[1] == K * b[2] and [str(s) for s in a[2:]] == [str(s) for s in b[3:]])


def _conv(node, consts):
    """(input, weight as (C', C), bias or None) of a 1x1 conv with constant weights, else None."""
    if node.op != "call_function" or node.target not in CONVS:
        return None
    c = bind(node.target, node.args, node.kwargs)
    W, b = const(c["weight"], consts), const(c["bias"], consts) if c["bias"] is not None else None
    if W is None or (c["bias"] is not None and b is None) or c["groups"] != 1:
        return None
    if any(s != 1 for s in list(c["stride"]) + list(c["dilation"]) + list(W.shape[2:])) \
            or any(p != 0 for p in c["padding"]) or isinstance(c["padding"], str):
        return None
    return c["input"], W.flatten(1), b


def _joint_product(y, consts):
    """(x, A (V, W), nodes) where y = x @ A over x's last axis: `matmul(x, A)`,
    `matmul(x.view(N, -1, V), A).view(N, ..., W)` or `einsum('nc..v,vw->nc..w', x, A)`."""
    parsed = _einsum(y, consts)
    if parsed is not None and parsed[1].shape[0] == 1 and len(parsed[2][0]) == len(parsed[2][1]):
        return parsed[0], parsed[1][0], (y,)
    nodes, mm = (), y
    if y.op == "call_function" and y.target in RESHAPES:
        nodes, mm = (y,), y.args[0]
    if mm.op != "call_function" or mm.target is not aten.matmul.default:
        return None
    x, A = mm.args[0], const(mm.args[1], consts)
    if A is None or A.dim() != 2:
        return None
    if nodes:
        if x.op != "call_function" or x.target not in RESHAPES:
            return None
        nodes, x = nodes + (mm, x), x.args[0]
        if not _merges_middle(x, mm.args[0]) or not _same_but_last(x, y, A.shape[1]):
            return None
    elif x.meta["val"].dim() < 3:
        return None
    return x, A, nodes + ((mm,) if not nodes else ())


def _merges_middle(x, view) -> bool:
    """view is x (N, C, ..., V) with the axes between batch and joints merged into one."""
    a, b = x.meta["val"].shape, view.meta["val"].shape
    mid = 1
    for s in a[1:-1]:
        mid *= s
    return len(b) == 3 and str(a[0]) == str(b[0]) and b[1] == mid and a[-1] == b[-1] and len(a) >= 3


def _same_but_last(x, y, w: int) -> bool:
    a, b = x.meta["val"].shape, y.meta["val"].shape
    return len(a) == len(b) and [str(s) for s in a[:-1]] == [str(s) for s in b[:-1]] and b[-1] == w


def _bias(node, consts, add):
    """A constant added after a product, as (C', W), if it is one per channel and joint."""
    b = const(node, consts)
    out = add.meta["val"]
    if b is None or b.dim() > out.dim() or b.dim() < 2:
        return None
    shape = (1,) * (out.dim() - b.dim()) + tuple(b.shape)
    if any(s != 1 for s in shape[:1] + shape[2:-1]) or shape[1] not in (1, out.shape[1]) \
            or shape[-1] not in (1, out.shape[-1]):
        return None
    return b.reshape(shape[1], shape[-1]).expand(int(out.shape[1]), int(out.shape[-1])).clone()


# -- writing ---------------------------------------------------------------------------------------
def write(gm: fx.GraphModule, consts: dict, gp: GraphProduct, order: str) -> fx.Node:
    """Insert the product in `order` before gp.root, make it stand for gp.root, and return
    its output node (the replaced ops are left for dead-code elimination)."""
    out = emit(gm, consts, gp, order)
    gp.root.replace_all_uses_with(out)
    return out


def emit(gm, consts, gp: GraphProduct, order: str) -> fx.Node:
    """The product in `order`, inserted before gp.root (which keeps its readers)."""
    x, rank = gp.x, gp.x.meta["val"].dim()
    (K, co, c), (_, v, w) = gp.weight.shape, gp.adjacency.shape
    conv, ones = {r: t for t, r in CONVS.items()}[rank], (1,) * (rank - 2)
    lx = "nc" + MID[:rank - 3] + "v"
    per_joint = gp.bias is not None and bool((gp.bias != gp.bias[:, :1]).any())
    with gm.graph.inserting_before(gp.root):
        if order == "conv":
            A = new_const(gm, consts, "adjacency", gp.adjacency, gp.root)
            W = new_const(gm, consts, "weight", gp.weight.flatten(0, 1).view(K * co, c, *ones), gp.root)
            y = call(gm, aten.unflatten.int, (call(gm, conv, (x, W), gp.root), 1, [K, co]), gp.root)
            out = call(gm, aten.einsum.default, (f"nk{lx[1:]},kvw->{lx[:-1]}w", [y, A]), gp.root)
        else:
            # A as (V, W, K): the product's rows come out (w, k), so that (k, c) is one run of
            # channels in a channels-last step and the flatten below is a view, not a copy
            A = new_const(gm, consts, "adjacency", gp.adjacency.permute(1, 2, 0).contiguous(), gp.root)
            wj = gp.weight.permute(1, 0, 2).reshape(co, K * c, *ones)
            y = call(gm, aten.einsum.default, (f"{lx},vwk->nk{lx[1:-1]}w", [x, A]), gp.root)
            W = new_const(gm, consts, "weight", wj, gp.root)
            b = new_const(gm, consts, "bias", gp.bias[:, 0].contiguous(), gp.root) \
                if gp.bias is not None and not per_joint else None
            out = call(gm, conv, (call(gm, aten.flatten.using_ints, (y, 1, 2), gp.root), W, b), gp.root)
        if gp.bias is not None and (order == "conv" or per_joint):
            shape = (co,) + (1,) * (rank - 3) + ((w,) if per_joint else (1,))
            b = new_const(gm, consts, "bias", gp.bias[:, :shape[-1]].reshape(shape).contiguous(), gp.root)
            out = call(gm, aten.add.Tensor, (out, b), gp.root)
    return out


def new_const(gm, consts: dict, name: str, value: torch.Tensor, like: fx.Node) -> fx.Node:
    """A constant placeholder (before the graph's first op) holding `value`, its fake value in
    `like`'s fake mode."""
    first = next(n for n in gm.graph.nodes if n.op != "placeholder")
    taken = {n.target for n in gm.graph.nodes if n.op == "placeholder"} | set(consts)
    name = next(f"cocompile_{name}_{i}" for i in range(len(taken) + 1) if f"cocompile_{name}_{i}" not in taken)
    with gm.graph.inserting_before(first):
        node = gm.graph.placeholder(name)
    consts[node.name] = value = value.detach()
    node.meta["val"] = like.meta["val"].fake_mode.from_tensor(value)
    return node


def call(gm, target, args, like: fx.Node) -> fx.Node:
    """A call of `target` whose value is computed on the fake values of its arguments; its
    module path and source line are `like`'s."""
    node = gm.graph.call_function(target, args)
    vals = fx.node.map_arg(args, lambda a: a.meta["val"])
    with like.meta["val"].fake_mode:
        val = target(*vals)
    return inherit(node, like, val=val)


def finish_rewrite(gm, consts: dict) -> None:
    """After a rewrite: dead nodes and the constants nothing reads go; the graph is checked and
    the module's code regenerated."""
    gm.graph.eliminate_dead_code()
    drop_unused_consts(gm, consts)
    gm.graph.lint()
    gm.recompile()


def drop_unused_consts(gm, consts: dict) -> None:
    """Constant placeholders that nothing reads any more go, with their tensors."""
    for n in list(gm.graph.nodes):
        if n.op == "placeholder" and n.name in consts and not n.users:
            consts.pop(n.name)
            gm.graph.erase_node(n)

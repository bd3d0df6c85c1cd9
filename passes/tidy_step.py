"""Rewrite of a traced step graph (ATen ops): ops whose result is already at hand are not run.

A traced step runs each of its ops at every step, and each costs a dispatch whatever it computes.
Tracing leaves ops that compute nothing new:

- ops on the step's constants alone (a weight permuted and reshaped for a matrix product), ops
  that make a constant from nothing but sizes (`arange` for an attention band, `new_zeros` of a
  value's shape), and what is computed from those only (the band's mask);
- views that return their input's shape unchanged (a narrow over a whole axis, a reshape to the
  same shape, an identity permute or movedim), and arithmetic that returns its input (`x + 0`,
  `x - 0`, `x * 1`, `x / 1`, an integer `x // 1`: a residual branch that is `lambda x: 0`, the
  frame counter's arithmetic at rate 1);
- the same op on the same inputs twice (each attention layer rebuilding the same mask from the
  frame counter);
- chains of views that leave a contiguous value's elements in order (reshape, transpose of a
  size-1 axis, reshape again: attention's heads at one token), which are one view;
- a unary elementwise op between a permute and its inverse (a channels-last product's output
  put back), which runs on the unpermuted value instead;
- several matrix products of one input with constant weights (an attention layer's query, key
  and value projections of the new frame), which are one product with the weights stacked,
  each reading its slice of the result.

Invariant left behind: no op reads only constants or sizes; no view op keeps its input's shape
from offset 0; no identity arithmetic whose input and result are safe to alias; no two pure ops
with the same target and inputs; no chain of two or more views that one `view` of its base can
replace; no `permute(f(permute(x, p)), p^-1)` for a unary elementwise f; no two `linear`s of
one input with constant weights of the same dtype and bias or not alike. Values, and which
values alias which, are unchanged: a replaced view has the same shape, strides and offset; an
op is replaced by an equal value only where no in-place op writes either (`x + 0` also where
nothing else reads x's memory).
"""
from __future__ import annotations

import operator

import torch
from torch import fx

aten = torch.ops.aten

# views that return their input as is when the result has the input's shape (from offset 0)
SAME_SHAPE_VIEWS = {aten.view.default, aten.reshape.default, aten._unsafe_view.default,
                    aten.expand.default, aten.flatten.using_ints, aten.unflatten.int,
                    aten.contiguous.default, aten.alias.default}
RANGE_VIEWS = {aten.narrow.default: 2, aten.slice.Tensor: 2}     # op: position of its start
# views that keep every element (a chain of them may be one view)
WHOLE_VIEWS = {aten.view.default, aten.reshape.default, aten._unsafe_view.default, aten.permute.default,
               aten.transpose.int, aten.unsqueeze.default, aten.squeeze.dim, aten.squeeze.dims,
               aten.squeeze.default, aten.flatten.using_ints, aten.unflatten.int, aten.movedim.int, aten.t.default}
# arithmetic that returns its input: op -> the second operand that makes it an identity
NEUTRAL = {aten.add.Tensor: 0, aten.add.Scalar: 0, aten.sub.Tensor: 0, aten.sub.Scalar: 0,
           aten.mul.Tensor: 1, aten.mul.Scalar: 1, aten.div.Tensor: 1, aten.div.Scalar: 1,
           aten.floor_divide.default: 1, aten.floor_divide.Scalar: 1}
# ops whose tensor input gives only its size, dtype and device; ops that leave memory unset
SIZES_ONLY = {aten.new_zeros.default, aten.new_ones.default, aten.new_full.default,
              aten.zeros_like.default, aten.ones_like.default, aten.full_like.default}
UNSET = {aten.empty.memory_format, aten.empty_like.default, aten.new_empty.default,
         aten.empty_strided.default, aten.new_empty_strided.default}


def tidy_step(gm: fx.GraphModule) -> int:
    """Fold constants, drop ops that return their input, merge repeated ops, collapse view chains
    and unpermuted elementwise ops, until nothing changes; returns how many ops went (running it
    again removes none)."""
    before = _ops(gm)
    while _fold_constants(gm) + _drop_identities(gm) + _merge_repeats(gm) + _collapse_views(gm) \
            + _unpermute_elementwise(gm) + _drop_dead_writes(gm) + _merge_sibling_products(gm):
        gm.graph.eliminate_dead_code()
    gm.graph.eliminate_dead_code()
    _drop_unread_constants(gm)
    gm.graph.lint()
    gm.recompile()
    return before - _ops(gm)


def _ops(gm) -> int:
    return sum(n.op == "call_function" for n in gm.graph.nodes)


def _pure(n: fx.Node) -> bool:
    """An ATen op that writes nothing, draws nothing, and leaves no memory unset."""
    return (n.op == "call_function" and isinstance(n.target, torch._ops.OpOverload)
            and not n.target._schema.is_mutable and torch.Tag.nondeterministic_seeded not in n.target.tags
            and n.target not in UNSET)


# -- constants ---------------------------------------------------------------------------------------
def _fold_constants(gm: fx.GraphModule) -> int:
    """Each pure op that reads only constants (get_attr) or sizes becomes a constant itself."""
    values, folded, written = {}, 0, _written(gm)
    for n in list(gm.graph.nodes):
        if n.op == "get_attr":
            values[n] = _constant(gm, n)
            continue
        if not _pure(n) or not n.users or _root(n) in written:    # (a buffer must not be written)
            continue
        stand_in = _sizes_of(n) if n.target in SIZES_ONLY else {}
        if any(a not in values and a not in stand_in for a in n.all_input_nodes):
            continue
        args, kwargs = fx.node.map_arg((n.args, n.kwargs), lambda a: values.get(a, stand_in.get(a)))
        value = n.target(*args, **kwargs)
        if not isinstance(value, torch.Tensor):
            continue
        name = f"_folded_{n.name}"
        gm.register_buffer(name, value.contiguous() if value.is_contiguous() else value.clone())
        with gm.graph.inserting_before(n):
            const = gm.graph.get_attr(name)
        const.meta = dict(n.meta)
        n.replace_all_uses_with(const)
        values[const] = getattr(gm, name)
        folded += 1
    return folded


def _drop_dead_writes(gm: fx.GraphModule) -> int:
    """An in-place op whose result nobody reads, on a fresh value that nothing else reads (a mask
    converted to float for an attention that now takes the boolean one), goes with that value."""
    dropped = 0
    for n in list(gm.graph.nodes):
        a = n.args[0] if n.op == "call_function" and n.args and not n.users else None
        if (isinstance(a, fx.Node) and isinstance(n.target, torch._ops.OpOverload) and n.target._schema.is_mutable
                and n.target._schema.arguments[0].alias_info is not None
                and n.target._schema.arguments[0].alias_info.is_write
                and list(a.users) == [n] and _pure(a) and not _is_view(a)):
            gm.graph.erase_node(n)
            dropped += 1
    return dropped


def _sizes_of(n: fx.Node) -> dict:
    """For an op that reads only its input's sizes: an empty tensor of that input's traced
    shape, dtype and device (what it reads), or {} where the shape is not known."""
    x = n.args[0]
    val = x.meta.get("val") if isinstance(x, fx.Node) else None
    if not isinstance(val, torch.Tensor) or not all(isinstance(s, int) for s in val.shape):
        return {}
    return {x: torch.empty(tuple(val.shape), dtype=val.dtype, device=val.device)}


# -- identities ----------------------------------------------------------------------------------------
def _drop_identities(gm: fx.GraphModule) -> int:
    dropped = 0
    for n in list(gm.graph.nodes):
        x = n.args[0] if n.op == "call_function" and n.args else None
        if isinstance(x, fx.Node) and n.users and _returns_input(n, x, gm):
            n.replace_all_uses_with(x)
            dropped += 1
    return dropped


def _returns_input(n: fx.Node, x: fx.Node, gm: fx.GraphModule) -> bool:
    out, inp = n.meta.get("val"), x.meta.get("val")
    if not isinstance(out, torch.Tensor) or not isinstance(inp, torch.Tensor):
        return False
    same = out.shape == inp.shape and out.dtype == inp.dtype and out.stride() == inp.stride()
    if n.target in SAME_SHAPE_VIEWS:
        return same
    if n.target in RANGE_VIEWS:
        i = RANGE_VIEWS[n.target]
        return same and (n.args[i] if len(n.args) > i else 0) in (0, None)
    if n.target is aten.permute.default:
        return list(n.args[1]) == list(range(len(n.args[1])))
    if n.target is aten.movedim.int:
        return n.args[1] % out.dim() == n.args[2] % out.dim()
    if n.target in NEUTRAL and len(n.args) == 2 and not n.kwargs and _neutral(n, out):
        # x op neutral is a new tensor: x may stand for it where neither is written in place,
        # or where nothing else reads x's memory (and it is no output: an output would alias x)
        return same and not any(u.op == "output" for u in n.users) \
            and (_read_once(x) or not ({_root(n), _root(x)} & _written(gm)))
    return False


def _neutral(n: fx.Node, out: torch.Tensor) -> bool:
    """The second operand is the op's neutral number (and // 1 is an identity on integers)."""
    b = n.args[1]
    if isinstance(b, bool) or not isinstance(b, (int, float)) or b != NEUTRAL[n.target]:
        return False
    return "floor_divide" not in str(n.target) or not out.is_floating_point()


def _read_once(x: fx.Node) -> bool:
    """x owns memory that nothing but its one reader sees: x, and every value it is a view of,
    has one user, up to an op that returns a fresh tensor."""
    while True:
        if x.op != "call_function" or len(x.users) != 1 or not isinstance(x.target, torch._ops.OpOverload):
            return False
        if not _is_view(x):
            return True
        x = x.args[0]
        if not isinstance(x, fx.Node):
            return False


def _is_view(n: fx.Node) -> bool:
    """The op returns a view of its first argument."""
    returns = n.target._schema.returns if isinstance(n.target, torch._ops.OpOverload) else ()
    return bool(returns) and returns[0].alias_info is not None and isinstance(n.args[0], fx.Node)


def _root(n: fx.Node) -> fx.Node:
    """The value whose memory `n` is a view of (n itself if it is not a view)."""
    while n.op == "call_function" and _is_view(n):
        n = n.args[0]
    return n


def _written(gm: fx.GraphModule) -> set:
    """Roots (see _root) of the memory that some op writes in place."""
    out = set()
    for n in gm.graph.nodes:
        if n.op != "call_function" or not isinstance(n.target, torch._ops.OpOverload):
            continue
        for arg, a in zip(n.target._schema.arguments, n.args):
            if arg.alias_info is not None and arg.alias_info.is_write and isinstance(a, fx.Node):
                out.add(_root(a))
    return out


# -- repeats -------------------------------------------------------------------------------------------
def _merge_repeats(gm: fx.GraphModule) -> int:
    """A pure op with the target and inputs of an earlier one reads that one's value instead
    (where no in-place op writes the memory of either); constants this pass folded that are
    equal are one."""
    seen, merged, written = {}, _merge_equal_constants(gm), _written(gm)
    for n in list(gm.graph.nodes):
        if not _pure(n) or not n.users or _root(n) in written:
            continue
        # a constant by its attribute (tracing reads one attribute through several nodes)
        key = repr((n.target, fx.node.map_arg((n.args, n.kwargs), lambda a: (
            ("@", a.target) if a.op == "get_attr" else ("%", a.name)))))
        if key in seen:
            n.replace_all_uses_with(seen[key])
            merged += 1
        else:
            seen[key] = n
    return merged


def _merge_equal_constants(gm: fx.GraphModule) -> int:
    """Folded constants (made by _fold_constants) with equal values: readers of the later read
    the first."""
    kept, merged = {}, 0
    for n in list(gm.graph.nodes):
        if n.op != "get_attr" or not n.target.startswith("_folded_") or not n.users:
            continue
        t = getattr(gm, n.target)
        same = kept.setdefault((t.shape, t.dtype, t.stride(), t.device), [])
        first = next((m for m in same if torch.equal(getattr(gm, m.target), t)), None)
        if first is None:
            same.append(n)
        else:
            n.replace_all_uses_with(first)
            merged += 1
    return merged


# -- views ---------------------------------------------------------------------------------------------
def _collapse_views(gm: fx.GraphModule) -> int:
    """A chain of two or more whole-element views from a contiguous base to a contiguous result
    that aliases it at the same offset is `view(base, shape)`."""
    collapsed = 0
    for n in list(gm.graph.nodes):
        if n.target not in WHOLE_VIEWS or not n.users or getattr(n.args[0], "target", None) not in WHOLE_VIEWS:
            continue
        chain, base = [n], n.args[0]
        while base.op == "call_function" and base.target in WHOLE_VIEWS:
            chain.append(base)
            base = base.args[0]
        if not _same_elements(base, chain[::-1], n):
            continue
        with gm.graph.inserting_before(n):
            view = gm.graph.call_function(aten.view.default, (base, list(n.meta["val"].shape)))
        view.meta = dict(n.meta)
        n.replace_all_uses_with(view)
        collapsed += 1
    return collapsed


def _same_elements(base: fx.Node, chain: list, last: fx.Node) -> bool:
    """The chain of views, replayed on a meta tensor laid out like `base`, ends contiguous,
    aliasing it, from its offset (so it is base's memory read in order)."""
    b, out = base.meta.get("val"), last.meta.get("val")
    if not isinstance(b, torch.Tensor) or not isinstance(out, torch.Tensor) or not b.is_contiguous() \
            or not out.is_contiguous() or not all(isinstance(s, int) for s in (*b.shape, *out.shape)):
        return False
    probe = torch.empty_strided(tuple(b.shape), tuple(b.stride()), dtype=b.dtype, device="meta")
    t = probe
    for node in chain:
        args, kwargs = fx.node.map_arg((node.args, node.kwargs), lambda a: t)
        t = node.target(*args, **kwargs)
    return torch._C._is_alias_of(t, probe) and t.is_contiguous() and t.storage_offset() == probe.storage_offset()


def _unpermute_elementwise(gm: fx.GraphModule) -> int:
    """permute(f(permute(x, p)), q) with q undoing p and f unary elementwise is f(x)."""
    done = 0
    for n in list(gm.graph.nodes):
        f = n.args[0] if n.target is aten.permute.default and n.users else None
        if not isinstance(f, fx.Node) or not _unary_elementwise(f) or len(f.users) != 1:
            continue
        p = f.args[0]
        if not isinstance(p, fx.Node) or p.target is not aten.permute.default or len(p.users) != 1:
            continue
        perm, back = [d % len(p.args[1]) for d in p.args[1]], [d % len(n.args[1]) for d in n.args[1]]
        if [perm[i] for i in back] != list(range(len(perm))):
            continue
        x = p.args[0].meta.get("val")
        mode = getattr(x, "fake_mode", None)
        if mode is None:
            continue
        with gm.graph.inserting_before(n):
            g = gm.graph.call_function(f.target, (p.args[0], *f.args[1:]), dict(f.kwargs))
        with mode:                          # its value: f on x's layout, not the permuted one
            g.meta = {**n.meta, "val": f.target(x, *f.args[1:], **f.kwargs)}
        n.replace_all_uses_with(g)
        done += 1
    return done


def _unary_elementwise(f: fx.Node) -> bool:
    """An out-of-place elementwise op of one tensor (other arguments are numbers)."""
    return (_pure(f) and torch.Tag.pointwise in f.target.tags and isinstance(f.args[0], fx.Node)
            and len(f.all_input_nodes) == 1 and not _is_view(f))


# -- sibling products --------------------------------------------------------------------------------
def _merge_sibling_products(gm: fx.GraphModule) -> int:
    """`linear(x, W_i, b_i)` for several constant W_i of one input x (and bias on all or none):
    one `linear(x, [W_1; W_2; ...], [b_1; b_2; ...])`, each reading its columns of the result
    (a narrow view). A step of one frame pays a dispatch per product whatever its size, and the
    input is read once instead of once per product. Returns how many products went."""
    groups: dict = {}
    for n in gm.graph.nodes:
        if n.target is not aten.linear.default or not n.users or n.kwargs or not isinstance(n.args[0], fx.Node):
            continue
        w, b = _constant(gm, n.args[1]), (n.args[2] if len(n.args) > 2 else None)
        if w is not None and w.dim() == 2 and (b is None or _constant(gm, b) is not None):
            groups.setdefault((n.args[0], w.shape[1], w.dtype, b is None), []).append(n)
    merged = 0
    for (x, _, _, no_bias), nodes in groups.items():
        mode = getattr(x.meta.get("val"), "fake_mode", None)     # for the new nodes' values
        if len(nodes) < 2 or mode is None:
            continue
        weights = [_constant(gm, n.args[1]) for n in nodes]
        stacked = {"w": torch.cat(weights)}
        if not no_bias:
            stacked["b"] = torch.cat([_constant(gm, n.args[2]) for n in nodes])
        first = nodes[0]                      # x is defined before every product: merge at the first
        with gm.graph.inserting_before(first):
            consts = []
            for part, value in stacked.items():
                name = f"_merged_{part}_{first.name}"
                gm.register_buffer(name, value.contiguous())
                consts.append(gm.graph.get_attr(name))
            product = gm.graph.call_function(aten.linear.default, (x, *consts))
            with mode:
                product.meta = {**first.meta, "val": aten.linear.default(
                    x.meta["val"], *[mode.from_tensor(v) for v in stacked.values()])}
            start = 0
            for n, w in zip(nodes, weights):
                part = gm.graph.call_function(aten.narrow.default, (product, -1, start, w.shape[0]))
                with mode:
                    part.meta = {**n.meta, "val": aten.narrow.default(product.meta["val"], -1, start, w.shape[0])}
                _reshape_views_of(n)
                n.replace_all_uses_with(part)
                start += w.shape[0]
        merged += len(nodes) - 1
    return merged


def _constant(gm: fx.GraphModule, n) -> torch.Tensor | None:
    """The tensor a get_attr node reads, or None."""
    return operator.attrgetter(n.target)(gm) if isinstance(n, fx.Node) and n.op == "get_attr" else None


def _reshape_views_of(n: fx.Node) -> None:
    """`view`s of `n` become `reshape`s: n's value is about to be a slice of a wider result,
    which a view cannot always split (reshape is a view wherever a view can be)."""
    for u in n.users:
        if u.target in (aten.view.default, aten._unsafe_view.default):
            u.target = aten.reshape.default


def _drop_unread_constants(gm: fx.GraphModule) -> None:
    """Attributes of constants this pass made or replaced that no get_attr reads any more (a
    merged product's weights), so that artifacts do not carry them twice."""
    read = {n.target for n in gm.graph.nodes if n.op == "get_attr"}
    made = ("_merged_", "_folded_", "_tensor_constant", "_param_constant")
    for name in [*gm._buffers, *gm._parameters, *vars(gm)]:
        if name.startswith(made) and name not in read and hasattr(gm, name):
            delattr(gm, name)

"""Rewrite: a loop of recurrent cells over the frames of a value becomes one recurrent layer.

`for t in range(T): h = cell(x[:, t], h)` (nn.GRUCell, nn.LSTMCell, nn.RNNCell) reaches the graph
unrolled: T cell nodes, cell t reading frame t (`select(x, 1, t)`, or item t of `unbind(x, 1)`)
and the hidden state of cell t-1. As one aten.gru/lstm/rnn_* layer (1 layer, batch_first) it gets
the recurrent layers' step form (cocompile/ops/recurrent.py): the hidden state is the state, and a
step runs the cell on its new frames only, where the unrolled cells would each keep a frame.

Recognised: cells of one op with the same weights, reading frames 0..T-1 of one value along one
axis in order (every frame of it), from a start state that does not depend on the frames. The
stack of the hidden states (in order) becomes the layer's output y moved to the stack's axis,
the last hidden (cell) state its h_n (c_n), any other read of h_t `select(y, 1, t)`.

Invariant left behind: no chain of two or more cells reading frames of a value remains; a chain
that is not recognised is refused (CompileError at its first cell, with the reason and how to
write the loop). Values are unchanged up to float rounding.
"""
from __future__ import annotations

import operator
from dataclasses import dataclass

import torch
from torch import fx

from cocompile.errors import error_at
from cocompile.ops.recurrent import CELL_HINT
from cocompile.ops.schema import bind
from cocompile.passes.graph_edit import inherit

aten = torch.ops.aten
LAYERS = {aten.gru_cell.default: aten.gru.input, aten.lstm_cell.default: aten.lstm.input,
          aten.rnn_tanh_cell.default: aten.rnn_tanh.input, aten.rnn_relu_cell.default: aten.rnn_relu.input}
_SIZES = (aten.sym_size.int, aten.sym_size.default)   # reading a size reads no frame


@dataclass
class Loop:
    """A recognised chain: `cells` in order over frames of `source` along `axis`; `hs` / `cs` the
    nodes of each step's hidden (cell) state (None where nothing reads them)."""

    cells: list[fx.Node]
    source: fx.Node
    axis: int
    hs: list
    cs: list

    @property
    def lstm(self) -> bool:
        return self.cells[0].target is aten.lstm_cell.default


def fuse_cell_loops(gm: fx.GraphModule, input_names) -> int:
    """Fuse every loop of cells over frames; returns how many were fused.

    >>> fuse_cell_loops(cap.gm, cap.input_names)      # a GRUCell loop over x[:, t]
    1
    """
    input_names = {input_names} if isinstance(input_names, str) else set(input_names)
    fused = 0
    for first in [n for n in gm.graph.nodes if n.target in LAYERS and _previous(n) is None]:
        chain = _chain(first)
        frames = [_frame(c.args[0]) for c in chain]
        if any(f is None for f in frames):
            continue                             # not a loop over frames: the analysis decides
        loop = _recognise(chain, frames, input_names)
        if isinstance(loop, str):
            if len(chain) > 1:
                raise error_at(first, f"a loop of {first.target} over frames was not recognised as "
                                      f"a recurrence: {loop}", CELL_HINT)
            continue                             # one cell on one frame: a clip value as it is
        _fuse(gm, loop)
        fused += 1
    if fused:
        gm.graph.eliminate_dead_code()
        gm.graph.lint()
        gm.recompile()
    return fused


# -- recognising a loop ----------------------------------------------------------------------------
def _state_of(cell: fx.Node) -> tuple:
    """(h, c) nodes a cell's hidden-state argument names (c None for GRU and RNN cells)."""
    hx = cell.args[1]
    return (hx[0], hx[1]) if isinstance(hx, (list, tuple)) else (hx, None)


def _outputs(cell: fx.Node) -> tuple:
    """(h, c) nodes holding the cell's new state; for an LSTM cell its getitems (None if unread)."""
    if cell.target is not aten.lstm_cell.default:
        return cell, None
    items = {u.args[1]: u for u in cell.users if u.target is operator.getitem}
    return items.get(0), items.get(1)


def _previous(cell: fx.Node) -> fx.Node | None:
    """The cell of the same op whose new state this cell starts from, if any."""
    h, _ = _state_of(cell)
    if not isinstance(h, fx.Node):
        return None
    src = h.args[0] if cell.target is aten.lstm_cell.default and h.target is operator.getitem else h
    return src if isinstance(src, fx.Node) and src.target is cell.target else None


def _chain(first: fx.Node) -> list[fx.Node]:
    """`first` and the cells that continue from it, one after the other (stops at a fork)."""
    chain = [first]
    while True:
        h, c = _outputs(chain[-1])
        nxt = [u for u in (h.users if h is not None else ()) if u.target is first.target
               and _state_of(u) == (h, c)]
        if len(nxt) != 1:
            return chain
        chain.append(nxt[0])


def _frame(x: fx.Node):
    """(value, axis, t) when `x` is frame t of `value` along `axis` (select, or item t of unbind),
    whole-axis slices before it skipped; else None."""
    if x.target is aten.select.int:
        value, axis, t = x.args
    elif x.target is operator.getitem and x.args[0].target is aten.unbind.int:
        value, axis, t = x.args[0].args[0], (list(x.args[0].args[1:]) or [0])[0], x.args[1]
    else:
        return None
    ndim = value.meta["val"].dim()
    while value.target is aten.slice.Tensor and _whole(value):
        value = value.args[0]
    size = value.meta["val"].shape[axis % ndim]
    return (value, axis % ndim, t % size) if isinstance(size, int) else None


def _whole(s: fx.Node) -> bool:
    """Whether a slice keeps its whole axis (x[:, t] exports as select(slice(x, 0, 0, max), 1, t))."""
    a = bind(s.target, s.args, s.kwargs)
    size = s.args[0].meta["val"].shape[a["dim"]]
    end = a["end"]
    return a["start"] in (0, None) and a["step"] == 1 and (
        end is None or end == size or (isinstance(end, int) and end >= 2 ** 62))


def _recognise(chain, frames, input_names):
    """The Loop of a chain of cells over frames, or the reason it is not one."""
    first, n = chain[0], len(chain)
    value, axis = frames[0][:2]
    if any(f[:2] != (value, axis) for f in frames):
        return "its cells read frames of different values or axes"
    if [f[2] for f in frames] != list(range(n)) or value.meta["val"].shape[axis] != n:
        return (f"its cells read frames {[f[2] for f in frames]} of the {value.meta['val'].shape[axis]} "
                "along the axis, not every frame from the first in order")
    if value.meta["val"].dim() != 3:
        return "its cells read frames of a value with other than 3 axes (batch, time, features)"
    if any(c.args[2:] != first.args[2:] for c in chain):
        return "its cells do not share one set of weights"
    if any(_reads_frames(s, input_names, {}) for s in _state_of(first) if s is not None):
        return "its start state is computed from the frames"
    hs, cs = map(list, zip(*(_outputs(c) for c in chain)))
    if any(c is not None and set(c.users) - set(chain) for c in cs[:-1]):
        return "the cell state of a frame before the last is read outside the loop"
    return Loop(chain, value, axis, hs, cs)


def _reads_frames(node, input_names, memo: dict) -> bool:
    """Whether `node`'s value depends on the input's frames (reading only its sizes does not)."""
    if not isinstance(node, fx.Node):
        return False
    if node not in memo:
        memo[node] = (node.op == "placeholder" and node.name in input_names) or (
            node.target not in _SIZES and any(_reads_frames(a, input_names, memo) for a in node.all_input_nodes))
    return memo[node]


# -- rewriting ---------------------------------------------------------------------------------------
def _fuse(gm: fx.GraphModule, loop: Loop) -> None:
    """Insert the recurrent layer before the first cell and move every reader of the cells to it."""
    first, g = loop.cells[0], gm.graph
    weights = [w for w in first.args[2:] if w is not None]
    with g.inserting_before(first):
        x = loop.source
        if loop.axis != 1:                       # batch_first: (batch, time, features)
            rest = [a for a in range(3) if a != loop.axis]
            x = _add(g, first, aten.permute.default, (x, [rest[0], loop.axis, rest[1]]))
        start = [_add(g, first, aten.unsqueeze.default, (s, 0)) for s in _state_of(first) if s is not None]
        hx = start if loop.lstm else start[0]
        layer = _add(g, first, LAYERS[first.target],
                     (x, hx, weights, len(weights) > 2, 1, 0.0, False, False, True), _layer_val(loop))
        y, *finals = [_add(g, first, operator.getitem, (layer, i)) for i in range(3 if loop.lstm else 2)]
        last = [_add(g, first, aten.select.int, (v, 0, 0)) for v in finals]     # h_n[0], c_n[0]
    _move_readers(g, first, loop, y, last)


def _move_readers(g: fx.Graph, first: fx.Node, loop: Loop, y: fx.Node, last: list) -> None:
    """The full stack becomes y (moved to its axis), the last state h_n / c_n, other reads of h_t
    select(y, 1, t)."""
    n = len(loop.cells)
    for stack in {u for h in loop.hs if h is not None for u in h.users if u.target is aten.stack.default}:
        if list(stack.args[0]) == loop.hs:
            dim = (stack.args[1] if len(stack.args) > 1 else 0) % 3
            with g.inserting_before(stack):
                order = [a for a in range(3) if a != 1]
                order.insert(dim, 1)
                moved = y if dim == 1 else _add(g, first, aten.permute.default, (y, order))
            stack.replace_all_uses_with(moved)
            g.erase_node(stack)
    for t, h in enumerate(loop.hs):
        if h is None or not [u for u in h.users if u not in loop.cells]:
            continue
        if t == n - 1:
            new = last[0]
        else:
            with g.inserting_after(y):
                new = _add(g, first, aten.select.int, (y, 1, t))
        h.replace_all_uses_with(new, delete_user_cb=lambda u: u not in loop.cells)
    if loop.cs[-1] is not None:
        loop.cs[-1].replace_all_uses_with(last[1])


def _layer_val(loop: Loop) -> tuple:
    """The recurrent layer's value (y, h_n[, c_n]) as fake tensors, from its first cell's."""
    val = loop.cells[0].meta["val"]
    h, c = val if loop.lstm else (val, None)
    n = len(loop.cells)
    y, h_n = h.new_empty((h.shape[0], n, h.shape[1])), h.new_empty((1, *h.shape))
    return (y, h_n, c.new_empty((1, *c.shape))) if loop.lstm else (y, h_n)


def _add(g: fx.Graph, like: fx.Node, target, args, val=None) -> fx.Node:
    """A new node computing target(*args), its value (unless given) computed on the graph's
    fake tensors, its module path and source line those of `like` (the loop's first cell)."""
    node = g.call_function(target, args)
    if val is None:
        val = target(*fx.node.map_arg(args, lambda a: a.meta["val"]))
    return inherit(node, like, val=val)

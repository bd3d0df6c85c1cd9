"""Recurrent layers along time: nn.RNN, nn.GRU and nn.LSTM (aten.rnn_tanh/rnn_relu/gru/lstm.input).

A uni-directional recurrent layer is already continual: its hidden state (and an LSTM's cell
state) is all it keeps of the past. The state holds each layer's h (and c) after the newest frame;
a step runs the chunk's frames through the recurrence, written in plain ATen ops with torch's gate
formulas and order (the input projections of the chunk's frames in one product, then one hidden
product per frame), so every exporter writes it as it is.

  * per-frame output y: every frame, with the lag of the layer's input (the layer adds none);
  * h_n / c_n: one value per step, the state after the newest frame; after the flush (which runs
    the input's missing last frames through the recurrence) they equal the offline h_n / c_n;
  * frames streamed before the input's offline frame 0 (the warm-up of a padded conv before the
    layer) do not enter the recurrence, and the initial hidden value (zeros, a constant or a
    learned parameter) is where the recurrence starts, at offline frame 0.

Every value behind the layer is `recurrent`: exact on the whole stream (E3) and on the clip
after the flush (E1), with an unbounded receptive field, so sliding windows (E2) do not apply.
Bidirectional layers read the whole clip backwards and are refused, as is training mode.
"""
from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch._C import DispatchKey
from torch._subclasses.fake_tensor import FakeTensor

from ..errors import Refusal
from ..timeinfo import CLIP, STATIC, TIME, TimeInfo
from .frames import symbolic_shape
from .registry import OpRule, register_op
from .schema import bind
from .window import frame_positions

aten = torch.ops.aten
GATES = {aten.gru.input: 3, aten.lstm.input: 4, aten.rnn_tanh.input: 1, aten.rnn_relu.input: 1}
CELL_OPS = (aten.gru_cell.default, aten.lstm_cell.default, aten.rnn_tanh_cell.default,
            aten.rnn_relu_cell.default)
ZEROS = (aten.zeros.default, aten.zeros_like.default, aten.new_zeros.default)
VIEWS = (aten.unsqueeze.default, aten.expand.default, aten.view.default, aten.reshape.default,
         aten.contiguous.default, aten.clone.default)
CELL_HINT = ("write the recurrence as nn.GRU / nn.LSTM / nn.RNN over the frames, or as "
             "`for t in range(x.shape[1]): h = cell(x[:, t], h)` over every frame in order, with "
             "one cell and a start state that does not depend on the frames (zeros or a parameter)")


@dataclass(frozen=True)
class Layer:
    """One layer's weights (biases None when the layer has none; w_hr only with proj_size)."""

    w_ih: torch.Tensor
    w_hh: torch.Tensor
    b_ih: torch.Tensor | None = None
    b_hh: torch.Tensor | None = None
    w_hr: torch.Tensor | None = None


def layers(a: dict) -> list[Layer]:
    """The per-layer weights of the bound arguments `a` of a recurrent op (uni-directional)."""
    params, n = list(a["params"]), int(a["num_layers"])
    per, bias = len(params) // n, bool(a["has_biases"])
    out = []
    for lay in range(n):
        p = params[lay * per:(lay + 1) * per]
        w_ih, w_hh, rest = p[0], p[1], p[2:]
        b_ih, b_hh = (rest[0], rest[1]) if bias else (None, None)
        w_hr = rest[-1] if len(rest) > 2 * bias else None          # proj_size: weight_hr last
        out.append(Layer(w_ih, w_hh, b_ih, b_hh, w_hr))
    return out


def _initial(a: dict) -> list:
    """The initial hidden value(s) of the layer: [h0] (GRU, RNN) or [h0, c0] (LSTM)."""
    hx = a["hx"]
    return list(hx) if isinstance(hx, (list, tuple)) else [hx]


# -- the cells, with torch's gate formulas and order (aten/src/ATen/native/RNN.cpp) ----------------
def gru_cell(gi, h, c, w: Layer):
    """gi = W_ih x + b_ih (precomputed); n = tanh(i_n + r * (W_hn h + b_hn)); h' = n + z (h - n)."""
    i_r, i_z, i_n = gi.chunk(3, -1)
    h_r, h_z, h_n = F.linear(h, w.w_hh, w.b_hh).chunk(3, -1)
    r = torch.sigmoid(h_r + i_r)
    z = torch.sigmoid(h_z + i_z)
    n = torch.tanh(i_n + h_n * r)
    return (h - n) * z + n, None


def lstm_cell(gi, h, c, w: Layer):
    """c' = f c + i g, h' = o tanh(c'), then h' = W_hr h' with proj_size."""
    i, f, g, o = (F.linear(h, w.w_hh, w.b_hh) + gi).chunk(4, -1)
    c = torch.sigmoid(f) * c + torch.sigmoid(i) * torch.tanh(g)
    h = torch.sigmoid(o) * torch.tanh(c)
    return (h if w.w_hr is None else F.linear(h, w.w_hr)), c


def rnn_cell(act):
    def cell(gi, h, c, w: Layer):
        return act(F.linear(h, w.w_hh, w.b_hh) + gi), None
    return cell


CELLS = {aten.gru.input: gru_cell, aten.lstm.input: lstm_cell,
         aten.rnn_tanh.input: rnn_cell(torch.tanh), aten.rnn_relu.input: rnn_cell(torch.relu)}


@dataclass
class Masks:
    """Per frame of the chunk: `wait` [rows, n], frames before the input's offline frame 0 (kept
    out of the recurrence); `start` [rows, n], the input's offline frame 0 (the recurrence starts
    from the initial value there). None when no frame of any stream can be one."""

    wait: torch.Tensor | None
    start: torch.Tensor | None

    def at(self, t: int):
        return (None if self.wait is None else self.wait[:, t:t + 1],
                None if self.start is None else self.start[:, t:t + 1])


def run_layer(cell, x, h, c, h0, c0, w: Layer, masks: Masks):
    """One layer over the chunk x (B, n, I) from state h (B, H_out), c: (y (B, n, H_out), h, c)."""
    gi = F.linear(x, w.w_ih, w.b_ih)        # every frame's input projection in one product
    ys = []
    for t in range(x.shape[1]):
        wait, start = masks.at(t)
        hp, cp = h, c
        if start is not None:               # offline frame 0: the recurrence starts from h0 (c0)
            hp = torch.where(start, h0, h)
            cp = None if c is None else torch.where(start, c0, c)
        h_new, c_new = cell(gi[:, t], hp, cp, w)
        if wait is not None:                # warm-up frames leave the state as it is
            h_new = torch.where(wait, h, h_new)
            c_new = None if c is None else torch.where(wait, c, c_new)
        h, c = h_new, c_new
        ys.append(h)
    y = torch.stack(ys, 1) if ys else h.new_zeros((h.shape[0], 0, h.shape[1]))
    return y, h, c


@register_op(*GATES)
class Recurrent(OpRule):
    """nn.RNN / nn.GRU / nn.LSTM over time (see the module docstring)."""

    def _args(self, node) -> dict:
        return bind(node.target, node.args, node.kwargs)

    def time(self, node, an):
        a = self._args(node)
        if a["bidirectional"]:
            raise Refusal("bidirectional recurrent layer: its backward direction reads every future "
                          "frame of the clip, so it cannot run as frames arrive",
                          "use a uni-directional layer (bidirectional=False), or compile only the "
                          "part of the model before it")
        if a["train"]:
            raise Refusal("recurrent layer in training mode (dropout between its layers is random)",
                          "compile the model in eval mode")
        x, axis = an.info(node.args[0]), 1 if a["batch_first"] else 0
        if x.kind != TIME or x.merged or x.dim != axis:
            raise Refusal(f"the layer runs its recurrence over axis {axis} of its input, but time is "
                          + (f"on axis {x.dim}" if x.kind == TIME else f"a {x.kind} value") +
                          (" merged with other axes" if x.merged else ""),
                          "give the layer its frames along the sequence axis: (N, T, F) with "
                          "batch_first=True, or (T, N, F)")
        for h in _initial(a):
            if an.info(h).kind != STATIC:
                raise Refusal("the initial hidden state is computed from the frames, so the first "
                              "frame's state depends on later frames",
                              "start from zeros, a constant or a learned parameter")
        y = x.replace(recurrent=True)
        last = TimeInfo(CLIP, ready=math.ceil((x.warmup + 1) / x.rate), rf=x.rf, padded=x.padded,
                        approx=x.approx, horizon=x.horizon, recurrent=True)
        return (y, last, last) if node.target is aten.lstm.input else (y, last)

    def states(self, node, an):
        a, x = self._args(node), node.args[0]
        batch = symbolic_shape(x)[0 if a["batch_first"] else 1]
        w = layers({**a, "params": [p.meta["val"] for p in a["params"]]})
        n, dtype = len(w), x.meta["val"].dtype
        out = {"h": ((batch, n, int(w[0].w_hh.shape[1])), dtype,
                     f"hidden state h of each of the {n} layer(s) after the newest frame")}
        if node.target is aten.lstm.input:
            out["c"] = ((batch, n, int(w[0].w_hh.shape[0]) // 4), dtype,
                        f"cell state c of each of the {n} layer(s) after the newest frame")
        return out

    def step(self, node, args, kwargs, ctx):
        a = bind(node.target, args, kwargs)
        lstm = node.target is aten.lstm.input
        x = a["input"] if a["batch_first"] else a["input"].transpose(0, 1)
        h0 = _initial(a)
        h, c = ctx.state(node, "h"), ctx.state(node, "c") if lstm else None
        masks = self._masks(node, ctx, x.shape[0], x.shape[1])
        hs, cs = [], []
        for lay, w in enumerate(layers(a)):
            x, h_l, c_l = run_layer(CELLS[node.target], x, h[:, lay], None if c is None else c[:, lay],
                                    h0[0][lay], h0[1][lay] if lstm else None, w, masks)
            hs.append(h_l)
            cs.append(c_l)
        h_new = torch.stack(hs, 1)
        c_new = torch.stack(cs, 1) if lstm else None
        if ctx.mode == "step":
            ctx.set_state(node, "h", h_new)
            if lstm:
                ctx.set_state(node, "c", c_new)
        y = x if a["batch_first"] else x.transpose(0, 1)
        # h_n / c_n are (layers, N, H) whether batch_first or not
        return (y, h_new.transpose(0, 1)) + ((c_new.transpose(0, 1),) if lstm else ())

    def _masks(self, node, ctx, rows, n: int) -> Masks:
        """Which of the chunk's n frames are warm-up, and which is the input's offline frame 0.
        The start mask is left out when every initial value is a zeros op (the zero state)."""
        info = ctx.info(node.args[0])
        zero = all(_zeros(h) for h in _initial(self._args(node)))
        if n == 0 or (info.warmup <= 0 and zero):
            return Masks(None, None)
        pos = frame_positions(ctx, info.rate, n, rows)
        return Masks(pos < info.warmup if info.warmup > 0 else None,
                     None if zero else pos == info.warmup)


def _zeros(node) -> bool:
    """Whether the graph value `node` is all zeros by construction (a zeros op, maybe reshaped)."""
    while isinstance(node, torch.fx.Node) and node.target in VIEWS:
        node = node.args[0]
    return isinstance(node, torch.fx.Node) and node.target in ZEROS


@contextlib.contextmanager
def shapes_only():
    """Within this context torch's recurrent layers and cells compute fake tensors (torch.export's
    values) from their arguments' shapes alone. Otherwise torch computes them op by op (a layer:
    several per frame and layer), each slow with a symbolic batch (a 2-layer GRU over 256
    frames: minutes). Real tensors and the captured graph (the op, whole) are unchanged.

    >>> with shapes_only():
    ...     ep = torch.export.export(model, (clip,))
    """
    keys = (DispatchKey.CompositeImplicitAutograd, DispatchKey.Autograd)
    saved = {(op, k): op.py_kernels.get(k) for op in (*GATES, *CELL_OPS) for k in keys}
    for (op, k), kernel in saved.items():
        op.py_kernels[k] = _shapes(op, kernel)
        op._dispatch_cache.clear()
    try:
        yield
    finally:
        for (op, k), kernel in saved.items():
            if kernel is None:
                del op.py_kernels[k]
            else:
                op.py_kernels[k] = kernel
            op._dispatch_cache.clear()


def _shapes(op, kernel):
    """`op`'s Python kernel `kernel` (None: its C++ decomposition), except on fake tensors: the new
    state shaped as the initial one, and for a layer first its output y."""
    def run(input, hx, *rest):
        if not isinstance(input, FakeTensor):
            return kernel(input, hx, *rest) if kernel else op.decompose(input, hx, *rest)
        new = [h.new_empty(h.shape) for h in (hx if isinstance(hx, (list, tuple)) else [hx])]
        if op in CELL_OPS:
            return tuple(new) if len(new) > 1 else new[0]
        width = new[0].shape[-1] * (2 if rest[5] else 1)          # rest[5]: bidirectional
        return (input.new_empty((*input.shape[:-1], width)), *new)
    return run


@register_op(*CELL_OPS)
class Cell(OpRule):
    """A recurrent cell on a value that carries frames: a loop over frames that
    passes/fuse_cell_loops.py did not turn into a recurrent layer."""

    def time(self, node, an):
        raise Refusal(f"a recurrent cell ({node.target}) reads a value that carries time (if it "
                      "runs in a loop over frames, the loop was not recognised as a recurrence)",
                      CELL_HINT)
